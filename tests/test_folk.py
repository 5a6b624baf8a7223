"FOLK (folk_nb.folk): who sees what, gradients, EMA, schedules, centering and the cross-view loss, checked by hand."
import dataclasses
import copy
import json
import math

import numpy as np
import pytest
import torch

from folk_nb.folk import FOLK, swapped_distillation_loss, update_center, teacher_temperature
from folk_nb.methods import create_method
from folk_nb.models import normalize_images
import reference as ref

HEAD = dict(out_dim=256, head_hidden_dim=64, head_bottleneck_dim=32)
TINY_VIT = dict(model='vit_tiny_patch16_224', img_size=32, patch_size=8,
                model_kwargs=dict(depth=1, embed_dim=64, num_heads=2), **HEAD)
SMALL_CNN = dict(model='resnet18', img_size=32, cifar_stem=True, model_kwargs=dict(channels=[16, 32, 64, 128]), **HEAD)


def images(b=4, size=32, seed=0):
    "Smooth-ish random images in [0, 1]."
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size + 2, size + 2, generator=g)
    return (x[..., :-2, :-2] + x[..., 1:-1, 1:-1] + x[..., 2:, 2:]) / 3


def two_views(b=4, seed=0):
    "Two different views: u from one set of images, v another (so swapping them matters)."
    return images(b, seed=seed), images(b, seed=seed + 100)


def record(module, pre=True):
    "Record a module's input (pre=True) or output on every call."
    seen = []
    if pre: h = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    else: h = module.register_forward_hook(lambda mod, args, out: seen.append(out.detach().clone()))
    return seen, h


def first_layer(backbone):
    return backbone.model.patch_embed if backbone.kind == 'vit' else backbone.model.conv1


# ------------------------------------------------------------------ who sees what
@pytest.mark.parametrize('config', ['vit', 'cnn', 'vit_mfm_mask'])
def test_teacher_sees_originals_and_student_only_filtered_views(config):
    kw = dict(TINY_VIT) if config.startswith('vit') else dict(SMALL_CNN)
    if config == 'vit_mfm_mask': kw['mask'] = 'mfm'
    torch.manual_seed(0)
    m = FOLK(**kw)
    u, v = two_views()
    student_in, h1 = record(first_layer(m.backbone))
    teacher_in, h2 = record(first_layer(m.teacher.backbone))
    out = m({'views': [u, v]})
    h1.remove(); h2.remove()
    assert len(student_in) == 1 and len(teacher_in) == 1                     # one pass each, both views batched
    # the teacher got exactly the normalised originals [u; v]
    torch.testing.assert_close(teacher_in[0], normalize_images(torch.cat([u, v])), rtol=0, atol=0)
    # the student got exactly the normalised filtered views [u~; v~] ...
    torch.testing.assert_close(student_in[0], normalize_images(torch.cat([out['input'], out['input_v']])), rtol=0, atol=0)
    # ... and those are the filters of u and v with the returned keep-masks (independent numpy filter)
    for x, x_f, keep in ((u, out['input'], out['keep']), (v, out['input_v'], out['keep_v'])):
        assert (~keep).any(dim=(1, 2, 3)).all()                              # every image lost some frequencies
        for i in range(len(x)):
            np.testing.assert_allclose(x_f[i].numpy(), ref.filter_image(x[i].numpy(), keep[i, 0].numpy()), atol=2e-5)
        assert not torch.allclose(x_f, x, atol=1e-3)
    if config == 'vit_mfm_mask':                                             # MFM discs instead of Com / RCom
        disc = torch.from_numpy(ref.disc(32, 32, 16 * 32 / 224))
        for k in torch.cat([out['keep'], out['keep_v']])[:, 0]: assert torch.equal(k, disc) or torch.equal(k, ~disc)


