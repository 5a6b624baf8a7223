"""Training-step benchmark per method x model: img/s, peak memory, FLOPs per image, MFU, and the speed-up of the
trainer's step over a plain eager fp32 step, all measured in one run.

    python bench/train_step.py [--device cpu|cuda] [--methods mae,mfm,...] [--models vit_t4_32,resnet18_32,...]
                               [--steps N] [--warmup N] [--batch N] [--amp auto|bf16|off] [--compile [MODE]] [--at F] [--no-save]

For every method x model:
- **the trainer's step**: `folk_nb.trainer.Trainer.train_step` on one fixed batch of augmented views (the method's
  own recipe, made once on the device, so data loading is not timed): schedule, forward under bf16 autocast on CUDA
  (`--amp`), backward, gradient clipping, fused AdamW on CUDA, EMA hooks, the finite-loss check. `--warmup` steps,
  then `--steps` timed steps between two `cuda.synchronize()`; img/s = batch / mean step time;
- **peak memory**: `torch.cuda.max_memory_allocated` over the timed steps (CUDA only; not measured on CPU);
- **FLOPs per image**: `torch.utils.flop_counter.FlopCounterMode` over one fp32 forward + backward, divided by the
  batch: matmuls, convolutions and attention (FFTs, element-wise ops and the optimiser are not counted, so MFU is a
  slight under-estimate for the frequency methods);
- **MFU** = FLOPs/img x img/s / peak, where the peak is measured in the same run by timing a large matmul: bf16
  8192^3 on CUDA, fp32 2048^3 on CPU;
- **plain**: the same step in eager fp32 (no autocast, no compile, `torch.optim.AdamW` with its defaults), and the
  speed-up of the trainer's step over it. On CPU the trainer's step is fp32 and unfused too (its optimisations are for
  CUDA), so the speed-up there is ~1 up to noise;
- `--at F` sets the methods' schedules to the fraction F of a run before timing (default 0, the first step). FAMT
  masks randomly (75%) until its first attention refresh at 10% of the schedule, so `--at 0.5` measures its
  steady state: masking 45% and throwing 40% of the patches. The fixed batch's attention is refreshed once before
  timing, and the bank maps of the other images are marked current (`famt_bank`, row note), as at the end of a
  refresh window's epoch. Rows before 2026-11-23 lacked that last part, so their timed steps were still inside
  the refresh window and made its two host syncs each;
- **SaliencyMoCo's saliency map**: the FLOPs of the query view's saliency map (`saliency_map_flops_per_img`) and
  their share of a plain MoCo step on the same model and batch (`saliency_map_flop_share`): a device-independent
  floor for the masking's time share. With `saliency='warped_key'` the query's map is the key pass's map carried
  over by one `grid_sample`, which has no matmul / conv FLOPs: 0. And the time: the SaliencyMoCo step and a plain
  MoCo step on the same model and batch are timed in the same run, in `--paired-rounds` (5) alternating pairs of
  blocks of `--steps` steps (`paired_step_ms`, `moco_step_ms`: median blocks); `over_moco_step` is the median of the
  pairs' ratios (`over_moco_step_range`: their smallest and largest); with
  `--method-kwargs '{"hard_negative": false}'` that ratio minus 1 is the masking's share of a MoCo step;
- the machine's 1-minute load average before and after (`load_avg_1min`): a shared, busy machine makes every timing
  above unreliable, and the script says so.

Models (`--models`): vit_s16_224, vit_b16_224, resnet50_224 (224 px), vit_t4_32 (ViT-Ti, patch 4), resnet18_32
(CIFAR stem) at 32 px, and vit_micro_p4_32 (2 blocks, width 64: smoke tests only). Default: all but the micro one on
CUDA; on CPU only the two 32 px ones with batch 8, so a CPU run ends in minutes. Methods that cannot use a model
(MAE and FAMT need a ViT) are skipped with a note, as are methods whose module does not import yet. Methods run with
their paper defaults, except at 32 px where FOLK has 4096 prototypes and MoCo a queue of 4096 (CIFAR-scale
settings; `--method-kwargs` overrides). The table goes to
stdout; one JSON line per configuration (with device, date, command) is appended to bench/results/train_step.jsonl.
"""
import argparse, json, os, platform, statistics, sys, tempfile, time, traceback
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from folk_nb.trainer import COMPILE_MODES
from folk_nb.methods import METHODS, create_method

