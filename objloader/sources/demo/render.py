"""Composing images: one object placed in a frame (render_object), a single-object image on
its (biased) background, and a multi-object scene."""
from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np

from .backgrounds import _background
from .shapes import _SHAPES, _canonical_area, _deform, _fill, _markings
from .style import (CLASSES, DEFAULT_VARIATION, MULTI_AREA, MULTI_MIN_VISIBLE, NUM_CLASSES, Style,
                    _rng)
from .texture import _blend, _hsv


def render_object(rng: np.random.Generator, cls: int, res: int, area: Tuple[float, float],
                  variation: float = DEFAULT_VARIATION):
    """One object of class `cls` placed in a res x res frame.

    Returns (colour BGR float32 [res, res, 3] valid where the mask is set, mask bool [res, res]).
    Random rotation, scale (target area fraction drawn from `area`, shrunk if the object would
    not fit), aspect jitter, position, hue, pattern parameters and shading; with ``variation``
    > 0 also the instance's own deformation of the class shape and its own markings.
    """
    shape_fn, pattern_fn = _SHAPES[CLASSES[cls]]
    contours = shape_fn(rng)
    if variation > 0:
        contours = _deform(contours, rng, variation)
    theta = rng.uniform(0, 2 * math.pi)
    aspect = math.exp(rng.uniform(math.log(0.8), math.log(1.25)))
    ca, sa = math.cos(theta), math.sin(theta)
    lin = np.array([[ca, -sa], [sa, ca]]) @ np.diag([aspect, 1 / aspect])  # area-preserving
    scale = math.sqrt(rng.uniform(*area) * res * res / _canonical_area(contours))

    outline = np.concatenate([p for p, v in contours if v]) @ lin.T
    extent = outline.max(0) - outline.min(0)
    scale = min(scale, 0.96 * (res - 1) / float(extent.max()))  # elongated shapes shrink to fit
    lo, hi = outline.min(0) * scale, outline.max(0) * scale
    # Pixel centres are at integer coordinates; keep the whole object inside [0, res-1].
    shift = np.array([rng.uniform(-lo[0], res - 1 - hi[0]), rng.uniform(-lo[1], res - 1 - hi[1])])
    mask = _fill(contours, (res, res), lambda p: (p @ lin.T) * scale + shift).astype(bool)

    # Canonical coordinates of every pixel (inverse transform) for the surface pattern.
    ys, xs = np.mgrid[0:res, 0:res].astype(np.float32)
    inv = np.linalg.inv(lin) / scale
    px = np.stack([xs - shift[0], ys - shift[1]], axis=-1)
    uv = px @ inv.T.astype(np.float32)
    u, v = uv[..., 0], uv[..., 1]

    t = pattern_fn(u, v, rng).astype(np.float32)
    hue, sat, val = rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.6, 1.0)
    c0 = _hsv(hue, sat, val)
    if rng.random() < 0.3:  # sometimes a second hue, otherwise a darker shade of the first
        c1 = _hsv(hue + rng.uniform(0.25, 0.75), sat, val * rng.uniform(0.5, 0.9))
    else:
        c1 = _hsv(hue + rng.uniform(-0.05, 0.05), sat * rng.uniform(0.5, 1.0), val * rng.uniform(0.3, 0.6))
    colour = _blend(t, c0, c1)
    if variation > 0:
        spots = _markings(u, v, rng, variation)
        mark = _hsv(hue + rng.uniform(0.3, 0.7), sat, val * rng.uniform(0.2, 0.5))
        colour = colour * (1 - spots[:, :, None]) + mark * spots[:, :, None]
    # Mild shading: a light direction across the object, plus fine grain.
    phi = rng.uniform(0, 2 * math.pi)
    shade = 1.0 + rng.uniform(0.08, 0.22) * (u * math.cos(phi) + v * math.sin(phi))
    colour = colour * shade[:, :, None] + rng.normal(0, 3.0, colour.shape).astype(np.float32)
    return colour, mask


def _single(seed: int, split: str, cls: int, k: int, res: int, style: Style = Style()):
    """(image uint8, mask bool, fg colour, bg pool, bg source) of one single-object image."""
    rng = _rng(seed, split, cls, k)
    pool = cls  # biased on purpose: usually the class's own pool
    if rng.random() >= style.bg_bias:
        other = int(rng.integers(NUM_CLASSES - 1))
        pool = other + (other >= cls)
    bg, source = _background(rng, seed, pool, res, style.bg_scenes)
    colour, mask = render_object(rng, cls, res, style.object_area, style.variation)
    fg = np.clip(colour + 0.5, 0, 255).astype(np.uint8)
    img = np.where(mask[:, :, None], fg, bg)
    return img, mask, fg, pool, source


def _multi_scene(seed: int, idx: int, res: int, style: Style):
    """(image uint8 BGR, bg pool, bg source, [(class, full mask, visible mask)]) of multi-object
    scene ``idx``: 2-4 objects on a background of a random pool, each laid on top of the earlier
    ones only where every earlier object keeps enough of itself visible (30 tries per object)."""
    rng = _rng(seed, "multi", idx)
    pool = int(rng.integers(NUM_CLASSES))
    img, source = _background(rng, seed, pool, res, style.bg_scenes)
    n_target = int(rng.integers(2, 5))
    min_px = max(4, int(0.002 * res * res))
    objects: List[Tuple[int, np.ndarray, np.ndarray]] = []  # (class, full mask, visible mask)
    for _ in range(n_target):
        for _attempt in range(30):
            cls = int(rng.integers(NUM_CLASSES))
            colour, mask = render_object(rng, cls, res, MULTI_AREA, style.variation)
            # The new object goes on top; every earlier one must keep enough of itself visible.
            ok = all((vis & ~mask).sum() >= max(min_px, MULTI_MIN_VISIBLE * full.sum())
                     for _, full, vis in objects)
            if ok:
                for j, (c, full, vis) in enumerate(objects):
                    objects[j] = (c, full, vis & ~mask)
                objects.append((cls, mask, mask.copy()))
                img = np.where(mask[:, :, None], np.clip(colour + 0.5, 0, 255).astype(np.uint8), img)
                break
    return img, pool, source, objects
