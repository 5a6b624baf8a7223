"""Copy the browser tests' widget screenshots shown in README.md / nbs/index.ipynb into docs/screenshots/.

Run the browser tests first (`.venv/bin/pytest tests/browser`), look at tests/_artifacts/browser/, then
`.venv/bin/python tests/browser/readme_screenshots.py [NAME ...]` (default: all). Each picture is the widget's output
area with its white margins trimmed, re-encoded losslessly (PIL, optimize), or with 256 colours if that is not under
300 kB.
"""
import sys
from pathlib import Path

from PIL import Image, ImageChops

from labdriver import ARTIFACTS, REPO

DOCS = REPO / 'docs' / 'screenshots'
LIMIT = 300_000   # bytes per picture
SOURCES = {       # docs/screenshots/NAME: the widget screenshot (tests/_artifacts/browser/) it is copied from
    'spectrum_explorer.png': '04_spectrum_explorer-1-mask-Com.png',             # test_browser_spectrum_explorer
    'patch_explorer.png': '13_patch_explorer-0-after-run.png',                   # test_browser_patch_explorer
    'saliency_explorer.png': '13_patch_explorer-3-saliency-mean-fill.png',       # test_browser_patch_explorer
    'reconstruction_viewer.png': 'frequency_masking-1-mfm-viewer.png',           # test_browser_tutorial
    'attention_viewer.png': '50_viewers-5-attention-after-run.png',              # test_browser_viewers
    'training_dashboard.png': '50_viewers-dashboard.png',                        # test_browser_viewers
}


def trim(img: Image.Image, pad: int = 4) -> Image.Image:
    "Cut the white margins around the content (keeping `pad` pixels)."
    box = ImageChops.difference(img, Image.new('RGB', img.size, (255, 255, 255))).getbbox()
    if box is None: return img
    l, t, r, b = box
    return img.crop((max(l - pad, 0), max(t - pad, 0), min(r + pad, img.width), min(b + pad, img.height)))


def main(names):
    DOCS.mkdir(parents=True, exist_ok=True)
    for name in names or SOURCES:
        src = ARTIFACTS / SOURCES[name]
        if not src.is_file(): sys.exit(f'{src} is missing: run the browser tests first')
        dst = DOCS / name
        img, how = trim(Image.open(src).convert('RGB')), 'lossless'
        img.save(dst, optimize=True)
        if dst.stat().st_size >= LIMIT:   # photos in the widget: a 256-colour palette keeps them readable
            img.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG).save(dst, optimize=True)
            how = '256 colours'
        size = dst.stat().st_size
        print(f'{dst.relative_to(REPO)} <- {src.name} ({size / 1000:.0f} kB, {how})')
        if size >= LIMIT: sys.exit(f'{dst} is {size} bytes; keep README pictures under {LIMIT} (crop the widget smaller)')


if __name__ == '__main__':
    main(sys.argv[1:])