if str(Path(__file__).resolve().parent) not in sys.path: sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, load_average, warn_if_busy, load_pair, command_line, append_rows  # noqa: E402

RESULTS = RESULTS_DIR / 'train_step.jsonl'
PAIRED_ROUNDS = 5            # SaliencyMoCo rows: alternating blocks of its step and plain MoCo's (--paired-rounds)

MODELS = {
    'vit_s16_224': dict(model='vit_small_patch16_224', img_size=224),
    'vit_b16_224': dict(model='vit_base_patch16_224', img_size=224),
    'resnet50_224': dict(model='resnet50', img_size=224),
    'vit_t4_32': dict(model='vit_tiny_patch16_224', img_size=32, patch_size=4),
    'resnet18_32': dict(model='resnet18', img_size=32, cifar_stem=True),
    'vit_micro_p4_32': dict(model='vit_tiny_patch16_224', img_size=32, patch_size=4,
                            model_kwargs=dict(depth=2, embed_dim=64, num_heads=2)),
}
# CIFAR-scale settings for the 32 px configurations (SPEC.md: K = 65,536 prototypes / negatives at ImageNet scale, a
# few thousand on small data); --method-kwargs overrides them
SMALL_DATA_KWARGS = {'folk': dict(out_dim=4096), 'moco': dict(queue_size=4096), 'saliency_moco': dict(queue_size=4096)}
GPU_MODELS = ('vit_s16_224', 'vit_b16_224', 'resnet50_224', 'vit_t4_32', 'resnet18_32')
CPU_MODELS = ('vit_t4_32', 'resnet18_32')


def default_batch(model_key: str, device: torch.device) -> int:
    if device.type != 'cuda': return 8
    return 128 if MODELS[model_key]['img_size'] >= 224 else 512


def sync(device: torch.device) -> None:
    if device.type == 'cuda': torch.cuda.synchronize(device)


def count_flops(fn) -> int:
    "FLOPs counted by torch's FlopCounterMode while `fn()` runs."
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def matmul_peak(device: torch.device) -> dict:
    "Best achieved matmul FLOP/s in this process: bf16 8192^3 on CUDA, fp32 2048^3 on CPU."
    cuda = device.type == 'cuda'
    n, dtype, reps = (8192, torch.bfloat16, 20) if cuda else (2048, torch.float32, 2)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2): a @ b
    sync(device)
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps): a @ b
        sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return dict(peak_flops=best, peak_dtype=str(dtype).replace('torch.', ''), peak_n=n)


@lru_cache(maxsize=4)
def _sample_uint8(size: int):
    from folk_nb.data import dataset_tensors
    return dataset_tensors('samples', size=size)


def make_batch(recipe: str, size: int, batch: int, device: torch.device, seed: int = 0) -> dict:
    "One loader batch (views of the method's recipe) made on the device from the embedded sample pictures."
    from folk_nb.data import GPUDataLoader
    t = _sample_uint8(size)
    loader = GPUDataLoader(t['images'], t['targets'], views=recipe, batch_size=batch, epoch_size=batch, device=device,
                           size=size, seed=seed)
    return next(iter(loader))


class _OneBatch:
    "What the Trainer needs of a loader (len, batch_size, set_epoch); the benchmark calls train_step directly."
    def __init__(self, batch, batch_size): self.batch, self.batch_size = batch, batch_size
    def __len__(self): return 1
    def set_epoch(self, epoch): pass
    def __iter__(self): yield self.batch


def timed(fn, warmup: int, steps: int, device: torch.device) -> tuple:
    "Mean seconds per call over `steps` calls after `warmup`, and the peak CUDA memory of the timed calls (bytes)."
    for _ in range(warmup): fn()
    sync(device)
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    for _ in range(steps): fn()
    sync(device)
    dt = (time.perf_counter() - t) / steps
    return dt, (torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None)


