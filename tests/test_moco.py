"""Tests for folk_nb.moco (MoCo v2, saliency-guided MoCo): logits against plain-Python references and hand-computed
embeddings, per-sample hard negatives, the queue as a ring buffer, query-only masking, gradients, EMA, overfitting,
config / state round-trips, the trainer, bf16 autocast and two-process DDP (gloo)."""
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import folk_nb.moco as moco_mod
from folk_nb.methods import create_method
from folk_nb.moco import MoCo, SaliencyMoCo, contrastive_logits, enqueue, info_nce, positive_accuracy
import reference
from aten_ops import AtenOps
from folk_nb.data import resized_crop, sample_crop_boxes
from folk_nb.images import sample_images, sample_names
from folk_nb.saliency import cnn_saliency, foreground_patches, patch_pixel_mask, patch_saliency

VIT = dict(model='vit_tiny_patch16_224', img_size=32, patch_size=8, model_kwargs=dict(depth=1, embed_dim=64, num_heads=2))
CNN = dict(model='test_resnet', img_size=32, cifar_stem=True)
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


pytestmark = pytest.mark.usefixtures('one_thread')   # conftest.py: one intra-op thread in this module


def views(b=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)]


def by_hand(backbone, head, x):
    "Embedding written without the library's helpers: timm forward + head MLP, divided by the L2 norm."
    with torch.no_grad():
        f = backbone.model.forward_head(backbone.model.forward_features((x - MEAN) / STD), pre_logits=True)
        z = head.mlp(f).double()
    return z / z.norm(dim=1, keepdim=True)


@pytest.fixture
def capture(monkeypatch):
    "Record every call of contrastive_logits made by the methods (inputs and result)."
    calls, orig = [], moco_mod.contrastive_logits
    def spy(q, k, queue, temperature=0.2, hard=None, alpha=2.0):
        out = orig(q, k, queue, temperature, hard, alpha)
        calls.append(dict(q=q.detach().clone(), k=k.clone(), queue=queue.clone(), temperature=temperature,
                          hard=None if hard is None else hard.clone(), alpha=alpha, logits=out.detach().clone()))
        return out
    monkeypatch.setattr(moco_mod, 'contrastive_logits', spy)
    return calls


# ---------------------------------------------------------------- pure functions
@pytest.mark.parametrize('with_hard', [False, True])
def test_contrastive_logits_reference(with_hard):
    rng = np.random.default_rng(0)
    unit = lambda *s: (lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True))(rng.standard_normal(s))
    q, k, t, queue = unit(5, 16), unit(5, 16), unit(5, 16), unit(11, 16)
    tau, alpha = 0.17, 1.7
    got = contrastive_logits(*(torch.tensor(a, dtype=torch.float32) for a in (q, k, queue)), tau,
                             torch.tensor(t, dtype=torch.float32) if with_hard else None, alpha)
    assert got.dtype == torch.float32 and got.shape == (5, 1 + 11 + int(with_hard))
    for i in range(5):
        row = [sum(q[i, d] * k[i, d] for d in range(16))]
        row += [sum(q[i, d] * queue[j, d] for d in range(16)) for j in range(11)]
        if with_hard: row.append(alpha * sum(q[i, d] * t[i, d] for d in range(16)))
        np.testing.assert_allclose(got[i].numpy(), np.array(row) / tau, rtol=1e-5, atol=1e-5)


def test_hard_negative_column_is_per_sample():
    g = torch.Generator().manual_seed(1)
    q, k, t = (F.normalize(torch.randn(6, 8, generator=g), dim=1) for _ in range(3))
    queue = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    base = contrastive_logits(q, k, queue, 0.2, t)
    swapped = contrastive_logits(q, k, queue, 0.2, t[[0, 4, 2, 3, 1, 5]])        # exchange samples 1 and 4
    changed = (swapped != base).any(1)
    assert changed.tolist() == [False, True, False, False, True, False]
    assert torch.equal(swapped[:, :-1], base[:, :-1])                           # only the hard-negative column moves


def test_info_nce_and_accuracy_reference():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 9, generator=g) * 3
    ref = np.mean([-(l[0] - math.log(sum(math.exp(v) for v in l))) for l in logits.tolist()])
    assert abs(float(info_nce(logits)) - ref) < 1e-5
    assert float(positive_accuracy(logits)) == pytest.approx(sum(max(l) == l[0] for l in logits.tolist()) / 6)


@pytest.mark.parametrize('K,sizes', [(10, [4, 4, 4, 4]), (7, [3, 5, 2, 6]), (5, [3, 8, 1]), (6, [6, 6])])
def test_enqueue_is_a_ring_buffer(K, sizes):
    queue, ptr = torch.full((K, 2), -1.0), torch.zeros((), dtype=torch.long)
    ring, p, c = [[-1.0, -1.0]] * K, 0, 0
    for n in sizes:
        keys = torch.stack([torch.arange(c, c + n).float(), -torch.arange(c, c + n).float()], 1); c += n
        enqueue(queue, ptr, keys)
        for row in keys.tolist():                                              # plain Python ring buffer
            ring[p] = row; p = (p + 1) % K
        assert queue.tolist() == ring and int(ptr) == p


