"""What a seed produces: the classes, the Background Challenge variants, the file conventions,
the defaults of every option (Style) and the random streams every image draws from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

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


def _rng(seed: int, stream: str, *key: int) -> np.random.Generator:
    """The generator of one image (or scene): keyed by (seed, stream, class, index, ...), so an
    image never depends on which worker draws it, or on how many images come before it."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_STREAM[stream], *key)))
