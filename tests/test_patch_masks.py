"""Tests for folk_nb.patch_masks against plain-Python / numpy references and exact probabilities."""
import itertools
import math

import numpy as np
import pytest
import torch

from folk_nb.patch_masks import (MASKED, THROWN, VISIBLE, PatchSplit, attmask_split, gather_tokens,
                                 mask_throw_keep, random_masking, random_split, restore_indices, split_counts,
                                 split_labels, split_order, weighted_permutation)

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])
RATIOS = [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (0.5, 0.5), (0.45, 0.40), (0.75, 0.0), (0.29, 0.0),
          (0.1, 0.3), (0.33, 0.33), (1 / 3, 2 / 3), (0.999, 0.0), (0.001, 0.0), (0.6, 0.4)]


def gen(seed, device='cpu'):
    return torch.Generator(device=device).manual_seed(seed)


def check_partition(split, b, n):
    "Every image: three disjoint sets covering 0..N-1, each sorted ascending (checked with plain Python)."
    sets = [t.cpu().tolist() for t in split]
    for row in range(b):
        parts = [s[row] for s in sets]
        for p in parts: assert p == sorted(p)
        flat = [i for p in parts for i in p]
        assert sorted(flat) == list(range(n))


# ---------------------------------------------------------------- counts
@pytest.mark.parametrize('n', [1, 7, 16, 49, 64, 196, 197])
@pytest.mark.parametrize('mask_ratio,throw_ratio', RATIOS)
def test_split_counts_reference(n, mask_ratio, throw_ratio):
    # reference: exact rational arithmetic on the decimal value, floor per set
    from fractions import Fraction
    fm, ft = Fraction(repr(mask_ratio)).limit_denominator(10 ** 6), Fraction(repr(throw_ratio)).limit_denominator(10 ** 6)
    n_mask = min(n, math.floor(n * fm))
    n_throw = min(n - n_mask, math.floor(n * ft))
    assert split_counts(n, mask_ratio, throw_ratio) == (n_mask, n_throw, n - n_mask - n_throw)


def test_split_counts_famt_and_mae_figures():
    assert split_counts(196, 0.45, 0.40) == (88, 78, 30)  # encoder 31 tokens, decoder 119 with CLS (SPEC)
    assert split_counts(196, 0.75) == (147, 0, 49)        # MAE: 50 tokens with CLS
    assert split_counts(100, 0.29) == (29, 0, 71)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('mask_ratio,throw_ratio', RATIOS)
def test_mask_throw_keep_exact_counts_and_partition(device, mask_ratio, throw_ratio):
    b, n = 6, 49
    w = torch.rand(b, n, generator=gen(0)).to(device)
    w[0] = 0  # an all-zero image
    w[1, :10] = 0
    s = mask_throw_keep(w, mask_ratio, throw_ratio, generator=gen(1, device))
    n_mask, n_throw, n_vis = split_counts(n, mask_ratio, throw_ratio)
    assert [tuple(t.shape) for t in s] == [(b, n_mask), (b, n_throw), (b, n_vis)]
    assert all(t.dtype == torch.long and t.device.type == device for t in s)
    check_partition(s, b, n)


@pytest.mark.parametrize('mask_ratio,throw_ratio', RATIOS)
def test_random_split_and_attmask_counts(mask_ratio, throw_ratio):
    b, n = 5, 36
    s = random_split(b, n, mask_ratio, throw_ratio, generator=gen(2))
    assert tuple(len(t[0]) for t in s) == split_counts(n, mask_ratio, throw_ratio)
    check_partition(s, b, n)
    a = torch.rand(b, n, generator=gen(3))
    for mode in ('high', 'low'):
        s = attmask_split(a, mask_ratio, mode)
        assert s.masked.shape == (b, split_counts(n, mask_ratio)[0]) and s.thrown.shape == (b, 0)
        check_partition(s, b, n)


