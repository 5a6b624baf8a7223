"""Where a training step spends its time: torch.profiler over the trainer's real step, per method x model.

    python bench/profile_step.py [--device cpu|cuda] [--methods mae,famt,...] [--models vit_b16_224,...] [--steps N]
                                 [--warmup N] [--batch N] [--amp auto|bf16|off] [--compile [MODE]] [--at F]
                                 [--method-kwargs JSON] [--famt-refresh] [--trace DIR] [--out FILE] [--no-save]

The step is `folk_nb.trainer.Trainer.train_step` on one fixed batch, built exactly as bench/train_step.py builds it
(its MODELS, batch sizes, CIFAR-scale settings at 32 px, `--at`, `--amp`, `--compile`, imported from it). `--warmup`
steps, then `--steps` plain timed steps (`step_ms`: their median, no profiler), then the same number of steps under
`torch.profiler` (CPU, plus CUDA on a GPU). For each configuration it prints, per step:

- **time by op category**: self device time of the kernels each op launched (CUDA), or self CPU time of each op (CPU),
  summed into matmul/conv, attention (scaled_dot_product / flash / efficient kernels and softmax), FFT, norm
  (layer / batch / group norm), elementwise + activations, reductions (incl. the losses' log-softmax / NLL),
  copy / cast / index / view / gather-scatter, optimizer (fused AdamW / SGD, every `_foreach_` op, and everything under
  `Optimizer.step`, gradient clipping and the EMA update), host (CPU only: Python, the autograd engine and
  record_function ranges outside aten ops), other. An op nested in an attention, norm, FFT, linear / conv op or an
  optimizer range counts for that one (SDPA's inner matmuls are attention, linear's transposes are matmul). Kernels
  launched outside any recognised op (torch.compile's Triton kernels) are sorted by kernel name;
- **phases and the method's own work**, as shares of the step: the bench wraps functions and methods in
  `torch.profiler.record_function` ranges at run time (the library is not edited): the trainer's forward, backward,
  gradient clipping, optimizer step, zero_grad and EMA update, and each method's masking ('mask': MAE's random split,
  FAMT's split and weights with its attention and bank, MFM's / FOLK's frequency filter, SaliencyMoCo's query and
  hard-negative masking incl. the saliency map), the FOLK teacher, the frequency loss, the widget outputs every
  forward builds ('display'), MoCo's key encoder, enqueue and, for SaliencyMoCo, the hard negative's extra
  key-encoder pass. A range's host share is its wall time over the step's (profiled) wall time; its device share is
  the kernel time of the ops launched inside it (any thread, so backward counts) over the step's kernel time. `share`
  is the device share on CUDA, the host share on CPU. Ranges measure the forward-side work of what they wrap, and
  they vanish inside a `--compile`d forward (those shares read '-');
- **counts**: aten ops, CUDA kernels, host syncs (on CPU the host reads of `folk_nb.checks.SYNC_OPS`, such as
  aten::_local_scalar_dense, aten::nonzero and aten::bincount, plus tensors made from Python numbers with an
  explicit device, which are blocking copies on a GPU; on CUDA the blocking runtime calls cudaStreamSynchronize /
  cudaDeviceSynchronize / cudaEventSynchronize / cudaMemcpy), with aten::item and DtoH copies listed too, and where
  the syncs happen (the innermost range around each);
- **FAMT**: with `--at` past its first refresh point, FAMT masks by its attention bank. The fixed batch holds only
  some of the dataset's images, so the bench marks the other images' maps current: the steady state between refresh
  windows. `--famt-refresh` profiles a step inside a refresh window instead (the epoch after each refresh point, when
  every batch's attention is recomputed with an extra un-masked encoder pass: 'mask.refresh_bank');
- **GPU idle share** (CUDA): 1 - GPU busy time (union of kernel and copy intervals) / plain step time. High means the
  step is launch or CPU bound: fewer, larger kernels (compile, fusion, fewer syncs) help more than faster kernels.

Defaults: on CUDA every method x bench/train_step.py's GPU models, 5 warm-up + 10 steps; on CPU every method x the
small 32 px models vit_micro_p4_32 and resnet18_32 with batch 8, 1 warm-up + 3 steps (a few minutes; not a target
measurement: CPU shares differ from GPU ones). `--trace DIR` also writes one chrome trace per configuration. One JSON
line per configuration (with device, date, command, git commit) is appended to bench/results/profile_step.jsonl.
"""
import argparse, bisect, functools, json, os, re, statistics, subprocess, sys, tempfile, time
from collections import Counter, defaultdict
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault('KINETO_LOG_LEVEL', '5')           # kineto's start / stop chatter on stderr: errors only
import torch  # noqa: E402
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile, record_function

