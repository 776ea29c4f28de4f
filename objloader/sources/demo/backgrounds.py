"""Background pools: each class has its own bundled photos and procedural texture family
(disjoint between classes), which is what makes the background predict the class."""
from __future__ import annotations

import functools
import math
from typing import Callable, Dict, Tuple

import cv2
import numpy as np

from .style import NUM_CLASSES, _rng
from .texture import _blend, _fbm, _hsv, _random_colour, _rotated, _soft_square, _unit_grid

# Bundled scikit-image images (shipped inside the wheel, loaded offline). Chosen so that no two
# pools share a picture (skimage's `cat` is `chelsea`, so only one of them is used).
_PHOTOS = {
    "astronaut": "astronaut", "chelsea": "chelsea", "coffee": "coffee", "rocket": "rocket",
    "hubble": "hubble_deep_field", "ihc": "immunohistochemistry", "retina": "retina",
    "colorwheel": "colorwheel", "brick": "brick", "grass": "grass", "gravel": "gravel",
    "camera": "camera", "coins": "coins", "moon": "moon", "page": "page", "text": "text",
    "clock": "clock", "motorcycle": "stereo_motorcycle",
}

# One pool per class: two photos + one procedural family. Disjoint by construction.
BACKGROUND_POOLS: Tuple[Tuple[str, ...], ...] = (
    ("photo:astronaut", "photo:brick", "proc:stripes"),     # arrow
    ("photo:chelsea", "photo:grass", "proc:cells"),          # bolt
    ("photo:coffee", "photo:gravel", "proc:checker"),        # crescent
    ("photo:rocket", "photo:camera", "proc:dots"),           # cross
    ("photo:hubble", "photo:coins", "proc:noise"),           # gear
    ("photo:ihc", "photo:moon", "proc:waves"),               # heart
    ("photo:retina", "photo:page", "proc:gradient"),         # ring
    ("photo:motorcycle", "photo:text", "proc:camo"),         # star
    ("photo:colorwheel", "photo:clock", "proc:marble"),      # triangle
)
assert len(BACKGROUND_POOLS) == NUM_CLASSES
assert len({s for pool in BACKGROUND_POOLS for s in pool}) == sum(len(p) for p in BACKGROUND_POOLS)


@functools.lru_cache(maxsize=None)
def _photo(name: str) -> np.ndarray:
    """A bundled skimage image as BGR uint8 (cached per process)."""
    import skimage.data

    img = getattr(skimage.data, _PHOTOS[name])()
    if isinstance(img, tuple):  # stereo_motorcycle -> (left, right, disparity)
        img = img[0]
    img = np.asarray(img, dtype=np.uint8)  # every pool photo is 8-bit
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    img = np.ascontiguousarray(img[:, :, 2::-1])  # RGB(A) -> BGR
    return img


def preload_photos() -> None:
    """Load every pool photo once (in the parent, so forked workers share them)."""
    for name in _PHOTOS:
        _photo(name)


# Procedural background families. Each returns float32 BGR [res, res, 3] in [0, 255].
def _bg_stripes(rng, res):
    xs, ys = _unit_grid(res)
    u, _ = _rotated(xs, ys, rng.uniform(0, math.pi))
    t = _soft_square(2 * math.pi * rng.uniform(3, 10) * u + rng.uniform(0, 6.3), rng.uniform(1, 6))
    return _blend(t, _random_colour(rng), _random_colour(rng))


def _bg_checker(rng, res):
    xs, ys = _unit_grid(res)
    u, v = _rotated(xs, ys, rng.uniform(0, math.pi / 2))
    f = rng.uniform(3, 9)
    t = ((np.floor(u * f) + np.floor(v * f)) % 2).astype(np.float32)
    t = 0.15 + 0.7 * t + 0.15 * _fbm(rng, res, 6, 2)  # a little grain so it is not flat
    return _blend(t, _random_colour(rng), _random_colour(rng))


def _bg_gradient(rng, res):
    xs, ys = _unit_grid(res)
    if rng.random() < 0.5:
        u, _ = _rotated(xs - 0.5, ys - 0.5, rng.uniform(0, 2 * math.pi))
        t = np.clip(u + 0.5, 0, 1)
    else:
        cx, cy = rng.uniform(0, 1, 2)
        t = np.clip(np.hypot(xs - cx, ys - cy) / rng.uniform(0.6, 1.2), 0, 1)
    t = np.clip(t + 0.08 * (_fbm(rng, res, 4, 3) - 0.5), 0, 1)
    return _blend(t, _random_colour(rng), _random_colour(rng))


def _bg_cells(rng, res):
    xs, ys = _unit_grid(res)
    n = int(rng.integers(8, 26))
    pts = rng.random((n, 2), dtype=np.float32)
    d = (xs[:, :, None] - pts[:, 0]) ** 2 + (ys[:, :, None] - pts[:, 1]) ** 2
    order = np.sort(d, axis=2)
    nearest = np.argmin(d, axis=2)
    h0, spread = rng.random(), rng.uniform(0.05, 0.3)
    colours = np.stack([_hsv(h0 + spread * rng.standard_normal(), rng.uniform(0.3, 0.8), rng.uniform(0.4, 0.95))
                        for _ in range(n)])
    img = colours[nearest]
    edge = np.sqrt(order[:, :, 1]) - np.sqrt(order[:, :, 0])  # distance to the cell border
    img *= np.clip(edge * res / 2.0, 0.35, 1.0)[:, :, None]  # dark cell walls
    return img


