"The trainer: exact resume, DDP equivalence, crash-safe checkpoints, signals, the non-finite guard."
import dataclasses, json, math, os, signal, subprocess, sys, time, random
from pathlib import Path
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / 'scripts'))
from toy import NoisyToy, FixedLoader  # noqa: E402
from folk_nb.trainer import (Trainer, TrainConfig, load_checkpoint, atomic_save, CHECKPOINT_FORMAT, CSVLog,  # noqa: E402
                             NonFiniteLossError, cosine_lr)
from folk_nb.checks import SYNC_OPS  # noqa: E402
from aten_ops import AtenOps  # noqa: E402

SCRIPTS = Path(__file__).parent / 'scripts'


def config(tmp_path, **kw):
    base = dict(epochs=4, lr=5e-3, warmup_steps=2, out_dir=str(tmp_path), progress=False, log_every=1, deterministic=True)
    return TrainConfig(**{**base, **kw})


def params(m):
    return [p.detach().clone() for p in m.parameters()]


def test_resume_mid_epoch_gives_identical_parameters(tmp_path):
    """N steps straight == N/2 steps, checkpoint, a fresh process-like trainer resumes, N/2 more (dropout + noise
    use the global RNG, so RNG states must be restored; the pause is mid-epoch, so the data position must be too)."""
    torch.manual_seed(0); straight = NoisyToy()
    Trainer(straight, FixedLoader(), config(tmp_path / 'a')).fit()
    torch.manual_seed(0); first = NoisyToy()
    t1 = Trainer(first, FixedLoader(), config(tmp_path / 'b'))
    s = t1.fit(stop_at=6)                                    # 4 batches per epoch: step 6 is mid-epoch 1
    assert s['status'] == 'paused' and s['steps'] == 6
    torch.manual_seed(123); torch.rand(10)                   # a new process would have other RNG states
    resumed = NoisyToy()
    summary = Trainer(resumed, FixedLoader(), config(tmp_path / 'b')).resume().fit()
    assert summary['steps'] == 16 and summary['status'] == 'finished'
    for a, b in zip(params(straight), params(resumed)):
        assert torch.equal(a, b)
    assert torch.equal(straight.steps_seen, resumed.steps_seen)   # buffers restored too
    steps = [int(r['step']) for r in CSVLog(tmp_path / 'b' / 'log.csv').rows()]
    assert steps == list(range(1, 17))                        # the log holds every step once


def test_sigterm_saves_and_resume_finishes_identically(tmp_path):
    torch.manual_seed(0); straight = NoisyToy()
    Trainer(straight, FixedLoader(), config(tmp_path / 'a')).fit()
    torch.manual_seed(0); stopped = NoisyToy(signal_at=5)
    s = Trainer(stopped, FixedLoader(), config(tmp_path / 'b')).fit()
    assert s['status'] == 'stopped by SIGTERM' and s['steps'] == 6
    ckpt = load_checkpoint(tmp_path / 'b' / 'checkpoints' / 'last.pt')
    assert ckpt['step'] == 6 and ckpt['batch_in_epoch'] == 2
    resumed = NoisyToy(signal_at=5)                           # same config (the signal step is past)
    Trainer(resumed, FixedLoader(), config(tmp_path / 'b')).resume().fit()
    for a, b in zip(params(straight), params(resumed)):
        assert torch.equal(a, b)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored


@pytest.mark.parametrize('mode', ['host_checked', 'sync_free'])
def test_ddp_two_gloo_processes_match_one_process_on_the_combined_batch(tmp_path, mode):
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    for n, out in ((1, tmp_path / 'single'), (2, tmp_path / 'ddp')):
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}',
               str(SCRIPTS / 'ddp_step.py'), str(out), '3', mode]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    a = load_checkpoint(tmp_path / 'single' / 'checkpoints' / 'last.pt')
    b = load_checkpoint(tmp_path / 'ddp' / 'checkpoints' / 'last.pt')
    assert a['world_size'] == 1 and b['world_size'] == 2 and a['step'] == b['step'] == 3
    for k in a['model']:
        if a['model'][k].is_floating_point():
            torch.testing.assert_close(a['model'][k], b['model'][k], atol=1e-6, rtol=1e-5)
    assert not torch.equal(a['model']['backbone.0.weight'], torch.zeros(1))
    assert len(b['rng']) == 2                                # every rank's RNG state is saved