from folk_nb.trainer import COMPILE_MODES
from folk_nb.methods import METHODS

if str(Path(__file__).resolve().parent) not in sys.path: sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, load_average, warn_if_busy, load_pair, command_line, append_rows, SYNC_RUNTIME  # noqa: E402
from train_step import (MODELS, GPU_MODELS, default_batch, build_method, first_batch, famt_bank, make_trainer, sync,  # noqa: E402
                        describe, add_step_arguments, resolve_step_arguments, failed_row, cuda_graph_skips,
                        note_cuda_graph_skips)

RESULTS = RESULTS_DIR / 'profile_step.jsonl'
CPU_MODELS = ('vit_micro_p4_32', 'resnet18_32')
CATEGORIES = ('matmul', 'attention', 'fft', 'norm', 'elementwise', 'reduction', 'copy', 'optimizer', 'host', 'other')
CATEGORY_LABELS = dict(matmul='matmul / linear / conv', attention='attention (SDPA, softmax)', fft='FFT',
                       norm='norm (layer / batch / group)', elementwise='elementwise + activations',
                       reduction='reductions (+ losses)', copy='copy / cast / index / view',
                       optimizer='optimizer (+ clip, EMA)', host='host (Python, autograd)', other='other')
PHASES = ('forward', 'backward', 'clip_grad', 'optimizer_step', 'zero_grad', 'ema')
PREFIX = 'bench::'

# ------------------------------------------------------------------------------------------------ op categories
# a category that an op passes to everything nested in it (and that the op itself has); lowercase names, no 'aten::'
STICKY = (
    ('attention', re.compile(r'scaled_?dot_?product|flash_?attention|efficient_?attention|cudnn_?attention')),
    ('norm', re.compile(r'(layer|batch|group|instance|rms)_?norm')),
    ('fft', re.compile(r'fft|stft')),
    ('optimizer', re.compile(r'^optimizer\.(step|zero_grad)#|^bench::(clip_grad|ema)$|^_?fused_(adam|adamw|sgd)|^_?foreach_')),
    ('matmul', re.compile(r'^(linear|matmul|einsum|bilinear)$|conv(olution|[123]d|_depthwise|_transpose|_tbc)|slow_conv')),
)
_ELEMENTWISE = set('''add sub rsub mul div true_divide floor_divide remainder fmod pow float_power sqrt rsqrt exp exp2
    expm1 log log1p log2 log10 abs neg sign sgn clamp clamp_min clamp_max clip where lerp addcmul addcdiv maximum minimum
    fmax fmin eq ne lt gt le ge bitwise_and bitwise_or bitwise_not bitwise_xor logical_and logical_or logical_not
    logical_xor floor ceil round trunc frac erf erfc erfinv reciprocal square sigmoid tanh relu gelu silu hardswish
    hardsigmoid leaky_relu elu softplus threshold dropout native_dropout bernoulli rand randn rand_like randn_like
    randint normal uniform exponential cos sin atan2 angle polar complex real imag isfinite isnan isinf nan_to_num
    hypot xlogy sinc mish glu isclose heaviside copysign logit fused_dropout randperm'''.split())
_REDUCTION = set('''sum mean amax amin aminmax max min argmax argmin std var var_mean std_mean norm linalg_vector_norm
    prod cumsum cumprod all any logsumexp nll_loss nll_loss_forward nll_loss2d cross_entropy_loss log_softmax
    topk sort argsort median kthvalue mode bincount count_nonzero cdist mse_loss l1_loss smooth_l1_loss
    huber_loss histc unique unique_dim unique2 searchsorted max_pool2d max_pool2d_with_indices
    avg_pool2d adaptive_avg_pool2d adaptive_max_pool2d mkldnn_max_pool2d'''.split())