def test_bad_arguments():
    q = F.normalize(torch.randn(3, 4), dim=1)
    with pytest.raises(ValueError, match='k must have shape'): contrastive_logits(q, q[:2], q)
    with pytest.raises(ValueError, match='temperature'): contrastive_logits(q, q, q, 0.0)
    with pytest.raises(TypeError, match='q must be a torch.Tensor'): contrastive_logits([1.0], q, q)
    with pytest.raises(ValueError, match='hard must have shape'): contrastive_logits(q, q, q, 0.2, q[:1])
    with pytest.raises(ValueError, match='width D'): enqueue(torch.zeros(5, 3), torch.zeros((), dtype=torch.long), q)
    with pytest.raises(ValueError, match='temperature must lie'): MoCo(**VIT, temperature=-1)
    with pytest.raises(ValueError, match='momentum must lie'): MoCo(**VIT, momentum=1.5)
    with pytest.raises(TypeError, match='queue_size must be an int'): MoCo(**VIT, queue_size=8.0)
    with pytest.raises(TypeError, match='model_kwargs must be a dict'): MoCo(**{**VIT, 'model_kwargs': 3})
    with pytest.raises(ValueError, match='unknown timm model'): MoCo('resnet_eighteen')
    with pytest.raises(ValueError, match='not divisible'): MoCo('vit_tiny_patch16_224', img_size=30, patch_size=8)
    with pytest.raises(ValueError, match='needs a CNN backbone'): SaliencyMoCo(**VIT)
    with pytest.raises(ValueError, match='hard_negative_ratio'): SaliencyMoCo(**CNN, hard_negative_ratio=(0.4, 1.2))
    with pytest.raises(ValueError, match='fill must be one of'): SaliencyMoCo(**CNN, fill='zeros')
    with pytest.raises(ValueError, match='not a timm model'): SaliencyMoCo(**CNN, saliency='sobel')
    m = MoCo(**VIT, queue_size=8)
    with pytest.raises(ValueError, match='1 view'): m({'views': views()[:1]})
    with pytest.raises(ValueError, match='same shape'): m({'views': [views()[0], views(b=3)[1]]})
    with pytest.raises(TypeError, match=r"batch\['views'\]\[1\]"): m({'views': [views()[0], (views()[1] * 255).byte()]})


# ---------------------------------------------------------------- the logits inside forward
def test_moco_logits_layout_in_forward(capture):
    torch.manual_seed(0)
    m = MoCo(**VIT, queue_size=12, temperature=0.2)
    v = views(b=4)
    q0 = m.queue.clone()
    m({'views': v})
    (call,) = capture
    L = call['logits']
    assert L.shape == (4, 1 + 12)
    q = by_hand(m.backbone, m.head, v[0])
    k = by_hand(m.momentum_backbone, m.momentum_head, v[1])
    np.testing.assert_allclose(L[:, 0].double(), (q * k).sum(1) / 0.2, atol=1e-4)       # q.k+ of the same sample
    np.testing.assert_allclose(L[:, 1:].double(), q @ q0.double().T / 0.2, atol=1e-4)   # queue columns = q.queue^T
    assert call['hard'] is None


def test_saliency_moco_logits_layout_and_per_sample_hard_negative(capture):
    torch.manual_seed(0)
    m = SaliencyMoCo(**CNN, queue_size=10, alpha=2.0, temperature=0.2)
    v = views(b=4)
    q0 = m.queue.clone()
    out = m({'views': v})
    (call,) = capture
    L = call['logits']
    assert L.shape == (4, 1 + 10 + 1)
    # embeddings by hand, same batches in train mode (BN batch statistics are those of the same batch)
    q = by_hand(m.backbone, m.head, out['input'])
    k = by_hand(m.momentum_backbone, m.momentum_head, v[1])
    t = by_hand(m.momentum_backbone, m.momentum_head, out['hard_negative'])
    np.testing.assert_allclose(L[:, 0].double(), (q * k).sum(1) / 0.2, atol=1e-4)
    np.testing.assert_allclose(L[:, 1:11].double(), q @ q0.double().T / 0.2, atol=1e-4)
    np.testing.assert_allclose(L[:, 11].double(), 2.0 * (q * t).sum(1) / 0.2, atol=1e-4)  # each row its own t
    # the hard negatives differ from sample to sample, and swapping two of them changes only those two rows
    assert not torch.allclose(call['hard'][0], call['hard'][1])
    swapped = contrastive_logits(call['q'], call['k'], call['queue'], 0.2, call['hard'][[2, 1, 0, 3]], 2.0)
    assert (swapped != L).any(1).tolist() == [True, False, True, False]


@pytest.mark.parametrize('symmetric', [False, True])
def test_queue_gets_exactly_the_keys(capture, symmetric):
    torch.manual_seed(0)
    m = SaliencyMoCo(**CNN, queue_size=11, symmetric=symmetric)
    ring, ptr = m.queue.clone(), 0
    for step in range(3):
        before = m.queue.clone()
        capture.clear()
        m({'views': views(b=4, seed=step)})
        keys = torch.cat([c['k'] for c in capture])                  # hard negatives are not among them
        assert keys.shape[0] == 4 * (1 + symmetric)
        for c in capture: assert torch.equal(c['queue'], before)    # every direction saw the queue before the step
        for row in keys:
            ring[ptr] = row; ptr = (ptr + 1) % 11
        assert torch.equal(m.queue, ring) and int(m.queue_ptr) == ptr
        hard = torch.cat([c['hard'] for c in capture])
        assert torch.cdist(hard, m.queue).min() > 1e-4               # no hard negative entered the queue


