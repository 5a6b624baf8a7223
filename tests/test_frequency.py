"Frequency masks, filtering and the MFM loss against the per-image numpy reference (tests/reference.py)."
import numpy as np
import pytest
import torch

import reference as ref
from folk_nb.images import sample_images
from folk_nb.spectrum import amplitude, fft_image, filter_image, radial_frequency, check_images
from folk_nb.freq_masks import (mfm_mask, disc_mask, default_mfm_radius, com_mask, rcom_mask, folk_mask, ratio_mask,
                                folk_filter, mfm_filter)
from folk_nb.freq_loss import frequency_loss

SIZES = [(224, 224), (33, 47), (32, 32), (31, 30)]


@pytest.fixture(scope='module')
def natural():
    return sample_images(['astronaut', 'chelsea', 'coffee', 'camera'], size=224)


def images(kind, h, w, natural, seed=0):
    "Random or natural images at (h, w)."
    if kind == 'random':
        return torch.rand(3, 3, h, w, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(natural[:3], size=(h, w), mode='bilinear', antialias=True).clamp(0, 1)


# ---------------------------------------------------------------- spectrum and filtering
@pytest.mark.parametrize('kind', ['random', 'natural'])
@pytest.mark.parametrize('h,w', SIZES)
def test_amplitude_matches_reference(kind, h, w, natural):
    x = images(kind, h, w, natural)
    got = amplitude(x)
    assert got.shape == (3, 1, h, w) and got.dtype == torch.float32
    for i in range(len(x)):
        np.testing.assert_allclose(got[i, 0].numpy(), ref.amplitude(x[i].numpy()), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize('kind', ['random', 'natural'])
@pytest.mark.parametrize('h,w', SIZES)
def test_filter_matches_reference_for_arbitrary_masks(kind, h, w, natural):
    x = images(kind, h, w, natural)
    g = torch.Generator().manual_seed(h * w)
    masks = {'random (non-symmetric)': torch.rand(3, 1, h, w, generator=g) > 0.5,
             'mfm': mfm_mask(x, generator=g), 'folk': folk_mask(x, generator=g),
             'soft float': torch.rand(3, 1, h, w, generator=g)}
    for name, keep in masks.items():
        got = filter_image(x, keep)
        for i in range(len(x)):
            np.testing.assert_allclose(got[i].numpy(), ref.filter_image(x[i].numpy(), keep[i, 0].numpy()),
                                       atol=2e-5, err_msg=name)


@pytest.mark.parametrize('h,w', SIZES)
def test_filter_with_all_ones_returns_image(h, w):
    x = torch.rand(2, 3, h, w)
    torch.testing.assert_close(filter_image(x, torch.ones(1, 1, h, w, dtype=torch.bool)), x, atol=2e-6, rtol=0)
    assert filter_image(x, torch.zeros(h, w, dtype=torch.bool)).abs().max() < 1e-6   # nothing kept: black (clamped)


def test_low_and_high_pass_sum_to_image_before_clamping():
    x = torch.rand(2, 3, 40, 40) * 0.5 + 0.25
    disc = disc_mask(40, 40, 6.0)
    # unclamped parts through the reference: low + high == image
    low = np.fft.ifft2(np.fft.ifftshift(ref.spectrum(x[0].numpy()) * disc[0, 0].numpy(), axes=(-2, -1))).real
    high = np.fft.ifft2(np.fft.ifftshift(ref.spectrum(x[0].numpy()) * ~disc[0, 0].numpy(), axes=(-2, -1))).real
    np.testing.assert_allclose(low + high, x[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(filter_image(x, disc)[0].numpy(), np.clip(low, 0, 1), atol=2e-5)


def test_radial_frequency_matches_loops():
    for h, w in SIZES:
        r = radial_frequency(h, w).numpy()
        for i, j in [(0, 0), (h // 2, w // 2), (h - 1, w - 1), (h // 3, 2 * w // 3)]:
            assert abs(r[i, j] - np.hypot(i - h // 2, j - w // 2)) < 1e-5


# ---------------------------------------------------------------- MFM masks
def test_mfm_disc_official_count():
    assert disc_mask(224, 224, 16.0).sum() == 793
    assert default_mfm_radius(224, 224) == 16.0
    assert (disc_mask(224, 224, 16.0)[0, 0].numpy() == ref.disc(224, 224, 16.0)).all()


@pytest.mark.parametrize('h,w', SIZES)
def test_mfm_low_and_high_pass_partition_bins(h, w):
    x = torch.rand(4, 3, h, w)
    low, high = mfm_mask(x, low_pass_prob=1.0), mfm_mask(x, low_pass_prob=0.0)
    assert (low ^ high).all()                                         # a partition of the bins
    expected = ref.disc(h, w, default_mfm_radius(h, w))
    assert (low[:, 0].numpy() == expected[None]).all()


def test_mfm_low_pass_probability_is_respected():
    x = torch.rand(4000, 1, 8, 8)
    for p in (0.3, 0.5):
        m = mfm_mask(x, radius=2.0, low_pass_prob=p, generator=torch.Generator().manual_seed(0))
        low = (m == disc_mask(8, 8, 2.0)).flatten(1).all(1).float().mean().item()
        assert abs(low - p) < 4 * (p * (1 - p) / 4000) ** 0.5


def test_mfm_radius_range_sampled_per_image():
    x = torch.rand(500, 1, 32, 32)
    m = mfm_mask(x, radius=(2.0, 8.0), low_pass_prob=1.0, generator=torch.Generator().manual_seed(0))
    kept = m.sum((1, 2, 3))
    assert (kept >= disc_mask(32, 32, 2.0).sum()).all() and (kept <= disc_mask(32, 32, 8.0).sum()).all()
    assert len(torch.unique(kept)) > 10                               # radii really vary between images


def test_same_seed_same_masks_and_different_seed_differs():
    x = torch.rand(64, 3, 16, 16)
    for fn in (mfm_mask, folk_mask):
        a = fn(x, generator=torch.Generator().manual_seed(7))
        b = fn(x, generator=torch.Generator().manual_seed(7))
        c = fn(x, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b) and not torch.equal(a, c)


# ---------------------------------------------------------------- Com / RCom / FOLK
def _agree_except_near_threshold(got, keep_ref, norm_amp, threshold):
    "Masks agree on every bin whose normalised amplitude is not within float error of the threshold."
    differ = got != keep_ref
    near = np.abs(norm_amp - threshold) <= 1e-5 * max(threshold, 1e-3)
    assert not (differ & ~near).any(), f"{(differ & ~near).sum()} bins differ away from the threshold"


@pytest.mark.parametrize('kind', ['random', 'natural'])
@pytest.mark.parametrize('h,w', SIZES)
@pytest.mark.parametrize('t', [0.005, 0.01, 0.05])
def test_com_and_rcom_match_reference(kind, h, w, t, natural):
    x = images(kind, h, w, natural)
    c, r = com_mask(x, t), rcom_mask(x, t)
    assert c.shape == (3, 1, h, w) and c.dtype == torch.bool
    assert (c ^ r).all()                                              # Com keeps exactly what RCom removes
    for i in range(len(x)):
        keep_ref, a = ref.com(x[i].numpy(), t)
        _agree_except_near_threshold(c[i, 0].numpy(), keep_ref, a, t)


def test_com_keeps_few_hundred_bins_on_natural_images(natural):
    kept = com_mask(natural, 0.005).sum((1, 2, 3)).float()
    assert 100 < kept.median() < 2000
    inside = (com_mask(natural, 0.005) & disc_mask(224, 224, 16.0)).sum((1, 2, 3)).float() / kept
    assert inside.mean() > 0.5                                        # mostly inside MFM's disc


def test_com_threshold_per_image_tensor(natural):
    t = torch.tensor([0.005, 0.05, 0.01, 0.005])
    got = com_mask(natural, t)
    for i in range(4):
        assert torch.equal(got[i], com_mask(natural[i:i + 1], float(t[i]))[0])


def test_folk_mask_is_one_of_the_six_filters_with_right_frequencies():
    x = torch.rand(2, 3, 24, 24).repeat(600, 1, 1, 1)                 # 1200 images, 2 distinct
    m = folk_mask(x, com_prob=0.5, generator=torch.Generator().manual_seed(0))
    cands = torch.stack([f(x, t) for f in (com_mask, rcom_mask) for t in (0.005, 0.01, 0.05)])
    match = (cands == m[None]).flatten(2).all(2)                      # (6, B)
    assert match.any(0).all()
    com_rate = match[:3].any(0).float().mean().item()
    assert abs(com_rate - 0.5) < 4 * (0.25 / 1200) ** 0.5
    only_com = folk_mask(x, com_prob=1.0, generator=torch.Generator().manual_seed(0))
    assert (cands[:3] == only_com[None]).flatten(2).all(2).any(0).all()


def test_zero_image_does_not_produce_nan():
    x = torch.zeros(2, 3, 16, 16)
    assert not com_mask(x, 0.01).any() and rcom_mask(x, 0.01).all()
    y, keep = folk_filter(x)
    assert torch.equal(y, x)


# ---------------------------------------------------------------- ratio masks
@pytest.mark.parametrize('kind', ['random', 'natural'])
@pytest.mark.parametrize('h,w', SIZES)
@pytest.mark.parametrize('fraction', [0.0, 0.1, 0.5, 0.97, 1.0])
@pytest.mark.parametrize('strongest', [True, False])
def test_ratio_mask_exact_counts_and_reference(kind, h, w, fraction, strongest, natural):
    x = images(kind, h, w, natural)
    got = ratio_mask(x, fraction, strongest)
    n = int(round(fraction * h * w))
    assert ((~got).sum((1, 2, 3)) == n).all()
    for i in range(len(x)):
        keep_ref, a = ref.ratio(x[i].numpy(), fraction, strongest)
        differ = got[i, 0].numpy() != keep_ref
        if differ.any():   # only ties (up to float error) at the cut may be ordered differently
            removed = a[~keep_ref]
            cut = removed.min() if strongest else removed.max()
            assert np.all(np.abs(a[differ] - cut) <= 1e-5 * a.max())


# ---------------------------------------------------------------- one-pass helpers
def test_folk_and_mfm_filter_agree_with_separate_steps(natural):
    x = natural[:2]
    y, keep = folk_filter(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(keep, folk_mask(x, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(y, filter_image(x, keep), atol=1e-5, rtol=0)
    y, keep = mfm_filter(x, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(y, filter_image(x, keep), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- loss
@pytest.mark.parametrize('h,w', SIZES)
@pytest.mark.parametrize('gamma', [0.0, 1.0])
def test_frequency_loss_matches_reference(h, w, gamma):
    g = torch.Generator().manual_seed(h + w)
    pred, target = torch.randn(3, 3, h, w, generator=g), torch.randn(3, 3, h, w, generator=g)
    keep = torch.rand(3, 1, h, w, generator=g) > 0.4
    got = frequency_loss(pred, target, keep, gamma)
    want = ref.frequency_loss(pred.numpy(), target.numpy(), keep[:, 0].numpy(), gamma)
    assert abs(got.item() - want) < 1e-4 * max(1.0, abs(want))


def test_frequency_loss_ignores_kept_bins():
    target = torch.rand(4, 3, 32, 32)
    keep = folk_mask(target, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(4, 3, 32, 32)
    in_kept = torch.fft.ifft2(torch.fft.ifftshift(keep * fft_image(noise), dim=(-2, -1))).real
    assert frequency_loss(target + in_kept, target, keep) < 1e-4
    assert frequency_loss(target + noise - in_kept, target, keep) > 0.1


# ---------------------------------------------------------------- precision
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_inputs(dtype, natural):
    x = natural[:2, :, :64, :64]
    xh = x.to(dtype)
    keep = mfm_mask(xh, low_pass_prob=1.0)
    y = filter_image(xh, keep)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), filter_image(x, keep), atol=2e-2, rtol=0)
    assert torch.equal(com_mask(xh, 0.5), com_mask(xh.float(), 0.5))   # upcast before the FFT
    yf, _ = folk_filter(xh)
    assert yf.dtype == dtype
    loss = frequency_loss(xh, xh.flip(0), keep)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_cuda_masks_follow_the_device_and_cpu_generator(natural):
    x = natural[:2].cuda()
    m = folk_mask(x, generator=torch.Generator().manual_seed(0))
    assert m.device == x.device
    assert torch.equal(m.cpu(), folk_mask(natural[:2], generator=torch.Generator().manual_seed(0)))


# ---------------------------------------------------------------- bad input
BAD = [
    (lambda: amplitude(torch.rand(3, 8, 8)), ValueError, '4-D'),
    (lambda: amplitude(torch.rand(1, 2, 8, 8)), ValueError, '1 or 3 channels'),
    (lambda: amplitude(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)), TypeError, 'floating-point'),
    (lambda: amplitude(np.zeros((1, 3, 8, 8))), TypeError, 'torch.Tensor'),
    (lambda: filter_image(torch.randn(1, 3, 8, 8) * 5, torch.ones(1, 1, 8, 8)), ValueError, '[0, 1]'),
    (lambda: filter_image(torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 7)), ValueError, 'does not broadcast'),
    (lambda: filter_image(torch.rand(2, 3, 8, 8), torch.ones(3, 1, 8, 8)), ValueError, 'does not broadcast'),
    (lambda: filter_image(torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 8, dtype=torch.int64)), TypeError, 'bool or float'),
    (lambda: filter_image(torch.rand(1, 3, 8, 8), torch.full((1, 1, 8, 8), 2.0)), ValueError, 'values in [0, 1]'),
    (lambda: mfm_mask(torch.rand(1, 3, 8, 8), low_pass_prob=1.5), ValueError, 'low_pass_prob'),
    (lambda: mfm_mask(torch.rand(1, 3, 8, 8), radius=0), ValueError, 'radius'),
    (lambda: mfm_mask(torch.rand(1, 3, 8, 8), radius=(5, 2)), ValueError, 'r_min <= r_max'),
    (lambda: com_mask(torch.rand(1, 3, 8, 8), 0.0), ValueError, 'threshold'),
    (lambda: com_mask(torch.rand(1, 3, 8, 8), 1.5), ValueError, 'threshold'),
    (lambda: com_mask(torch.rand(2, 3, 8, 8), torch.tensor([0.1, 0.2, 0.3])), ValueError, 'one per image'),
    (lambda: folk_mask(torch.rand(1, 3, 8, 8), thresholds=()), ValueError, 'thresholds'),
    (lambda: folk_mask(torch.rand(1, 3, 8, 8), com_prob=-0.1), ValueError, 'com_prob'),
    (lambda: ratio_mask(torch.rand(1, 3, 8, 8), 1.01), ValueError, 'ratio'),
    (lambda: ratio_mask(torch.rand(1, 3, 8, 8), -0.5), ValueError, 'ratio'),
    (lambda: frequency_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9), torch.ones(1, 1, 8, 8)), ValueError, 'same shape'),
    (lambda: frequency_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), torch.ones(1, 1, 4, 4)), ValueError, 'broadcast'),
    (lambda: frequency_loss(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8), torch.ones(1, 1, 8, 8), gamma=-1), ValueError, 'gamma'),
]


@pytest.mark.parametrize('call,exc,text', BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_gives_clear_error(call, exc, text):
    with pytest.raises(exc, match=None) as info:
        call()
    assert text in str(info.value), str(info.value)


# ---------------------------------------------------------------- value checks on the images (NaN, inf, 0..255)
def bad_images():
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return x, {'nan': torch.full_like(x, float('nan')), 'inf': x.clone().index_fill_(3, torch.tensor([0]), float('inf')),
               '255': x * 255}

UNIT_RANGE_FNS = {
    'mfm_mask': lambda x: mfm_mask(x, low_pass_prob=1.0), 'com_mask': lambda x: com_mask(x, 0.01),
    'rcom_mask': lambda x: rcom_mask(x, 0.01), 'ratio_mask': lambda x: ratio_mask(x, 0.5),
    'folk_mask': lambda x: folk_mask(x, generator=torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize('name', list(UNIT_RANGE_FNS))
@pytest.mark.parametrize('bad', ['nan', 'inf', '255'])
def test_masks_refuse_images_outside_the_unit_range(name, bad):
    x, bads = bad_images()
    with pytest.raises(ValueError, match=r'x must hold un-normalised images in \[0, 1\]'):
        UNIT_RANGE_FNS[name](bads[bad])
    from folk_nb.checks import value_checks
    with value_checks(False):                      # the gate the trainer uses after its first step: no check
        UNIT_RANGE_FNS[name](bads[bad])


@pytest.mark.parametrize('name', list(UNIT_RANGE_FNS))
def test_masks_of_valid_images_are_unchanged_by_the_check(name):
    from folk_nb.checks import value_checks
    x, _ = bad_images()
    with value_checks(False): want = UNIT_RANGE_FNS[name](x)
    assert torch.equal(UNIT_RANGE_FNS[name](x), want)


@pytest.mark.parametrize('fn', [amplitude, fft_image], ids=['amplitude', 'fft_image'])
def test_spectra_refuse_nan_and_inf_but_take_any_finite_range(fn):
    x, bads = bad_images()
    for bad in ('nan', 'inf'):
        with pytest.raises(ValueError, match='x must hold finite values, found NaN or inf'):
            fn(bads[bad])
    d = x - x.flip(0)                                # a difference of images (negative values): legitimate
    torch.testing.assert_close(fn(bads['255']), fn(x) * 255, rtol=1e-4, atol=1e-3)
    assert torch.isfinite(torch.view_as_real(fn(d)) if fn(d).is_complex() else fn(d)).all()


def test_mfm_filter_checks_the_range_with_one_sync():
    from folk_nb.checks import host_syncs
    x, _ = bad_images()
    assert sum(host_syncs(lambda: mfm_filter(x)).values()) == sum(host_syncs(lambda: check_images(x, unit_range=True)).values())


@pytest.mark.parametrize('h,w', [(32, 32), (33, 47), (8, 8)])
def test_mfm_radius_that_covers_the_whole_spectrum_is_refused(h, w):
    x = torch.rand(1, 3, h, w)
    r_max = float(np.hypot(h // 2, w // 2))         # the corner bin: half the diagonal
    for radius in (r_max, r_max + 1, 1000, (1.0, r_max)):
        with pytest.raises(ValueError, match=f'too large for a {h}x{w} spectrum'):
            mfm_mask(x, radius=radius)
        with pytest.raises(ValueError, match='too large'):
            mfm_filter(x, radius=radius)
    r = r_max - 0.01                                 # just inside: both bands non-empty
    low, high = mfm_mask(x, radius=r, low_pass_prob=1.0), mfm_mask(x, radius=r, low_pass_prob=0.0)
    assert 0 < low.sum() < h * w and 0 < high.sum() < h * w
