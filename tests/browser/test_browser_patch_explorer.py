"PatchMaskExplorer and SaliencyExplorer in a real JupyterLab: run nbs/13_patch_explorer.ipynb, move controls."
import re

import pytest

pytestmark = pytest.mark.browser

NOTEBOOK = '13_patch_explorer.ipynb'


def counts(info: str) -> tuple:
    "(masked, thrown, visible, total) from the explorer's 'masked N / thrown N / visible N of M patches' line."
    m = re.search(r'masked (\d+) / thrown (\d+) / visible (\d+) of (\d+) patches', info)
    assert m, f'no split counts in the info text {info!r}'
    return tuple(int(g) for g in m.groups())


def test_patch_and_saliency_explorers_react_in_the_browser(open_notebook):
    nb = open_notebook(NOTEBOOK)
    nb.run_all()

    ex = nb.widget(has='.js-plotly-plot', has_text='mask ratio')
    ex.plot().locator('.main-svg').first.wait_for()
    s0 = ex.snapshot()
    ex.screenshot('0-after-run')
    assert s0['state']['traces'] >= 4 and s0['state']['drawn'] >= 4, s0['state']
    m0, t0, v0, n = counts(ex.html_text('visible'))
    assert m0 + t0 + v0 == n

    ex.move_slider('mask ratio', -5)                       # fewer masked patches
    s1 = ex.wait_changed(s0, 'moving the mask ratio slider', text_changed=True)
    m1, t1, v1, _ = counts(ex.html_text('visible'))
    assert m1 < m0 and m1 + t1 + v1 == n, ((m0, t0, v0), (m1, t1, v1))
    assert s1['pixels'] != s0['pixels'], 'the split drawn on the image did not change'
    ex.screenshot('1-mask-ratio-down')

    ex.select('mode', 'random (MAE)')
    ex.wait_changed(s1, "choosing 'random (MAE)' in the mode dropdown")
    m2, t2, v2, _ = counts(ex.html_text('visible'))
    assert m2 + t2 + v2 == n
    ex.screenshot('2-random')

    sal = nb.widget(has='.js-plotly-plot', has_text='hard-negative ratio')
    sal.plot().locator('.main-svg').first.wait_for()
    z0 = sal.snapshot()
    assert z0['state']['drawn'] >= 6, z0['state']
    sal.select('fill', 'mean')
    z1 = sal.wait_changed(z0, "choosing the 'mean' fill")
    assert z1['pixels'] != z0['pixels'], 'the filled query view did not change'
    sal.screenshot('3-saliency-mean-fill')
    nb.screenshot('page')
    nb.assert_clean()
