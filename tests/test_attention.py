"""Tests for folk_nb.attention against manual recomputation from block weights and per-image numpy references."""
import math

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from folk_nb.attention import (AttentionBank, attention_map, box_resample, boxes_from_crop_params, check_vit,
                               cls_attention, famt_weights, frequency_prior, refresh_steps, should_refresh,
                               smooth_map, unfused_attention)

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def sharpen(model, factor=25.0):
    "Scale q/k weights so random-init attention is far from uniform (a weak test otherwise)."
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.mul_(factor)
    return model


def tiny_vit(**kw):
    torch.manual_seed(0)
    args = dict(pretrained=False, img_size=32, patch_size=8, depth=2)
    args.update(kw)
    return sharpen(timm.create_model('vit_tiny_patch16_224', **args))


def manual_attention(model, x):
    "Full softmax(q k^T / sqrt(d)) of every block, recomputed from the block input and its own weights."
    inputs = []
    hooks = [blk.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach())) for blk in model.blocks]
    with torch.no_grad():
        model.eval()
        model.forward_features(x)  # the model's own (fused) path
    for h in hooks: h.remove()
    out = []
    with torch.no_grad():
        for blk, t in zip(model.blocks, inputs):
            y = blk.norm1(t).double()  # recompute in float64
            b, n, c = y.shape
            heads, d = blk.attn.num_heads, blk.attn.head_dim
            qkv = (y @ blk.attn.qkv.weight.double().T + blk.attn.qkv.bias.double()).reshape(b, n, 3, heads, d)
            q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, heads, T, d)
            out.append(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1).numpy())
    return out  # list of (B, heads, T, T) float64


# ---------------------------------------------------------------- attention extraction
@pytest.mark.parametrize('layer', [0, 1, -1])
def test_cls_attention_matches_manual_softmax_all_heads(layer):
    model = tiny_vit()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    got = cls_attention(model, x, layer=layer).numpy()
    ref = manual_attention(model, x)[layer][:, :, 0, 1:].reshape(3, 3, 4, 4)
    np.testing.assert_allclose(got, ref, atol=2e-5)
    assert ref.max() > 0.2  # attention is peaked: the comparison has teeth


def test_attention_map_minmax_head_mean_and_rollout_match_reference():
    model = tiny_vit(num_heads=4, embed_dim=64, img_size=(24, 40), patch_size=8, depth=3)
    x = torch.randn(2, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    full = manual_attention(model, x)
    # one layer: per-head min-max over patches, then head mean
    for layer in (1, 2):
        rows = full[layer][:, :, 0, 1:]
        lo, hi = rows.min(-1, keepdims=True), rows.max(-1, keepdims=True)
        ref = ((rows - lo) / (hi - lo)).mean(1).reshape(2, 3, 5)
        np.testing.assert_allclose(attention_map(model, x, layer=layer).numpy(), ref, atol=2e-5)
        np.testing.assert_allclose(attention_map(model, x, layer=layer, normalize=False).numpy(),
                                   rows.mean(1).reshape(2, 3, 5), atol=2e-5)
    # rollout through blocks 0..layer, per image (plain numpy loop)
    for layer in (0, 2):
        ref = []
        for i in range(2):
            r = np.eye(full[0].shape[-1])
            for l in range(layer + 1):
                a = full[l][i].mean(0) + np.eye(r.shape[0])
                a = a / a.sum(-1, keepdims=True)
                r = a @ r
            row = r[0, 1:]
            ref.append(((row - row.min()) / (row.max() - row.min())).reshape(3, 5))
        np.testing.assert_allclose(attention_map(model, x, layer=layer, rollout=True).numpy(), np.stack(ref), atol=3e-5)


def test_prefix_and_register_tokens_are_respected():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    # CLS + 4 registers: keys of the 5 prefix tokens are dropped, CLS is token 0
    m = sharpen(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, reg_tokens=4))
    assert m.num_prefix_tokens == 5
    ref = manual_attention(m, x)[-1][:, :, 0, 5:].reshape(2, 3, 4, 4)
    np.testing.assert_allclose(cls_attention(m, x).numpy(), ref, atol=2e-5)
    # DeiT distilled: CLS + distillation token
    d = sharpen(timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, img_size=32, patch_size=8,
                                  depth=2))
    ref = manual_attention(d, x)[-1][:, :, 0, 2:].reshape(2, 3, 4, 4)
    np.testing.assert_allclose(cls_attention(d, x).numpy(), ref, atol=2e-5)
    # no CLS, 4 registers: mean over patch queries
    g = sharpen(VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, reg_tokens=4,
                                  class_token=False, global_pool='avg'))
    ref = manual_attention(g, x)[0][:, :, 4:, 4:].mean(2).reshape(2, 3, 4, 4)
    np.testing.assert_allclose(cls_attention(g, x, layer=0, query='mean').numpy(), ref, atol=2e-5)
    with pytest.raises(ValueError, match='CLS'):
        attention_map(g, x)