def test_queue_wraps_around_in_training():
    m = MoCo(**VIT, queue_size=10)
    ptrs = []
    for step in range(4):
        m({'views': views(b=4, seed=step)})
        ptrs.append(int(m.queue_ptr))
    assert ptrs == [4, 8, 2, 6]
    k_last = m.encode_key(views(b=4, seed=3)[1])
    torch.testing.assert_close(m.queue[2:6], k_last, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- masking only touches the query
@pytest.mark.parametrize('fill', ['highpass', 'blur', 'mean'])
def test_masking_only_touches_the_query(monkeypatch, fill):
    torch.manual_seed(1)
    m = SaliencyMoCo(**CNN, queue_size=8, fill=fill)
    seen_q, seen_k = [], []
    enc_q, enc_k = m.encode_query, m.encode_key
    monkeypatch.setattr(m, 'encode_query', lambda x: (seen_q.append(x.clone()), enc_q(x))[1])
    monkeypatch.setattr(m, 'encode_key', lambda x, **kw: (seen_k.append(x.clone()), enc_k(x, **kw))[1])
    v = views(b=6, seed=3)
    originals = [x.clone() for x in v]
    out = m({'views': v})
    assert all(torch.equal(a, b) for a, b in zip(v, originals))       # the batch is not modified in place
    assert len(seen_q) == 1 and len(seen_k) == 2
    assert torch.equal(seen_k[0], v[1])                                # the key view goes in untouched
    qpix = patch_pixel_mask(out['query_mask'], out['grid'], (32, 32))
    assert torch.equal(seen_q[0], out['input'])
    assert torch.equal(torch.where(qpix, 0.0, seen_q[0]), torch.where(qpix, 0.0, v[0]))   # only masked pixels differ
    assert (seen_q[0] != v[0]).any()
    N = out['grid'][0] * out['grid'][1]
    n = out['query_mask'].sum(1)
    assert ((n >= int(N * 0.05)) & (n <= int(N * 0.25))).all()
    hpix = patch_pixel_mask(out['hard_negative_mask'], out['grid'], (32, 32))
    assert torch.equal(seen_k[1], out['hard_negative'])
    assert torch.equal(torch.where(hpix, 0.0, seen_k[1]), torch.where(hpix, 0.0, v[1]))
    fk = out['key_foreground'].sum(1)
    h = out['hard_negative_mask'].sum(1)
    assert not (out['hard_negative_mask'] & ~out['key_foreground']).any()
    assert ((h >= torch.floor(0.4 * fk)) & (h <= torch.floor(0.7 * fk + 1e-9))).all()


# ---------------------------------------------------------------- key-view saliency from the key pass
def stem_batch_sizes(m):
    "Batch size of every call of the momentum backbone (a hook on its first conv), and the hook's handle."
    sizes = []
    stem = next(mod for mod in m.momentum_backbone.modules() if isinstance(mod, torch.nn.Conv2d))
    return sizes, stem.register_forward_hook(lambda mod, inp, out: sizes.append(inp[0].shape[0]))


def test_key_saliency_comes_from_the_key_pass():
    torch.manual_seed(2)
    m = SaliencyMoCo(**CNN, queue_size=8, hard_negative_ratio=(0.4, 0.7))
    v = views(b=6, seed=4)
    ref = copy.deepcopy(m.momentum_backbone).train()               # train mode: BN statistics of the key batch
    with torch.no_grad():
        ref_sal = ref.model.forward_features((v[1] - MEAN) / STD).sum(1, keepdim=True)
    eval_sal = cnn_saliency(m.momentum_backbone, v[1])              # what the separate eval-mode pass gave
    out = m({'views': v})
    torch.testing.assert_close(out['key_saliency'], ref_sal)
    assert not torch.allclose(out['key_saliency'], eval_sal)        # the two modes really differ (BN statistics)
    fg = foreground_patches(patch_saliency(ref_sal, out['grid'], (32, 32)), 0.6)
    assert torch.equal(out['key_foreground'], fg)
    h, nf = out['hard_negative_mask'].sum(1), fg.sum(1)
    assert not (out['hard_negative_mask'] & ~fg).any()               # only the key pass's foreground is masked
    assert ((h >= torch.floor(0.4 * nf)) & (h <= torch.floor(0.7 * nf + 1e-9))).all() and h.sum() > 0
    hpix = patch_pixel_mask(out['hard_negative_mask'], out['grid'], (32, 32))
    assert torch.equal(torch.where(hpix, 0.0, out['hard_negative']), torch.where(hpix, 0.0, v[1]))


@pytest.mark.parametrize('kw,per_direction', [(dict(), [6, 6, 6]),                     # key, query saliency, hard
                                              (dict(hard_negative=False), [6, 6]),      # query saliency, key
                                              (dict(saliency='spectral'), [6, 6])])     # key, hard
@pytest.mark.parametrize('symmetric', [False, True])
def test_momentum_backbone_passes_per_step(kw, per_direction, symmetric):
    torch.manual_seed(0)
    m = SaliencyMoCo(**CNN, queue_size=16, symmetric=symmetric, **kw)
    sizes, hook = stem_batch_sizes(m)
    out = m({'views': views(b=6)})
    assert sizes == per_direction * (1 + symmetric) and torch.isfinite(out['loss'])
    out['loss'].backward()
    sizes.clear()
    a = m.augment(*views(b=6))                                      # the widgets' call: one pass over both views
    hook.remove()
    assert sizes == ([12] if kw == {} else [6] if 'hard_negative' in kw else [])
    if kw == {}: torch.testing.assert_close(a['key_saliency'], cnn_saliency(m.momentum_backbone, views(b=6)[1]))


# ---------------------------------------------------------------- saliency='warped_key'
def geometric_batch(b=6, size=32, seed=0):
    "Two views of real pictures cut by real crop boxes and flips (as the loaders make them), with that geometry."
    g = torch.Generator().manual_seed(seed)
    img = sample_images(sample_names()[:b], 2 * size)
    boxes = [sample_crop_boxes(b, 2 * size, 2 * size, (0.2, 1.0), generator=g) for _ in range(2)]
    flipped = [torch.rand(b, generator=g) < 0.5 for _ in range(2)]
    return dict(views=[resized_crop(img, bx, size, f) for bx, f in zip(boxes, flipped)], boxes=boxes, flipped=flipped)


@pytest.mark.parametrize('symmetric', [False, True])
def test_warped_key_masks_the_query_by_the_key_pass_map_carried_over(symmetric, monkeypatch):
    torch.manual_seed(1)
    m = SaliencyMoCo(**CNN, queue_size=16, saliency='warped_key', symmetric=symmetric)
    batch = geometric_batch()
    seen, orig = [], SaliencyMoCo.query_saliency
    def spy(self, xq, key_saliency=None, geometry=None):
        out = orig(self, xq, key_saliency, geometry)
        seen.append(dict(xq=xq, key_saliency=key_saliency.clone(), out=out))
        return out
    monkeypatch.setattr(SaliencyMoCo, 'query_saliency', spy)
    sizes, hook = stem_batch_sizes(m)
    ref_net = copy.deepcopy(m.momentum_backbone).train()
    out = m(batch)
    hook.remove()
    assert sizes == [6, 6] * (1 + symmetric)                        # keys and hard negatives: no query pass
    assert len(seen) == 1 + symmetric
    for d, (q, k) in enumerate([(0, 1), (1, 0)][:1 + symmetric]):
        assert seen[d]['xq'] is batch['views'][q]
        with torch.no_grad():                                        # the key pass's map, recomputed by hand
            ks = ref_net.model.forward_features((batch['views'][k] - MEAN) / STD).sum(1, keepdim=True)
        torch.testing.assert_close(seen[d]['key_saliency'], ks)
        sal, known = seen[d]['out']
        for i in range(6):
            carried, inside, on_edge = reference.map_between_views(
                ks[i].numpy(), batch['boxes'][k][i].tolist(), batch['boxes'][q][i].tolist(), (32, 32),
                bool(batch['flipped'][k][i]), bool(batch['flipped'][q][i]))
            expect = np.where(inside, carried[0], ks[i].double().mean().item())
            np.testing.assert_allclose(sal[i, 0].numpy()[~on_edge], expect[~on_edge], rtol=1e-4, atol=1e-4)
            np.testing.assert_array_equal(known[i, 0].numpy()[~on_edge], inside[~on_edge])
    assert not seen[0]['out'][1].all() and seen[0]['out'][1].any()  # these crops overlap only in part
    torch.testing.assert_close(out['saliency'], seen[0]['out'][0])
    assert torch.equal(out['foreground'], foreground_patches(patch_saliency(out['saliency'], out['grid'], (32, 32)), 0.6))
    qpix = patch_pixel_mask(out['query_mask'], out['grid'], (32, 32))
    assert torch.equal(torch.where(qpix, 0.0, out['input']), torch.where(qpix, 0.0, batch['views'][0]))
    out['loss'].backward()
    assert all(p.grad is None for p in m.momentum_backbone.parameters())


def test_warped_key_refuses_what_it_cannot_use():
    m = SaliencyMoCo(**CNN, queue_size=16, saliency='warped_key')
    batch = geometric_batch(b=4)
    with pytest.raises(ValueError, match="needs 'boxes' = \\[query boxes, key boxes\\].*this batch has no 'boxes'"):
        m({'views': batch['views']})
    with pytest.raises(ValueError, match="this batch has no 'flipped'"):
        m(dict(views=batch['views'], boxes=batch['boxes']))
    with pytest.raises(ValueError, match=r"batch\['boxes'\] must be a list of two float tensors of shape \(4, 4\)"):
        m(dict(batch, boxes=[b[:3] for b in batch['boxes']]))
    with pytest.raises(ValueError, match=r"batch\['flipped'\] must be a list of two bool tensors"):
        m(dict(batch, flipped=[f.long() for f in batch['flipped']]))
    with pytest.raises(ValueError, match='needs geometry'):
        m.augment(*batch['views'])
    with pytest.raises(ValueError, match="saliency='warped_key' needs a CNN backbone"):
        SaliencyMoCo(**VIT, saliency='warped_key')
    m2 = create_method('saliency_moco', **json.loads(json.dumps(m.config)))   # the config names it, as checkpoints do
    assert m2.saliency == 'warped_key' and m2.saliency_model is None


@pytest.mark.parametrize('kind', ['moco_vit', 'saliency_cnn', 'saliency_timm', 'moco_resnet18'])
def test_gradients_reach_online_encoder_only(kind):
    torch.manual_seed(0)
    size = 32
    if kind == 'moco_vit': m = MoCo(**VIT, queue_size=8)
    elif kind == 'saliency_cnn': m = SaliencyMoCo(**CNN, queue_size=8)
    elif kind == 'saliency_timm': m = SaliencyMoCo(**CNN, queue_size=8, saliency='test_resnet', saliency_pretrained=False)
    else:
        size = 16
        m = SaliencyMoCo('resnet18', img_size=16, cifar_stem=True, queue_size=8)
    m({'views': views(b=4, size=size)})['loss'].backward()
    online = list(m.backbone.named_parameters()) + list(m.head.named_parameters())
    assert all(p.grad is not None for _, p in online)              # every online parameter is in the graph
    # (timm ResNets zero-init the last BN of each residual block, so some gradients are exactly 0 at step 0)
    first = next(p for n, p in m.backbone.named_parameters() if p.ndim == 4)      # stem conv / patch embedding
    assert first.grad.abs().sum() > 0 and m.head.mlp[0].weight.grad.abs().sum() > 0
    frozen = [*m.momentum_backbone.parameters(), *m.momentum_head.parameters()]
    if getattr(m, 'saliency_model', None) is not None: frozen += list(m.saliency_model.parameters())
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    optimised = {id(p) for g in m.param_groups(0.05) for p in g['params']}
    assert optimised == {id(p) for _, p in online}


def test_ema_update_matches_formula():
    torch.manual_seed(0)
    m = SaliencyMoCo(**CNN, queue_size=8, momentum=0.9)
    with torch.no_grad():
        for p in [*m.backbone.parameters(), *m.head.parameters()]: p.add_(torch.randn_like(p))
    pairs = [(m.momentum_backbone, m.backbone), (m.momentum_head, m.head)]
    before = [{n: p.clone() for n, p in t.named_parameters()} for t, _ in pairs]
    bufs = {n: b.clone() for n, b in m.momentum_backbone.named_buffers() if b.is_floating_point()}
    assert m.schedule(3, 10) == {'momentum': 0.9}
    m.after_optimizer_step()
    for (t, s), old in zip(pairs, before):
        sp = dict(s.named_parameters())
        for n, p in t.named_parameters():
            torch.testing.assert_close(p, 0.9 * old[n] + 0.1 * sp[n], atol=1e-6, rtol=1e-6)
    for n, b in m.momentum_backbone.named_buffers():                  # BN statistics stay the momentum encoder's own
        if b.is_floating_point(): assert torch.equal(b, bufs[n])


def test_cosine_momentum_schedule():
    m = MoCo(**VIT, queue_size=8, momentum=0.99, momentum_schedule='cosine')
    for step in (0, 3, 5, 9, 10, 12):
        want = 1 - (1 - 0.99) * (1 + math.cos(math.pi * min(step, 10) / 10)) / 2
        assert abs(m.schedule(step, 10)['momentum'] - want) < 1e-12


# ---------------------------------------------------------------- overfitting a fixed batch
def fixed_loss(m, batch, queue0, seed=123):
    "Loss on `batch` against the fixed queue `queue0`, same random masks every time; the method's state is kept."
    state = copy.deepcopy(m.state_dict())
    m.queue.copy_(queue0)
    torch.manual_seed(seed)
    with torch.no_grad(): loss = float(m(batch)['loss'])
    m.load_state_dict(state)
    return loss


@pytest.mark.parametrize('name,kw', [('moco', VIT), ('saliency_moco', CNN)])
def test_overfit_fixed_batch(name, kw):
    torch.manual_seed(0)
    m = create_method(name, **kw, queue_size=16, momentum=0.99)
    batch = {'views': views(b=8, seed=5)}
    queue0 = m.queue.clone()
    opt = torch.optim.AdamW(m.param_groups(0.0), lr=2e-3)
    start = fixed_loss(m, batch, queue0)
    for step in range(12):
        m.queue.copy_(queue0)                 # a fixed set of negatives: the batch's own keys never become negatives
        loss = m(batch)['loss']
        opt.zero_grad(); loss.backward(); opt.step()
        m.schedule(step, 12); m.after_optimizer_step()
    end = fixed_loss(m, batch, queue0)
    assert end < 0.8 * start, (start, end)


# ---------------------------------------------------------------- config, state, trainer, autocast
@pytest.mark.parametrize('name,kw', [('moco', dict(VIT, queue_size=8, symmetric=True, momentum_schedule='cosine')),
                                     ('saliency_moco', dict(CNN, queue_size=8, fill='blur', query_mask_ratio=(0.1, 0.3)))])
def test_config_and_state_round_trip(name, kw):
    torch.manual_seed(0)
    m = create_method(name, **kw)
    m({'views': views()})
    cfg = json.loads(json.dumps(m.config))                         # what config.json holds
    m2 = create_method(name, **cfg)
    assert m2.config == m.config and type(m2) is type(m)
    assert {'queue', 'queue_ptr'} <= set(m.state_dict())
    m2.load_state_dict(m.state_dict())
    assert torch.equal(m2.queue, m.queue) and int(m2.queue_ptr) == int(m.queue_ptr) == (4 * (1 + m.symmetric)) % 8
    m.eval(); m2.eval()
    x = views(seed=9)[0]
    torch.testing.assert_close(m2.encode_query(x), m.encode_query(x))
    torch.testing.assert_close(m2.encode_key(x), m.encode_key(x))
    if name == 'saliency_moco': assert m2.query_mask_ratio == (0.1, 0.3) and m2.fill == 'blur'


@pytest.mark.parametrize('name', ['moco', 'saliency_moco'])
def test_trainer_run(name, tmp_path):
    from folk_nb.data import create_loader
    from folk_nb.trainer import TrainConfig, Trainer, load_checkpoint
    torch.manual_seed(0)
    m = create_method(name, **CNN, queue_size=20)
    loader = create_loader('samples', recipe=m.recipe, size=32, batch_size=8, device='cpu', epoch_size=16)
    summary = Trainer(m, loader, TrainConfig(max_steps=3, lr=0.01, progress=False, log_every=1, out_dir=str(tmp_path))).fit()
    assert summary['steps'] == 3 and summary['nonfinite_steps'] == 0 and math.isfinite(summary['last']['loss'])
    assert int(m.queue_ptr) == (3 * 8) % 20
    ckpt = load_checkpoint(tmp_path / 'checkpoints' / 'last.pt')
    m2 = create_method(ckpt['method'], **ckpt['method_config'])
    m2.load_state_dict(ckpt['model'])
    assert torch.equal(m2.queue, m.queue.cpu())


@pytest.mark.parametrize('name,kw', [('moco', VIT), ('saliency_moco', CNN)])
def test_bf16_autocast_forward(name, kw):
    torch.manual_seed(0)
    m = create_method(name, **kw, queue_size=8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = m({'views': views()})
    assert out['loss'].dtype == torch.float32 and torch.isfinite(out['loss'])
    assert m.queue.dtype == torch.float32
    out['loss'].backward()
    assert m.head.mlp[0].weight.grad is not None


def test_saliency_sources_and_frozen_model():
    torch.manual_seed(0)
    sp = SaliencyMoCo(**VIT, queue_size=8, saliency='spectral')
    out = sp({'views': views()})
    assert out['saliency'].shape == (4, 1, 32, 32) and out['foreground'].shape == (4, 64)
    tm = SaliencyMoCo(**CNN, queue_size=8, saliency='test_resnet', saliency_pretrained=False)
    assert any(k.startswith('saliency_model.') for k in tm.state_dict())
    assert not any(p.requires_grad for p in tm.saliency_model.parameters())
    assert tm.saliency_map(views()[0]).ndim == 4


# ---------------------------------------------------------------- two processes (gloo): gathered keys, shuffle BN
def _ddp_worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        torch.manual_seed(0)                                           # the same model and queue on both ranks
        m = MoCo('test_resnet', img_size=16, cifar_stem=True, queue_size=10)
        v = views(b=3, size=16, seed=10 + rank)
        q0 = m.queue.clone()
        m.eval()                                                       # BN running statistics: keys do not depend on the shuffle
        m({'views': v})
        shuffled, shuffled_sal = m.encode_key(v[1], with_saliency=True)
        m.shuffle_bn = False
        plain, plain_sal = m.encode_key(v[1], with_saliency=True)
        x = torch.arange(3.0)[:, None] + 3 * rank
        share, undo = moco_mod.shuffle_across_ranks(x)
        back = moco_mod.unshuffle_across_ranks(share * 10, undo)
        torch.save(dict(queue=m.queue, ptr=m.queue_ptr, q0=q0, shuffled=shuffled, plain=plain, share=share,
                        shuffled_sal=shuffled_sal, plain_sal=plain_sal,
                        back=back, x=x), f'{out_file}.{rank}')
    finally:
        dist.destroy_process_group()


def test_ddp_gather_and_shuffle_bn(tmp_path):
    import torch.multiprocessing as mp
    # fork: the workers inherit the imported modules (spawn would re-import torch and timm in each, ~10 s)
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / 'init'), str(tmp_path / 'out')), nprocs=2,
                       start_method='fork')
    r = [torch.load(f'{tmp_path}/out.{i}') for i in range(2)]
    assert torch.equal(r[0]['queue'], r[1]['queue']) and int(r[0]['ptr']) == 6     # both ranks: the same queue
    torch.testing.assert_close(r[0]['queue'][:3], r[0]['plain'], atol=1e-5, rtol=0)  # rank 0's keys first
    torch.testing.assert_close(r[0]['queue'][3:6], r[1]['plain'], atol=1e-5, rtol=0)  # then rank 1's
    assert torch.equal(r[0]['queue'][6:], r[0]['q0'][6:])
    for i in range(2):
        torch.testing.assert_close(r[i]['shuffled'], r[i]['plain'], atol=1e-5, rtol=0)
        torch.testing.assert_close(r[i]['shuffled_sal'], r[i]['plain_sal'])    # the map is unshuffled like the keys
        assert torch.equal(r[i]['back'], r[i]['x'] * 10)
    assert sorted(torch.cat([r[0]['share'], r[1]['share']])[:, 0].tolist()) == [0, 1, 2, 3, 4, 5]


