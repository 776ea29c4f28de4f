"""Fused device stage on the CPU (numba, parallel over views): the CPU twin of device_ops.py.

Equals objloader.augment.reference.apply_device_ops (BG-Mixup eq. 4 -> ColorJitter in each
view's order -> grayscale -> blur -> solarise -> normalise) up to float rounding, but works view
by view in cache-sized buffers instead of batch-wide torch ops, so a 2-core machine is no longer
bound by the colour ops. Each numba function below names the reference op it must equal.

What LLVM vectorises: numba checks every array index of a signed loop variable for wraparound,
and that check stops vectorisation, so the inner loops run over zero-based slices of rows
(``for j in range(row.shape[0])``), and choices inside them are selects, not branches
(benchmarks/results/cpu_budget/: 3.5x on a MoCo v2 batch).
"""

from __future__ import annotations


import numpy as np
import torch
from numba import njit, prange

from objloader.augment.params import AugParams
from objloader.augment.renamed import renamed_keywords
from objloader.augment.reference import (HARD_MIX_THRESHOLD, IMAGENET_MEAN, IMAGENET_STD, LUMA_WEIGHTS,
                                         SOLARIZE_THRESHOLD, blur_kernel_size, gaussian_taps)

__all__ = ["apply_device_ops_cpu"]

# The reference's constants as float32, the precision these kernels compute in (numba freezes
# module globals into the compiled code).
_LUMA = tuple(np.float32(w) for w in LUMA_WEIGHTS)
_SOLARIZE_THRESHOLD = np.float32(SOLARIZE_THRESHOLD)


@njit(cache=True, inline="always", error_model="numpy")
def _lower(a, b):
    return a if a < b else b  # a plain select; numba's min/max builtins vectorise worse


@njit(cache=True, inline="always", error_model="numpy")
def _upper(a, b):
    return a if a > b else b


@njit(cache=True, inline="always", error_model="numpy")
def _clamp01(v):
    return _lower(_upper(v, np.float32(0.0)), np.float32(1.0))


@njit(cache=True, inline="always", error_model="numpy")
def _luma(r, g, b):
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


@njit(cache=True, error_model="numpy")
def _mix(x, view_u8, mask, patch, hard, mixed):
    """reference.bg_mixup for one view: x = m * view + (1 - m) * patch[y % P, x % P].

    The patch is tiled by walking each view row in runs of P columns, so every inner loop is a
    zero-based loop over contiguous slices (the module docstring says why); an unmixed view is a
    plain conversion.
    """
    size = x.shape[1]
    p = patch.shape[1]
    one, zero, full = np.float32(1.0), np.float32(0.0), np.float32(255.0)
    for c in range(3):
        for y in range(size):
            src, dst = view_u8[c, y], x[c, y]
            if not mixed:
                for j in range(size):
                    dst[j] = np.float32(src[j]) / full
                continue
            m_row, bg_row = mask[0, y], patch[c, y % p]
            for start in range(0, size, p):
                n = min(p, size - start)
                s_run, m_run, d_run = src[start:start + n], m_row[start:start + n], dst[start:start + n]
                if hard:
                    for j in range(n):
                        m = one if np.float32(m_run[j]) / full >= HARD_MIX_THRESHOLD else zero
                        d_run[j] = m * (np.float32(s_run[j]) / full) + (one - m) * (np.float32(bg_row[j]) / full)
                else:
                    for j in range(n):
                        m = np.float32(m_run[j]) / full
                        d_run[j] = m * (np.float32(s_run[j]) / full) + (one - m) * (np.float32(bg_row[j]) / full)


@njit(cache=True, error_model="numpy")
def _brightness(x, f):
    """reference.adjust_brightness."""
    for c in range(3):
        for y in range(x.shape[1]):
            row = x[c, y]
            for j in range(row.shape[0]):
                row[j] = _clamp01(row[j] * f)


@njit(cache=True, inline="always", error_model="numpy", fastmath={"reassoc", "nsz"})
def _row_luma_sum(r, g, b):
    """Sum of a row's grey levels; reassociation lets LLVM sum in vector lanes."""
    total = np.float32(0.0)
    for j in range(r.shape[0]):
        total += _luma(r[j], g[j], b[j])
    return total


@njit(cache=True, error_model="numpy")
def _contrast(x, f):
    """reference.adjust_contrast: blend towards the view's mean grey level (rows summed in
    float32 lanes, the rows in float64)."""
    size = x.shape[2]
    total = 0.0
    for y in range(x.shape[1]):
        total += _row_luma_sum(x[0, y], x[1, y], x[2, y])
    mean = np.float32(total / (x.shape[1] * size))
    keep = np.float32(1.0) - f
    for c in range(3):
        for y in range(x.shape[1]):
            row = x[c, y]
            for j in range(size):
                row[j] = _clamp01(f * row[j] + keep * mean)


