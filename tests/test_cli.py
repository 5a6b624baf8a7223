"folk_nb_pretrain end to end: every method runs, resumes, refuses to overwrite; options from files; --help."
import json, subprocess, sys
from pathlib import Path
import pytest
import torch

from folk_nb.cli import main, parse_args, METHOD_NAMES
from folk_nb.trainer import load_checkpoint

VIT = ['--model-args', json.dumps({'depth': 1, 'embed_dim': 64, 'num_heads': 2})]
TINY = {
    'mfm': VIT, 'folk': VIT + ['--method-args', json.dumps({'out_dim': 128})],
    'mae': VIT + ['--method-args', json.dumps({'decoder_dim': 32, 'decoder_depth': 1, 'decoder_heads': 2})],
    'famt': VIT + ['--method-args', json.dumps({'decoder_dim': 32, 'decoder_depth': 1, 'decoder_heads': 2})],
    'moco': ['--method-args', json.dumps({'queue_size': 64})],
    'saliency_moco': ['--method-args', json.dumps({'queue_size': 64, 'saliency': 'spectral'})],
}


def run(method, out, *extra):
    argv = ['--method', method, '--data', 'samples', '--img-size', '32', '--batch-size', '8', '--epoch-size', '16',
            '--out', str(out), '--no-progress', '--log-every', '1', '--device', 'cpu', *TINY[method], *extra]
    return main(argv)


@pytest.mark.parametrize('method', METHOD_NAMES)
def test_every_method_trains_and_resumes_through_the_cli(method, tmp_path):
    s = run(method, tmp_path, '--max-steps', '2')
    assert s['status'] == 'finished' and s['steps'] == 2 and s['last']['loss'] == s['last']['loss']   # not NaN
    ckpt = load_checkpoint(tmp_path / 'checkpoints' / 'last.pt')
    assert ckpt['method'] == method and ckpt['step'] == 2
    args = json.loads((tmp_path / 'args.json').read_text())
    assert args['method'] == method and args['img_size'] == 32
    s = main(['--config', str(tmp_path / 'args.json'), '--resume', '--max-steps', '3'])   # resume from the saved config
    assert s['steps'] == 3 and s['steps_this_run'] == 1


def test_existing_run_is_not_overwritten_and_missing_resume_is_clear(tmp_path, capsys):
    run('mfm', tmp_path / 'a', '--max-steps', '1')
    with pytest.raises(SystemExit) as e:
        run('mfm', tmp_path / 'a', '--max-steps', '1')
    assert e.value.code == 2 and 'pass --resume' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run('mfm', tmp_path / 'b', '--resume')
    assert 'no checkpoint' in capsys.readouterr().err


def test_resume_with_another_method_is_refused(tmp_path, capsys):
    run('mfm', tmp_path, '--max-steps', '1')
    with pytest.raises(SystemExit):
        run('mae', tmp_path, '--resume')
    assert "the checkpoint is method 'mfm', this run is 'mae'" in capsys.readouterr().err


def test_config_file_toml_and_unknown_keys(tmp_path):
    (tmp_path / 'run.toml').write_text('method = "moco"\nbatch_size = 16\n')
    a = parse_args(['--config', str(tmp_path / 'run.toml')])
    assert a['method'] == 'moco' and a['batch_size'] == 16
    (tmp_path / 'bad.json').write_text(json.dumps({'method': 'mfm', 'batchsize': 3}))
    with pytest.raises(SystemExit):
        parse_args(['--config', str(tmp_path / 'bad.json')])


def test_bad_model_and_sizes_give_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(['--method', 'mae', '--model', 'vit_tinny_patch16_224', '--out', str(tmp_path / 'x'), '--no-progress'])
    assert 'vit_tiny_patch16_224' in capsys.readouterr().err          # close valid names are suggested
    with pytest.raises(SystemExit):
        main(['--method', 'mae', '--img-size', '30', '--patch-size', '4', '--out', str(tmp_path / 'y'), '--no-progress'])
    assert 'divisible' in capsys.readouterr().err