# ---------------------------------------------------------------- shuffle BN on one device: split BatchNorm, bn_splits
def _per_split_reference(x, bn, G):
    "F.batch_norm in training mode on each split separately (fresh running stats each): output, per-split stats."
    outs, rms, rvs = [], [], []
    for g in range(G):                                   # split g: samples g, g + G, g + 2G, ...
        rm, rv = torch.zeros(bn.num_features, dtype=torch.float64), torch.ones(bn.num_features, dtype=torch.float64)
        outs.append(F.batch_norm(x[g::G].double(), rm, rv, bn.weight.double(), bn.bias.double(),
                                 True, bn.momentum, bn.eps))
        rms.append(rm); rvs.append(rv)
    y = torch.empty(x.shape, dtype=torch.float64)
    for g in range(G): y[g::G] = outs[g]                 # back in batch order
    return y, torch.stack(rms).mean(0), torch.stack(rvs).mean(0)


@pytest.mark.parametrize('layout,dtype', [('nchw', torch.float32), ('channels_last', torch.float32),
                                          ('nchw', torch.bfloat16), ('channels_last', torch.bfloat16)])
def test_split_batchnorm_matches_per_split_batch_norm(layout, dtype):
    torch.manual_seed(0)
    bn = moco_mod.SplitBatchNorm2d(6, num_splits=3, momentum=0.2)
    with torch.no_grad(): bn.weight.uniform_(0.5, 2.0); bn.bias.uniform_(-1, 1)
    x = (torch.randn(12, 6, 5, 7) * 2 - 0.5).to(dtype)
    if layout == 'channels_last': x = x.contiguous(memory_format=torch.channels_last)
    want, rm, rv = _per_split_reference(x, bn, 3)
    y = bn(x)
    assert y.dtype == dtype and y.shape == x.shape
    if layout == 'channels_last': assert y.is_contiguous(memory_format=torch.channels_last)
    tol = dict(atol=3e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.double(), want, **tol)
    torch.testing.assert_close(bn.running_mean.double(), rm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_var.double(), rv, atol=1e-5, rtol=1e-5)
    assert int(bn.num_batches_tracked) == 1
    y.float().sum().backward()                               # differentiable, gradients for the affine parameters
    assert bn.weight.grad is not None and bn.bias.grad is not None
    bn.eval()                                                # eval: plain BN with the running statistics
    x2 = torch.randn(5, 6, 3, 3)
    torch.testing.assert_close(bn(x2), F.batch_norm(x2, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))