_COPY = set('''copy to to_copy clone contiguous cat stack hstack vstack index index_select gather scatter scatter_add
    scatter_reduce index_put index_put_impl index_add index_copy index_fill masked_fill masked_select masked_scatter
    nonzero repeat repeat_interleave fill zero zeros zeros_like ones ones_like empty empty_like empty_strided full
    full_like new_zeros new_empty new_ones new_full new_empty_strided arange linspace view reshape reshape_alias
    unsafe_view permute transpose t expand expand_as slice select unsqueeze squeeze as_strided unbind split
    split_with_sizes chunk narrow flatten unflatten detach alias lift_fresh resize set local_scalar_dense item roll
    flip pad constant_pad_nd reflection_pad1d reflection_pad2d replication_pad2d pad_circular pixel_shuffle
    pixel_unshuffle im2col col2im unfold view_as_real view_as_complex conj resolve_conj resolve_neg
    embedding embedding_dense take take_along_dim tril triu diagonal movedim swapaxes broadcast_to
    upsample_bilinear2d upsample_nearest2d is_nonzero scalar_tensor lift_fresh_copy'''.split())
_MATMUL = set('mm addmm bmm baddbmm addbmm addmv mv dot vdot addmm_activation scaled_mm tensordot outer'.split())
RUNTIME = re.compile(r'^(cuda|cu)[A-Z]')                   # CUDA runtime / driver calls (host side)
KERNEL_RULES = (                                           # kernels launched outside a recognised op, by name
    ('attention', re.compile(r'flash|fmha|attention|softmax', re.I)),
    ('fft', re.compile(r'fft|radix', re.I)),
    ('norm', re.compile(r'layer_?norm|batch_?norm|group_?norm|rms_?norm|welford', re.I)),
    ('optimizer', re.compile(r'adam|sgd|foreach|multi_tensor', re.I)),
    ('matmul', re.compile(r'gemm|cutlass|xmma|nvjet|cublas|conv|triton_tem|wgrad|dgrad|sm\d\d_', re.I)),
    ('copy', re.compile(r'memcpy|memset|copy|cat|index|gather|scatter|fill', re.I)),
    ('reduction', re.compile(r'reduce|triton_red|triton_per|sort|argmax|norm', re.I)),
    ('elementwise', re.compile(r'elementwise|triton_poi|vectorized|unrolled', re.I)),
)
from folk_nb.checks import SYNC_OPS, HOST_TO_DEVICE, _HostToDevice   # noqa: E402  (the library's list of host reads)


def leaf_category(name: str) -> str:
    "Category of an aten op by its own name ('aten::native_layer_norm_backward' -> 'norm')."
    base = name[6:] if name.startswith('aten::') else name
    base = re.sub(r'_backward(_data|_input|_weight|_elemt|_reduce)?$', '', base.lower()).strip('_')
    for cat, pattern in STICKY:
        if pattern.search(base): return cat
    if base in _MATMUL: return 'matmul'
    if base in ('softmax', 'safe_softmax'): return 'attention'
    if base in _REDUCTION or base.startswith('nll_loss'): return 'reduction'
    if base in _COPY: return 'copy'
    if base in _ELEMENTWISE or base.startswith(('random', 'bitwise_', 'logical_')): return 'elementwise'
    return 'other'


def kernel_category(name: str) -> str:
    "Category of a kernel launched outside any recognised op (torch.compile's Triton kernels), by its name."
    for cat, pattern in KERNEL_RULES:
        if pattern.search(name): return cat
    return 'other'


def op_category(e, memo: dict) -> str:
    "Category of a profiler event: the innermost sticky category of it and its ancestors, else its own."
    if id(e) in memo: return memo[id(e)]
    cat, a = None, e
    while a is not None and cat is None:
        low = a.name.lower()
        for c, pattern in STICKY:
            if pattern.search(low[6:] if low.startswith('aten::') else low): cat = c; break
        a = a.cpu_parent
    if cat is None:
        if e.name.startswith('aten::'): cat = leaf_category(e.name)
        elif RUNTIME.match(e.name) and e.cpu_parent is not None: cat = op_category(e.cpu_parent, memo)
        else: cat = 'host'
    memo[id(e)] = cat
    return cat

