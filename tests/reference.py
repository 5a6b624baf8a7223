"""Slow, independent per-image numpy references of folk_nb's masks, filters and losses.

Written from the spec (SPEC.md), not from the library: complex128 FFTs of every image, explicit loops over the bins
where that is clearer, no rfft tricks, no batching. Tests compare the batched torch code against these; the masks
benchmark times them.
"""
import math
import numpy as np


def spectrum(img):
    "Shifted complex spectrum of one image (C, H, W), complex128."
    return np.fft.fftshift(np.fft.fft2(np.asarray(img, dtype=np.float64), axes=(-2, -1)), axes=(-2, -1))


def amplitude(img):
    "Channel-mean |F| of one image, (H, W), shifted."
    return np.abs(spectrum(img)).mean(0)


def filter_image(img, keep):
    "real(ifft2(ifftshift(keep * fftshift(fft2(img))))) clamped to [0, 1], for one image (C, H, W) and keep (H, W)."
    masked = spectrum(img) * np.asarray(keep, dtype=np.float64)[None]
    return np.clip(np.fft.ifft2(np.fft.ifftshift(masked, axes=(-2, -1)), axes=(-2, -1)).real, 0.0, 1.0)


def disc(h, w, radius):
    "Bins strictly closer than `radius` to DC (at h//2, w//2), by explicit loops."
    keep = np.zeros((h, w), dtype=bool)
    for i in range(h):
        for j in range(w):
            keep[i, j] = math.hypot(i - h // 2, j - w // 2) < radius
    return keep


def com(img, threshold):
    "Com keep-mask of one image: normalised amplitude >= threshold; also returns the normalised amplitude."
    a = amplitude(img)
    a = a / a.max() if a.max() > 0 else a
    return a >= threshold, a


def ratio(img, fraction, strongest=True):
    "Remove exactly round(fraction * H * W) bins by amplitude rank (stable ties); returns (keep, amplitude)."
    a = amplitude(img)
    h, w = a.shape
    n = int(round(fraction * h * w))
    flat = a.ravel()
    order = np.argsort(-flat if strongest else flat, kind='stable')
    keep = np.ones(h * w, dtype=bool)
    keep[order[:n]] = False
    return keep.reshape(h, w), a


def frequency_loss(pred, target, keep, gamma=0.0):
    "MFM loss over a batch: mean per-bin complex distance over removed bins and channels (keep: (B, H, W))."
    total, count = 0.0, 0.0
    for p, t, k in zip(np.asarray(pred, np.float64), np.asarray(target, np.float64), np.asarray(keep)):
        P = np.fft.fftshift(np.fft.fft2(p, axes=(-2, -1), norm='ortho'), axes=(-2, -1))
        T = np.fft.fftshift(np.fft.fft2(t, axes=(-2, -1), norm='ortho'), axes=(-2, -1))
        d = np.sqrt((P.real - T.real) ** 2 + (P.imag - T.imag) ** 2 + 1e-12)
        if gamma > 0:
            d = d * (d / d.max(axis=(-2, -1), keepdims=True)) ** gamma
        removed = ~np.asarray(k, dtype=bool)
        total += (d * removed[None]).sum()
        count += removed.sum() * p.shape[0]
    return total / max(count, 1.0)