def test_mode_flags_grad_and_fused_flags_are_restored():
    model = tiny_vit()
    model.train()
    model.blocks[1].mlp.eval()  # a mixed state must come back exactly
    before = [m.training for m in model.modules()]
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    a = attention_map(model, x)
    assert not a.requires_grad
    assert [m.training for m in model.modules()] == before
    assert all(b.attn.fused_attn for b in model.blocks)
    assert all(len(b.attn.attn_drop._forward_pre_hooks) == 0 for b in model.blocks)
    with torch.no_grad():  # also works inside no_grad, and in eval mode
        model.eval()
        torch.testing.assert_close(attention_map(model, x), a)


def test_state_restored_after_an_error_inside_the_forward():
    model = tiny_vit()
    with pytest.raises(Exception):
        attention_map(model, torch.randn(1, 3, 40, 40))  # wrong size for a fixed-size ViT: timm raises
    assert model.training and all(b.attn.fused_attn for b in model.blocks)
    assert all(len(b.attn.attn_drop._forward_pre_hooks) == 0 for b in model.blocks)
    with pytest.raises(RuntimeError):
        with unfused_attention(model):
            assert not any(b.attn.fused_attn for b in model.blocks)
            raise RuntimeError
    assert all(b.attn.fused_attn for b in model.blocks)



def test_fused_blocks_give_the_same_activations_as_unfused():
    model = tiny_vit(depth=4).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fused = model.forward_features(x)
        for b in model.blocks: b.attn.fused_attn = False
        unfused = model.forward_features(x)
    for b in model.blocks: b.attn.fused_attn = True
    torch.testing.assert_close(fused, unfused, atol=1e-3, rtol=1e-3)  # float rounding (sharpened q, k)


@pytest.mark.parametrize('layer', [0, 1, 2, -1])
def test_reading_unfuses_only_the_blocks_read_and_matches_all_unfused(layer):
    model = tiny_vit(depth=4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    calls = [(lambda: cls_attention(model, x, layer), 'rows'),
             (lambda: attention_map(model, x, layer), 'rows'),
             (lambda: attention_map(model, x, layer, normalize=False), 'rows'),
             (lambda: attention_map(model, x, layer, rollout=True), 'rollout'),
             (lambda: attention_map(model, x, layer, rollout=True, normalize=False), 'rollout')]
    for b in model.blocks: b.attn.fused_attn = False          # reference: every block unfused, by hand
    refs = [f() for f, _ in calls]
    for b in model.blocks: b.attn.fused_attn = True
    seen = {}
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, m.fused_attn))
             for i, b in enumerate(model.blocks)]
    L = layer % 4
    for (f, reduce), ref in zip(calls, refs):
        seen.clear()
        torch.testing.assert_close(f(), ref, atol=1e-4, rtol=1e-4)  # earlier blocks fused: float rounding only
        unfused = sorted(i for i, fused in seen.items() if not fused)
        assert unfused == ([L] if reduce == 'rows' else list(range(L + 1)))
        assert max(seen) == L                                   # the forward stops after the block read
        assert all(b.attn.fused_attn for b in model.blocks)
        assert all(len(b.attn.attn_drop._forward_pre_hooks) == 0 for b in model.blocks)
    for h in hooks: h.remove()


