"The SpectrumExplorer reacts to its controls and to uploads; folk_nb_gallery writes a report."
import base64
import io
import numpy as np
import pytest
import torch
from PIL import Image

from folk_nb.spectrum_explorer import SpectrumExplorer, MASK_KINDS, make_keep_mask
from folk_nb.freq_masks import ratio_mask
from folk_nb.report import main as gallery_main


def drawn_keep_mask(ex) -> np.ndarray:
    "The keep-mask panel as the browser gets it: its PNG decoded with PIL, white = kept."
    uri = ex.fig.data[2].source
    assert uri.startswith('data:image/png;base64,')
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(',', 1)[1]))))
    assert set(np.unique(a)) <= {0, 255}, 'a keep-mask is black and white'
    return a == 255


def png_bytes(h=40, w=50):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((h, w, 3)) * 255).astype(np.uint8)).save(buf, format='PNG')
    return buf.getvalue()


def test_every_mask_kind_draws_and_counts_bins():
    ex = SpectrumExplorer(size=48)
    for kind in MASK_KINDS:
        ex.kind.value = kind
        assert ex.message.value == ''
        keep = drawn_keep_mask(ex)
        assert keep.shape == (48, 48) and int(keep.sum()) == ex.last['kept']
        assert f"{ex.last['kept']:,} of 2,304" in ex.info.value


def test_ratio_slider_removes_exact_fraction_and_matches_library():
    ex = SpectrumExplorer(size=48, kind='ratio: weakest first')
    ex.ratio.value = 0.4
    x = ex.current_image()[None]
    assert np.array_equal(drawn_keep_mask(ex), ratio_mask(x, 0.4, strongest=False)[0, 0].numpy())


def test_resample_changes_folk_draw_eventually():
    ex = SpectrumExplorer(size=48, kind='FOLK random')
    seen = {ex.last['kept']}
    for _ in range(10):
        ex.resample.click(); seen.add(ex.last['kept'])
    assert len(seen) > 1


def test_upload_of_image_and_of_garbage():
    ex = SpectrumExplorer(size=32)
    ex._on_upload({'new': ({'name': 'mine.png', 'content': memoryview(png_bytes())},)})
    assert ex.image.value == 'upload: mine.png' and ex.message.value == ''
    assert ex.fig.data[0].source.startswith('data:image/png;base64,') and ex.last['image'].shape == (32, 32, 3)
    ex._on_upload({'new': ({'name': 'broken.jpg', 'content': b'\xff\xd8\xff garbage'},)})
    assert 'Could not use broken.jpg' in ex.message.value
    assert ex.image.value == 'upload: mine.png'                  # the previous image stays


def test_gallery_command_writes_report(tmp_path):
    out = gallery_main(['--out', str(tmp_path / 'demo.html'), '--size', '32', '--images', '3'])
    text = out.read_text()
    assert out.exists() and 'Mask gallery' in text and text.count("\"source\":\"data:image") >= 3 * 7   # one PNG per tile (plotly escapes the slash)