@pytest.mark.parametrize('thresholds_size, scale', [(224, 224 / 32), (None, 1.0), (64, 2.0)])
def test_folk_masks_are_com_or_rcom_at_one_of_the_thresholds_scaled_to_the_image_size(thresholds_size, scale):
    # 32 px views: the thresholds are stated for `thresholds_size` px images (None: as given), so they scale by it / 32
    torch.manual_seed(0)
    m = FOLK(**TINY_VIT, thresholds_size=thresholds_size)
    u, v = two_views(6)
    assert u.shape[-2:] == (32, 32)
    out = m({'views': [u, v]})
    used = []
    for x, keep in ((u, out['keep']), (v, out['keep_v'])):
        for i in range(len(x)):
            found = [t for t in (0.005, 0.01, 0.05) for com in [ref.com(x[i].numpy(), min(1.0, t * scale))[0]]
                     if np.array_equal(keep[i, 0].numpy(), com) or np.array_equal(keep[i, 0].numpy(), ~com)]
            assert found, i
            used += found
    assert len(set(used)) > 1                      # the thresholds are drawn per image


# ------------------------------------------------------------------ gradients
def test_gradients_reach_the_student_and_never_the_teacher():
    torch.manual_seed(0)
    m = FOLK(**TINY_VIT)
    m({'views': list(two_views())})['loss'].backward()
    for n, p in m.teacher.named_parameters():
        assert not p.requires_grad and p.grad is None, n
    for part in (m.backbone, m.projector, m.mfm_head):
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert m.backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert m.projector.mlp[0].weight.grad.abs().sum() > 0
    assert m.projector.last_layer.parametrizations.weight.original1.grad.abs().sum() > 0
    assert m.mfm_head.proj.weight.grad.abs().sum() > 0
    # the optimiser never sees the teacher
    in_groups = {id(p) for g in m.param_groups(0.05) for p in g['params']}
    assert not in_groups & {id(p) for p in m.teacher.parameters()}


def test_distill_weight_zero_leaves_the_projector_without_signal():
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        m = FOLK(**TINY_VIT, distill_weight=weight)
        m({'views': list(two_views())})['loss'].backward()
        g = m.projector.mlp[0].weight.grad
        assert (g.abs().sum() > 0) == (weight > 0)
        assert m.mfm_head.proj.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------ EMA and schedules
@pytest.mark.parametrize('kind', ['vit', 'cnn'])
def test_ema_update_matches_its_formula(kind):
    torch.manual_seed(0)
    m = FOLK(**(TINY_VIT if kind == 'vit' else SMALL_CNN))
    opt = torch.optim.AdamW(m.param_groups(0.0), lr=1e-2)
    sched = m.schedule(30, 100)
    mom = sched['momentum']
    assert 0.996 < mom < 1
    m({'views': list(two_views())})['loss'].backward()
    teacher_before = {n: t.detach().clone() for n, t in m.teacher.state_dict().items()}
    opt.step()
    m.after_optimizer_step()
    student = {**{f'backbone.{k}': v for k, v in m.backbone.state_dict().items()},
               **{f'projector.{k}': v for k, v in m.projector.state_dict().items()}}
    changed = 0
    for n, t in m.teacher.state_dict().items():
        s = student[n]
        if t.is_floating_point():
            want = mom * teacher_before[n] + (1 - mom) * s
            torch.testing.assert_close(t, want, rtol=1e-6, atol=1e-7, msg=n)
            changed += not torch.equal(t, teacher_before[n])
        else:
            assert torch.equal(t, s), n                                       # integer buffers are copied
    assert changed > 0


def test_teacher_starts_as_a_copy_of_the_student():
    torch.manual_seed(0)
    m = FOLK(**TINY_VIT)
    for n, t in m.teacher.backbone.state_dict().items(): assert torch.equal(t, m.backbone.state_dict()[n]), n
    for n, t in m.teacher.projector.state_dict().items(): assert torch.equal(t, m.projector.state_dict()[n]), n