# ------------------------------------------------------------------------------------------------ ranges
_MISSING = object()


@contextmanager
def patched(patches: list):
    "Set `owner.attr = value` for each (owner, attr, value) and restore every one on exit."
    saved = []
    try:
        for owner, attr, value in patches:
            saved.append((owner, attr, vars(owner).get(attr, _MISSING)))
            setattr(owner, attr, value)
        yield
    finally:
        for owner, attr, old in reversed(saved):
            if old is _MISSING: delattr(owner, attr)
            else: setattr(owner, attr, old)


def ranged(fn, name):
    "`fn` inside a record_function range named bench::`name` (`name` may be a function of the call's arguments)."
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(PREFIX + (name(*args, **kwargs) if callable(name) else name)):
            return fn(*args, **kwargs)
    return wrapper


def _wrap(owner, attr, name, notes):
    "(owner, attr, ranged function) for `patched`, or None with a note when the library has no such attribute."
    fn = getattr(owner, attr, None)
    if fn is None:
        notes.append(f"not timed: {getattr(owner, '__name__', type(owner).__name__)}.{attr} does not exist")
        return None
    if isinstance(owner, type):                              # the function itself, so it binds as a method again
        for klass in owner.__mro__:
            if attr in vars(klass): fn = vars(klass)[attr]; break
    return owner, attr, ranged(fn, name)


def method_ranges(method, notes: list) -> list:
    "The patches that put the method's masking / filtering / extra work in ranges (see the module docstring)."
    import folk_nb.attention as attention, folk_nb.mae as mae, folk_nb.mfm as mfm, folk_nb.folk as folk
    import folk_nb.moco as moco
    name, out = method.name, []
    def add(owner, attr, range_name):
        p = _wrap(owner, attr, range_name, notes)
        if p: out.append(p)
    if name == 'mae':
        add(mae.MAE, 'make_split', 'mask')
    if name == 'famt':
        add(mae.FAMT, '_split_and_weights', 'mask')
        add(mae.FAMT, 'refresh_bank', 'mask.refresh_bank')
        add(mae.FAMT, 'view_attention', 'mask.view_attention')
        add(attention.AttentionBank, 'aligned', 'mask.bank_aligned')
        add(mae, 'famt_weights', 'mask.weights')
        add(mae, 'mask_throw_keep', 'mask.split')
        add(mae, 'random_split', 'mask.split')
    if name in ('mae', 'famt'):
        add(mae.MAE, 'display', 'display')
    if name in ('mfm', 'folk'):
        add(type(method), 'mask', 'mask')
        add(mfm, 'frequency_loss', 'frequency_loss')
        add(mfm if name == 'mfm' else folk, 'mfm_outputs', 'display')
    if name == 'folk':
        add(method.teacher.backbone, 'pooled', 'teacher')
        add(method.teacher.projector, 'forward', 'teacher')
    if name in ('moco', 'saliency_moco'):
        add(moco.MoCo, '_enqueue', 'enqueue')
        last = {}                                            # this step's hard negative and its mask, by identity
        if name == 'saliency_moco':
            augment = vars(moco.SaliencyMoCo).get('augment')
            def remember(self, xq, xk, *a, **k):
                out_ = augment(self, xq, xk, *a, **k)
                last['hard'] = out_.get('hard_negative')
                return out_
            out.append((moco.SaliencyMoCo, 'augment', ranged(functools.wraps(augment)(remember), 'mask')))
            add(moco.SaliencyMoCo, 'query_saliency', 'mask.query_saliency')
            add(moco.SaliencyMoCo, 'saliency_map', 'mask.saliency_map')
            add(moco, 'patch_saliency', 'mask.patch_saliency')
            add(moco, 'foreground_patches', 'mask.foreground')
            add(moco, 'saliency_patch_mask', 'mask.query_mask')
            hard_mask = moco.hard_negative_patch_mask
            def remember_mask(*a, **k):
                last['hmask'] = hard_mask(*a, **k)
                return last['hmask']
            out.append((moco, 'hard_negative_patch_mask', ranged(remember_mask, 'mask.hard_negative_mask')))
            out.append((moco, 'fill_patches', ranged(moco.fill_patches, lambda x, patch_mask, *a, **k:
                'mask.fill_hard_negative' if patch_mask is last.get('hmask') else 'mask.fill_query')))
        encode_key = vars(moco.MoCo)['encode_key']
        out.append((moco.MoCo, 'encode_key', ranged(encode_key, lambda self, x, *a, **k:
            'hard_negative_key_pass' if x is last.get('hard') else 'key_encoder')))
    return out


