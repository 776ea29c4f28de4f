"""The rules every ImageFolder tree and list file passes through before its samples reach the
build (DESIGN.md, "Inputs: one file, one record"):

- one file, at most one record: samples are keyed by the identity of the file they read
  ((st_dev, st_ino), so links, hard links, `..` and `x//a.jpg` all count as that one file); the
  first path in source order makes the record, every further path to it is a counted skip
  naming both. Paths that disagree on what the file is (label or mask) are all skipped: picking
  one would be a silent choice.
- one mask, exactly one image: a mask file two images would pair with skips both, named.
- paths stay in their root: `inside` says whether a path, links resolved, lies in a folder.

A skip is a Sample marked `invalid` (sources/base.py): the build counts it and lists it in the
manifest with its reason, like any unreadable image.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from .base import Sample, printable


def inside(path: str, real_root: str) -> bool:
    """Whether ``path``, every link in it resolved, is ``real_root`` (a realpath) or below it."""
    real = os.path.realpath(path)
    return os.path.commonpath([real, real_root]) == real_root


def file_identity(path: str) -> tuple:
    """What makes two paths one file: (st_dev, st_ino) when it can be stat'ed; otherwise the
    resolved path, so two spellings of one missing file still count as one."""
    try:
        st = os.stat(path)
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.realpath(path))


def _shown(s: Sample) -> str:
    return f"{printable(s.path)!r} ({s.origin or f'record {s.key!r}'})"


def _annotation(s: Sample) -> tuple:
    """What a sample says its file is: the build stores exactly this beside the pixels."""
    mask = file_identity(s.gt_mask_path) if s.gt_mask_path is not None else None
    return (s.label, mask, s.gt_mask_error is not None)


def one_record_per_file(samples: List[Sample]) -> List[Sample]:
    """``samples`` (in source order, the preferred path of a file first) with every second path
    to one image file, and every image of a shared mask, marked invalid with a reason naming
    all parties. Samples already invalid are left as they are. Returns the same list."""
    by_file: Dict[tuple, List[Sample]] = {}
    for s in samples:
        if s.invalid is None:
            by_file.setdefault(file_identity(s.path), []).append(s)
    for group in by_file.values():
        if len(group) == 1:
            continue
        first, rest = group[0], group[1:]
        if all(_annotation(s) == _annotation(first) for s in rest):
            for s in rest:
                s.invalid = f"same file as {_shown(first)}: one file makes one record, kept there"
            continue
        parties = "; ".join(f"{_shown(s)} label {s.label}, mask {printable(s.gt_mask_path or 'none')!r}"
                            for s in group)
        for s in group:
            s.invalid = (f"{len(group)} paths lead to this one file with different labels or masks: {parties}; "
                         "which is meant is ambiguous, keep one path")
    by_mask: Dict[tuple, List[Sample]] = {}
    for s in samples:
        if s.invalid is None and s.gt_mask_path is not None:
            by_mask.setdefault(file_identity(s.gt_mask_path), []).append(s)
    for group in by_mask.values():
        if len(group) > 1:
            images = ", ".join(printable(s.path) for s in group)
            for s in group:
                s.invalid = (f"mask {printable(s.gt_mask_path)!r} would pair with {len(group)} images ({images}): "
                             "which one it was drawn for is ambiguous; give each image its own mask (rename one)")
    return samples


def outside_reason(what: str, path: str, root: str, target: Optional[str] = None) -> str:
    """The skip reason of a path that leads outside its root and is not followed."""
    target = os.path.realpath(path) if target is None else target
    return (f"{what} {printable(path)!r} leads outside {printable(root)!r} (to {printable(target)!r}); "
            "not read: pass --follow-links to read files outside SRC")
