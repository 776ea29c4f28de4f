"""Objects before placement: canonical class shapes (contours in [-1, 1]^2, y down), each
class's surface pattern, rasterising, and the per-instance deformation and markings."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Tuple

import cv2
import numpy as np

from .style import CLASSES
from .texture import _fbm, _soft_square

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
