"""Benchmark: how long one update of each explorer and viewer takes at 224 px on the CPU, as a user feels it.

    python bench/viewers.py [--threads 1] [--repeats 9] [--only spectrum,patch,saliency,reconstruction,attention,dashboard]
                            [--png-level L] [--label TEXT] [--no-save]

One update = what the kernel does between a control's change and the message leaving for the browser: the
computation (masks, filtering, spectra, the model's forward pass where the control needs one), the figure update
(every trace property set, PNG encoding of the pictures, the explorer's `sync_figure`), and the **serialisation of
every widget message** that update sends. The widgets are not displayed, so ipywidgets talks to a `comm.DummyComm`;
this script makes that comm serialise each message as a kernel's session does (`json.dumps` of the message, binary
buffers apart), so the JSON cost is timed and the bytes a browser would receive are counted ("sent kB").

Each row is the median of `--repeats` updates, each to a *different* control value (cycled; one warm-up update
first), as wall time and as the CPU time of this process: on a machine shared with other jobs the wall time grows
most, but on a small virtual machine the CPU time grows too (shared cores and caches), so compare runs made under a
similar load: each JSON line keeps the 1-minute load average. Rows that run a model also time the model's forward
pass alone ("model"). The attention explorers read every layer (and the rollout) of an image in one forward pass and
keep it, so a layer switch on an image already seen runs no model ("layer dropdown (cached)"); the "uncached" row
clears that cache before each switch, so it times what the first look at a new image or checkpoint costs (the ViT
run through all its blocks). `--png-level` sets the zlib level of the widgets' pictures (`ExplorerBox.png_level`), `--label`
stores a note with the rows (e.g. what was changed). Models have random weights (speed does not depend on training):
  ViT-S/16         - the PatchMaskExplorer's default ViT (vit_small_patch16_224, 12 blocks, width 384)
  toy ViT          - vit_tiny_patch16_224 cut to 2 blocks (width 192): the viewers' demo-sized model
  ViT-Tiny/16      - vit_tiny_patch16_224 as published (12 blocks, width 192)
The table goes to stdout; one JSON line per row (with device, date, command, the 1-minute load average before and
after) is appended to bench/results/viewers.jsonl.
"""
import argparse, json, os, platform, statistics, sys, time
from pathlib import Path

import comm
import torch

if str(Path(__file__).resolve().parent) not in sys.path: sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, load_average, warn_if_busy, load_pair, command_line, append_rows  # noqa: E402

RESULTS = RESULTS_DIR / 'viewers.jsonl'
SIZE = 224
GROUPS = ('spectrum', 'patch', 'saliency', 'reconstruction', 'attention', 'dashboard')
MODELS = {'toy ViT (2 blocks)': dict(model='vit_tiny_patch16_224', model_kwargs=dict(depth=2)),
          'ViT-Tiny/16 (12 blocks)': dict(model='vit_tiny_patch16_224')}
MAE_DECODER = dict(decoder_dim=128, decoder_depth=2, decoder_heads=4)


class Wire:
    "Serialise every widget message as a kernel would (JSON; buffers counted, not copied) and count the bytes."
    def __init__(self): self.bytes = 0

    def publish_msg(self, comm_, msg_type, data=None, metadata=None, buffers=None, **keys):
        text = json.dumps(dict(msg_type=msg_type, data=data, metadata=metadata or {}), default=str, ensure_ascii=False,
                          allow_nan=False).encode('utf8', errors='surrogateescape')
        self.bytes += len(text) + sum(memoryview(b).nbytes for b in (buffers or ()))

    def install(self):
        wire = self
        comm.DummyComm.publish_msg = lambda self, *a, **k: wire.publish_msg(self, *a, **k)
        return self


def median_ms(fn, values, repeats, wire):
    "Median wall ms, CPU ms and kB sent of fn(v) over `repeats` values cycled from `values` (one warm-up call first)."
    fn(values[-1])
    wall, cpu, sent = [], [], []
    for i in range(repeats):
        wire.bytes = 0
        t, c = time.perf_counter(), time.process_time()
        fn(values[i % len(values)])
        wall.append(time.perf_counter() - t); cpu.append(time.process_time() - c); sent.append(wire.bytes)
    return dict(wall_ms=1000 * statistics.median(wall), cpu_ms=1000 * statistics.median(cpu),
                sent_kb=statistics.median(sent) / 1000)


def set_value(widget):
    def fn(v): widget.value = v
    return fn


def click(button):
    def fn(_): button.click()
    return fn


def forward_ms(fn, repeats):
    "Median wall and CPU ms of fn() alone (the model's forward pass as the widget calls it)."
    r = median_ms(lambda _: fn(), [0], repeats, Wire())
    return dict(model_wall_ms=r['wall_ms'], model_cpu_ms=r['cpu_ms'])