def test_console_script_help_documents_every_option():
    exe = Path(sys.executable).parent / 'folk_nb_pretrain'
    r = subprocess.run([str(exe), '--help'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for opt in ('--method', '--model', '--data', '--epochs', '--max-steps', '--batch-size', '--out', '--resume', '--config'):
        assert opt in r.stdout


def test_console_script_exits_zero_after_a_run(tmp_path):
    exe = Path(sys.executable).parent / 'folk_nb_pretrain'
    argv = ['--method', 'mfm', '--data', 'samples', '--img-size', '32', '--batch-size', '8', '--epoch-size', '16',
            '--max-steps', '1', '--out', str(tmp_path), '--no-progress', '--device', 'cpu', *TINY['mfm']]
    r = subprocess.run([str(exe), *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / 'checkpoints' / 'last.pt').exists()


def test_time_budget_sizes_the_schedule_and_stops_the_run(tmp_path):
    "--time-budget: calibration sizes the schedule from the measured step time; the run ends when the budget is spent."
    budget_min = 0.05
    s = run('mfm', tmp_path, '--time-budget', str(budget_min), '--epochs', '1000', '--ckpt-every', '100000', '--log-every', '50')
    cal = s['calibration']
    assert cal['budget_min'] == budget_min and cal['timed_steps'] == 20 and not cal['capped']
    assert cal['total_steps'] == int(budget_min * 60 / cal['seconds_per_step'])     # the steps that fit in the budget
    # the schedules run on the clock: the run ends with the budget (more or fewer steps than calibrated, as the
    # machine's speed drifts), and that is the end of its schedule
    assert s['status'] == 'finished' and s['steps'] > 0 and s['train_seconds'] >= budget_min * 60
    assert s['train_seconds'] < budget_min * 60 + 2.0                                  # overshoot: about one step
    ckpt = load_checkpoint(tmp_path / 'checkpoints' / 'last.pt')
    assert ckpt['calibration'] == cal and ckpt['total_steps'] == cal['total_steps'] and ckpt['train_seconds'] == s['train_seconds']
    with pytest.raises(SystemExit):
        parse_args(['--method', 'mfm', '--time-budget', '-1'])


def test_value_checks_option_reaches_the_trainer(tmp_path, capsys):
    run('mfm', tmp_path, '--max-steps', '1', '--value-checks', 'always')
    assert json.loads((tmp_path / 'config.json').read_text())['train_config']['value_checks'] == 'always'
    assert load_checkpoint(tmp_path / 'checkpoints' / 'last.pt')['train_config']['value_checks'] == 'always'
    with pytest.raises(SystemExit):
        parse_args(['--method', 'mfm', '--value-checks', 'never'])
    assert "invalid choice: 'never'" in capsys.readouterr().err


def test_compile_flag_takes_an_optional_mode(capsys):
    assert parse_args(['--method', 'mfm'])['compile'] is False
    assert parse_args(['--method', 'mfm', '--compile'])['compile'] is True
    assert parse_args(['--method', 'mfm', '--compile', 'max-autotune'])['compile'] == 'max-autotune'
    with pytest.raises(SystemExit):
        parse_args(['--method', 'mfm', '--compile', 'fastest'])
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


def _err(capsys, argv, code=2):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert 'Traceback' not in '\n'.join(err)
    return err[-1]


def test_a_refused_resume_leaves_args_json_as_it_was(tmp_path, capsys):
    run('mfm', tmp_path, '--max-steps', '1')
    before = (tmp_path / 'args.json').read_text()
    err = _err(capsys, ['--config', str(tmp_path / 'args.json'), '--resume', '--max-steps', '2',
                        '--model-args', json.dumps({'depth': 2, 'embed_dim': 64, 'num_heads': 2})])
    assert "'depth': 1" in err and "'depth': 2" in err
    assert (tmp_path / 'args.json').read_text() == before
    s = main(['--config', str(tmp_path / 'args.json'), '--resume', '--max-steps', '2'])   # the README's resume still works
    assert s['steps'] == 2


def test_resume_with_other_optimisation_settings_or_data_is_refused(tmp_path, capsys):
    run('mfm', tmp_path, '--max-steps', '1')
    cfg = ['--config', str(tmp_path / 'args.json'), '--resume', '--max-steps', '2']
    err = _err(capsys, cfg + ['--batch-size', '4', '--seed', '5', '--lr', '1'])
    assert "'seed': (0, 5)" in err and "'lr': (None, 1.0)" in err and "'global_batch': (8, 4)" in err and '--out' in err
    assert "--img-size" in _err(capsys, cfg + ['--img-size', '64'])
    assert "'--data': ('samples'" in _err(capsys, cfg + ['--data', str(tmp_path)])
    assert load_checkpoint(tmp_path / 'checkpoints' / 'last.pt')['step'] == 1
    assert main(cfg + ['--log-every', '5'])['steps'] == 2                 # cadence may change


def test_bad_options_give_one_line_errors(tmp_path, capsys):
    base = ['--method', 'mfm', '--data', 'samples', '--img-size', '32', '--batch-size', '8', '--epoch-size', '16',
            '--no-progress', '--max-steps', '1', '--out', str(tmp_path / 'r'), *VIT]
    assert "'gpu' is not a device" in _err(capsys, base + ['--device', 'gpu'])
    if not torch.cuda.is_available():
        assert 'CUDA is not available' in _err(capsys, base + ['--device', 'cuda'])
    assert '--img-size must be >= 1' in _err(capsys, base + ['--img-size', '-32'])
    assert 'finite, positive' in _err(capsys, base + ['--time-budget', 'inf'])
    (tmp_path / 'c.json').write_text(json.dumps({'method': 'nope'}))
    assert "argument --method: invalid choice: 'nope'" in _err(capsys, ['--config', str(tmp_path / 'c.json')])
    (tmp_path / 'c.toml').write_text('method = "mfm"\nbatch_size = \n')
    assert "'" + str(tmp_path / 'c.toml') + "' is not valid TOML" in _err(capsys, ['--config', str(tmp_path / 'c.toml')])
    err = _err(capsys, base[:-len(VIT)] + ['--device', 'cpu', '--model-args', '{"depth": "two"}'])
    assert err.startswith('folk_nb_pretrain: error: --model-args {"depth": "two"}') and 'TypeError' in err
    err = _err(capsys, base + ['--device', 'cpu', '--epoch-size', '2'])
    assert 'lower --batch-size or raise --epoch-size' in err and 'drop_last' not in err
    assert not (tmp_path / 'r').exists()


def test_nonfinite_run_exits_1_and_its_summary_says_so(tmp_path, capsys):
    err = _err(capsys, ['--method', 'mfm', '--data', 'samples', '--img-size', '32', '--batch-size', '8', '--epoch-size', '16',
                        '--no-progress', '--device', 'cpu', '--out', str(tmp_path), '--lr', '1e12', '--clip-grad', '1e30',
                        '--max-steps', '60', '--log-every', '100', *VIT], code=1)
    assert 'NaN/inf for 20 steps in a row' in err
    assert json.loads((tmp_path / 'summary.json').read_text())['status'] == 'stopped: non-finite loss'
    assert (tmp_path / 'checkpoints' / 'last.pt').exists()


def test_all_corrupt_image_folder_is_a_clear_error_and_leaves_no_run_folder(tmp_path, capsys):
    (tmp_path / 'imgs' / 'a').mkdir(parents=True)
    for n in ('x.jpg', 'y.png'): (tmp_path / 'imgs' / 'a' / n).write_bytes(b'not an image')
    err = _err(capsys, ['--method', 'mfm', '--data', str(tmp_path / 'imgs'), '--img-size', '32', '--batch-size', '2',
                        '--num-workers', '0', '--no-progress', '--device', 'cpu', '--max-steps', '1',
                        '--out', str(tmp_path / 'run'), *VIT])
    assert 'every one of the 2 images' in err and 'corrupt' in err
    assert not (tmp_path / 'run').exists()


def test_exit_status_is_nonzero_when_the_run_did_not_finish(monkeypatch):
    import folk_nb.cli as cli
    for status, code in [('finished', 0), ('stopped by SIGTERM', 143), ('stopped by SIGINT', 130), ('stopped: non-finite loss', 1)]:
        monkeypatch.setattr(cli, 'main', lambda argv=None, s=status: {'status': s})
        assert cli.pretrain_command() == code


def test_console_script_exits_143_on_sigterm(tmp_path):
    import signal, time
    exe = Path(sys.executable).parent / 'folk_nb_pretrain'
    argv = ['--method', 'mfm', '--data', 'samples', '--img-size', '32', '--batch-size', '8', '--epoch-size', '16',
            '--max-steps', '100000', '--out', str(tmp_path), '--no-progress', '--device', 'cpu', '--log-every', '1', *TINY['mfm']]
    p = subprocess.Popen([str(exe), *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (tmp_path / 'log.csv').exists() and time.time() - t0 < 240: time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert json.loads((tmp_path / 'summary.json').read_text())['status'] == 'stopped by SIGTERM'


def test_help_states_each_default_once_and_documents_every_option(capsys):
    from folk_nb.cli import build_parser
    p = build_parser(); h = p.format_help(); fmt = p._get_formatter()
    assert '(default: None)' not in h and '(default: 32 for cifar10' in h
    for act in p._actions:
        assert (fmt._get_help_string(act) or '').count('(default:') <= 1, act.option_strings   # stated once
    for opt in ('--epochs', '--base-lr', '--min-lr', '--weight-decay', '--clip-grad', '--seed', '--deterministic', '--log-every'):
        act = next(a for a in build_parser()._actions if opt in a.option_strings)
        assert act.help, opt


def test_knn_monitor_on_data_without_test_split_says_so(tmp_path, capsys):
    run('mfm', tmp_path, '--max-steps', '2', '--knn-every', '1', '--batch-size', '8', '--epoch-size', '16')
    assert 'no test split' in capsys.readouterr().out


def test_an_imagenet_style_folder_trains_with_its_val_split_as_knn_test_set(tmp_path, capsys):
    "root/train + root/val: MoCo trains on train/ with the colour drawn by the loader, the kNN monitor classifies val/."
    from PIL import Image
    from folk_nb.images import sample_images, to_uint8_image
    root = tmp_path / 'imagenet'
    for split, n in (('train', 8), ('val', 4)):
        for i, img in enumerate(sample_images(size=40)[:n]):
            (root / split / f'c{i % 2}').mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_uint8_image(img)).save(root / split / f'c{i % 2}' / f'{i}.jpg')
    out = tmp_path / 'run'
    argv = ['--method', 'moco', '--data', str(root), '--img-size', '32', '--batch-size', '4', '--max-steps', '2',
            '--out', str(out), '--no-progress', '--device', 'cpu', '--num-workers', '0', '--knn-every', '1',
            '--color-on-device', 'on', *TINY['moco']]
    s = main(argv)
    assert s['status'] == 'finished' and s['steps'] == 2 and 0 <= s['knn_top1'] <= 1
    assert 'no test split' not in capsys.readouterr().out
    rows = (out / 'eval.csv').read_text().splitlines()
    assert rows[0].startswith('step') and len(rows) == 2           # one kNN evaluation, after the one epoch


def test_speed_switches_reach_the_trainer_and_the_loader(tmp_path):
    "--channels-last / --sync-free / --fused-augment on: stored in the run's config, and the runs train."
    s = run('moco', tmp_path, '--max-steps', '2', '--model', 'resnet18', '--cifar-stem', '--optimizer', 'sgd',
            '--method-args', '{"queue_size": 16}', '--channels-last', 'on', '--sync-free', 'on', '--fused-augment', 'on')
    assert s['steps'] == 2
    cfg = json.loads((tmp_path / 'config.json').read_text())['train_config']
    assert cfg['channels_last'] is True and cfg['sync_free'] is True
    args = json.loads((tmp_path / 'args.json').read_text())
    assert args['fused_augment'] == 'on'
    from folk_nb.cli import build_loader
    assert build_loader({**args, 'data': 'samples', 'epoch_size': 16, 'batch_size': 8}, 'moco', device='cpu').fused_augment is True
    assert build_loader({**args, 'data': 'samples', 'epoch_size': 16, 'batch_size': 8, 'fused_augment': 'auto'}, 'moco',
                        device='cpu').fused_augment is False                    # auto on the CPU


def test_weight_decay_on_reaches_the_trainer_and_a_resume_must_keep_it(tmp_path, capsys):
    s = run('moco', tmp_path, '--max-steps', '1', '--optimizer', 'sgd', '--weight-decay-on', 'all')
    assert s['steps'] == 1 and json.loads((tmp_path / 'args.json').read_text())['weight_decay_on'] == 'all'
    ckpt = load_checkpoint(tmp_path / 'checkpoints' / 'last.pt')
    assert ckpt['train_config']['weight_decay_on'] == 'all' and len(ckpt['optimizer']['param_groups']) == 1
    with pytest.raises(SystemExit):
        run('moco', tmp_path, '--max-steps', '2', '--optimizer', 'sgd', '--resume')   # default 'weights' differs
    assert "{'weight_decay_on': ('all', 'weights')}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run('moco', tmp_path / 'bad', '--weight-decay-on', 'biases')
    assert "invalid choice: 'biases'" in capsys.readouterr().err


def test_crop_scale_reaches_the_loader_and_the_crops(tmp_path, capsys):
    "--crop-scale MIN: stored in args.json, every view's ViewSpec crops down to MIN, and the drawn crop boxes do."
    s = run('moco', tmp_path, '--max-steps', '2', '--crop-scale', '0.08')
    assert s['steps'] == 2
    args = json.loads((tmp_path / 'args.json').read_text())
    assert args['crop_scale'] == 0.08
    from folk_nb.cli import build_loader

    def crop_areas(crop_scale):
        loader = build_loader({**args, 'crop_scale': crop_scale, 'epoch_size': 128, 'batch_size': 32}, 'moco', device='cpu')
        areas = torch.cat([(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for batch in loader for b in batch['boxes']])
        return loader, areas

    loader, areas = crop_areas(0.08)
    assert [v.scale for v in loader.specs] == [(0.08, 1.0)] * 2
    assert len(areas) == 256 and areas.min() >= 0.08 - 0.02 and areas.min() < 0.2    # P(no crop < 0.2) ~ 1e-15
    loader, areas = crop_areas(None)                                                   # the recipe's own: 0.2
    assert [v.scale for v in loader.specs] == [(0.2, 1.0)] * 2 and areas.min() >= 0.2 - 0.02
    with pytest.raises(SystemExit):
        main(['--method', 'moco', '--crop-scale', '0', '--out', str(tmp_path / 'bad')])
    assert '--crop-scale must be a fraction of the image area in (0, 1], got 0.0' in capsys.readouterr().err
