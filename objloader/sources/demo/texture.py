"""Pixel-level building blocks shared by the backgrounds and the objects: colours, blends,
fractal noise and waves on the unit square."""
from __future__ import annotations

import colorsys
import functools
import math
from typing import Tuple

import cv2
import numpy as np


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