def test_schedules_at_start_middle_and_end():
    m = FOLK(**TINY_VIT)
    total = 1000
    for step, temp, mom in [(0, 0.04, 0.996), (150, 0.055, None), (300, 0.07, None), (500, 0.07, 0.998),
                            (999, 0.07, None), (1000, 0.07, 1.0)]:
        got = m.schedule(step, total)
        want_mom = 1.0 - 0.004 * (1 + math.cos(math.pi * step / total)) / 2          # cosine 0.996 -> 1
        assert got['teacher_temp'] == pytest.approx(temp, abs=1e-12)
        assert got['momentum'] == pytest.approx(want_mom, abs=1e-12)
        if mom is not None: assert got['momentum'] == pytest.approx(mom, abs=1e-12)
        assert m.teacher_temp == got['teacher_temp'] and m.momentum == got['momentum']
    assert FOLK(**TINY_VIT, teacher_temp_warmup=0.0).schedule(0, 10)['teacher_temp'] == pytest.approx(0.07)
    assert teacher_temperature(5, 10, 0.04, 0.07, 1.0) == pytest.approx(0.055)
    with pytest.raises(ValueError, match='total_steps'): teacher_temperature(0, 0)


# ------------------------------------------------------------------ centering and the cross-view loss
def hand_ce(t_logits, s_logits, center, t_temp, s_temp):
    "Mean over images of -sum_k softmax((t - c)/t_temp)_k * log softmax(s / s_temp)_k, per image in float64 numpy."
    total = 0.0
    for t, s in zip(t_logits.double().numpy(), s_logits.double().numpy()):
        p = np.exp((t - center) / t_temp - np.max((t - center) / t_temp)); p /= p.sum()
        z = s / s_temp
        log_q = z - (np.max(z) + np.log(np.exp(z - np.max(z)).sum()))
        total += -(p * log_q).sum()
    return total / len(t_logits)


@pytest.mark.parametrize('kind', ['vit', 'cnn'])
def test_cross_view_pairing_and_centering_by_hand(kind):
    torch.manual_seed(0)
    m = FOLK(**(TINY_VIT if kind == 'vit' else SMALL_CNN), distill_weight=0.5, center_momentum=0.8)
    m.schedule(100, 1000)                                                     # teacher temperature mid-warm-up
    t_temp = m.teacher_temp
    assert 0.04 < t_temp < 0.07
    with torch.no_grad(): m.center.normal_(0, 0.1)                           # a non-trivial running centre
    center = m.center.clone()
    s_out, h1 = record(m.projector, pre=False)
    t_out, h2 = record(m.teacher.projector, pre=False)
    preds, h3 = record(m.mfm_head, pre=False)
    u, v = two_views()
    out = m({'views': [u, v]})
    h1.remove(); h2.remove(); h3.remove()
    B = len(u)
    s, t, c = s_out[0], t_out[0], center[0].double().numpy()
    assert s.shape == t.shape == (2 * B, 256)
    swapped = hand_ce(t[B:], s[:B], c, t_temp, 0.1) + hand_ce(t[:B], s[B:], c, t_temp, 0.1)   # t(v)->s(u~), t(u)->s(v~)
    same = hand_ce(t[:B], s[:B], c, t_temp, 0.1) + hand_ce(t[B:], s[B:], c, t_temp, 0.1)      # the wrong pairing
    assert out['loss_distill'].item() == pytest.approx(swapped, rel=1e-5)
    assert abs(swapped - same) > 1e-3 * swapped                               # the test can tell the pairings apart
    # MFM part: one frequency loss per view (numpy reference), added
    pred = preds[0]
    mfm = (ref.frequency_loss(pred[:B].numpy(), normalize_images(u).numpy(), out['keep'][:, 0].numpy())
           + ref.frequency_loss(pred[B:].numpy(), normalize_images(v).numpy(), out['keep_v'][:, 0].numpy()))
    assert out['loss_mfm'].item() == pytest.approx(mfm, rel=1e-4)
    assert out['loss'].item() == pytest.approx(mfm + 0.5 * swapped, rel=1e-4)
    # centering: c <- 0.8 c + 0.2 mean over the 2B teacher outputs
    want = 0.8 * center + 0.2 * t.double().mean(0, keepdim=True).float()
    torch.testing.assert_close(m.center, want, rtol=1e-5, atol=1e-6)


