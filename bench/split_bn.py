"""What split BatchNorm (MoCo's shuffle BN on one device) costs per layer, against plain BN and the eager version.

    python bench/split_bn.py [--device cuda] [--splits 8] [--batch 512] [--layouts nchw,channels_last]
                             [--dtypes bf16,fp32] [--iters N] [--no-save]

For each layer shape of a CIFAR-stem ResNet-18 at 32 px (64x32x32, 128x16x16, 256x8x8, 512x4x4, batch `--batch`),
each memory layout and input dtype (bf16 = what autocast hands BN, with float32 parameters), the forward + backward
time of one training-mode layer, measured in the same run:

- `plain`: `nn.BatchNorm2d` (one statistics set for the whole batch: what MoCo without shuffle BN uses);
- `split`: `folk_nb.moco.SplitBatchNorm2d` (one `F.batch_norm` over an (N/G, G*C, H, W) view; channels_last inputs
  are copied to NCHW and back);
- `eager`: the first version of the layer (stop 12), kept here as the baseline: per-split statistics with
  `var_mean` and element-wise float32 ops on an (G, N/G, C, H, W) view, a dozen kernels per layer.

It prints ms per layer and the ratios split / plain and eager / split, and appends one JSON line per row to
bench/results/split_bn.jsonl (`--no-save`: don't). The whole-step cost is `bench/train_step.py --methods moco
--method-kwargs '{"bn_splits": 8}'`.
"""
import argparse, sys, time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_rows, command_line, device_words, load_average, load_pair, warn_if_busy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results' / 'split_bn.jsonl'
SHAPES = [(64, 32), (128, 16), (256, 8), (512, 4)]     # (channels, side) of the CIFAR-stem ResNet-18 stages at 32 px
DTYPES = {'bf16': torch.bfloat16, 'fp32': torch.float32}


class EagerSplitBatchNorm2d(nn.BatchNorm2d):
    "Baseline: the stop-12 split BN, statistics from var_mean and element-wise float32 ops (training mode only)."
    def __init__(self, num_features: int, num_splits: int):
        super().__init__(num_features)
        self.num_splits = num_splits

    def forward(self, x):
        G, (N, C, H, W) = self.num_splits, x.shape
        m = (N // G) * H * W
        xf = x.unflatten(0, (G, N // G)).float()
        var, mean = torch.var_mean(xf, dim=(1, 3, 4), unbiased=False, keepdim=True)
        scale = torch.rsqrt(var + self.eps) * self.weight.float().view(1, 1, C, 1, 1)
        shift = self.bias.float().view(1, 1, C, 1, 1) - mean * scale
        y = (xf * scale + shift).to(x.dtype).flatten(0, 1)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.mean(0).view(C), self.momentum)
            self.running_var.lerp_(var.mean(0).view(C) * (m / (m - 1)), self.momentum)
        return y


def ms_per_layer(layer: nn.Module, x: torch.Tensor, iters: int, warmup: int) -> float:
    "Mean ms of forward + backward (gradient of a fixed random cotangent) over `iters` after `warmup`."
    g = torch.randn_like(x)
    def once():
        x.grad = None
        layer(x).backward(g)
    for _ in range(warmup): once()
    if x.is_cuda: torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    for _ in range(iters): once()
    if x.is_cuda: torch.cuda.synchronize(x.device)
    return (time.perf_counter() - t0) / iters * 1000


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--splits', type=int, default=8)
    ap.add_argument('--batch', type=int, default=None, help='images per batch (default 512 on CUDA, 64 on CPU)')
    ap.add_argument('--layouts', default='nchw,channels_last')
    ap.add_argument('--dtypes', default='bf16,fp32')
    ap.add_argument('--iters', type=int, default=None, help='timed iterations (default 50 on CUDA, 3 on CPU)')
    ap.add_argument('--warmup', type=int, default=2)
    ap.add_argument('--no-save', action='store_true')
    a = ap.parse_args(argv)
    from folk_nb.moco import SplitBatchNorm2d
    device = torch.device(a.device)
    cuda = device.type == 'cuda'
    if cuda: torch.backends.cudnn.benchmark = True
    batch, iters = a.batch or (512 if cuda else 64), a.iters or (50 if cuda else 3)
    if batch % a.splits: raise SystemExit(f"--batch {batch} is not divisible by --splits {a.splits}")
    layouts = [s for s in a.layouts.split(',') if s]
    dtypes = [s for s in a.dtypes.split(',') if s]
    for s in layouts:
        if s not in ('nchw', 'channels_last'): raise SystemExit(f"unknown layout {s!r}: use nchw, channels_last")
    for s in dtypes:
        if s not in DTYPES: raise SystemExit(f"unknown dtype {s!r}: use {', '.join(DTYPES)}")
    dev_name = device_words(device)
    print(f"device {dev_name}; batch {batch}, {a.splits} splits; {iters} timed forward + backward passes per layer")
    print(f"{'layer':<12} {'layout':<14} {'dtype':<5} {'plain ms':>9} {'split ms':>9} {'eager ms':>9} "
          f"{'split/plain':>12} {'eager/split':>12}")
    load0, rows = load_average(), []
    for layout in layouts:
        for dt in dtypes:
            for C, S in SHAPES:
                torch.manual_seed(0)
                x = torch.randn(batch, C, S, S, device=device, dtype=DTYPES[dt])
                if layout == 'channels_last': x = x.contiguous(memory_format=torch.channels_last)
                x.requires_grad_(True)
                layers = dict(plain=nn.BatchNorm2d(C), split=SplitBatchNorm2d(C, a.splits),
                              eager=EagerSplitBatchNorm2d(C, a.splits))
                ms = {k: ms_per_layer(l.to(device).train(), x, iters, a.warmup) for k, l in layers.items()}
                row = dict(layer=f"{C}x{S}x{S}", layout=layout, dtype=dt, batch=batch, splits=a.splits,
                           **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
                           split_over_plain=round(ms['split'] / ms['plain'], 3),
                           eager_over_split=round(ms['eager'] / ms['split'], 3))
                rows.append(row)
                print(f"{row['layer']:<12} {layout:<14} {dt:<5} {ms['plain']:9.3f} {ms['split']:9.3f} {ms['eager']:9.3f} "
                      f"{row['split_over_plain']:11.2f}x {row['eager_over_split']:11.2f}x", flush=True)
    load1 = load_average()
    warn_if_busy(load0, load1, 0.75, "the times may be inflated")
    tot = {k: sum(r[f"{k}_ms"] for r in rows) for k in ('plain', 'split', 'eager')}
    print(f"all layers: split / plain {tot['split'] / tot['plain']:.2f}x, eager / split {tot['eager'] / tot['split']:.2f}x")
    if not a.no_save:
        append_rows(RESULTS, rows, 'split_bn', command_line('bench/split_bn.py', argv), dev_name,
                    torch=torch.__version__, iters=iters, warmup=a.warmup, load_avg_1min=load_pair(load0, load1))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