@njit(cache=True, error_model="numpy")
def _saturation(x, f):
    """reference.adjust_saturation: blend towards the pixel's own grey level."""
    keep = np.float32(1.0) - f
    for y in range(x.shape[1]):
        r, g, b = x[0, y], x[1, y], x[2, y]
        for j in range(r.shape[0]):
            grey = keep * _luma(r[j], g[j], b[j])
            r[j] = _clamp01(f * r[j] + grey)
            g[j] = _clamp01(f * g[j] + grey)
            b[j] = _clamp01(f * b[j] + grey)


@njit(cache=True, inline="always", error_model="numpy")
def _remainder1(a):
    return a - np.floor(a)  # np.floor stays float32; math.floor would round-trip through int64


@njit(cache=True, inline="always", error_model="numpy")
def _hsv_channel(n, h6, s, v):
    k = n + h6
    k = k - np.float32(6.0) if k >= np.float32(6.0) else k
    ramp = _clamp01(_lower(k, np.float32(4.0) - k))
    return _clamp01(v * (np.float32(1.0) - s * ramp))


@njit(cache=True, error_model="numpy")
def _hue(x, shift):
    """reference.adjust_hue: RGB -> HSV, rotate hue by ``shift`` turns, -> RGB (hexcone).

    Written with selects instead of branches (every candidate hue is computed, dividing by 1
    where the pixel is grey), so the loop vectorises.
    """
    zero, one = np.float32(0.0), np.float32(1.0)
    for y in range(x.shape[1]):
        red, green, blue = x[0, y], x[1, y], x[2, y]
        for j in range(red.shape[0]):
            r, g, b = red[j], green[j], blue[j]
            maxc = _upper(_upper(r, g), b)
            delta = maxc - _lower(_lower(r, g), b)
            grey = delta == zero
            safe_delta = one if grey else delta
            s = delta / (one if grey else maxc)  # 0 for a grey pixel
            h = np.float32(4.0) + (r - g) / safe_delta
            h = np.float32(2.0) + (b - r) / safe_delta if maxc == g else h
            h = (g - b) / safe_delta if maxc == r else h
            h = zero if grey else h
            h = _remainder1(_remainder1(h / np.float32(6.0)) + shift)
            # HSV -> RGB without the six-way sector switch: channel n (r: 5, g: 3, b: 1) is
            # v * (1 - s * clamp(min(k, 4 - k), 0, 1)) with k = (n + 6h) mod 6, the same hexcone.
            h6 = h * np.float32(6.0)
            red[j] = _hsv_channel(np.float32(5.0), h6, s, maxc)
            green[j] = _hsv_channel(np.float32(3.0), h6, s, maxc)
            blue[j] = _hsv_channel(np.float32(1.0), h6, s, maxc)


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
def _blur(x, taps, padded):
    """reference.gaussian_blur: separable, reflect padding; ``taps`` centred, zero beyond radius.

    Vertical pass first, into the middle of ``padded`` [3, S, S + 2 * half] rows whose ends are
    then filled by reflection, so the horizontal pass back into ``x`` needs no border case. Both
    passes are sums of shifted contiguous rows, tap by tap in ascending order, over zero-based
    slices: numba then drops its negative-index check, which otherwise keeps LLVM from
    vectorising the loops (10x slower). Reflect padding acts on each axis alone, so the order of
    the passes changes only float rounding.
    """
    size = x.shape[1]
    half = (taps.shape[0] - 1) // 2
    lo = 0
    while taps[lo] == 0:  # this view's own radius: skip the zero taps of the batch-wide kernel
        lo += 1
    hi = taps.shape[0] - lo
    radius = half - lo
    for c in range(3):
        for y in range(size):
            row = padded[c, y]
            centre = row[half:half + size]
            for j in range(size):
                centre[j] = np.float32(0.0)
            for k in range(lo, hi):
                w, source = taps[k], x[c, _reflect(y + k - half, size)]
                for j in range(size):
                    centre[j] += w * source[j]
            for j in range(1, radius + 1):
                row[half - j] = row[half + j]
                row[half + size - 1 + j] = row[half + size - 1 - j]
        for y in range(size):
            dst, row = x[c, y], padded[c, y]
            for j in range(size):
                dst[j] = np.float32(0.0)
            for k in range(lo, hi):
                w, shifted = taps[k], row[k:k + size]
                for j in range(size):
                    dst[j] += w * shifted[j]


@njit(cache=True, parallel=True, error_model="numpy")
def _device_ops(views, masks, patches, hard, mixed, partner, jitter, factors, order, grayscale, blur, taps,
                solarize, normalize, mean, std, out, scratch):
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
        if grayscale[i]:
            _grayscale(x)
        if blur[i]:
            _blur(x, taps[i], scratch[i])
        if solarize[i] or normalize:
            for c in range(3):
                for y in range(x.shape[1]):
                    for xx in range(x.shape[2]):
                        v = x[c, y, xx]
                        if solarize[i] and v >= _SOLARIZE_THRESHOLD:
                            v = np.float32(1.0) - v
                        if normalize:
                            v = (v - mean[c]) / std[c]
                        x[c, y, xx] = v


