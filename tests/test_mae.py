"""MAE and FAMT (folk_nb.mae): splits, what the encoder / decoder / loss see, the attention bank and its refresh
schedule, statistics of the guided masking, training, config and checkpoint round trips.

References here are written independently of the library: per-image numpy loops for patches, losses, crop
pasting and Plackett-Luce draws, and a hand-written softmax(q k^T) for the CLS attention.
"""
import dataclasses
import math

import numpy as np
import pytest
import torch

from folk_nb.attention import refresh_steps
from folk_nb.data import create_loader
from folk_nb.methods import create_method
from folk_nb.mae import FAMT, MAE, paste_patches, show_split, uncrop_maps
from folk_nb.models import normalize_images
from folk_nb.patch_masks import PatchSplit
from folk_nb.trainer import TrainConfig, Trainer, load_checkpoint

torch.set_num_threads(1)

TINY = dict(model='vit_tiny_patch16_224', img_size=32, patch_size=8,
            model_kwargs={'depth': 2, 'embed_dim': 32, 'num_heads': 2},
            decoder_dim=32, decoder_depth=1, decoder_heads=2)
P = 8          # patch size
N = 16         # 4 x 4 patches
GRID = (4, 4)


def tiny_mae(**kw):
    torch.manual_seed(0)
    return MAE(**{**TINY, **kw})


def tiny_famt(num_images=4, **kw):
    torch.manual_seed(0)
    return FAMT(**{**TINY, 'num_images': num_images, **kw})


