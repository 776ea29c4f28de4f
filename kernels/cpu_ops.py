"""Fused device stage on the CPU (numba, parallel over views): the CPU twin of device_ops.py.

Equals objloader.augment.reference.apply_device_ops (BG-Mixup eq. 4 -> ColorJitter in each
view's order -> grayscale -> blur -> solarise -> normalise) up to float rounding, but works view
by view in cache-sized buffers instead of batch-wide torch ops, so a 2-core machine is no longer
bound by the colour ops. Each numba function below names the reference op it must equal.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numba import njit, prange

from objloader.augment.params import AugParams
from objloader.augment.reference import (HARD_MIX_THRESHOLD, IMAGENET_MEAN, IMAGENET_STD, LUMA_WEIGHTS,
                                         SOLARIZE_THRESHOLD, blur_kernel_size, gaussian_taps)

__all__ = ["apply_device_ops_cpu"]

# The reference's constants as float32, the precision these kernels compute in (numba freezes
# module globals into the compiled code).
_LUMA = tuple(np.float32(w) for w in LUMA_WEIGHTS)
_SOLARIZE_THRESHOLD = np.float32(SOLARIZE_THRESHOLD)


@njit(cache=True, inline="always", error_model="numpy")
def _clamp01(v):
    return min(max(v, np.float32(0.0)), np.float32(1.0))


@njit(cache=True, inline="always", error_model="numpy")
def _luma(r, g, b):
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


@njit(cache=True, error_model="numpy")
def _mix(x, view_u8, mask, patch, hard, mixed):
    """reference.bg_mixup for one view: x = m * view + (1 - m) * patch[y % P, x % P]."""
    size = x.shape[1]
    p = patch.shape[1]
    for c in range(3):
        for y in range(size):
            for xx in range(size):
                v = np.float32(view_u8[c, y, xx]) / np.float32(255.0)
                if mixed:
                    m = np.float32(mask[0, y, xx]) / np.float32(255.0)
                    if hard:
                        m = np.float32(1.0) if m >= HARD_MIX_THRESHOLD else np.float32(0.0)
                    bg = np.float32(patch[c, y % p, xx % p]) / np.float32(255.0)
                    v = m * v + (np.float32(1.0) - m) * bg
                x[c, y, xx] = v


@njit(cache=True, error_model="numpy")
def _brightness(x, f):
    """reference.adjust_brightness."""
    for c in range(3):
        for y in range(x.shape[1]):
            for xx in range(x.shape[2]):
                x[c, y, xx] = _clamp01(x[c, y, xx] * f)


@njit(cache=True, error_model="numpy")
def _contrast(x, f):
    """reference.adjust_contrast: blend towards the view's mean grey level."""
    total = 0.0
    for y in range(x.shape[1]):
        for xx in range(x.shape[2]):
            total += _luma(x[0, y, xx], x[1, y, xx], x[2, y, xx])
    mean = np.float32(total / (x.shape[1] * x.shape[2]))
    for c in range(3):
        for y in range(x.shape[1]):
            for xx in range(x.shape[2]):
                x[c, y, xx] = _clamp01(f * x[c, y, xx] + (np.float32(1.0) - f) * mean)


@njit(cache=True, error_model="numpy")
def _saturation(x, f):
    """reference.adjust_saturation: blend towards the pixel's own grey level."""
    for y in range(x.shape[1]):
        for xx in range(x.shape[2]):
            grey = _luma(x[0, y, xx], x[1, y, xx], x[2, y, xx])
            for c in range(3):
                x[c, y, xx] = _clamp01(f * x[c, y, xx] + (np.float32(1.0) - f) * grey)


@njit(cache=True, inline="always", error_model="numpy")
def _remainder1(a):
    return a - np.float32(math.floor(a))


@njit(cache=True, inline="always", error_model="numpy")
def _hsv_channel(n, h6, s, v):
    k = n + h6
    k = k - np.float32(6.0) if k >= np.float32(6.0) else k
    ramp = min(max(min(k, np.float32(4.0) - k), np.float32(0.0)), np.float32(1.0))
    return _clamp01(v * (np.float32(1.0) - s * ramp))