def trainer_ranges(trainer, method) -> list:
    "The patches that put the trainer's phases in ranges (optimizer step and zero_grad have torch's own)."
    return [(trainer, 'forward', ranged(trainer.forward, 'forward')),
            (torch.Tensor, 'backward', ranged(vars(torch.Tensor)['backward'], 'backward')),
            (nn.utils, 'clip_grad_norm_', ranged(nn.utils.clip_grad_norm_, 'clip_grad')),
            (method, 'after_optimizer_step', ranged(method.after_optimizer_step, 'ema'))]


def range_name(name: str):
    "The region an event opens: bench::mask -> 'mask', torch's Optimizer.step#AdamW.step -> 'optimizer_step'."
    if name.startswith(PREFIX): return name[len(PREFIX):]
    if name.startswith('Optimizer.step#'): return 'optimizer_step'
    if name.startswith('Optimizer.zero_grad#'): return 'zero_grad'
    return None

# ------------------------------------------------------------------------------------------------ analysis
def _merge(intervals: list) -> list:
    "Union of (start, end) intervals, sorted."
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]: out[-1][1] = max(out[-1][1], e)
        else: out.append([s, e])
    return out


def _inside(t: float, merged: list, starts: list) -> bool:
    i = bisect.bisect_right(starts, t) - 1
    return i >= 0 and t <= merged[i][1]


