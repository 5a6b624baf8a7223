"Backbones, heads, MAE helpers and EMA of folk_nb.models against independent slow references (per image / plain Python)."
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from folk_nb.models import (IMAGENET_MEAN, IMAGENET_STD, normalize_images, denormalize_images, gather_tokens, check_ids,
                            create_backbone, close_model_names, MFMHead, patchify, unpatchify, sincos_pos_embed_2d,
                            MAEDecoder, mae_pixel_loss, DINOHead, MoCoHead, ema_update, cosine_schedule,
                            count_parameters, model_summary, ViTBackbone, CNNBackbone)

TINY = dict(embed_dim=64, num_heads=2, depth=2)  # tiny ViT settings passed through to timm
# timm ViT layouts: CLS only; CLS + registers with pos-embed on the prefix; CLS + registers without (no_embed_class);
# no class token (average pooling)
VIT_VARIANTS = {
    'cls': dict(),
    'reg_embed_class': dict(reg_tokens=2, no_embed_class=False),
    'reg_no_embed_class': dict(reg_tokens=3, no_embed_class=True),
    'gap': dict(class_token=False, global_pool='avg'),
}


def tiny_vit(variant='cls', img_size=32, patch_size=4, seed=0):
    torch.manual_seed(seed)
    bb = create_backbone('vit_tiny_patch16_224', img_size=img_size, patch_size=patch_size, **TINY, **VIT_VARIANTS[variant])
    with torch.no_grad():  # timm initialises cls/reg tokens and pos-embed tiny or zero: make them matter in the tests
        for p in (bb.model.cls_token, bb.model.reg_token, bb.model.pos_embed):
            if p is not None: p.normal_(0, 0.5)
    return bb.eval()


def images(b=3, h=32, w=32, seed=0):
    return torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def random_split(b, n, n_mask, n_throw, seed=0):
    "Per-image random (masked, thrown, visible) id split."
    perm = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)).argsort(1)
    return perm[:, :n_mask], perm[:, n_mask:n_mask + n_throw], perm[:, n_mask + n_throw:]


