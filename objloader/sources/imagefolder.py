"""ImageFolder trees: ROOT/<class>/.../<image>, with optional ground-truth masks beside the images.

A mask for `dog/001.jpg` is `dog/001.mask.png` (8-bit, 0 = background). Classes are the sorted
names of ROOT's subfolders, as torchvision's ImageFolder numbers them; images directly in ROOT
(no class folders) are unlabelled (-1).

Orientation: images are used as displayed. The build applies an image's EXIF orientation before
anything else (sizes, checks, resizing, the stored pixels), and a mask is taken as drawn on the
displayed image: its own pixels are used as stored. A photo whose EXIF says "rotate 90 degrees"
is therefore stored upright, and its mask must be upright too.

A file whose path below ROOT is not valid UTF-8 (a name Python can only keep with surrogate
escapes) cannot be keyed, hashed or written to the manifest as text: it is skipped with a reason
naming the path with its undecodable bytes written as \\xNN, and the rest is built.
"""
from __future__ import annotations

import os
from typing import List

from .base import Sample, SourceError, file_sample, printable

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
MASK_SUFFIX = ".mask.png"


def is_mask_file(name: str) -> bool:
    return name.lower().endswith(MASK_SUFFIX)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not is_mask_file(name)


def mask_path_for(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + MASK_SUFFIX


def _images_under(folder: str) -> List[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()  # deterministic walk order
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f))
    return found


def read_imagefolder(root: str) -> tuple[List[Sample], List[str]]:
    """Samples of an ImageFolder tree (sorted by key) and the class names in label order."""
    if not os.path.isdir(root):
        raise SourceError(f"ImageFolder root {root!r} is not a directory")
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = [printable(d) for d in folders]  # the names only label; the folders are walked as they are
    samples: List[Sample] = []

    def add(path: str, label: int) -> None:
        mask = mask_path_for(path)
        key = os.path.relpath(path, root).replace(os.sep, "/")
        samples.append(file_sample(key, path, label=label, gt_mask_path=mask if os.path.exists(mask) else None))

    for path in sorted(os.path.join(root, f) for f in os.listdir(root) if is_image_file(f)):
        add(path, -1)
    for label, name in enumerate(folders):
        for path in _images_under(os.path.join(root, name)):
            add(path, label)
    if not samples:
        raise SourceError(f"no images found under {root!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    samples.sort(key=lambda s: s.key)
    return samples, classes