def analyse(events, cuda: bool, n_steps: int, step_ms: float) -> dict:
    "Per-step categories, regions, counts and GPU busy time from the profiler's events of `n_steps` bench::step ranges."
    from torch.autograd import DeviceType
    host = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    device = [e for e in events if e.device_type != DeviceType.CPU and not getattr(e, 'is_user_annotation', False)
              and range_name(e.name) is None and 'annotation' not in str(getattr(e, 'activity_type', '')).lower()]
    steps = _merge([(e.time_range.start, e.time_range.end) for e in host if e.name == PREFIX + 'step'])
    if len(steps) != n_steps: raise RuntimeError(f"expected {n_steps} profiled steps, found {len(steps)} step ranges")
    starts = [s for s, _ in steps]
    ops = [e for e in host if _inside(e.time_range.start, steps, starts)]
    wall_us = sum(e - s for s, e in steps)
    memo, host_us, dev_us = {}, Counter(), Counter()
    top = defaultdict(lambda: [0.0, 0, ''])                # name -> [time us, calls, category]
    n_kernels, dtoh, op_kernel_us = 0, 0, []               # op_kernel_us: (op start, kernel us) for the regions
    for e in ops:
        cat = op_category(e, memo)
        host_us[cat] += e.self_cpu_time_total
        k_us = 0.0
        for k in e.kernels:
            kc = cat if cat not in ('host', 'other') else kernel_category(k.name)
            dev_us[kc] += k.duration; k_us += k.duration
            if not k.name.startswith(('Memcpy', 'Memset')): n_kernels += 1
            if 'DtoH' in k.name or 'Device -> Pageable' in k.name or 'Device -> Pinned' in k.name: dtoh += 1
        if k_us: op_kernel_us.append((e.time_range.start, k_us))
        t = top[e.name]
        t[0] += k_us if cuda else e.self_cpu_time_total; t[1] += 1; t[2] = cat if not (cuda and cat == 'host') else 'other'
    by_cat = dev_us if cuda else host_us
    total = sum(by_cat.values()) or 1.0
    counts = Counter(e.name for e in ops)
    syncs = {n: counts[n] / n_steps for n in (*SYNC_OPS, 'aten::item', *(SYNC_RUNTIME if cuda else ()))}
    if cuda: syncs['DtoH copies'] = dtoh / n_steps
    sync_names = set(SYNC_RUNTIME) if cuda and any(counts[n] for n in SYNC_RUNTIME) else set(SYNC_OPS)
    sources = Counter()                                    # where the syncs happen: the innermost range around each
    for e in ops:
        if e.name not in sync_names: continue
        a, where = e.cpu_parent, None
        while a is not None and where is None:
            where = range_name(a.name); a = a.cpu_parent
        sources[where if where and where != 'step' else 'trainer (outside the ranges)'] += 1
    host_syncs = sum(counts[n] for n in sync_names)
    # regions: outermost ranges of each name; kernels of ops (any thread) that started inside them
    windows = defaultdict(list)
    for e in ops:
        r = range_name(e.name)
        if r and r != 'step': windows[r].append((e.time_range.start, e.time_range.end))
    kernel_total = sum(dev_us.values())
    op_kernel_us.sort()
    op_starts = [t for t, _ in op_kernel_us]
    cum = [0.0]
    for _, k in op_kernel_us: cum.append(cum[-1] + k)
    regions = {}
    for r, iv in windows.items():
        merged = _merge(iv)
        h_us = sum(e - s for s, e in merged)
        d_us = sum(cum[bisect.bisect_right(op_starts, e)] - cum[bisect.bisect_left(op_starts, s)] for s, e in merged)
        reg = dict(calls=len(iv) / n_steps, host_ms=h_us / n_steps / 1e3, host_share=h_us / wall_us)
        if cuda: reg.update(device_ms=d_us / n_steps / 1e3, device_share=d_us / kernel_total if kernel_total else None)
        reg['share'] = reg['device_share'] if cuda else reg['host_share']
        regions[r] = reg
    row = dict(time_basis='self device time' if cuda else 'self CPU time', profiled_step_ms=wall_us / n_steps / 1e3,
               categories_ms={c: by_cat[c] / n_steps / 1e3 for c in CATEGORIES},
               category_shares={c: by_cat[c] / total for c in CATEGORIES}, regions=regions,
               aten_ops=sum(v for k, v in counts.items() if k.startswith('aten::')) / n_steps,
               host_syncs=host_syncs / n_steps, syncs=syncs,
               sync_sources={k: v / n_steps for k, v in sources.most_common()},
               top_ops=[dict(name=n, category=c, ms=t / n_steps / 1e3, calls=k / n_steps)
                        for n, (t, k, c) in sorted(top.items(), key=lambda kv: -kv[1][0])[:12]])
    if cuda:
        row['host_categories_ms'] = {c: host_us[c] / n_steps / 1e3 for c in CATEGORIES}
        row['kernels'] = n_kernels / n_steps
        row['kernel_ms'] = kernel_total / n_steps / 1e3
        busy = sum(e - s for s, e in _merge([(d.time_range.start, d.time_range.end) for d in device])) / n_steps / 1e3
        row['gpu_busy_ms'] = busy
        row['gpu_idle_share'] = max(0.0, 1 - busy / step_ms) if step_ms else None
    else:
        row.update(kernels=None, kernel_ms=None, gpu_busy_ms=None, gpu_idle_share=None)
    share = lambda r: regions[r]['share'] if r in regions else None
    row['mask_share'] = share('mask')
    if any(r in regions for r in ('mask.query_saliency', 'mask.saliency_map', 'hard_negative_key_pass')):  # SaliencyMoCo
        row['saliency_mask_share'] = share('mask')
        row['hard_negative_pass_share'] = share('hard_negative_key_pass')
    return row

# ------------------------------------------------------------------------------------------------ one configuration
def median_step(fn, warmup: int, steps: int, device: torch.device) -> tuple:
    "Median seconds of `steps` calls after `warmup` (each synchronised), and their peak CUDA memory (bytes)."
    for _ in range(warmup): fn()
    sync(device)
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter(); fn(); sync(device); times.append(time.perf_counter() - t)
    return statistics.median(times), (torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else None)


