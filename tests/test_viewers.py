"""The viewers (folk_nb.viewers): panel functions against independent numpy references, reconstructions from the
pieces against the methods' own forward, controls that change the panels, error messages in the widgets, and the
training dashboard as a callback (directly and through a short Trainer run).

Tiny models at 32 px throughout; the numpy references loop over images, bins and pixels (complex128 FFTs).
"""
import base64
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from folk_nb.data import GPUDataLoader
from folk_nb.freq_masks import com_mask, mfm_mask
from folk_nb.images import load_sample, sample_images, to_uint8_image
from folk_nb.methods import create_method
from folk_nb.patch_masks import split_labels
from folk_nb.trainer import CHECKPOINT_FORMAT, CSVLog, TrainConfig, Trainer
from folk_nb.viewers import (AttentionViewer, ReconstructionViewer, TrainingDashboard, attention_maps, famt_split,
                             famt_summary, filtered_reconstruction, head_map, load_method,
                             overlay_attention, patch_reconstruction, patch_split, radial_error_profile,
                             radial_profile, reconstruction_panels, _INFERNO)
import reference as ref

torch.set_num_threads(1)

VIT = dict(model='vit_tiny_patch16_224', img_size=32, patch_size=8, model_kwargs=dict(depth=2, embed_dim=32, num_heads=2))
HEAD = dict(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)
DECODER = dict(decoder_dim=32, decoder_depth=1, decoder_heads=2)


def tiny(name, **kw):
    torch.manual_seed(0)
    extra = dict(folk=HEAD, mae=DECODER, famt=dict(DECODER, num_images=4)).get(name, {})
    return create_method(name, **{**VIT, **extra, **kw})


def images(names=('astronaut', 'coffee', 'brick', 'moon'), size=32):
    return sample_images(list(names), size)


def decode(uri):
    "A PNG data URI back to a numpy array, with PIL."
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(',', 1)[1]))))


def save_ckpt(model, path, step=0, **override):
    ckpt = dict(format=CHECKPOINT_FORMAT, method=model.name, method_config=model.config, model=model.state_dict(),
                step=step, total_steps=10)
    ckpt.update(override)
    torch.save(ckpt, path)
    return path


