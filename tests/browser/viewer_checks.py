"Facts the browser tests check on the ReconstructionViewer and SpectrumExplorer, from what the page shows."
import base64
import io
import re

import numpy as np
from PIL import Image

KEPT = 6            # ReconstructionViewer trace: kept fraction per ring
KEEP_MASK = 2       # SpectrumExplorer trace: the keep-mask panel


def ring_sizes(n: int) -> np.ndarray:
    "Bins per ring of the shifted n x n grid (ring = distance from DC rounded), computed here independently."
    f = np.arange(n) - n // 2
    return np.bincount(np.round(np.hypot(f[:, None], f[None, :])).astype(int).ravel())


def kept_bins(info: str, size: int) -> int:
    "The N of an info line's 'kept N of M bins' (M must be size * size)."
    m = re.search(r'kept ([\d,]+) of ([\d,]+) bins', info)
    assert m, f'no "kept N of M bins" in the info text {info!r}'
    assert int(m.group(2).replace(',', '')) == size * size, info
    return int(m.group(1).replace(',', ''))


def check_kept_profile(rv, size: int, step: str) -> int:
    "ReconstructionViewer: the kept-fraction curve drawn, times the ring sizes, adds up to the bins its info reports."
    info = rv.html_text('pixel MSE')
    frac = np.array(rv.trace_data(KEPT, 'y'), float)
    sizes = ring_sizes(size)
    assert frac.shape == sizes.shape and frac.min() >= 0 and frac.max() <= 1, (step, frac)
    kept = kept_bins(info, size)
    assert abs(float(frac @ sizes) - kept) < 1e-3, f'{step}: the kept-fraction curve adds up to {frac @ sizes}, info {info!r}'
    return kept


def check_keep_mask(ex, size: int, step: str) -> int:
    "SpectrumExplorer: the keep-mask panel drawn holds exactly the kept bins the info line reports."
    keep = drawn_keep_mask(ex, size)
    kept = kept_bins(ex.html_text('kept'), size)
    assert int(keep.sum()) == kept, f'{step}: the keep-mask panel has {int(keep.sum())} white bins, info says {kept}'
    return kept


def drawn_keep_mask(ex, size: int) -> np.ndarray:
    "SpectrumExplorer's keep-mask panel as the browser holds it: its Image trace's PNG source, decoded (True = kept)."
    uri = ex.plot().evaluate('(el, i) => el.data[i].source', KEEP_MASK)
    assert isinstance(uri, str) and uri.startswith('data:image/png;base64,'), f'keep-mask trace source: {str(uri)[:60]!r}'
    a = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(',', 1)[1]))))
    assert a.shape == (size, size) and set(np.unique(a)) <= {0, 255}, (a.shape, np.unique(a)[:8])
    return a == 255


def patch_counts(info: str, patches: int) -> tuple:
    "(masked, thrown, visible) of a ReconstructionViewer info line; they add up to `patches`."
    m = re.search(r'masked (\d+), thrown (\d+), visible (\d+) of (\d+) patches', info)
    assert m, f'no patch counts in the info text {info!r}'
    masked, thrown, visible, total = map(int, m.groups())
    assert masked + thrown + visible == total == patches, info
    return masked, thrown, visible


def check_dashboard_grew(lengths: list, rows: int, what: str):
    "The loss trace lengths a dashboard showed in the browser: from empty to `rows`, growing, with a step between."
    assert lengths and lengths[0] == 0 and lengths[-1] == rows and lengths == sorted(lengths), \
        f'{what}: loss trace lengths drawn in the browser: {lengths}'
    assert any(0 < n < rows for n in lengths), f'{what}: the dashboard was drawn only once the run had ended: {lengths}'