# ---------------------------------------------------------------- Plackett-Luce statistics
def test_first_pick_matches_plackett_luce():
    "The single masked patch (mask_ratio = 1/N) is patch i with probability (w_i/sum + eps)/sum(...)."
    w = torch.tensor([0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 0.25, 3.0])
    eps = 0.02  # large eps, so its effect on the zero-weight patch is measurable
    draws = 200_000
    s = mask_throw_keep(w.expand(draws, 8), 1 / 8, 0.0, generator=gen(10), eps=eps)
    counts = np.bincount(s.masked[:, 0].numpy(), minlength=8)
    p = (w / w.sum() + eps).numpy(); p = p / p.sum()
    z = (counts - draws * p) / np.sqrt(draws * p * (1 - p))
    assert np.abs(z).max() < 5, z


def _pl_probability(order, w):
    "Plackett-Luce probability of a full order (plain Python)."
    prob, rest = 1.0, list(range(len(w)))
    for i in order:
        prob *= w[i] / sum(w[j] for j in rest)
        rest.remove(i)
    return prob


def test_split_distribution_matches_exact_enumeration():
    "N = 5, 2 masked, 1 thrown: frequency of every (masked, thrown) pair vs exact enumeration of 120 orders."
    w = [0.1, 0.4, 1.0, 2.0, 3.5]
    tot = sum(w)
    wn = [x / tot + 1e-6 for x in w]  # the library normalises then adds eps
    exact = {}
    for order in itertools.permutations(range(5)):
        key = (tuple(sorted(order[:2])), order[2])
        exact[key] = exact.get(key, 0.0) + _pl_probability(order, wn)
    assert abs(sum(exact.values()) - 1) < 1e-12
    draws = 300_000
    s = mask_throw_keep(torch.tensor(w).expand(draws, 5), 0.4, 0.2, generator=gen(11))
    keys = s.masked[:, 0] * 25 + s.masked[:, 1] * 5 + s.thrown[:, 0]
    counts = np.bincount(keys.numpy(), minlength=125)
    for (m, t), p in exact.items():
        c = counts[m[0] * 25 + m[1] * 5 + t]
        z = (c - draws * p) / math.sqrt(draws * p * (1 - p))
        assert abs(z) < 5, ((m, t), c / draws, p)
    assert counts.sum() == draws and sum(counts[m[0] * 25 + m[1] * 5 + t] for (m, t) in exact) == draws


def test_masked_frequency_monotone_in_weight_rank():
    n, draws = 16, 20_000
    perm = torch.randperm(n, generator=gen(12))
    w = torch.arange(1, n + 1, dtype=torch.float32)[perm]  # distinct weights in a shuffled layout
    s = mask_throw_keep(w.expand(draws, n), 0.45, 0.40, generator=gen(13))
    labels = split_labels(s)
    masked_freq = (labels == MASKED).float().mean(0)[perm.argsort()]  # back to weight-rank order
    visible_freq = (labels == VISIBLE).float().mean(0)[perm.argsort()]
    # neighbours in rank differ by ~1-3 %, while the Monte Carlo sd is ~0.35 %: strictly monotone
    assert (masked_freq.diff() > 0).all(), masked_freq
    assert (visible_freq.diff() < 0).all(), visible_freq
    assert visible_freq[0] > 3 * visible_freq[-1]


def test_uniform_weights_give_uniform_permutations():
    "MAE special case: every patch masked with probability n_mask/N, every pair with the hypergeometric rate."
    n, draws = 8, 100_000
    s = random_split(draws, n, 0.5, generator=gen(14))
    m = (split_labels(s) == MASKED).float()
    test_p = m.mean(0)
    assert (test_p - 0.5).abs().max() < 5 * math.sqrt(0.25 / draws)
    pair = (m.T @ m / draws)[~torch.eye(n, dtype=torch.bool)]
    p2 = 4 * 3 / (8 * 7)
    assert (pair - p2).abs().max() < 5 * math.sqrt(p2 * (1 - p2) / draws)


def test_weighted_permutation_is_a_permutation_and_scale_free():
    w = torch.rand(50, 30, generator=gen(15))
    o1 = weighted_permutation(w, generator=gen(16))
    assert torch.equal(o1.sort(1).values, torch.arange(30).expand(50, 30))
    o2 = weighted_permutation(w * 1000, generator=gen(16))  # only relative weights matter
    assert torch.equal(o1, o2)