def test_sigkill_during_saves_never_corrupts_the_latest_checkpoint(tmp_path):
    path = tmp_path / 'last.pt'
    rng = random.Random(0)
    for trial in range(12):
        p = subprocess.Popen([sys.executable, str(SCRIPTS / 'save_loop.py'), str(path)], stdout=subprocess.PIPE, text=True)
        p.stdout.readline()                                   # at least one complete save
        time.sleep(rng.uniform(0.0, 0.4))                     # then kill it at a random moment, mostly mid-save
        p.kill(); p.wait()
        ckpt = load_checkpoint(path)
        assert abs(float(ckpt['w'].double().sum()) - ckpt['sum']) < 1e-6 * max(1.0, abs(ckpt['sum']))
    assert [q.name for q in tmp_path.iterdir() if q.suffix == '.pt'] == ['last.pt']


@pytest.mark.parametrize('sync_free', [False, True])
def test_nonfinite_losses_are_skipped_and_counted(tmp_path, sync_free):
    torch.manual_seed(0); m = NoisyToy(nan_steps=[2, 3])
    t = Trainer(m, FixedLoader(), config(tmp_path, epochs=2, sync_free=sync_free, log_every=3))
    before = {}

    def snapshot(step, total, _orig=m.schedule):
        if step in (2, 4): before[step] = params(m)
        return _orig(step, total)
    m.schedule = snapshot
    s = t.fit()
    assert s['nonfinite_steps'] == 2 and s['steps'] == 8
    for a, b in zip(before[2], before[4]):                    # steps 2 and 3 changed nothing
        assert torch.equal(a, b)


def test_persistent_nonfinite_loss_stops_with_clear_message_and_checkpoint(tmp_path):
    m = NoisyToy(nan_steps=list(range(100)))
    with pytest.raises(NonFiniteLossError, match='NaN/inf for 3 steps in a row'):
        Trainer(m, FixedLoader(), config(tmp_path, max_nonfinite=3)).fit()
    assert (tmp_path / 'checkpoints' / 'last.pt').exists()


def test_sync_free_nonfinite_run_stops_at_the_next_log_step_with_the_count_and_a_checkpoint(tmp_path):
    "After one good step, NaN losses are skipped on the device; the host sees them at the log step (every 4 steps)."
    m = NoisyToy(nan_steps=list(range(1, 100)))
    t = Trainer(m, FixedLoader(), config(tmp_path, epochs=4, max_nonfinite=5, log_every=4, sync_free=True))
    before = params(m)
    with pytest.raises(NonFiniteLossError, match='NaN/inf for 7 steps in a row'):   # 3 < 5 read at step 4; 7 read at step 8
        t.fit()
    assert t.step == 8 and t.nonfinite_total == 7
    ckpt = load_checkpoint(t.ckpt_path)
    assert ckpt['nonfinite_total'] == 7 and ckpt['step'] == 8
    after_first = [p.detach() for p in m.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after_first))      # step 0 trained
    assert all(torch.isfinite(p).all() for p in m.parameters())                  # the NaN steps never reached them


def test_sync_free_steps_train_as_the_host_checked_ones(tmp_path):
    "Same run, finite losses: the device-side skip changes nothing (fused vs unfused optimiser: float rounding)."
    runs = []
    for sync_free in (False, True):
        torch.manual_seed(0); m = NoisyToy()
        t = Trainer(m, FixedLoader(), config(tmp_path / str(sync_free), epochs=2, sync_free=sync_free))
        assert t.sync_free is sync_free
        t.fit(); runs.append(params(m))
    for a, b in zip(*runs): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='sync_free must be True, False or None'): TrainConfig(sync_free='on')


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    Trainer(NoisyToy(width=8), FixedLoader(), config(tmp_path, max_steps=2)).fit()
    with pytest.raises(ValueError, match=r"settings differ .*'width': \(8, 16\)"):
        Trainer(NoisyToy(width=16), FixedLoader(), config(tmp_path)).resume()


