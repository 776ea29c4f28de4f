"""Built-in demo data: procedural objects on class-biased backgrounds, with exact masks.

`generate_demo(out_dir)` writes, deterministically from `seed`:

    OUT/train/<class>/<id>.jpg + <id>.mask.png     ImageFolder, 9 classes, exact masks beside
    OUT/val/<class>/<id>.jpg + <id>.mask.png
    OUT/bgchallenge/<variant>/<class>/<id>.jpg      Background Challenge (Xiao et al. 2021)
                                                    variants of every val image, same ids
    OUT/multi/images/<id>.jpg + instances.json      2-4 objects per scene, COCO instances with
                                                    visible-mask RLE segmentations
    OUT/demo.json                                   marker, counts and per-image provenance

Why it looks like this: the method being demonstrated removes *background bias*, so the data
must carry one. Each class has its own pool of background sources (bundled scikit-image photos
and procedural texture families, disjoint between classes) and draws its backgrounds from it
with probability `bg_bias` (otherwise from another class's pool), as ImageNet classes do with
their habitats, while the objects themselves are learnable from shape and surface pattern (hue
is random for every class, so colour alone says nothing) and, with `variation`, every instance
has its own deformation and markings. The
Background Challenge variants then measure how much a model relies on the background:
BG-gap = acc(mixed_same) - acc(mixed_rand).

Every image's randomness derives from (seed, stream, class, index) through numpy's
SeedSequence, so the output is byte-identical for a seed, whatever the number of workers.
"""
from __future__ import annotations

import colorsys
import functools
import json
import math
import multiprocessing as mp
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from ..errors import ObjloaderError

# Label order = sorted names, which is what an ImageFolder reader gives.
CLASSES: Tuple[str, ...] = (
    "arrow", "bolt", "crescent", "cross", "gear", "heart", "ring", "star", "triangle",
)
assert list(CLASSES) == sorted(CLASSES)
NUM_CLASSES = len(CLASSES)

BGCHALLENGE_VARIANTS: Tuple[str, ...] = (
    "original", "only_bg_b", "only_bg_t", "no_fg", "only_fg", "mixed_same", "mixed_rand", "mixed_next",
)
# Variants that still contain the object get its exact mask beside them.
VARIANTS_WITH_MASK: Tuple[str, ...] = ("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next")

DEMO_KIND = "objloader-demo"
DEMO_VERSION = 2
MASK_SUFFIX = ".mask.png"
JPEG_QUALITY = 95

# Defaults: about half a minute on 2 idle cores (5 ms per train image, 14 ms per val image with
# its 8 Background Challenge variants, 11 ms per multi scene, per core), ~190 MB on disk.
DEFAULT_PER_CLASS_TRAIN = 600
DEFAULT_PER_CLASS_VAL = 100  # 900 per variant: BG-gap to about +-1.5 points
DEFAULT_N_MULTI = 1000
DEFAULT_RESOLUTION = 128

# Fraction of the image area a single object covers (before it is shrunk to fit the frame).
# Version 1 drew (0.10, 0.50); larger objects gave higher val top-1 in the recipe search
# (benchmarks/results/recipe_search.md), and ImageNet's objects are mostly large.
DEFAULT_OBJECT_AREA = (0.30, 0.70)
MULTI_AREA = (0.04, 0.16)
MULTI_MIN_VISIBLE = 0.4  # each instance keeps at least this fraction of itself visible

# How often a single-object image's background comes from its class's own pool (otherwise from
# another class's pool): the strength of the bias. A background alone then predicts the class
# about this often, as in ImageNet-9 (Xiao et al. 2021: 40-45 % of 9 classes from the background
# alone), instead of always, which leaves a linear probe no reason to look at the object.
DEFAULT_BG_BIAS = 0.5
# Strength of each object's own random deformation and markings (0 = only pose, scale, hue and
# pattern parameters vary). Real objects differ from instance to instance, so the object, not
# only its unique background, can tell one image from another. (It did not by itself make a
# 10-minute CPU MoCo run learn the objects: benchmarks/results/recipe_search.md.)
DEFAULT_VARIATION = 1.0
# Background scenes per pool: 0 = every image gets a fresh background (a random crop of a pool's
# photo or a new procedural texture); N > 0 = every background is one of N fixed scenes of its
# pool, photographed again and again like a camera trap's site, so the background tells images
# apart less (recipe search: it made the background more class-predictive instead; off by default).
DEFAULT_BG_SCENES = 0


