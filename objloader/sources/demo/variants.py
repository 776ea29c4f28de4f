"""The Background Challenge (Xiao et al. 2021) variants of a val image: how much a model relies
on the background, BG-gap = acc(mixed_same) - acc(mixed_rand)."""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .backgrounds import _background
from .style import NUM_CLASSES, Style, _rng


def _bgchallenge_variants(seed: int, cls: int, k: int, img: np.ndarray, mask: np.ndarray, fg: np.ndarray,
                          pool: int, source: str, box: Sequence[int], res: int, style: Style):
    """(variant -> image, variant -> bg pool, variant -> bg source, tile strip (x, y, w, h)) of val
    image k of class ``cls`` (``img`` on a background of ``pool``, object ``fg`` where ``mask``,
    tight ``box``). Its own random stream, so the val image itself does not depend on it."""
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
    for v, v_pool in (("mixed_same", cls), ("mixed_rand", other + (other >= cls)), ("mixed_next", (cls + 1) % NUM_CLASSES)):
        bg, src = _background(brng, seed, v_pool, res, style.bg_scenes)
        variants[v] = np.where(mask[:, :, None], fg, bg)
        pools[v], sources[v] = v_pool, src
    return variants, pools, sources, (sx, sy, sw, sh)


def _largest_strip(box: Sequence[int], res: int) -> Tuple[int, int, int, int]:
    """The largest of the four full-width/height strips around a box: (x, y, w, h), maybe empty."""
    x, y, w, h = box
    strips = [(0, 0, res, y), (0, y + h, res, res - y - h), (0, 0, x, res), (x + w, 0, res - x - w, res)]
    return max(strips, key=lambda s: s[2] * s[3])  # first wins ties: deterministic
