"ReconstructionViewer, AttentionViewer and TrainingDashboard in a real JupyterLab: run nbs/50_viewers.ipynb, use them."
import re
import time

import numpy as np
import pytest

from viewer_checks import check_dashboard_grew, check_kept_profile, patch_counts

pytestmark = pytest.mark.browser

NOTEBOOK = '50_viewers.ipynb'
SIZE = 32                    # the notebook's models take 32 px images
PATCHES = (SIZE // 8) ** 2   # ... in 8 px patches
TINY = dict(model='vit_tiny_patch16_224', img_size=SIZE, patch_size=8, model_kwargs=dict(depth=1, embed_dim=32, num_heads=2))
# ReconstructionViewer traces: 0 image, 1 encoder input, 2 reconstruction, 3 spectrum of the image, 4 of the
# reconstruction, 5 error per ring, 6 kept fraction per ring
INPUT, PRED, SPECTRUM, KEPT = 1, 2, 3, 6
# AttentionViewer traces: 0 image + attention, 1 attention, 2 FAMT weights, 3 split, 4 entropy curve, 5 overlap curve,
# 6 the marker of the checkpoint shown
OVERLAY, ATTENTION, WEIGHTS, ENTROPY, OVERLAP, SHOWN = 0, 1, 2, 4, 5, 6


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    "Checkpoints a user would type into the viewer: FOLK and FAMT (viewable), MoCo (not), and a text file."
    import torch
    from folk_nb.methods import create_method
    from folk_nb.trainer import CHECKPOINT_FORMAT
    folder = tmp_path_factory.mktemp('checkpoints')
    torch.manual_seed(0)
    methods = dict(folk=create_method('folk', **TINY, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16),
                   famt=create_method('famt', **TINY, num_images=14, decoder_dim=32, decoder_depth=1, decoder_heads=2),
                   moco=create_method('moco', **TINY, out_dim=32, queue_size=64))
    paths = {}
    for name, m in methods.items():
        paths[name] = folder / f'{name}.pt'
        torch.save(dict(format=CHECKPOINT_FORMAT, method=m.name, method_config=m.config, model=m.state_dict(),
                        step=5, total_steps=10), paths[name])
    paths['notes'] = folder / 'notes.txt'
    paths['notes'].write_text('not a checkpoint')
    return paths


def test_viewers_react_in_the_browser(open_notebook, checkpoints):
    t0 = time.monotonic()
    nb = open_notebook(NOTEBOOK)

    def dashboard_on_show():   # as a reader: run up to the dashboard, see it drawn, then run the training cell
        dash = nb.widget(has='.js-plotly-plot', has_text='waiting for the first log row')
        dash.plot().locator('.main-svg').first.wait_for()
        nb.record_trace_lengths('dashboard', 'kNN top-1', 'loss')   # every length the browser draws from now on
    nb.run_all(pauses=[('callbacks=[dash]', dashboard_on_show)])

    # ---- TrainingDashboard: the loss trace grew while the trainer ran (16 steps, a row every 2 steps)
    lengths = nb.recorded('dashboard')
    assert len(lengths) == 1, f'expected one dashboard plot, saw {len(lengths)}'
    check_dashboard_grew(lengths[0], 8, 'TrainingDashboard')
    dash = nb.widget(has='.js-plotly-plot', has_text='finished')
    loss = dash.plot().evaluate("g => { const t = g.data.find(d => d.name === 'loss'); return [Array.from(t.x), Array.from(t.y)]; }")
    assert loss[0] == list(range(2, 17, 2)) and all(np.isfinite(loss[1])), loss
    status = dash.html_text('finished')
    assert 'at step 16' in status, status
    assert abs(float(re.search(r'loss ([\d.]+)', status).group(1)) - loss[1][-1]) < 1e-4, (status, loss[1])  # last row
    dash.screenshot('dashboard')

    # ---- ReconstructionViewer, as the notebook leaves it: MFM (mfm.pt) with the low-pass disc
    rv = nb.widget(has='.js-plotly-plot', has_text='pixel MSE')
    rv.plot().locator('.main-svg').first.wait_for()
    s0 = rv.snapshot()
    assert s0['state']['traces'] == 7 and s0['state']['drawn'] >= 5, s0['state']
    assert rv.html_text('pixel MSE').startswith('MFM · mfm.pt'), rv.html_text('pixel MSE')
    kept0 = check_kept_profile(rv, SIZE, 'after Run All')
    assert rv.trace_data(KEPT, 'y')[0] == 1                      # low-pass: DC kept
    image0, input0, pred0 = (rv.trace_data(i, 'source') for i in (0, INPUT, PRED))
    rv.screenshot('0-reconstruction-after-run')

    # a larger disc keeps more bins; the encoder gets another input, the model rebuilds another picture
    before, after = rv.move_slider('radius', +4)
    assert float(after) > float(before)
    s1 = rv.wait_changed(s0, 'moving the radius slider', text_changed=True)
    kept1 = check_kept_profile(rv, SIZE, 'radius up')
    assert kept1 > kept0, (kept0, kept1)
    assert rv.trace_data(0, 'source') == image0, 'the target image changed with the mask'
    assert rv.trace_data(INPUT, 'source') != input0 and rv.trace_data(PRED, 'source') != pred0
    assert s1['pixels'] != s0['pixels']

    # high-pass at the same radius keeps exactly the other bins
    rv.select('mask', 'MFM high-pass')
    s2 = rv.wait_changed(s1, "choosing 'MFM high-pass'", text='MFM high-pass')
    assert check_kept_profile(rv, SIZE, 'high-pass') == SIZE * SIZE - kept1
    assert rv.trace_data(KEPT, 'y')[0] == 0                      # DC removed
    rv.screenshot('1-reconstruction-high-pass')

    # another image: a new target and spectrum
    spectrum0 = rv.trace_data(SPECTRUM, 'source')
    rv.select('image', 'coffee')
    s3 = rv.wait_changed(s2, "choosing the image 'coffee'")
    assert rv.trace_data(0, 'source') != image0 and rv.trace_data(SPECTRUM, 'source') != spectrum0
    check_kept_profile(rv, SIZE, 'coffee')

    # another method: type a FOLK checkpoint's path and press load; FOLK opens on Com with its threshold slider
    rv.fill('checkpoint', str(checkpoints['folk']))
    rv.click('load')
    s4 = rv.wait_changed(s3, 'loading the FOLK checkpoint', text='FOLK · folk.pt step 5')
    assert 'Com:' in rv.html_text('pixel MSE')
    assert rv.slider('threshold').is_visible() and not rv.slider('radius').is_visible()
    kept4 = check_kept_profile(rv, SIZE, 'FOLK, Com')
    before, after = rv.move_slider('threshold', +6)             # a higher threshold keeps fewer bins
    assert float(after) > float(before)
    s5 = rv.wait_changed(s4, 'moving the threshold slider', text_changed=True)
    assert check_kept_profile(rv, SIZE, 'FOLK, Com, threshold up') < kept4
    rv.screenshot('2-reconstruction-folk')

    # FAMT: the mask controls become the patch ratios, there is no frequency mask
    rv.fill('checkpoint', str(checkpoints['famt']))
    rv.click('load')
    s6 = rv.wait_changed(s5, 'loading the FAMT checkpoint', text='FAMT · famt.pt step 5')
    assert not rv.dropdown('mask').is_visible() and rv.slider('mask ratio').is_visible()
    assert rv.trace_data(KEPT, 'y') == [] and rv.trace_data(KEPT, 'x') == []
    m6, t6, v6 = patch_counts(rv.html_text('pixel MSE'), PATCHES)
    rv.move_slider('mask ratio', +3)
    s7 = rv.wait_changed(s6, 'moving the mask ratio slider', text_changed=True)
    m7, t7, v7 = patch_counts(rv.html_text('pixel MSE'), PATCHES)
    assert m7 > m6 and t7 == t6 and v7 < v6, ((m6, t6, v6), (m7, t7, v7))
    assert s7['pixels'] != s6['pixels']
    rv.screenshot('3-reconstruction-famt')

    # bad input: messages in the widget, the model and the plot stay
    rv.fill('checkpoint', str(checkpoints['notes']))
    rv.click('load')
    assert 'not a readable checkpoint' in rv.wait_text('Could not load the checkpoint', 'loading a text file')
    rv.fill('checkpoint', str(checkpoints['moco']))
    rv.click('load')
    assert "is a 'moco' checkpoint" in rv.wait_text("'moco'", 'loading a MoCo checkpoint')
    rv.upload('upload', 'notes.txt', b'not an image', 'text/plain')
    rv.wait_text('Could not use notes.txt', 'uploading a text file')
    rv.screenshot('4-reconstruction-bad-input')
    assert rv.plot_state()['digest'] == s7['state']['digest'] and rv.html_text('pixel MSE').startswith('FAMT')
    nb.assert_clean()

    # ---- AttentionViewer, as the notebook leaves it: the last of 4 FAMT checkpoints, rollout, curve traced
    av = nb.widget(has='.js-plotly-plot', has_text='FAMT weight entropy')
    av.plot().locator('.main-svg').first.wait_for()
    a0 = av.snapshot()
    info = av.html_text('FAMT weight entropy')
    assert 'rollout' in info and 'checkpoint 4/4: famt_24.pt, step 24' in info, info
    steps = av.trace_data(ENTROPY, 'x')
    assert steps == [0, 8, 16, 24] and av.trace_data(SHOWN, 'x') == [24, 24], steps
    assert av.trace_data(OVERLAP, 'y')[0] == 1                   # the first checkpoint overlaps itself
    check_attention(av, info, steps)
    assert av.dropdown('head').is_disabled()                     # the rollout mixes the heads
    av.screenshot('5-attention-after-run')

    # an earlier checkpoint: the marker moves to step 8, the attention is that checkpoint's
    z0 = av.trace_data(ATTENTION, 'z')
    assert av.move_slider('checkpoint', -2) == ('3', '1')
    a1 = av.wait_changed(a0, 'moving the checkpoint slider', text='step 8')
    info = av.html_text('FAMT weight entropy')
    assert 'checkpoint 2/4: famt_8.pt' in info and av.trace_data(SHOWN, 'x') == [8, 8], info
    assert av.trace_data(ATTENTION, 'z') != z0
    check_attention(av, info, steps)

    # one layer instead of the rollout: a single head, min-max normalised
    assert av.toggle('rollout (up to this layer)') is False
    a2 = av.wait_changed(a1, 'unticking rollout', text='head 1')
    assert not av.dropdown('head').is_disabled()
    z = np.array(av.trace_data(ATTENTION, 'z'))
    assert z.min() == 0 and z.max() == 1, z
    av.select('head', 'mean of heads')
    a3 = av.wait_changed(a2, "choosing 'mean of heads'", text='mean of heads')
    assert av.selected('head') == 'mean of heads'               # the dropdown names what is drawn
    z3 = av.trace_data(ATTENTION, 'z')
    assert z3 != z.tolist() and max(map(max, z3)) <= 1
    av.select('layer', '0')
    a4 = av.wait_changed(a3, 'choosing layer 0', text='layer 0,')
    assert av.trace_data(ATTENTION, 'z') != z3

    # the opacity slider only repaints the overlay
    z4, w4, overlay4 = av.trace_data(ATTENTION, 'z'), av.trace_data(WEIGHTS, 'z'), av.trace_data(OVERLAY, 'source')
    av.move_slider('opacity', -4)
    a5 = av.wait_changed(a4, 'moving the opacity slider')
    assert av.trace_data(OVERLAY, 'source') != overlay4
    assert av.trace_data(ATTENTION, 'z') == z4 and av.trace_data(WEIGHTS, 'z') == w4
    av.screenshot('6-attention-layer-0')

    av.upload('upload', 'notes.txt', b'not an image', 'text/plain')
    av.wait_text('Could not use notes.txt', 'uploading a text file')
    assert av.plot_state()['digest'] == a5['state']['digest']
    nb.screenshot('page')
    nb.assert_clean()
    nb.timings['test'] = round(time.monotonic() - t0, 1)


def check_attention(av, info: str, steps: list):
    "The FAMT weights drawn sum to 1; the entropy in the info line is the curve's value at the checkpoint shown."
    w = np.array(av.trace_data(WEIGHTS, 'z'), float)
    assert w.shape == ((SIZE // 8),) * 2 and abs(w.sum() - 1) < 1e-4, w
    step = int(re.search(r'step (\d+)', info).group(1))
    entropy = float(re.search(r'FAMT weight entropy ([\d.]+)', info).group(1))
    curve = av.trace_data(ENTROPY, 'y')
    assert abs(curve[steps.index(step)] - entropy) < 6e-4, (curve, entropy)
    assert av.trace_data(SHOWN, 'y')[0] == curve[steps.index(step)]