@dataclass(frozen=True)
class Style:
    """How the single-object images are drawn (see the DEFAULT_* constants above)."""

    bg_bias: float = DEFAULT_BG_BIAS
    variation: float = DEFAULT_VARIATION
    object_area: Tuple[float, float] = DEFAULT_OBJECT_AREA
    bg_scenes: int = DEFAULT_BG_SCENES

# Independent random streams; part of every SeedSequence spawn key.
_STREAM = {"train": 1, "val": 2, "bgchallenge": 3, "multi": 4, "scene": 5}

# ----------------------------------------------------------------------------------------------
# Background pools
# ----------------------------------------------------------------------------------------------

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


@functools.lru_cache(maxsize=8)
def _unit_grid(res: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1), float32 [res, res] each."""
    c = (np.arange(res, dtype=np.float32) + 0.5) / res
    return np.meshgrid(c, c)


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    """One colour from HSV in [0, 1] as BGR float32 in [0, 255]."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return np.array([b, g, r], dtype=np.float32) * 255.0


def _random_colour(rng: np.random.Generator, s=(0.3, 0.9), v=(0.3, 0.95)) -> np.ndarray:
    return _hsv(rng.random(), rng.uniform(*s), rng.uniform(*v))


def _blend(t: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    """Per-pixel mix of two colours by t in [0, 1] -> float32 [H, W, 3]."""
    t = t[:, :, None]
    return c0 * (1.0 - t) + c1 * t


def _fbm(rng: np.random.Generator, res: int, base: int, octaves: int = 4) -> np.ndarray:
    """Fractal value noise in [0, 1]: bicubically upsampled random grids, halving per octave."""
    out = np.zeros((res, res), np.float32)
    amp, total, cells = 1.0, 0.0, base
    for _ in range(octaves):
        grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
        out += amp * cv2.resize(grid, (res, res), interpolation=cv2.INTER_CUBIC)
        total += amp
        amp *= 0.5
        cells *= 2
    out /= total
    lo, hi = float(out.min()), float(out.max())
    return (out - lo) / max(hi - lo, 1e-6)


def _soft_square(x: np.ndarray, sharp: float) -> np.ndarray:
    """sin wave pushed towards a square wave, in [0, 1]."""
    return 0.5 + 0.5 * np.tanh(sharp * np.sin(x))


def _rotated(xs: np.ndarray, ys: np.ndarray, angle: float) -> Tuple[np.ndarray, np.ndarray]:
    c, s = math.cos(angle), math.sin(angle)
    return xs * c + ys * s, -xs * s + ys * c


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


# ----------------------------------------------------------------------------------------------
# Objects: canonical shapes (contours in [-1, 1]^2, y down) and class-typical surface patterns
# ----------------------------------------------------------------------------------------------

Contours = List[Tuple[np.ndarray, int]]  # (points [N, 2], fill value 1 = object, 0 = hole)


def _circle(r: float, n: int = 72, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    a = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1)


def _shape_arrow(rng) -> Contours:
    hw, hh, neck = rng.uniform(0.14, 0.22), rng.uniform(0.42, 0.6), rng.uniform(0.0, 0.3)
    pts = [(-1, -hw), (neck, -hw), (neck, -hh), (1, 0), (neck, hh), (neck, hw), (-1, hw)]
    return [(np.array(pts, float), 1)]


def _shape_bolt(rng) -> Contours:
    pts = np.array([(-0.2, -1.0), (0.5, -1.0), (0.12, -0.22), (0.6, -0.22),
                    (-0.35, 1.0), (-0.08, 0.12), (-0.55, 0.12)], float)
    return [(pts + rng.uniform(-0.06, 0.06, pts.shape), 1)]


def _shape_crescent(rng) -> Contours:
    r2, d = rng.uniform(0.75, 0.92), rng.uniform(0.38, 0.6)
    return [(_circle(1.0), 1), (_circle(r2, cx=d, cy=rng.uniform(-0.1, 0.1)), 0)]


def _shape_cross(rng) -> Contours:
    w = rng.uniform(0.22, 0.34)
    pts = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    return [(np.array(pts, float), 1)]


def _shape_gear(rng) -> Contours:
    n = int(rng.integers(8, 13))
    root, pitch = rng.uniform(0.72, 0.82), 2 * math.pi / n
    pts = []
    for i in range(n):
        a = i * pitch
        for r, da in ((root, -0.27), (1.0, -0.15), (1.0, 0.15), (root, 0.27)):
            pts.append((r * math.cos(a + da * pitch), r * math.sin(a + da * pitch)))
    return [(np.array(pts), 1), (_circle(rng.uniform(0.2, 0.32)), 0)]


def _shape_heart(rng) -> Contours:
    t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], axis=1) / 16.5  # centred, about [-1, 1]
    pts[:, 0] *= rng.uniform(0.9, 1.1)
    return [(pts, 1)]