def test_center_is_not_updated_in_eval_mode():
    torch.manual_seed(0)
    m = FOLK(**TINY_VIT).eval()
    with torch.no_grad(): m({'views': list(two_views())})
    assert torch.equal(m.center, torch.zeros(1, 256))


def test_swapped_loss_function_against_hand_computation():
    g = torch.Generator().manual_seed(0)
    s, t, c = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g), torch.randn(1, 7, generator=g)
    want = hand_ce(t[3:], s[:3], c[0].double().numpy(), 0.05, 0.1) + hand_ce(t[:3], s[3:], c[0].double().numpy(), 0.05, 0.1)
    assert swapped_distillation_loss(s, t, c, 0.1, 0.05).item() == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match=r'\(2B, K\)'): swapped_distillation_loss(s[:5], t[:5], c, 0.1, 0.05)
    with pytest.raises(ValueError, match='same shape'): swapped_distillation_loss(s, t[:4], c, 0.1, 0.05)


class FakeTwoRankDist:
    "Stands in for torch.distributed in a 2-rank run: all_reduce adds the other rank's (known) sum."
    def __init__(self, other_rows): self.other_rows, self.calls = other_rows, 0
    def is_available(self): return True
    def is_initialized(self): return True
    def get_world_size(self): return 2
    def all_reduce(self, t, op=None):
        self.calls += 1
        t += self.other_rows.sum(0, keepdim=True)


def test_center_uses_the_global_batch_under_torch_distributed(monkeypatch):
    import folk_nb.folk
    mine = torch.arange(12, dtype=torch.float32).view(3, 4)
    other = mine + 100                                                        # what rank 1 holds
    fake = FakeTwoRankDist(other)
    monkeypatch.setattr(folk_nb.folk, 'dist', fake)
    center = update_center(torch.ones(1, 4), mine, 0.9)
    assert fake.calls == 1
    torch.testing.assert_close(center, 0.9 * torch.ones(1, 4) + 0.1 * torch.cat([mine, other]).mean(0, keepdim=True))


def test_center_update_runs_in_a_real_process_group(tmp_path):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "init"}', rank=0, world_size=1)
    try:
        teacher = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
        center = update_center(torch.zeros(1, 4), teacher, 0.9)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(center, 0.1 * teacher.mean(0, keepdim=True))