def bench_spectrum(repeats, wire):
    from folk_nb.spectrum_explorer import SpectrumExplorer
    ex = SpectrumExplorer(size=SIZE, kind='Com')
    yield 'SpectrumExplorer', 'Com threshold slider', '-', median_ms(set_value(ex.threshold), [0.003, 0.005, 0.01, 0.02, 0.05], repeats, wire)
    ex.kind.value = 'MFM low-pass'
    yield 'SpectrumExplorer', 'MFM radius slider', '-', median_ms(set_value(ex.radius), [8.0, 12.0, 16.0, 20.0, 24.0, 28.0], repeats, wire)
    ex.kind.value = 'ratio: strongest first'
    yield 'SpectrumExplorer', 'ratio slider', '-', median_ms(set_value(ex.ratio), [0.5, 0.6, 0.7, 0.8, 0.9], repeats, wire)
    yield 'SpectrumExplorer', 'mask dropdown', '-', median_ms(set_value(ex.kind), ['Com', 'RCom', 'MFM low-pass', 'MFM high-pass'], repeats, wire)


def bench_patch(repeats, wire):
    from folk_nb.patch_explorer import PatchMaskExplorer, vit_attention_layers
    ex = PatchMaskExplorer(size=SIZE)
    model = 'ViT-S/16 (12 blocks)'
    yield 'PatchMaskExplorer', 'mask-ratio slider', model, median_ms(set_value(ex.mask_ratio), [0.3, 0.35, 0.4, 0.45, 0.5], repeats, wire)
    yield 'PatchMaskExplorer', 'head dropdown', model, median_ms(set_value(ex.head), [v for _, v in ex.head.options], repeats, wire)
    def uncached_layer(v):
        ex._attention.clear()                      # an image not seen before: the ViT runs through every block
        ex.layer.value = v
    x = ex.current_image()
    r = median_ms(uncached_layer, [11, 5, 8, 10], max(3, repeats // 2), wire)
    r.update(forward_ms(lambda: vit_attention_layers(ex.model, x), max(3, repeats // 2)))
    yield 'PatchMaskExplorer', 'layer dropdown, uncached (ViT, all layers)', model, r
    yield 'PatchMaskExplorer', 'layer dropdown (cached)', model, median_ms(set_value(ex.layer), [11, 5, 8, 10, 'rollout'], repeats, wire)


def bench_saliency(repeats, wire):
    from folk_nb.patch_explorer import SaliencyExplorer
    ex = SaliencyExplorer(size=SIZE)
    yield 'SaliencyExplorer', 'k slider', '-', median_ms(set_value(ex.k), [0.2, 0.4, 0.6, 0.8, 1.0], repeats, wire)
    yield 'SaliencyExplorer', 'fill dropdown', '-', median_ms(set_value(ex.fill), ['mean', 'blur', 'highpass'], repeats, wire)
    yield 'SaliencyExplorer', 'resample button', '-', median_ms(click(ex.resample), [0], repeats, wire)


def bench_reconstruction(repeats, wire):
    from folk_nb.methods import create_method
    from folk_nb.mfm import mfm_reconstruct
    from folk_nb.viewers import ReconstructionViewer, evaluating, patch_split
    x = torch.rand(1, 3, SIZE, SIZE)
    for label, kw in MODELS.items():
        mfm = create_method('mfm', img_size=SIZE, **kw)
        with evaluating(mfm): fwd = forward_ms(lambda: mfm_reconstruct(mfm.backbone, mfm.mfm_head, x), repeats)
        v = ReconstructionViewer(mfm)
        r = median_ms(set_value(v.radius), [8.0, 12.0, 16.0, 20.0, 24.0, 28.0], repeats, wire)
        yield 'ReconstructionViewer', 'MFM radius slider', label, {**r, **fwd}
        v.kind.value = 'Com'
        r = median_ms(set_value(v.threshold), [0.003, 0.005, 0.01, 0.02, 0.05], repeats, wire)
        yield 'ReconstructionViewer', 'MFM Com threshold slider', label, {**r, **fwd}
        for name, values in (('mae', [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8]), ('famt', [0.3, 0.35, 0.4, 0.45, 0.5, 0.55])):
            method = create_method(name, img_size=SIZE, **kw, **MAE_DECODER, **(dict(num_images=1) if name == 'famt' else {}))
            with evaluating(method):
                split, _ = patch_split(method, x, method.mask_ratio, getattr(method, 'throw_ratio', 0.0))
                fwd = forward_ms(lambda: method.reconstruct(x, split), repeats)
            v = ReconstructionViewer(method)
            r = median_ms(set_value(v.mask_ratio), values, repeats, wire)
            yield 'ReconstructionViewer', f'{name.upper()} mask-ratio slider', label, {**r, **fwd}


def bench_attention(repeats, wire):
    from folk_nb.methods import create_method
    from folk_nb.viewers import AttentionViewer
    for label, kw in MODELS.items():
        av = AttentionViewer(create_method('mae', img_size=SIZE, **kw, **MAE_DECODER))
        yield 'AttentionViewer', 'head dropdown', label, median_ms(set_value(av.head), [v for _, v in av.head.options], repeats, wire)
        def uncached_layer(v):
            for k in [k for k in av._memo if k[0] == 'layers']: del av._memo[k]   # the one pass not yet made
            av.layer.value = v
        layers = list(range(len(av.model.blocks)))
        x = av.current_image()[None]
        r = median_ms(uncached_layer, layers, repeats, wire)
        r.update(forward_ms(lambda: av.layer_attention(x), repeats))
        yield 'AttentionViewer', 'layer dropdown, uncached (ViT, all layers)', label, r
        yield 'AttentionViewer', 'layer dropdown (cached)', label, median_ms(set_value(av.layer), layers, repeats, wire)


def bench_dashboard(repeats, wire):
    from folk_nb.viewers import TrainingDashboard
    dash = TrainingDashboard(total_steps=10_000, min_interval=0.0)
    step = iter(range(1, 10**6))
    def log(_):
        s = next(step)
        dash.on_log(dict(step=s, epoch=0, loss=1.0 / s, loss_mfm=1.0 / s, lr=1e-3, img_per_s=500.0, time=0.01 * s))
    for _ in range(1000): log(0)
    yield 'TrainingDashboard', 'redraw after 1,000 rows', '-', median_ms(log, [0], repeats, wire)


def describe() -> str:
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def print_table(rows: list, repeats: int, threads: int) -> None:
    print(f"\none update at {SIZE} px, torch {torch.__version__}, {threads} CPU thread(s); median of {repeats} updates")
    head = (f"{'explorer':<21}{'update':<44}{'model':<24}{'wall ms':>8}{'CPU ms':>8}{'model CPU':>10}{'sent kB':>9}")
    print(head); print('-' * len(head))
    for r in rows:
        model = f"{r['model_cpu_ms']:10.1f}" if 'model_cpu_ms' in r else f"{'':>10}"
        print(f"{r['explorer']:<21}{r['update']:<44}{r['model']:<24}{r['wall_ms']:8.1f}{r['cpu_ms']:8.1f}{model}{r['sent_kb']:9.0f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--threads', type=int, default=1, help='torch CPU threads (default 1)')
    ap.add_argument('--repeats', type=int, default=9, help='timed updates per row (default 9)')
    ap.add_argument('--only', default=','.join(GROUPS), help=f"comma-separated, from {', '.join(GROUPS)}")
    ap.add_argument('--png-level', type=int, default=None,
                    help="zlib level of the widgets' PNG pictures (ExplorerBox.png_level; default: the library's)")
    ap.add_argument('--label', default='', help='a note stored with the rows (e.g. the commit or the change measured)')
    ap.add_argument('--no-save', action='store_true', help=f'do not append to {RESULTS.relative_to(RESULTS.parents[2])}')
    a = ap.parse_args(argv)
    groups = [g for g in a.only.split(',') if g]
    for g in groups:
        if g not in GROUPS: ap.error(f"unknown group {g!r}; choose from {', '.join(GROUPS)}")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from folk_nb.spectrum_explorer import ExplorerBox
    if a.png_level is not None: ExplorerBox.png_level = a.png_level
    wire = Wire().install()
    load_before = load_average()
    rows = []
    for g in groups:
        for explorer, update, model, r in globals()[f'bench_{g}'](a.repeats, wire):
            rows.append(dict(explorer=explorer, update=update, model=model, **{k: round(v, 2) for k, v in r.items()}))
            print(f"  {explorer}: {update}, {model}: {r['wall_ms']:.1f} ms wall, {r['cpu_ms']:.1f} ms CPU", flush=True)
    load_after = load_average()
    print_table(rows, a.repeats, a.threads)
    warn_if_busy(load_before, load_after, 0.75, "trust the CPU column more than the wall column")
    if not a.no_save:
        append_rows(RESULTS, rows, 'viewers', command_line('bench/viewers.py', argv), describe(),
                    torch=torch.__version__, threads=a.threads, repeats=a.repeats, size=SIZE,
                    png_level=getattr(ExplorerBox, 'png_level', None), cpu_count=os.cpu_count(), label=a.label,
                    load_avg_1min=load_pair(load_before, load_after))
    return 0


if __name__ == '__main__':
    sys.exit(main())