class Evil:
    def __reduce__(self):
        return (os.system, ('echo pwned > /dev/null',))


def test_checkpoints_load_with_weights_only(tmp_path):
    torch.save({'format': CHECKPOINT_FORMAT, 'x': Evil()}, tmp_path / 'evil.pt')
    with pytest.raises(ValueError, match='not a readable checkpoint'):
        load_checkpoint(tmp_path / 'evil.pt')
    torch.save({'x': 1}, tmp_path / 'other.pt')
    with pytest.raises(ValueError, match='not a folk_nb checkpoint'):
        load_checkpoint(tmp_path / 'other.pt')
    Trainer(NoisyToy(), FixedLoader(), config(tmp_path, max_steps=1)).fit()
    assert load_checkpoint(tmp_path / 'checkpoints' / 'last.pt')['step'] == 1   # our own pass weights_only


def test_a_path_out_dir_gives_checkpoints_that_load_with_weights_only(tmp_path):
    Trainer(NoisyToy(), FixedLoader(), config(tmp_path, max_steps=1, out_dir=tmp_path / 'run')).fit()
    ckpt = load_checkpoint(tmp_path / 'run' / 'checkpoints' / 'last.pt')
    assert ckpt['train_config']['out_dir'] == str(tmp_path / 'run')
    Trainer(NoisyToy(), FixedLoader(), config(tmp_path, max_steps=2, out_dir=tmp_path / 'run')).resume().fit()


def test_settings_a_checkpoint_cannot_hold_are_refused_before_any_work(tmp_path):
    toy = NoisyToy()
    toy.config['init'] = torch.nn.init.normal_              # a function: weights_only loading would refuse it
    with pytest.raises(ValueError, match=r"checkpoint\['method_config'\]\['init'\] = .*weights_only=True"):
        Trainer(toy, FixedLoader(), config(tmp_path / 'run', max_steps=1))
    assert not (tmp_path / 'run').exists()


def test_config_json_and_summary_are_written(tmp_path):
    import json
    s = Trainer(NoisyToy(), FixedLoader(), config(tmp_path, max_steps=3), run_info={'command': 'test'}).fit()
    cfg = json.loads((tmp_path / 'config.json').read_text())
    assert cfg['method'] == 'noisy_toy' and cfg['train_config']['max_steps'] == 3 and cfg['command'] == 'test'
    assert json.loads((tmp_path / 'summary.json').read_text())['steps'] == 3 == s['steps']


def test_run_ending_on_an_epoch_boundary_counts_the_epoch(tmp_path):
    s = Trainer(NoisyToy(), FixedLoader(), config(tmp_path, epochs=2)).fit()     # 4 batches per epoch, 8 steps
    ckpt = load_checkpoint(tmp_path / 'checkpoints' / 'last.pt')
    assert (s['epochs'], ckpt['epoch'], ckpt['batch_in_epoch']) == (2, 2, 0)
    s = Trainer(NoisyToy(), FixedLoader(), config(tmp_path, epochs=3)).resume().fit()   # a longer schedule continues
    assert s['steps'] == 12 and s['epochs'] == 3


def test_sgd_optimizer_is_sgd_with_momentum_and_trains(tmp_path):
    "optimizer='sgd': torch SGD with momentum 0.9 and the schedule's learning rate; the loss falls; bad names are refused."
    torch.manual_seed(0); m = NoisyToy(noise=0.0)
    t = Trainer(m, FixedLoader(), config(tmp_path, optimizer='sgd', lr=0.5, epochs=20, log_every=4))
    assert isinstance(t.optimizer, torch.optim.SGD) and all(g['momentum'] == 0.9 for g in t.optimizer.param_groups)
    t.fit()
    rows = CSVLog(tmp_path / 'log.csv').rows()
    assert float(rows[-1]['loss']) < float(rows[0]['loss']) / 2
    assert float(rows[-1]['lr']) == pytest.approx(t.optimizer.param_groups[0]['lr'])
    with pytest.raises(ValueError, match="optimizer must be 'adamw' or 'sgd'"):
        TrainConfig(optimizer='adam')


