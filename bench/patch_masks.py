"""Benchmark: batched patch splits and attention extraction vs per-image loops.

Run: .venv/bin/python bench/patch_masks.py
Prints one table and the speed-up ratios measured in this run. The device is CUDA when available, else CPU.
Attention: vit_small_patch16_224 (random weights), B = 256 on CUDA; on CPU B = 32 (B = 256 would take minutes).
"""
import os
import statistics
import time

import numpy as np
import timm
import torch

from folk_nb.attention import attention_map
from folk_nb.patch_masks import mask_throw_keep, split_counts

DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def sync():
    if DEVICE.type == 'cuda': torch.cuda.synchronize()


def timeit(fn, repeats=5, warmup=1):
    "Median wall time of `fn()` in seconds."
    for _ in range(warmup): fn()
    times = []
    for _ in range(repeats):
        sync(); t = time.perf_counter(); fn(); sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def split_per_image_numpy(w, mask_ratio, throw_ratio, rng):
    "Reference loop: one weighted draw without replacement per image (numpy), then cut into three sets."
    n = w.shape[1]
    n_mask, n_throw, _ = split_counts(n, mask_ratio, throw_ratio)
    out = []
    for row in w:  # the loop the batched version avoids
        p = row / row.sum()
        order = rng.choice(n, size=n, replace=False, p=p)
        out.append((np.sort(order[:n_mask]), np.sort(order[n_mask:n_mask + n_throw]), np.sort(order[n_mask + n_throw:])))
    return out


def main():
    torch.manual_seed(0)
    rows = []
    # ---- split: B = 256, N = 196 (ViT-B/16 at 224 px), FAMT 0.45 / 0.40
    b, n = 256, 196
    w = torch.rand(b, n, device=DEVICE) + 1e-6
    g = torch.Generator(device=DEVICE).manual_seed(0)
    t_split = timeit(lambda: mask_throw_keep(w, 0.45, 0.40, generator=g), repeats=20, warmup=3)
    w_np = w.double().cpu().numpy()
    rng = np.random.default_rng(0)
    # the loop includes the host copy a training step would need on GPU
    t_split_loop = timeit(lambda: split_per_image_numpy(w.double().cpu().numpy(), 0.45, 0.40, rng), repeats=3)
    rows.append((f'split B={b} N={n} (mask_throw_keep)', t_split, t_split_loop))

    # ---- attention extraction
    ba = 256 if DEVICE.type == 'cuda' else 32
    model = timm.create_model('vit_small_patch16_224', pretrained=False).to(DEVICE).eval()
    x = torch.randn(ba, 3, 224, 224, device=DEVICE)
    t_att = timeit(lambda: attention_map(model, x), repeats=3)
    t_att_loop = timeit(lambda: [attention_map(model, x[i:i + 1]) for i in range(ba)], repeats=1, warmup=1)
    rows.append((f'attention B={ba} vit_small_patch16_224 (last layer)', t_att, t_att_loop))
    t_roll = timeit(lambda: attention_map(model, x, rollout=True), repeats=3)
    rows.append((f'attention B={ba} vit_small_patch16_224 (rollout)', t_roll, None))

    print(f"device: {DEVICE}{' (' + torch.cuda.get_device_name() + ')' if DEVICE.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.1f} (CPU timings are noisy on a shared machine)")
    if DEVICE.type == 'cpu': print('CPU run: attention uses B = 32 (B = 256 on CUDA).')
    print(f"{'case':<52} {'batched ms':>11} {'loop ms':>10} {'speed-up':>9}")
    for name, tb, tl in rows:
        print(f"{name:<52} {tb * 1e3:>11.2f} {'' if tl is None else f'{tl * 1e3:10.1f}':>10} "
              f"{'' if tl is None else f'{tl / tb:8.1f}x':>9}")
    print(f"batched attention vs per-image loop: {t_att_loop / t_att:.1f}x")
    print(f"batched split vs per-image loop: {t_split_loop / t_split:.1f}x")


if __name__ == '__main__':
    main()