def profile_one(method_name: str, model_key: str, batch: int, steps: int, warmup: int, device: torch.device,
                amp: str = 'auto', compile: bool = False, method_kwargs: dict = None, at: float = 0.0,
                trace_dir: str = None, famt_refresh: bool = False) -> dict:
    "Profile one method x model; returns a row with status 'ok', 'skipped: ...', 'oom' or 'error: ...'."
    method, row = build_method(method_name, model_key, batch, device, method_kwargs, at)
    if method is None: return row
    cuda = device.type == 'cuda'
    notes = []
    try:
        b = first_batch(method, model_key, batch, device, at)
        reopen = famt_bank(method, famt_refresh, notes)
        if method_name == 'famt': row['famt_state'] = 'refresh window' if reopen else f'steady (refreshes: {method.version})'
        skips = cuda_graph_skips()
        with tempfile.TemporaryDirectory() as tmp:
            trainer = make_trainer(method, b, batch, device, amp, compile, tmp)
            def step():
                if reopen: reopen()
                return trainer.train_step(b)
            dt, mem = median_step(step, warmup, steps, device)              # plain steps, no profiler, no ranges
            with patched(method_ranges(method, notes) + trainer_ranges(trainer, method)):
                step(); sync(device)                                         # once with the ranges (recompiles, if any)
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                with profile(activities=activities) as prof, _HostToDevice() as h2d:
                    for _ in range(steps):
                        if reopen: reopen()
                        with record_function(PREFIX + 'step'): trainer.train_step(b)
                    sync(device)
            if trainer.cuda_graphs: note_cuda_graph_skips(row, cuda_graph_skips() - skips)
            del trainer
        if trace_dir:
            Path(trace_dir).mkdir(parents=True, exist_ok=True)
            path = Path(trace_dir) / f"{method_name}_{model_key}_{device.type}.json"
            prof.export_chrome_trace(str(path))
            row['trace'] = str(path)
        row.update(analyse(prof.events(), cuda, steps, dt * 1e3))
        row['syncs'][HOST_TO_DEVICE] = h2d.count / steps     # Python numbers copied to the step's device
        if not cuda: row['host_syncs'] += h2d.count / steps  # (on CUDA the runtime's sync calls count them already)
    except Exception as e:  # one broken method must not end the whole matrix
        return failed_row(row, e)
    finally:
        if cuda: torch.cuda.empty_cache()
    return dict(row, status='ok', step_ms=dt * 1e3, img_per_s=batch / dt,
                peak_mem_gb=None if mem is None else mem / 2 ** 30, notes=notes + row.pop('notes', []))

# ------------------------------------------------------------------------------------------------ output
def pct(v) -> str:
    return '-' if v is None else f"{100 * v:.1f}%"


def print_config(r: dict) -> None:
    "The readable breakdown of one configuration."
    head = f"\n== {r['method']} x {r['model']}, batch {r['batch']}"
    if r['status'] != 'ok':
        print(f"{head}: {r['status']}"); return
    cuda = r['kernel_ms'] is not None
    print(f"{head}: {r['step_ms']:.1f} ms/step ({r['img_per_s']:.0f} img/s); profiled {r['profiled_step_ms']:.1f} ms/step; "
          f"times are {r['time_basis']}")
    print(f"  {'category':<28}{'ms/step':>9}{'share':>8}" + (f"{'host ms':>9}" if cuda else ''))
    for c in CATEGORIES:
        ms = r['categories_ms'][c]
        if ms == 0 and not (cuda and r['host_categories_ms'][c]): continue
        print(f"  {CATEGORY_LABELS[c]:<28}{ms:>9.2f}{pct(r['category_shares'][c]):>8}"
              + (f"{r['host_categories_ms'][c]:>9.2f}" if cuda else ''))
    regs = r['regions']
    basis = 'device' if cuda else 'host'
    print(f"  phases ({basis} share of the step): " + ' | '.join(
        f"{p} {pct(regs[p]['share']) if p in regs else '-'}" for p in PHASES))
    own = [k for k in regs if k not in PHASES]
    if own:
        print(f"  method work ({basis} share; host ms/step" + (", device ms/step" if cuda else '') + "):")
        for k in sorted(own):
            g = regs[k]
            print(f"    {k:<28}{pct(g['share']):>8}{g['host_ms']:>9.2f}" + (f"{g['device_ms']:>9.2f}" if cuda else '')
                  + f"   {g['calls']:g} call(s)")
    s = r['syncs']
    print(f"  per step: {r['aten_ops']:.0f} aten ops" + (f", {r['kernels']:.0f} kernels" if cuda else '')
          + f", {r['host_syncs']:g} host syncs (" + ', '.join(f"{k.replace('aten::', '')} {v:g}" for k, v in s.items() if v)
          + ')')
    if r['sync_sources']:
        print("  host syncs by range: " + ', '.join(f"{k} {v:g}" for k, v in r['sync_sources'].items()))
    if cuda:
        print(f"  GPU busy {r['gpu_busy_ms']:.2f} of {r['step_ms']:.2f} ms: idle {pct(r['gpu_idle_share'])}")
    print("  top ops: " + '; '.join(f"{t['name'].replace('aten::', '')} {t['ms']:.2f} ms ({t['category']})"
                                   for t in r['top_ops'][:6]))
    for n in r.get('notes') or (): print(f"  note: {n}")