class _ZeroLossToy(NoisyToy):
    "A loss with zero gradients everywhere: an SGD step then only applies the weight decay."
    def forward(self, batch):
        out = super().forward(batch)
        return {**out, 'loss': out['loss'] * 0}


@pytest.mark.parametrize('on', ['weights', 'all'])
def test_weight_decay_on_weights_spares_biases_and_all_decays_every_parameter(tmp_path, on):
    torch.manual_seed(0); m = _ZeroLossToy()
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    lr, wd = 0.1, 0.5
    Trainer(m, FixedLoader(), config(tmp_path, optimizer='sgd', lr=lr, weight_decay=wd, weight_decay_on=on,
                                     warmup_steps=0, max_steps=1)).fit()
    for n, p in m.named_parameters():
        decayed = on == 'all' or p.ndim > 1                     # NoisyToy: conv / linear weights (ndim > 1) and biases
        expected = before[n] * (1 - lr * wd) if decayed else before[n]
        assert torch.allclose(p.detach(), expected, atol=1e-7), (n, on)
    assert any(p.ndim == 1 for p in m.parameters())             # the toy has parameters that only 'all' decays


def test_calibration_restores_every_buffer_and_the_data_position(tmp_path):
    "A time-budgeted run's calibration leaves parameters, buffers and RNG untouched: its steps equal a max_steps run's."
    # a constant learning rate (no warm-up, floor = peak): a budgeted run's schedule runs on its clock, a max_steps
    # run's on its steps, and this test is about the state calibration leaves, not the schedule
    flat = dict(warmup_steps=0, min_lr=5e-3, deterministic=False)
    torch.manual_seed(0); a = NoisyToy()
    t = Trainer(a, FixedLoader(), config(tmp_path / 'a', epochs=1000, time_budget_min=0.05, **flat))
    before = params(a)
    cal = t.calibrate(steps=6, warmup=2)
    assert int(a.steps_seen) == 0 and all(torch.equal(x, y) for x, y in zip(before, params(a)))
    n = min(cal['total_steps'], 10)
    t.fit(stop_at=n)
    torch.manual_seed(0); b = NoisyToy()                     # the same run without calibration, same schedule length
    Trainer(b, FixedLoader(), config(tmp_path / 'b', max_steps=cal['total_steps'], **flat)).fit(stop_at=n)
    for x, y in zip(params(a), params(b)): assert torch.equal(x, y)
    assert int(a.steps_seen) == int(b.steps_seen) == n


class _ListLoader:
    "What the trainer needs of a loader, over a fixed list of batches."
    def __init__(self, batches): self.batches, self.batch_size = batches, len(batches[0]['views'][0])
    def __len__(self): return len(self.batches)
    def set_epoch(self, epoch): pass
    def __iter__(self): return iter(self.batches)


def _mfm_and_batches():
    from folk_nb.data import GPUDataLoader, dataset_tensors
    from folk_nb.methods import create_method
    torch.manual_seed(0)
    m = create_method('mfm', model='vit_tiny_patch16_224', img_size=32, patch_size=4,
                      model_kwargs=dict(depth=1, embed_dim=32, num_heads=2))
    t = dataset_tensors('samples', size=32)
    loader = GPUDataLoader(t['images'], t['targets'], views=m.recipe, batch_size=4, epoch_size=12, device='cpu', size=32)
    return m, list(loader)


def _scaled(batch):   # a custom loader that forgot to divide by 255
    return dict(batch, views=[v * 255 for v in batch['views']])


def test_value_checks_first_catches_bad_images_on_the_first_step(tmp_path):
    m, batches = _mfm_and_batches()
    tr = Trainer(m, _ListLoader([_scaled(b) for b in batches]), config(tmp_path, epochs=1, optimizer='sgd'))
    with pytest.raises(ValueError, match=r'must hold un-normalised images in \[0, 1\]'):
        tr.fit()