# ------------------------------------------------------------------ config, state, training
@pytest.mark.parametrize('kw, match', [
    (dict(mask='patch'), "mask must be one of 'folk', 'mfm'"),
    (dict(thresholds=()), 'thresholds must be'),
    (dict(thresholds=(0.01, 1.5)), 'thresholds must be'),
    (dict(thresholds_size=0), 'thresholds_size must be a positive integer'),
    (dict(thresholds_size=22.4), 'thresholds_size must be a positive integer'),
    (dict(com_prob=2), 'com_prob must be a probability'),
    (dict(low_pass_prob=-1), 'low_pass_prob must be a probability'),
    (dict(radius=-2), 'radius must be'),
    (dict(out_dim=0), 'out_dim must be a positive integer'),
    (dict(out_dim=2.5), 'out_dim must be a positive integer'),
    (dict(student_temp=0), 'student_temp must be a positive number'),
    (dict(teacher_temp_end=-0.1), 'teacher_temp_end must be a positive number'),
    (dict(teacher_temp_warmup=1.5), 'teacher_temp_warmup must be a probability'),
    (dict(center_momentum=1.1), 'center_momentum must be a probability'),
    (dict(momentum_start=-0.1), 'momentum_start must be a probability'),
    (dict(distill_weight=-1), 'distill_weight must be a number >= 0'),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match): FOLK(**{**TINY_VIT, **kw})


def test_bad_batches_are_refused():
    m = FOLK(**TINY_VIT)
    with pytest.raises(ValueError, match="recipe='folk'"): m({'views': [images(2)]})
    with pytest.raises(ValueError, match='same shape'): m({'views': [images(2), images(3)]})


def test_defaults_follow_the_spec():
    import inspect
    p = inspect.signature(FOLK).parameters
    assert p['thresholds'].default == (0.005, 0.01, 0.05) and p['com_prob'].default == 0.5
    assert p['thresholds_size'].default == 224      # the published thresholds, for 224 px images
    assert p['out_dim'].default == 65536 and p['student_temp'].default == 0.1 and p['distill_weight'].default == 1.0
    assert (p['teacher_temp_start'].default, p['teacher_temp_end'].default) == (0.04, 0.07)
    assert (p['momentum_start'].default, p['momentum_end'].default, p['center_momentum'].default) == (0.996, 1.0, 0.9)
    assert FOLK.name == 'folk' and FOLK.recipe == 'folk'


def test_config_round_trips_through_json_and_create_method():
    torch.manual_seed(0)
    m = FOLK(**TINY_VIT, mask='mfm', radius=(1, 3), thresholds=(0.01, 0.05))
    cfg = json.loads(json.dumps(m.config))
    assert cfg == m.config and cfg['thresholds'] == [0.01, 0.05]
    m2 = create_method('folk', **cfg)
    assert type(m2) is FOLK and m2.config == m.config
    m2.load_state_dict(m.state_dict(), strict=True)


def test_state_dict_round_trip_keeps_teacher_and_center():
    torch.manual_seed(0)
    m = FOLK(**TINY_VIT)
    opt = torch.optim.AdamW(m.param_groups(0.0), lr=1e-2)
    u, v = two_views()
    m.schedule(0, 10)
    m({'views': [u, v]})['loss'].backward(); opt.step(); m.after_optimizer_step()
    m({'views': [u, v]})                                                      # moves the centre again
    state = m.state_dict()
    assert 'center' in state and any(k.startswith('teacher.') for k in state)
    assert state['center'].abs().sum() > 0
    torch.manual_seed(1)
    m2 = FOLK(**TINY_VIT)
    m2.load_state_dict(state)
    assert torch.equal(m2.center, m.center)
    for k, t in m2.state_dict().items(): assert torch.equal(t, state[k]), k
    m.eval(); m2.eval()
    with torch.no_grad():
        torch.manual_seed(5); a = m({'views': [u, v]})
        torch.manual_seed(5); b = m2({'views': [u, v]})
    for k in ('loss', 'loss_mfm', 'loss_distill', 'pred'): torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def overfit(m, steps=20, lr=2e-3):
    u, v = two_views(8)
    opt = torch.optim.AdamW(m.param_groups(0.0), lr=lr)
    out = []
    for step in range(steps):
        m.schedule(0, steps)                                                  # a fixed teacher temperature
        torch.manual_seed(0)                                                  # the same masks every step
        o = m({'views': [u, v]})
        opt.zero_grad(); o['loss'].backward(); opt.step(); m.after_optimizer_step()
        out.append((o['loss'].item(), o['loss_mfm'].item()))
    return np.array(out)


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss():
    # On one fixed batch of 8 images the running centre converges to the teacher's mean output, which makes the
    # centred targets nearly uniform and raises the cross-entropy by design (towards 2 log K). A frozen centre
    # (center_momentum=1) isolates the optimisation: the student must then fit the teacher's targets.
    torch.manual_seed(0)
    losses = overfit(FOLK(**TINY_VIT, center_momentum=1.0))
    assert losses[-1, 0] < 0.5 * losses[0, 0] and losses[-5:, 0].mean() < losses[:5, 0].mean(), losses
    torch.manual_seed(0)
    losses = overfit(FOLK(**TINY_VIT))                                         # default centring: the MFM part falls
    assert losses[-1, 1] < 0.85 * losses[0, 1], losses


def test_forward_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    m = FOLK(**TINY_VIT)
    u, v = two_views()
    torch.manual_seed(1); full = m({'views': [u, v]})
    with torch.no_grad(): m.center.zero_()
    torch.manual_seed(1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = m({'views': [u, v]})
    for k in ('loss', 'loss_mfm', 'loss_distill'):
        assert out[k].dtype == torch.float32 and torch.isfinite(out[k]), k
        assert abs(out[k].item() - full[k].item()) < 0.05 * abs(full[k].item()), k
    assert m.center.dtype == torch.float32
    out['loss'].backward()
    assert m.projector.mlp[0].weight.grad is not None


def test_trainer_runs_folk(tmp_path):
    from folk_nb.data import create_loader
    from folk_nb.trainer import Trainer, TrainConfig, load_checkpoint
    torch.manual_seed(0)
    m = create_method('folk', **TINY_VIT)
    loader = create_loader('samples', recipe=m.recipe, size=32, batch_size=8, device='cpu', epoch_size=16)
    cfg = TrainConfig(epochs=2, lr=1e-3, progress=False, out_dir=str(tmp_path), log_every=1, warmup_steps=1)
    teacher_before = copy.deepcopy(m.teacher.state_dict())
    Trainer(m, loader, cfg).fit()
    lines = (tmp_path / 'log.csv').read_text().splitlines()
    header = lines[0].split(',')
    assert len(lines) == 1 + 4
    for col in ('loss', 'loss_mfm', 'loss_distill', 'teacher_temp', 'momentum'): assert col in header, col
    rows = [dict(zip(header, line.split(','))) for line in lines[1:]]
    assert all(np.isfinite(float(r['loss'])) for r in rows)
    assert float(rows[0]['teacher_temp']) == pytest.approx(0.04) and float(rows[-1]['teacher_temp']) == pytest.approx(0.07)
    assert float(rows[0]['momentum']) == pytest.approx(0.996)
    assert any(not torch.equal(t, teacher_before[k]) for k, t in m.teacher.state_dict().items())   # EMA moved it
    assert m.center.abs().sum() > 0
    ckpt = load_checkpoint(tmp_path / 'checkpoints' / 'last.pt')
    assert ckpt['method'] == 'folk' and ckpt['step'] == 4
    torch.testing.assert_close(ckpt['model']['center'], m.center)
    m2 = create_method('folk', **ckpt['method_config'])
    Trainer(m2, loader, TrainConfig(epochs=3, lr=1e-3, progress=False, out_dir=str(tmp_path), log_every=1,
                                    warmup_steps=1)).resume()
    torch.testing.assert_close(m2.center, m.center)


def test_checkpoint_written_before_thresholds_size_rebuilds_and_resumes_as_it_was_trained(tmp_path):
    "An older FOLK checkpoint (no thresholds_size) used the thresholds as given: it rebuilds that way, and resuming it"
    " with today's default (scaled thresholds) is refused with a message naming the option."
    from folk_nb.data import create_loader
    from folk_nb.methods import method_from_checkpoint
    from folk_nb.trainer import Trainer, TrainConfig, load_checkpoint
    torch.manual_seed(0)
    loader = create_loader('samples', recipe='folk', size=32, batch_size=8, device='cpu', epoch_size=8)
    cfg = TrainConfig(max_steps=2, lr=1e-3, progress=False, out_dir=str(tmp_path), warmup_steps=1)
    Trainer(FOLK(**TINY_VIT, thresholds_size=None), loader, dataclasses.replace(cfg, max_steps=1)).fit()
    path = tmp_path / 'checkpoints' / 'last.pt'
    ckpt = load_checkpoint(path)
    del ckpt['method_config']['thresholds_size']                    # what the code before the option wrote
    torch.save(ckpt, path)
    m, _ = method_from_checkpoint(path)
    assert m.thresholds_size is None and m.config['thresholds_size'] is None
    with pytest.raises(ValueError, match=r"thresholds_size': \(None, 224\)"):
        Trainer(FOLK(**TINY_VIT), loader, cfg).resume()
    t = Trainer(FOLK(**TINY_VIT, thresholds_size=None), loader, cfg).resume()
    assert t.fit()['steps'] == 2
