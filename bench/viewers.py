"""Benchmark: how long one update of each viewer takes at 224 px on the CPU.

Run: .venv/bin/python bench/viewers.py [--threads N] [--repeats R]
Prints one table: milliseconds per update (median of R updates, each a *different* control value; the attention
viewer's layer cache is emptied before each layer change), as wall time and as the CPU time of this process (on a
machine shared with other jobs the wall time grows, the CPU time hardly: it is what an idle core would take). The
model's forward pass is timed on its own; "viewer" is the rest (masks, filtering, spectra, error profile, PNG
encoding, figure update). Models have random weights (speed does not depend on training):
  toy ViT   - vit_tiny_patch16_224 cut to 2 blocks (width 192): a small model
  ViT-Tiny  - vit_tiny_patch16_224 as published (12 blocks, width 192)
The widgets are not displayed; the figure update still serialises every change as it would for a browser.
"""
import argparse
import statistics
import time

import torch

from folk_nb.methods import create_method
from folk_nb.mfm import mfm_reconstruct
from folk_nb.viewers import ReconstructionViewer, AttentionViewer, TrainingDashboard, evaluating

SIZE = 224
MODELS = {'toy ViT (2 blocks)': dict(model='vit_tiny_patch16_224', model_kwargs=dict(depth=2)),
          'ViT-Tiny/16 (12 blocks)': dict(model='vit_tiny_patch16_224')}
MAE_DECODER = dict(decoder_dim=128, decoder_depth=2, decoder_heads=4)


def median_ms(fn, values, repeats):
    "Median (wall ms, CPU ms) of fn(v) over `repeats` values cycled from `values` (one warm-up call first)."
    fn(values[-1])
    wall, cpu = [], []
    for i in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn(values[i % len(values)])
        wall.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def forward_ms(method, repeats):
    "Median time of the model's own forward pass on one 224 px image, as the viewer calls it."
    x = torch.rand(1, 3, SIZE, SIZE)
    with evaluating(method):
        if method.name in ('mfm', 'folk'):
            fn = lambda _: mfm_reconstruct(method.backbone, method.mfm_head, x)
        else:
            from folk_nb.viewers import patch_split
            split, _ = patch_split(method, x, 0.75 if method.name == 'mae' else 0.45, 0.0 if method.name == 'mae' else 0.40)
            fn = lambda _: method.reconstruct(x, split)
        return median_ms(fn, [0], repeats)


def set_value(widget):
    def fn(v): widget.value = v
    return fn


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    ap.add_argument('--repeats', type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows = []
    for label, kw in MODELS.items():
        mfm = create_method('mfm', img_size=SIZE, **kw)
        v = ReconstructionViewer(mfm)
        t = median_ms(set_value(v.radius), [8.0, 12.0, 16.0, 20.0, 24.0, 28.0], a.repeats)
        rows.append((f'MFM  radius slider, {label}', t, forward_ms(mfm, a.repeats)))
        v.kind.value = 'Com'
        t = median_ms(set_value(v.threshold), [0.003, 0.005, 0.01, 0.02, 0.05], a.repeats)
        rows.append((f'MFM  Com threshold slider, {label}', t, forward_ms(mfm, a.repeats)))
        mae = create_method('mae', img_size=SIZE, **kw, **MAE_DECODER)
        v = ReconstructionViewer(mae)
        t = median_ms(set_value(v.mask_ratio), [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8], a.repeats)
        rows.append((f'MAE  mask-ratio slider, {label}', t, forward_ms(mae, a.repeats)))
        famt = create_method('famt', img_size=SIZE, num_images=1, **kw, **MAE_DECODER)
        v = ReconstructionViewer(famt)
        t = median_ms(set_value(v.mask_ratio), [0.3, 0.35, 0.4, 0.45, 0.5, 0.55], a.repeats)
        rows.append((f'FAMT mask-ratio slider (+ attention), {label}', t, forward_ms(famt, a.repeats)))
        av = AttentionViewer(mae)
        def new_layer(v):
            for k in [k for k in av._memo if k[0] == 'layer']: del av._memo[k]   # a layer not seen before
            av.layer.value = v
        t = median_ms(new_layer, list(range(len(av.model.blocks))), a.repeats)
        rows.append((f'Attention layer dropdown, {label}', t, None))
        t = median_ms(set_value(av.head), [0, 1, 2, None], a.repeats)
        rows.append((f'Attention head dropdown, {label}', t, None))
    dash = TrainingDashboard(total_steps=10_000, min_interval=0.0)
    step = iter(range(1, 10**6))
    def log(_):
        s = next(step)
        dash.on_log(dict(step=s, epoch=0, loss=1.0 / s, loss_mfm=1.0 / s, lr=1e-3, img_per_s=500.0, time=0.01 * s))
    for _ in range(1000): log(0)
    rows.append(('Dashboard redraw after 1,000 rows', median_ms(log, [0], a.repeats), None))

    print(f"viewer updates at {SIZE} px, torch {torch.__version__}, {a.threads} CPU thread(s); median of {a.repeats}")
    print(f"{'':62s} {'-------- wall ms ---------':>28s}  {'--------- CPU ms ---------':>28s}")
    print(f"{'update':62s} {'total':>8s} {'model':>9s} {'viewer':>9s}  {'total':>8s} {'model':>9s} {'viewer':>9s}")
    for name, total, model in rows:
        cells = []
        for k in (0, 1):
            own = f"{total[k] - model[k]:9.1f}" if model is not None else f"{'':>9s}"
            cells.append(f"{total[k]:8.1f} {model[k] if model is not None else float('nan'):9.1f} {own}")
        print(f"{name:62s} {cells[0]}  {cells[1]}")


if __name__ == '__main__':
    main()