def _bg_waves(rng, res):
    xs, ys = _unit_grid(res)
    acc = np.zeros((res, res), np.float32)
    for _ in range(4):
        u, _ = _rotated(xs, ys, rng.uniform(0, 2 * math.pi))
        acc += np.sin(2 * math.pi * rng.uniform(1, 5) * u + rng.uniform(0, 6.3))
    h0, span = rng.random(), rng.uniform(0.15, 0.5)
    hsv = np.empty((res, res, 3), np.float32)
    hsv[..., 0] = ((h0 + span * acc / 8.0) % 1.0) * 360.0  # float HSV: hue in degrees
    hsv[..., 1] = rng.uniform(0.4, 0.8)
    hsv[..., 2] = 0.55 + 0.35 * (0.5 + acc / 8.0)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR) * 255.0


def _bg_noise(rng, res):
    t = _fbm(rng, res, int(rng.integers(3, 8)), 4)
    c0, c1, c2 = _random_colour(rng), _random_colour(rng), _random_colour(rng)
    return np.where(t[:, :, None] < 0.5, _blend(2 * t, c0, c1), _blend(2 * t - 1, c1, c2))


def _bg_dots(rng, res):
    xs, ys = _unit_grid(res)
    u, v = _rotated(xs, ys, rng.uniform(0, math.pi / 2))
    f = rng.uniform(4, 10)
    fu, fv = (u * f) % 1.0 - 0.5, (v * f) % 1.0 - 0.5
    r = rng.uniform(0.15, 0.4)
    t = np.clip((r - np.hypot(fu, fv)) * f * res * 0.05 + 0.5, 0, 1)  # slightly soft dot edges
    return _blend(t, _random_colour(rng), _random_colour(rng))


def _bg_camo(rng, res):
    t = _fbm(rng, res, int(rng.integers(3, 6)), 3)
    cols = [_random_colour(rng, s=(0.2, 0.6)) for _ in range(3)]
    lo, hi = np.quantile(t, [0.33, 0.66])
    img = np.empty((res, res, 3), np.float32)
    img[:] = cols[0]
    img[t >= lo] = cols[1]
    img[t >= hi] = cols[2]
    return img


def _bg_marble(rng, res):
    xs, ys = _unit_grid(res)
    u, _ = _rotated(xs, ys, rng.uniform(0, math.pi))
    turb = _fbm(rng, res, int(rng.integers(2, 5)), 4)
    t = 0.5 + 0.5 * np.sin(2 * math.pi * (rng.uniform(2, 6) * u + rng.uniform(1.5, 4) * turb))
    t = t ** rng.uniform(0.5, 2.0)
    return _blend(t, _random_colour(rng, v=(0.6, 0.95)), _random_colour(rng, v=(0.2, 0.6)))


_PROCEDURAL: Dict[str, Callable] = {
    "stripes": _bg_stripes, "checker": _bg_checker, "gradient": _bg_gradient, "cells": _bg_cells,
    "waves": _bg_waves, "noise": _bg_noise, "dots": _bg_dots, "camo": _bg_camo, "marble": _bg_marble,
}


def _photo_crop(rng: np.random.Generator, name: str, res: int) -> np.ndarray:
    """A random square crop of a bundled photo, rescaled to res, with a little photometric jitter."""
    img = _photo(name)
    h, w = img.shape[:2]
    side = int(round(min(h, w) * rng.uniform(0.3, 1.0)))
    y = int(rng.integers(0, h - side + 1))
    x = int(rng.integers(0, w - side + 1))
    crop = img[y:y + side, x:x + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    out = cv2.resize(np.ascontiguousarray(crop), (res, res), interpolation=cv2.INTER_AREA).astype(np.float32)
    gain = rng.uniform(0.85, 1.15) * (1.0 + rng.uniform(-0.06, 0.06, 3)).astype(np.float32)  # colour cast
    return out * gain + rng.uniform(-12, 12)


def render_background(rng: np.random.Generator, pool: int, res: int) -> Tuple[np.ndarray, str]:
    """A clean (object-free) background from class `pool`'s pool: (uint8 BGR [res, res, 3], source)."""
    sources = BACKGROUND_POOLS[pool]
    source = sources[int(rng.integers(len(sources)))]
    kind, name = source.split(":", 1)
    img = _photo_crop(rng, name, res) if kind == "photo" else _PROCEDURAL[name](rng, res)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), source


def _background(rng: np.random.Generator, seed: int, pool: int, res: int, scenes: int):
    """A background of `pool`: fresh from `rng`, or one of the pool's `scenes` fixed scenes."""
    if scenes <= 0:
        return render_background(rng, pool, res)
    return render_background(_rng(seed, "scene", pool, int(rng.integers(scenes))), pool, res)