# ---------------------------------------------------------------- seeds
@pytest.mark.parametrize('device', DEVICES)
def test_seeds_reproduce_and_differ(device):
    w = torch.rand(32, 196, generator=gen(0)).to(device)
    a = mask_throw_keep(w, generator=gen(5, device))
    b = mask_throw_keep(w, generator=gen(5, device))
    c = mask_throw_keep(w, generator=gen(6, device))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.masked, c.masked)
    a = attmask_split(w, 0.5, 'hint', generator=gen(5, device))
    b = attmask_split(w, 0.5, 'hint', generator=gen(5, device))
    c = attmask_split(w, 0.5, 'hint', generator=gen(6, device))
    assert torch.equal(a.visible, b.visible) and not torch.equal(a.visible, c.visible)
    x = torch.randn(4, 196, 8, device=device)
    assert torch.equal(random_masking(x, generator=gen(7, device))[2], random_masking(x, generator=gen(7, device))[2])


# ---------------------------------------------------------------- MAE random masking
def test_random_masking_contract_against_mae_reference():
    b, n, d = 5, 49, 6
    x = torch.randn(b, n, d, generator=gen(20))
    xv, mask, ids_restore = random_masking(x, 0.75, generator=gen(21))
    n_keep = n - split_counts(n, 0.75)[0]
    assert xv.shape == (b, n_keep, d) and mask.shape == (b, n) and ids_restore.shape == (b, n)
    assert mask.dtype == x.dtype and set(mask.unique().tolist()) <= {0.0, 1.0}
    for i in range(b):  # per image, plain indexing
        kept = [j for j in range(n) if mask[i, j] == 0]
        assert len(kept) == n_keep
        assert torch.equal(xv[i], x[i, kept])  # raster order of the visible tokens
        # MAE decoder step: append mask tokens, unshuffle with ids_restore
        full = torch.cat([xv[i], torch.full((n - n_keep, d), float('nan'))])[ids_restore[i]]
        for j in range(n):
            if mask[i, j] == 0: assert torch.equal(full[j], x[i, j])
            else: assert torch.isnan(full[j]).all()


def test_restore_indices_inverts_concatenation():
    s = mask_throw_keep(torch.rand(4, 20, generator=gen(22)), 0.3, 0.3, generator=gen(23))
    ids = restore_indices(s.visible, s.masked, s.thrown)
    cat = torch.cat([s.visible, s.masked, s.thrown], 1)
    for i in range(4):
        assert [cat[i, ids[i, j]].item() for j in range(20)] == list(range(20))


# ---------------------------------------------------------------- AttMask
def _attmask_reference(a, k):
    "Indices of the k largest scores, ties to the lower index (plain Python)."
    return sorted(sorted(range(len(a)), key=lambda j: (-a[j], j))[:k])


def test_attmask_high_low_match_reference():
    a = torch.rand(20, 50, generator=gen(30))
    a[:, 10:20] = 0.5  # ties
    for ratio in (0.0, 0.1, 0.3, 0.5, 0.9, 1.0):
        k = split_counts(50, ratio)[0]
        hi = attmask_split(a, ratio, 'high')
        lo = attmask_split(a, ratio, 'low')
        for i in range(20):
            row = a[i].tolist()
            assert hi.masked[i].tolist() == _attmask_reference(row, k)
            assert lo.masked[i].tolist() == _attmask_reference([-v for v in row], k)


def test_attmask_hint_reveals_from_the_pool_uniformly():
    n, draws = 20, 20_000
    a = torch.arange(n, dtype=torch.float32).flip(0)  # patch 0 most attended
    s = attmask_split(a.expand(draws, n), 0.5, 'hint', hint_ratio=0.1, hint_pool=0.25, generator=gen(31))
    assert s.masked.shape == (draws, 8) and s.visible.shape == (draws, 12)
    vis = (split_labels(s) == VISIBLE).float().mean(0)
    assert torch.equal(vis[10:], torch.ones(10))     # never-masked patches stay visible
    assert torch.equal(vis[5:10], torch.zeros(5))    # masked, outside the hint pool: never revealed
    p = 2 / 5                                        # 2 hints drawn from the top 5
    assert (vis[:5] - p).abs().max() < 5 * math.sqrt(p * (1 - p) / draws)


