"""PatchMaskExplorer and SaliencyExplorer: panels against the library and independent numpy references, every control,
the attention cache, the ratio-sum guard, uploads and model / checkpoint handling. Tiny ViTs at 64 px keep it fast."""
import io
import math
from datetime import datetime

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from folk_nb.attention import attention_map, cls_attention, famt_weights
from folk_nb.images import load_sample
from folk_nb.models import create_backbone, normalize_images
from folk_nb.patch_masks import (MASKED, THROWN, VISIBLE, attmask_split, mask_throw_keep, random_split,
                                 split_counts, split_labels)
from folk_nb import patch_explorer
from folk_nb.patch_explorer import (SPLIT_MODES, MAX_RATIO_SUM, PatchMaskExplorer, SaliencyExplorer, as_vit,
                                    choose_split, head_map, patch_panels, saliency_of, saliency_panels,
                                    vit_attention, vit_attention_layers, vit_input_size)
from folk_nb.saliency import (fill_patches, hard_negative_patch_mask, saliency_patch_mask,
                              spectral_residual_saliency)
from folk_nb.trainer import CHECKPOINT_FORMAT, atomic_save


def tiny_vit(depth=2, size=64, seed=0, **kw):
    "A 3-head ViT on an 8x8 grid of 8 px patches, with sharpened q/k so its attention is far from uniform."
    torch.manual_seed(seed)
    m = timm.create_model('vit_tiny_patch16_224', pretrained=False, img_size=size, patch_size=8, depth=depth,
                          num_classes=0, **kw)
    with torch.no_grad():
        for blk in m.blocks: blk.attn.qkv.weight.mul_(25.0)
    return m


@pytest.fixture(scope='module')
def vit(): return tiny_vit()


@pytest.fixture(scope='module')
def x64(): return load_sample('astronaut', 64)


def png_bytes(h=40, w=50, seed=0):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)).save(buf, format='PNG')
    return buf.getvalue()


def upload(widget, name, content):
    "Set the FileUpload value the way the browser does."
    widget.upload.value = ({'name': name, 'type': 'image/png', 'size': len(content), 'content': memoryview(content),
                            'last_modified': datetime.now()},)


def ref_labels(masked, thrown, visible, n):
    "Per-patch labels from index sets, by plain Python."
    out = [None] * n
    for idx, v in ((masked, MASKED), (thrown, THROWN), (visible, VISIBLE)):
        for i in np.asarray(idx).ravel().tolist():
            assert out[i] is None, 'index sets overlap'
            out[i] = v
    assert None not in out, 'index sets do not cover every patch'
    return np.array(out)


class ForwardCounter:
    "Counts forward passes of a model (a hook on its patch embedding)."
    def __init__(self, model):
        self.n = 0
        self.handle = model.patch_embed.register_forward_hook(self)
    def __call__(self, *_): self.n += 1
    def remove(self): self.handle.remove()


# ---------------------------------------------------------------- attention panels
def test_vit_attention_per_head_matches_numpy_minmax_of_cls_attention(vit, x64):
    for layer in (0, 1):
        raw = cls_attention(vit, normalize_images(x64[None]), layer)[0].numpy().astype(np.float64)
        ref = np.stack([(h - h.min()) / (h.max() - h.min()) for h in raw])
        got = vit_attention(vit, x64, layer).numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5)
        assert raw.max() > 0.2                              # peaked: the comparison has teeth
        for h in range(3): np.testing.assert_array_equal(head_map(vit_attention(vit, x64, layer), h).numpy(), got[h])