def images(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    # smooth random images (a coarse grid upsampled) plus a little noise: every patch has some variance
    coarse = torch.rand(b, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(coarse, size=(32, 32), mode='bilinear', align_corners=False)
    return (0.8 * x + 0.2 * torch.rand(b, 3, 32, 32, generator=g)).clamp(0, 1)


def full_batch(x, index=None, flipped=None):
    b = len(x)
    return dict(views=[x], index=torch.arange(b) if index is None else index,
                boxes=[torch.tensor([[0., 0., 1., 1.]]).repeat(b, 1)],
                flipped=[torch.zeros(b, dtype=torch.bool) if flipped is None else flipped])


def guided(m, batch):
    "Put a FAMT past its first refresh with every image of `batch` refreshed (no refresh pending afterwards)."
    m.schedule(10, 100)
    m(batch)
    assert not m.pending


def set_bank(m, maps):
    "Write maps into the bank and mark the current refresh done for every image."
    m.bank_maps.copy_(maps)
    m.bank_filled.fill_(True)
    m.refresh_version.fill_(1)
    m.bank_version.fill_(1)
    m._forget_mirrors()


# ----------------------------------------------------------------------------------- independent references

def patches_np(img, p):
    "Patches of one image (C, H, W) as rows (row-major grid), each flattened as (p, q, c) - loops."
    c, h, w = img.shape
    rows = []
    for i in range(h // p):
        for j in range(w // p):
            rows.append(np.transpose(img[:, i * p:(i + 1) * p, j * p:(j + 1) * p], (1, 2, 0)).reshape(-1))
    return np.stack(rows)


def mae_loss_np(pred, x_norm, masked, p, norm_pix=True):
    "Mean over images and masked patches of the per-patch MSE (norm_pix: unbiased variance + 1e-6)."
    losses = []
    for b in range(len(x_norm)):
        pt = patches_np(x_norm[b], p)
        for k, idx in enumerate(masked[b]):
            t = pt[idx].astype(np.float64)
            if norm_pix: t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
            losses.append(np.mean((pred[b, k].astype(np.float64) - t) ** 2))
    return float(np.mean(losses))


def uncrop_np(m, box, flip, size):
    "Paste one crop map (gh, gw) into a full (H, W) grid: explicit overlap areas; returns (full, coverage)."
    gh, gw = m.shape
    H, W = size
    if flip: m = m[:, ::-1]
    x0, y0, x1, y1 = box
    full, cov = np.zeros((H, W)), np.zeros((H, W))
    for k in range(H):
        for l in range(W):
            for i in range(gh):
                for j in range(gw):
                    cy0, cy1 = y0 + (y1 - y0) * i / gh, y0 + (y1 - y0) * (i + 1) / gh
                    cx0, cx1 = x0 + (x1 - x0) * j / gw, x0 + (x1 - x0) * (j + 1) / gw
                    oy = max(0.0, min((k + 1) / H, cy1) - max(k / H, cy0))
                    ox = max(0.0, min((l + 1) / W, cx1) - max(l / W, cx0))
                    a = oy * ox * H * W   # fraction of the full cell's area
                    full[k, l] += a * m[i, j]
                    cov[k, l] += a
    return full, cov


def cls_attention_ref(vit, x_norm):
    "Last block's CLS->patch attention by hand: softmax(q k^T / sqrt(d)), per-head min-max, head mean."
    with torch.no_grad():
        t = vit._pos_embed(vit.patch_embed(x_norm))
        t = vit.norm_pre(t)
        for blk in vit.blocks[:-1]: t = blk(t)
        blk = vit.blocks[-1]
        h = blk.norm1(t)
        B, T, D = h.shape
        nh = blk.attn.num_heads
        qkv = blk.attn.qkv(h).reshape(B, T, 3, nh, D // nh).permute(2, 0, 3, 1, 4)
        q, k = qkv[0], qkv[1]
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // nh), dim=-1)[:, :, 0, 1:]  # (B, heads, N)
        lo, hi = a.amin(-1, keepdim=True), a.amax(-1, keepdim=True)
        a = ((a - lo) / (hi - lo)).mean(1)
    return a.numpy()


def plackett_luce_np(w, n_first, n_draws, rng):
    "Sequential weighted draws without replacement; returns (n_draws, n_first) chosen indices."
    out = np.empty((n_draws, n_first), dtype=np.int64)
    for d in range(n_draws):
        avail = np.ones(len(w), dtype=bool)
        for k in range(n_first):
            p = np.where(avail, w, 0.0)
            j = rng.choice(len(w), p=p / p.sum())
            out[d, k] = j
            avail[j] = False
    return out


class Capture:
    "Forward pre-hook recording the first positional input of a module (and all args)."
    def __init__(self, module):
        self.args = None
        self.h = module.register_forward_pre_hook(lambda mod, args: setattr(self, 'args', args))
    def remove(self): self.h.remove()


# ----------------------------------------------------------------------------------- helpers of the notebook

def test_show_split_and_paste_patches_match_loops():
    x = images(3)
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (3, N), generator=g)
    out = show_split(x, labels, P, 0.5, 0.0).numpy()
    xn = x.numpy()
    for b in range(3):
        for i in range(4):
            for j in range(4):
                lab = labels[b, i * 4 + j].item()
                want = {0: xn[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P], 1: 0.5, 2: 0.0}[lab]
                np.testing.assert_array_equal(out[b, :, i * P:(i + 1) * P, j * P:(j + 1) * P],
                                              np.broadcast_to(want, (3, P, P)))
    ids = torch.stack([torch.randperm(N, generator=g)[:5] for _ in range(3)])
    new = torch.rand(3, 5, P * P * 3, generator=g)
    pasted = paste_patches(x, new, ids, P).numpy()
    for b in range(3):
        want = patches_np(xn[b], P)
        want[ids[b].numpy()] = new[b].numpy()
        np.testing.assert_array_equal(patches_np(pasted[b], P), want)
    with pytest.raises(ValueError, match='ids'):
        paste_patches(x, new, ids.int(), P)


def test_uncrop_maps_matches_explicit_overlaps():
    g = torch.Generator().manual_seed(0)
    b, gh, gw, size = 5, 4, 3, (5, 6)
    maps = torch.rand(b, gh, gw, generator=g)
    lo = torch.rand(b, 2, generator=g) * 0.5
    hi = lo + 0.1 + torch.rand(b, 2, generator=g) * (1 - lo - 0.1)
    boxes = torch.stack([lo[:, 0], lo[:, 1], hi[:, 0], hi[:, 1]], 1)
    flips = torch.tensor([True, False, True, False, False])
    full, cov = uncrop_maps(maps, boxes, size, flips)
    for i in range(b):
        f, c = uncrop_np(maps[i].numpy().astype(np.float64), boxes[i].tolist(), bool(flips[i]), size)
        np.testing.assert_allclose(full[i].numpy(), f, atol=1e-5)
        np.testing.assert_allclose(cov[i].numpy(), c, atol=1e-5)
    with pytest.raises(ValueError, match='boxes'):
        uncrop_maps(maps, boxes[:2], size)


# ----------------------------------------------------------------------------------- MAE

def test_mae_split_outputs_and_loss_match_reference():
    m = tiny_mae()
    x = images(4)
    cap = Capture(m.backbone.model.norm_pre)
    dec_out = {}
    h = m.decoder.register_forward_hook(lambda mod, a, o: dec_out.setdefault('pred', o))
    torch.manual_seed(3)
    out = m(dict(views=[x]))
    cap.remove(); h.remove()
    s = out['split']
    assert [t.shape for t in s] == [(4, 12), (4, 0), (4, 4)]
    labels = out['labels']
    assert ((labels == 1).sum(1) == 12).all() and ((labels == 0).sum(1) == 4).all()
    for b in range(4):  # the three sets partition the patches
        assert sorted(s.masked[b].tolist() + s.visible[b].tolist()) == list(range(N))
    # encoder: exactly prefix + the visible patches' tokens, in the order of the visible ids
    xn = normalize_images(x)
    with torch.no_grad():
        tokens = m.backbone.model._pos_embed(m.backbone.model.patch_embed(xn))
    seq = cap.args[0]
    assert seq.shape == (4, 1 + 4, 32)
    for b in range(4):
        torch.testing.assert_close(seq[b, 1:], tokens[b, 1 + s.visible[b]])
    # loss = independent per-patch reference on the decoder's prediction
    ref = mae_loss_np(dec_out['pred'].detach().numpy(), xn.numpy(), s.masked.numpy(), P)
    assert abs(out['loss'].item() - ref) < 1e-5 * max(1, ref)
    assert out['loss_rec'].item() == out['loss'].item() and not out['loss_rec'].requires_grad
    # display: grey where masked, visible patches unchanged in both input and prediction
    vis = (labels == 0)
    inp, pred = out['input'], out['pred']
    for b in range(4):
        xp, ip, pp = (patches_np(t[b].numpy(), P) for t in (x, inp, pred))
        np.testing.assert_array_equal(ip[vis[b].numpy()], xp[vis[b].numpy()])
        np.testing.assert_array_equal(ip[~vis[b].numpy()], 0.5)
        np.testing.assert_array_equal(pp[vis[b].numpy()], xp[vis[b].numpy()])
    assert pred.min() >= 0 and pred.max() <= 1 and not pred.requires_grad


def test_mae_random_masking_is_uniform():
    m = tiny_mae()
    x = torch.zeros(512, 3, 32, 32)
    torch.manual_seed(0)
    freq = torch.stack([(m.make_split(dict(views=[x])).masked[..., None] == torch.arange(N)).any(1).float().mean(0)
                        for _ in range(4)]).mean(0)
    assert (freq - 0.75).abs().max() < 0.04   # 2048 draws: SE 0.0096


def test_mae_validation():
    with pytest.raises(ValueError, match='needs a ViT'):
        MAE(model='resnet18', img_size=32, cifar_stem=True)
    with pytest.raises(ValueError, match='mask_ratio'):
        MAE(**{**TINY, 'mask_ratio': 1.2})
    with pytest.raises(ValueError, match='at least one'):
        MAE(**{**TINY, 'mask_ratio': 0.05})
    with pytest.raises(TypeError, match='model_kwargs'):
        MAE(**{**TINY, 'model_kwargs': ['depth', 2]})
    with pytest.raises(ValueError, match='decoder_dim'):
        MAE(**{**TINY, 'decoder_dim': 30})
    with pytest.raises(TypeError, match="views"):
        tiny_mae()({'images': 1})
    with pytest.raises(ValueError, match="views"):
        tiny_mae()(dict(views=[torch.zeros(2, 32, 32)]))


def test_mae_gradients_reach_encoder_and_decoder_only_trainable():
    m = tiny_mae()
    out = m(dict(views=[images(4)]))
    out['loss'].backward()
    for n, p in m.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
    assert not m.backbone.model.pos_embed.requires_grad           # MAE's fixed sin-cos table
    for mod in (m.backbone.model.patch_embed, m.backbone.model.blocks, m.decoder.blocks, m.decoder.pred):
        assert sum(p.grad.abs().sum().item() for p in mod.parameters()) > 0
    names = {id(p) for g in m.param_groups(0.05) for p in g['params']}
    assert id(m.backbone.model.pos_embed) not in names


def overfit(m, batch, steps=40, lr=3e-3):
    "Loss on a fixed split before and after a few Adam steps on one batch."
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=lr)
    def loss_at(seed):
        torch.manual_seed(seed)
        return m(batch)['loss']
    with torch.no_grad(): before = loss_at(0).item()
    for i in range(steps):
        loss = loss_at(i % 2)
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad(): after = loss_at(0).item()
    return before, after


def test_mae_overfits_a_fixed_batch():
    m = tiny_mae()
    before, after = overfit(m, dict(views=[images(4)]))
    assert after < 0.7 * before, (before, after)


# ----------------------------------------------------------------------------------- FAMT

def test_famt_random_before_first_refresh_then_exact_guided_counts():
    m = tiny_famt(num_images=8)
    x = images(8)
    out = m(full_batch(x))
    assert [t.shape for t in out['split']] == [(8, 12), (8, 0), (8, 4)] and m.version == 0
    torch.testing.assert_close(out['attention'], torch.full((8, 4, 4), 1 / N))
    guided(m, full_batch(x))
    out = m(full_batch(x))
    s, labels = out['split'], out['labels']
    assert [t.shape for t in s] == [(8, 7), (8, 6), (8, 3)]   # floor(0.45 * 16), floor(0.40 * 16), rest
    assert ((labels == 1).sum(1) == 7).all() and ((labels == 2).sum(1) == 6).all() and ((labels == 0).sum(1) == 3).all()
    for b in range(8):
        assert sorted(s.masked[b].tolist() + s.thrown[b].tolist() + s.visible[b].tolist()) == list(range(N))
        assert (labels[b, s.thrown[b]] == 2).all() and (labels[b, s.masked[b]] == 1).all()
    # display: thrown patches black, masked grey
    ip = [patches_np(out['input'][b].numpy(), P) for b in range(8)]
    for b in range(8):
        np.testing.assert_array_equal(ip[b][s.thrown[b].numpy()], 0.0)
        np.testing.assert_array_equal(ip[b][s.masked[b].numpy()], 0.5)


def test_famt_encoder_and_decoder_see_only_visible_and_masked():
    m = tiny_famt(num_images=4)
    x = images(4)
    guided(m, full_batch(x))
    enc = Capture(m.backbone.model.norm_pre)
    dec = Capture(m.decoder)
    dec_blocks = Capture(m.decoder.blocks)
    out = m(full_batch(x))
    for c in (enc, dec, dec_blocks): c.remove()
    s = out['split']
    xn = normalize_images(x)
    with torch.no_grad():
        tokens = m.backbone.model._pos_embed(m.backbone.model.patch_embed(xn))
    assert enc.args[0].shape == (4, 1 + 3, 32)
    for b in range(4):
        torch.testing.assert_close(enc.args[0][b, 1:], tokens[b, 1 + s.visible[b]])
    _, vis_ids, msk_ids = dec.args
    torch.testing.assert_close(vis_ids, s.visible); torch.testing.assert_close(msk_ids, s.masked)
    assert dec_blocks.args[0].shape[1] == 1 + 3 + 7                 # prefix + visible + masked, no thrown


def test_famt_thrown_pixels_do_not_change_the_loss_masked_ones_do():
    m = tiny_famt(num_images=4)
    x = images(4)
    guided(m, full_batch(x))
    torch.manual_seed(7)
    out = m(full_batch(x))
    s = out['split']
    def perturb(ids):
        xp = x.clone()
        for b in range(4):
            for i in ids[b].tolist():
                r, c = divmod(i, 4)
                xp[b, :, r * P:(r + 1) * P, c * P:(c + 1) * P] = torch.rand(3, P, P)
        return xp
    x_thrown = perturb(s.thrown)
    torch.manual_seed(7)
    out2 = m(full_batch(x_thrown))                    # same seed, weights from the bank: same split
    for a, b in zip(out2['split'], s): torch.testing.assert_close(a, b)
    assert out2['loss'].item() == out['loss'].item()
    assert m.reconstruct(x_thrown, s)['loss'].item() == m.reconstruct(x, s)['loss'].item()
    x_masked = perturb(s.masked[:, :1])
    assert abs(m.reconstruct(x_masked, s)['loss'].item() - out['loss'].item()) > 1e-4
    x_visible = perturb(s.visible[:, :1])
    assert abs(m.reconstruct(x_visible, s)['loss'].item() - out['loss'].item()) > 1e-6


def test_famt_compute_fewer_tokens_than_mae():
    x = images(4)
    counts = {}
    for name, m in (('mae', tiny_mae()), ('famt', tiny_famt(num_images=4))):
        if name == 'famt': guided(m, full_batch(x))
        enc, dec = Capture(m.backbone.model.norm_pre), Capture(m.decoder.blocks)
        m(full_batch(x))
        counts[name] = (enc.args[0].shape[1], dec.args[0].shape[1])
        enc.remove(); dec.remove()
    assert counts['mae'] == (1 + 4, 1 + 16)
    assert counts['famt'] == (1 + 3, 1 + 3 + 7)
    assert sum(counts['famt']) < sum(counts['mae'])


def test_famt_guided_split_follows_the_weights_like_plackett_luce():
    "Masked / thrown frequencies per patch vs. an independent sequential-draw simulation."
    m = tiny_famt(num_images=1, smooth_cutoff=None)
    amap = torch.full((4, 4), 0.1); amap[1:3, 1:3] = 1.0; amap[0, 3] = 0.5
    set_bank(m, amap[None])
    B, rounds = 512, 8
    batch = dict(views=[torch.zeros(B, 3, 32, 32)], index=torch.zeros(B, dtype=torch.long),
                 boxes=[torch.tensor([[0., 0., 1., 1.]]).repeat(B, 1)], flipped=[torch.zeros(B, dtype=torch.bool)])
    torch.manual_seed(0)
    mf, tf = torch.zeros(N), torch.zeros(N)
    for _ in range(rounds):
        s = m.make_split(batch)
        mf += (s.masked[..., None] == torch.arange(N)).any(1).float().sum(0)
        tf += (s.thrown[..., None] == torch.arange(N)).any(1).float().sum(0)
    n = B * rounds
    mf, tf = mf / n, tf / n
    w = amap.flatten().numpy().astype(np.float64)
    w = w / w.sum() + 1e-6
    draws = plackett_luce_np(w, 7 + 6, n, np.random.default_rng(0))
    rm = np.array([(draws[:, :7] == j).any(1).mean() for j in range(N)])
    rt = np.array([(draws[:, 7:] == j).any(1).mean() for j in range(N)])
    assert np.abs(mf.numpy() - rm).max() < 0.05, (mf, rm)     # 4096 draws each: SE of a difference <= 0.011
    assert np.abs(tf.numpy() - rt).max() < 0.05, (tf, rt)
    hot = amap.flatten() == 1.0
    assert mf[hot].min() > mf[~hot & (amap.flatten() < 0.5)].max() + 0.3   # attended patches masked far more often


def test_famt_random_before_refresh_ignores_a_peaked_bank():
    m = tiny_famt(num_images=1, smooth_cutoff=None)
    amap = torch.full((1, 4, 4), 0.01); amap[0, :2, :2] = 1.0
    set_bank(m, amap)
    m.refresh_version.fill_(0); m._forget_mirrors()           # pretend: no refresh yet
    B = 1024
    batch = dict(views=[torch.zeros(B, 3, 32, 32)], index=torch.zeros(B, dtype=torch.long),
                 boxes=[torch.tensor([[0., 0., 1., 1.]]).repeat(B, 1)], flipped=[torch.zeros(B, dtype=torch.bool)])
    torch.manual_seed(1)
    s = m.make_split(batch)
    assert s.thrown.shape[1] == 0
    f = (s.masked[..., None] == torch.arange(N)).any(1).float().mean(0)
    assert (f - 0.75).abs().max() < 0.06                      # SE 0.0135



def refresh_bumps(m, total, **kw):
    "Steps at which `schedule` bumps the refresh version."
    v = [m.schedule(step, total, **kw)['attention_refreshes'] for step in range(total)]
    return [s for s in range(1, total) if v[s] > v[s - 1]]


def test_famt_refresh_min_epochs_floor():
    # 1000 steps, 50 per epoch (20 epochs), every 0.1 = 100 steps = 2 epochs; floor 5 epochs -> every 250 steps
    assert refresh_bumps(tiny_famt(refresh_min_epochs=5), 1000, steps_per_epoch=50) == [250, 500, 750]
    assert refresh_bumps(tiny_famt(refresh_min_epochs=1.5), 1000, steps_per_epoch=50) == list(range(100, 1000, 100))
    assert refresh_bumps(tiny_famt(refresh_min_epochs=0.7), 100, steps_per_epoch=10) == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    assert refresh_bumps(tiny_famt(refresh_min_epochs=2.5), 100, steps_per_epoch=10) == [25, 50, 75]  # ceil(25.0)
    assert refresh_bumps(tiny_famt(refresh_min_epochs=2.51), 100, steps_per_epoch=10) == [26, 52, 78]  # ceil(25.1)
    # positional calls keep working; steps_per_epoch also by position
    m = tiny_famt(refresh_min_epochs=5)
    assert m.schedule(249, 1000, 50)['attention_refreshes'] == 0 and m.schedule(250, 1000, 50)['attention_refreshes'] == 1
    assert m.refresh_interval(50) == 250 and tiny_famt().refresh_interval() == 1


def test_famt_refresh_default_unchanged_by_steps_per_epoch():
    for total, every in [(1000, 0.1), (50, 0.2), (17, 0.1)]:
        want = refresh_steps(total, every)
        assert refresh_bumps(tiny_famt(refresh_every=every), total) == want
        assert refresh_bumps(tiny_famt(refresh_every=every), total, steps_per_epoch=3) == want
        assert refresh_bumps(tiny_famt(refresh_every=every, refresh_min_epochs=0), total, steps_per_epoch=None) == want


def test_famt_refresh_min_epochs_errors():
    m = tiny_famt(refresh_min_epochs=2)
    with pytest.raises(ValueError, match='steps_per_epoch.*Trainer passes it'):
        m.schedule(0, 100)
    with pytest.raises(ValueError, match='steps_per_epoch'):
        m.schedule(0, 100, steps_per_epoch=0)
    assert m.version == 0
    for bad in (-1, -0.5, float('nan'), float('inf'), True, '2', None):
        with pytest.raises(ValueError, match='refresh_min_epochs'):
            tiny_famt(refresh_min_epochs=bad)


def test_famt_refresh_min_epochs_config_round_trip():
    m = tiny_famt(num_images=6, refresh_min_epochs=2.5)
    assert m.config['refresh_min_epochs'] == 2.5 and tiny_famt().config['refresh_min_epochs'] == 0.0
    import json; assert json.loads(json.dumps(m.config)) == m.config
    m2 = create_method('famt', **m.config)
    assert m2.config == m.config and m2.refresh_min_epochs == 2.5
    assert refresh_bumps(m2, 100, steps_per_epoch=10) == refresh_bumps(m, 100, steps_per_epoch=10) == [25, 50, 75]


def test_famt_bank_refresh_schedule_values_and_state_dict():
    total, every = 50, 0.2
    m = tiny_famt(num_images=6, refresh_every=every)
    versions = [m.schedule(step, total)['attention_refreshes'] for step in range(total)]
    bumps = [s for s in range(1, total) if versions[s] > versions[s - 1]]
    assert bumps == refresh_steps(total, every) == [10, 20, 30, 40]
    assert versions[9] == 0 and versions[10] == 1 and versions[-1] == 4
    assert m.schedule(12, total)['attention_refreshes'] == 4            # idempotent, never goes back
    # fresh model: first refresh at step 10
    m = tiny_famt(num_images=6, refresh_every=every)
    m.schedule(10, total)
    assert m.version == 1 and m.pending
    x = images(4, seed=5)
    index = torch.tensor([4, 0, 2, 5])
    boxes = torch.tensor([[0., 0., 1., 1.], [0.25, 0., 0.75, 0.5], [0.1, 0.3, 0.8, 0.9], [0., 0.5, 0.5, 1.]])
    flipped = torch.tensor([False, True, True, False])
    batch = dict(views=[x], index=index, boxes=[boxes], flipped=[flipped])
    att = cls_attention_ref(m.backbone.model, normalize_images(x)).reshape(4, 4, 4)
    m(batch)
    for b in range(4):
        f, c = uncrop_np(att[b].astype(np.float64), boxes[b].tolist(), bool(flipped[b]), GRID)
        fill = f.sum() / c.sum()                     # a first map: uncovered cells get the crop map's mean
        np.testing.assert_allclose(m.bank_maps[index[b]].numpy(), f + (1 - c) * fill, atol=1e-5)
    assert m.bank_filled.tolist() == [True, False, True, False, True, True]
    assert m.bank_version.tolist() == [1, 0, 1, 0, 1, 1]
    assert m.pending                                 # images 1 and 3 not seen yet
    torch.testing.assert_close(m.bank_maps[[1, 3]], torch.ones(2, 4, 4))
    # images refreshed at this version are not recomputed when they come again
    before = m.bank_maps.clone()
    m(dict(views=[images(4, seed=6)], index=index, boxes=[boxes], flipped=[flipped]))
    torch.testing.assert_close(m.bank_maps, before)
    # second refresh: uncovered cells keep the previous map
    m.schedule(20, total)
    x2 = images(4, seed=7)
    att2 = cls_attention_ref(m.backbone.model, normalize_images(x2)).reshape(4, 4, 4)
    m(dict(views=[x2], index=index, boxes=[boxes], flipped=[flipped]))
    for b in range(4):
        f, c = uncrop_np(att2[b].astype(np.float64), boxes[b].tolist(), bool(flipped[b]), GRID)
        np.testing.assert_allclose(m.bank_maps[index[b]].numpy(), f + (1 - c) * before[index[b]].numpy(), atol=1e-5)
    assert m.bank_version.tolist() == [2, 0, 2, 0, 2, 2]
    # state_dict round trip: bank, versions, and the host-side mirrors
    sd = m.state_dict()
    for k in ('bank_maps', 'bank_filled', 'bank_version', 'refresh_version'): assert k in sd
    m2 = create_method('famt', **m.config)
    assert m2.version == 0
    m2.load_state_dict(sd)
    assert m2.version == 2 and m2.pending
    for k, v in m.state_dict().items(): torch.testing.assert_close(m2.state_dict()[k], v)
    torch.testing.assert_close(m2.bank.aligned(index, boxes, flipped, GRID), m.bank.aligned(index, boxes, flipped, GRID))


def test_famt_guided_weights_use_the_aligned_map():
    "The weights a step draws from are the stored map read through the view's crop box and flip."
    m = tiny_famt(num_images=2, smooth_cutoff=None)
    amap = torch.arange(32, dtype=torch.float32).reshape(2, 4, 4) + 1
    set_bank(m, amap)
    boxes = torch.tensor([[0., 0., 0.5, 0.5], [0.5, 0.5, 1., 1.]])
    flipped = torch.tensor([True, False])
    out = m(dict(views=[images(2)], index=torch.tensor([0, 1]), boxes=[boxes], flipped=[flipped]))
    want = torch.stack([amap[0, :2, :2].repeat_interleave(2, 0).repeat_interleave(2, 1).flip(-1),
                        amap[1, 2:, 2:].repeat_interleave(2, 0).repeat_interleave(2, 1)])
    torch.testing.assert_close(out['attention'], want / want.sum((1, 2), keepdim=True))


def test_famt_crop_source_uses_the_views_attention_and_no_bank():
    m = tiny_famt(num_images=4, attention_source='crop', smooth_cutoff=None)
    m.schedule(10, 100)
    assert not m.pending
    x = images(4)
    out = m(full_batch(x))
    want = torch.from_numpy(cls_attention_ref(m.backbone.model, normalize_images(x))).reshape(4, 4, 4)
    torch.testing.assert_close(out['attention'], want / want.sum((1, 2), keepdim=True), atol=1e-5, rtol=1e-4)
    assert not m.bank_filled.any()


def test_famt_attention_pass_adds_no_gradient_and_overfits():
    m = tiny_famt(num_images=4)
    x = images(4)
    m.schedule(10, 100)
    torch.manual_seed(0)
    out = m(full_batch(x))                           # includes the refresh forward (no grad)
    out['loss'].backward()
    g1 = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    m.reconstruct(x, out['split'])['loss'].backward()
    g2 = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert g1.keys() == g2.keys() and len(g1) > 10
    for n in g1: torch.testing.assert_close(g1[n], g2[n])
    assert not m.bank_maps.requires_grad
    m.zero_grad()
    before, after = overfit(m, full_batch(x))
    assert after < 0.7 * before, (before, after)


def test_famt_validation():
    with pytest.raises(ValueError, match='num_images'):
        FAMT(**TINY)
    with pytest.raises(ValueError, match='needs a ViT'):
        FAMT(model='resnet18', img_size=32, cifar_stem=True, num_images=4)
    with pytest.raises(ValueError, match='mask_ratio \\+ throw_ratio'):
        FAMT(**TINY, num_images=4, mask_ratio=0.7, throw_ratio=0.4)
    with pytest.raises(ValueError, match='refresh_every'):
        FAMT(**TINY, num_images=4, refresh_every=0.0)
    for kw in (dict(freq_prior=True, mix=2.0), dict(mix='sum')):
        with pytest.raises(ValueError, match='mix'):
            FAMT(**TINY, num_images=4, **kw)
    with pytest.raises(ValueError, match='smooth_cutoff'):
        FAMT(**TINY, num_images=4, smooth_cutoff=0.0)
    with pytest.raises(ValueError, match="attention_source"):
        FAMT(**TINY, num_images=4, attention_source='teacher')
    m = tiny_famt(num_images=4)
    m.schedule(10, 100)
    with pytest.raises(ValueError, match="index"):
        m(dict(views=[images(2)]))
    with pytest.raises(ValueError, match="num_images=4"):
        m(full_batch(images(2), index=torch.tensor([0, 9])))


@pytest.mark.parametrize('name', ['mae', 'famt'])
def test_config_and_state_dict_round_trip(name):
    m = tiny_mae(mask_ratio=0.5) if name == 'mae' else tiny_famt(num_images=4, freq_prior=True, mix=0.3)
    m2 = create_method(name, **m.config)
    assert type(m2) is type(m) and m2.config == m.config
    import json; assert json.loads(json.dumps(m.config)) == m.config
    m2.load_state_dict(m.state_dict())
    x = images(4)
    torch.manual_seed(0); a = m(full_batch(x))
    torch.manual_seed(0); b = m2(full_batch(x))
    assert a['loss'].item() == b['loss'].item()


@pytest.mark.parametrize('name', ['mae', 'famt'])
def test_autocast_bf16_forward(name):
    m = tiny_mae() if name == 'mae' else tiny_famt(num_images=4, freq_prior=True)
    if name == 'famt': m.schedule(10, 100)           # guided, with a refresh inside autocast
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = m(full_batch(images(4)))
    assert out['loss'].dtype == torch.float32 and torch.isfinite(out['loss'])
    out['loss'].backward()
    assert 0 <= out['pred'].min() and out['pred'].max() <= 1


@pytest.mark.parametrize('name', ['mae', 'famt'])
def test_trainer_run_and_resume(name, tmp_path):
    loader = create_loader('samples', recipe=name, size=32, batch_size=8, device='cpu', epoch_size=16)
    kw = {} if name == 'mae' else dict(num_images=len(loader.images), refresh_every=0.34)
    torch.manual_seed(0)
    m = create_method(name, **TINY, **kw)
    cfg = TrainConfig(epochs=3, progress=False, out_dir=str(tmp_path), log_every=1, lr=1e-3)
    summary = Trainer(m, loader, cfg).fit()
    assert summary['steps'] == 6 and np.isfinite(summary['last']['loss'])
    if name == 'famt':
        assert m.version == 2                        # refresh points 2 and 4 of 6
        assert m.bank_filled.any() and (m.bank_version == 2).any()
    torch.manual_seed(1)
    m2 = create_method(name, **m.config)
    Trainer(m2, loader, cfg).resume()
    for k, v in m.state_dict().items(): torch.testing.assert_close(m2.state_dict()[k], v)
    if name == 'famt': assert m2.version == 2


def test_trainer_passes_the_epoch_length_so_famt_refresh_floor_applies(tmp_path):
    "Through the Trainer: 2 steps per epoch, 8 steps, refresh every 0.25 (2 steps) but >= 2 epochs (4 steps) apart."
    loader = create_loader('samples', recipe='famt', size=32, batch_size=8, device='cpu', epoch_size=16)
    assert len(loader) == 2
    versions = {}
    for floor in (0.0, 2.0):
        torch.manual_seed(0)
        m = create_method('famt', **TINY, num_images=len(loader.images), refresh_every=0.25, refresh_min_epochs=floor)
        cfg = TrainConfig(max_steps=8, progress=False, out_dir=str(tmp_path / str(floor)), log_every=1, lr=1e-3)
        Trainer(m, loader, cfg).fit()
        versions[floor] = m.version
    assert versions == {0.0: 3, 2.0: 1}          # refreshes at steps 2, 4, 6 without the floor; at 4 with it


def test_famt_checkpoint_written_before_refresh_min_epochs_resumes(tmp_path):
    loader = create_loader('samples', recipe='famt', size=32, batch_size=8, device='cpu', epoch_size=16)
    torch.manual_seed(0)
    m = create_method('famt', **TINY, num_images=len(loader.images))
    cfg = TrainConfig(max_steps=2, progress=False, out_dir=str(tmp_path), lr=1e-3)
    Trainer(m, loader, dataclasses.replace(cfg, max_steps=1)).fit()
    path = tmp_path / 'checkpoints' / 'last.pt'
    ckpt = load_checkpoint(path)
    del ckpt['method_config']['refresh_min_epochs']                  # what the code before the option wrote
    torch.save(ckpt, path)
    t = Trainer(create_method('famt', **m.config), loader, cfg).resume()
    assert t.step == 1 and t.fit()['steps'] == 2


@pytest.mark.parametrize('make', [tiny_mae, tiny_famt])
def test_trainer_steps_build_no_display_tensors_but_a_plain_forward_does(make, tmp_path, monkeypatch):
    "The widgets' images (masked input, pasted reconstruction) cost ops every step; the trainer only reads losses."
    torch.manual_seed(0)
    m = make()
    batch = dict(views=[images(4)], index=torch.arange(4))
    calls, display = [], type(m).display
    monkeypatch.setattr(type(m), 'display', lambda self, *a: calls.append(1) or display(self, *a))
    out = m(batch)
    assert calls == [1] and out['pred'].shape == out['input'].shape == (4, 3, 32, 32)
    trainer = Trainer(m, [batch], TrainConfig(max_steps=2, out_dir=str(tmp_path), progress=False))
    row = trainer.train_step(batch)
    assert calls == [1] and row is not None and math.isfinite(row['_parts']['loss'])   # the step made no display call
    assert 'pred' in m(batch) and calls == [1, 1]                             # and left forwards as they were
