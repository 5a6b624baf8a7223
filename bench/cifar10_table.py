"""The CIFAR-10 table: every method pre-trained for the same training-time budget, then kNN and linear probe.

    python bench/cifar10_table.py --budget 2.5 [--methods mae,mfm,folk,famt,moco,saliency_moco]
                                  [--archive PATH/cifar10-jpg.tar.gz] [--data-root data] [--runs runs/cifar10-table]
                                  [--results results] [--device cuda] [--smoke]
                                  [--method-args JSON] [--pretrain-args ARGS] [--record-field KEY=TEXT ...]

For each method this runs, in one process and in order:
1. `folk_nb_pretrain` (`folk_nb.cli.main`) on the CIFAR-10 training split with `--time-budget BUDGET`: the trainer
   times 20 calibration steps, sizes the cosine schedule to the steps that fit in the budget, and stops when the
   measured training time reaches it (see nbs/40_trainer.ipynb). Every method gets the same budget; the settings
   below (`RECIPES`) are the only per-method choices, written down here and not tuned on the test set;
2. `folk_nb_eval --protocol knn` (cosine, k=200, T=0.1) and `--protocol linear` (on cached features) of the final
   checkpoint on the test split; each writes one JSON record under `--results`.

The run folders (`args.json`, `config.json`, `log.csv`, `summary.json`, `train.log`) stay under `--runs`;
`--logs` copies them (without checkpoints) next to the records. `--smoke` runs a 0.05-minute budget on a subset for
testing the script itself (its records go to `--results` too, so point it at a scratch folder).

Ablations and target runs without editing the recipes: `--method-args '{"bn_splits": 8}'` is merged over the
recipe's method arguments of every method run, `--pretrain-args '--channels-last off'` is added to every
`folk_nb_pretrain` command (and stored as `pretrain_args_extra`), and each `--record-field KEY=TEXT` is stored in every record written
(e.g. `--record-field ablation='MoCo with split BN'`, `--record-field note='code: commit ...'`), next to the
`method_args_override` the records then carry. Every record gets a `budget` field; the results notebook's table
takes the newest budgeted records per method, except those with an `ablation` or `target_run` field.
"""
import argparse, contextlib, io, json, shlex, shutil, sys, time, traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VIT = ['--model', 'vit_small_patch16_224', '--img-size', '32', '--patch-size', '4',
       '--optimizer', 'adamw', '--lr', '5e-4', '--weight-decay', '0.05']
DECODER = {'decoder_dim': 256, 'decoder_depth': 4, 'decoder_heads': 8}
RESNET = ['--model', 'resnet18', '--img-size', '32', '--cifar-stem',
          '--optimizer', 'sgd', '--lr', '0.24', '--weight-decay', '5e-4']     # lightly's CIFAR-10 MoCo recipe (6e-2 x 512/128)
# No split BatchNorm (MoCo's bn_splits, the single-GPU shuffle BN of the official MoCo CIFAR-10 demo, --bn-splits 8):
# measured on an H100 (2026-11-22, results/*225024*), 8 splits learned about as much per epoch but the first, eager
# SplitBatchNorm2d cost a third of the throughput, so at equal time MoCo was worse (kNN 0.587 against 0.623 in 2 min).
# The layer is now one F.batch_norm over a view (bench/split_bn.py), but on an H100 (2026-11-23) it still halves the
# MoCo step in channels_last (11,227 against 22,136 img/s): try it with --method-args '{"bn_splits": 8}' only.
MOCO = {'queue_size': 4096, 'momentum': 0.99, 'temperature': 0.1}
# FAMT refreshes its attention bank every 10% of the schedule (the paper's rule, for ~800 epochs: one refresh window
# of ~1 epoch of extra un-masked forward passes every 80 epochs). A budget of minutes holds ~20 epochs, where 10% is
# every 2 epochs and most epochs would be refresh windows; we keep refresh windows at least 5 epochs apart.
FAMT_REFRESH_MIN_EPOCHS = 5
# ViT methods: ViT-S with 4 px patches (an 8 x 8 grid), AdamW 5e-4, paper defaults for masks and losses (FOLK: its
# Com / RCom thresholds scaled from 224 to 32 px, as MFM scales its radius, notebook 32; FOLK with
# 4096 prototypes, a CIFAR-scale K). ResNet methods: ResNet-18 with the CIFAR stem, SGD.
RECIPES = {
    'mae': VIT + ['--method-args', json.dumps(DECODER)],
    'mfm': VIT,
    'folk': VIT + ['--method-args', json.dumps({'out_dim': 4096})],
    'famt': VIT + ['--method-args', json.dumps({**DECODER, 'refresh_min_epochs': FAMT_REFRESH_MIN_EPOCHS})],
    'moco': RESNET + ['--method-args', json.dumps(MOCO)],
    'saliency_moco': RESNET + ['--method-args', json.dumps(MOCO)],
}