def test_head_mean_and_rollout_equal_attention_map(vit, x64):
    xb = normalize_images(x64[None])
    np.testing.assert_allclose(head_map(vit_attention(vit, x64, 'last'), 'mean').numpy(),
                               attention_map(vit, xb, layer=-1)[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(head_map(vit_attention(vit, x64, 'rollout'), 'mean').numpy(),
                               attention_map(vit, xb, rollout=True)[0].numpy(), atol=1e-6)
    with pytest.raises(ValueError, match='rollout has a single map'): head_map(vit_attention(vit, x64, 'rollout'), 1)


def test_vit_attention_layers_is_vit_attention_of_every_layer_in_one_pass(x64):
    m = tiny_vit(depth=3)
    counter = ForwardCounter(m)
    try: every = vit_attention_layers(m, x64)
    finally: counter.remove()
    assert counter.n == 1 and list(every) == [0, 1, 2, 'rollout']
    for layer in (0, 1, 2):
        np.testing.assert_allclose(every[layer].numpy(), vit_attention(m, x64, layer).numpy(), atol=1e-5)
    np.testing.assert_array_equal(every['rollout'].numpy(), vit_attention(m, x64, 'rollout').numpy())
    no_cls = vit_attention_layers(tiny_vit(depth=2, class_token=False, global_pool='avg'), x64)   # mean query
    assert no_cls[1].shape == (3, 8, 8) and no_cls['rollout'].shape == (1, 8, 8)


def test_model_without_cls_token_uses_mean_query(x64):
    m = tiny_vit(depth=1, class_token=False, global_pool='avg')
    a = vit_attention(m, x64, 0)
    ref = attention_map(m, normalize_images(x64[None]), layer=0, query='mean', normalize=False)[0]
    assert a.shape == (3, 8, 8) and torch.isfinite(a).all()
    raw = cls_attention(m, normalize_images(x64[None]), 0, 'mean')[0].mean(0)   # mean over heads, unnormalised
    np.testing.assert_allclose(raw.numpy(), ref.numpy(), atol=1e-6)


# ---------------------------------------------------------------- split panels
@pytest.mark.parametrize('mode', SPLIT_MODES)
@pytest.mark.parametrize('ratios', [(0.45, 0.40), (0.75, 0.0), (0.1, 0.6), (0.0, 0.0)])
def test_counts_equal_split_counts_and_drawn_labels(vit, x64, mode, ratios):
    m, t = ratios
    a = head_map(vit_attention(vit, x64, 1), 'mean')
    p = patch_panels(x64, a, mode, m, t, seed=5)
    want = split_counts(64, m, 0.0 if mode == 'AttMask high' else t)
    assert (p['masked'], p['thrown'], p['visible']) == want
    s = p['split']
    np.testing.assert_array_equal(p['labels'].ravel(), ref_labels(s.masked, s.thrown, s.visible, 64))
    assert [(p['labels'] == v).sum() for v in (MASKED, THROWN, VISIBLE)] == list(want)


@pytest.mark.parametrize('seed', [0, 7])
def test_labels_equal_library_split_of_the_same_seed(vit, x64, seed):
    a = head_map(vit_attention(vit, x64, 1), 2)
    w = famt_weights(a[None], eps=0.0)
    lib = {'FAMT weighted': mask_throw_keep(w, 0.3, 0.5, generator=torch.Generator().manual_seed(seed)),
           'random (MAE)': random_split(1, 64, 0.3, 0.5, generator=torch.Generator().manual_seed(seed)),
           'AttMask high': attmask_split(a.reshape(1, -1), 0.3, 'high')}
    for mode, split in lib.items():
        p = patch_panels(x64, a, mode, 0.3, 0.5, seed)
        np.testing.assert_array_equal(p['labels'].ravel(), split_labels(split)[0].numpy())
    # AttMask: the masked patches are the 19 largest attention values (independent: numpy argsort)
    p = patch_panels(x64, a, 'AttMask high', 0.3, 0.5, seed)
    top = np.argsort(-a.numpy().ravel(), kind='stable')[:math.floor(64 * 0.3)]
    assert set(np.flatnonzero(p['labels'].ravel() == MASKED)) == set(top.tolist())


def test_famt_options_reach_the_weights(vit, x64):
    a = head_map(vit_attention(vit, x64, 1), 'mean')
    for opts in (dict(), dict(smooth_cutoff=0.2), dict(freq_prior=True), dict(freq_prior=True, mix=0.3)):
        p = patch_panels(x64, a, 'FAMT weighted', 0.45, 0.4, 0, **opts)
        ref = famt_weights(a[None], x64[None] if opts.get('freq_prior') else None, eps=0.0, **opts)
        np.testing.assert_allclose(p['weights'].ravel(), ref[0].numpy(), rtol=1e-6, atol=1e-9)
    plain = patch_panels(x64, a, 'FAMT weighted', 0.45, 0.4, 0)['weights']
    np.testing.assert_allclose(plain, a.numpy() / a.numpy().sum(), atol=1e-6)   # weights = normalised attention


def test_famt_mode_masks_attended_patches_more_often(vit, x64):
    "Over many seeds, masked patches carry more attention on average than visible ones (and random does not)."
    a = head_map(vit_attention(vit, x64, 1), 'mean').numpy().ravel()
    gap = {}
    for mode in ('FAMT weighted', 'random (MAE)'):
        m_att, v_att = [], []
        for seed in range(300):
            lab = patch_panels(x64, torch.from_numpy(a.reshape(8, 8)), mode, 0.3, 0.3, seed)['labels'].ravel()
            m_att.append(a[lab == MASKED].mean()); v_att.append(a[lab == VISIBLE].mean())
        gap[mode] = np.mean(m_att) - np.mean(v_att)
    spread = a.std()
    assert gap['FAMT weighted'] > 0.5 * spread, gap
    assert abs(gap['random (MAE)']) < 0.15 * spread, gap


def test_choose_split_rejects_unknown_mode_and_bad_ratios(x64):
    a = torch.rand(8, 8)
    with pytest.raises(ValueError, match='mode: expected one of'): choose_split('checkerboard', a, a.reshape(1, -1))
    with pytest.raises(ValueError, match='mask_ratio \\+ throw_ratio'): patch_panels(x64, a, 'random (MAE)', 0.7, 0.4)


# ---------------------------------------------------------------- models
def test_models_accepted_and_refused():
    bb = create_backbone('vit_tiny_patch16_224', img_size=32, patch_size=8, depth=1)
    assert as_vit(bb) is bb.model
    with pytest.raises(TypeError, match='expected a timm Vision Transformer'):
        PatchMaskExplorer(timm.create_model('resnet18', pretrained=False, num_classes=0))
    with pytest.raises(TypeError, match='model'): as_vit(torch.nn.Linear(3, 3))
    assert vit_input_size(bb.model, size=224) == 32                        # a fixed-size ViT decides
    dyn = timm.create_model('vit_tiny_patch16_224', pretrained=False, patch_size=8, depth=1, dynamic_img_size=True)
    assert vit_input_size(dyn, size=48) == 48
    with pytest.raises(ValueError, match='size: expected a positive multiple of the patch size 8'):
        vit_input_size(dyn, size=50)
    with pytest.raises(ValueError, match='size: expected a positive multiple of 16'): as_vit(None, size=100)


def test_method_and_checkpoint(tmp_path, x64, monkeypatch):
    from folk_nb.methods import create_method
    cfg = dict(model='vit_tiny_patch16_224', img_size=64, patch_size=8, model_kwargs={'depth': 3}, decoder_dim=32,
               decoder_depth=1, decoder_heads=4)
    torch.manual_seed(1)
    mae = create_method('mae', **cfg)
    assert as_vit(mae) is mae.backbone.model
    path = tmp_path / 'last.pt'
    atomic_save(dict(format=CHECKPOINT_FORMAT, method='mae', method_config=mae.config, model=mae.state_dict()), path)
    # a checkpoint given to the constructor
    ex = PatchMaskExplorer(str(path), size=224)
    assert ex.message.value == '' and ex.size == 64 and ex.depth == 3
    assert [v for _, v in ex.layer.options] == [0, 1, 2, 'rollout'] and ex.layer.value == 2
    np.testing.assert_allclose(ex.last['attention'], head_map(vit_attention(mae.backbone.model, x64, 2), 'mean').numpy(),
                               atol=1e-6)                                  # the trained weights were loaded
    # garbage and missing checkpoints: messages, the explorer keeps working
    bad = tmp_path / 'bad.pt'; bad.write_bytes(b'not a checkpoint')
    ex.checkpoint.value = str(bad); ex.load.click()
    assert 'Could not load' in ex.message.value and 'not a readable checkpoint' in ex.message.value
    assert ex.depth == 3
    ex.checkpoint.value = ''; ex.load.click()
    assert 'type the path' in ex.message.value
    monkeypatch.setattr(patch_explorer, 'DEFAULT_VIT', 'vit_tiny_patch16_224')   # a smaller stand-in, for speed
    ex2 = PatchMaskExplorer(str(tmp_path / 'missing.pt'), size=32)
    assert 'checkpoint not found' in ex2.message.value and 'random vit_tiny_patch16_224' in ex2.message.value
    assert ex2.size == 32 and ex2.num_heads == 3                          # the default ViT, at the requested size


def test_non_vit_checkpoint_is_a_message(tmp_path):
    from folk_nb.methods import create_method
    moco = create_method('moco', model='resnet18', img_size=32, queue_size=16, out_dim=8)
    path = tmp_path / 'moco.pt'
    atomic_save(dict(format=CHECKPOINT_FORMAT, method='moco', method_config=moco.config, model=moco.state_dict()), path)
    ex = PatchMaskExplorer(tiny_vit(depth=1))
    ex.checkpoint.value = str(path); ex.load.click()
    assert 'expected a timm Vision Transformer' in ex.message.value
    assert ex.depth == 1                                                   # the old model stays


# ---------------------------------------------------------------- the PatchMaskExplorer widget
def test_controls_change_what_they_should_and_the_model_runs_only_for_a_new_image(vit):
    counter = ForwardCounter(vit)
    try:
        ex = PatchMaskExplorer(vit, image='coffee')
        assert counter.n == 1 and ex.size == 64
        n0 = counter.n
        z = lambda i: np.array(ex.fig.data[i].z, dtype=float)
        att, w, lab = z(3), z(4), z(5)
        ex.mask_ratio.value = 0.3; assert (z(5) != lab).any(); lab = z(5)
        ex.throw_ratio.value = 0.5; assert (z(5) != lab).any(); lab = z(5)
        ex.resample.click(); assert ex.last['seed'] == 1 and (z(5) != lab).any()
        ex.head.value = 1; assert not np.allclose(z(3), att)
        assert np.allclose(z(3), ex.last['attention'])
        ex.smooth.value = 0.2; assert not np.allclose(z(4), w); w = z(4)
        ex.prior.value = True; assert not np.allclose(z(4), w); w = z(4)
        assert ex.alpha.disabled and not ex.mix.disabled
        ex.mix.value = 'convex'; assert not ex.alpha.disabled
        ex.alpha.value = 0.9; assert not np.allclose(z(4), w)
        ex.mode.value = 'random (MAE)'; ex.mode.value = 'AttMask high'
        assert ex.throw_ratio.disabled and ex.last['thrown'] == 0
        assert counter.n == n0                                         # none of the above ran the model
        ex.layer.value = 0; assert counter.n == n0                     # another layer: cached since the first pass
        ex.layer.value = 'rollout'; assert counter.n == n0 and ex.head.disabled
        assert 'rollout' in ex.fig.layout.annotations[1].text
        ex.layer.value = 1; ex.layer.value = 0; assert counter.n == n0
        ex.image.value = 'astronaut'; assert counter.n == n0 + 1       # new image: one forward pass, every layer
        ex.layer.value = 'rollout'; ex.layer.value = 1; assert counter.n == n0 + 1
        ex.image.value = 'coffee'; assert counter.n == n0 + 1          # seen before: cached
        assert ex.attention_passes == counter.n
        assert ex.message.value == ''
    finally: counter.remove()


def test_shown_maps_are_vit_attention_of_each_layer_and_the_rollout(x64):
    m = tiny_vit(depth=3)
    ex = PatchMaskExplorer(m)
    x = ex.current_image()
    for layer in (2, 0, 1, 'rollout', 0):
        for head in (('mean',) if layer == 'rollout' else ('mean', 1)):
            ex.layer.value = layer; ex.head.value = head
            want = head_map(vit_attention(m, x, layer), head).numpy()
            np.testing.assert_allclose(ex.last['attention'], want, atol=1e-5)
            np.testing.assert_allclose(np.array(ex.fig.data[3].z, dtype=float), want, atol=1e-5)
    assert ex.attention_passes == 1


def test_drawn_split_and_text_match_the_library(vit):
    ex = PatchMaskExplorer(vit, mask_ratio=0.45, throw_ratio=0.40)
    for _ in range(3):
        ex.resample.click()
        x = ex.current_image()
        a = head_map(vit_attention(vit, x, 1), 'mean')
        split = mask_throw_keep(famt_weights(a[None], eps=0.0), 0.45, 0.40,
                                generator=torch.Generator().manual_seed(ex.seed))
        drawn = np.array(ex.fig.data[5].z)
        np.testing.assert_array_equal(drawn.ravel(), split_labels(split)[0].numpy())
        text = np.array(ex.fig.data[5].text)
        assert (text[drawn == MASKED] == 'masked').all() and (text[drawn == THROWN] == 'thrown').all()
    assert 'masked <b>28</b> / thrown <b>25</b> / visible <b>11</b> of 64 patches' in ex.info.value
    # the heat maps sit on the image: one cell per 8 px patch, centred on it
    assert ex.fig.data[5].dx == 8 and ex.fig.data[5].x0 == 3.5 and np.array(ex.fig.data[3].z).shape == (8, 8)
    ex.fig.to_json()                                                   # the figure serialises (plotly validation)


def test_ratio_sum_guard(vit):
    ex = PatchMaskExplorer(vit, mask_ratio=0.45, throw_ratio=0.40)
    ex.mask_ratio.value = 0.8
    assert ex.throw_ratio.value == pytest.approx(0.19)
    assert 'throw ratio lowered to 0.19' in ex.message.value
    assert (ex.last['masked'], ex.last['thrown']) == split_counts(64, 0.8, 0.19)[:2]
    ex.throw_ratio.value = 0.9
    assert ex.mask_ratio.value == pytest.approx(0.09)
    assert 'mask ratio lowered to 0.09' in ex.message.value
    ex.resample.click()
    assert ex.message.value == ''                                      # the note goes with the next update
    for m in np.linspace(0, 0.95, 12):
        ex.mask_ratio.value = float(round(m, 2))
        assert ex.mask_ratio.value + ex.throw_ratio.value <= MAX_RATIO_SUM + 1e-9
        assert ex.last['visible'] >= 1 and 'error' not in ex.message.value


def test_upload_png_and_garbage(vit):
    ex = PatchMaskExplorer(vit)
    n = ex.attention_passes
    upload(ex, 'mine.png', png_bytes())
    assert ex.image.value == 'upload: mine.png' and ex.message.value == ''
    assert ex.last['image'].shape == (64, 64, 3) and ex.attention_passes == n + 1
    np.testing.assert_array_equal(ex.last['image'], ex.image_uint8())
    upload(ex, 'mine.png', png_bytes(seed=1))                           # same name, new content: redrawn
    assert ex.attention_passes == n + 2
    upload(ex, 'broken.jpg', b'\xff\xd8\xff garbage')
    assert 'Could not use broken.jpg' in ex.message.value
    assert ex.image.value == 'upload: mine.png'                         # the previous image stays


# ---------------------------------------------------------------- saliency
def test_saliency_panels_equal_the_library_and_a_numpy_reference(x64):
    sal = saliency_of(x64)
    np.testing.assert_array_equal(sal.numpy(), spectral_residual_saliency(x64[None], size=64).numpy())
    for seed, fill, k in ((0, 'mean', 0.6), (3, 'blur', 0.0), (4, 'highpass', 1.2)):
        p = saliency_panels(x64, sal, k, (0.1, 0.3), (0.4, 0.7), fill, seed)
        # foreground: numpy per-patch means on the 8x8 grid of 8 px patches, threshold mean - k * std
        m = sal[0, 0].numpy().astype(np.float64).reshape(8, 8, 8, 8).mean((1, 3))
        np.testing.assert_array_equal(p['foreground'], m >= m.mean() - k * m.std())
        # masks and filled images: the library, drawn in the documented order from one generator
        fg = torch.from_numpy(p['foreground']).reshape(1, -1)
        g = torch.Generator().manual_seed(seed)
        q = saliency_patch_mask(fg, (0.1, 0.3), g)
        qx = fill_patches(x64[None], q, (8, 8), fill, g)
        h = hard_negative_patch_mask(fg, (0.4, 0.7), g)
        hx = fill_patches(x64[None], h, (8, 8), fill, g)
        np.testing.assert_array_equal(p['query_mask'].ravel(), q[0].numpy())
        np.testing.assert_array_equal(p['hard_negative_mask'].ravel(), h[0].numpy())
        np.testing.assert_array_equal(p['query'], (qx[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
        np.testing.assert_array_equal(p['hard_negative'], (hx[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))
        assert p['n_foreground'] + p['n_background'] == 64 and p['n_hard_negative'] == int(h.sum())
        assert not (p['hard_negative_mask'] & ~p['foreground']).any()


def test_saliency_explorer_controls(x64):
    sx = SaliencyExplorer(size=64, fill='mean')
    assert sx.last['grid'] == (8, 8) and sx.saliency_passes == 1 and sx.message.value == ''
    counts = []
    for k in (-0.5, 0.0, 0.6, 1.5):
        sx.k.value = k
        counts.append(sx.last['n_foreground'])
        assert int(np.array(sx.fig.data[7].z).sum()) == sx.last['n_foreground']
    assert counts == sorted(counts) and counts[0] < counts[-1]          # a larger k: more foreground
    sx.k.value = 0.6
    sx.query_ratio.value = (0.25, 0.25)
    assert sx.last['n_query'] == 16                                     # int(64 * 0.25)
    drawn = np.array(sx.fig.data[8].z)
    np.testing.assert_array_equal(drawn % 2 == 1, sx.last['query_mask'])
    np.testing.assert_array_equal(drawn >= 2, sx.last['hard_negative_mask'])
    sx.hard_negative_ratio.value = (0.5, 0.5)
    assert sx.last['n_hard_negative'] == sx.last['n_foreground'] // 2
    assert f"hard negative masked <b>{sx.last['n_hard_negative']}</b>" in sx.info.value
    before = sx.last['query_mask'].copy(); seen = False
    for _ in range(5):
        sx.resample.click(); seen |= (sx.last['query_mask'] != before).any()
    assert seen
    q_mean = sx.last['query'].copy(); sx.fill.value = 'blur'
    pix = np.kron(sx.last['query_mask'], np.ones((8, 8), bool))
    assert (sx.last['query'][pix] != q_mean[pix]).any()
    np.testing.assert_array_equal(sx.last['query'][~pix], sx.last['image'][~pix])
    assert sx.saliency_passes == 1                                       # only the image / source recompute it
    upload(sx, 'mine.png', png_bytes())
    assert sx.image.value == 'upload: mine.png' and sx.saliency_passes == 2
    upload(sx, 'junk.png', b'junk')
    assert 'Could not use junk.png' in sx.message.value


def test_cnn_source_with_given_and_default_cnn(x64):
    torch.manual_seed(0)
    cnn = timm.create_model('resnet10t', pretrained=False, num_classes=0)
    counter = ForwardCounterCNN(cnn)
    sx = SaliencyExplorer(size=64, source='CNN', cnn=cnn)
    assert sx.last['saliency'].shape == (2, 2) and sx.message.value == ''   # a given CNN: no warning
    sx.k.value = 0.0; sx.resample.click(); sx.fill.value = 'mean'
    assert counter.n == 1
    sx2 = SaliencyExplorer(size=64)
    sx2.source.value = 'CNN'
    assert 'not objects' in sx2.message.value and sx2.last['saliency'].shape == (2, 2)
    with pytest.raises(TypeError, match='cnn: expected a timm CNN'): SaliencyExplorer(size=64, cnn=torch.nn.Linear(2, 2))


class ForwardCounterCNN:
    "Counts forward_features calls of a CNN."
    def __init__(self, model):
        self.n, inner = 0, model.forward_features
        def wrapped(*a, **k):
            self.n += 1
            return inner(*a, **k)
        model.forward_features = wrapped
