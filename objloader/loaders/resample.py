"""numba twins of the reference geometry (objloader.augment.reference.crop_views / cut_bg_patch),
for engines that run compiled code per sample (FFCV). Tested against the reference.

Sampling rule (the reference's): output pixel (u, v) of an S x S view reads the unit-square point
    x = x0 + (u + 0.5) / S * (x1 - x0),   y = y0 + (v + 0.5) / S * (y1 - y0)
bilinearly, with source coordinates clamped to the image border, rounded to uint8. A flipped view
mirrors the sample points.

Speed: the source columns and weights of an output row are the same for every row, so they are
computed once per window into caller-owned tables (``table_arrays``), and each source row is
interpolated along x once; the inner loop is then a contiguous lerp, in float32 like the
reference's grid_sample.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def _source_coord(lo, hi, k, size, extent):
    """Pixel-space coordinate of output sample k along one axis, clamped to the border."""
    p = (lo + (k + 0.5) / size * (hi - lo)) * extent - 0.5
    return min(max(p, 0.0), extent - 1.0)


def table_arrays(size: int, channels: int = 3):
    """Fresh scratch tables for outputs up to ``size`` px wide with up to ``channels`` channels:
    ``columns`` int32 [2, size] and ``work`` float32 [1 + 2 * channels, size]."""
    return np.empty((2, size), np.int32), np.empty((1 + 2 * channels, size), np.float32)


@njit(cache=True, inline="always")
def _horizontal_pass(src_row, left, right, weights, work, base, size):
    """work[base + c, :size] = source row ``src_row`` [W, C] sampled at the output columns."""
    one = np.float32(1.0)
    for ox in range(size):
        xa, xb, fx = left[ox], right[ox], weights[ox]
        for c in range(src_row.shape[1]):
            work[base + c, ox] = (one - fx) * np.float32(src_row[xa, c]) + fx * np.float32(src_row[xb, c])


@njit(cache=True)
def resample_hwc_to_chw(src, x0, y0, x1, y1, flip, out, columns, work):
    """Bilinear samples of ``src`` uint8 [H, W, C] in the window -> ``out`` uint8 [C, S, S].

    Separable: a source row is interpolated along x once into ``work`` and kept while
    consecutive output rows read it (when a window is upsampled, most do), then each output row
    is a contiguous lerp of two such rows. Same formula as the reference, in float32.
    """
    height, width, channels = src.shape
    size = out.shape[1]
    if columns.shape[1] < size or work.shape[1] < size or work.shape[0] < 1 + 2 * channels:
        raise ValueError("resample tables too small for this output; make them with table_arrays")
    left, right, weights = columns[0], columns[1], work[0]
    for ox in range(size):
        x = _source_coord(x0, x1, size - 1 - ox if flip else ox, size, width)
        xa = int(math.floor(x))
        left[ox] = xa
        right[ox] = min(xa + 1, width - 1)
        weights[ox] = np.float32(x - xa)
    one = np.float32(1.0)
    # The two row buffers start at work rows 1 and 1 + C; ``held`` says which source row each holds.
    base_a, base_b = 1, 1 + channels
    held_a, held_b = -1, -1
    for oy in range(size):
        y = _source_coord(y0, y1, oy, size, height)
        ya = int(math.floor(y))
        yb = min(ya + 1, height - 1)
        fy = np.float32(y - ya)
        if held_a != ya:
            if held_b == ya:  # the previous bottom row is this top row: swap the buffers
                base_a, base_b, held_a, held_b = base_b, base_a, held_b, held_a
            else:
                _horizontal_pass(src[ya], left, right, weights, work, base_a, size)
                held_a = ya
        if held_b != yb:
            _horizontal_pass(src[yb], left, right, weights, work, base_b, size)
            held_b = yb
        for c in range(channels):
            top, bottom, dst = work[base_a + c], work[base_b + c], out[c, oy]
            for ox in range(size):
                value = np.rint((one - fy) * top[ox] + fy * bottom[ox])
                dst[ox] = np.uint8(min(max(value, np.float32(0.0)), np.float32(255.0)))


@njit(cache=True)
def crop_views_into(image, mask, window, flip, views_out, masks_out, mask_views, columns, work):
    """All views of one sample: image [H, W, 3] -> views_out [V, 3, S, S]; when ``masks_out`` has
    rows, the mask [M, M, 1] with the same windows and flips -> masks_out [V, 1, S, S] for the
    views with ``mask_views[v]`` (the others are zeroed). ``columns``/``work``: ``table_arrays``."""
    for v in range(window.shape[0]):
        x0, y0, x1, y1 = window[v, 0], window[v, 1], window[v, 2], window[v, 3]
        resample_hwc_to_chw(image, x0, y0, x1, y1, flip[v], views_out[v], columns, work)
        if masks_out.shape[0] > 0:
            if mask_views[v]:
                resample_hwc_to_chw(mask, x0, y0, x1, y1, flip[v], masks_out[v], columns, work)
            else:
                masks_out[v] = 0


@njit(cache=True)
def cut_patch_into(image, bg_rect, out, columns, work):
    """Background rectangle resized to ``out`` uint8 [3, P, P]; zeros when it has no area."""
    if bg_rect[2] <= bg_rect[0] or bg_rect[3] <= bg_rect[1]:
        out[:] = 0
    else:
        resample_hwc_to_chw(image, bg_rect[0], bg_rect[1], bg_rect[2], bg_rect[3], False, out, columns, work)