def test_value_checks_first_checks_only_the_first_step_of_each_fit(tmp_path):
    "The step after the first makes one host sync, the non-finite-loss guard's (SGD on the CPU makes none)."
    from folk_nb.checks import host_syncs, HOST_TO_DEVICE
    m, (b1, b2, b3) = _mfm_and_batches()
    tr = Trainer(m, _ListLoader([b1, _scaled(b2), b3]), config(tmp_path, epochs=2, optimizer='sgd'))
    first = host_syncs(lambda: tr.train_step(b1))
    first.pop(HOST_TO_DEVICE, None)                              # device constants, made once per process
    assert first == {'aten::_local_scalar_dense': 2}             # range check + loss guard
    assert host_syncs(lambda: tr.train_step(b3)) == {'aten::_local_scalar_dense': 1}   # the loss guard only
    tr.train_step(_scaled(b2))                                   # not checked: it goes through
    s = tr.fit(stop_at=2)                                        # a fit's first step checks again: b1 is fine,
    assert s['steps'] == 2                                       # the bad b2 is step 2, not checked
    with pytest.raises(ValueError, match=r'\[0, 1\]'):           # 'always' checks every step
        Trainer(m, _ListLoader([b1, _scaled(b2), b3]), config(tmp_path / 'always', epochs=1, optimizer='sgd',
                                                              value_checks='always')).fit()


def test_value_checks_option_is_validated():
    with pytest.raises(ValueError, match="value_checks must be 'first'"):
        TrainConfig(value_checks='never')


class _SlowingToy(NoisyToy):
    "NoisyToy whose steps take `fast` s, then `slow` s after `after` forward calls; records the schedule positions."
    def __init__(self, after, fast=0.004, slow=0.04):
        super().__init__(); self.after, self.fast, self.slow, self.calls, self.seen = after, fast, slow, 0, []
    def schedule(self, step, total_steps, **kw):
        self.seen.append(step); return super().schedule(step, total_steps)
    def forward(self, batch):
        self.calls += 1; time.sleep(self.fast if self.calls <= self.after else self.slow)
        return super().forward(batch)


def test_time_budget_schedules_run_on_time_and_end_with_the_budget(tmp_path):
    "Steps 10x slower after calibration: far fewer steps than fitted, yet the schedules reach their end with the budget."
    m = _SlowingToy(after=25 + 20)                       # calibration (5 + 20 calls), then 20 steps at calibrated speed
    t = Trainer(m, FixedLoader(), config(tmp_path, epochs=100_000, time_budget_min=0.02, warmup_steps=None, min_lr=0.0,
                                         log_every=10_000, ckpt_every=10 ** 6, deterministic=False))
    s = t.fit()
    pos = m.seen[25:]
    assert s['status'] == 'finished' and s['train_seconds'] >= 1.2
    assert s['steps'] < 0.7 * t.total_steps                                  # the calibrated step count was not reached
    assert pos == sorted(pos) and pos[-1] >= 0.9 * t.total_steps             # but the schedule position was
    assert t.optimizer.param_groups[0]['lr'] == cosine_lr(pos[-1], t.total_steps, t.peak_lr, t.warmup_steps, 0.0)
    assert t.optimizer.param_groups[0]['lr'] < 0.03 * t.peak_lr


def test_time_budget_capped_by_epochs_follows_the_steps(tmp_path):
    "A budget larger than the run needs: the schedule is the epochs' and follows the step count, status 'finished'."
    m = _SlowingToy(after=10 ** 9, fast=0.0)
    t = Trainer(m, FixedLoader(), config(tmp_path, epochs=2, time_budget_min=5.0, deterministic=False))
    s = t.fit()
    assert t.calibration['capped'] and not t.timed_schedule
    assert m.seen[25:] == list(range(t.total_steps)) and s['steps'] == t.total_steps and s['status'] == 'finished'


def test_compile_mode_reaches_torch_compile(tmp_path, monkeypatch):
    "TrainConfig.compile: True -> torch.compile's default mode, a mode name -> that mode; other values are refused."
    seen = []
    monkeypatch.setattr(torch, 'compile', lambda model, mode=None: seen.append(mode) or model)
    for compile, mode in ((True, None), ('max-autotune', 'max-autotune'), ('reduce-overhead', 'reduce-overhead')):
        Trainer(NoisyToy(), FixedLoader(), config(tmp_path, compile=compile))
        assert seen[-1] == mode
    Trainer(NoisyToy(), FixedLoader(), config(tmp_path, compile=False))
    assert len(seen) == 3
    with pytest.raises(ValueError, match='compile must be True, False or a torch.compile mode'):
        config(tmp_path, compile='fastest')


