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

Modules, in the order an image is made: style (classes, defaults, Style, random streams),
texture (colours and noise), backgrounds (the class pools), shapes (class shapes and patterns,
per-instance deformation), render (objects placed into images and scenes), variants (the
Background Challenge), files (encodings, instances.json, demo.json), generate (tasks, workers,
generate_demo).
"""
# What other code imports from objloader.sources.demo: the CLI (defaults, default_workers,
# generate_demo), the trainer and benchmarks (generate_demo), tests (DemoError, Style, rle_*,
# BGCHALLENGE_VARIANTS, and the internals _single, _SHAPES, _deform, _fill of tests/test_demo.py).
from .files import rle_decode, rle_encode
from .generate import RANGES, DemoError, default_workers, generate_demo
from .render import _single  # noqa: F401  (tests)
from .shapes import _SHAPES, _deform, _fill  # noqa: F401  (tests)
from .style import (BGCHALLENGE_VARIANTS, DEFAULT_BG_BIAS, DEFAULT_BG_SCENES, DEFAULT_N_MULTI, DEFAULT_OBJECT_AREA, DEFAULT_PER_CLASS_TRAIN,
                    DEFAULT_PER_CLASS_VAL, DEFAULT_RESOLUTION, DEFAULT_VARIATION, Style)

__all__ = [
    "generate_demo", "default_workers", "DemoError", "RANGES", "Style", "rle_encode", "rle_decode",
    "DEFAULT_PER_CLASS_TRAIN", "DEFAULT_PER_CLASS_VAL", "DEFAULT_N_MULTI", "DEFAULT_RESOLUTION",
    "DEFAULT_BG_BIAS", "DEFAULT_VARIATION", "DEFAULT_OBJECT_AREA", "DEFAULT_BG_SCENES", "BGCHALLENGE_VARIANTS",
]