def parse_method_args(ap: argparse.ArgumentParser, text) -> dict:
    "The --method-args JSON dict ({} when absent), with an argparse error naming the problem."
    if text is None: return {}
    try: d = json.loads(text)
    except ValueError as e: ap.error(f"--method-args is not valid JSON ({e}): {text!r}")
    if not isinstance(d, dict): ap.error(f"--method-args must be a JSON object like '{{\"bn_splits\": 8}}', got {text!r}")
    return d


RESERVED_FIELDS = ('format', 'method', 'model', 'data', 'protocol', 'metric', 'value', 'epochs', 'gpu_minutes',
                   'img_per_s', 'command', 'git_commit', 'device', 'date', 'budget', 'method_args_override',
                   'pretrain_args_extra')


def parse_record_fields(ap: argparse.ArgumentParser, items: list) -> dict:
    "KEY=TEXT pairs -> dict, refusing malformed pairs and the fields a record already has."
    out = {}
    for item in items:
        key, sep, text = item.partition('=')
        if not sep or not key.isidentifier(): ap.error(f"--record-field needs KEY=TEXT with KEY a plain name, got {item!r}")
        if key in RESERVED_FIELDS: ap.error(f"--record-field {key!r}: records set that field themselves; choose another name")
        out[key] = text
    return out


def recipe_argv(recipe: list, override: dict) -> list:
    "A recipe's arguments with `override` merged over its --method-args JSON (added when the recipe has none)."
    argv = list(recipe)
    if not override: return argv
    if '--method-args' in argv:
        i = argv.index('--method-args') + 1
        argv[i] = json.dumps({**json.loads(argv[i]), **override})
    else:
        argv += ['--method-args', json.dumps(override)]
    return argv


def add_record_fields(path: Path, budget: float, override: dict, fields: dict) -> None:
    "Store the budget, the --method-args override and the --record-field fields in a written record (atomically)."
    from folk_nb.trainer import atomic_write_text
    record = json.loads(path.read_text())
    record['budget'] = f"{budget:g} training minutes per method (bench/cifar10_table.py --budget {budget:g})"
    if override: record['method_args_override'] = override
    record.update(fields)
    atomic_write_text(json.dumps(record, indent=2, allow_nan=False) + '\n', path)


