"""Tests for folk_nb.saliency against per-image numpy / scipy references, exact counts and fixed-seed statistics."""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from folk_nb.saliency import (FILLS, cnn_saliency, fill_patches, foreground_patches, gaussian_blur,
                              hard_negative_patch_mask, patch_grid_size, patch_index_map, patch_pixel_mask,
                              patch_saliency, saliency_patch_mask, spectral_residual_saliency)

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])


def gen(seed, device='cpu'):
    return torch.Generator(device=device).manual_seed(seed)


# ---------------------------------------------------------------- slow references (per image, numpy / plain Python)
def ref_blur(img, sigma):
    "scipy Gaussian with edge replication and the same radius, ceil(3 sigma), on one (H, W) array."
    radius = max(1, math.ceil(3 * sigma))
    return ndimage.gaussian_filter(np.asarray(img, np.float64), sigma, mode='nearest', truncate=radius / sigma)


def ref_spectral_residual(img, sigma=2.5, eps=1e-8):
    "Hou & Zhang on one (C, H, W) image at its own resolution: numpy FFT, wrap-around 3x3 box, scipy blur."
    img = np.asarray(img, np.float64)
    grey = img[0] if img.shape[0] == 1 else 0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]
    spec = np.fft.fft2(grey)
    log_amp = np.log(np.abs(spec) + eps)
    residual = log_amp - ndimage.uniform_filter(log_amp, size=3, mode='wrap')
    sal = np.abs(np.fft.ifft2(np.exp(residual) * np.exp(1j * np.angle(spec)))) ** 2
    sal = ref_blur(sal, sigma)
    return (sal - sal.min()) / max(sal.max() - sal.min(), 1e-12)