class _SharedOutputToy(NoisyToy):
    "Returns one output in the same memory every step, as a CUDA-graph replay writes where the last one did."
    def __init__(self, **kw):
        super().__init__(**kw); self.events = []
        self.register_buffer('out_memory', torch.zeros(()))

    def forward(self, batch):
        self.events.append('forward')
        out = super().forward(batch)
        self.out_memory.copy_(out['loss_mse'])
        return {**out, 'replayed': self.out_memory}


@pytest.mark.parametrize('sync_free', [False, True])
def test_cuda_graph_steps_are_marked_and_last_out_survives_the_next_replay(tmp_path, monkeypatch, sync_free):
    """With a CUDA-graph compile mode every train_step (a skipped non-finite one too) first marks a new step, and
    `last_out` is a copy the next replay cannot overwrite; without one, nothing is marked or copied."""
    torch.manual_seed(0)
    m = _SharedOutputToy(nan_steps=[2])
    events = m.events
    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', lambda: events.append('mark'))
    t = Trainer(m, FixedLoader(), config(tmp_path / 'graphs', epochs=2, sync_free=sync_free))
    assert t.cuda_graphs is False                            # CPU: no graphs to replay
    t.cuda_graphs = True                                     # what a CUDA device with compile='reduce-overhead' sets
    t.fit()
    assert events == ['mark', 'forward'] * 8                 # 8 steps, step 2's loss NaN: skipped, still marked
    kept = t.last_out['replayed']
    assert kept.item() == m.out_memory.item() and kept.data_ptr() != m.out_memory.data_ptr()
    m.out_memory.fill_(-1.0)                                 # the next replay writes the output's memory ...
    assert kept.item() != -1.0 and torch.equal(kept, t.last_out['loss_mse'])   # ... the kept copy holds step 8's value
    events.clear()
    plain = Trainer(m, FixedLoader(), config(tmp_path / 'plain', epochs=1))     # no graphs: the outputs as returned
    plain.fit()
    assert 'mark' not in events and plain.last_out['replayed'] is m.out_memory


def test_cuda_graph_modes_replay_no_graphs_on_the_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, 'compile', lambda model, mode=None: model)
    assert Trainer(NoisyToy(), FixedLoader(), config(tmp_path, compile='reduce-overhead')).cuda_graphs is False  # CPU


class _EpochLengthToy(NoisyToy):
    def __init__(self): super().__init__(); self.calls = []
    def schedule(self, step, total_steps, steps_per_epoch=None):
        self.calls.append(steps_per_epoch); return super().schedule(step, total_steps)


class _TwoArgumentToy(NoisyToy):
    "A method written before schedule() took the epoch length."
    def __init__(self): super().__init__(); self.calls = 0
    def schedule(self, step, total_steps):
        self.calls += 1; return super().schedule(step, total_steps)


def test_schedule_gets_the_epoch_length_and_two_argument_methods_still_work(tmp_path):
    a, b = _EpochLengthToy(), _TwoArgumentToy()
    for m, out in ((a, 'a'), (b, 'b')): Trainer(m, FixedLoader(), config(tmp_path / out, epochs=2)).fit()
    assert a.calls == [len(FixedLoader())] * (2 * len(FixedLoader()))
    assert b.calls == 2 * len(FixedLoader())


def test_ddp_time_budget_every_process_stops_at_the_same_step(tmp_path):
    "Under DDP with a time budget every process follows the slowest clock: same steps, same seconds, no hang, few syncs."
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(SCRIPTS / 'ddp_budget.py'), str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((tmp_path / f'rank{i}.json').read_text()) for i in (0, 1))
    assert a == b and a['status'] == 'finished' and a['train_seconds'] >= 1.8 and a['steps'] > 1
    # the clock is agreed every CLOCK_SYNC_EVERY steps, not every step (each agreement waits for the device)
    from folk_nb.trainer import CLOCK_SYNC_EVERY
    assert a['steps'] > 2 * CLOCK_SYNC_EVERY, a                       # so the extrapolation between them ran
    assert a['clock_syncs'] == math.ceil(a['steps'] / CLOCK_SYNC_EVERY), a


