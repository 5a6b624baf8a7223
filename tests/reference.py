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


def map_between_views(m, src_box, dst_box, size, src_flipped=False, dst_flipped=False):
    """Carry a map (C, h, w) over one crop view onto another crop view of the same image, one pixel at a time.

    Boxes are (x0, y0, x1, y1) fractions of the image; a view's pixel (i, j) of an (oh, ow) view covers the view
    fractions [j / ow, (j + 1) / ow] (mirrored when the view is flipped). Each destination pixel centre is taken to
    image coordinates, then to the source view's fractions, where the map is read bilinearly with its cells centred
    at (k + 0.5) / w, clamped to the border cells. Returns (the carried map (C, oh, ow), inside (oh, ow) bool, on_edge
    (oh, ow) bool: the pixel centre lies within 1e-5 of the source crop's edge, where float32 rounding may decide
    `inside` either way).
    """
    m = np.asarray(m, np.float64)
    C, h, w = m.shape
    oh, ow = size
    sx0, sy0, sx1, sy1 = (float(v) for v in src_box)
    dx0, dy0, dx1, dy1 = (float(v) for v in dst_box)
    out, inside, on_edge = np.zeros((C, oh, ow)), np.zeros((oh, ow), bool), np.zeros((oh, ow), bool)

    def read(c, py, px):  # bilinear at source pixel coordinates, border-clamped
        py, px = min(max(py, 0.0), h - 1.0), min(max(px, 0.0), w - 1.0)
        y0, x0 = int(math.floor(py)), int(math.floor(px))
        y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
        fy, fx = py - y0, px - x0
        return ((1 - fy) * ((1 - fx) * m[c, y0, x0] + fx * m[c, y0, x1]) +
                fy * ((1 - fx) * m[c, y1, x0] + fx * m[c, y1, x1]))

    for i in range(oh):
        for j in range(ow):
            tx, ty = (j + 0.5) / ow, (i + 0.5) / oh
            if dst_flipped: tx = 1 - tx
            ux, uy = dx0 + tx * (dx1 - dx0), dy0 + ty * (dy1 - dy0)       # image fractions
            sx, sy = (ux - sx0) / (sx1 - sx0), (uy - sy0) / (sy1 - sy0)   # source view fractions
            if src_flipped: sx = 1 - sx
            inside[i, j] = 0 <= sx <= 1 and 0 <= sy <= 1
            on_edge[i, j] = min(abs(sx), abs(sx - 1), abs(sy), abs(sy - 1)) < 1e-5
            for c in range(C):
                out[c, i, j] = read(c, sy * h - 0.5, sx * w - 0.5)
    return out, inside, on_edge
