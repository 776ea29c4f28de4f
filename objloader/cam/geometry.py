"""Mask geometry: soft object mask -> object boxes and background rectangle.

Shared by objloader-build (which bakes ``boxes`` / ``n_boxes`` / ``bg_rect`` into every record)
and ContraCAM / the localisation metrics. Everything here is numpy in, numpy out.

Conventions (see DESIGN.md, "Record schema"):

* A mask is a 2-D ``[H, W]`` array: a soft uint8 mask in [0, 255] (any integer dtype is read on
  that scale) or a bool mask (True = object, read as 255).
* A pixel is *foreground* when ``value >= threshold * 255`` and *background* otherwise, in every
  function, so boxes and background rectangles never disagree about a pixel.
* Boxes are float32 ``(x0, y0, x1, y1)`` normalised to [0, 1] on pixel *edges*: a run of pixels
  covering columns ``a .. b`` (inclusive) of a width-``W`` mask is ``x0 = a / W, x1 = (b + 1) / W``.
  Because they are normalised, a mask of any resolution stays aligned with its image.
* "No background" is a zero-area rectangle (all zeros).
"""

from __future__ import annotations

import cv2
import numpy as np
from numba import njit

__all__ = [
    "mask_to_boxes",
    "pad_boxes",
    "largest_empty_rect",
    "strip_bg_rect",
    "bg_rect",
    "box_iou",
    "BG_RECT_METHODS",
]

BG_RECT_METHODS = ("maxrect", "strip")


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _as_mask(mask) -> np.ndarray:
    """Validate a mask and return it as a 2-D array on the [0, 255] scale."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {m.shape}")
    if m.dtype == np.bool_:
        return np.where(m, 255, 0).astype(np.uint8)
    if not np.issubdtype(m.dtype, np.integer):
        # A float mask could be on [0, 1] or on [0, 255]; guessing would silently move the
        # threshold by a factor of 255, so the caller has to convert.
        raise TypeError(
            f"mask must be uint8 in [0, 255] or bool, got dtype {m.dtype}; "
            "convert float masks with e.g. (m * 255).round().astype(np.uint8)"
        )
    return m


def _foreground(mask, threshold: float) -> np.ndarray:
    """Binarise: True where ``value >= threshold * 255``."""
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    m = _as_mask(mask)
    # Compared on the 0..255 scale, not m / 255 >= threshold: no per-pixel division, and
    # k / 255 * 255 == k exactly in float64 for every k, so a threshold of k / 255 keeps k.
    return m >= threshold * 255.0


def _normalise(x0, y0, x1, y1, w: int, h: int) -> np.ndarray:
    return np.array([x0 / w, y0 / h, x1 / w, y1 / h], dtype=np.float32)


# --------------------------------------------------------------------------------------------
# object boxes
# --------------------------------------------------------------------------------------------


def mask_to_boxes(
    mask,
    *,
    threshold: float = 0.5,
    max_boxes: int = 8,
    min_area_frac: float = 0.01,
    margin: float = 0.0,
) -> np.ndarray:
    """Object boxes of a mask, one per connected foreground region.

    The mask is binarised at ``threshold * 255``; each external contour (an 8-connected
    foreground component, holes included) whose enclosed area is at least ``min_area_frac`` of
    the image gives its bounding rectangle, grown by ``margin`` times the box's width / height
    on each side and clipped to the image. Boxes are sorted by enclosed area, largest first
    (ties: top-most, then left-most), and at most ``max_boxes`` are kept.

    Returns float32 ``[n, 4]`` normalised ``(x0, y0, x1, y1)``; ``[0, 4]`` when no region is left.
    """
    if max_boxes < 0:
        raise ValueError(f"max_boxes must be >= 0, got {max_boxes}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    fg = _foreground(mask, threshold)
    h, w = fg.shape
    if fg.size == 0 or max_boxes == 0 or not fg.any():
        return np.zeros((0, 4), np.float32)

    binary = np.ascontiguousarray(fg, dtype=np.uint8)
    # [-2] picks the contour list under both the OpenCV 3 and the OpenCV 4 return signatures.
    contours = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)[-2]
    min_area = float(min_area_frac) * h * w

    found = []  # (area, y, x, w, h)
    for contour in contours:
        x, y, bw, bh = cv2.boundingRect(contour)
        if bw * bh < min_area:
            continue  # the enclosed area is at most the box's: skip the fill (noisy masks)
        # Enclosed pixel count: fill the contour inside its own bounding box. cv2.contourArea
        # would measure the polygon through pixel centres (0 for a single pixel, too small for
        # thin shapes), which is not what "fraction of the image" should mean.
        region = np.zeros((bh, bw), np.uint8)
        cv2.drawContours(region, [contour], 0, 1, thickness=cv2.FILLED, offset=(-x, -y))
        area = int(np.count_nonzero(region))
        if area >= min_area:
            found.append((area, y, x, bw, bh))

    # Largest first; the position tie-break keeps the order independent of OpenCV's scan order.
    found.sort(key=lambda t: (-t[0], t[1], t[2]))
    found = found[:max_boxes]

    boxes = np.zeros((len(found), 4), np.float32)
    for i, (_, y, x, bw, bh) in enumerate(found):
        dx, dy = margin * bw, margin * bh
        x0, x1 = max(x - dx, 0.0), min(x + bw + dx, float(w))
        y0, y1 = max(y - dy, 0.0), min(y + bh + dy, float(h))
        boxes[i] = _normalise(x0, y0, x1, y1, w, h)
    return boxes


def pad_boxes(boxes, k: int) -> tuple[np.ndarray, int]:
    """Zero-pad (or truncate) boxes to the fixed-size record field: ``(float32 [k, 4], n)``.

    ``n = min(len(boxes), k)``; rows ``n:`` are zeros. Boxes from :func:`mask_to_boxes` are
    sorted largest first, so truncation keeps the largest objects.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    n = min(len(b), k)
    out = np.zeros((k, 4), np.float32)
    out[:n] = b[:n]
    return out, n