def _shape_ring(rng) -> Contours:
    return [(_circle(1.0), 1), (_circle(rng.uniform(0.5, 0.68)), 0)]


def _shape_star(rng) -> Contours:
    r_in = rng.uniform(0.38, 0.5)
    a = -math.pi / 2 + np.arange(10) * math.pi / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, r_in)
    return [(np.stack([r * np.cos(a), r * np.sin(a)], axis=1), 1)]


def _shape_triangle(rng) -> Contours:
    a = -math.pi / 2 + np.arange(3) * 2 * math.pi / 3 + rng.uniform(-0.12, 0.12, 3)
    pts = np.stack([np.cos(a), np.sin(a)], axis=1) + rng.uniform(-0.06, 0.06, (3, 2))
    pts[:, 1] += 0.2  # centre the triangle's area, not its circumcircle
    return [(pts, 1)]


# Surface patterns: t in [0, 1] from the object's own (canonical) coordinates u, v, so the
# pattern turns and scales with the object. Each class has its own kind of pattern.
def _pat_chevrons(u, v, rng):
    return _soft_square(2 * math.pi * rng.uniform(2, 3.5) * (u - np.abs(v)), rng.uniform(1.5, 4))


def _pat_hatch(u, v, rng):
    return _soft_square(2 * math.pi * rng.uniform(3, 5) * (u + v), rng.uniform(1.5, 4))


def _pat_craters(u, v, rng):
    res = u.shape[0]
    t = _fbm(rng, res, int(rng.integers(4, 8)), 2)
    return np.clip((t - 0.55) * 4, 0, 1)


def _pat_checker(u, v, rng):
    f = rng.uniform(2.5, 4)
    return ((np.floor(u * f) + np.floor(v * f)) % 2).astype(np.float32)


def _pat_grooves(u, v, rng):
    return 0.5 + 0.5 * np.sin(2 * math.pi * rng.uniform(5, 8) * np.hypot(u, v))


def _pat_polka(u, v, rng):
    f = rng.uniform(2.5, 4)
    fu, fv = (u * f) % 1.0 - 0.5, (v * f) % 1.0 - 0.5
    return (np.hypot(fu, fv) < rng.uniform(0.2, 0.32)).astype(np.float32)


def _pat_segments(u, v, rng):
    n = 2 * int(rng.integers(2, 5))
    ang = np.arctan2(v, u) + rng.uniform(0, math.pi)
    return _soft_square(n / 2 * ang, 6.0)


def _pat_radial(u, v, rng):
    return np.clip(np.hypot(u, v), 0, 1) ** rng.uniform(0.6, 1.6)


def _pat_bands(u, v, rng):
    return _soft_square(2 * math.pi * rng.uniform(2.5, 4) * v, rng.uniform(1.5, 4))