def test_resume_refuses_other_optimisation_settings_and_says_what_differs(tmp_path):
    Trainer(NoisyToy(), FixedLoader(), config(tmp_path, max_steps=2)).fit()
    with pytest.raises(ValueError) as e:
        Trainer(NoisyToy(), FixedLoader(), config(tmp_path, lr=1.0, seed=5, weight_decay=0.0)).resume()
    msg = str(e.value)
    assert "'lr': (0.005, 1.0)" in msg and "'seed': (0, 5)" in msg and "'weight_decay': (0.05, 0.0)" in msg
    assert '--out' in msg and 'method' not in msg.split('(checkpoint')[0]          # no contradictory method sentence
    with pytest.raises(ValueError, match=r"'global_batch': \(8, 16\)"):
        Trainer(NoisyToy(), FixedLoader(batch_size=16), config(tmp_path)).resume()
    t = Trainer(NoisyToy(), FixedLoader(), config(tmp_path, max_steps=3, log_every=5, ckpt_every=1, value_checks='always')).resume()
    assert t.fit()['steps'] == 3                                # length and cadence may change on resume


def test_resume_of_a_checkpoint_without_global_batch_skips_that_check(tmp_path):
    Trainer(NoisyToy(), FixedLoader(), config(tmp_path, max_steps=2)).fit()
    p = tmp_path / 'checkpoints' / 'last.pt'
    ck = load_checkpoint(p); del ck['global_batch']; atomic_save(ck, p)
    Trainer(NoisyToy(), FixedLoader(batch_size=16), config(tmp_path)).resume()


def test_method_settings_differ_message_names_only_the_difference(tmp_path):
    Trainer(NoisyToy(width=8), FixedLoader(), config(tmp_path, max_steps=2)).fit()
    with pytest.raises(ValueError) as e:
        Trainer(NoisyToy(width=16), FixedLoader(), config(tmp_path)).resume()
    assert "'width': (8, 16)" in str(e.value) and 'this run is' not in str(e.value)


@pytest.mark.parametrize('sync_free', [False, True])
def test_persistent_nonfinite_loss_writes_a_summary_saying_so(tmp_path, sync_free):
    with pytest.raises(NonFiniteLossError):
        Trainer(NoisyToy(nan_steps=list(range(100))), FixedLoader(), config(tmp_path, max_nonfinite=3, sync_free=sync_free)).fit()
    s = json.loads((tmp_path / 'summary.json').read_text())
    assert s['status'] == 'stopped: non-finite loss' and s['nonfinite_steps'] == 3


@pytest.mark.parametrize('kw,msg', [(dict(warmup_steps=-1), 'warmup_steps must be >= 0'),
                                    (dict(weight_decay=-0.1), 'weight_decay must be >= 0'),
                                    (dict(lr=1e-3, min_lr=1e-2), 'must not exceed the peak learning rate'),
                                    (dict(knn_every=-1), 'knn_every must be >= 0'),
                                    (dict(log_every=0), 'log_every must be >= 1'),
                                    (dict(ckpt_every=0), 'ckpt_every must be >= 1')])
def test_out_of_range_settings_are_refused(kw, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**kw)


def test_min_lr_above_the_base_lr_peak_is_refused(tmp_path):
    cfg = TrainConfig(base_lr=1e-4, min_lr=1e-3, out_dir=str(tmp_path), progress=False)   # peak = 1e-4 * 8 / 512
    with pytest.raises(ValueError, match='must not exceed the peak learning rate'):
        Trainer(NoisyToy(), FixedLoader(), cfg)


