"""Batched frequency mask + filter vs the per-image numpy reference, measured in one run.

    python bench/masks.py [--batch 64] [--size 224] [--repeats 5] [--device cpu|cuda]

Both sides compute a FOLK mask (Com / RCom from the image's own amplitude) and filter the image with it. The
reference does it image by image with numpy's complex128 FFTs (one forward FFT shared by mask and filter, one
inverse), as a straightforward implementation would; folk_nb does the whole batch with one float32 rfft2 and one
irfft2, building masks in the unshifted layout instead of shifting the spectrum. On a CUDA device it also reports
milliseconds per batch of 128. Results are appended to bench/results/masks.jsonl with the device, date and command.
"""
import argparse, json, os, platform, subprocess, sys, time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tests'))
import reference as ref  # noqa: E402
from folk_nb.images import sample_images  # noqa: E402
from folk_nb.freq_masks import folk_filter, mfm_filter  # noqa: E402


def reference_folk_filter(batch, thresholds, use_com, rng):
    "Per-image numpy: one fft2, amplitude, Com/RCom mask, ifft2."
    out = np.empty_like(batch)
    for i, img in enumerate(batch):
        spec = np.fft.fftshift(np.fft.fft2(img.astype(np.float64), axes=(-2, -1)), axes=(-2, -1))
        amp = np.abs(spec).mean(0)
        amp = amp / amp.max()
        t = thresholds[rng.integers(len(thresholds))]
        keep = amp >= t if use_com[i] else amp < t
        out[i] = np.clip(np.fft.ifft2(np.fft.ifftshift(spec * keep, axes=(-2, -1)), axes=(-2, -1)).real, 0, 1)
    return out


def best_time(fn, repeats, sync=lambda: None):
    fn(); sync()                                         # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); sync(); times.append(time.perf_counter() - t0)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--batch', type=int, default=64)
    ap.add_argument('--size', type=int, default=224)
    ap.add_argument('--repeats', type=int, default=5)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--no-save', action='store_true', help='do not append to bench/results/masks.jsonl')
    args = ap.parse_args()

    base = sample_images(size=args.size)
    x = base.repeat((args.batch + len(base) - 1) // len(base), 1, 1, 1)[: args.batch].contiguous()
    thresholds = (0.005, 0.01, 0.05)
    rng = np.random.default_rng(0)
    use_com = rng.random(args.batch) < 0.5
    xn = x.numpy()

    t_ref = best_time(lambda: reference_folk_filter(xn, thresholds, use_com, rng), max(1, args.repeats // 2))
    t_loop = best_time(lambda: [folk_filter(x[i:i + 1]) for i in range(args.batch)], args.repeats)
    t_batch = best_time(lambda: folk_filter(x), args.repeats)
    t_mfm = best_time(lambda: mfm_filter(x), args.repeats)
    rows = [('per-image numpy reference (complex128)', t_ref), ('folk_nb, one image at a time', t_loop),
            ('folk_nb batched folk_filter', t_batch), ('folk_nb batched mfm_filter', t_mfm)]
    print(f"device: cpu ({torch.get_num_threads()} threads), batch {args.batch} x 3 x {args.size} x {args.size}")
    for name, t in rows:
        print(f"  {name:<40s} {t * 1e3:9.1f} ms   {args.batch / t:9.0f} img/s")
    record = dict(bench='masks', date=datetime.now(timezone.utc).isoformat(timespec='seconds'),
                  command='python ' + ' '.join(sys.argv), cpu=platform.processor() or platform.machine(),
                  threads=torch.get_num_threads(), batch=args.batch, size=args.size,
                  ms={name: round(t * 1e3, 2) for name, t in rows}, speedup_vs_reference=round(t_ref / t_batch, 2))

    if args.device.startswith('cuda'):
        xg = x.repeat(2, 1, 1, 1)[:128].to(args.device)
        sync = torch.cuda.synchronize
        t_gpu = best_time(lambda: folk_filter(xg), 20, sync)
        t_gpu_mfm = best_time(lambda: mfm_filter(xg), 20, sync)
        record.update(gpu=torch.cuda.get_device_name(), gpu_ms_per_128=dict(folk=round(t_gpu * 1e3, 3), mfm=round(t_gpu_mfm * 1e3, 3)))
        print(f"device: {torch.cuda.get_device_name()}: folk_filter {t_gpu * 1e3:.3f} ms, mfm_filter {t_gpu_mfm * 1e3:.3f} ms per batch of 128 at {args.size}")

    if not args.no_save:
        try: record['git_commit'] = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True).stdout.strip()
        except OSError: pass
        out = Path(__file__).resolve().parent / 'results' / 'masks.jsonl'
        out.parent.mkdir(exist_ok=True)
        with open(out, 'a') as f: f.write(json.dumps(record) + '\n')
    print(f"batched vs per-image reference: {t_ref / t_batch:.1f}x")


if __name__ == '__main__':
    main()