_SHAPES: Dict[str, Tuple[Callable, Callable]] = {
    "arrow": (_shape_arrow, _pat_chevrons),
    "bolt": (_shape_bolt, _pat_hatch),
    "crescent": (_shape_crescent, _pat_craters),
    "cross": (_shape_cross, _pat_checker),
    "gear": (_shape_gear, _pat_grooves),
    "heart": (_shape_heart, _pat_polka),
    "ring": (_shape_ring, _pat_segments),
    "star": (_shape_star, _pat_radial),
    "triangle": (_shape_triangle, _pat_bands),
}
assert set(_SHAPES) == set(CLASSES)


def _fill(contours: Contours, shape: Tuple[int, int], to_px: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Rasterise contours (holes drawn after their outline) into a uint8 0/1 mask."""
    mask = np.zeros(shape, np.uint8)
    for pts, value in contours:
        px = np.round(to_px(pts) * 16).astype(np.int32)  # 4 fractional bits: sub-pixel accuracy
        cv2.fillPoly(mask, [px], int(value), lineType=cv2.LINE_8, shift=4)
    return mask


_AREA_RASTER = 256  # raster side used to measure a canonical shape's area


def _canonical_area(contours: Contours) -> float:
    """Area of a canonical shape in [-1, 1]^2 units, measured on a fine raster (holes included)."""
    n = _AREA_RASTER
    half = n / 2.5  # [-1.25, 1.25] -> [0, n)
    mask = _fill(contours, (n, n), lambda p: p * half + n / 2 - 0.5)
    return float(mask.sum()) / (half * half)


def _densify(pts: np.ndarray, step: float = 0.12) -> np.ndarray:
    """A closed polygon with extra points along its edges (corners kept), so a smooth warp bends
    the edges instead of only moving the corners."""
    out = []
    for a, b in zip(pts, np.roll(pts, -1, axis=0)):
        n = max(1, int(math.ceil(np.hypot(*(b - a)) / step)))
        out.append(a + (b - a) * (np.arange(n) / n)[:, None])
    return np.concatenate(out)


def _deform(contours: Contours, rng: np.random.Generator, strength: float) -> Contours:
    """This instance's own shape: a smooth random displacement field (three plane waves in the
    canonical square) applied to every contour, amplitude about 0.1 * strength."""
    waves = [(rng.normal(size=2), rng.uniform(1.0, 2.5), rng.uniform(0, 2 * math.pi),
              rng.normal(0, 0.06 * strength, size=2)) for _ in range(3)]

    def warp(p):
        out = p.copy()
        for direction, freq, phase, amp in waves:
            out += np.sin(freq * (p @ (direction / np.linalg.norm(direction))) + phase)[:, None] * amp
        return out

    return [(warp(_densify(pts)), value) for pts, value in contours]


def _markings(u: np.ndarray, v: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """This instance's own markings, in [0, 1]: a few soft spots at random places on its body
    (canonical coordinates), like the patches that tell one animal from another of its kind."""
    out = np.zeros(u.shape, np.float32)
    if strength <= 0:
        return out
    for _ in range(int(rng.integers(1, 4))):
        cu, cv, r = rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6), rng.uniform(0.15, 0.35)
        ru = r * math.exp(rng.uniform(-0.4, 0.4))
        d = np.hypot((u - cu) / ru, (v - cv) / r)
        out = np.maximum(out, np.clip(1.5 - 1.5 * d, 0, 1) * min(strength, 1.0))
    return out


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


# ----------------------------------------------------------------------------------------------
# Helpers: encoding, boxes, RLE
# ----------------------------------------------------------------------------------------------

def _jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    return buf.tobytes()


def _png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    assert ok
    return buf.tobytes()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def tight_box(mask: np.ndarray) -> List[int]:
    """[x, y, w, h] of the set pixels (w, h in pixels, COCO convention)."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def rle_encode(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of rle_encode: bool [h, w]."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((w, h)).T