# ---------------------------------------------------------------- references
def rings_np(h, w):
    "Ring index of each shifted bin: round(distance from DC at (h//2, w//2)), by explicit loops."
    r = np.zeros((h, w), dtype=np.int64)
    for i in range(h):
        for j in range(w):
            r[i, j] = int(np.round(math.hypot(i - h // 2, j - w // 2)))
    return r


def radial_profile_np(m):
    "Mean of a (C, H, W) map over channels and rings, with a dict of lists per ring."
    m = np.asarray(m, np.float64).mean(0)
    r = rings_np(*m.shape)
    rings = {}
    for (i, j), k in np.ndenumerate(r): rings.setdefault(k, []).append(m[i, j])
    return np.array([np.mean(rings[k]) for k in range(max(rings) + 1)])


def error_profile_np(pred, target):
    "Ring means of |F(pred) - F(target)| (ortho FFT, shifted, channel mean) of one image pair (C, H, W)."
    P = np.fft.fftshift(np.fft.fft2(np.asarray(pred, np.float64), norm='ortho'), axes=(-2, -1))
    T = np.fft.fftshift(np.fft.fft2(np.asarray(target, np.float64), norm='ortho'), axes=(-2, -1))
    return radial_profile_np(np.abs(P - T))


def manual_cls_attention(vit, x_norm, layer):
    "CLS->patch softmax(q k^T / sqrt(d)) of one block, recomputed in float64 from the block's input and weights."
    inputs = []
    hooks = [blk.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for blk in vit.blocks]
    with torch.no_grad():
        vit.eval(); vit.forward_features(x_norm)
    for h in hooks: h.remove()
    blk, t = vit.blocks[layer], inputs[layer]
    with torch.no_grad():
        y = blk.norm1(t).double()
        b, n, _ = y.shape
        heads, d = blk.attn.num_heads, blk.attn.head_dim
        qkv = (y @ blk.attn.qkv.weight.double().T + blk.attn.qkv.bias.double()).reshape(b, n, 3, heads, d)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)[:, :, 0, 1:]
    return a.numpy()                                                    # (B, heads, N)


# ---------------------------------------------------------------- radial profiles
@pytest.mark.parametrize('hw', [(16, 16), (15, 20), (9, 7)])
def test_radial_profile_matches_ring_loop(hw):
    g = torch.Generator().manual_seed(1)
    m = torch.rand(3, 2, *hw, generator=g)
    radii, prof = radial_profile(m)
    for b in range(3):
        want = radial_profile_np(m[b].numpy())
        np.testing.assert_allclose(prof[b].numpy(), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(radii.numpy(), np.arange(len(want)))


@pytest.mark.parametrize('hw', [(32, 32), (21, 26)])
def test_radial_error_profile_matches_numpy(hw):
    g = torch.Generator().manual_seed(2)
    pred, target = torch.rand(2, 3, *hw, generator=g), torch.rand(2, 3, *hw, generator=g)
    _, err = radial_error_profile(pred, target)
    for b in range(2):
        np.testing.assert_allclose(err[b].numpy(), error_profile_np(pred[b].numpy(), target[b].numpy()), rtol=1e-4, atol=1e-6)
    _, zero = radial_error_profile(target, target)
    assert zero.abs().max() < 1e-6


def test_radial_profile_errors():
    with pytest.raises(ValueError, match='values'): radial_profile(torch.zeros(4, 4))
    with pytest.raises(TypeError, match='real'): radial_profile(torch.zeros(1, 1, 4, 4, dtype=torch.complex64))
    with pytest.raises(ValueError, match='same shape'): radial_error_profile(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 6))


def test_low_pass_model_error_profile_sits_outside_the_disc():
    "A 'model' that returns the (unclamped) low-pass filtered image errs only outside the disc (rings > radius)."
    x = images(('astronaut',), 64)
    keep = mfm_mask(x, radius=10, low_pass_prob=1.0)[0, 0].numpy()
    F = ref.spectrum(x[0].numpy()) * keep[None]
    low = np.fft.ifft2(np.fft.ifftshift(F, axes=(-2, -1))).real
    _, err = radial_error_profile(torch.from_numpy(low).float()[None], x)
    assert err[0, :9].max() < 1e-3 * err[0, 11:30].min()


# ---------------------------------------------------------------- reconstructions from the pieces
@pytest.mark.parametrize('name,kw', [('mfm', {}), ('mfm', dict(model='resnet18', cifar_stem=True, patch_size=None,
                                                              model_kwargs=dict(channels=[8, 16, 32, 64]))),
                                     ('folk', {}), ('folk', dict(mask='mfm'))])
def test_filtered_reconstruction_equals_forward_with_its_keep_mask(name, kw):
    m = tiny(name, **kw).eval()
    x = images()
    with torch.no_grad(): out = m(dict(views=[x, x.flip(-1)]))
    mine = filtered_reconstruction(m, x, out['keep'])
    torch.testing.assert_close(mine['pred'], out['pred'], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(mine['input'], out['input'], atol=1e-6, rtol=0)
    for b in range(len(x)):   # the encoder's input is the reference filter of the image
        want = ref.filter_image(x[b].numpy(), out['keep'][b, 0].numpy())
        np.testing.assert_allclose(mine['input'][b].numpy(), want, atol=1e-5)
    other = filtered_reconstruction(m, x, ~out['keep'])
    assert (other['pred'] - mine['pred']).abs().max() > 1e-3   # another mask, another reconstruction


def test_filtered_reconstruction_restores_training_flag_and_refuses_patch_methods():
    m = tiny('mfm').train()
    from folk_nb.viewers import evaluating
    with evaluating(m): assert not m.training and not torch.is_grad_enabled()
    assert m.training
    with pytest.raises(ValueError, match="got a 'mae' model"): filtered_reconstruction(tiny('mae'), images(), mfm_mask(images()))
    with pytest.raises(TypeError, match='folk_nb Method'): filtered_reconstruction(torch.nn.Linear(2, 2), images(), mfm_mask(images()))


@pytest.mark.parametrize('name', ['mae', 'famt'])
def test_patch_reconstruction_equals_forward_with_its_split(name):
    m = tiny(name).eval()
    x = images()
    torch.manual_seed(5)
    with torch.no_grad(): out = m(dict(views=[x], index=torch.arange(4), boxes=[torch.tensor([[0., 0., 1., 1.]] * 4)]))
    mine = patch_reconstruction(m, x, out['split'])
    torch.testing.assert_close(mine['pred'], out['pred'], atol=1e-6, rtol=0)
    torch.testing.assert_close(mine['labels'], out['labels'])


def test_patch_split_counts_seeds_and_famt_weights():
    x = images()
    mae, famt = tiny('mae'), tiny('famt')
    for mr, tr, want in ((0.75, 0.0, (12, 0, 4)), (0.5, 0.25, (8, 4, 4))):
        s, w = patch_split(famt, x, mr, tr, seed=1)
        assert tuple(t.shape[1] for t in s) == want
        for b in range(4):   # the three sets partition the patches
            assert sorted(torch.cat([s.masked[b], s.thrown[b], s.visible[b]]).tolist()) == list(range(16))
    s1, _ = patch_split(mae, x, 0.5, seed=1)
    s2, _ = patch_split(mae, x, 0.5, seed=1)
    s3, _ = patch_split(mae, x, 0.5, seed=2)
    assert torch.equal(s1.masked, s2.masked) and not torch.equal(s1.masked, s3.masked)
    # FAMT's weights: its attention map through its own famt_weights (attention computed by hand)
    _, w = patch_split(famt, x, 0.45, 0.40)
    a = manual_cls_attention(famt.backbone.model, (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None])
                             / torch.tensor([0.229, 0.224, 0.225])[:, None, None], -1)
    a = (a - a.min(-1, keepdims=True)) / (a.max(-1, keepdims=True) - a.min(-1, keepdims=True))
    from folk_nb.attention import famt_weights
    want = famt_weights(torch.from_numpy(a.mean(1)).float().reshape(4, 4, 4), **famt.weight_options, eps=0.0)
    torch.testing.assert_close(w.flatten(1), want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match='at least one of each'): patch_split(mae, x, 1.0)
    with pytest.raises(ValueError, match='mask_ratio'): patch_split(famt, x, 0.7, 0.5)


def test_famt_split_masks_heavy_patches_more_often():
    "Given weights (no model pass), the heaviest patch is masked far more often than the lightest, over 300 seeds."
    w = torch.linspace(0.01, 1.0, 16).reshape(1, 4, 4)
    masked = torch.zeros(16)
    for seed in range(300):
        s, _ = famt_split(None, None, 0.25, 0.25, seed=seed, weights=w)
        masked[s.masked[0]] += 1
    assert masked[15] > 3 * masked[0] and masked.sum() == 300 * 4


def test_reconstruction_panels_against_references():
    x = load_sample('coffee', 32)
    keep = com_mask(x[None], 0.01)
    filtered = torch.from_numpy(ref.filter_image(x.numpy(), keep[0, 0].numpy())).float()
    pred = (x * 0.8 + 0.1).clamp(0, 1)
    p = reconstruction_panels(x, filtered, pred, keep)
    np.testing.assert_allclose(p['log_amplitude'], np.log1p(ref.amplitude(x.numpy())), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(p['log_amplitude_pred'], np.log1p(ref.amplitude(pred.numpy())), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(p['error'], error_profile_np(pred.numpy(), x.numpy()), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(p['kept_fraction'], radial_profile_np(keep[0].float().numpy()), atol=1e-6)
    assert p['kept'] == int(keep.sum()) and p['total'] == 1024
    np.testing.assert_array_equal(p['input'], to_uint8_image(filtered))
    assert abs(p['mse'] - float(((pred - x) ** 2).mean())) < 1e-7
    assert reconstruction_panels(x, x, pred)['kept_fraction'] is None


# ---------------------------------------------------------------- checkpoints
def test_load_method_round_trip_and_errors(tmp_path):
    m = tiny('mfm')
    path = save_ckpt(m, tmp_path / 'ok.pt', step=7)
    m2, info = load_method(path)
    assert info['step'] == 7 and info['method'] == 'mfm' and not m2.training
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()): assert torch.equal(a, b)
    (tmp_path / 'text.pt').write_text('hello')
    with pytest.raises(ValueError, match='not a readable checkpoint'): load_method(tmp_path / 'text.pt')
    with pytest.raises(FileNotFoundError): load_method(tmp_path / 'nope.pt')
    with pytest.raises(ValueError, match="'moco' checkpoint"):
        load_method(save_ckpt(m, tmp_path / 'moco.pt', method='moco'), names=('mfm', 'folk'))
    wide = dict(m.config, model_kwargs=dict(depth=2, embed_dim=64, num_heads=2))
    with pytest.raises(ValueError, match='do not fit'): load_method(save_ckpt(m, tmp_path / 'wide.pt', method_config=wide))
    with pytest.raises(ValueError, match='cannot rebuild'):
        load_method(save_ckpt(m, tmp_path / 'odd.pt', method_config=dict(m.config, colour='red')))
    with pytest.raises(TypeError, match='path'): load_method(3)


def test_reconstruction_viewer_shows_messages_for_bad_files(tmp_path):
    m = tiny('mfm')
    (tmp_path / 'text.pt').write_text('hello')
    v = ReconstructionViewer(tmp_path / 'text.pt')                  # constructing does not raise
    assert 'not a readable checkpoint' in v.message.value and v.method is None
    v.checkpoint.value = str(tmp_path / 'nope.pt'); v.load.click()
    assert 'not found' in v.message.value
    v.load_checkpoint(save_ckpt(m, tmp_path / 'moco.pt', method='moco'))
    assert 'expected one of: mfm, folk, mae, famt' in v.message.value
    v.load_checkpoint(save_ckpt(m, tmp_path / 'wide.pt', method_config=dict(m.config, model_kwargs=dict(depth=2, embed_dim=64, num_heads=2))))
    assert 'do not fit' in v.message.value and v.method is None
    v.load_checkpoint(save_ckpt(m, tmp_path / 'ok.pt', step=3))
    assert v.message.value == '' and v.method is not None and 'ok.pt step 3' in v.info.value
    assert decode(v.fig.data[0].source).shape == (32, 32, 3)        # the model's size, not the default 224
    v._on_upload({'new': ({'name': 'broken.jpg', 'content': b'\xff\xd8\xff garbage'},)})
    assert 'Could not use broken.jpg' in v.message.value and v.image.value == 'astronaut'
    with pytest.raises(TypeError, match='method_or_checkpoint'): ReconstructionViewer(42)
    empty = ReconstructionViewer(size=48)                            # no model yet: a message and the bare image
    assert 'no model yet' in empty.message.value and decode(empty.fig.data[0].source).shape == (48, 48, 3)


# ---------------------------------------------------------------- controls change panels
def test_frequency_controls_rerun_the_model_on_the_chosen_mask():
    m = tiny('mfm')
    v = ReconstructionViewer(m, image='chelsea')
    x = v.current_image()
    assert v.last['kept'] == int(ref.disc(32, 32, 16 * 32 / 224).sum())
    for kind, radius in (('MFM low-pass', 5.0), ('MFM high-pass', 5.0)):
        v.kind.value, v.radius.value = kind, radius
        disc = ref.disc(32, 32, radius)
        keep = disc if kind.endswith('low-pass') else ~disc
        assert v.last['kept'] == int(keep.sum())
        want = to_uint8_image(torch.from_numpy(ref.filter_image(x.numpy(), keep)).float())
        assert np.abs(decode(v.fig.data[1].source).astype(int) - want.astype(int)).max() <= 1   # the drawn encoder input
        pred = filtered_reconstruction(m.eval(), x[None], torch.from_numpy(keep)[None, None])['pred'][0]
        assert np.abs(decode(v.fig.data[2].source).astype(int) - to_uint8_image(pred).astype(int)).max() <= 1
        np.testing.assert_allclose(np.array(v.fig.data[6].y), radial_profile_np(keep[None].astype(float)), atol=1e-6)
    assert v.radius.layout.display is None and v.threshold.layout.display == 'none'
    v.kind.value = 'RCom'
    assert v.threshold.layout.display is None and v.radius.layout.display == 'none'
    v.threshold.value = 0.02
    assert v.last['kept'] == int((~com_mask(x[None], 0.02)).sum())
    v.kind.value = 'FOLK random'
    seen = {v.last['kept']}
    for _ in range(8): v.resample.click(); seen.add(v.last['kept'])
    assert len(seen) > 1 and v.resample.layout.display is None


def test_patch_controls_change_the_split():
    v = ReconstructionViewer(tiny('famt'))
    assert v.last['counts'] == (7, 6, 3) and v.kind.layout.display == 'none' and v.throw_ratio.layout.display is None
    before = v.fig.data[1].source
    v.throw_ratio.value = 0.0
    assert v.last['counts'] == (7, 0, 9) and v.fig.data[1].source != before
    v.mask_ratio.value = 0.95
    assert v.last['counts'] == (15, 0, 1)
    v.throw_ratio.value = 0.1                                       # 0.95 + 0.1 > 1
    assert 'mask_ratio + throw_ratio' in v.message.value and v.last['counts'] == (15, 0, 1)
    v.mask_ratio.value, v.throw_ratio.value = 0.5, 0.5              # 8 + 8: nothing visible
    assert 'at least one of each' in v.message.value
    mae = ReconstructionViewer(tiny('mae'))
    assert mae.last['counts'] == (12, 0, 4) and mae.throw_ratio.layout.display == 'none'
    first = mae.last['input'].copy()
    mae.resample.click()
    assert not np.array_equal(mae.last['input'], first)
    # the drawn masked input: masked patches grey (0.5), visible ones the image
    img, shown = to_uint8_image(mae.current_image()), decode(mae.fig.data[1].source)
    blocks = (shown.reshape(4, 8, 4, 8, 3) == img.reshape(4, 8, 4, 8, 3)).all((1, 3, 4)).sum()
    assert blocks == 4


# ---------------------------------------------------------------- attention viewer
def test_attention_maps_heads_and_overlay_against_references():
    famt = tiny('famt')
    vit = famt.backbone.model
    with torch.no_grad():
        for blk in vit.blocks: blk.attn.qkv.weight.mul_(20)        # peaked attention: a test with teeth
    x = images()
    xn = (x - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    for layer in (0, 1):
        raw = manual_cls_attention(vit, xn, layer)                  # (B, heads, N)
        norm = (raw - raw.min(-1, keepdims=True)) / (raw.max(-1, keepdims=True) - raw.min(-1, keepdims=True))
        for head in (0, 1):
            np.testing.assert_allclose(attention_maps(vit, x, layer, head).reshape(4, 16).numpy(), norm[:, head], atol=1e-4)
        np.testing.assert_allclose(attention_maps(vit, x, layer).reshape(4, 16).numpy(), norm.mean(1), atol=1e-4)
    with pytest.raises(ValueError, match='head must be'): head_map(torch.rand(1, 2, 4, 4), 2)
    with pytest.raises(ValueError, match='rollout'): attention_maps(vit, x, head=0, rollout=True)
    att = torch.rand(4, 4)
    img = x[0]
    got = overlay_attention(img, att, alpha=0.25)
    u = to_uint8_image(img).astype(np.float64)
    for i in (0, 7, 8, 31):
        for j in (0, 9, 30):
            colour = _INFERNO[int(round(float(att[i // 8, j // 8]) * 255))]
            assert np.abs(got[i, j] - (0.75 * u[i, j] + 0.25 * colour)).max() <= 1


def test_famt_summary_against_sets():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(3, 4, 4, generator=g)
    a, b = torch.randperm(16, generator=g)[:6].repeat(3, 1), torch.randperm(16, generator=g)[:6].repeat(3, 1)
    s = famt_summary(w, a, b)
    for i in range(3):
        p = (w[i].flatten() / w[i].sum()).double().numpy()
        assert abs(float(s['entropy'][i]) - (-(p * np.log(p)).sum() / np.log(16))) < 1e-5
        sa, sb = set(a[i].tolist()), set(b[i].tolist())
        assert abs(float(s['overlap'][i]) - len(sa & sb) / len(sa | sb)) < 1e-6


def test_attention_viewer_controls_checkpoints_and_errors(tmp_path):
    m = tiny('famt')
    paths = []
    for step in (0, 5, 10):
        with torch.no_grad():
            for p in m.backbone.parameters(): p.add_(0.3 * torch.randn_like(p))   # another checkpoint, other attention
        paths.append(save_ckpt(m, tmp_path / f'c{step}.pt', step=step))
    v = AttentionViewer(paths, image='coffee')
    assert v.message.value == '' and v.last['attention'].shape == (4, 4)
    x = v.current_image()[None]
    want = attention_maps(load_method(paths[0])[0].backbone.model, x)[0].numpy()
    np.testing.assert_allclose(np.array(v.fig.data[1].z), want, atol=1e-6)
    v.step.value = 2
    want2 = attention_maps(load_method(paths[2])[0].backbone.model, x)[0].numpy()
    np.testing.assert_allclose(v.last['attention'], want2, atol=1e-6)
    assert 'step 10' in v.info.value and not np.allclose(want, want2)
    v.head.value = 1
    np.testing.assert_allclose(v.last['attention'], attention_maps(v.model, x, head=1)[0].numpy(), atol=1e-6)
    v.rollout.value = True
    assert v.head.disabled and np.allclose(v.last['attention'], attention_maps(v.model, x, rollout=True)[0].numpy(), atol=1e-6)
    v.trace.click()
    assert [s for s, _, _ in v.last['curve']] == [0, 5, 10] and v.last['curve'][0][2] == 1.0
    split, w = famt_split(v.model, x, m.mask_ratio, m.throw_ratio, 0, m.weight_options, m.weight_eps)
    np.testing.assert_array_equal(v.last['labels'], split_labels(split)[0].numpy())   # FAMT's split, fixed seed
    # a checkpoint of another model, a non-ViT, a file that is not a checkpoint: messages, no traceback
    other = save_ckpt(tiny('mae', model_kwargs=dict(depth=1, embed_dim=32, num_heads=2)), tmp_path / 'other.pt')
    bad = AttentionViewer([paths[0], other])
    bad.step.value = 1
    assert 'another model' in bad.message.value
    cnn = save_ckpt(tiny('mfm', model='resnet18', cifar_stem=True, patch_size=None, model_kwargs=None), tmp_path / 'cnn.pt')
    assert 'Vision Transformer' in AttentionViewer(cnn).message.value
    (tmp_path / 'x.pt').write_bytes(b'\x00\x01')
    assert 'not a readable checkpoint' in AttentionViewer(tmp_path / 'x.pt').message.value
    with pytest.raises(TypeError, match='checkpoint paths'): AttentionViewer([paths[0], 3])
    with pytest.raises(TypeError, match='source must be'): AttentionViewer(42)


def test_attention_viewer_reads_every_layer_in_one_pass_per_checkpoint_and_image(tmp_path, monkeypatch):
    from folk_nb import viewers
    from folk_nb.attention import cls_attention
    from folk_nb.models import normalize_images
    m = tiny('mae', model_kwargs=dict(depth=3, embed_dim=32, num_heads=2))
    paths = [save_ckpt(m, tmp_path / 'a.pt', step=0)]
    with torch.no_grad():
        for p in m.backbone.parameters(): p.add_(0.3 * torch.randn_like(p))
    paths.append(save_ckpt(m, tmp_path / 'b.pt', step=5))
    calls, real = [], viewers.attention_layers
    monkeypatch.setattr(viewers, 'attention_layers', lambda *a, **k: calls.append(1) or real(*a, **k))
    v = AttentionViewer(paths, image='coffee')
    assert len(calls) == 1
    shown = {}
    for step in (0, 1):
        v.step.value = step
        for layer in (2, 0, 1):
            v.layer.value = layer
            for head in ('mean', 1):
                v.head.value = head; shown[step, layer, head] = v.last['attention']
            v.rollout.value = True; shown[step, layer, 'rollout'] = v.last['attention']; v.rollout.value = False
    assert len(calls) == 2                                  # one pass per checkpoint, for all its layers and rollouts
    x = v.current_image()[None]
    v.image.value = 'brick'; assert len(calls) == 3         # a new image: one pass
    v.layer.value = 0; v.rollout.value = True; v.step.value = 0; assert len(calls) == 4
    v.refresh(); assert len(calls) == 5                     # refresh forgets the maps: the redraw runs the pass again
    for step in (0, 1):                                     # the maps are cls_attention's / attention_maps', layer by layer
        vit = load_method(paths[step])[0].backbone.model
        for layer in (0, 1, 2):
            raw = cls_attention(vit, normalize_images(x), layer)
            for head in ('mean', 1):
                np.testing.assert_allclose(shown[step, layer, head], head_map(raw, None if head == 'mean' else head)[0].numpy(),
                                           atol=1e-5)
            np.testing.assert_array_equal(shown[step, layer, 'rollout'], attention_maps(vit, x, layer, rollout=True)[0].numpy())
    assert not np.allclose(shown[0, 2, 'mean'], shown[1, 2, 'mean'])   # the checkpoints differ: the comparison has teeth



def synced(fig) -> bool:
    "The state a browser view draws first (`_widget_data`) equals the figure's data (numpy arrays compared as lists)."
    plain = lambda v: v.tolist() if isinstance(v, np.ndarray) else v
    norm = lambda traces: [{k: plain(v) for k, v in t.items()} for t in traces]
    return norm(fig._widget_data) == norm(fig._data)


def test_viewers_keep_the_state_a_late_browser_view_draws(tmp_path):
    rv = ReconstructionViewer(tiny('mfm'))
    rv.radius.value = 4.0; rv.kind.value = 'Com'                          # updates after construction: deltas
    assert synced(rv.fig) and rv.fig._widget_data[1]['source'] == rv.fig.data[1].source
    av = AttentionViewer(tiny('famt'))
    assert av.head.label == 'mean of heads' and 'mean of heads' in av.info.value   # the dropdown names its value
    av.head.value = 1; av.layer.value = 0
    assert synced(av.fig) and 'layer 0, head 1' in av.info.value
    d = TrainingDashboard(min_interval=0.0)
    d.on_log(dict(step=1, loss=1.0, lr=0.1, img_per_s=10.0, time=1.0))
    assert synced(d.fig) and d.fig._widget_data[3]['name'] == 'loss'


# ---------------------------------------------------------------- dashboard
def test_dashboard_on_log_updates_traces_and_throttles():
    d = TrainingDashboard(total_steps=100, min_interval=0.0)
    rows = [dict(step=s, epoch=0, loss=1.0 / s, loss_mfm=0.5 / s, lr=1e-3 * s, img_per_s=100.0 + s, time=0.5 * s)
            for s in (10, 20, 30)]
    for r in rows: d.on_log(r)
    assert d.draws == 3
    traces = {t.name: t for t in d.fig.data}
    np.testing.assert_allclose(traces['loss'].y, [r['loss'] for r in rows])
    np.testing.assert_allclose(traces['loss_mfm'].x, [10, 20, 30])
    np.testing.assert_allclose(traces['lr'].y, [r['lr'] for r in rows])
    np.testing.assert_allclose(traces['img/s'].y, [110.0, 120.0, 130.0])
    assert 'step 30/100 (30%)' in d.status.value and 'ETA 35 s' in d.status.value   # 20 steps per 10 s, 70 to go
    d.on_eval(dict(step=30, epoch=1, knn_top1=0.25))
    np.testing.assert_allclose(traces['kNN top-1'].y, [0.25])
    slow = TrainingDashboard(min_interval=3600)
    slow.on_log(rows[0]); slow.on_log(rows[1])
    assert slow.draws == 1 and len(slow.fig.data[0].x) == 1          # throttled: the second row waits
    slow.on_end(dict(status='finished', steps=20, seconds=10.0, img_per_s=50.0, last=rows[1], checkpoint='c.pt'))
    assert slow.draws == 2 and len(slow.fig.data[0].x) == 2 and 'finished' in slow.status.value
    with pytest.raises(ValueError, match='total_steps'): TrainingDashboard(total_steps=0)
    few = TrainingDashboard(loss_parts=1, min_interval=0.0)           # more loss columns than traces: the first wins
    few.on_log(rows[0])
    assert list(few._loss_traces) == ['loss'] and len(few.fig.data) == 4 and few.fig.data[3].name == 'loss'


def test_dashboard_through_a_trainer_run(tmp_path):
    m = tiny('mfm')
    loader = GPUDataLoader(sample_images(size=32), views='mfm', batch_size=7, device='cpu', seed=0)
    knn = dict(images=(sample_images(size=32) * 255).to(torch.uint8), targets=torch.arange(14))
    d = TrainingDashboard(total_steps=8, min_interval=0.0)
    cfg = TrainConfig(max_steps=8, lr=1e-3, log_every=2, knn_every=1, progress=False, out_dir=str(tmp_path))
    summary = Trainer(m, loader, cfg, knn_data=(knn, knn), callbacks=[d]).fit()
    logged = CSVLog(tmp_path / 'log.csv').rows()
    assert [r['step'] for r in d.rows] == [int(r['step']) for r in logged] == [2, 4, 6, 8]
    traces = {t.name: t for t in d.fig.data}
    np.testing.assert_allclose(traces['loss'].y, [float(r['loss']) for r in logged], rtol=1e-6)
    np.testing.assert_allclose(traces['lr'].y, [float(r['lr']) for r in logged], rtol=1e-6)
    evals = CSVLog(tmp_path / 'eval.csv').rows()
    assert len(evals) >= 3 and np.allclose(traces['kNN top-1'].y, [float(r['knn_top1']) for r in evals])
    assert d.summary['steps'] == summary['steps'] == 8 and d.status.value.startswith('<b>finished</b>')