@njit(cache=True, parallel=True, error_model="numpy")
def _mix_only_uint8(views, masks, patches, hard, mixed, partner, out, in_place, rows):
    """reference.bg_mixup then reference's uint8 rounding, for batches without colour or
    normalisation: each mixed view is blended in float32 and rounded straight back to uint8, the
    others copied (with ``in_place``, ``out`` is ``views`` and they stay), in one pass over the
    batch (no float batch, no torch tail).

    In place, each source row is first copied to ``rows[i]`` (one row per view): LLVM vectorises
    the blend only behind a runtime check that source and destination do not overlap, and a
    row blended onto itself fails it, so the scalar loop ran instead (3-4x slower: the torch
    engine's +BG-Mixup cost 35 ms a batch of 64 at 224 px)."""
    full, one, zero = np.float32(255.0), np.float32(1.0), np.float32(0.0)
    size = views.shape[2]
    p = patches.shape[2]
    for i in prange(views.shape[0]):
        if not mixed[i]:
            if not in_place:
                out[i] = views[i]
            continue
        patch = patches[partner[i]]
        for c in range(3):
            for y in range(size):
                src, m_row, dst, bg_row = views[i, c, y], masks[i, 0, y], out[i, c, y], patch[c, y % p]
                if in_place:
                    copy = rows[i]
                    copy[:] = src
                    src = copy
                for start in range(0, size, p):
                    n = min(p, size - start)
                    s_run, m_run, d_run = src[start:start + n], m_row[start:start + n], dst[start:start + n]
                    for j in range(n):
                        m = np.float32(m_run[j]) / full
                        if hard:
                            m = one if m >= HARD_MIX_THRESHOLD else zero
                        x = m * (np.float32(s_run[j]) / full) + (one - m) * (np.float32(bg_row[j]) / full)
                        d_run[j] = np.uint8(_lower(_upper(np.rint(x * full), zero), full))  # torch .round(): half to even


@renamed_keywords(normalise="normalize")
def apply_device_ops_cpu(
    views_uint8: torch.Tensor,
    masks: torch.Tensor | None,
    patches: torch.Tensor | None,
    params: AugParams,
    *,
    hard: bool = False,
    dtype: torch.dtype = torch.float32,
    normalize: bool = True,
    reuse_views: bool = False,
) -> torch.Tensor:
    """Same arguments and result as reference.apply_device_ops, for CPU tensors (uint8 masks).
    With ``reuse_views``, a uint8 result without colour is written into ``views_uint8`` itself:
    the unmixed views stay where they are, and no fresh batch (its page faults cost as much as
    the blend) is allocated."""
    b, v, _, s, _ = views_uint8.shape
    n = b * v
    flat = lambda a, t: np.ascontiguousarray(np.asarray(a).reshape(n, *np.asarray(a).shape[2:]), dtype=t)  # noqa: E731
    # numpy does the reshapes (and the copy of an engine's strided batch): a torch copy of this
    # size would start an OpenMP region whose threads then spin, taking a core from the workers.
    views = np.ascontiguousarray(views_uint8.numpy().reshape(n, 3, s, s))
    partner = flat(params.partner, np.int64)
    mixed = flat(params.mix, np.bool_) & (partner >= 0)
    if patches is None or masks is None or not mixed.any():
        mixed[:] = False
        mask_arr = np.zeros((n, 1, 1, 1), np.uint8)
        patch_arr = np.zeros((1, 3, 1, 1), np.uint8)
    else:
        if masks.dtype != torch.uint8 or patches.dtype != torch.uint8:
            raise TypeError("the CPU fused path takes uint8 masks and patches")
        mask_arr = np.ascontiguousarray(masks.numpy().reshape(n, 1, s, s))
        patch_arr = np.ascontiguousarray(patches.numpy())
    partner = np.where(mixed, partner, 0)  # unmixed views never read a patch
    colour = params.jitter.any() or params.grayscale.any() or params.blur.any() or params.solarize.any()
    if dtype == torch.uint8 and not normalize and not colour:  # the raw-pixel output: mix in uint8
        in_place = reuse_views and views_uint8.is_contiguous()  # then ``views`` is the caller's memory
        out_u8 = views if in_place else np.empty_like(views)
        rows = np.empty((n if in_place else 0, s), np.uint8)
        _mix_only_uint8(views, mask_arr, patch_arr, hard, mixed, partner, out_u8, in_place, rows)
        return torch.from_numpy(out_u8).view(b, v, 3, s, s)
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
    # Blur rows padded by the kernel's half width on each side (see _blur).
    scratch = np.empty((n, 3, s, s + k - 1), np.float32) if blur.any() else np.empty((n, 3, 1, 1), np.float32)
    _device_ops(views, mask_arr, patch_arr, hard, mixed, partner, flat(params.jitter, np.bool_), factors,
                flat(params.jitter_order, np.int64).reshape(n, 4), flat(params.grayscale, np.bool_), blur, taps,
                flat(params.solarize, np.bool_), normalize, np.asarray(IMAGENET_MEAN, np.float32),
                np.asarray(IMAGENET_STD, np.float32), out, scratch)
    result = torch.from_numpy(out).view(b, v, 3, s, s)
    if not normalize and dtype == torch.uint8:
        return (result * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return result.to(dtype)
