"""The Background Challenge as Xiao et al. 2021 publish it ("Noise or Signal: The Role of Image
Backgrounds in Object Recognition", github.com/MadryLab/backgrounds_challenge).

Layout of the release (the IN-9 test sets) with the IN-9L training data unpacked beside it:

    ROOT/original/val/<class>/*.JPEG      ImageNet-9 test images (class folders 00_dog ... 08_fish)
    ROOT/<variant>/val/<class>/*.JPEG     the same images with foreground or background changed,
                                          for variant in only_bg_b, only_bg_t, no_fg, only_fg,
                                          mixed_same, mixed_rand, mixed_next
    ROOT/original/train/<class>/*.JPEG    IN-9L training images (optional)
    ROOT/fg_mask/val/<class>/*.npy        foreground masks of the challenge (not read here)

A directory is such a root when it holds `original/` and at least one other variant folder with
a `val/` folder. It becomes the same collection `objloader-build` makes of an objloader-demo
folder, so `objloader-linear --data OUT` reports it the same way:

    train                  original/train (only when present)
    val                    original/val
    bgchallenge/<variant>  <variant>/val, for each variant present (original included)

Only `original/train` is read as training data; a variant's own `train/` (the paper's training
sets) is not. Every dataset must have the classes of original/val (the sorted class folder
names, so class ids mean the same in every variant) and every image must be in a class folder;
otherwise the source is refused naming the variant and the classes that differ. A variant folder
without `val/` is refused rather than left out, so a report never silently lacks a variant.
The images have no masks: build with `--masks none` or `--masks contracam` (`--masks gt` falls
back to none and says so).
"""
from __future__ import annotations

import os
from typing import List, Optional

from ..errors import SourceError
from .base import SourceSpec
from .imagefolder import read_imagefolder

# The eight variants of Xiao et al. 2021, in the order of their paper's tables.
VARIANTS = ("original", "only_bg_b", "only_bg_t", "no_fg", "only_fg", "mixed_same", "mixed_rand", "mixed_next")


def is_bgchallenge_root(root: str) -> bool:
    """Whether `root` is laid out as the Background Challenge release (module docstring)."""
    return (os.path.isdir(os.path.join(root, "original"))
            and any(os.path.isdir(os.path.join(root, v, "val")) for v in VARIANTS[1:]))


def _spec(name: str, path: str, reference: Optional[List[str]] = None, follow_links: bool = False) -> SourceSpec:
    samples, classes = read_imagefolder(path, follow_links=follow_links)
    loose = [s.key for s in samples if s.label < 0]
    if loose:
        raise SourceError(f"{path!r}: {len(loose)} image(s) outside the class folders (e.g. {loose[0]!r}); "
                          "every Background-Challenge image needs its class")
    if reference is not None and classes != reference:
        missing = [c for c in reference if c not in classes]
        extra = [c for c in classes if c not in reference]
        detail = "; ".join(x for x in (f"missing {missing}" if missing else "", f"extra {extra}" if extra else "") if x)
        raise SourceError(f"{path!r}: its classes differ from original/val's ({detail or 'another order'}), "
                          "so class ids would not mean the same thing in every variant")
    return SourceSpec(name, "imagefolder", path, samples, classes)


def read_bgchallenge(root: str, follow_links: bool = False) -> List[SourceSpec]:
    """One dataset per split and variant (module docstring), with identical class lists.
    ``follow_links``: as read_imagefolder's, for every split and variant."""
    val_dir = os.path.join(root, "original", "val")
    if not os.path.isdir(val_dir):
        raise SourceError(f"{root!r} looks like a Background-Challenge root but has no original/val folder")
    for v in VARIANTS:
        if os.path.isdir(os.path.join(root, v)) and not os.path.isdir(os.path.join(root, v, "val")):
            raise SourceError(f"{os.path.join(root, v)!r} has no val/ folder: the Background Challenge's "
                              "variants are <variant>/val/<class>/; move it away to build the others")
    val = _spec("val", val_dir, follow_links=follow_links)
    specs = []
    train_dir = os.path.join(root, "original", "train")
    if os.path.isdir(train_dir):
        specs.append(_spec("train", train_dir, val.classes, follow_links))
    specs.append(val)
    # The original variant is original/val again (Xiao et al. report it beside the others); its
    # samples are reused rather than read twice.
    specs.append(SourceSpec("bgchallenge/original", "imagefolder", val_dir, list(val.samples), val.classes))
    for v in VARIANTS[1:]:
        sub = os.path.join(root, v, "val")
        if os.path.isdir(sub):
            specs.append(_spec(f"bgchallenge/{v}", sub, val.classes, follow_links))
    return specs
