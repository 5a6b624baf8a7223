"""How long `GPUDataLoader` takes to make one batch of augmented views, eager colour ops vs fused (torch.compile).

    python bench/loader.py [--device cuda] [--recipes moco,mae,mfm,folk] [--size 32] [--batch 512] [--batches 50]

For each recipe: ms per batch (all of its views: gather, crop, flip, jitter, grayscale, blur, solarize) with the
eager colour ops and with `fused_augment=True`, and the speed-up, measured in the same run on the same images (the
embedded sample pictures, repeated to fill the batches). On a GPU the loader runs in the training loop's own
stream, so its time adds to each step's: compare it with the step times of `bench/train_step.py`.
On CUDA it also counts the host syncs per batch (`syncs_per_batch`, from torch.profiler: the blocking runtime calls
inside a range around each of 6 batches, so the profiler's and the bench's own are not counted) and names the aten
op each one happens in (`sync_sources`): any one of them makes Python wait for the device, and a training loop
whose loader waits cannot queue the next step while the GPU runs this one. Appends one JSON line per recipe to bench/results/loader.jsonl (`--no-save`: don't).
"""
import argparse, sys, time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SYNC_RUNTIME, append_rows, command_line, device_words, load_average, load_pair  # noqa: E402

RESULTS = Path(__file__).resolve().parent / 'results' / 'loader.jsonl'


def ms_per_batch(loader, batches: int, warmup: int, device: torch.device) -> float:
    "Mean milliseconds per batch over `batches` batches after `warmup` (compilation happens there)."
    it = iter(loader)
    for _ in range(warmup): next(it)
    if device.type == 'cuda': torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(batches): next(it)
    if device.type == 'cuda': torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / batches * 1000


def syncs_in_batches(loader, device: torch.device, batches: int = 6, names=SYNC_RUNTIME) -> tuple:
    """(syncs per batch, Counter of where they happen): the runtime calls named `names` that torch.profiler sees
    inside a `record_function` range around each of `batches` batches (after one untimed batch), so the profiler's
    and the bench's own calls outside the batches are not counted. 'Where' is the innermost aten op (or range)
    around each call."""
    from collections import Counter
    from torch.profiler import ProfilerActivity, profile, record_function
    it = iter(loader)
    next(it)                                           # first batch: one-time caches, compilation
    if device.type == 'cuda': torch.cuda.synchronize(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=acts) as prof:
        for _ in range(batches):
            with record_function('loader_batch'): next(it)
        if device.type == 'cuda': torch.cuda.synchronize(device)
    events = prof.events()
    windows = [(e.time_range.start, e.time_range.end) for e in events if e.name == 'loader_batch']
    where = Counter()
    for e in events:
        if e.name not in names or not any(s <= e.time_range.start <= t for s, t in windows): continue
        a = e.cpu_parent
        while a is not None and not (a.name.startswith('aten::') or a.name == 'loader_batch'): a = a.cpu_parent
        where[f"{e.name} in {a.name if a is not None else '?'}"] += 1
    return sum(where.values()) / batches, where


def syncs_per_batch(loader, device: torch.device, batches: int = 6) -> tuple:
    """Host syncs per batch on CUDA, and where they happen: blocking runtime calls (cudaStreamSynchronize,
    cudaMemcpy, ...) inside the batches. Each one makes Python wait for the device, so a loader with syncs cannot
    run ahead of the training step. (None, {}) off CUDA (the CPU path counts its images on purpose)."""
    if device.type != 'cuda': return None, {}
    return syncs_in_batches(loader, device, batches)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--recipes', default='moco,mae,mfm,folk')
    ap.add_argument('--size', type=int, default=32)
    ap.add_argument('--batch', type=int, default=None, help='images per batch (default 512 on CUDA, 64 on CPU)')
    ap.add_argument('--batches', type=int, default=None, help='timed batches (default 50 on CUDA, 3 on CPU)')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--no-save', action='store_true')
    a = ap.parse_args(argv)
    from folk_nb.data import GPUDataLoader, dataset_tensors, _FUSED
    device = torch.device(a.device)
    cuda = device.type == 'cuda'
    batch, batches = a.batch or (512 if cuda else 64), a.batches or (50 if cuda else 3)
    images = dataset_tensors('samples', size=a.size)['images']
    load0, rows = load_average(), []
    for recipe in [r for r in a.recipes.split(',') if r]:
        ms = {}
        for fused in (False, True):
            loader = GPUDataLoader(images, views=recipe, batch_size=batch, epoch_size=batch * (a.warmup + batches),
                                   device=device, size=a.size, seed=0, fused_augment=fused)
            ms[fused] = ms_per_batch(loader, batches, a.warmup, device)
        syncs, sync_where = syncs_per_batch(GPUDataLoader(images, views=recipe, batch_size=batch, epoch_size=batch * 8,
                                                          device=device, size=a.size, seed=0), device)
        row = dict(recipe=recipe, views=len(loader.specs), eager_ms=round(ms[False], 3), fused_ms=round(ms[True], 3),
                   speedup=round(ms[False] / ms[True], 2), fused_failed=bool(_FUSED.get('failed')), syncs_per_batch=syncs,
                   sync_sources=dict(sync_where))
        print(f"{recipe:<6} {row['views']} views: eager {row['eager_ms']:8.2f} ms/batch, fused {row['fused_ms']:8.2f} ms/batch, "
              f"{row['speedup']:.2f}x" + ('' if syncs is None else f", {syncs:g} host syncs/batch")
              + ('  (compilation failed: both eager)' if row['fused_failed'] else ''), flush=True)
        if sync_where: print(f"       syncs in 6 batches: {dict(sync_where)}", flush=True)
        rows.append(row)
    where = device_words(device)
    print(f"\n{where}, {batch} images of {a.size} px per batch, {batches} timed batches, torch {torch.__version__}")
    if not a.no_save:
        append_rows(RESULTS, rows, 'loader', command_line('bench/loader.py', argv), where, size=a.size, batch=batch,
                    batches=batches, torch=torch.__version__, load=load_pair(load0, load_average()))
    return 0


if __name__ == '__main__':
    sys.exit(main())