@pytest.mark.parametrize('layout', ['nchw', 'channels_last'])
def test_split_batchnorm_is_one_batch_norm_op(layout):
    "The split statistics come from one BN op over a view (no per-split loop, no element-wise statistics)."
    bn = moco_mod.SplitBatchNorm2d(8, num_splits=4)
    x = torch.randn(16, 8, 4, 4, requires_grad=True)
    if layout == 'channels_last': x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with AtenOps() as fwd: y = bn(x)
    with AtenOps() as bwd: y.sum().backward()
    norms = {k: v for k, v in fwd.counts.items() if 'batch_norm' in k}
    assert sum(norms.values()) == 1, fwd.counts
    assert not any(k in fwd.counts for k in ('var_mean', 'var', 'rsqrt', 'sqrt')), fwd.counts
    assert sum(v for k, v in bwd.counts.items() if 'batch_norm' in k) == 1, bwd.counts
    copies = fwd.counts.get('clone', 0) + fwd.counts.get('copy_', 0) + fwd.counts.get('_to_copy', 0)
    if layout == 'nchw': assert fwd.counts.get('clone', 0) == 0, fwd.counts       # NCHW: the split view is free
    else: assert fwd.counts.get('clone', 0) == 2, fwd.counts                      # channels_last: to NCHW and back
    assert copies <= 4, fwd.counts                                                 # + the two running-stat copies


