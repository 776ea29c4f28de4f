"""COCO's segmentations as pixels: compressed and uncompressed RLE, and polygons rasterised as
pycocotools' ``annToMask`` does, pixel for pixel (tests compare with pycocotools).

Its own module so that a Sample (sources/base.py) can paint its ground truth in a build worker
without importing the COCO json reader (coco.py), which reads Samples: no import cycle.
"""
from __future__ import annotations

from typing import List

import numpy as np

from ..errors import SourceError


def decode_rle_string(s: str) -> List[int]:
    """Counts of COCO's compressed RLE: 6-bit chunks offset by 48, 5 value bits each, bit 5
    = more chunks follow, sign from bit 4 of the last chunk; from the third count on, each value
    is stored as a difference to the count two places before."""
    counts: List[int] = []
    p = 0
    while p < len(s):
        value, shift, more = 0, 0, True
        while more:
            if p == len(s):
                raise SourceError("compressed RLE counts end inside a value")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise SourceError(f"compressed RLE counts hold {s[p]!r}, outside '0'..'o'")
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and (c & 0x10):
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_counts(rle: dict) -> np.ndarray:
    """The runs of an RLE dict, checked to be non-negative and to cover its size exactly."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = decode_rle_string(counts.decode("latin-1") if isinstance(counts, bytes) else counts)
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 0).any():
        raise SourceError("RLE counts hold a negative run")
    if counts.sum() != h * w:
        raise SourceError(f"RLE counts sum to {counts.sum()}, expected {h}x{w}={h * w}")
    return counts


def rle_to_mask(rle: dict) -> np.ndarray:
    """bool [h, w] from an RLE dict; runs alternate 0/1 starting with 0, column-major order."""
    h, w = rle["size"]
    counts = rle_counts(rle)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T


def polygon_to_mask(poly, height: int, width: int) -> np.ndarray:
    """bool [height, width] of one polygon (flat [x0, y0, x1, y1, ...]) as the COCO API rasterises
    it (pycocotools' rleFrPoly), so masks and areas agree with every COCO-trained model's: a
    32x32 square covers 1024 pixels, not the 33x33 of a fill that includes the far edges.

    The outline is traced on a grid 5 times finer (coordinates rounded half up there); wherever
    it crosses a pixel-column centre, the first pixel centre at or below the crossing toggles
    inside/outside in column-major order, so a pixel is inside when its centre lies below an odd
    number of crossings of its column (even-odd rule, exact per column)."""
    scale = 5
    xy = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
    # C's (int)(v + .5): truncation toward zero, which differs from floor for negative coordinates.
    x = np.trunc(scale * xy[:, 0] + 0.5).astype(np.int64)
    y = np.trunc(scale * xy[:, 1] + 0.5).astype(np.int64)
    x, y = np.append(x, x[0]), np.append(y, y[0])  # closed
    us, vs = [], []
    for j in range(len(xy)):
        xs, xe, ys, ye = x[j], x[j + 1], y[j], y[j + 1]
        dx, dy = abs(xe - xs), abs(ye - ys)
        # Each edge is traced from its lower end, so the two polygons sharing an edge round it alike.
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        d = np.arange(max(dx, dy) + 1)
        t = max(dx, dy) - d if flip else d
        if dx >= dy:
            s = (ye - ys) / dx if dx else 0.0
            us.append(t + xs)
            vs.append(np.trunc(ys + s * t + 0.5).astype(np.int64))
        else:
            s = (xe - xs) / dy
            vs.append(t + ys)
            us.append(np.trunc(xs + s * t + 0.5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    step = np.flatnonzero(u[1:] != u[:-1]) + 1  # the trace moves to another fine column
    xd = (np.minimum(u[step], u[step - 1]) + 0.5) / scale - 0.5
    yd = (np.minimum(v[step], v[step - 1]) + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= width - 1)  # a pixel-column centre in the image
    rows = np.ceil(np.clip(yd[keep], 0, height)).astype(np.int64)
    toggles = np.bincount(xd[keep].astype(np.int64) * height + rows, minlength=height * width + 1)
    inside = (np.cumsum(toggles[:height * width]) % 2).astype(bool)
    return inside.reshape(width, height).T


def _paint(mask: np.ndarray, seg) -> None:
    """Set the pixels of one segmentation (polygons or RLE dict) to 255 in mask; an instance's
    polygons are united, as the COCO API merges them."""
    if isinstance(seg, dict):
        m = rle_to_mask(seg)
        if m.shape != mask.shape:
            raise SourceError(f"RLE size {list(m.shape)} differs from image size {list(mask.shape)}")
        mask[m] = 255
        return
    for poly in seg:  # polygons: list of flat [x0, y0, x1, y1, ...] lists
        if len(poly) >= 6:
            mask[polygon_to_mask(poly, *mask.shape)] = 255


def segments_to_mask(segments: list, height: int, width: int) -> np.ndarray:
    """uint8 [height, width], 255 where any instance segmentation covers the pixel."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for seg in segments:
        _paint(mask, seg)
    return mask


def instances_to_mask(instances: list, height: int, width: int, origin: str = "") -> np.ndarray:
    """segments_to_mask of read_coco's (annotation id, segmentation) pairs. Runs in build workers,
    so an error names the record (origin) and the annotation, to be counted against that record."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for ann_id, seg in instances:
        try:
            _paint(mask, seg)
        except SourceError as e:
            raise SourceError(f"{origin}: annotation {ann_id!r}: 'segmentation': {e}") from None
    return mask
