"The frequency-masking tutorial in a real JupyterLab: run nbs/tutorials/frequency_masking.ipynb, use each widget it shows."
import time

import pytest

from viewer_checks import check_dashboard_grew, check_keep_mask, check_kept_profile

pytestmark = pytest.mark.browser

NOTEBOOK = 'tutorials/frequency_masking.ipynb'
EXPLORER_SIZE = 128          # SpectrumExplorer(size=128, ...)
SIZE = 64                    # the two toy models take 64 px images
LOG_ROWS = 10                # 30 steps, a log row every 3
INPUT, PRED = 1, 2           # ReconstructionViewer traces: encoder input, reconstruction


def slide_up(widget, slider: str, what: str, kept) -> tuple:
    "Move `slider` up, wait until the widget redraws with new pixels; (kept bins before, after) as `kept` measures."
    s0 = widget.snapshot()
    kept0 = kept(f'{what} after Run All')
    before, after = widget.move_slider(slider, +6)
    assert float(after) > float(before)
    s1 = widget.wait_changed(s0, f'moving the {what} {slider} slider', text_changed=True)
    assert s1['pixels'] != s0['pixels']
    return kept0, kept(f'{what} {slider} up')


def test_tutorial_widgets_react_in_the_browser(open_notebook):
    t0 = time.monotonic()
    nb = open_notebook(NOTEBOOK)

    def dashboard_on_show():   # as a reader: see the (empty) dashboard drawn before running the training cell
        dash = nb.widget(has='.js-plotly-plot', has_text='waiting for the first log row')
        dash.plot().locator('.main-svg').first.wait_for()
        if not nb.page.evaluate('() => !!(window.__folkRecords && window.__folkRecords.dashboards)'):
            nb.record_trace_lengths('dashboards', 'kNN top-1', 'loss')   # both dashboards, every length drawn
    nb.run_all(pauses=[('callbacks=[dash])', dashboard_on_show), ('callbacks=[dash_folk])', dashboard_on_show)])

    # ---- the two TrainingDashboards grew while their runs went on, and end with every log row
    lengths = nb.recorded('dashboards')
    assert len(lengths) == 2, f'expected two dashboards, saw {len(lengths)}'
    for seen, name in zip(lengths, ('MFM', 'FOLK')): check_dashboard_grew(seen, LOG_ROWS, f'{name} dashboard')
    dashes = nb.page.locator('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output').filter(
        has=nb.page.locator('.js-plotly-plot')).filter(has_text='finished at step 30')
    assert dashes.count() == 2
    for i in range(2):
        x = dashes.nth(i).locator('.js-plotly-plot').evaluate("g => Array.from(g.data.find(d => d.name === 'loss').x)")
        assert x == list(range(3, 31, 3)), x
    nb.screenshot('dashboard-mfm', locator=dashes.nth(0))

    # ---- SpectrumExplorer: a larger MFM disc keeps more bins
    se = nb.widget(has='.js-plotly-plot', has_text='kept', has_not_text='pixel MSE')
    se.plot().locator('.main-svg').first.wait_for()
    assert se.html_text('kept').startswith('MFM low-pass:'), se.html_text('kept')
    kept0, kept1 = slide_up(se, 'radius', 'SpectrumExplorer', lambda step: check_keep_mask(se, EXPLORER_SIZE, step))
    assert kept1 > kept0
    se.screenshot('0-spectrum-explorer')

    # ---- the MFM toy in the ReconstructionViewer: radius slider
    mfm = nb.widget(has='.js-plotly-plot', has_text='MFM · MFM low-pass')
    mfm.plot().locator('.main-svg').first.wait_for()
    input0, pred0 = mfm.trace_data(INPUT, 'source'), mfm.trace_data(PRED, 'source')
    mfm.screenshot('1-mfm-viewer')
    kept0, kept1 = slide_up(mfm, 'radius', 'MFM', lambda step: check_kept_profile(mfm, SIZE, step))
    assert kept1 > kept0
    assert mfm.trace_data(INPUT, 'source') != input0 and mfm.trace_data(PRED, 'source') != pred0
    mfm.screenshot('2-mfm-viewer-radius-up')

    # ---- the FOLK toy: Com, threshold slider; a higher threshold keeps fewer bins
    folk = nb.widget(has='.js-plotly-plot', has_text='FOLK · Com')
    folk.plot().locator('.main-svg').first.wait_for()
    kept0, kept1 = slide_up(folk, 'threshold', 'FOLK', lambda step: check_kept_profile(folk, SIZE, step))
    assert kept1 < kept0
    folk.screenshot('3-folk-viewer-threshold-up')
    nb.screenshot('page')
    nb.assert_clean()
    nb.timings['test'] = round(time.monotonic() - t0, 1)