@njit(cache=True, error_model="numpy")
def _hue(x, shift):
    """reference.adjust_hue: RGB -> HSV, rotate hue by ``shift`` turns, -> RGB (hexcone)."""
    for y in range(x.shape[1]):
        for xx in range(x.shape[2]):
            r, g, b = x[0, y, xx], x[1, y, xx], x[2, y, xx]
            maxc = max(r, g, b)
            minc = min(r, g, b)
            delta = maxc - minc
            if delta == 0:
                h = np.float32(0.0)
                s = np.float32(0.0)
            else:
                s = delta / maxc
                if maxc == r:
                    h = (g - b) / delta
                elif maxc == g:
                    h = np.float32(2.0) + (b - r) / delta
                else:
                    h = np.float32(4.0) + (r - g) / delta
            h = _remainder1(_remainder1(h / np.float32(6.0)) + shift)
            # HSV -> RGB without the six-way sector switch: channel n (r: 5, g: 3, b: 1) is
            # v * (1 - s * clamp(min(k, 4 - k), 0, 1)) with k = (n + 6h) mod 6, the same hexcone.
            h6 = h * np.float32(6.0)
            r = _hsv_channel(np.float32(5.0), h6, s, maxc)
            g = _hsv_channel(np.float32(3.0), h6, s, maxc)
            b = _hsv_channel(np.float32(1.0), h6, s, maxc)
            x[0, y, xx], x[1, y, xx], x[2, y, xx] = r, g, b


@njit(cache=True, error_model="numpy")
def _grayscale(x):
    """reference.rgb_to_grayscale."""
    for y in range(x.shape[1]):
        for xx in range(x.shape[2]):
            grey = _luma(x[0, y, xx], x[1, y, xx], x[2, y, xx])
            x[0, y, xx] = grey
            x[1, y, xx] = grey
            x[2, y, xx] = grey


@njit(cache=True, inline="always", error_model="numpy")
def _reflect(i, size):
    i = -i if i < 0 else i
    return 2 * (size - 1) - i if i > size - 1 else i


@njit(cache=True, error_model="numpy")
def _blur(x, taps, tmp):
    """reference.gaussian_blur: separable, reflect padding; ``taps`` centred, zero beyond radius.

    Each pass is a sum of shifted copies of contiguous rows, tap by tap (an axpy the compiler
    vectorises); only the border pixels, where the kernel reaches past the edge, pay for the
    reflection. Every pixel still sums its taps in ascending order, as one accumulator would.
    """
    size = x.shape[1]
    half = (taps.shape[0] - 1) // 2
    lo = 0
    while taps[lo] == 0:  # this view's own radius: skip the zero taps of the batch-wide kernel
        lo += 1
    hi = taps.shape[0] - lo
    radius = half - lo
    first = min(radius, size)  # pixels [first, last) see no border along the row
    last = max(size - radius, first)
    for c in range(3):
        for y in range(size):
            src, dst = x[c, y], tmp[c, y]
            for xx in range(first, last):
                dst[xx] = np.float32(0.0)
            for k in range(lo, hi):
                w, off = taps[k], k - half
                for xx in range(first, last):
                    dst[xx] += w * src[xx + off]
            for xx in range(size):
                if first <= xx < last:
                    continue
                acc = np.float32(0.0)
                for k in range(lo, hi):
                    acc += taps[k] * src[_reflect(xx + k - half, size)]
                dst[xx] = acc
        for y in range(size):
            dst = x[c, y]
            for xx in range(size):
                dst[xx] = np.float32(0.0)
            for k in range(lo, hi):
                w, row = taps[k], tmp[c, _reflect(y + k - half, size)]
                for xx in range(size):
                    dst[xx] += w * row[xx]