def build_method(method_name: str, model_key: str, batch: int, device: torch.device, method_kwargs: dict = None,
                 at: float = 0.0) -> tuple:
    "(the method on `device` in train mode, its row), or (None, the row with a 'skipped: ...' status)."
    cfg = MODELS[model_key]
    row = dict(method=method_name, model=model_key, timm_model=cfg['model'], img_size=cfg['img_size'], batch=batch, at=at)
    small = SMALL_DATA_KWARGS.get(method_name, {}) if cfg['img_size'] <= 64 else {}
    kwargs = {**cfg, **small, **(method_kwargs or {})}
    row['method_kwargs'] = {k: v for k, v in kwargs.items() if k not in cfg}
    if method_name == 'famt': kwargs.setdefault('num_images', len(_sample_uint8(cfg['img_size'])['images']))
    try:
        method = create_method(method_name, **kwargs)
    except (ImportError, AttributeError) as e:
        return None, dict(row, status=f'skipped: module not available ({type(e).__name__}: {e})')
    except (ValueError, TypeError) as e:
        return None, dict(row, status=f'skipped: {str(e)[:160]}')
    method.to(device).train()
    if at: method.schedule(int(at * 10 ** 6), 10 ** 6)       # the schedule's state at that point of a run
    return method, row


def first_batch(method, model_key: str, batch: int, device: torch.device, at: float = 0.0) -> dict:
    "The fixed batch every step reuses; at `at` > 0 the method sees it once first (FAMT's attention refresh: not timed)."
    b = make_batch(method.recipe, MODELS[model_key]['img_size'], batch, device)
    if at:
        with torch.no_grad(): method(b)
    return b


def famt_bank(method, refresh_window: bool, notes: list):
    "FAMT after a refresh point: close its refresh window (steady state), or a function that reopens it before a step."
    if getattr(method, 'attention_source', None) != 'bank' or not getattr(method, 'version', 0): return None
    if refresh_window:
        notes.append("FAMT in a refresh window: every step recomputes the batch's attention (refresh_bank), as in the "
                     "epoch after each refresh point")
        def reopen():                                      # as FAMT.schedule does at a refresh point: no sync
            method.bank_version.fill_(method.version - 1); method._pending = True
        return reopen
    if method.pending:                                     # the fixed batch holds only some of the dataset's images
        method.bank_version.fill_(method.version); method._pending = False
        notes.append("FAMT steady state: the bank maps of images outside the fixed batch were marked current, as at "
                     "the end of a refresh window's epoch")
    return None


def make_trainer(method, b: dict, batch: int, device: torch.device, amp: str, compile: bool, out_dir: str):
    "The trainer whose `train_step` is measured (schedule of 10^6 steps, nothing logged)."
    from folk_nb.trainer import Trainer, TrainConfig, DistInfo
    tc = TrainConfig(amp=amp, compile=compile, out_dir=out_dir, progress=False, max_steps=10 ** 6)
    return Trainer(method, _OneBatch(b, batch), tc, dist_info=DistInfo(device=device))


def failed_row(row: dict, e: Exception) -> dict:
    "The row of a configuration that raised: status 'oom' for CUDA out-of-memory, else 'error: ...' (traceback printed)."
    if isinstance(e, torch.cuda.OutOfMemoryError): return dict(row, status='oom')
    traceback.print_exc()
    return dict(row, status=f'error: {type(e).__name__}: {str(e)[:200]}')


def saliency_flops(method, model_key: str, batch: int, device: torch.device, method_kwargs: dict, b: dict) -> dict:
    """SaliencyMoCo's saliency map of the query view in FLOPs per image, and as a share of a plain MoCo step's FLOPs
    (forward + backward + key pass) on the same model and batch: the floor of its time share on any device.
    With saliency='warped_key' the key pass's map is made first (not counted: MoCo's key pass makes it anyway) and
    only carrying it over to the query view is counted."""
    xq, xk = method._views(b)
    geometry = method._geometry(b, xq.shape[0])
    key_map = method.encode_key(xk, with_saliency=True)[1] if geometry is not None else None
    sal = count_flops(lambda: method.query_saliency(xq, key_map, geometry))
    moco = plain_moco(model_key, batch, device, method_kwargs)
    step = count_flops(lambda: moco(b)['loss'].backward())
    del moco
    return dict(saliency_map_flops_per_img=sal / batch, moco_step_flops_per_img=step / batch,
                saliency_map_flop_share=sal / step)


def plain_moco(model_key: str, batch: int, device: torch.device, method_kwargs: dict):
    "The MoCo that a SaliencyMoCo row is compared with: same model and batch, the MoCo arguments of `method_kwargs`."
    import inspect
    from folk_nb.moco import MoCo
    accepted = inspect.signature(MoCo.__init__).parameters
    return build_method('moco', model_key, batch, device, {k: v for k, v in (method_kwargs or {}).items() if k in accepted})[0]


