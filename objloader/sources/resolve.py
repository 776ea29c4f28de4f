"""Decide what kind of source a path is and read it.

A directory is, in this order: a folder written by objloader-demo (it holds `demo.json`), a
Background-Challenge root as Xiao et al. 2021 publish it (sources/bgchallenge.py), or an
ImageFolder tree / flat folder of images. A path ending in .json is a COCO instances file;
anything else is a list file. The first two are collections of datasets named `train`, `val`,
(`multi`,) `bgchallenge/<variant>`; the others are one dataset.

Ground-truth masks from a parallel mask tree (`gt_masks`, objloader-build --gt-masks) apply to
an ImageFolder or flat folder only; the rule that pairs them is in sources/imagefolder.py.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import List, Optional

from ..errors import SourceError
from .base import SourceSpec
from .bgchallenge import is_bgchallenge_root, read_bgchallenge
from .coco import read_coco
from .imagefolder import read_imagefolder
from .listfile import read_listfile

__all__ = ["DEMO_MARKER", "SourceSpec", "open_source", "read_demo_marker",
           "source_fingerprint"]

DEMO_MARKER = "demo.json"

def read_demo_marker(root: str) -> Optional[dict]:
    path = os.path.join(root, DEMO_MARKER)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise SourceError(f"cannot read {path!r} (the marker of an objloader-demo folder): {e}") from e
    return marker if isinstance(marker, dict) and marker.get("kind") == "objloader-demo" else None


def open_source(path: str, coco_images: Optional[str] = None, gt_masks: Optional[str] = None,
                coco_allow_outside: bool = False, follow_links: bool = False) -> List[SourceSpec]:
    """The datasets a source path holds: one for an ImageFolder, a COCO json or a list file;
    one per split (train, val, multi, bgchallenge/<variant>) for a folder written by objloader-demo;
    train, val and bgchallenge/<variant> for a Background-Challenge root.
    ``gt_masks``: parallel mask tree of an ImageFolder or flat folder (objloader-build --gt-masks).
    ``coco_allow_outside``: a COCO json may name images outside its images folder (sources/coco.py).
    ``follow_links`` (objloader-build --follow-links): read image folders' links and list files'
    paths that lead outside their folder (sources/survey.py); COCO sources are read as before."""
    if not os.path.exists(path):
        raise SourceError(f"source {path!r} does not exist")
    if gt_masks is not None and not os.path.isdir(gt_masks):
        raise SourceError(f"--gt-masks {gt_masks!r} is not a directory")
    if os.path.isdir(path):
        marker = read_demo_marker(path)
        kind = "an objloader-demo folder" if marker is not None else (
            "a Background-Challenge root" if is_bgchallenge_root(path) else None)
        if kind is None:
            samples, classes = read_imagefolder(path, gt_masks=gt_masks, follow_links=follow_links)
            return [SourceSpec("", "imagefolder", path, samples, classes,
                               gt_mask_root=os.path.abspath(gt_masks) if gt_masks is not None else None)]
        if gt_masks is not None:
            raise SourceError(f"--gt-masks applies to an image folder; {path!r} is {kind}")
        if marker is None:
            return read_bgchallenge(path, follow_links=follow_links)
        specs = []
        for split in ("train", "val"):
            samples, classes = read_imagefolder(os.path.join(path, split), follow_links=follow_links)
            specs.append(SourceSpec(split, "imagefolder", os.path.join(path, split), samples, classes))
        multi = os.path.join(path, "multi", "instances.json")
        specs.append(SourceSpec("multi", "coco", multi, read_coco(multi, os.path.join(path, "multi", "images"))))
        for variant in marker.get("bgchallenge_variants", []):
            sub = os.path.join(path, "bgchallenge", variant)
            samples, classes = read_imagefolder(sub, follow_links=follow_links)
            specs.append(SourceSpec(f"bgchallenge/{variant}", "imagefolder", sub, samples, classes))
        return specs
    if gt_masks is not None:
        what = "a COCO json (its masks are in the json)" if path.lower().endswith(".json") else "a list file (give masks as its third column)"
        raise SourceError(f"--gt-masks applies to an image folder; {path!r} is {what}")
    if path.lower().endswith(".json"):
        return [SourceSpec("", "coco", path, read_coco(path, coco_images, allow_outside=coco_allow_outside))]
    return [SourceSpec("", "listfile", path, read_listfile(path, follow_links=follow_links))]


def source_fingerprint(specs: List[SourceSpec]) -> str:
    """Identity of a source: every file's key, label, size and mtime; with a parallel mask tree,
    also its root and each mask file's name, size and mtime (or why there is none)."""
    h = hashlib.sha1()
    for spec in specs:
        h.update(f"{spec.name}|{spec.kind}|{os.path.abspath(spec.path)}\n".encode("utf-8", "surrogateescape"))
        # Only for a mask tree, so the fingerprints of every other source (which ContraCAM mask
        # stores also record) stay what they were.
        if spec.gt_mask_root is not None:
            h.update(f"gt-masks|{spec.gt_mask_root}\n".encode("utf-8", "surrogateescape"))
        for s in spec.samples:
            try:
                st = os.stat(s.path)
                h.update(f"{s.key}|{s.label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{s.key}|missing\n".encode())
            if spec.gt_mask_root is not None:
                h.update(f"mask|{_mask_identity(s)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _mask_identity(s) -> str:
    if s.gt_mask_path is None:
        return f"none|{s.gt_mask_error}"
    try:
        st = os.stat(s.gt_mask_path)
        return f"{s.gt_mask_path}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{s.gt_mask_path}|missing"