def test_flags_restored_exactly_with_a_mixed_state_and_blocks_argument():
    model = tiny_vit(depth=4)
    model.blocks[1].attn.fused_attn = False                     # a mixed state must come back exactly
    x = torch.randn(1, 3, 32, 32)
    attention_map(model, x, layer=2); attention_map(model, x, layer=3, rollout=True)
    assert [b.attn.fused_attn for b in model.blocks] == [True, False, True, True]
    with pytest.raises(RuntimeError):
        with unfused_attention(model, [model.blocks[2], model.blocks[3].attn]):
            assert [b.attn.fused_attn for b in model.blocks] == [True, False, False, False]
            raise RuntimeError
    assert [b.attn.fused_attn for b in model.blocks] == [True, False, True, True]


def test_batched_equals_per_image():
    model = tiny_vit()
    x = torch.randn(5, 3, 32, 32)
    batched = attention_map(model, x, rollout=True)
    single = torch.cat([attention_map(model, x[i:i + 1], rollout=True) for i in range(5)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-4)


def test_non_vit_and_bad_arguments():
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(TypeError, match='Vision Transformer'):
        attention_map(timm.create_model('resnet18', pretrained=False), x)
    with pytest.raises(TypeError, match='Vision Transformer'):
        check_vit(torch.nn.Linear(3, 3))
    model = tiny_vit()
    with pytest.raises(ValueError, match='layer'): attention_map(model, x, layer=2)
    with pytest.raises(ValueError, match='layer'): attention_map(model, x, layer=1.0)
    with pytest.raises(ValueError, match='query'): attention_map(model, x, query='max')
    with pytest.raises(ValueError, match='4-D'): attention_map(model, x[0])
    with pytest.raises(ValueError, match='channels'): attention_map(model, torch.randn(1, 1, 32, 32))


# ---------------------------------------------------------------- crop alignment
def reference_aligned(full_map, top, left, height, width, flip, grid, pixels_per_cell):
    "Per image: upsample to pixels, crop, flip, area-average onto the grid (exact by block supersampling)."
    img = np.kron(full_map, np.ones((pixels_per_cell, pixels_per_cell)))
    crop = img[top:top + height, left:left + width]
    if flip: crop = crop[:, ::-1]
    gh, gw = grid
    sup = np.kron(crop, np.ones((gh, gw)))                       # (height*gh, width*gw)
    return sup.reshape(gh, height, gw, width).mean((1, 3))


def test_aligned_matches_per_image_crop_resize_reference():
    rng = np.random.default_rng(0)
    n, size, ppc = 12, (7, 5), 6                                    # bank maps 7 x 5, image 42 x 30 px
    H, W = size[0] * ppc, size[1] * ppc
    maps = rng.random((n, *size)).astype(np.float32)
    bank = AttentionBank(n, size)
    bank.update(torch.arange(n), torch.from_numpy(maps))
    b = 9
    idx = rng.integers(0, n, b)
    params = []
    for _ in range(b):
        h, w = rng.integers(3, H + 1), rng.integers(3, W + 1)
        params.append((rng.integers(0, H - h + 1), rng.integers(0, W - w + 1), h, w))
    params = np.array(params)
    flips = rng.random(b) < 0.5
    for grid in [(4, 4), (3, 6), (7, 5)]:
        got = bank.aligned(torch.from_numpy(idx), boxes_from_crop_params(torch.from_numpy(params), (H, W)),
                           torch.from_numpy(flips), grid=grid)
        got_px = bank.aligned(torch.from_numpy(idx),
                              torch.from_numpy(np.stack([params[:, 1], params[:, 0], params[:, 1] + params[:, 3],
                                                         params[:, 0] + params[:, 2]], 1)).float(),
                              torch.from_numpy(flips), grid=grid, image_size=(H, W))
        for i in range(b):
            ref = reference_aligned(maps[idx[i]], *params[i], flips[i], grid, ppc)
            np.testing.assert_allclose(got[i].numpy(), ref, atol=1e-5)
            np.testing.assert_allclose(got_px[i].numpy(), ref, atol=1e-5)


@pytest.mark.parametrize('seed', range(6))
def test_single_hot_cell_lands_in_the_right_patch(seed):
    rng = np.random.default_rng(seed)
    g = 8
    r, c = rng.integers(0, g, 2)
    full = torch.zeros(1, g, g); full[0, r, c] = 1.0
    k = int(rng.integers(2, g + 1))                                 # crop of k x k cells, output k x k: scale 1
    r0 = int(rng.integers(max(0, r - k + 1), min(r, g - k) + 1))    # the crop contains the hot cell
    c0 = int(rng.integers(max(0, c - k + 1), min(c, g - k) + 1))
    box = torch.tensor([[c0 / g, r0 / g, (c0 + k) / g, (r0 + k) / g]])
    for flip in (False, True):
        out = box_resample(full, box, (k, k), torch.tensor([flip]))[0]
        want = torch.zeros(k, k)
        want[r - r0, (k - 1 - (c - c0)) if flip else (c - c0)] = 1.0
        torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    # a crop that misses the hot cell sees nothing (the public AMT code's top-left read would)
    if r >= 2:
        out = box_resample(full, torch.tensor([[0.0, 0.0, 1.0, (r - 1) / g]]), (2, 2))
        assert out.abs().max() < 1e-7


def test_bank_update_resamples_and_fills():
    bank = AttentionBank(5, (4, 4))
    fine = torch.rand(2, 8, 8)
    bank.update(torch.tensor([1, 3]), fine)
    torch.testing.assert_close(bank.maps[[1, 3]], fine.reshape(2, 4, 2, 4, 2).mean((2, 4)))
    assert bank.filled.tolist() == [False, True, False, True, False]
    assert torch.equal(bank.maps[0], torch.ones(4, 4))  # unfilled: uniform
    state = {k: v.clone() for k, v in bank.state_dict().items()}
    other = AttentionBank(5, (4, 4)); other.load_state_dict(state)
    assert torch.equal(other.maps, bank.maps) and torch.equal(other.filled, bank.filled)


def test_bank_and_resample_bad_input():
    bank = AttentionBank(4, 4)
    with pytest.raises(ValueError, match='indices'): bank.update(torch.tensor([4]), torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match='indices'): bank.aligned(torch.tensor([0.5]), torch.rand(1, 4))
    with pytest.raises(ValueError, match='maps'): bank.update(torch.tensor([0]), torch.rand(4, 4))
    with pytest.raises(ValueError, match='maps'): bank.update(torch.tensor([0]), -torch.rand(1, 4, 4))
    with pytest.raises(ValueError, match='crop_boxes'):
        bank.aligned(torch.tensor([0]), torch.tensor([[0.5, 0.0, 0.4, 1.0]]))  # x1 < x0
    with pytest.raises(ValueError, match='crop_boxes'):
        bank.aligned(torch.tensor([0]), torch.tensor([[0.0, 0.0, 1.5, 1.0]]))  # outside the image
    with pytest.raises(ValueError, match='crop_boxes'):
        bank.aligned(torch.tensor([0, 1]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    with pytest.raises(ValueError, match='flips'):
        bank.aligned(torch.tensor([0]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]), flips=torch.tensor([True, False]))
    with pytest.raises(ValueError, match='size'): box_resample(torch.rand(1, 4, 4), torch.tensor([[0., 0., 1., 1.]]), 0)
    with pytest.raises(ValueError, match='num_images'): AttentionBank(0)


# ---------------------------------------------------------------- refresh schedule
@pytest.mark.parametrize('total,every', [(100, 0.1), (1000, 0.1), (7, 0.1), (1, 0.1), (300, 0.25), (50, 1.0)])
def test_refresh_schedule(total, every):
    steps = refresh_steps(total, every)
    interval = max(1, round(total * every))
    want = [s for s in range(1, total) if s % interval == 0]
    assert steps == want and all(0 < s < total for s in steps)
    assert [s for s in range(total + 5) if should_refresh(s, total, every)] == steps
    if total >= 10 and every == 0.1: assert len(steps) == 9
    with pytest.raises(ValueError, match='every'): refresh_steps(total, 0)
    with pytest.raises(ValueError, match='total_steps'): should_refresh(3, 0)



@pytest.mark.parametrize('total,every,min_interval', [(1000, 0.1, 250), (1000, 0.1, 100), (1000, 0.1, 40),
                                                      (100, 0.1, 33), (17, 0.1, 5), (10, 0.5, 20)])
def test_refresh_schedule_min_interval(total, every, min_interval):
    steps = refresh_steps(total, every, min_interval)
    interval = max(min_interval, max(1, round(total * every)))
    assert steps == [s for s in range(1, total) if s % interval == 0]
    assert [s for s in range(total + 5) if should_refresh(s, total, every, min_interval)] == steps
    assert all(b - a >= min_interval for a, b in zip(steps, steps[1:]))
    if min_interval <= round(total * every): assert steps == refresh_steps(total, every)  # floor not binding


def test_refresh_schedule_min_interval_example_and_errors():
    assert refresh_steps(1000, 0.1, min_interval=250) == [250, 500, 750]   # 50 steps/epoch, >= 5 epochs apart
    assert refresh_steps(1000, 0.1) == refresh_steps(1000, 0.1, 1) == list(range(100, 1000, 100))
    for bad in (0, -3, 2.5, True, None):
        with pytest.raises(ValueError, match='min_interval'): refresh_steps(100, 0.1, bad)
        with pytest.raises(ValueError, match='min_interval'): should_refresh(10, 100, 0.1, bad)


# ---------------------------------------------------------------- FAMT weights
def test_famt_weights_plain_is_normalised_attention_plus_eps():
    a = np.random.default_rng(1).random((3, 6, 6))
    w = famt_weights(torch.from_numpy(a).float(), eps=1e-3).numpy()
    ref = np.stack([(m / m.sum()).ravel() + 1e-3 for m in a])
    np.testing.assert_allclose(w, ref, rtol=1e-5)
    # a finer map on a coarser patch grid: attention summed per patch
    w = famt_weights(torch.from_numpy(a).float(), grid=(3, 2), eps=0).numpy()
    ref = np.stack([m.reshape(3, 2, 2, 3).sum((1, 3)).ravel() / m.sum() for m in a])
    np.testing.assert_allclose(w, ref, rtol=1e-5)


def reference_smooth(m, s):
    "Spatial-domain reference: edge-pad, circular convolution with the Gaussian whose transform is exp(-f^2/2s^2)."
    h, w = m.shape
    p = np.pad(m, ((h, h), (w, w)), mode='edge')
    out = np.zeros_like(p)
    sig = 1 / (2 * np.pi * s)
    rad = int(np.ceil(8 * sig))
    ky = np.exp(-np.arange(-rad, rad + 1) ** 2 / (2 * sig ** 2)); ky /= ky.sum()
    tmp = sum(ky[i + rad] * np.roll(p, i, 0) for i in range(-rad, rad + 1))
    out = sum(ky[i + rad] * np.roll(tmp, i, 1) for i in range(-rad, rad + 1))
    return out[h:2 * h, w:2 * w]


@pytest.mark.parametrize('s', [0.08, 0.12])  # transfer ~0 at Nyquist: sampled kernel is exact
def test_smooth_map_matches_spatial_gaussian(s):
    m = np.random.default_rng(2).random((2, 9, 13))
    got = smooth_map(torch.from_numpy(m).float(), s).numpy()
    for i in range(2):
        np.testing.assert_allclose(got[i], reference_smooth(m[i], s), atol=2e-4)


def test_smoothing_suppresses_isolated_peaks():
    yy, xx = np.mgrid[0:14, 0:14]
    blob = np.exp(-((yy - 8) ** 2 + (xx - 9) ** 2) / 8)
    spike = np.zeros((14, 14)); spike[2, 3] = 1
    w = famt_weights(torch.from_numpy(blob + spike)[None].float(), smooth_cutoff=0.15, eps=0)[0].reshape(14, 14)
    assert w[2, 3] < 0.25 * w[8, 9]                     # before smoothing the spike was as high as the blob top
    assert w.argmax() == 8 * 14 + 9


def reference_prior(img, grid, cutoff):
    "Per image numpy: grey, disc low-pass (cycles per patch) clamped to [0, 1], residual^2, patch means."
    grey = img.mean(0)
    h, w = grey.shape
    gh, gw = grid
    fy = (np.arange(h) - h // 2) * gh / h
    fx = (np.arange(w) - w // 2) * gw / w
    keep = (fy[:, None] ** 2 + fx[None] ** 2) <= cutoff ** 2
    spec = np.fft.fftshift(np.fft.fft2(grey))
    low = np.clip(np.fft.ifft2(np.fft.ifftshift(spec * keep)).real, 0, 1)
    e = ((grey - low) ** 2).reshape(gh, h // gh, gw, w // gw).mean((1, 3))
    return e / e.sum()


def test_frequency_prior_matches_numpy_reference_and_mixes():
    from folk_nb.images import sample_images
    imgs = sample_images(['astronaut', 'brick', 'coins'], size=48)
    for grid, cutoff in [((6, 6), 1.0), ((4, 3), 0.5)]:
        got = frequency_prior(imgs, grid, cutoff).numpy()
        for i in range(3):
            np.testing.assert_allclose(got[i], reference_prior(imgs[i].double().numpy(), grid, cutoff), atol=2e-5)
    att = torch.rand(3, 6, 6, generator=torch.Generator().manual_seed(4))
    p = frequency_prior(imgs, (6, 6)).numpy().reshape(3, -1)
    an = (att / att.sum((1, 2), keepdim=True)).reshape(3, -1).numpy()
    prod = an * p; prod /= prod.sum(1, keepdims=True)
    np.testing.assert_allclose(famt_weights(att, imgs, freq_prior=True, eps=0).numpy(), prod, rtol=1e-4, atol=1e-7)
    mixed = 0.7 * an + 0.3 * p
    np.testing.assert_allclose(famt_weights(att, imgs, freq_prior=True, mix=0.3, eps=0).numpy(), mixed, atol=1e-6)


def test_frequency_prior_prefers_textured_patches():
    g = torch.Generator().manual_seed(5)
    img = torch.full((1, 3, 32, 32), 0.5)
    img[..., :, 16:] = torch.rand(1, 1, 32, 16, generator=g)  # right half noisy, left half flat
    p = frequency_prior(img, (4, 4))[0]
    assert p[:, 2:].sum() > 0.95 and p[:, :2].sum() < 0.05


def test_famt_weights_bad_input():
    a = torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match='attention'): famt_weights(a.flatten(1))
    with pytest.raises(ValueError, match='attention'): famt_weights(a * float('nan'))
    with pytest.raises(ValueError, match='attention'): famt_weights(-a)
    with pytest.raises(ValueError, match='images'): famt_weights(a, freq_prior=True)
    with pytest.raises(ValueError, match='images'): famt_weights(a, torch.rand(3, 3, 16, 16), freq_prior=True)
    with pytest.raises(ValueError, match='mix'): famt_weights(a, torch.rand(2, 3, 16, 16), freq_prior=True, mix=2)
    with pytest.raises(ValueError, match='mix'): famt_weights(a, torch.rand(2, 3, 16, 16), freq_prior=True, mix='sum')
    with pytest.raises(ValueError, match='smooth_cutoff'): famt_weights(a, smooth_cutoff=0)
    with pytest.raises(ValueError, match='grid'): famt_weights(a, grid=(0, 2))
    with pytest.raises(ValueError, match='images'):  # normalised (not [0, 1]) images
        famt_weights(a, torch.randn(2, 3, 16, 16) * 3, freq_prior=True)


@pytest.mark.parametrize('device', DEVICES)
def test_end_to_end_on_device(device):
    from folk_nb.patch_masks import mask_throw_keep
    model = tiny_vit().to(device)
    x = torch.rand(4, 3, 32, 32, device=device)
    bank = AttentionBank(10, (4, 4), device=device)
    bank.update(torch.tensor([0, 2, 4, 6], device=device), attention_map(model, x))
    maps = bank.aligned(torch.tensor([0, 2, 4, 6], device=device), torch.tensor([[0., 0., 1., 1.]] * 4, device=device),
                        torch.tensor([False, True, False, True], device=device), grid=(4, 4))
    w = famt_weights(maps, x, smooth_cutoff=0.2, freq_prior=True, mix=0.5)
    s = mask_throw_keep(w, generator=torch.Generator(device=device).manual_seed(0))
    assert [t.shape for t in s] == [(4, 7), (4, 6), (4, 3)] and s.masked.device.type == device
