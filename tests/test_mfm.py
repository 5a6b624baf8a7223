"MFM as a trainable method (folk_nb.mfm) against independent per-image numpy references and its specification."
import json

import numpy as np
import pytest
import torch

from folk_nb.methods import create_method
from folk_nb.mfm import (MFM, create_mfm_head, mfm_reconstruct, mfm_loss, default_low_pass_prob, check_radius,
                         spatial_features, mfm_completion)
from folk_nb.models import create_backbone, normalize_images, denormalize_images
from folk_nb.spectrum import filter_rfft, rfft_image
import reference as ref

TINY_VIT = dict(model='vit_tiny_patch16_224', img_size=32, patch_size=8,
                model_kwargs=dict(depth=1, embed_dim=64, num_heads=2))
SMALL_CNN = dict(model='resnet18', img_size=32, cifar_stem=True,
                 model_kwargs=dict(channels=[16, 32, 64, 128]))   # a narrow ResNet-18 with the CIFAR stem (stride 8)
BACKBONES = {  # name -> (create_backbone arguments, expected stride)
    'vit_p4': (dict(name='vit_tiny_patch16_224', img_size=32, patch_size=4, depth=1, embed_dim=64, num_heads=2), 4),
    'vit_p8': (dict(name='vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1, embed_dim=64, num_heads=2), 8),
    'resnet18_cifar': (dict(name='resnet18', img_size=32, cifar_stem=True, channels=[16, 32, 64, 128]), 8),
    'resnet18': (dict(name='resnet18', img_size=64), 32),
}


def images(b=4, size=32, seed=0):
    "Smooth-ish random images in [0, 1] (random values blurred by a box filter), not a constant."
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, size + 2, size + 2, generator=g)
    return ((x[..., :-2, :-2] + x[..., 1:-1, 1:-1] + x[..., 2:, 2:]) / 3)


# ------------------------------------------------------------------ head and shapes
@pytest.mark.parametrize('which', list(BACKBONES))
def test_head_output_has_the_image_shape(which):
    kw, stride = BACKBONES[which]
    torch.manual_seed(0)
    bb = create_backbone(**kw)
    head = create_mfm_head(bb)
    assert head.stride == stride and head.in_dim == bb.embed_dim
    x = images(2, kw['img_size'])
    with torch.no_grad():
        pred, feats = mfm_reconstruct(bb, head, x)
        fmap = spatial_features(bb, feats, x.shape[-2:])
    assert pred.shape == x.shape
    assert fmap.shape == (2, bb.embed_dim, kw['img_size'] // stride, kw['img_size'] // stride)


def test_vit_feature_map_drops_the_cls_token_and_keeps_the_patch_order():
    torch.manual_seed(0)
    bb = create_backbone(**BACKBONES['vit_p8'][0])
    x = images(2)
    with torch.no_grad():
        tokens = bb.forward_features(normalize_images(x))          # (B, 1 + 16, D)
        fmap = spatial_features(bb, tokens, (32, 32))              # (B, D, 4, 4)
    for r in range(4):
        for c in range(4):  # token 1 + r * 4 + c is patch (r, c), written with plain indexing
            assert torch.equal(fmap[:, :, r, c], tokens[:, 1 + r * 4 + c])


@pytest.mark.parametrize('which', ['vit_p8', 'resnet18_cifar', 'resnet18'])
def test_method_pred_shapes(which):
    kw, _ = BACKBONES[which]
    kw = dict(kw); name = kw.pop('name'); size = kw.pop('img_size')
    extra = {k: kw.pop(k) for k in list(kw) if k in ('patch_size', 'cifar_stem')}
    torch.manual_seed(0)
    m = MFM(name, img_size=size, model_kwargs=kw or None, **extra)
    x = images(2, size)
    out = m({'views': [x]})
    for k in ('input', 'pred', 'target_image'): assert out[k].shape == x.shape, k
    assert out['keep'].shape == (2, 1, size, size) and out['keep'].dtype == torch.bool
    assert out['pred'].min() >= 0 and out['pred'].max() <= 1
    assert out['loss'].ndim == 0 and torch.isfinite(out['loss'])
    assert not out['loss_mfm'].requires_grad


def test_image_size_must_be_a_multiple_of_the_stride():
    with pytest.raises(ValueError, match='multiple of the backbone'):
        MFM('resnet18', img_size=48)                                # stride 32
    with pytest.raises(ValueError, match='divisible'):
        MFM('vit_tiny_patch16_224', img_size=30, patch_size=8, model_kwargs=dict(depth=1, embed_dim=64, num_heads=2))


# ------------------------------------------------------------------ the loss
def kept_only(noise, keep):
    "Noise restricted to the kept bins (an exact projection, no clamping)."
    return filter_rfft(rfft_image(noise), keep, *noise.shape[-2:])


def test_loss_ignores_errors_on_kept_bins():
    torch.manual_seed(0)
    m = MFM(**TINY_VIT)
    x = images(6)
    _, keep = m.mask(x)
    assert (~keep).any() and keep.any()
    noise = torch.randn_like(x)
    target = normalize_images(x)
    on_kept = kept_only(noise, keep)
    on_removed = noise - on_kept
    assert on_kept.abs().mean() > 0.01                                   # the kept part is not negligible
    assert mfm_loss(target + on_kept, x, keep) < 1e-4                    # ~1e-6: sqrt(1e-12) per bin
    assert mfm_loss(target + on_removed, x, keep) > 0.1
    # the same error on all bins costs exactly what its removed part costs
    torch.testing.assert_close(mfm_loss(target + noise, x, keep), mfm_loss(target + on_removed, x, keep), rtol=1e-4, atol=1e-6)


def test_loss_matches_the_numpy_reference():
    torch.manual_seed(1)
    m = MFM(**TINY_VIT)
    x = images(3, seed=2)
    _, keep = m.mask(x)
    pred = torch.randn_like(x)
    want = ref.frequency_loss(pred.numpy(), normalize_images(x).numpy(), keep[:, 0].numpy())
    assert abs(mfm_loss(pred, x, keep).item() - want) < 1e-4 * max(1.0, want)
    want_focal = ref.frequency_loss(pred.numpy(), normalize_images(x).numpy(), keep[:, 0].numpy(), gamma=1.0)
    assert abs(mfm_loss(pred, x, keep, gamma=1.0).item() - want_focal) < 1e-4 * max(1.0, want_focal)


def test_forward_loss_is_the_loss_of_its_own_outputs():
    torch.manual_seed(0)
    m = MFM(**TINY_VIT, gamma=0.5)
    x = images(4)
    torch.manual_seed(3); out = m({'views': [x]})
    torch.manual_seed(3); x_f, keep = m.mask(x)
    assert torch.equal(keep, out['keep'])
    pred, _ = mfm_reconstruct(m.backbone, m.mfm_head, x_f)
    want = ref.frequency_loss(pred.detach().numpy(), normalize_images(x).numpy(), keep[:, 0].numpy(), gamma=0.5)
    assert abs(out['loss'].item() - want) < 1e-4 * max(1.0, want)


def test_completion_takes_kept_bins_from_the_input_and_removed_bins_from_the_prediction():
    torch.manual_seed(0)
    m = MFM(**TINY_VIT)
    x = images(3)
    x_f, keep = m.mask(x)
    pred = images(3, seed=7)
    got = mfm_completion(x_f, pred, keep)
    for i in range(3):  # per image, full complex FFT in numpy
        removed = ~keep[i, 0].numpy()
        P = np.fft.fftshift(np.fft.fft2(pred[i].double().numpy(), axes=(-2, -1)), axes=(-2, -1)) * removed
        want = np.clip(x_f[i].double().numpy() + np.fft.ifft2(np.fft.ifftshift(P, axes=(-2, -1)), axes=(-2, -1)).real, 0, 1)
        np.testing.assert_allclose(got[i].numpy(), want, atol=2e-5)


# ------------------------------------------------------------------ the encoder's input
def record_input(module):
    seen = []
    handle = module.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen, handle


@pytest.mark.parametrize('kind', ['vit', 'cnn'])
def test_encoder_input_is_exactly_the_filtered_image(kind):
    torch.manual_seed(0)
    m = MFM(**TINY_VIT) if kind == 'vit' else MFM(**SMALL_CNN)
    first = m.backbone.model.patch_embed if kind == 'vit' else m.backbone.model.conv1
    seen, handle = record_input(first)
    x = images(4)
    out = m({'views': [x]})
    handle.remove()
    assert len(seen) == 1                                                   # one encoder pass, on the filtered images
    torch.testing.assert_close(seen[0], normalize_images(out['input']), rtol=0, atol=0)
    for i in range(len(x)):                                                 # the input is the filter of the view
        want = ref.filter_image(x[i].numpy(), out['keep'][i, 0].numpy())
        np.testing.assert_allclose(out['input'][i].numpy(), want, atol=2e-5)
    assert not torch.allclose(out['input'], x, atol=1e-3)                   # and not the view itself


def test_masks_are_mfm_discs_of_the_scaled_radius():
    torch.manual_seed(0)
    m = MFM(**TINY_VIT)
    x = images(16)
    _, keep = m.mask(x)
    disc = torch.from_numpy(ref.disc(32, 32, 16 * 32 / 224))
    for k in keep[:, 0]:
        assert torch.equal(k, disc) or torch.equal(k, ~disc)


def test_radius_range_draws_one_radius_per_image():
    torch.manual_seed(0)
    m = MFM(**TINY_VIT, radius=(2, 6), low_pass_prob=1.0)
    _, keep = m.mask(images(40))
    counts = keep.sum((1, 2, 3))
    lo, hi = ref.disc(32, 32, 2).sum(), ref.disc(32, 32, 6 + 1e-6).sum()
    assert counts.min() >= lo and counts.max() <= hi
    assert len(counts.unique()) >= 4                                        # several different radii were drawn
    assert m.config['radius'] == [2.0, 6.0]


# ------------------------------------------------------------------ low-pass probability
def low_pass_fraction(m, n=1000):
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    _, keep = m.mask(x)
    return keep[:, 0, 16, 16].float().mean().item()                         # DC kept <=> low-pass


def test_low_pass_probability_default_depends_on_the_backbone():
    assert default_low_pass_prob('vit') == 0.5 and default_low_pass_prob('cnn') == 0.3
    torch.manual_seed(0)
    vit, cnn = MFM(**TINY_VIT), MFM(**SMALL_CNN)
    assert vit.low_pass_prob == 0.5 and cnn.low_pass_prob == 0.3
    assert vit.config['low_pass_prob'] is None and cnn.config['low_pass_prob'] is None
    # 1000 draws: the standard error is <= 0.016, so 0.05 is more than 3 standard errors
    assert abs(low_pass_fraction(vit) - 0.5) < 0.05
    assert abs(low_pass_fraction(cnn) - 0.3) < 0.05
    explicit = MFM(**SMALL_CNN, low_pass_prob=0.8)
    assert explicit.low_pass_prob == 0.8 and abs(low_pass_fraction(explicit) - 0.8) < 0.05


# ------------------------------------------------------------------ validation and config
@pytest.mark.parametrize('kw, match', [
    (dict(low_pass_prob=1.5), 'low_pass_prob must be a probability'),
    (dict(low_pass_prob=-0.1), 'low_pass_prob must be a probability'),
    (dict(radius=0), 'radius must be'),
    (dict(radius=(5, 2)), 'r_min <= r_max'),
    (dict(radius=(1, 2, 3)), 'radius range'),
    (dict(gamma=-1), 'gamma must be a number >= 0'),
])
def test_bad_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match): MFM(**TINY_VIT, **kw)


def test_bad_model_and_batch_are_refused():
    with pytest.raises(ValueError, match='unknown timm model'): MFM('vit_tinny_patch16_224')
    with pytest.raises(TypeError, match='model_kwargs must be a dict'): MFM('resnet18', img_size=32, model_kwargs=[1])
    m = MFM(**TINY_VIT)
    with pytest.raises(ValueError, match="'views'"): m({'image': images(2)})
    with pytest.raises(ValueError, match=r'\[0, 1\]'): m({'views': [normalize_images(images(2))]})


def test_config_round_trips_through_json_and_create_method():
    torch.manual_seed(0)
    m = MFM(**TINY_VIT, radius=(1, 3), gamma=1.0)
    cfg = json.loads(json.dumps(m.config))
    assert cfg == m.config
    m2 = create_method('mfm', **cfg)
    assert type(m2) is MFM and m2.config == m.config
    assert m2.radius == m.radius and m2.low_pass_prob == m.low_pass_prob and m2.gamma == m.gamma
    m2.load_state_dict(m.state_dict(), strict=True)


def test_state_dict_round_trip_gives_the_same_outputs():
    torch.manual_seed(0)
    m = MFM(**SMALL_CNN)
    x = images(4)
    m({'views': [x]})                                                       # moves the BN running statistics
    torch.manual_seed(1)
    m2 = MFM(**SMALL_CNN)
    m2.load_state_dict(m.state_dict())
    m.eval(); m2.eval()
    with torch.no_grad():
        torch.manual_seed(5); a = m({'views': [x]})
        torch.manual_seed(5); b = m2({'views': [x]})
    torch.testing.assert_close(a['loss'], b['loss'], rtol=0, atol=0)
    torch.testing.assert_close(a['pred'], b['pred'], rtol=0, atol=0)


# ------------------------------------------------------------------ training
def test_gradients_reach_backbone_and_head():
    torch.manual_seed(0)
    m = MFM(**TINY_VIT)
    m({'views': [images(4)]})['loss'].backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert m.mfm_head.proj.weight.grad.abs().sum() > 0
    assert m.backbone.model.patch_embed.proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('kind', ['vit', 'cnn'])
def test_a_few_steps_on_a_fixed_batch_reduce_the_loss(kind):
    torch.manual_seed(0)
    m = MFM(**TINY_VIT) if kind == 'vit' else MFM(**SMALL_CNN)
    x = images(8)
    opt = torch.optim.AdamW(m.param_groups(0.0), lr=2e-3 if kind == "vit" else 5e-3)
    losses = []
    for _ in range(20):
        torch.manual_seed(0)                                               # the same masks at every step
        loss = m({'views': [x]})['loss']
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0] and np.mean(losses[-5:]) < np.mean(losses[:5]), losses