def _largest_strip(box: Sequence[int], res: int) -> Tuple[int, int, int, int]:
    """The largest of the four full-width/height strips around a box: (x, y, w, h), maybe empty."""
    x, y, w, h = box
    strips = [(0, 0, res, y), (0, y + h, res, res - y - h), (0, 0, x, res), (x + w, 0, res - x - w, res)]
    return max(strips, key=lambda s: s[2] * s[3])  # first wins ties: deterministic


def _rng(seed: int, stream: str, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM[stream], *key)))


# ----------------------------------------------------------------------------------------------
# Per-image tasks (run in worker processes; each writes its own files and returns provenance)
# ----------------------------------------------------------------------------------------------

def _background(rng: np.random.Generator, seed: int, pool: int, res: int, scenes: int):
    """A background of `pool`: fresh from `rng`, or one of the pool's `scenes` fixed scenes."""
    if scenes <= 0:
        return render_background(rng, pool, res)
    return render_background(_rng(seed, "scene", pool, int(rng.integers(scenes))), pool, res)


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


def _task_single(args) -> dict:
    root, seed, split, cls, k, idx, res, style = args
    img, mask, fg, pool, source = _single(seed, split, cls, k, res, style)
    name = CLASSES[cls]
    ident = f"{idx:06d}"
    rel = f"{split}/{name}/{ident}"
    jpg = _jpeg(img)
    _write(root / f"{rel}.jpg", jpg)
    _write(root / f"{rel}{MASK_SUFFIX}", _png(mask))
    box = tight_box(mask)
    record = {"id": ident, "file": f"{rel}.jpg", "mask": f"{rel}{MASK_SUFFIX}", "label": cls,
              "bg_pool": pool, "bg_source": source, "bbox": box, "area": int(mask.sum())}
    if split != "val":
        return {"split": split, "record": record}

    # Background Challenge variants of this val image (Xiao et al. 2021), same id.
    brng = _rng(seed, "bgchallenge", cls, k)
    x, y, w, h = box
    variants: Dict[str, np.ndarray] = {}
    pools: Dict[str, Optional[int]] = {}
    sources: Dict[str, Optional[str]] = {}
    black = np.zeros_like(img)

    only_bg_b = img.copy()
    only_bg_b[y:y + h, x:x + w] = 0
    only_bg_t = img.copy()
    sx, sy, sw, sh = _largest_strip(box, res)
    if sw * sh > 0:  # tile the box with the largest object-free strip of the same image
        patch = img[sy:sy + sh, sx:sx + sw]
        reps = (-(-h // sh), -(-w // sw), 1)
        only_bg_t[y:y + h, x:x + w] = np.tile(patch, reps)[:h, :w]
    else:
        only_bg_t[y:y + h, x:x + w] = 0
    variants["original"] = img
    variants["only_bg_b"] = only_bg_b
    variants["only_bg_t"] = only_bg_t
    variants["no_fg"] = np.where(mask[:, :, None], black, img)
    variants["only_fg"] = np.where(mask[:, :, None], fg, black)
    for v in ("original", "only_bg_b", "only_bg_t", "no_fg"):
        pools[v], sources[v] = pool, source
    pools["only_fg"], sources["only_fg"] = None, None

    # Mixed variants: the same foreground on a clean background from a chosen pool. The three
    # backgrounds come from the same sub-stream in a fixed order, so they are reproducible.
    other = int(brng.integers(NUM_CLASSES - 1))
    for v, pool in (("mixed_same", cls), ("mixed_rand", other + (other >= cls)), ("mixed_next", (cls + 1) % NUM_CLASSES)):
        bg, src = _background(brng, seed, pool, res, style.bg_scenes)
        variants[v] = np.where(mask[:, :, None], fg, bg)
        pools[v], sources[v] = pool, src

    png = _png(mask)
    for v in BGCHALLENGE_VARIANTS:
        vrel = f"bgchallenge/{v}/{name}/{ident}"
        _write(root / f"{vrel}.jpg", jpg if v == "original" else _jpeg(variants[v]))
        if v in VARIANTS_WITH_MASK:
            _write(root / f"{vrel}{MASK_SUFFIX}", png)
    bgc = {"id": ident, "label": cls, "bbox": box, "bg_pool": pools, "bg_source": sources,
           "tile_strip": [sx, sy, sw, sh]}
    return {"split": split, "record": record, "bgchallenge": bgc}


def _task_multi(args) -> dict:
    root, seed, idx, res, style = args
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
    ident = f"{idx:06d}"
    _write(root / "multi" / "images" / f"{ident}.jpg", _jpeg(img))
    anns = [{"category_id": c + 1, "bbox": tight_box(vis), "area": int(vis.sum()), "iscrowd": 0,
             "segmentation": rle_encode(vis)} for c, _, vis in objects]
    return {"split": "multi", "record": {"id": idx, "file_name": f"{ident}.jpg", "width": res, "height": res,
                                         "bg_pool": pool, "bg_source": source}, "annotations": anns}


def _run_task(task) -> dict:
    kind, args = task
    return _task_multi(args) if kind == "multi" else _task_single(args)


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one image per process; avoid oversubscribing the cores


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------

class DemoError(ObjloaderError, RuntimeError):
    """The demo cannot be written (bad option, output exists, ...)."""


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise DemoError(f"output {str(out)!r} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise DemoError(f"output directory {str(out)!r} exists and is not empty (use --overwrite to replace it)")


def generate_demo(
    out_dir,
    *,
    per_class_train: int = DEFAULT_PER_CLASS_TRAIN,
    per_class_val: int = DEFAULT_PER_CLASS_VAL,
    n_multi: int = DEFAULT_N_MULTI,
    resolution: int = DEFAULT_RESOLUTION,
    seed: int = 0,
    bg_bias: float = DEFAULT_BG_BIAS,
    variation: float = DEFAULT_VARIATION,
    object_area: Tuple[float, float] = DEFAULT_OBJECT_AREA,
    bg_scenes: int = DEFAULT_BG_SCENES,
    workers: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write the demo data set to `out_dir` (atomically) and return the contents of demo.json."""
    for name, value, minimum in (("per_class_train", per_class_train, 0), ("per_class_val", per_class_val, 0),
                                 ("n_multi", n_multi, 0), ("resolution", resolution, 16), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
            raise DemoError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if not 0.0 <= float(bg_bias) <= 1.0:
        raise DemoError(f"bg_bias is a probability in [0, 1], got {bg_bias!r}")
    if not 0.0 <= float(variation) <= 2.0:
        raise DemoError(f"variation must be in [0, 2], got {variation!r}")
    bg_bias, variation = float(bg_bias), float(variation)
    try:
        area = (float(object_area[0]), float(object_area[1]))
    except (TypeError, ValueError, IndexError):
        raise DemoError(f"object_area must be two numbers (min, max), got {object_area!r}") from None
    if not 0.0 < area[0] <= area[1] <= 0.9:
        raise DemoError(f"object_area must satisfy 0 < min <= max <= 0.9, got {object_area!r}")
    if not isinstance(bg_scenes, (int, np.integer)) or isinstance(bg_scenes, bool) or bg_scenes < 0:
        raise DemoError(f"bg_scenes must be an integer >= 0, got {bg_scenes!r}")
    style = Style(bg_bias, variation, area, int(bg_scenes))
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise DemoError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    _check_out(out, overwrite)

    # Generate next to the target and rename at the end, so OUT is either complete or absent.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for split in ("train", "val"):
            for name in CLASSES:
                (tmp / split / name).mkdir(parents=True)
        for v in BGCHALLENGE_VARIANTS:
            for name in CLASSES:
                (tmp / "bgchallenge" / v / name).mkdir(parents=True)
        (tmp / "multi" / "images").mkdir(parents=True)

        # Ids run class-major within a split; randomness is keyed by (split, class, k), so the
        # first k images of a class do not change when the per-class count does.
        tasks = []
        for split, per_class in (("train", per_class_train), ("val", per_class_val)):
            for c in range(NUM_CLASSES):
                for k in range(per_class):
                    tasks.append(("single", (tmp, seed, split, c, k, c * per_class + k, resolution, style)))
        tasks += [("multi", (tmp, seed, i + 1, resolution, style)) for i in range(n_multi)]

        results = _run_all(tasks, workers, progress)
        marker = _assemble(tmp, results, seed=seed, resolution=resolution, style=style,
                           per_class_train=per_class_train, per_class_val=per_class_val, n_multi=n_multi)

        if out.exists():
            shutil.rmtree(out) if any(out.iterdir()) else out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return marker


def _run_all(tasks: list, workers: int, progress: bool) -> List[dict]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="objloader-demo", unit="img", dynamic_ncols=True)
    results: List[dict] = []
    try:
        if workers == 1 or len(tasks) < 2:
            for t in tasks:
                results.append(_run_task(t))
                bar and bar.update()
        else:
            preload_photos()  # parent loads once; forked workers inherit the decoded photos
            with mp.get_context().Pool(min(workers, len(tasks)), initializer=_worker_init) as pool:
                # imap keeps task order, so the assembled json does not depend on scheduling.
                for r in pool.imap(_run_task, tasks, chunksize=4):
                    results.append(r)
                    bar and bar.update()
    finally:
        if bar is not None:
            bar.close()
    return results


def _assemble(root: Path, results: List[dict], **opts) -> dict:
    """Write multi/instances.json and demo.json from the task results (already in task order)."""
    images: Dict[str, list] = {"train": [], "val": [], "bgchallenge": [], "multi": []}
    coco_images, coco_anns = [], []
    for r in results:
        images[r["split"]].append(r["record"])
        if "bgchallenge" in r:
            images["bgchallenge"].append(r["bgchallenge"])
        if r["split"] == "multi":
            rec = r["record"]
            coco_images.append({k: rec[k] for k in ("id", "file_name", "width", "height")})
            for a in r["annotations"]:
                coco_anns.append({"id": len(coco_anns) + 1, "image_id": rec["id"], **a})
    coco = {
        "info": {"description": "objloader demo: multi-object scenes", "version": str(DEMO_VERSION)},
        "images": coco_images,
        "annotations": coco_anns,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }
    with open(root / "multi" / "instances.json", "w") as f:
        json.dump(coco, f, separators=(",", ":"))

    marker = {
        "kind": DEMO_KIND,
        "version": DEMO_VERSION,
        "seed": opts["seed"],
        "resolution": opts["resolution"],
        **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts["style"]).items()},
        "classes": list(CLASSES),
        "per_class": {"train": opts["per_class_train"], "val": opts["per_class_val"]},
        "counts": {
            "train": len(images["train"]),
            "val": len(images["val"]),
            "bgchallenge": len(images["bgchallenge"]),  # per variant
            "multi": len(coco_images),
            "multi_instances": len(coco_anns),
        },
        "bgchallenge_variants": list(BGCHALLENGE_VARIANTS),
        "bgchallenge_variants_with_mask": list(VARIANTS_WITH_MASK),
        "mask_suffix": MASK_SUFFIX,
        "background_pools": {name: list(BACKGROUND_POOLS[i]) for i, name in enumerate(CLASSES)},
        "images": images,
    }
    with open(root / "demo.json", "w") as f:
        f.write(_marker_text(marker))
    return marker


def _marker_text(marker: dict) -> str:
    """demo.json text: the header indented for reading, then one line per image record."""
    head = {k: v for k, v in marker.items() if k != "images"}
    text = json.dumps(head, indent=1)[:-2]  # drop the closing "\n}"
    splits = []
    for split, records in marker["images"].items():
        lines = ",\n".join("   " + json.dumps(r, separators=(",", ":")) for r in records)
        splits.append(f"  {json.dumps(split)}: [\n{lines}\n  ]" if records else f"  {json.dumps(split)}: []")
    return text + ',\n "images": {\n' + ",\n".join(splits) + "\n }\n}\n"
