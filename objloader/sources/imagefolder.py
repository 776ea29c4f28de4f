"""ImageFolder trees: ROOT/<class>/.../<image>, with optional ground-truth masks beside the images
or in a parallel mask tree.

Beside the images: a mask for `dog/001.jpg` is `dog/001.mask.png` (8-bit, 0 = background).
Classes are the sorted names of ROOT's subfolders, as torchvision's ImageFolder numbers them;
images directly in ROOT (no class folders) are unlabelled (-1), so a flat folder of images is a
source too.

In a parallel mask tree (`objloader-build SRC OUT --gt-masks DIR`, the layout of CUB-200-2011's
`images/` + `segmentations/` and of DUTS's `*-Image/` + `*-Mask/`): the mask of the image at
relative path `a/b/x.jpg` below ROOT is `DIR/a/b/x.<ext>`, the same relative folder and file
stem with the extension `.png`, `.bmp`, `.jpg` or `.jpeg` (stem matched exactly, extension in
any case). Masks beside the images are then not used. An image without such a mask, or with two
(`x.png` and `x.jpg`), is skipped by the build with that reason, as is one whose mask cannot be
decoded or differs in size from the image: a missing mask never means "no object" nor "all
object". Mask files without an image are ignored. DIR must exist, must not lie inside ROOT (its
masks would be read as images), and must hold a mask for at least one image.

Orientation: images are used as displayed. The build applies an image's EXIF orientation before
anything else (sizes, checks, resizing, the stored pixels), and a mask is taken as drawn on the
displayed image: its own pixels are used as stored. A photo whose EXIF says "rotate 90 degrees"
is therefore stored upright, and its mask must be upright too.

Links: every image file reachable from ROOT makes at most one record (sources/survey.py). The
walk lists each folder once; a file reached by its real path and through a link (or a hard link)
keeps its real path and the link is a counted skip naming both; a link to a folder walked
already (inside ROOT, or an ancestor) is one counted skip. A link leading outside ROOT is a
counted skip unless `follow_links` (objloader-build --follow-links). Two images that would pair
with one mask (`a.jpg` and `a.png` beside `a.mask.png`, or beside one mask-tree `a.png`) are
both skipped with every party named.

A file whose path below ROOT is not valid UTF-8 (a name Python can only keep with surrogate
escapes) cannot be keyed, hashed or written to the manifest as text: it is skipped with a reason
naming the path with its undecodable bytes written as \\xNN, and the rest is built.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

from ..errors import SourceError
from .base import Sample, file_sample, printable
from .survey import inside, one_record_per_file, outside_reason

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
MASK_SUFFIX = ".mask.png"
MASK_TREE_EXTENSIONS = (".png", ".bmp", ".jpg", ".jpeg")


def is_mask_file(name: str) -> bool:
    return name.lower().endswith(MASK_SUFFIX)


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not is_mask_file(name)


def mask_path_for(image_path: str) -> str:
    return os.path.splitext(image_path)[0] + MASK_SUFFIX


class _Walk:
    """Every image path reachable from an ImageFolder root, each folder listed once.

    Real entries come first (sorted), links after them, so a file reached both by its real path
    and through a link keeps its real path (sources/survey.py skips the other). A link leading
    outside the root is followed only with ``follow_links``; a link to a folder already walked
    (any folder inside the root, or an ancestor: a loop) is one counted skip naming both, never
    walked again. Skips are Samples marked invalid (``self.skips``)."""

    def __init__(self, root: str, labels: Dict[str, int], follow_links: bool):
        self.root, self.labels, self.follow_links = root, labels, follow_links
        self.real_root = os.path.realpath(root)
        self.images: List[Tuple[str, int]] = []  # (path, label), real paths first
        self.skips: List[Sample] = []
        self._walked: Dict[tuple, str] = {}  # folder identity -> the path it was walked by
        self._links: List[Tuple[str, int]] = []

    def run(self) -> "_Walk":
        self._folder(self.root, -1, top=True)
        while self._links:  # links found in folders reached through links join the queue
            self._link(*self._links.pop(0))
        return self

    def _skip(self, path: str, label: int, reason: str) -> None:
        s = file_sample(os.path.relpath(path, self.root).replace(os.sep, "/"), path, label=label)
        s.invalid = s.invalid or reason
        self.skips.append(s)

    def _folder(self, folder: str, label: int, top: bool = False) -> None:
        st = os.stat(folder)
        seen = self._walked.setdefault((st.st_dev, st.st_ino), folder)
        if seen != folder:  # a second path to a folder (a link to it, an ancestor, a bind mount)
            self._skip(folder, label, f"folder {printable(folder)!r} is {printable(seen)!r}, walked already: its "
                                      "images are recorded once, there (walking it again could loop)")
            return
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:  # os.walk would drop an unreadable folder without a word
            self._skip(folder, label, f"cannot list folder {printable(folder)!r}: {e.strerror or e}")
            return
        subfolders = []
        for e in entries:
            # In the root, a folder (or a link to one) is a class; files there are unlabelled.
            sub = self.labels.get(e.name, -1) if top else label
            if e.is_symlink():
                self._links.append((e.path, sub))
            elif e.is_dir(follow_symlinks=False):
                subfolders.append((e.path, sub))
            elif is_image_file(e.name):
                self.images.append((e.path, label))
        for path, sub in subfolders:
            self._folder(path, sub)

    def _link(self, path: str, label: int) -> None:
        name = os.path.basename(path)
        if not os.path.exists(path):
            if is_image_file(name):
                self._skip(path, label, f"broken link {printable(path)!r} -> {printable(os.readlink(path))!r}: "
                                        "its target does not exist")
            return  # a dangling link not named as an image is no more an input than any other file
        is_dir = os.path.isdir(path)
        if not is_dir and not is_image_file(name):
            return
        if not self.follow_links and not inside(path, self.real_root):
            self._skip(path, label, outside_reason("link to a folder" if is_dir else "link", path, self.root))
        elif not is_dir:
            self.images.append((path, label))  # a second path to a file: survey.one_record_per_file
        else:
            self._folder(path, label)


class MaskTree:
    """The masks of a parallel mask tree (see the module docstring), found by an image's path
    relative to the image root. Each folder of the tree is listed once."""

    def __init__(self, root: str):
        self.root = root
        self._folders: Dict[str, Dict[str, List[str]]] = {}

    def _stems(self, folder: str) -> Dict[str, List[str]]:
        if folder not in self._folders:
            stems: Dict[str, List[str]] = {}
            try:
                with os.scandir(folder) as it:
                    for e in it:
                        stem, ext = os.path.splitext(e.name)
                        if ext.lower() in MASK_TREE_EXTENSIONS and e.is_file():
                            stems.setdefault(stem, []).append(e.name)
            except (FileNotFoundError, NotADirectoryError):
                pass  # no masks for this folder's images: each is a skip with its reason
            except OSError as e:
                raise SourceError(f"cannot list mask folder {folder!r}: {e}") from e
            self._folders[folder] = {k: sorted(v) for k, v in stems.items()}
        return self._folders[folder]

    def find(self, rel: str) -> Tuple[Optional[str], Optional[str]]:
        """(mask path, None), or (None, why there is no usable mask) for the image at `rel`."""
        rel_dir, name = os.path.split(rel)
        stem = os.path.splitext(name)[0]
        folder = os.path.join(self.root, rel_dir)
        found = self._stems(folder).get(stem, [])
        if len(found) == 1:
            return os.path.join(folder, found[0]), None
        shown = printable(os.path.join(folder, stem))
        if not found:
            return None, (f"no ground-truth mask in the mask tree {printable(self.root)!r}: looked for "
                          f"{shown}.png (or .bmp, .jpg, .jpeg)")
        return None, f"{len(found)} ground-truth masks match {shown}.*: {', '.join(map(printable, found))}; keep one"


def _check_mask_root(root: str, mask_root: str) -> None:
    if not os.path.isdir(mask_root):
        raise SourceError(f"--gt-masks {mask_root!r} is not a directory")
    real_root, real_masks = os.path.realpath(root), os.path.realpath(mask_root)
    if os.path.commonpath([real_root, real_masks]) == real_root:
        raise SourceError(f"--gt-masks {mask_root!r} is or lies inside the image folder {root!r}: its masks would be "
                          "read as images; give the image folder itself (e.g. CUB's images/) as SRC")


def read_imagefolder(root: str, gt_masks: Optional[str] = None,
                     follow_links: bool = False) -> tuple[List[Sample], List[str]]:
    """Samples of an ImageFolder tree (sorted by key) and the class names in label order.
    ``gt_masks``: a parallel mask tree to take the ground-truth masks from (module docstring).
    ``follow_links``: follow links that lead outside ``root`` (objloader-build --follow-links)."""
    if not os.path.isdir(root):
        raise SourceError(f"ImageFolder root {root!r} is not a directory")
    tree = None
    if gt_masks is not None:
        _check_mask_root(root, gt_masks)
        tree = MaskTree(gt_masks)
    folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    classes = [printable(d) for d in folders]  # the names only label; the folders are walked as they are
    walk = _Walk(root, {name: label for label, name in enumerate(folders)}, follow_links).run()
    samples: List[Sample] = []
    for path, label in walk.images:
        rel = os.path.relpath(path, root)
        key = rel.replace(os.sep, "/")
        if tree is None:
            mask = mask_path_for(path)
            samples.append(file_sample(key, path, label=label, gt_mask_path=mask if os.path.exists(mask) else None))
        else:
            mask, why = tree.find(rel)
            samples.append(file_sample(key, path, label=label, gt_mask_path=mask, gt_mask_error=why))
    one_record_per_file(samples)  # in walk order: a file's real path is kept over a link to it
    samples += walk.skips
    if not samples:
        raise SourceError(f"no images found under {root!r} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if tree is not None and not any(s.gt_mask_path for s in samples):
        # Almost surely the wrong folder or layout; building would skip every record one by one.
        raise SourceError(f"--gt-masks {gt_masks!r} holds no mask for any of the {len(samples)} images of "
                          f"{root!r}: the mask of <SRC>/a/b/x.jpg must be <DIR>/a/b/x.png (or .bmp, .jpg, .jpeg); "
                          f"first missing: {samples[0].gt_mask_error}")
    samples.sort(key=lambda s: s.key)
    return samples, classes