# ------------------------------------------------------------------ independent references
def ref_vit_visible(model, img, ids):
    """One image (C, H, W), visible ids (n,) -> tokens, from timm's public parameters: patch embedding as an explicit
    matrix product over unfolded patches, position embedding added by hand, then the blocks and the final norm."""
    p = model.patch_embed.patch_size[0]
    C, H, W = img.shape
    W_proj = model.patch_embed.proj.weight.reshape(model.embed_dim, -1)           # (D, C*p*p)
    patches = []
    for r in range(H // p):
        for c in range(W // p):
            patches.append(img[:, r * p:(r + 1) * p, c * p:(c + 1) * p].reshape(-1))  # (C*p*p,) in (c, p, q) order
    tokens = torch.stack(patches) @ W_proj.T + model.patch_embed.proj.bias          # (N, D)
    prefix = []
    if model.cls_token is not None: prefix.append(model.cls_token[0])
    if model.reg_token is not None: prefix.append(model.reg_token[0])
    prefix = torch.cat(prefix) if prefix else tokens[:0]
    P = prefix.shape[0]
    pos = model.pos_embed[0]
    if model.no_embed_class: patch_pos, prefix_pos = pos, torch.zeros_like(prefix)
    else: patch_pos, prefix_pos = pos[P:], pos[:P]
    seq = [prefix + prefix_pos] + [(tokens[i] + patch_pos[i])[None] for i in ids.tolist()]
    x = torch.cat(seq)[None]
    for blk in model.blocks: x = blk(x)
    return model.norm(x)[0]


def ref_pixel_shuffle(z, s):
    "out[b, c, h*s + i, w*s + j] = z[b, c*s*s + i*s + j, h, w], by loops."
    B, Cs, h, w = z.shape
    C = Cs // (s * s)
    out = torch.zeros(B, C, h * s, w * s)
    for c in range(C):
        for i in range(s):
            for j in range(s):
                out[:, c, i::s, j::s] = z[:, c * s * s + i * s + j]
    return out


def ref_patchify(img, p):
    "One image (C, H, W) -> list of patches, each flattened as (p, q, c), row-major over the grid."
    C, H, W = img.shape
    out = []
    for r in range(H // p):
        for c in range(W // p):
            vals = []
            for i in range(p):
                for j in range(p):
                    for ch in range(C):
                        vals.append(float(img[ch, r * p + i, c * p + j]))
            out.append(vals)
    return np.array(out)


def ref_sincos(dim, gh, gw):
    "MAE's numpy get_2d_sincos_pos_embed (util/pos_embed.py), generalised to a gh x gw grid."
    def one_d(d, pos):
        omega = np.arange(d // 2, dtype=np.float64) / (d / 2.0)
        omega = 1.0 / 10000 ** omega
        out = np.einsum('m,d->md', pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    grid = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))  # w goes first, as in MAE
    grid = np.stack(grid, axis=0).reshape(2, 1, gh, gw)
    return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def ref_mae_decoder(dec, latent, ids_keep, ids_masked):
    """Per image: MAE's own decoder order — full sequence in grid order over the kept (visible + masked) positions,
    mask tokens at the masked positions, pos-embed added by grid position — then pick the masked outputs."""
    P, out = dec.num_prefix_tokens, []
    pos = dec.pos_embed[0]
    for b in range(latent.shape[0]):
        x = dec.embed(latent[b])                                  # (P + n_vis, dim)
        vis = {int(i): x[P + k] for k, i in enumerate(ids_keep[b])}
        masked = set(int(i) for i in ids_masked[b])
        present = sorted(set(vis) | masked)                      # grid order, thrown ids absent
        seq = [x[:P] + dec.prefix_pos[0]]
        for i in present:
            tok = vis[i] if i in vis else dec.mask_token[0, 0]
            seq.append((tok + pos[i])[None])
        y = torch.cat(seq)[None]
        for blk in dec.blocks: y = blk(y)
        y = dec.pred(dec.norm(y))[0, P:]
        where = {i: k for k, i in enumerate(present)}
        out.append(torch.stack([y[where[int(i)]] for i in ids_masked[b]]))
    return torch.stack(out)


# ------------------------------------------------------------------ images
def test_normalize_images_matches_formula_and_roundtrips():
    x = torch.rand(2, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    y = normalize_images(x)
    for c in range(3):
        assert torch.allclose(y[:, c], (x[:, c] - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=1e-6)
    assert torch.allclose(denormalize_images(y), x, atol=1e-6)
    g = torch.rand(2, 1, 4, 4)
    assert torch.allclose(normalize_images(g, mean=(0.5,), std=(0.25,)), (g - 0.5) / 0.25)
    assert normalize_images(x.half()).dtype == torch.float16
    with pytest.raises(ValueError, match='mean must have 1 or 3 values'): normalize_images(x, mean=(0.1, 0.2))
    with pytest.raises(ValueError, match='std must be positive'): normalize_images(x, std=(0.0,))
    with pytest.raises(TypeError): normalize_images(x.numpy())


# ------------------------------------------------------------------ backbones
@pytest.mark.parametrize('variant', list(VIT_VARIANTS))
def test_vit_attributes_and_forward_visible_all_ids_equals_forward_features(variant):
    bb = tiny_vit(variant)
    assert isinstance(bb, ViTBackbone) and bb.kind == 'vit'
    P = {'cls': 1, 'reg_embed_class': 3, 'reg_no_embed_class': 4, 'gap': 0}[variant]
    assert (bb.embed_dim, bb.num_features, bb.img_size, bb.patch_size, bb.stride) == (64, 64, (32, 32), 4, 4)
    assert (bb.grid_size, bb.num_patches, bb.num_prefix_tokens) == ((8, 8), 64, P)
    x = images()
    with torch.no_grad():
        full = bb.forward_features(x)
        vis = bb.forward_visible(x, torch.arange(64).expand(3, -1))
    assert full.shape == (3, P + 64, 64)
    torch.testing.assert_close(vis, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('variant', list(VIT_VARIANTS))
def test_forward_visible_subset_matches_manual_reimplementation(variant):
    bb = tiny_vit(variant, seed=1)
    x = images(seed=2)
    _, _, vis = random_split(3, 64, 30, 20, seed=3)  # 14 visible patches, random order
    with torch.no_grad():
        out = bb.forward_visible(x, vis)
        ref = torch.stack([ref_vit_visible(bb.model, x[b], vis[b]) for b in range(3)])
    assert out.shape == (3, bb.num_prefix_tokens + 14, 64)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_forward_visible_depends_only_on_visible_patches():
    bb = tiny_vit('reg_embed_class', seed=4)
    x = images(seed=5)
    masked, thrown, vis = random_split(3, 64, 29, 26, seed=6)
    hidden = torch.cat([masked, thrown], 1)
    xp = patchify(x, 4)
    x_hidden = xp.clone(); x_hidden[torch.arange(3)[:, None], hidden] += torch.randn(3, hidden.shape[1], 48) * 3
    x_vis = xp.clone(); x_vis[torch.arange(3)[:, None], vis[:, :1]] += 3.0  # one visible patch per image
    with torch.no_grad():
        out = bb.forward_visible(x, vis)
        out_hidden = bb.forward_visible(unpatchify(x_hidden, 4, 8, 8), vis)
        out_vis = bb.forward_visible(unpatchify(x_vis, 4, 8, 8), vis)
    torch.testing.assert_close(out_hidden, out, atol=1e-5, rtol=1e-5)
    assert (out_vis - out).abs().amax(dim=(1, 2)).min() > 1e-2      # the test can see a change when there is one


def test_forward_visible_token_order_follows_ids():
    bb = tiny_vit('cls', seed=7)
    x = images(seed=8)
    _, _, vis = random_split(3, 64, 40, 0, seed=9)
    perm = torch.randperm(vis.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = bb.forward_visible(x, vis), bb.forward_visible(x, vis[:, perm])
    torch.testing.assert_close(b[:, 1:], a[:, 1:][:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b[:, 0], a[:, 0], atol=1e-5, rtol=1e-5)


def test_forward_visible_gradients_flow_only_through_visible_pixels():
    bb = tiny_vit('cls', seed=10).train()
    x = images(b=2, seed=11).requires_grad_(True)
    masked, thrown, vis = random_split(2, 64, 30, 20, seed=12)
    bb.forward_visible(x, vis).pow(2).sum().backward()
    g = patchify(x.grad, 4).abs().sum(-1)                              # (B, N) gradient mass per patch
    hidden = torch.cat([masked, thrown], 1)
    assert torch.all(g.gather(1, hidden) == 0)
    assert torch.all(g.gather(1, vis) > 0)


def test_vit_pooling_grid_and_feature_map():
    bb = tiny_vit('cls', seed=13)
    x = images(seed=14)
    with torch.no_grad():
        tok = bb.forward_features(x)
        torch.testing.assert_close(bb.pooled(x), tok[:, 0])
        torch.testing.assert_close(bb(x), tok[:, 0])
        grid = bb.grid_tokens(tok)
        fmap = bb.feature_map(x)
    for r in range(8):
        for c in range(8):
            assert torch.equal(grid[:, :, r, c], tok[:, 1 + r * 8 + c])
    assert torch.equal(fmap, grid)
    gap = tiny_vit('gap', seed=13)
    with torch.no_grad():
        # timm's 'avg' pooling moves the final norm after the pool (fc_norm)
        assert isinstance(gap.model.fc_norm, nn.LayerNorm)
        mean = gap.forward_features(x).mean(1)
        ref = F.layer_norm(mean, (64,), gap.model.fc_norm.weight, gap.model.fc_norm.bias, gap.model.fc_norm.eps)
        torch.testing.assert_close(gap.pooled(x), ref)
    with pytest.raises(ValueError, match='patch tokens'): bb.grid_tokens(tok[:, :10])


def test_vit_non_square_image():
    torch.manual_seed(0)
    bb = create_backbone('vit_tiny_patch16_224', img_size=(16, 24), patch_size=4, **TINY).eval()
    assert bb.grid_size == (4, 6) and bb.num_patches == 24
    x = images(2, 16, 24)
    with torch.no_grad():
        tok = bb.forward_features(x)
        fmap = bb.feature_map(x)
        torch.testing.assert_close(bb.forward_visible(x, torch.arange(24).expand(2, -1)), tok, atol=1e-5, rtol=1e-5)
    assert fmap.shape == (2, 64, 4, 6)
    assert torch.equal(fmap[:, :, 3, 5], tok[:, 1 + 3 * 6 + 5])


@pytest.mark.parametrize('cifar_stem,img,stride', [(True, 32, 8), (False, 64, 32)])
def test_resnet18_stride_and_pooling(cifar_stem, img, stride):
    torch.manual_seed(0)
    bb = create_backbone('resnet18', img_size=img, cifar_stem=cifar_stem).eval()
    assert isinstance(bb, CNNBackbone) and bb.kind == 'cnn'
    assert (bb.embed_dim, bb.num_features, bb.stride, bb.img_size) == (512, 512, stride, (img, img))
    x = images(2, img, img)
    with torch.no_grad():
        fmap = bb.forward_features(x)
        assert fmap.shape == (2, 512, img // stride, img // stride)
        assert torch.equal(bb.feature_map(x), fmap)
        torch.testing.assert_close(bb.pooled(x), fmap.mean((2, 3)))
    if cifar_stem:
        conv1 = bb.model.conv1
        assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
        assert isinstance(bb.model.maxpool, nn.Identity)


def test_resnet50_cifar_stem_stride():
    bb = create_backbone('resnet50', img_size=32, cifar_stem=True).eval()
    with torch.no_grad(): fmap = bb.feature_map(images(1))
    assert bb.stride == 8 and fmap.shape == (1, 2048, 4, 4)


def test_create_backbone_does_not_touch_batchnorm_statistics():
    torch.manual_seed(0)
    bb = create_backbone('resnet18', img_size=32, cifar_stem=True)
    assert bb.training
    assert torch.all(bb.model.bn1.running_mean == 0) and int(bb.model.bn1.num_batches_tracked) == 0


# ------------------------------------------------------------------ bad configurations
def test_unknown_name_lists_close_choices():
    with pytest.raises(ValueError, match='resnet18') as e: create_backbone('resnet81')
    assert 'unknown timm model' in str(e.value)
    with pytest.raises(ValueError, match='vit_tiny_patch16_224'): create_backbone('vit_tiny_patch16_244')
    assert close_model_names('vit_small_patch16_224x')[0] == 'vit_small_patch16_224'


def test_img_size_not_divisible_by_patch_size():
    with pytest.raises(ValueError, match='not divisible by patch_size 4'):
        create_backbone('vit_tiny_patch16_224', img_size=30, patch_size=4)
    with pytest.raises(ValueError, match='not divisible by the patch size 16'):
        create_backbone('vit_tiny_patch16_224', img_size=40, **TINY)
    with pytest.raises(ValueError, match='not divisible'):
        create_backbone('vit_tiny_patch16_224', img_size=(32, 30), patch_size=4)


def test_other_bad_configs():
    with pytest.raises(ValueError, match='patch_size only applies to ViTs'): create_backbone('resnet18', patch_size=4)
    with pytest.raises(ValueError, match='cifar_stem applies to ResNets'): create_backbone('vit_tiny_patch16_224', cifar_stem=True)
    with pytest.raises(ValueError, match='cifar_stem=True needs a timm ResNet'): create_backbone('convnext_atto', img_size=32, cifar_stem=True)
    with pytest.raises(ValueError, match='img_size must be'): create_backbone('resnet18', img_size=0)
    with pytest.raises(ValueError, match='not supported'): create_backbone('swin_tiny_patch4_window7_224', depths=(1, 1, 1, 1))
    bb = tiny_vit()
    with pytest.raises(ValueError, match='32x32'): bb.forward_features(images(1, 48, 48))
    with pytest.raises(ValueError, match='channels'): bb.forward_features(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match=r'visible_ids must lie in \[0, 64\)'): bb.forward_visible(images(1), torch.tensor([[0, 64]]))
    with pytest.raises(ValueError, match='visible_ids must have shape'): bb.forward_visible(images(2), torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match='visible_ids must hold integer'): bb.forward_visible(images(1), torch.tensor([[0.0]]))


def test_gather_tokens_and_check_ids():
    x = torch.randn(3, 7, 5)
    ids = torch.randint(0, 7, (3, 4), generator=torch.Generator().manual_seed(0))
    out = gather_tokens(x, ids)
    for b in range(3):
        for i in range(4):
            assert torch.equal(out[b, i], x[b, int(ids[b, i])])
    assert check_ids(ids.int(), 'ids', 3, 7).dtype == torch.int64
    with pytest.raises(ValueError, match=r'\[0, 7\)'): check_ids(ids - 1 - ids.max(), 'ids', 3, 7)


# ------------------------------------------------------------------ MFM head
@pytest.mark.parametrize('make,img,out_img', [
    (lambda: create_backbone('vit_tiny_patch16_224', img_size=32, patch_size=4, **TINY), 32, 32),
    (lambda: create_backbone('vit_tiny_patch16_224', img_size=224, embed_dim=64, num_heads=2, depth=1), 224, 224),
    (lambda: create_backbone('resnet18', img_size=32, cifar_stem=True), 32, 32),
    (lambda: create_backbone('resnet18', img_size=64), 64, 64),
])
def test_mfm_head_shapes(make, img, out_img):
    torch.manual_seed(0)
    bb = make().eval()
    head = MFMHead(bb.embed_dim, bb.stride)
    with torch.no_grad(): out = head(bb.feature_map(images(2, img, img)))
    assert out.shape == (2, 3, out_img, out_img)


def test_mfm_head_pixel_shuffle_layout():
    from einops import rearrange
    torch.manual_seed(0)
    head = MFMHead(16, 4, out_chans=3)
    f = torch.randn(2, 16, 3, 5)
    with torch.no_grad():
        z = head.proj(f)
        out = head(f)
    assert torch.equal(out, rearrange(z, 'b (c p q) h w -> b c (h p) (w q)', p=4, q=4))
    assert torch.equal(out, ref_pixel_shuffle(z, 4))
    # the 1x1 conv is a per-position linear map
    torch.testing.assert_close(z, torch.einsum('od,bdhw->bohw', head.proj.weight[:, :, 0, 0], f) + head.proj.bias[:, None, None])
    with pytest.raises(ValueError, match=r'\(B, 16, h, w\)'): head(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match='stride must be a positive int'): MFMHead(16, 0)


# ------------------------------------------------------------------ MAE helpers
@pytest.mark.parametrize('c,h,w,p', [(3, 8, 12, 4), (1, 6, 6, 3), (3, 4, 4, 1)])
def test_patchify_matches_loop_and_roundtrips(c, h, w, p):
    x = torch.rand(2, c, h, w, generator=torch.Generator().manual_seed(0))
    pt = patchify(x, p)
    assert pt.shape == (2, (h // p) * (w // p), p * p * c)
    for b in range(2):
        np.testing.assert_allclose(pt[b].numpy(), ref_patchify(x[b], p), rtol=0, atol=0)
    assert torch.equal(unpatchify(pt, p, h // p, w // p), x)
    with pytest.raises(ValueError, match='not divisible'): patchify(torch.rand(1, 3, 7, 8), 2)
    with pytest.raises(ValueError, match='grid h x w'): unpatchify(pt, p, h // p + 1, w // p)


@pytest.mark.parametrize('dim,gh,gw', [(64, 8, 8), (32, 3, 5), (16, 1, 1)])
def test_sincos_pos_embed_matches_mae_numpy(dim, gh, gw):
    np.testing.assert_allclose(sincos_pos_embed_2d(dim, gh, gw).numpy(), ref_sincos(dim, gh, gw), atol=1e-6)
    with pytest.raises(ValueError, match='multiple of 4'): sincos_pos_embed_2d(30, 2, 2)


def tiny_decoder(P=1, seed=0):
    torch.manual_seed(seed)
    dec = MAEDecoder(num_patches=64, patch_size=4, in_dim=48, dim=32, depth=2, heads=4, num_prefix_tokens=P)
    with torch.no_grad():  # non-zero prefix position and mask token so that they matter
        dec.prefix_pos.normal_(); dec.mask_token.normal_()
    return dec.eval()


@pytest.mark.parametrize('P', [1, 0, 3])
def test_mae_decoder_with_thrown_tokens_matches_reference(P):
    dec = tiny_decoder(P, seed=P)
    masked, thrown, vis = random_split(3, 64, 29, 26, seed=P)
    latent = torch.randn(3, P + vis.shape[1], 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = dec(latent, vis, masked)
        ref = ref_mae_decoder(dec, latent, vis, masked)
    assert out.shape == (3, 29, 4 * 4 * 3)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_mae_decoder_plain_mae_matches_ids_restore_formulation():
    "No thrown ids: equals MAE's forward_decoder (un-shuffle with ids_restore, full pos-embed) at the masked patches."
    dec = tiny_decoder(1, seed=3)
    masked, _, vis = random_split(2, 64, 48, 0, seed=4)
    latent = torch.randn(2, 1 + 16, 48, generator=torch.Generator().manual_seed(2))
    ids_shuffle = torch.cat([vis, masked], 1)
    ids_restore = ids_shuffle.argsort(1)
    with torch.no_grad():
        x = dec.embed(latent)
        mask_tokens = dec.mask_token.repeat(2, 48, 1)
        x_ = torch.cat([x[:, 1:], mask_tokens], 1)
        x_ = torch.gather(x_, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1] + dec.prefix_pos, x_ + dec.pos_embed], 1)
        for blk in dec.blocks: x = blk(x)
        full = dec.pred(dec.norm(x))[:, 1:]                               # (B, 64, p*p*3) in grid order
        ref = torch.gather(full, 1, masked[..., None].repeat(1, 1, full.shape[-1]))
        out = dec(latent, vis, masked)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_mae_decoder_thrown_ids_have_no_influence_end_to_end():
    bb = tiny_vit('cls', seed=5)
    dec = MAEDecoder(bb.num_patches, bb.patch_size, bb.embed_dim, dim=32, depth=1, heads=4).eval()
    x = images(seed=6)
    masked, thrown, vis = random_split(3, 64, 29, 26, seed=7)
    xt = patchify(x, 4); xt[torch.arange(3)[:, None], thrown] = torch.randn(3, 26, 48) * 5
    xm = patchify(x, 4); xm[torch.arange(3)[:, None], masked[:, :1]] += 5   # the masked pixels: also invisible
    xv = patchify(x, 4); xv[torch.arange(3)[:, None], vis[:, :1]] += 5      # a visible patch: must change
    with torch.no_grad():
        run = lambda im: dec(bb.forward_visible(im, vis), vis, masked)
        out = run(x)
        torch.testing.assert_close(run(unpatchify(xt, 4, 8, 8)), out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run(unpatchify(xm, 4, 8, 8)), out, atol=1e-5, rtol=1e-5)
        assert (run(unpatchify(xv, 4, 8, 8)) - out).abs().amax() > 1e-3
        # permuting the masked ids permutes the predictions
        perm = torch.randperm(29, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(dec(bb.forward_visible(x, vis), vis, masked[:, perm]), out[:, perm], atol=1e-5, rtol=1e-5)


def test_mae_decoder_bad_inputs():
    dec = tiny_decoder()
    masked, _, vis = random_split(2, 64, 10, 0, seed=0)
    with pytest.raises(ValueError, match='one per visible id'): dec(torch.randn(2, 5, 48), vis, masked)
    with pytest.raises(ValueError, match='visible_tokens must have shape'): dec(torch.randn(2, 1 + 54, 47), vis, masked)
    with pytest.raises(ValueError, match=r'masked_ids must lie in \[0, 64\)'): dec(torch.randn(2, 55, 48), vis, masked + 64)
    with pytest.raises(ValueError, match='not a square grid'): MAEDecoder(60, 4, 48, dim=32, depth=1, heads=4)
    assert MAEDecoder(60, 4, 48, dim=32, depth=1, heads=4, grid_size=(6, 10)).pos_embed.shape == (1, 60, 32)


def test_mae_pixel_loss_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 5, 12, generator=g), torch.rand(2, 5, 12, generator=g) * 3
    for norm_pix in (True, False):
        total = 0.0
        for b in range(2):
            for i in range(5):
                t = target[b, i].double().numpy()
                if norm_pix: t = (t - t.mean()) / math.sqrt(t.var(ddof=1) + 1e-6)
                total += float(((pred[b, i].double().numpy() - t) ** 2).mean())
        assert abs(mae_pixel_loss(pred, target, norm_pix=norm_pix).item() - total / 10) < 1e-5
    assert mae_pixel_loss(pred.bfloat16(), target).dtype == torch.float32
    with pytest.raises(ValueError, match='same shape'): mae_pixel_loss(pred, target[:, :4])


# ------------------------------------------------------------------ heads
def test_dino_head_unit_norm_prototypes_stay_unit_after_training_step():
    torch.manual_seed(0)
    head = DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16)
    assert len([m for m in head.mlp if isinstance(m, nn.Linear)]) == 3
    assert len([m for m in head.mlp if isinstance(m, nn.GELU)]) == 2
    opt = torch.optim.SGD(head.parameters(), lr=1.0)
    head(torch.randn(8, 32)).logsumexp(-1).mean().backward()
    opt.step()
    W = head.last_layer.weight.detach()                                   # (out_dim, bottleneck): one row per prototype
    torch.testing.assert_close(W.norm(dim=1), torch.ones(50))
    # reference forward: cosine similarity between the normalised bottleneck and each prototype direction
    x = torch.randn(4, 32)
    with torch.no_grad():
        v = head.last_layer.parametrizations.weight.original1
        ref = F.normalize(head.mlp(x), dim=-1) @ (v / v.norm(dim=1, keepdim=True)).T
        torch.testing.assert_close(head(x), ref)


def test_dino_head_trainable_gain_and_depth():
    torch.manual_seed(0)
    head = DINOHead(32, 50, hidden_dim=64, bottleneck_dim=16, nlayers=1, norm_last_layer=False)
    assert [type(m) for m in head.mlp] == [nn.Linear]
    g = head.last_layer.parametrizations.weight.original0
    assert g.requires_grad and torch.all(g == 1)
    torch.optim.SGD(head.parameters(), lr=1.0).zero_grad()
    head(torch.randn(8, 32)).pow(2).sum().backward()
    assert g.grad is not None and g.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='nlayers'): DINOHead(32, 50, nlayers=0)


def test_moco_head():
    torch.manual_seed(0)
    head = MoCoHead(32, 64, 16)
    x = torch.randn(5, 32)
    l1, l2 = head.mlp[0], head.mlp[2]
    torch.testing.assert_close(head(x), F.relu(x @ l1.weight.T + l1.bias) @ l2.weight.T + l2.bias)


# ------------------------------------------------------------------ EMA and schedules
def small_net():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


@pytest.mark.parametrize('m', [0.0, 0.5, 0.996, 1.0])
def test_ema_update_matches_formula(m):
    torch.manual_seed(0)
    teacher, student = small_net(), small_net()
    with torch.no_grad():  # distinct buffers too
        student[1].running_mean.normal_(); student[1].running_var.uniform_(0.5, 2); student[1].num_batches_tracked.fill_(7)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    s0 = {k: v.clone() for k, v in student.state_dict().items()}
    ema_update(teacher, student, m)
    for k, v in teacher.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, m * t0[k] + (1 - m) * s0[k], atol=1e-6, rtol=0)
        else:
            assert torch.equal(v, s0[k])
    for k, v in student.state_dict().items(): assert torch.equal(v, s0[k])  # student untouched


def test_ema_update_buffer_modes_and_errors():
    torch.manual_seed(0)
    teacher, student = small_net(), small_net()
    with torch.no_grad(): student[1].running_mean.fill_(3.0)
    ema_update(teacher, student, 0.5, buffers='none')
    assert torch.all(teacher[1].running_mean == 0)
    ema_update(teacher, student, 0.5, buffers='copy')
    assert torch.all(teacher[1].running_mean == 3.0)
    with pytest.raises(ValueError, match='momentum must lie in'): ema_update(teacher, student, -0.1)
    with pytest.raises(ValueError, match="buffers must be"): ema_update(teacher, student, 0.5, buffers='avg')
    with pytest.raises(ValueError, match='same parameters'): ema_update(teacher, nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match='differ in shape'): ema_update(nn.Linear(3, 2), nn.Linear(4, 2), 0.5)


def test_ema_update_dino_head_keeps_unit_prototypes():
    torch.manual_seed(0)
    t, s = DINOHead(8, 10, 16, 4), DINOHead(8, 10, 16, 4)
    ema_update(t, s, 0.9)
    torch.testing.assert_close(t.last_layer.weight.norm(dim=1), torch.ones(10))


def test_cosine_schedule():
    assert cosine_schedule(0.996, 1.0, 0, 1000) == 0.996
    assert abs(cosine_schedule(0.996, 1.0, 1000, 1000) - 1.0) < 1e-12
    assert abs(cosine_schedule(0.996, 1.0, 5000, 1000) - 1.0) < 1e-12      # clamped after the end
    assert cosine_schedule(0.996, 1.0, -5, 1000) == 0.996                    # clamped before the start
    assert abs(cosine_schedule(0.04, 0.07, 500, 1000) - 0.055) < 1e-12       # midpoint
    assert abs(cosine_schedule(2.0, 0.0, 250, 1000) - (1 + math.cos(math.pi / 4))) < 1e-12
    vals = [cosine_schedule(0.996, 1.0, s, 100) for s in range(101)]
    assert all(b >= a for a, b in zip(vals, vals[1:]))                       # monotone
    with pytest.raises(ValueError, match='total_steps must be positive'): cosine_schedule(0, 1, 0, 0)


# ------------------------------------------------------------------ sizes
def test_count_parameters_and_summary():
    net = small_net()
    assert count_parameters(net) == (3 * 4 * 9 + 4) + (4 + 4) + (4 * 2 + 2)
    net[0].weight.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == count_parameters(net) - 3 * 4 * 9
    s = model_summary(tiny_vit())
    assert "kind='vit'" in s and f"{count_parameters(tiny_vit()):,}" in s