# --------------------------------------------------------------------------------------------
# background rectangle
# --------------------------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def _max_rect(bg):
    """Largest all-ones rectangle of a uint8 [H, W] array, as (area, x0, y0, x1, y1) in pixels.

    Row by row, ``heights[x]`` is the number of consecutive ones ending at this row in column x;
    the largest rectangle whose bottom edge is this row is the largest rectangle under that
    histogram, found in O(W) with a stack of columns of increasing height. O(HW) overall.
    The first rectangle of maximal area in scan order wins (strict ``>``), so ties are
    deterministic.
    """
    h, w = bg.shape
    heights = np.zeros(w + 1, np.int64)  # heights[w] stays 0: a sentinel that empties the stack
    stack = np.empty(w + 1, np.int64)
    best = 0
    bx0 = by0 = bx1 = by1 = 0
    for y in range(h):
        for x in range(w):
            if bg[y, x]:
                heights[x] += 1
            else:
                heights[x] = 0
        top = 0
        for x in range(w + 1):
            cur = heights[x]
            # Every column popped here cannot extend further right than x - 1; the column under
            # it on the stack is the first lower one to its left, so its bar spans (left, x).
            while top > 0 and heights[stack[top - 1]] >= cur:
                bar = heights[stack[top - 1]]
                top -= 1
                left = stack[top - 1] + 1 if top > 0 else 0
                area = bar * (x - left)
                if area > best:
                    best = area
                    bx0, bx1 = left, x
                    by0, by1 = y + 1 - bar, y + 1
            stack[top] = x
            top += 1
    return best, bx0, by0, bx1, by1


def largest_empty_rect(mask, *, threshold: float = 0.2) -> np.ndarray:
    """Largest-area axis-aligned rectangle made only of background pixels (``< threshold*255``).

    Exact, O(HW) (maximal-rectangle algorithm, compiled with numba). Returns float32 ``[4]``
    normalised ``(x0, y0, x1, y1)``; zeros when the mask has no background pixel. Among equal
    areas the rectangle whose bottom edge is highest wins, then the left-most one.
    """
    bg = ~_foreground(mask, threshold)
    h, w = bg.shape
    if bg.size == 0:
        return np.zeros(4, np.float32)
    area, x0, y0, x1, y1 = _max_rect(np.ascontiguousarray(bg, dtype=np.uint8))
    if area == 0:
        return np.zeros(4, np.float32)
    return _normalise(x0, y0, x1, y1, w, h)


def strip_bg_rect(mask, *, threshold: float = 0.2) -> np.ndarray:
    """Background rectangle as in the paper's public reference code: the largest strip outside
    the foreground's bounding box.

    The foreground (``>= threshold*255``) box ``[fx0, fx1) x [fy0, fy1)`` leaves four strips:
    left ``[0, fx0)`` and right ``[fx1, W)`` at full height, top ``[0, fy0)`` and bottom
    ``[fy1, H)`` at full width. The largest one is returned (ties: left, right, top, bottom).
    No foreground: the whole image ``[0, 0, 1, 1]``. Foreground box = whole image: zeros.
    """
    fg = _foreground(mask, threshold)
    h, w = fg.shape
    if fg.size == 0:
        return np.zeros(4, np.float32)
    cols = np.flatnonzero(fg.any(axis=0))
    if cols.size == 0:
        return np.array([0, 0, 1, 1], np.float32)
    rows = np.flatnonzero(fg.any(axis=1))
    fx0, fx1 = int(cols[0]), int(cols[-1]) + 1
    fy0, fy1 = int(rows[0]), int(rows[-1]) + 1

    # (area, x0, y0, x1, y1) in tie order: max() returns the first maximal element.
    strips = [
        (fx0 * h, 0, 0, fx0, h),  # left
        ((w - fx1) * h, fx1, 0, w, h),  # right
        (w * fy0, 0, 0, w, fy0),  # top
        (w * (h - fy1), 0, fy1, w, h),  # bottom
    ]
    area, x0, y0, x1, y1 = max(strips, key=lambda s: s[0])
    if area == 0:
        return np.zeros(4, np.float32)
    return _normalise(x0, y0, x1, y1, w, h)


def bg_rect(mask, method: str = "maxrect", threshold: float = 0.2) -> np.ndarray:
    """Background rectangle of a mask by ``method``: ``"maxrect"`` (:func:`largest_empty_rect`,
    the default) or ``"strip"`` (:func:`strip_bg_rect`, the reference code's variant)."""
    if method == "maxrect":
        return largest_empty_rect(mask, threshold=threshold)
    if method == "strip":
        return strip_bg_rect(mask, threshold=threshold)
    expected = ", ".join(map(repr, BG_RECT_METHODS))
    raise ValueError(f"unknown bg_rect method {method!r}; expected one of {expected}")


# --------------------------------------------------------------------------------------------
# metrics helper
# --------------------------------------------------------------------------------------------


def box_iou(a, b) -> np.ndarray:
    """Pairwise IoU of normalised boxes: ``[N, 4] x [M, 4] -> float32 [N, M]``.

    Degenerate (inverted) boxes count as zero area; two zero-area boxes have IoU 0.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    # Division only where the union is non-empty: avoids 0/0 warnings for degenerate pairs.
    iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    return iou.astype(np.float32)