def print_summary(rows: list) -> None:
    print("\nsummary (shares of the step: device time on CUDA, host time on CPU)")
    head = (f"{'method':<14}{'model':<16}{'batch':>6}{'ms/step':>9}{'mask':>7}{'hard neg':>9}{'top category':>26}"
            f"{'syncs':>7}{'aten ops':>9}{'GPU idle':>9}")
    print(head); print('-' * len(head))
    for r in rows:
        if r['status'] != 'ok':
            print(f"{r['method']:<14}{r['model']:<16}{r['batch']:>6}  {r['status'][:80]}"); continue
        cat = max(r['category_shares'], key=r['category_shares'].get)
        print(f"{r['method']:<14}{r['model']:<16}{r['batch']:>6}{r['step_ms']:>9.1f}{pct(r['mask_share']):>7}"
              f"{pct(r.get('hard_negative_pass_share')):>9}{cat + ' ' + pct(r['category_shares'][cat]):>26}"
              f"{r['host_syncs']:>7g}{r['aten_ops']:>9.0f}{pct(r['gpu_idle_share']):>9}")


def git_commit() -> str:
    try: return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                               cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError: return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_arguments(ap, steps=(10, 3), compile_help="torch.compile the trainer's forward, optional MODE (ranges inside "
                                                       "it vanish)")
    ap.add_argument('--famt-refresh', action='store_true',
                    help="FAMT: profile a refresh-window step (attention recomputed every step) instead of the steady state")
    ap.add_argument('--trace', default=None, metavar='DIR', help='also write a chrome trace per configuration to DIR')
    ap.add_argument('--out', default=str(RESULTS), help=f'results file (default {RESULTS.relative_to(RESULTS.parents[2])})')
    ap.add_argument('--no-save', action='store_true', help='do not append the rows to the results file')
    args = ap.parse_args(argv)

    device, methods, models, steps, warmup, method_kwargs = resolve_step_arguments(ap, args, steps=(10, 3), cpu_models=CPU_MODELS)
    cuda = device.type == 'cuda'

    load_before = load_average()
    print(f"device {describe(device)}; torch {torch.__version__}; amp {args.amp}; compile {args.compile}; at {args.at}; "
          f"{warmup} warm-up + {steps} timed + {steps} profiled steps")
    if not cuda: print("CPU run: self CPU times, shares as on this machine; not a GPU target measurement")
    rows = []
    for name in methods:
        for model_key in models:
            batch = args.batch or default_batch(model_key, device)
            t = time.perf_counter()
            row = profile_one(name, model_key, batch, steps, warmup, device, args.amp, args.compile, method_kwargs,
                              args.at, args.trace, args.famt_refresh)
            print_config(row)
            print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
            rows.append(row)
    load_after = load_average()
    print_summary(rows)
    warn_if_busy(load_before, load_after, 1.5, "the timings are unreliable (the shares less so)")
    if not args.no_save:
        append_rows(Path(args.out), rows, 'profile_step', command_line('bench/profile_step.py', argv), describe(device),
                    torch=torch.__version__, threads=torch.get_num_threads(), amp=args.amp, compile=args.compile,
                    steps=steps, warmup=warmup, method_kwargs=method_kwargs, famt_refresh=args.famt_refresh,
                    cpu_count=os.cpu_count(), git_commit=git_commit(), load_avg_1min=load_pair(load_before, load_after))
    return 0


if __name__ == '__main__':
    sys.exit(main())