# ---------------------------------------------------------------- helpers
def test_gather_tokens_and_labels_match_loops():
    x = torch.randn(3, 10, 4, generator=gen(40))
    s = mask_throw_keep(torch.rand(3, 10, generator=gen(41)), 0.4, 0.3, generator=gen(42))
    for idx in s:
        g = gather_tokens(x, idx)
        for i in range(3):
            for k, j in enumerate(idx[i].tolist()):
                assert torch.equal(g[i, k], x[i, j])
    assert torch.equal(gather_tokens(x[..., 0], s.masked), gather_tokens(x, s.masked)[..., 0])
    labels = split_labels(s)
    for i in range(3):
        for j in range(10):
            want = MASKED if j in s.masked[i] else THROWN if j in s.thrown[i] else VISIBLE
            assert labels[i, j].item() == want


def test_split_order_cuts_in_order():
    order = torch.tensor([[3, 0, 4, 1, 2]])
    s = split_order(order, 2, 1)
    assert s.masked.tolist() == [[0, 3]] and s.thrown.tolist() == [[4]] and s.visible.tolist() == [[1, 2]]
    assert isinstance(s, PatchSplit) and s._fields == ('masked', 'thrown', 'visible')


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize('mask_ratio,throw_ratio,err,msg', [
    (-0.1, 0.0, ValueError, 'mask_ratio'), (0.5, -0.2, ValueError, 'throw_ratio'), (1.2, 0.0, ValueError, 'mask_ratio'),
    (0.7, 0.4, ValueError, 'mask_ratio + throw_ratio'), (float('nan'), 0.0, ValueError, 'mask_ratio'),
    ('0.5', 0.0, TypeError, 'mask_ratio'), (None, 0.0, TypeError, 'mask_ratio'),
])
def test_bad_ratios(mask_ratio, throw_ratio, err, msg):
    w = torch.rand(2, 16)
    with pytest.raises(err, match=msg.replace('+', r'\+')):
        mask_throw_keep(w, mask_ratio, throw_ratio)
    with pytest.raises(err, match=msg.replace('+', r'\+')):
        random_split(2, 16, mask_ratio, throw_ratio)


@pytest.mark.parametrize('weights,err,msg', [
    (torch.rand(16), ValueError, '2-D'), (torch.rand(2, 4, 4), ValueError, '2-D'),
    (torch.tensor([[0.1, float('nan'), 0.3, 0.2]]), ValueError, 'NaN'),
    (torch.tensor([[0.1, float('inf'), 0.3, 0.2]]), ValueError, 'finite'),
    (torch.tensor([[0.1, -0.5, 0.3, 0.2]]), ValueError, 'non-negative'),
    (np.ones((2, 16)), TypeError, 'torch.Tensor'), (torch.ones(2, 16, dtype=torch.complex64), TypeError, 'dtype'),
    (torch.ones(0, 16), ValueError, 'at least one'),
])
def test_bad_weights(weights, err, msg):
    with pytest.raises(err, match=msg):
        mask_throw_keep(weights, 0.5, 0.25)
    with pytest.raises(err, match=msg.replace('weights', 'attention')):
        attmask_split(weights, 0.5)


def test_other_bad_input():
    w = torch.rand(2, 16)
    with pytest.raises(ValueError, match='mode'): attmask_split(w, 0.5, mode='top')
    with pytest.raises(ValueError, match='hint_pool'): attmask_split(w, 0.25, 'hint', hint_pool=0.5)
    with pytest.raises(ValueError, match='hint_ratio'): attmask_split(w, 0.5, 'hint', hint_ratio=0.4, hint_pool=0.25)
    with pytest.raises(TypeError, match='generator'): mask_throw_keep(w, generator=42)
    with pytest.raises(ValueError, match='eps'): mask_throw_keep(w, eps=-1.0)
    with pytest.raises(ValueError, match='x'): random_masking(torch.rand(2, 16))
    with pytest.raises(ValueError, match='idx'): gather_tokens(torch.rand(2, 16, 3), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match='disjoint'):
        split_labels(PatchSplit(torch.tensor([[0, 1]]), torch.tensor([[1]]), torch.tensor([[2]])))
    with pytest.raises(ValueError, match='num_patches'): split_counts(0, 0.5)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match='generator'):
            mask_throw_keep(w, generator=torch.Generator(device='cuda'))
