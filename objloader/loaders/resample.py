"""numba twins of the reference geometry (objloader.augment.reference.crop_views / cut_bg_patch),
for engines that run compiled code per sample (torch workers, FFCV). Tested against the reference.

Sampling rule (the reference's, DESIGN.md "Op semantics"), per axis of an S-pixel output from a
window [lo, hi] of the unit square over an axis of E source pixels, scale = (hi - lo) E / S:
- scale <= 1 (upsampling): output k reads the point p = lo E + (k + 0.5) scale - 0.5 linearly
  from its two neighbouring pixels, clamped to the image border;
- scale > 1 (downsampling): antialiased: a triangle filter of half-width ``scale`` centred on
  lo E + (k + 0.5) scale, its weights normalised to sum 1; pixels beyond the image border count
  as the border pixel (torchvision's ``antialias=True`` inside the view, DALI's at its edge too).
A view reads the image's pixels beyond its window's edge; the background patch reads only the
pixels of its rectangle (the ones at its edge stand for those beyond), so no object leaks in.
Separable, float32 throughout, rounded to uint8; a flipped view mirrors the output columns. The
order of the two passes follows the vertical scale, so that the gathering pass (the slow one)
runs over as few rows as possible:
- downsampling vertically: per output row, the vertical taps first (contiguous runs of source
  pixels, vectorised), then each output pixel gathers its horizontal taps from that row;
- upsampling vertically (object masks, small windows): each source row the window reads is
  resampled horizontally once, and every output row blends the two rows it lies between
  (vectorised); an M-px mask into S-px views gathers over about M rows instead of S.

Speed: the taps of an output column are the same for every row and the taps of an output row
the same for every column, so both are computed once per window into caller-owned tables
(``table_arrays``); nothing is allocated per sample.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from ..augment.reference import EDGE_SLACK_PX


def max_taps(extent: int, out_size: int) -> int:
    """Most source pixels one output pixel reads along an axis of ``extent`` pixels resized to
    ``out_size``: the triangle spans 2 x scale pixels, scale <= extent / out_size."""
    return int(2 * max(extent / max(out_size, 1), 1.0)) + 3


def table_arrays(size: int, channels: int = 3, max_source: int = 256, min_output: int | None = None):
    """Fresh scratch for outputs up to ``size`` px with up to ``channels`` channels, from images
    up to ``max_source`` px a side, resized to outputs of at least ``min_output`` px (default
    ``size``): (first tap int32 [2, size], tap counts int32 [2, size], weights float32
    [2, size, taps], work float32 [work_size(...)]: one source row of interleaved pixels after the
    vertical taps, or two output rows after the horizontal ones); axis 0 of the first three is x,
    y. Pass them to the functions below as ``*tables``."""
    taps = max_taps(max_source, min_output or size)
    return (np.empty((2, size), np.int32), np.empty((2, size), np.int32), np.empty((2, size, taps), np.float32),
            np.empty(work_size(size, channels, max_source), np.float32))


def work_size(size: int, channels: int, max_source: int) -> int:
    """Floats of scratch the resampler needs (table_arrays' last array)."""
    return max(max_source, 2 * size) * channels


def tables_fit(tables, size: int, channels: int, max_source: int, min_output: int) -> bool:
    """Whether ``tables`` serve images up to ``max_source`` px and outputs of min_output..size px."""
    first, _, weights, work = tables
    return (first.shape[1] >= size and work.shape[0] >= work_size(size, channels, max_source)
            and weights.shape[2] >= max_taps(max_source, min_output))


@njit(cache=True)
def _axis_taps(lo, hi, extent, size, mirror, inside, first, count, weights):
    """Taps of an S = ``size`` output along an axis of ``extent`` pixels, window [lo, hi] of the
    unit square (the module docstring's rule) -> first[k], count[k], weights[k, :count[k]].
    ``inside``: taps stay on the window's own pixels (the background patch), else on the image's."""
    a, b = lo * extent, hi * extent
    scale = (b - a) / size
    edge_lo, edge_hi = 0, extent
    if inside:
        edge_lo = max(int(math.floor(a + EDGE_SLACK_PX)), 0)
        edge_hi = min(max(int(math.ceil(b - EDGE_SLACK_PX)), edge_lo + 1), extent)
    if scale <= 1.0:
        for k in range(size):
            kk = size - 1 - k if mirror else k
            p = min(max(a + (kk + 0.5) * scale - 0.5, edge_lo), edge_hi - 1.0)
            i0 = int(math.floor(p))
            f = np.float32(p - i0)
            first[k] = i0
            if i0 + 1 < edge_hi:
                count[k] = 2
                weights[k, 0], weights[k, 1] = np.float32(1.0) - f, f
            else:
                count[k] = 1
                weights[k, 0] = np.float32(1.0)
        return
    for k in range(size):
        kk = size - 1 - k if mirror else k
        centre = a + (kk + 0.5) * scale
        j0 = int(math.floor(centre - scale + 0.5))
        j1 = int(math.floor(centre + scale + 0.5))
        lo_tap, hi_tap = max(j0, edge_lo), min(j1, edge_hi)  # pixels beyond the edge count as the edge's
        if hi_tap - lo_tap > weights.shape[1]:
            raise ValueError("resample tables too small for this window; make them with table_arrays")
        for t in range(hi_tap - lo_tap):
            weights[k, t] = 0.0
        total = 0.0
        for j in range(j0, j1):
            w = max(1.0 - abs(j + 0.5 - centre) / scale, 0.0)
            weights[k, min(max(j, edge_lo), edge_hi - 1) - lo_tap] += w
            total += w
        for t in range(hi_tap - lo_tap):
            weights[k, t] = np.float32(weights[k, t] / total)
        first[k], count[k] = lo_tap, hi_tap - lo_tap


@njit(cache=True)
def resample_hwc_to_chw(src, x0, y0, x1, y1, flip, inside, out, first, count, weights, work):
    """Samples of ``src`` uint8 [H, W, C] (C-contiguous) in the window (x0, y0, x1, y1) -> ``out``
    uint8 [C, S, S], by the module docstring's rule (``inside``: read only the window's pixels);
    ``first, count, weights, work``: table_arrays.

    The two passes' order: the module docstring.
    """
    height, width, channels = src.shape
    size = out.shape[1]
    if first.shape[1] < size:
        raise ValueError("resample tables too small for this output; make them with table_arrays")
    _axis_taps(x0, x1, width, size, flip, inside, first[0], count[0], weights[0])
    _axis_taps(y0, y1, height, size, False, inside, first[1], count[1], weights[1])
    col_lo, col_hi = width, 0
    for ox in range(size):
        col_lo = min(col_lo, first[0, ox])
        col_hi = max(col_hi, first[0, ox] + count[0, ox])
    a, b = col_lo * channels, col_hi * channels
    if max(b - a, 2 * size * channels) > work.shape[0]:
        raise ValueError("resample tables too small for this image; make them with table_arrays")
    rows = src.reshape(height, width * channels)
    xf, xn, xw = first[0], count[0], weights[0]
    if _most(count[1], size) <= 2:  # upsampling vertically: horizontal pass first, once per source row
        _rows_then_blend(rows, a, b, col_lo, channels, xf, xn, xw, first[1], count[1], weights[1], work, out)
        return
    line = work[: b - a]  # the window's columns after the vertical taps
    for oy in range(size):
        r0, n = first[1, oy], count[1, oy]
        w0, top = weights[1, oy, 0], rows[r0, a:b]
        for j in range(line.shape[0]):
            line[j] = w0 * np.float32(top[j])
        for t in range(1, n):
            w, more = weights[1, oy, t], rows[r0 + t, a:b]
            for j in range(line.shape[0]):
                line[j] += w * np.float32(more[j])
        _horizontal(line, xf, xn, xw, col_lo, channels, out, oy)


@njit(cache=True, inline="always")
def _most(counts, size):
    most = 0
    for k in range(size):
        most = max(most, counts[k])
    return most


@njit(cache=True)
def _rows_then_blend(rows, a, b, col_lo, channels, xf, xn, xw, yf, yn, yw, work, out):
    """The upsampling order: source row r resampled horizontally into a planar float32 row
    (channel-major, ``size`` per channel) held in one of two slots of ``work``; output row oy
    blends its (at most two) rows. Output rows move down monotonically, so each source row is
    resampled once."""
    size = out.shape[1]
    span = size * channels
    slots = work[: 2 * span].reshape(2, channels, size)
    held = np.full(2, -1, np.int64)  # source row in each slot
    zero, full = np.float32(0.0), np.float32(255.0)
    for oy in range(size):
        r0, n = yf[oy], yn[oy]
        for t in range(n):
            r = r0 + t
            if held[r % 2] != r:
                _horizontal_planar(rows[r, a:b], xf, xn, xw, col_lo, channels, slots[r % 2])
                held[r % 2] = r
        top, w0 = slots[r0 % 2], yw[oy, 0]
        if n == 1:
            for c in range(channels):
                src, dst = top[c], out[c, oy]
                for ox in range(size):
                    dst[ox] = np.uint8(min(max(np.rint(w0 * src[ox]), zero), full))
        else:
            bottom, w1 = slots[(r0 + 1) % 2], yw[oy, 1]
            for c in range(channels):
                s0, s1, dst = top[c], bottom[c], out[c, oy]
                for ox in range(size):
                    dst[ox] = np.uint8(min(max(np.rint(w0 * s0[ox] + w1 * s1[ox]), zero), full))


@njit(cache=True, inline="always")
def _horizontal_planar(pixels, xf, xn, xw, col_lo, channels, dst):
    """One source row's window columns (uint8, interleaved) -> dst float32 [C, size] by the
    horizontal taps, unrounded."""
    size = dst.shape[1]
    if channels == 3:
        for ox in range(size):
            base = (xf[ox] - col_lo) * 3
            r, g, b = np.float32(0.0), np.float32(0.0), np.float32(0.0)
            for t in range(xn[ox]):
                w = xw[ox, t]
                r += w * np.float32(pixels[base])
                g += w * np.float32(pixels[base + 1])
                b += w * np.float32(pixels[base + 2])
                base += 3
            dst[0, ox], dst[1, ox], dst[2, ox] = r, g, b
        return
    for ox in range(size):
        base = (xf[ox] - col_lo) * channels
        for c in range(channels):
            acc = np.float32(0.0)
            for t in range(xn[ox]):
                acc += xw[ox, t] * np.float32(pixels[base + t * channels + c])
            dst[c, ox] = acc


@njit(cache=True, inline="always")
def _horizontal(line, xf, xn, xw, col_lo, channels, out, oy):
    """Output row ``oy``: each pixel gathers its horizontal taps from ``line`` (interleaved
    channels). The common channel counts keep one accumulator per channel, so a tap's weight
    is read once and the loop carries no channel index: about 3x faster than the general loop."""
    zero, full = np.float32(0.0), np.float32(255.0)
    size = out.shape[2]
    if channels == 3:
        for ox in range(size):
            base = (xf[ox] - col_lo) * 3
            r, g, b = np.float32(0.0), np.float32(0.0), np.float32(0.0)
            for t in range(xn[ox]):
                w = xw[ox, t]
                r += w * line[base]
                g += w * line[base + 1]
                b += w * line[base + 2]
                base += 3
            out[0, oy, ox] = np.uint8(min(max(np.rint(r), zero), full))
            out[1, oy, ox] = np.uint8(min(max(np.rint(g), zero), full))
            out[2, oy, ox] = np.uint8(min(max(np.rint(b), zero), full))
    elif channels == 1:
        for ox in range(size):
            base = xf[ox] - col_lo
            acc = np.float32(0.0)
            for t in range(xn[ox]):
                acc += xw[ox, t] * line[base + t]
            out[0, oy, ox] = np.uint8(min(max(np.rint(acc), zero), full))
    else:
        for ox in range(size):
            base = (xf[ox] - col_lo) * channels
            for c in range(channels):
                acc = np.float32(0.0)
                for t in range(xn[ox]):
                    acc += xw[ox, t] * line[base + t * channels + c]
                out[c, oy, ox] = np.uint8(min(max(np.rint(acc), zero), full))


@njit(cache=True)
def crop_views_into(image, mask, window, flip, views_out, masks_out, mask_views, first, count, weights, work):
    """All views of one sample: image [H, W, 3] -> views_out [V, 3, S, S]; when ``masks_out`` has
    rows, the mask [M, M, 1] with the same windows and flips -> masks_out [V, 1, S, S] for the
    views with ``mask_views[v]`` (the others are zeroed). The last four: ``table_arrays``."""
    for v in range(window.shape[0]):
        x0, y0, x1, y1 = window[v, 0], window[v, 1], window[v, 2], window[v, 3]
        resample_hwc_to_chw(image, x0, y0, x1, y1, flip[v], False, views_out[v], first, count, weights, work)
        if masks_out.shape[0] > 0:
            if mask_views[v]:
                resample_hwc_to_chw(mask, x0, y0, x1, y1, flip[v], False, masks_out[v], first, count, weights, work)
            else:
                masks_out[v] = 0


@njit(cache=True)
def cut_patch_into(image, bg_rect, out, first, count, weights, work):
    """Background rectangle resized to ``out`` uint8 [3, P, P] from its own pixels only (no
    object pixel leaks in at its edge); zeros when it has no area."""
    if bg_rect[2] <= bg_rect[0] or bg_rect[3] <= bg_rect[1]:
        out[:] = 0
    else:
        resample_hwc_to_chw(image, bg_rect[0], bg_rect[1], bg_rect[2], bg_rect[3], False, True, out, first, count,
                            weights, work)