def paired_with_moco(step, model_key: str, batch: int, device: torch.device, method_kwargs: dict, b: dict, amp,
                     compile, warmup: int, steps: int, rounds: int = PAIRED_ROUNDS) -> dict:
    """SaliencyMoCo's trainer step (`step`) against the plain MoCo's on the same batch, timed in alternating blocks of
    `steps` steps, `rounds` times: the median block of each, and the median over rounds of the two blocks' ratio, so
    a machine's slow drift hits both alike (the ratios' range says how noisy it was). That ratio is what saliency
    masking costs (with `hard_negative=False`; with hard negatives, their extra key pass too)."""
    moco = plain_moco(model_key, batch, device, method_kwargs)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(moco, b, batch, device, amp, compile, tmp)
        for _ in range(warmup): trainer.train_step(b)
        blocks = {'saliency': [], 'moco': []}
        for _ in range(rounds):
            for name, fn in (('saliency', step), ('moco', lambda: trainer.train_step(b))):
                sync(device)
                t = time.perf_counter()
                for _ in range(steps): fn()
                sync(device)
                blocks[name].append((time.perf_counter() - t) / steps)
    med = {k: statistics.median(v) for k, v in blocks.items()}
    ratios = sorted(a / m for a, m in zip(blocks['saliency'], blocks['moco']))   # each round's blocks, side by side
    return dict(paired_step_ms=med['saliency'] * 1e3, moco_step_ms=med['moco'] * 1e3, paired_rounds=rounds,
                over_moco_step=statistics.median(ratios), over_moco_step_range=[ratios[0], ratios[-1]])


def cuda_graph_skips() -> int:
    "Graphs inductor has compiled without CUDA graphs so far in this process (its own counter)."
    from torch._dynamo.utils import counters
    return counters['inductor']['cudagraph_skips']


def note_cuda_graph_skips(row: dict, skipped: int) -> None:
    "Record in a row with a CUDA-graph compile mode how many of its graphs ran without CUDA graphs."
    row['cuda_graph_skips'] = skipped
    if skipped: row.setdefault('notes', []).append(
        f"{skipped} compiled graph(s) ran without CUDA graphs: the log's 'skipping cudagraphs due to ...' says why")


def bench_one(method_name: str, model_key: str, batch: int, steps: int, warmup: int, device: torch.device,
              amp: str = 'auto', compile: bool = False, peak_flops: float = None, method_kwargs: dict = None,
              at: float = 0.0, paired_rounds: int = PAIRED_ROUNDS) -> dict:
    "Measure one method x model; returns a row with status 'ok', 'skipped: ...', 'oom' or 'error: ...'."
    method, row = build_method(method_name, model_key, batch, device, method_kwargs, at)
    if method is None: return row
    try:
        b = first_batch(method, model_key, batch, device, at)
        notes = []
        famt_bank(method, False, notes)       # FAMT past a refresh point: its steady state, not a refresh window
        if notes: row['notes'] = notes
        # FLOPs: one fp32 forward + backward
        flops = count_flops(lambda: method(b)['loss'].backward())
        method.zero_grad(set_to_none=True)
        row['flops_per_img'] = flops / batch
        row['params_m'] = sum(p.numel() for p in method.parameters() if p.requires_grad) / 1e6
        if method_name == 'saliency_moco': row.update(saliency_flops(method, model_key, batch, device, method_kwargs, b))
        # the trainer's step
        skips = cuda_graph_skips()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(method, b, batch, device, amp, compile, tmp)
            dt, mem = timed(lambda: trainer.train_step(b), warmup, steps, device)
            if method_name == 'saliency_moco':
                row.update(paired_with_moco(lambda: trainer.train_step(b), model_key, batch, device, method_kwargs, b,
                                            amp, compile, warmup, steps, paired_rounds))
            if trainer.cuda_graphs: note_cuda_graph_skips(row, cuda_graph_skips() - skips)
            del trainer
        # the plain eager fp32 step
        opt = torch.optim.AdamW(method.param_groups(0.05), lr=1e-4, betas=(0.9, 0.95))

        def plain():
            method.schedule(0, 10 ** 6)
            method(b)['loss'].backward()
            nn.utils.clip_grad_norm_(method.parameters(), 3.0)
            opt.step(); opt.zero_grad(set_to_none=True)
            method.after_optimizer_step()
        dt_plain, mem_plain = timed(plain, warmup, steps, device)
    except Exception as e:  # one broken method must not end the whole matrix
        return failed_row(row, e)
    finally:
        if device.type == 'cuda': torch.cuda.empty_cache()
    row.update(status='ok', step_ms=dt * 1e3, img_per_s=batch / dt, peak_mem_gb=None if mem is None else mem / 2 ** 30,
               achieved_tflops=row['flops_per_img'] * batch / dt / 1e12, plain_step_ms=dt_plain * 1e3,
               plain_img_per_s=batch / dt_plain, plain_peak_mem_gb=None if mem_plain is None else mem_plain / 2 ** 30,
               speedup=dt_plain / dt)
    if peak_flops:
        row['mfu'] = row['flops_per_img'] * row['img_per_s'] / peak_flops
        row['plain_mfu'] = row['flops_per_img'] * row['plain_img_per_s'] / peak_flops
    return row


