"SpectrumExplorer in a real JupyterLab: run nbs/04_spectrum_explorer.ipynb, move its controls, see the plot change."
import re
import time

import pytest

from viewer_checks import drawn_keep_mask

pytestmark = pytest.mark.browser

NOTEBOOK = '04_spectrum_explorer.ipynb'
SIZE = 96                    # the notebook shows SpectrumExplorer(size=96)


def kept_bins(info: str) -> int:
    "The N of the explorer's 'kept N of M bins' info line (M must be SIZE * SIZE)."
    m = re.search(r'kept ([\d,]+) of ([\d,]+) bins', info)
    assert m, f'no "kept N of M bins" in the info text {info!r}'
    assert int(m.group(2).replace(',', '')) == SIZE * SIZE, info
    return int(m.group(1).replace(',', ''))


def check_plot_matches_info(ex, step: str) -> int:
    "The keep-mask panel drawn in the browser holds exactly the kept bins the info line reports; return that count."
    info = ex.html_text('kept')
    kept = int(drawn_keep_mask(ex, SIZE).sum())
    assert kept == kept_bins(info), f'{step}: the keep-mask panel has {kept} white bins, info says {info!r}'
    return kept


def test_spectrum_explorer_reacts_in_the_browser(open_notebook):
    t0 = time.monotonic()
    nb = open_notebook(NOTEBOOK)
    nb.run_all()
    ex = nb.widget(has='.js-plotly-plot', has_text='threshold')
    ex.plot().locator('.main-svg').first.wait_for()
    ex.screenshot('0-after-run')
    s0 = ex.snapshot()
    assert s0['state']['traces'] == 6, f'the widget\'s plotly figure holds {s0["state"]["traces"]} traces, expected 6 ' \
        '(drawn empty: the FigureWidget\'s traces never reached the browser)'
    assert s0['state']['drawn'] >= 6, f'only {s0["state"]["drawn"]} of the 6 panels were drawn'
    info0 = ex.html_text('kept')
    assert info0.startswith('FOLK random:'), info0         # where the notebook's last cell leaves the explorer
    check_plot_matches_info(ex, 'after Run All')

    # the mask dropdown: FOLK random -> Com (at threshold 0.002, set by the notebook)
    assert ex.select('mask', 'Com') == 'FOLK random'
    s1 = ex.wait_changed(s0, "choosing 'Com' in the mask dropdown", text='Com:')
    assert s1['pixels'] != s0['pixels'], 'the plot looks the same after changing the mask'
    kept1 = check_plot_matches_info(ex, 'mask Com')
    ex.screenshot('1-mask-Com')

    # the threshold slider (log scale): a higher threshold keeps fewer bins ...
    before, after = ex.move_slider('threshold', +8)
    assert float(after) > float(before), (before, after)
    s2 = ex.wait_changed(s1, 'moving the threshold slider up', text_changed=True)
    assert s2['pixels'] != s1['pixels'], 'the plot looks the same after moving the threshold slider'
    kept2 = check_plot_matches_info(ex, 'threshold up')
    assert kept2 < kept1, (kept1, kept2)
    ex.screenshot('2-threshold-up')

    # ... and a lower one more
    before, after = ex.move_slider('threshold', -14)
    assert float(after) < float(before), (before, after)
    s3 = ex.wait_changed(s2, 'moving the threshold slider down', text_changed=True)
    kept3 = check_plot_matches_info(ex, 'threshold down')
    assert kept3 > kept1, (kept1, kept3)

    # RCom keeps exactly the bins Com drops at the same threshold
    ex.select('mask', 'RCom')
    ex.wait_changed(s3, "choosing 'RCom' in the mask dropdown", text='RCom:')
    assert check_plot_matches_info(ex, 'mask RCom') == SIZE * SIZE - kept3
    ex.screenshot('3-mask-RCom')
    nb.screenshot('page')
    nb.assert_clean()
    nb.timings['test'] = round(time.monotonic() - t0, 1)
