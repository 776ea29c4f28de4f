"""Decide what kind of source a path is and read it."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import List, Optional

from .base import Sample, SourceError
from .coco import read_coco
from .imagefolder import read_imagefolder
from .listfile import read_listfile

DEMO_MARKER = "demo.json"


@dataclass
class SourceSpec:
    """One dataset to build: `name` is its folder inside the output ("" = the output itself)."""

    name: str
    kind: str
    path: str
    samples: List[Sample]
    classes: List[str] = field(default_factory=list)


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


def open_source(path: str, coco_images: Optional[str] = None) -> List[SourceSpec]:
    """The datasets a source path holds: one for an ImageFolder, a COCO json or a list file;
    one per split (train, val, multi, bgchallenge/<variant>) for a folder written by objloader-demo."""
    if not os.path.exists(path):
        raise SourceError(f"source {path!r} does not exist")
    if os.path.isdir(path):
        marker = read_demo_marker(path)
        if marker is None:
            samples, classes = read_imagefolder(path)
            return [SourceSpec("", "imagefolder", path, samples, classes)]
        specs = []
        for split in ("train", "val"):
            samples, classes = read_imagefolder(os.path.join(path, split))
            specs.append(SourceSpec(split, "imagefolder", os.path.join(path, split), samples, classes))
        multi = os.path.join(path, "multi", "instances.json")
        specs.append(SourceSpec("multi", "coco", multi, read_coco(multi, os.path.join(path, "multi", "images"))))
        for variant in marker.get("bgchallenge_variants", []):
            sub = os.path.join(path, "bgchallenge", variant)
            samples, classes = read_imagefolder(sub)
            specs.append(SourceSpec(f"bgchallenge/{variant}", "imagefolder", sub, samples, classes))
        return specs
    if path.lower().endswith(".json"):
        return [SourceSpec("", "coco", path, read_coco(path, coco_images))]
    return [SourceSpec("", "listfile", path, read_listfile(path))]


def source_fingerprint(specs: List[SourceSpec]) -> str:
    """Identity of a source: every file's key, label, size and mtime."""
    h = hashlib.sha1()
    for spec in specs:
        h.update(f"{spec.name}|{spec.kind}|{os.path.abspath(spec.path)}\n".encode("utf-8", "surrogateescape"))
        for s in spec.samples:
            try:
                st = os.stat(s.path)
                h.update(f"{s.key}|{s.label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{s.key}|missing\n".encode())
    return h.hexdigest()