def test_channels_last_cnn_trains_the_same_and_its_checkpoint_loads_either_way(tmp_path):
    "channels_last changes strides only: the same step gives the same parameters, and checkpoints cross layouts."
    from folk_nb.methods import create_method
    from folk_nb.data import GPUDataLoader
    imgs = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    runs = {}
    for layout in (False, True):
        torch.manual_seed(0)
        m = create_method('moco', model='resnet18', img_size=32, queue_size=16, out_dim=8, cifar_stem=True)
        t = Trainer(m, GPUDataLoader(imgs, views='moco', batch_size=8, seed=0),
                    config(tmp_path / str(layout), optimizer='sgd', lr=0.1, epochs=1, channels_last=layout))
        conv = next(w for w in m.parameters() if w.ndim == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last) == layout and conv.is_contiguous() != layout
        t.fit()
        runs[layout] = t
    for a, b in zip(runs[False].method.parameters(), runs[True].method.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.equal(params(runs[True].method)[0], params(create_method('moco', model='resnet18', img_size=32,
                           queue_size=16, out_dim=8, cifar_stem=True))[0])          # it did train
    ckpt = load_checkpoint(runs[True].ckpt_path)                                    # NHWC weights into an NCHW model
    fresh = create_method('moco', model='resnet18', img_size=32, queue_size=16, out_dim=8, cifar_stem=True)
    fresh.load_state_dict(ckpt['model'])
    for a, b in zip(fresh.parameters(), runs[True].method.parameters()): assert torch.equal(a, b)


def test_channels_last_defaults_to_cnns_on_cuda_only(tmp_path):
    from folk_nb.methods import create_method
    m = create_method('moco', model='resnet18', img_size=32, queue_size=16, out_dim=8, cifar_stem=True)
    t = Trainer(m, FixedLoader(), config(tmp_path))                 # CPU: left as it is
    assert t.channels_last is False and all(w.is_contiguous() for w in m.parameters())
    with pytest.raises(ValueError, match='channels_last must be True, False or None'): TrainConfig(channels_last='yes')


# what reads a device value on the host (the library's SYNC_OPS) or makes a tensor from Python numbers (lift_fresh)
HOST_WAITS = {n.split('::')[1] for n in SYNC_OPS} | {'is_nonzero', 'equal', 'lift_fresh'}


LOOP_METHODS = {
    'moco': dict(model='test_resnet', img_size=32, cifar_stem=True, queue_size=16),
    'saliency_moco': dict(model='test_resnet', img_size=32, cifar_stem=True, queue_size=16),
    'saliency_moco:warped_key': dict(model='test_resnet', img_size=32, cifar_stem=True, queue_size=16,
                                     saliency='warped_key'),
    'mae': dict(model='vit_tiny_patch16_224', img_size=32, patch_size=4, model_kwargs={'depth': 1}),
    'mfm': dict(model='vit_tiny_patch16_224', img_size=32, patch_size=4, model_kwargs={'depth': 1}),
    'folk': dict(model='vit_tiny_patch16_224', img_size=32, patch_size=4, model_kwargs={'depth': 1}, out_dim=64),
}


@pytest.mark.parametrize('name', list(LOOP_METHODS))
def test_the_training_loop_on_the_device_path_never_waits_for_the_device(name, tmp_path, monkeypatch):
    """Loader + step + loop, as on a GPU (sync-free steps, the loader's whole-batch path): after the first step (value
    checks, the host-side loss guard), no step reads a value on the host or copies Python numbers to the device, until
    the last one (its log row). On a GPU each of those would stall the queue. (FAMT's refresh windows make their two
    documented syncs: tests/test_checks.py.)"""
    import functools
    from folk_nb import data as D
    from folk_nb.methods import create_method
    monkeypatch.setattr(D, 'augment_batch', functools.partial(D.augment_batch, subset=False))
    torch.manual_seed(0)
    m = create_method(name.split(':')[0], **LOOP_METHODS[name])
    loader = D.create_loader('samples', recipe=m.recipe, size=32, batch_size=8, device='cpu', epoch_size=32)
    t = Trainer(m, loader, TrainConfig(epochs=2, lr=1e-3, out_dir=str(tmp_path), progress=False, log_every=1000,
                                       ckpt_every=10 ** 9, sync_free=True))
    with AtenOps(tag=lambda: t.step) as ops: t.fit()
    waits = [(s, op) for s, op in ops.seen if op in HOST_WAITS]
    assert t.step == 8
    assert [(s, op) for s, op in waits if 1 <= s < t.step - 1] == []
    assert any(s == 0 for s, _ in waits)                 # the detector sees the first step's checks