def test_split_batchnorm_bf16_autocast_and_cumulative_momentum():
    torch.manual_seed(0)
    bn = moco_mod.SplitBatchNorm2d(4, num_splits=2, momentum=None)
    xs = [torch.randn(4, 4, 3, 3) for _ in range(2)]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        for x in xs: bn(x)
    means = [torch.stack([x[:2].mean((0, 2, 3)), x[2:].mean((0, 2, 3))]).mean(0) for x in xs]
    torch.testing.assert_close(bn.running_mean, (means[0] + means[1]) / 2)   # momentum None: cumulative average
    assert int(bn.num_batches_tracked) == 2
    with pytest.raises(ValueError, match=r'N = 6 is not divisible by num_splits = 4'):
        moco_mod.SplitBatchNorm2d(4, num_splits=4)(torch.randn(6, 4, 3, 3))
    one = moco_mod.SplitBatchNorm2d(4, num_splits=1)
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(one(x), torch.nn.BatchNorm2d(4)(x))            # one split: plain BN


def test_split_batchnorm_keeps_the_state_and_eval_outputs():
    import timm
    torch.manual_seed(0)
    net = timm.create_model('resnet18', num_classes=0)
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, torch.nn.BatchNorm2d): mod.running_mean.normal_(0, 0.1); mod.running_var.uniform_(0.5, 2)
    net.eval()
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(): want = net(x)
    moco_mod.split_batchnorm(net, 8)
    assert any(isinstance(m, moco_mod.SplitBatchNorm2d) for m in net.modules())
    assert not any(type(m) is torch.nn.BatchNorm2d for m in net.modules())
    assert list(net.state_dict()) == list(sd) and all(torch.equal(net.state_dict()[k], v) for k, v in sd.items())
    with torch.no_grad(): assert torch.equal(net(x), want)


