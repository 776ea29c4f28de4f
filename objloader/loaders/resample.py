"""numba twins of the reference geometry (objloader.augment.reference.crop_views / cut_bg_patch),
for engines that run compiled code per sample (FFCV). Tested against the reference.

Sampling rule (the reference's): output pixel (u, v) of an S x S view reads the unit-square point
    x = x0 + (u + 0.5) / S * (x1 - x0),   y = y0 + (v + 0.5) / S * (y1 - y0)
bilinearly, with source coordinates clamped to the image border, rounded to uint8. A flipped view
mirrors the sample points.
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


@njit(cache=True)
def resample_hwc_to_chw(src, x0, y0, x1, y1, flip, out):
    """Bilinear samples of ``src`` uint8 [H, W, C] in the window -> ``out`` uint8 [C, S, S]."""
    height, width, channels = src.shape
    size = out.shape[1]
    for oy in range(size):
        y = _source_coord(y0, y1, oy, size, height)
        ya = int(math.floor(y))
        yb = min(ya + 1, height - 1)
        fy = y - ya
        for ox in range(size):
            x = _source_coord(x0, x1, size - 1 - ox if flip else ox, size, width)
            xa = int(math.floor(x))
            xb = min(xa + 1, width - 1)
            fx = x - xa
            for c in range(channels):
                top = (1.0 - fx) * src[ya, xa, c] + fx * src[ya, xb, c]
                bottom = (1.0 - fx) * src[yb, xa, c] + fx * src[yb, xb, c]
                value = np.rint((1.0 - fy) * top + fy * bottom)
                out[c, oy, ox] = np.uint8(min(max(value, 0.0), 255.0))


@njit(cache=True)
def crop_views_into(image, mask, window, flip, views_out, masks_out, mask_views):
    """All views of one sample: image [H, W, 3] -> views_out [V, 3, S, S]; when ``masks_out`` has
    rows, the mask [M, M, 1] with the same windows and flips -> masks_out [V, 1, S, S] for the
    views with ``mask_views[v]`` (the others are zeroed)."""
    for v in range(window.shape[0]):
        x0, y0, x1, y1 = window[v, 0], window[v, 1], window[v, 2], window[v, 3]
        resample_hwc_to_chw(image, x0, y0, x1, y1, flip[v], views_out[v])
        if masks_out.shape[0] > 0:
            if mask_views[v]:
                resample_hwc_to_chw(mask, x0, y0, x1, y1, flip[v], masks_out[v])
            else:
                masks_out[v] = 0


@njit(cache=True)
def cut_patch_into(image, bg_rect, out):
    """Background rectangle resized to ``out`` uint8 [3, P, P]; zeros when it has no area."""
    if bg_rect[2] <= bg_rect[0] or bg_rect[3] <= bg_rect[1]:
        out[:] = 0
    else:
        resample_hwc_to_chw(image, bg_rect[0], bg_rect[1], bg_rect[2], bg_rect[3], False, out)