def describe(device: torch.device) -> str:
    if device.type == 'cuda': return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def fmt(v, spec):
    return '-' if v is None else format(v, spec)


def print_table(rows: list, peak: dict) -> None:
    print(f"\npeak {peak['peak_dtype']} matmul ({peak['peak_n']}^3): {peak['peak_flops'] / 1e12:.2f} TFLOP/s")
    head = (f"{'method':<14}{'model':<14}{'batch':>6}{'img/s':>10}{'ms/step':>10}{'mem GB':>8}{'GFLOP/img':>11}"
            f"{'TFLOP/s':>9}{'MFU':>7}{'plain img/s':>13}{'speedup':>9}")
    print(head); print('-' * len(head))
    for r in rows:
        if r['status'] != 'ok':
            print(f"{r['method']:<14}{r['model']:<14}{r['batch']:>6}  {r['status'][:80]}"); continue
        print(f"{r['method']:<14}{r['model']:<14}{r['batch']:>6}{r['img_per_s']:>10.1f}{r['step_ms']:>10.1f}"
              f"{fmt(r['peak_mem_gb'], '8.2f'):>8}{r['flops_per_img'] / 1e9:>11.2f}{r['achieved_tflops']:>9.3f}"
              f"{fmt(r.get('mfu') and 100 * r['mfu'], '6.1f'):>6}%{r['plain_img_per_s']:>13.1f}{r['speedup']:>8.2f}x")
    for r in rows:
        for n in r.get('notes') or (): print(f"{r['method']} x {r['model']}: {n}")
        if r.get('saliency_map_flop_share') is not None:
            print(f"{r['method']} x {r['model']}: the query's saliency map is {100 * r['saliency_map_flop_share']:.1f}% "
                  f"of a MoCo step's FLOPs ({r['saliency_map_flops_per_img'] / 1e9:.3f} of "
                  f"{r['moco_step_flops_per_img'] / 1e9:.2f} GFLOP/img; saliency={r['method_kwargs'].get('saliency', 'momentum')}"
                  + ("; its FFTs are not counted" if r['method_kwargs'].get('saliency') == 'spectral' else '')
                  + ("; one grid_sample, no matmul or conv" if r['method_kwargs'].get('saliency') == 'warped_key' else '')
                  + ")")
        if r.get('over_moco_step') is not None:
            hard = r['method_kwargs'].get('hard_negative', True)
            lo, hi = r['over_moco_step_range']
            print(f"{r['method']} x {r['model']}: its step takes {r['over_moco_step']:.3f}x a plain MoCo step (median of "
                  f"{r['paired_rounds']} alternating pairs of blocks, {lo:.3f}-{hi:.3f}; {r['paired_step_ms']:.1f} vs "
                  f"{r['moco_step_ms']:.1f} ms): "
                  + (f"saliency masking costs {100 * (r['over_moco_step'] - 1):+.1f}% of a MoCo step" if not hard else
                     "masking and the hard negatives' extra key pass together (hard_negative=False isolates the masking)")
                  + ("; the pairs' ratios straddle 1: not told apart from plain MoCo in this run" if lo < 1 < hi else ''))