@contextlib.contextmanager
def tee(path: Path):
    "Copy stdout and stderr to `path` while still printing them."
    class Tee(io.TextIOBase):
        def __init__(self, *streams): self.streams = streams
        def write(self, s):
            for st in self.streams: st.write(s); st.flush()
            return len(s)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'a') as f:
        out, err = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Tee(out, f), Tee(err, f)
        try: yield
        finally: sys.stdout, sys.stderr = out, err


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--budget', type=float, default=2.5, help='training minutes per method (the same for every row)')
    ap.add_argument('--methods', default=','.join(RECIPES))
    ap.add_argument('--archive', default=str(ROOT.parent / 'shared' / 'data' / 'cifar10-jpg.tar.gz'))
    ap.add_argument('--data-root', default=str(ROOT / 'data'))
    ap.add_argument('--runs', default=str(ROOT / 'runs' / 'cifar10-table'))
    ap.add_argument('--results', default=str(ROOT / 'results'))
    ap.add_argument('--logs', default=None, help='copy each run folder (no checkpoints) under this folder')
    ap.add_argument('--batch-size', type=int, default=512)
    ap.add_argument('--device', default=None)
    ap.add_argument('--smoke', action='store_true', help='tiny budget and evaluation subsets: tests this script')
    ap.add_argument('--method-args', default=None, help="JSON dict merged over every recipe's method arguments")
    ap.add_argument('--pretrain-args', default='', metavar='ARGS',
                    help="extra folk_nb_pretrain arguments for every run, e.g. '--channels-last off'")
    ap.add_argument('--record-field', action='append', default=[], metavar='KEY=TEXT',
                    help='a field stored in every record written (repeatable), e.g. ablation=... or note=...')
    a = ap.parse_args(argv)
    override = parse_method_args(ap, a.method_args)
    fields = parse_record_fields(ap, a.record_field)
    try: extra = shlex.split(a.pretrain_args)
    except ValueError as e: ap.error(f"--pretrain-args is not a valid argument string ({e}): {a.pretrain_args!r}")
    if extra: fields['pretrain_args_extra'] = a.pretrain_args
    from folk_nb import cli, eval as ev
    methods = [m for m in a.methods.split(',') if m]
    unknown = [m for m in methods if m not in RECIPES]
    if unknown: ap.error(f"unknown method(s) {unknown}; choose from {', '.join(RECIPES)}")
    budget = 0.05 if a.smoke else a.budget
    done = {}
    for name in methods:
        out = Path(a.runs) / name
        if out.exists(): shutil.rmtree(out)            # each row starts from scratch
        t0 = time.time()
        row = dict(method=name)
        with tee(out / 'train.log'):
            try:
                argv = ['--method', name, '--data', 'cifar10', '--data-root', a.data_root, '--archive', a.archive,
                        '--batch-size', str(a.batch_size), '--time-budget', str(budget), '--epochs', '100000',
                        '--ckpt-every', '100000000', '--log-every', '25', '--no-progress', '--out', str(out),
                        *recipe_argv(RECIPES[name], override), *(['--device', a.device] if a.device else []), *extra]
                if a.smoke: argv += ['--model-args', json.dumps({'depth': 2})] if 'vit' in ' '.join(RECIPES[name]) else []
                print('folk_nb_pretrain', ' '.join(argv), flush=True)
                s = cli.main(argv)
                row.update(steps=s['steps'], train_seconds=round(s['train_seconds'], 1), img_per_s=round(s['img_per_s']),
                           status=s['status'], epochs=s['epochs'])
                ckpt = out / 'checkpoints' / 'last.pt'
                sub = ['--max-train', '2000', '--max-test', '500'] if a.smoke else []
                for protocol in ('knn', 'linear'):
                    ev_argv = ['--checkpoint', str(ckpt), '--data', 'cifar10', '--root', a.data_root, '--protocol', protocol,
                               '--out', a.results, *sub, *(['--device', a.device] if a.device else [])]
                    print('folk_nb_eval', ' '.join(ev_argv), flush=True)
                    (record,) = ev.evaluate(ev_argv)     # knn and linear write one record each
                    add_record_fields(Path(a.results) / record['_file'], budget, override, fields)
                    row[protocol] = round(float(record['value']), 4)
            except Exception:
                traceback.print_exc()
                row['error'] = traceback.format_exc().strip().splitlines()[-1]
        row['wall_seconds'] = round(time.time() - t0, 1)
        done[name] = row
        print(json.dumps(row), flush=True)
        if a.logs:
            dest = Path(a.logs) / name
            shutil.copytree(out, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns('checkpoints', 'tensorboard'))
    print(f"\nCIFAR-10, {budget:g} training minutes per method ({'smoke test' if a.smoke else 'full data'}):")
    print(f"{'method':<15}{'steps':>8}{'img/s':>9}{'kNN':>8}{'linear':>8}  status")
    for r in done.values():
        print(f"{r['method']:<15}{r.get('steps', '-'):>8}{r.get('img_per_s', '-'):>9}{r.get('knn', '-'):>8}"
              f"{r.get('linear', '-'):>8}  {r.get('status', r.get('error'))}")
    return 1 if any('error' in r for r in done.values()) else 0


if __name__ == '__main__':
    sys.exit(main())