@pytest.mark.parametrize('name', ['moco', 'saliency_moco'])
def test_bn_splits_train_checkpoint_and_export(name, tmp_path):
    from folk_nb.data import GPUDataLoader
    from folk_nb.export import export_encoder, load_encoder
    from folk_nb.models import normalize_images
    from folk_nb.trainer import TrainConfig, Trainer, load_checkpoint
    torch.manual_seed(0)
    m = create_method(name, model='resnet18', img_size=32, cifar_stem=True, queue_size=16, out_dim=8, bn_splits=4)
    assert m.config['bn_splits'] == 4
    for enc in (m.backbone, m.momentum_backbone):
        assert any(isinstance(x, moco_mod.SplitBatchNorm2d) and x.num_splits == 4 for x in enc.modules())
    loader = GPUDataLoader(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), views=m.recipe, batch_size=8)
    trainer = Trainer(m, loader, TrainConfig(epochs=1, optimizer='sgd', lr=0.01, out_dir=str(tmp_path), progress=False))
    summary = trainer.fit()
    assert summary['steps'] == 2 and summary['nonfinite_steps'] == 0 and math.isfinite(summary['last']['loss'])
    ckpt = load_checkpoint(trainer.ckpt_path)
    assert ckpt['method'] == name and ckpt['method_config']['bn_splits'] == 4
    m2 = create_method(ckpt['method'], **ckpt['method_config'])
    m2.load_state_dict(ckpt['model'])
    m.eval(); m2.eval()
    x = views(b=4, seed=3)[0]
    torch.testing.assert_close(m2.encode_key(x), m.encode_key(x))
    path = export_encoder(trainer.ckpt_path, tmp_path / 'enc.pt', 'backbone')
    enc = load_encoder(path).eval()
    assert not any(isinstance(x, moco_mod.SplitBatchNorm2d) for x in enc.modules())   # a plain timm model
    xn = normalize_images(x)
    with torch.no_grad():
        want = m.backbone.model.forward_head(m.backbone.model.forward_features(xn), pre_logits=True)
        got = enc.forward_head(enc.forward_features(xn), pre_logits=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize('name', ['moco', 'saliency_moco'])
def test_bn_splits_keys_are_unshuffled(name):
    "encode_key = the momentum encoder on each split of the permuted batch, by hand, put back in order."
    torch.manual_seed(0)
    m = create_method(name, **CNN, queue_size=8, bn_splits=4)
    assert m._split_bn and any(isinstance(x, moco_mod.SplitBatchNorm2d) for x in m.momentum_backbone.modules())
    plain = copy.deepcopy(m)
    for mod in plain.modules():
        if isinstance(mod, moco_mod.SplitBatchNorm2d): mod.num_splits = 1
    x = views(b=8, seed=5)[1]
    torch.manual_seed(7)
    keys, sal = m.encode_key(x, with_saliency=True)
    torch.manual_seed(7)
    perm = torch.randperm(8)
    with torch.no_grad():
        xp = x[perm]
        parts = [plain.momentum_backbone.forward_features(normalize(xp[g::4])) for g in range(4)]   # split g: g, g+4
        k, s = torch.empty(8, m.config["out_dim"]), torch.empty(8, 1, *parts[0].shape[2:])
        for g, f in enumerate(parts):
            k[g::4] = F.normalize(plain.momentum_head(plain.momentum_backbone.pool(f)).float(), dim=1)
            s[g::4] = f.float().sum(1, keepdim=True)
    undo = torch.argsort(perm)
    torch.testing.assert_close(keys, k[undo], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sal, s[undo], atol=1e-4, rtol=1e-4)
    out = m({'views': views(b=8, seed=6)})                  # a whole step, the hard negatives' key pass included
    out['loss'].backward()
    assert torch.isfinite(out['loss'])


def normalize(x):
    return (x - MEAN) / STD


def test_bn_splits_errors_and_old_checkpoints():
    from folk_nb.methods import checkpoint_config
    torch.manual_seed(0)
    m = create_method('moco', **CNN, queue_size=8, bn_splits=4)
    with pytest.raises(ValueError, match=r'batch size 6 is not divisible by bn_splits'):
        m({'views': views(b=6)})
    for bad, err in ((0, ValueError), (2.5, TypeError), (True, TypeError)):
        with pytest.raises(err, match='bn_splits'):
            create_method('moco', **CNN, queue_size=8, bn_splits=bad)
    with pytest.raises(ValueError, match='bn_splits'):
        create_method('saliency_moco', **CNN, queue_size=8, bn_splits=0)
    old = {k: v for k, v in MoCo(**CNN, queue_size=8).config.items() if k != 'bn_splits'}
    assert checkpoint_config('moco', old)['bn_splits'] == 1                      # checkpoints before the option
    assert MoCo(**checkpoint_config('moco', old)).bn_splits == 1


def test_bn_splits_through_the_cli(tmp_path):
    from folk_nb.cli import main
    from folk_nb.trainer import load_checkpoint
    s = main(['--method', 'moco', '--model', 'test_resnet', '--cifar-stem', '--data', 'samples', '--img-size', '32',
              '--batch-size', '8', '--epoch-size', '16', '--out', str(tmp_path), '--no-progress', '--device', 'cpu',
              '--max-steps', '1', '--method-args', json.dumps({'queue_size': 16, 'bn_splits': 4})])
    assert s['status'] == 'finished' and s['steps'] == 1
    assert load_checkpoint(tmp_path / 'checkpoints' / 'last.pt')['method_config']['bn_splits'] == 4


def forward_ops(m, batch) -> dict:
    "The computing aten ops of a forward as in a later step: after a first one (one-time caches), value checks off."
    from folk_nb.checks import value_checks
    m(batch)
    with value_checks(False), AtenOps() as ops: m(batch)
    return ops.computed


def test_warped_key_masking_adds_few_ops_to_a_moco_forward():
    """On a GPU a small MoCo step waits on the host, so each op the masking launches costs time (+25% of a step on an
    H100 with 130 of them, bench/results/README.md). Index maps, kernels and pixel centres are built once
    (`device_cached`): what remains per step is the masking's arithmetic."""
    torch.manual_seed(0)
    batch = geometric_batch(b=4)
    base = forward_ops(MoCo(**CNN, queue_size=16), batch)
    ops = forward_ops(SaliencyMoCo(**CNN, queue_size=16, saliency='warped_key', hard_negative=False), batch)
    extra = {k: v - base.get(k, 0) for k, v in ops.items() if v != base.get(k, 0)}
    assert sum(extra.values()) <= 105, extra          # 98 when written (torch 2.14); 138 when every call rebuilt them
    for rebuilt in ('ones', 'exp', 'floor_divide', 'pow'):   # patch ids, pixel counts, Gaussian kernel: cached
        assert rebuilt not in extra, extra


# ------------------------------------------------------------------------------------------------ fused masking
def _masking_inputs(m, b=4):
    batch = geometric_batch(b=b)
    xq, xk = batch['views'][:2]
    geo = [(batch['boxes'][0], batch['flipped'][0]), (batch['boxes'][1], batch['flipped'][1])]
    _, key_saliency = m.encode_key(xk, with_saliency=True)
    return xq, xk, key_saliency, geo


def test_fused_masking_matches_the_eager_masking_draw_for_draw():
    """Compiled, `augment` computes what it computes eagerly: with inductor drawing its random numbers as eager code
    does (`fallback_random`), the fused masking gives the same masks and the same images, two calls in a row."""
    from folk_nb.checks import value_checks
    import torch._inductor.config as inductor_config
    torch.manual_seed(0)
    eager = SaliencyMoCo(**CNN, queue_size=16, saliency='warped_key', fused_masking=False)
    inputs = _masking_inputs(eager)                    # its key pass moves the BN statistics: copy the model after it
    fused = SaliencyMoCo(**CNN, queue_size=16, saliency='warped_key', fused_masking=True)
    fused.load_state_dict(eager.state_dict())
    with inductor_config.patch(fallback_random=True), value_checks(False):
        for seed in (1, 2):
            torch.manual_seed(seed); a = eager.masking(*inputs)
            torch.manual_seed(seed); b = fused.masking(*inputs)
            assert a.keys() == b.keys() and a['grid'] == b['grid']
            for k in a:                       # masks exactly, images and maps up to fused float arithmetic
                if isinstance(a[k], torch.Tensor):
                    assert (torch.allclose(a[k], b[k], atol=1e-5) if a[k].is_floating_point() else torch.equal(a[k], b[k])), k
    assert not moco_mod._FUSED_MASKING.get('failed')
    assert b['query_mask'].any() and b['hard_negative_mask'].any()     # the draws masked something


def _top_level_aten_ops(fn) -> int:
    "aten operators called from Python (not from inside another aten operator) while fn() runs, from the profiler."
    from torch.profiler import profile, ProfilerActivity
    with profile(activities=[ProfilerActivity.CPU]) as p: fn()
    def top(e):
        par = e.cpu_parent
        while par is not None and not par.name.startswith('aten::'): par = par.cpu_parent
        return par is None
    return sum(1 for e in p.events() if e.name.startswith('aten::') and top(e))


def test_fused_masking_is_a_few_operator_calls_instead_of_a_hundred():
    """What the host launches for the warped-key masking: ~150 operator calls eager (views included), a few fused
    (the compiled kernels, plus the operators inductor leaves to aten: sort, the blur's convolutions)."""
    from folk_nb.checks import value_checks
    counts = {}
    for fused in (False, True):
        m = SaliencyMoCo(**CNN, queue_size=16, saliency='warped_key', hard_negative=False, fused_masking=fused)
        inputs = _masking_inputs(m)
        with value_checks(False):
            m.masking(*inputs)                                         # compiles (fused)
            counts[fused] = _top_level_aten_ops(lambda: m.masking(*inputs))
    assert counts[False] >= 90 and counts[True] <= 10, counts


def test_fused_masking_is_skipped_where_it_should_be_and_falls_back_with_a_warning(monkeypatch):
    "Eager on the CPU by default, with the value checks on (a run's first step) and after a failed compile (warned)."
    from folk_nb.checks import value_checks
    calls = []
    def broken(*args):
        calls.append(1); raise RuntimeError('no compiler here')
    monkeypatch.setattr(moco_mod, '_FUSED_MASKING', {SaliencyMoCo: broken})
    torch.manual_seed(0)
    m = SaliencyMoCo(**CNN, queue_size=16, saliency='warped_key')
    inputs = _masking_inputs(m)
    with value_checks(False): m.masking(*inputs)
    assert calls == []                                                  # fused_masking=None: on CUDA only
    m.fused_masking = True
    m.masking(*inputs)                                                  # value checks on: eager, checked
    assert calls == []
    with value_checks(False):
        bad = (inputs[0], inputs[1], inputs[2], [(inputs[3][0][0][:, :3], inputs[3][0][1]), inputs[3][1]])
        with pytest.raises(ValueError, match=r'dst_boxes must be a float tensor \(B, 4\)'):
            m.masking(*bad)                                             # an input error raises as it does unfused ...
        assert calls == [1] and not moco_mod._FUSED_MASKING.get('failed')   # ... and does not switch fusion off
        torch.manual_seed(3); expected = SaliencyMoCo.augment(m, *inputs)
        torch.manual_seed(3)
        with pytest.warns(UserWarning, match='fused masking unavailable .*no compiler here'):
            out = m.masking(*inputs)
    assert moco_mod._FUSED_MASKING['failed'] and calls == [1, 1]
    assert all(torch.equal(out[k], expected[k]) for k in out if isinstance(out[k], torch.Tensor))   # the eager run's
    with pytest.raises(TypeError, match='fused_masking must be True, False or None'):
        SaliencyMoCo(**CNN, queue_size=16, fused_masking='yes')


def test_fused_masking_compiles_a_subclass_own_augment(monkeypatch):
    from folk_nb.checks import value_checks
    class Tagged(SaliencyMoCo):
        def augment(self, *args, **kwargs): return dict(super().augment(*args, **kwargs), tagged=True)
    compiled = []
    monkeypatch.setattr(moco_mod, '_FUSED_MASKING', {})
    monkeypatch.setattr(torch, 'compile', lambda fn, **kw: compiled.append(fn) or fn)
    m = Tagged(**CNN, queue_size=16, saliency='warped_key', fused_masking=True)
    with value_checks(False): out = m.masking(*_masking_inputs(m))
    assert out['tagged'] and compiled == [Tagged.augment]