def test_forward_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    m = MFM(**TINY_VIT)
    x = images(4)
    torch.manual_seed(1); full = m({'views': [x]})['loss']
    torch.manual_seed(1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = m({'views': [x]})
    assert out['loss'].dtype == torch.float32 and torch.isfinite(out['loss'])
    assert abs(out['loss'].item() - full.item()) < 0.05 * full.item()
    out['loss'].backward()
    assert m.mfm_head.proj.weight.grad is not None


def test_trainer_runs_mfm(tmp_path):
    from folk_nb.data import create_loader
    from folk_nb.trainer import Trainer, TrainConfig, load_checkpoint
    torch.manual_seed(0)
    m = create_method('mfm', **TINY_VIT)
    loader = create_loader('samples', recipe=m.recipe, size=32, batch_size=8, device='cpu', epoch_size=16)
    cfg = TrainConfig(epochs=2, lr=1e-3, progress=False, out_dir=str(tmp_path), log_every=1, warmup_steps=1)
    before = m.mfm_head.proj.weight.detach().clone()
    Trainer(m, loader, cfg).fit()
    rows = (tmp_path / 'log.csv').read_text().splitlines()
    assert len(rows) == 1 + 4 and 'loss_mfm' in rows[0]
    assert all(np.isfinite(float(r.split(',')[rows[0].split(',').index('loss')])) for r in rows[1:])
    assert not torch.equal(before, m.mfm_head.proj.weight)
    ckpt = load_checkpoint(tmp_path / 'checkpoints' / 'last.pt')
    assert ckpt['method'] == 'mfm' and ckpt['step'] == 4
    m2 = create_method('mfm', **ckpt['method_config'])
    m2.load_state_dict(ckpt['model'])
    Trainer(m2, loader, TrainConfig(epochs=3, lr=1e-3, progress=False, out_dir=str(tmp_path), log_every=1,
                                    warmup_steps=1)).resume()              # same config: resume accepted