@njit(cache=True, parallel=True, error_model="numpy")
def _device_ops(views, masks, patches, hard, mixed, partner, jitter, factors, order, gray, blur, taps,
                solarize, normalise, mean, std, out, scratch):
    n_views = views.shape[0]
    for i in prange(n_views):
        x = out[i]
        _mix(x, views[i], masks[i], patches[max(partner[i], 0)], hard, mixed[i])
        if jitter[i]:
            for position in range(4):
                op = order[i, position]
                if op == 0:
                    _brightness(x, factors[i, 0])
                elif op == 1:
                    _contrast(x, factors[i, 1])
                elif op == 2:
                    _saturation(x, factors[i, 2])
                else:
                    _hue(x, factors[i, 3])
        if gray[i]:
            _grayscale(x)
        if blur[i]:
            _blur(x, taps[i], scratch[i])
        if solarize[i] or normalise:
            for c in range(3):
                for y in range(x.shape[1]):
                    for xx in range(x.shape[2]):
                        v = x[c, y, xx]
                        if solarize[i] and v >= _SOLARIZE_THRESHOLD:
                            v = np.float32(1.0) - v
                        if normalise:
                            v = (v - mean[c]) / std[c]
                        x[c, y, xx] = v


def apply_device_ops_cpu(
    views_uint8: torch.Tensor,
    masks: torch.Tensor | None,
    patches: torch.Tensor | None,
    params: AugParams,
    *,
    hard: bool = False,
    dtype: torch.dtype = torch.float32,
    normalise: bool = True,
) -> torch.Tensor:
    """Same arguments and result as reference.apply_device_ops, for CPU tensors (uint8 masks)."""
    b, v, _, s, _ = views_uint8.shape
    n = b * v
    flat = lambda a, t: np.ascontiguousarray(np.asarray(a).reshape(n, *np.asarray(a).shape[2:]), dtype=t)  # noqa: E731
    views = np.ascontiguousarray(views_uint8.reshape(n, 3, s, s).numpy())
    partner = flat(params.partner, np.int64)
    mixed = flat(params.mix, np.bool_) & (partner >= 0)
    if patches is None or masks is None or not mixed.any():
        mixed[:] = False
        mask_arr = np.zeros((n, 1, 1, 1), np.uint8)
        patch_arr = np.zeros((1, 3, 1, 1), np.uint8)
    else:
        if masks.dtype != torch.uint8 or patches.dtype != torch.uint8:
            raise TypeError("the CPU fused path takes uint8 masks and patches")
        mask_arr = np.ascontiguousarray(masks.reshape(n, 1, s, s).numpy())
        patch_arr = np.ascontiguousarray(patches.numpy())
    partner = np.where(mixed, partner, 0)  # unmixed views never read a patch
    factors = np.stack([flat(params.brightness, np.float32), flat(params.contrast, np.float32),
                        flat(params.saturation, np.float32), flat(params.hue, np.float32)], axis=1)
    blur = flat(params.blur, np.bool_)
    sigma = flat(params.sigma, np.float64)
    k = blur_kernel_size(float(sigma[blur].max())) if blur.any() else 1
    taps = np.zeros((n, k), np.float32)
    if blur.any():  # the reference's own taps, so both blur with identical weights
        taps[blur] = gaussian_taps(torch.from_numpy(sigma[blur]), k).to(torch.float32).numpy()
        if k // 2 >= s:
            raise ValueError(f"blur radius {k // 2} needs views larger than {s} px")
    out = np.empty((n, 3, s, s), np.float32)
    scratch = np.empty((n, 3, s, s), np.float32) if blur.any() else np.empty((n, 3, 1, 1), np.float32)
    _device_ops(views, mask_arr, patch_arr, hard, mixed, partner, flat(params.jitter, np.bool_), factors,
                flat(params.jitter_order, np.int64).reshape(n, 4), flat(params.grayscale, np.bool_), blur, taps,
                flat(params.solarize, np.bool_), normalise, np.asarray(IMAGENET_MEAN, np.float32),
                np.asarray(IMAGENET_STD, np.float32), out, scratch)
    result = torch.from_numpy(out).view(b, v, 3, s, s)
    if not normalise and dtype == torch.uint8:
        return (result * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return result.to(dtype)