def ref_cells(n, g):
    "Patch index of each of n pixels for g cells: cell i spans [ceil(i*n/g), ceil((i+1)*n/g)) (plain Python)."
    bounds = [-(-i * n // g) for i in range(g + 1)]
    out = []
    for y in range(n):
        out.append(next(i for i in range(g) if bounds[i] <= y < bounds[i + 1]))
    return out


def ref_patch_means(sal, gh, gw):
    "Mean of one (H, W) map over each patch, by loops over the patches."
    H, W = sal.shape
    rows, cols = np.array(ref_cells(H, gh)), np.array(ref_cells(W, gw))
    return np.array([sal[np.ix_(rows == i, cols == j)].mean() for i in range(gh) for j in range(gw)])


def ref_foreground(values, k=0.6):
    "Foreground rule on one row of patch values, plain numpy (population std)."
    v = np.asarray(values, np.float64)
    if v.max() == v.min():
        return np.ones(v.shape, bool)
    return v >= v.mean() - k * v.std()


def ref_expected_floor(n, lo, hi):
    "E[floor(n * r)] for r ~ U[lo, hi], integrated exactly piece by piece."
    if hi == lo:
        return math.floor(Fraction(repr(lo)) * n)
    total = Fraction(0)
    lo_f, hi_f = Fraction(repr(lo)), Fraction(repr(hi))
    for k in range(math.floor(lo_f * n), math.floor(hi_f * n) + 1):
        a, b = max(lo_f, Fraction(k, n)), min(hi_f, Fraction(k + 1, n))
        if b > a:
            total += k * (b - a)
    return float(total / (hi_f - lo_f))


# ---------------------------------------------------------------- Gaussian blur
@pytest.mark.parametrize('shape,sigma', [((2, 3, 20, 17), 1.3), ((1, 1, 9, 40), 4.0), ((1, 2, 5, 5), 3.0)])
def test_gaussian_blur_matches_scipy(shape, sigma):
    x = torch.rand(*shape, generator=gen(0))
    got = gaussian_blur(x, sigma).double().numpy()
    want = np.stack([[ref_blur(c, sigma) for c in img] for img in x.numpy()])
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize('sigma', [0, -1.0, float('nan'), '2'])
def test_gaussian_blur_bad_sigma(sigma):
    with pytest.raises(ValueError, match='sigma'):
        gaussian_blur(torch.rand(1, 1, 8, 8), sigma)


# ---------------------------------------------------------------- spectral residual
@pytest.mark.parametrize('shape,size', [((3, 3, 64, 64), 64), ((2, 1, 48, 40), 48), ((2, 3, 33, 50), 50)])
def test_spectral_residual_matches_numpy(shape, size):
    # working resolution = image size, so no resampling: the whole pipeline is compared with numpy per image
    x = torch.rand(*shape, generator=gen(1))
    x[:, :, 5:15, 10:22] = 0.9 * x[:, :, 5:15, 10:22] + 0.1
    got = spectral_residual_saliency(x, size=size)
    assert got.shape == (shape[0], 1, shape[2], shape[3]) and got.dtype == torch.float32
    for b in range(shape[0]):
        np.testing.assert_allclose(got[b, 0].numpy(), ref_spectral_residual(x[b].numpy()), atol=2e-4)


def test_spectral_residual_resampled():
    # 160x128 -> working 64x51 -> back; the resampling is torch's, the rest is compared with numpy
    x = torch.rand(2, 3, 160, 128, generator=gen(2))
    got = spectral_residual_saliency(x, size=64, sigma=2.0)
    small = F.interpolate(x, size=(64, 51), mode='bilinear', align_corners=False, antialias=True)
    for b in range(2):
        ref = ref_spectral_residual(small[b].numpy(), sigma=2.0)
        raw = F.interpolate(torch.tensor(ref, dtype=torch.float32)[None, None], size=(160, 128), mode='bilinear',
                            align_corners=False)[0, 0].numpy()
        ref_up = (raw - raw.min()) / (raw.max() - raw.min())
        np.testing.assert_allclose(got[b, 0].numpy(), ref_up, atol=3e-4)


def test_spectral_residual_properties():
    g = gen(3)
    x = (0.5 + 0.03 * torch.randn(3, 3, 128, 128, generator=g)).clamp(0, 1)
    spots = [(20, 30), (90, 100), (60, 10)]
    for b, (r, c) in enumerate(spots):
        x[b, :, r:r + 12, c:c + 12] = 1.0
    s = spectral_residual_saliency(x)
    assert s.min() >= 0 and s.max() <= 1
    assert torch.allclose(s.amin((2, 3)), torch.zeros(3, 1)) and torch.allclose(s.amax((2, 3)), torch.ones(3, 1))
    for b, (r, c) in enumerate(spots):          # the conspicuous square is where the map peaks
        y, xx = divmod(int(s[b, 0].argmax()), 128)
        assert r - 8 <= y <= r + 20 and c - 8 <= xx <= c + 20, (b, y, xx)
    half = spectral_residual_saliency(x.half())
    assert half.dtype == torch.float32 and torch.isfinite(half).all()


def test_spectral_residual_bad_input():
    with pytest.raises(TypeError, match='x'):
        spectral_residual_saliency(np.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match='channels'):
        spectral_residual_saliency(torch.rand(1, 2, 8, 8))
    with pytest.raises(ValueError, match='size'):
        spectral_residual_saliency(torch.rand(1, 3, 8, 8), size=2)


# ---------------------------------------------------------------- CNN saliency
class TinyCNN(nn.Module):
    def __init__(self, nhwc=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.drop = nn.Dropout(0.5)
        self.nhwc = nhwc
        if nhwc:
            self.output_fmt = 'NHWC'

    def forward_features(self, x):
        y = self.drop(torch.relu(self.bn(self.conv(x))))
        return y.permute(0, 2, 3, 1) if self.nhwc else y


def test_cnn_saliency_matches_manual_sum_and_restores_modes():
    torch.manual_seed(0)
    net = TinyCNN().train()
    net.bn.eval()                                  # mixed modes must survive the call unchanged
    x = torch.rand(3, 3, 16, 12, generator=gen(4))
    before = {n: m.training for n, m in net.named_modules()}
    got = cnn_saliency(net, x, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    assert {n: m.training for n, m in net.named_modules()} == before
    assert got.shape == (3, 1, 8, 6) and not got.requires_grad and got.dtype == torch.float32
    with torch.no_grad():
        net.eval()
        xn = (x - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
        want = net.forward_features(xn).sum(1, keepdim=True)
    torch.testing.assert_close(got, want)
    assert all(p.grad is None for p in net.parameters())


def test_cnn_saliency_default_normalisation_nhwc_and_unnormalised():
    torch.manual_seed(0)
    net = TinyCNN(nhwc=True)
    x = torch.rand(2, 3, 8, 8, generator=gen(5))
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    net.eval()
    with torch.no_grad():
        want = net.forward_features((x - mean) / std).permute(0, 3, 1, 2).sum(1, keepdim=True)
        raw = net.forward_features(x).permute(0, 3, 1, 2).sum(1, keepdim=True)
    torch.testing.assert_close(cnn_saliency(net, x), want)               # ImageNet statistics by default
    torch.testing.assert_close(cnn_saliency(net, x, normalize=False), raw)


def test_cnn_saliency_timm_models():
    import timm
    from folk_nb.models import create_backbone
    net = timm.create_model('resnet18', pretrained=False, num_classes=0)
    x = torch.rand(2, 3, 64, 64, generator=gen(6))
    s = cnn_saliency(net, x)
    assert s.shape == (2, 1, 2, 2) and net.training
    bb = create_backbone('resnet18', img_size=64)                     # folk_nb wrapper (e.g. a momentum encoder)
    bb.model.load_state_dict(net.state_dict())
    torch.testing.assert_close(cnn_saliency(bb, x), s)
    vit = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0, img_size=32, depth=1)
    with pytest.raises(TypeError, match='4-D feature map'):
        cnn_saliency(vit, torch.rand(1, 3, 32, 32))


def test_cnn_saliency_bad_input():
    with pytest.raises(TypeError, match='nn.Module'):
        cnn_saliency(lambda t: t, torch.rand(1, 3, 8, 8))
    with pytest.raises(TypeError, match='forward_features'):
        cnn_saliency(nn.Conv2d(3, 3, 1), torch.rand(1, 3, 8, 8))
    with pytest.raises(TypeError, match='x'):
        cnn_saliency(TinyCNN(), torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


# ---------------------------------------------------------------- grid
@pytest.mark.parametrize('hw,grid', [((224, 224), (7, 7)), ((32, 32), (8, 8)), ((64, 64), (8, 8)),
                                     ((96, 96), (8, 8)), ((224, 160), (7, 5)), ((160, 224), (5, 7)),
                                     ((227, 227), (7, 7)), ((31, 62), (7, 14)), ((4, 4), (4, 4)), ((1, 1), (1, 1))])
def test_patch_grid_size_table(hw, grid):
    assert patch_grid_size(*hw) == grid


def test_patch_grid_size_always_fits():
    sizes = list(range(1, 130)) + [150, 192, 200, 223, 225, 255, 256, 299, 384, 512]
    for h in sizes:
        for w in (h, h + 17, max(1, h // 2)):
            gh, gw = patch_grid_size(h, w)
            assert 1 <= gh <= h and 1 <= gw <= w
            if h % gh == 0 and w % gw == 0 and h // gh == w // gw:
                continue                                    # square patches that divide the image
            short = min(h, w)                               # fallback: cells on the shorter side, uneven patches
            assert min(gh, gw) == min(7, short), (h, w, gh, gw)


def test_patch_grid_size_bad_input():
    for bad in [(0, 5), (5.0, 5), (-3, 3), (True, 4)]:
        with pytest.raises(ValueError, match='must be a positive int'):
            patch_grid_size(*bad)


@pytest.mark.parametrize('h,w,grid', [(8, 12, (2, 3)), (37, 50, (7, 9)), (5, 5, (5, 5)), (13, 3, (4, 1))])
def test_patch_index_map_matches_loops(h, w, grid):
    got = patch_index_map(h, w, grid).tolist()
    rows, cols = ref_cells(h, grid[0]), ref_cells(w, grid[1])
    assert got == [[rows[y] * grid[1] + cols[x] for x in range(w)] for y in range(h)]


def test_grid_that_does_not_fit():
    for call in (lambda: patch_index_map(5, 5, (7, 7)),
                 lambda: patch_saliency(torch.rand(2, 1, 4, 4), (7, 7)),
                 lambda: fill_patches(torch.rand(1, 3, 6, 6), torch.zeros(1, 49, dtype=torch.bool), (7, 7)),
                 lambda: patch_pixel_mask(torch.zeros(1, 49, dtype=torch.bool), (7, 7), (6, 40))):
        with pytest.raises(ValueError, match='does not fit'):
            call()
    with pytest.raises(ValueError, match='grid'):
        patch_index_map(8, 8, (2.5, 2))
    with pytest.raises(TypeError, match='grid'):
        patch_index_map(8, 8, 'ab')


# ---------------------------------------------------------------- patch saliency and foreground
@pytest.mark.parametrize('hw,grid', [((28, 28), (7, 7)), ((37, 50), (7, 9)), ((7, 7), (7, 7))])
def test_patch_saliency_matches_loops(hw, grid):
    s = torch.rand(4, 1, *hw, generator=gen(7))
    got = patch_saliency(s, grid).numpy()
    for b in range(4):
        np.testing.assert_allclose(got[b], ref_patch_means(s[b, 0].double().numpy(), *grid), rtol=1e-5, atol=1e-6)


def test_patch_saliency_resamples_to_image_size():
    s = torch.rand(2, 1, 7, 7, generator=gen(8))
    got = patch_saliency(s, (8, 8), image_size=(32, 32))
    up = F.interpolate(s, size=(32, 32), mode='bilinear', align_corners=False)
    for b in range(2):
        np.testing.assert_allclose(got[b].numpy(), ref_patch_means(up[b, 0].double().numpy(), 8, 8), rtol=1e-5)
    torch.testing.assert_close(patch_saliency(s, (7, 7), image_size=(7, 7)), s.view(2, 49))
    with pytest.raises(ValueError, match=r'\(B, 1, h, w\)'):
        patch_saliency(torch.rand(2, 7, 7), (7, 7))
    with pytest.raises(TypeError, match='floating'):
        patch_saliency(torch.ones(2, 1, 7, 7, dtype=torch.long), (7, 7))


@pytest.mark.parametrize('k', [0.6, 0.0, 1.5, -0.3])
def test_foreground_matches_numpy(k):
    g = gen(9)
    v = torch.cat([torch.rand(50, 49, generator=g), torch.randn(50, 49, generator=g) ** 3,
                   torch.full((2, 49), 0.1), torch.rand(3, 64, generator=g)[:, :49]])
    got = foreground_patches(v, k=k)
    assert got.dtype == torch.bool and got.shape == v.shape
    want = np.stack([ref_foreground(row, k) for row in v.numpy()])
    assert (got.numpy() == want).all()


def test_foreground_follows_the_map_not_a_sorted_row():
    # a bright region on the LEFT (columns 0-2 of the 7x7 grid) plus texture; the public code sorted each row of
    # the map before thresholding, which would push the foreground to the RIGHT columns
    g = gen(10)
    sal = 0.2 * torch.rand(3, 1, 224, 224, generator=g)
    sal[:, :, 32:192, :96] += 1.0
    fg = foreground_patches(patch_saliency(sal, (7, 7))).view(3, 7, 7)
    assert fg[:, 1:6, :3].all() and not fg[:, :, 3:].any()
    sorted_map = sal.sort(dim=-1).values                           # the bug, for contrast
    fg_bug = foreground_patches(patch_saliency(sorted_map, (7, 7))).view(3, 7, 7)
    assert fg_bug[:, :, -1].all() and not fg_bug[:, :, 0].any()


def test_foreground_bad_input():
    with pytest.raises(ValueError, match='patch_values'):
        foreground_patches(torch.rand(2, 7, 7))
    with pytest.raises(TypeError, match='patch_values'):
        foreground_patches(torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match='finite'):
        foreground_patches(torch.tensor([[0.1, float('nan')]]))
    with pytest.raises(ValueError, match='k'):
        foreground_patches(torch.rand(2, 5), k=float('inf'))


# ---------------------------------------------------------------- query mask: exact counts
def random_foreground(b, n, seed, p=0.6):
    fg = torch.rand(b, n, generator=gen(seed)) < p
    fg[0] = True                      # no background
    fg[1] = False                     # no foreground
    return fg


@pytest.mark.parametrize('n', [1, 5, 49, 64, 100])
@pytest.mark.parametrize('r', [0.0, 0.05, 0.1, 0.15, 0.25, 0.29, 1 / 3, 0.5, 0.7, 0.99, 1.0])
def test_query_mask_exact_counts(n, r):
    fg = random_foreground(64, n, seed=int(1000 * r) + n)
    for device in DEVICES:
        f = fg.to(device)
        m = saliency_patch_mask(f, (r, r), generator=gen(11, device)).cpu()
        total = math.floor(Fraction(repr(r)) * n)                    # int(N * r), exact arithmetic
        for row in range(64):
            F_, mask, fgr = int(fg[row].sum()), m[row], fg[row]
            assert int(mask.sum()) == total
            n_fg, n_bg = int((mask & fgr).sum()), int((mask & ~fgr).sum())
            share = Fraction(total * F_, n)
            assert math.floor(share) <= n_fg <= math.ceil(share)        # proportional share, rounded
            assert n_fg <= F_ and n_bg <= n - F_
            if F_ == 0:
                assert n_fg == 0 and n_bg == total
            if F_ == n:
                assert n_bg == 0 and n_fg == total


@pytest.mark.parametrize('lo,hi', [(0.05, 0.25), (0.0, 1.0), (0.3, 0.31), (0.9, 1.0)])
def test_query_mask_count_range(lo, hi):
    fg = random_foreground(500, 49, seed=12)
    m = saliency_patch_mask(fg, (lo, hi), generator=gen(13))
    counts = m.sum(1)
    assert counts.min() >= math.floor(49 * lo) and counts.max() <= math.floor(49 * hi + 1e-9)


# ---------------------------------------------------------------- query mask: statistics
def test_query_mask_equal_rates_in_expectation():
    # fixed foreground (18 of 49 patches), 40,000 independent samples: both sides are masked at E[int(N r)] / N
    B, N = 40000, 49
    fg = torch.zeros(B, N, dtype=torch.bool)
    fg[:, 7:25] = True
    m = saliency_patch_mask(fg, (0.05, 0.25), generator=gen(14))
    expected = ref_expected_floor(N, 0.05, 0.25) / N
    rate_fg = (m & fg).sum().item() / fg.sum().item()
    rate_bg = (m & ~fg).sum().item() / (~fg).sum().item()
    # per-sample rates have sd ~ 0.065, so the standard error of each mean is ~ 3e-4; 3e-3 is about 10 SE
    assert abs(rate_fg - expected) < 3e-3 and abs(rate_bg - expected) < 3e-3, (rate_fg, rate_bg, expected)
    # within each side, every patch is equally likely (no positional preference)
    per_patch = m.float().mean(0)
    assert (per_patch[fg[0]] - expected).abs().max() < 0.012
    assert (per_patch[~fg[0]] - expected).abs().max() < 0.012


def test_query_mask_unbiased_split_with_ties():
    # N = 64, F = 32: n * F / N is a half-integer whenever n is odd; a fixed rounding rule would favour one side
    B, N = 40000, 64
    fg = torch.zeros(B, N, dtype=torch.bool)
    fg[:, ::2] = True
    m = saliency_patch_mask(fg, (0.05, 0.25), generator=gen(15))
    n_fg, n_bg = (m & fg).sum(1).double(), (m & ~fg).sum(1).double()
    diff = (n_fg - n_bg)
    assert diff.abs().max() <= 1
    assert abs(diff.mean().item()) < 0.02                 # sd of diff <= 1, SE ~ 0.005
    odd = m.sum(1) % 2 == 1
    assert 0.4 < (diff[odd] > 0).double().mean().item() < 0.6


def test_query_mask_per_sample_independence_and_seeding():
    fg = torch.zeros(2000, 49, dtype=torch.bool)
    fg[:, :30] = True
    m = saliency_patch_mask(fg, generator=gen(16))
    counts = m.sum(1)
    assert counts.unique().numel() >= 8                       # int(49 r), r in [0.05, 0.25]: 2..12
    c = counts.double()
    corr = torch.corrcoef(torch.stack([c[0::2], c[1::2]]))[0, 1]
    assert abs(corr.item()) < 0.1                              # neighbouring samples draw independent ratios
    assert len({tuple(row) for row in m[:200].tolist()}) == 200    # and independent patch choices
    torch.testing.assert_close(m, saliency_patch_mask(fg, generator=gen(16)))
    assert not torch.equal(m, saliency_patch_mask(fg, generator=gen(17)))


# ---------------------------------------------------------------- hard negative
@pytest.mark.parametrize('r', [0.0, 0.4, 0.5, 0.55, 0.7, 1.0])
def test_hard_negative_exact_counts(r):
    fg = random_foreground(300, 49, seed=18, p=0.7)
    for device in DEVICES:
        m = hard_negative_patch_mask(fg.to(device), (r, r), generator=gen(19, device)).cpu()
        assert not (m & ~fg).any()
        for row in range(300):
            assert int(m[row].sum()) == math.floor(Fraction(repr(r)) * int(fg[row].sum()))


def test_hard_negative_rate_and_per_sample_ratio():
    B, N, F_ = 40000, 49, 30
    fg = torch.zeros(B, N, dtype=torch.bool)
    fg[:, 10:40] = True
    m = hard_negative_patch_mask(fg, (0.40, 0.70), generator=gen(20))
    assert not (m & ~fg).any()
    counts = m.sum(1)
    assert counts.min() >= math.floor(0.4 * F_) and counts.max() <= math.floor(0.7 * F_)
    expected = ref_expected_floor(F_, 0.40, 0.70)
    assert abs(counts.double().mean().item() - expected) < 0.05      # sd of counts ~ 2.6, SE ~ 0.013
    # one ratio per sample: identical foregrounds still get many different counts within one batch
    # (the public code's one-ratio-per-batch would make every row's count equal)
    assert counts[:64].unique().numel() >= 5
    per_patch = m.float().mean(0)[10:40]
    assert (per_patch - expected / F_).abs().max() < 0.015
    torch.testing.assert_close(m, hard_negative_patch_mask(fg, (0.40, 0.70), generator=gen(20)))


# ---------------------------------------------------------------- errors of the masks
@pytest.mark.parametrize('fn', [saliency_patch_mask, hard_negative_patch_mask])
def test_mask_bad_input(fn):
    fg = torch.ones(2, 49, dtype=torch.bool)
    for bad in [(0.3, 0.1), (-0.1, 0.2), (0.5, 1.2)]:
        with pytest.raises(ValueError, match='ratio_range'):
            fn(fg, bad)
    for bad in [(0.2,), 0.2, ('a', 'b')]:
        with pytest.raises(TypeError, match='ratio_range'):
            fn(fg, bad)
    with pytest.raises(TypeError, match='foreground.*bool'):
        fn(fg.float())
    with pytest.raises(TypeError, match='foreground'):
        fn(np.ones((2, 49), bool))
    with pytest.raises(ValueError, match='foreground.*shape'):
        fn(torch.ones(2, 7, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match='generator'):
        fn(fg, generator=0)


# ---------------------------------------------------------------- fills
@pytest.mark.parametrize('hw,grid', [((32, 32), (8, 8)), ((37, 45), (5, 6))])
@pytest.mark.parametrize('fill', FILLS)
def test_fill_changes_only_masked_patches(hw, grid, fill):
    g = gen(21)
    x = torch.rand(3, 3, *hw, generator=g)
    m = torch.rand(3, grid[0] * grid[1], generator=g) < 0.3
    y = fill_patches(x, m, grid, fill, generator=gen(22))
    assert y.shape == x.shape and y.dtype == x.dtype and 0 <= y.min() and y.max() <= 1
    rows, cols = np.array(ref_cells(hw[0], grid[0])), np.array(ref_cells(hw[1], grid[1]))
    pix = np.stack([m[b].numpy()[rows[:, None] * grid[1] + cols[None, :]] for b in range(3)])  # (B, H, W)
    pix = np.broadcast_to(pix[:, None], x.shape)
    assert np.array_equal(y.numpy()[~pix], x.numpy()[~pix])
    assert (y.numpy()[pix] != x.numpy()[pix]).mean() > 0.9
    if fill == 'highpass':
        torch.testing.assert_close(y, fill_patches(x, m, grid, fill, generator=gen(22)))


def test_fill_values_match_references():
    g = gen(23)
    x = torch.rand(2, 3, 24, 20, generator=g)
    m = torch.rand(2, 16, generator=g) < 0.5
    grid, sigma = (4, 4), 2.0
    pix = patch_pixel_mask(m, grid, (24, 20)).expand_as(x).numpy()
    xn = x.double().numpy()
    mean = xn.mean((2, 3), keepdims=True)                                      # per-image channel mean
    blur = np.stack([[ref_blur(c, sigma) for c in img] for img in xn])
    want = {'mean': np.broadcast_to(mean, xn.shape), 'blur': blur, 'highpass': np.clip(mean + xn - blur, 0, 1)}
    for fill in FILLS:
        y = fill_patches(x, m, grid, fill, sigma=sigma, noise_std=0.0).double().numpy()
        np.testing.assert_allclose(y[pix], want[fill][pix], atol=1e-5, err_msg=fill)


def test_fill_highpass_noise_statistics():
    x = torch.full((4, 3, 64, 64), 0.5)                 # flat image: the high-pass part is 0, the fill is pure noise
    m = torch.ones(4, 64, dtype=torch.bool)
    y = fill_patches(x, m, (8, 8), 'highpass', generator=gen(24), noise_std=0.05)
    assert abs(y.mean().item() - 0.5) < 0.002 and abs(y.std().item() - 0.05) < 0.002
    d = y[0, 0] - 0.5
    assert abs((d[:, 1:] * d[:, :-1]).mean().item()) / 0.05 ** 2 < 0.05   # independent per pixel


def test_fill_default_sigma_and_dtype():
    x = torch.rand(1, 3, 32, 32, generator=gen(25))
    m = torch.ones(1, 64, dtype=torch.bool)
    torch.testing.assert_close(fill_patches(x, m, (8, 8), 'blur'), gaussian_blur(x, 2.0))  # half of the 4 px patch
    y16 = fill_patches(x.half(), m, (8, 8), 'mean')
    assert y16.dtype == torch.float16


def test_fill_bad_input():
    x = torch.rand(2, 3, 32, 32)
    m = torch.zeros(2, 64, dtype=torch.bool)
    with pytest.raises(ValueError, match="fill must be one of 'mean', 'blur', 'highpass'"):
        fill_patches(x, m, (8, 8), 'noise')
    with pytest.raises(ValueError, match='patch_mask has 49 patches'):
        fill_patches(x, torch.zeros(2, 49, dtype=torch.bool), (8, 8))
    with pytest.raises(ValueError, match='3 rows but x has 2'):
        fill_patches(x, torch.zeros(3, 64, dtype=torch.bool), (8, 8))
    with pytest.raises(TypeError, match='patch_mask'):
        fill_patches(x, m.float(), (8, 8))
    with pytest.raises(TypeError, match='x'):
        fill_patches((x * 255).byte(), m, (8, 8))
    with pytest.raises(ValueError, match='noise_std'):
        fill_patches(x, m, (8, 8), 'highpass', noise_std=-1)


def test_pipeline_on_sample_images():
    from folk_nb.images import sample_images
    x = sample_images(['astronaut', 'coffee'], size=64)
    grid = patch_grid_size(64, 64)
    fg = foreground_patches(patch_saliency(spectral_residual_saliency(x), grid))
    assert fg.shape == (2, 64) and fg.any(1).all()
    q = saliency_patch_mask(fg, generator=gen(26))
    h = hard_negative_patch_mask(fg, generator=gen(26))
    for fill in FILLS:
        assert fill_patches(x, q, grid, fill, generator=gen(27)).shape == x.shape
        assert fill_patches(x, h, grid, fill, generator=gen(27)).shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_cuda_matches_cpu():
    x = torch.rand(2, 3, 40, 40, generator=gen(28))
    m = torch.rand(2, 64, generator=gen(29)) < 0.4
    s = spectral_residual_saliency(x)
    torch.testing.assert_close(spectral_residual_saliency(x.cuda()).cpu(), s, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(patch_saliency(s.cuda(), (8, 8)).cpu(), patch_saliency(s, (8, 8)), atol=1e-5, rtol=1e-5)
    for fill in ('mean', 'blur'):
        torch.testing.assert_close(fill_patches(x.cuda(), m.cuda(), (8, 8), fill).cpu(), fill_patches(x, m, (8, 8), fill),
                                   atol=1e-5, rtol=1e-5)
    fg = foreground_patches(patch_saliency(s.cuda(), (8, 8)))
    q = saliency_patch_mask(fg, generator=gen(30, 'cuda'))
    y = fill_patches(x.cuda(), q, (8, 8), 'highpass', generator=gen(31, 'cuda'))
    assert q.is_cuda and y.is_cuda


# ---------------------------------------------------------------- value checks on the images (NaN, inf, 0..255)
def _bad(x, kind):
    return {'nan': torch.full_like(x, float('nan')), 'inf': x.clone().index_fill_(3, torch.tensor([0]), float('inf')),
            '255': x * 255}[kind]

SAL_FNS = {
    'spectral_residual_saliency': lambda x: spectral_residual_saliency(x),
    'fill_patches': lambda x: fill_patches(x, torch.ones(len(x), 16, dtype=torch.bool), (4, 4), 'mean'),
    'cnn_saliency': lambda x, net=TinyCNN().eval(): cnn_saliency(net, x),   # one fixed network
}


@pytest.mark.parametrize('name', list(SAL_FNS))
@pytest.mark.parametrize('kind', ['nan', 'inf', '255'])
def test_saliency_refuses_images_outside_the_unit_range(name, kind):
    x = torch.rand(2, 3, 16, 16, generator=gen(40))
    with pytest.raises(ValueError, match=r'x must hold un-normalised images in \[0, 1\]'):
        SAL_FNS[name](_bad(x, kind))


@pytest.mark.parametrize('name', list(SAL_FNS))
def test_saliency_of_valid_images_is_unchanged_by_the_check(name):
    from folk_nb.checks import value_checks
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=gen(41))
    with value_checks(False): want = SAL_FNS[name](x)
    torch.testing.assert_close(SAL_FNS[name](x), want)


def test_cnn_saliency_unnormalised_input_needs_only_finite_values():
    x = torch.randn(2, 3, 8, 8, generator=gen(42)) * 3           # already normalised by the caller
    cnn_saliency(TinyCNN().eval(), x, normalize=False)
    with pytest.raises(ValueError, match='finite'):
        cnn_saliency(TinyCNN().eval(), _bad(x, 'nan'), normalize=False)


def test_cnn_saliency_names_a_channel_mismatch():
    import timm
    net = timm.create_model('resnet18', pretrained=False, num_classes=0)
    with pytest.raises(ValueError, match=r'model expects 3-channel images but x has 1 channels \(shape \(2, 1, 32, 32\)\)'):
        cnn_saliency(net, torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match='model expects 3-channel images but x has 1'):
        cnn_saliency(TinyCNN(), torch.rand(2, 1, 8, 8), mean=(0.5,), std=(0.2,))