def add_step_arguments(ap: argparse.ArgumentParser, steps: tuple, compile_help: str) -> None:
    "The options every training-step bench takes (device, methods, models, steps, batch, amp, compile, ...)."
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    ap.add_argument('--methods', default=','.join(METHODS), help=f"comma-separated, from {', '.join(METHODS)}")
    ap.add_argument('--models', default=None, help=f"comma-separated, from {', '.join(MODELS)}")
    ap.add_argument('--steps', type=int, default=None, help=f'timed steps (default {steps[0]} on CUDA, {steps[1]} on CPU)')
    ap.add_argument('--warmup', type=int, default=None, help='untimed steps first (default 5 on CUDA, 1 on CPU)')
    ap.add_argument('--batch', type=int, default=None, help='images per step (default 128 at 224 px, 512 at 32 px; CPU 8)')
    ap.add_argument('--amp', choices=('auto', 'bf16', 'off'), default='auto', help="trainer's autocast (auto: bf16 on CUDA)")
    ap.add_argument('--compile', nargs='?', const=True, default=False, metavar='MODE', choices=COMPILE_MODES, help=compile_help)
    ap.add_argument('--method-kwargs', default='{}', help='JSON dict of extra method arguments, e.g. \'{"queue_size": 4096}\'')
    ap.add_argument('--at', type=float, default=0.0, help='schedule position (fraction of a run) to measure at, e.g. 0.5')


def resolve_step_arguments(ap: argparse.ArgumentParser, args, steps: tuple, cpu_models: tuple = CPU_MODELS) -> tuple:
    "(device, methods, models, steps, warmup, method_kwargs) from the options, with argparse errors for bad ones."
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available(): ap.error('--device cuda but CUDA is not available')
    cuda = device.type == 'cuda'
    methods = [m for m in args.methods.split(',') if m]
    models = args.models.split(',') if args.models else list(GPU_MODELS if cuda else cpu_models)
    for m in methods:
        if m not in METHODS: ap.error(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    for m in models:
        if m not in MODELS: ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    n_steps = args.steps or (steps[0] if cuda else steps[1])
    warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    return device, methods, models, n_steps, warmup, json.loads(args.method_kwargs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(ap, steps=(20, 2), compile_help='torch.compile the trainer step (not the plain one), optional MODE, '
                                                       'e.g. max-autotune')
    ap.add_argument('--paired-rounds', type=int, default=PAIRED_ROUNDS,
                    help='saliency_moco: alternating pairs of blocks (its step, plain MoCo\'s) timed for their ratio')
    ap.add_argument('--no-save', action='store_true', help=f'do not append to {RESULTS.relative_to(RESULTS.parents[2])}')
    args = ap.parse_args(argv)
    if args.paired_rounds < 1: ap.error(f"--paired-rounds must be >= 1, got {args.paired_rounds}")

    device, methods, models, steps, warmup, method_kwargs = resolve_step_arguments(ap, args, steps=(20, 2))
    cuda = device.type == 'cuda'

    load_before = load_average()
    peak = matmul_peak(device)
    print(f"device {describe(device)}; torch {torch.__version__}; amp {args.amp}; compile {args.compile}; "
          f"{warmup} warm-up + {steps} timed steps")
    rows = []
    for name in methods:
        for model_key in models:
            batch = args.batch or default_batch(model_key, device)
            t = time.perf_counter()
            row = bench_one(name, model_key, batch, steps, warmup, device, args.amp, args.compile, peak['peak_flops'],
                            method_kwargs, args.at, args.paired_rounds)
            what = f"{row['img_per_s']:.1f} img/s" if row['status'] == 'ok' else row['status']
            print(f"  {name} x {model_key}: {what} ({time.perf_counter() - t:.0f} s)", flush=True)
            rows.append(row)
            if row['status'].startswith('skipped: module'):   # the same for every model: note it once
                rows += [dict(row, model=m) for m in models[models.index(model_key) + 1:]]
                break
    load_after = load_average()
    print_table(rows, peak)
    warn_if_busy(load_before, load_after, 1.5, "these timings, the peak and the MFU are unreliable")
    if not args.no_save:
        append_rows(RESULTS, rows, 'train_step', command_line('bench/train_step.py', argv), describe(device),
                    torch=torch.__version__, threads=torch.get_num_threads(), amp=args.amp, compile=args.compile,
                    steps=steps, warmup=warmup, method_kwargs=method_kwargs, cpu_count=os.cpu_count(),
                    load_avg_1min=load_pair(load_before, load_after), **peak)
    return 0


if __name__ == '__main__':
    sys.exit(main())
