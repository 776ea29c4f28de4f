"""COCO instances json: boxes and masks (polygons, uncompressed or compressed RLE) per image.

Images are looked up in `image_root` (default: `images/` beside the json if it exists, else the
json's own folder). A record's label is -1 (a scene has no single class); its ground truth is the
union of its instance masks and the instance boxes. Images are used as displayed (EXIF orientation
applied, see imagefolder.py), so the json's sizes and coordinates are taken as those of the
displayed image; a json whose height/width differ from it is refused as a size mismatch.

Every instance with an area is both foreground in the mask and a box: OA-Crop crops inside the
boxes and BG-Mixup pastes another image's background over everything outside the mask, so an
object with a box but no mask would lose its own pixels. Where a json breaks that, the instance is
repaired and the repair is counted under the manifest's `conversions` with one of these notes
(once per record):

- NOTE_BOX_AS_MASK: the segmentation has no area (missing, empty, or only polygons of fewer than
  3 points) but the box has: the box is filled in the mask.
- NOTE_BOX_FROM_SEGMENTATION: the box has no area inside the image (width or height <= 0, wholly
  outside, or missing) but the segmentation has: the box is the segmentation's bounding box.
- NOTE_INSTANCE_LEFT_OUT: neither has an area: the instance is left out.

A polygon of fewer than 3 points beside larger ones of the same instance has no area and is ignored.

A malformed entry (an image without a positive integer height or width, a bbox that is not 4
numbers, a polygon that is not an even-length list of numbers, an RLE that cannot be decoded or
does not cover the image) is an error of its record alone: the message names the image id, its
file name, the annotation id and the field. `objloader-build --on-error skip` counts the record as
skipped with that message, `--on-error fail` stops with it. The structure is checked when the json
is read; compressed RLE strings are decoded in the build workers and their errors named the same
way. Only a json that cannot be parsed, has no `images` list, or gives one category id to two
categories fails as a whole (SourceError).

Identifiers and paths (DESIGN.md, "COCO: identifiers, paths, boxes"). An image id, an image file
(its path under `image_root` after normalisation: 'a/./b.jpg' is 'a/b.jpg', which is also the
record's key) and an annotation id are each given once; where one is given twice, every image
involved is skipped with a reason naming all of them (a json merged from two may be mostly
sound, and `--on-error fail` stops at the first instead). An annotation whose `image_id` no image
has, or several have, or that names none, is skipped as the input `annotations[i]`. A file name
that leads outside `image_root` (absolute, or up through '..') is not read, a skip naming the
image id and the name, unless `allow_outside` (objloader-build --coco-allow-outside).
"""
from __future__ import annotations

import json
import math
import os
import posixpath
import re
from typing import List, Optional, Tuple

import numpy as np

from ..errors import SourceError
from .base import Sample, file_sample, printable
from .rasterise import rle_counts

NOTE_BOX_AS_MASK = "COCO instance without a segmentation area: its box filled in the mask"
NOTE_BOX_FROM_SEGMENTATION = "COCO box missing or without area in the image: taken from the segmentation"
NOTE_INSTANCE_LEFT_OUT = "COCO instance with neither box nor segmentation area: left out"

# Compressed RLE is written in the characters 48..111 ('0'..'o'): 6-bit chunks offset by 48.
_RLE_CHARS = re.compile(r"[0-o]*\Z")


class _Malformed(Exception):
    """A field of one image's entry that cannot be read; the message names the field."""


# ---------------------------------------------------------------------------------------------
# checking one image's entry


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _all_numbers(values: list) -> bool:
    """Every value a finite int or float (not a bool). Polygons hold most of a COCO json's
    numbers, so this checks types without a call per value and finiteness by one sum."""
    if not all(type(v) in (int, float) for v in values):
        return False
    try:
        return math.isfinite(sum(values))  # inf or nan anywhere makes the sum inf or nan
    except OverflowError:  # an int too large for a float
        return False


def _as_int(v) -> Optional[int]:
    """v as an int when it is an integral number (JSON writers differ on 480 vs 480.0), else None."""
    return int(v) if _is_number(v) and v == int(v) else None


def _dimension(entry: dict, name: str) -> int:
    if name not in entry:
        raise _Malformed(f"image entry has no '{name}'")
    v = _as_int(entry[name])
    if v is None or v <= 0:
        raise _Malformed(f"image '{name}' must be a positive integer, got {entry[name]!r}")
    return v


def _box(bbox, height: int, width: int) -> Optional[List[float]]:
    """[x0, y0, x1, y1] normalised and clipped to the image, or None when it has no area there."""
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or not _all_numbers(list(bbox)):
        raise _Malformed(f"'bbox' must be 4 numbers [x, y, width, height], got {bbox!r:.80}")
    x, y, bw, bh = bbox
    return _clipped([x, y, x + bw, y + bh], height, width)


def _clipped(px, height: int, width: int) -> Optional[List[float]]:
    """Pixel box (x0, y0, x1, y1) normalised and clipped to the image; None when it has no area there."""
    box = [float(min(max(v / s, 0.0), 1.0)) for v, s in zip(px, (width, height, width, height))]
    return box if box[2] > box[0] and box[3] > box[1] else None


def _check_rle(rle: dict, height: int, width: int) -> None:
    size, counts = rle.get("size"), rle.get("counts")
    if not isinstance(size, list) or len(size) != 2 or None in map(_as_int, size):
        raise _Malformed(f"'segmentation' RLE 'size' must be [height, width], got {size!r:.80}")
    if [_as_int(v) for v in size] != [height, width]:
        raise _Malformed(f"'segmentation' RLE size {size} differs from the image's [height, width] "
                         f"{[height, width]}")
    if isinstance(counts, (str, bytes)):
        if not _RLE_CHARS.match(counts.decode("latin-1") if isinstance(counts, bytes) else counts):
            raise _Malformed("'segmentation' RLE counts string holds characters outside '0'..'o'")
    elif isinstance(counts, list) and all(_as_int(c) is not None and c >= 0 for c in counts):
        if sum(counts) != height * width:
            raise _Malformed(f"'segmentation' RLE counts sum to {sum(counts)}, expected "
                             f"{height}x{width}={height * width}")
    else:
        raise _Malformed("'segmentation' RLE 'counts' must be a string or a list of non-negative integers")


def _segmentation(seg, height: int, width: int):
    """The part of a segmentation that has an area: an RLE dict, or its polygons of 3+ points;
    None when there is none."""
    if seg is None or seg == []:
        return None
    if isinstance(seg, dict):
        _check_rle(seg, height, width)
        return {"size": [height, width], "counts": seg["counts"]}  # the size as ints, even if written 480.0
    if not isinstance(seg, list):
        raise _Malformed(f"'segmentation' must be a list of polygons or an RLE dict, got {type(seg).__name__}")
    parts = []
    for i, poly in enumerate(seg):
        if not isinstance(poly, list) or not _all_numbers(poly):
            raise _Malformed(f"'segmentation' polygon {i} is not a list of numbers: {poly!r:.80}")
        if len(poly) % 2:
            raise _Malformed(f"'segmentation' polygon {i} has an odd number of coordinates ({len(poly)})")
        if len(poly) >= 6:
            parts.append(poly)
    return parts or None


def _rle_box(rle: dict) -> Optional[Tuple[float, float, float, float]]:
    """Pixel bounding box (x0, y0, x1, y1) of an RLE's foreground, from its runs alone."""
    h = rle["size"][0]
    try:
        counts = rle_counts(rle)
    except SourceError as e:
        raise _Malformed(f"'segmentation': {e}") from None
    ends = np.cumsum(counts)
    fg = (np.arange(len(counts)) % 2 == 1) & (counts > 0)
    first, last = (ends - counts)[fg], ends[fg] - 1  # column-major pixel indices, inclusive
    if not len(first):
        return None
    one_column = first // h == last // h  # a run over several columns covers the top and bottom rows
    y0 = np.where(one_column, first % h, 0).min()
    y1 = np.where(one_column, last % h, h - 1).max() + 1
    return float((first // h).min()), float(y0), float((last // h).max() + 1), float(y1)


def _segmentation_box(seg, height: int, width: int) -> Optional[List[float]]:
    """Normalised bounding box of a segmentation that has an area, None when it is outside the image."""
    if isinstance(seg, dict):
        px = _rle_box(seg)
        if px is None:
            return None
    else:
        pts = np.concatenate([np.asarray(p, np.float64).reshape(-1, 2) for p in seg])
        px = (*pts.min(axis=0), *pts.max(axis=0))
    return _clipped(px, height, width)


def _box_polygon(box: List[float], height: int, width: int) -> List[List[int]]:
    """A polygon that polygon_to_mask (which covers [x0, x1) x [y0, y1) of integer corners) turns
    into exactly the pixels the normalised box overlaps."""
    eps = 1e-6  # back from normalised coordinates, 12 may come out as 12.000000000000002
    c0, r0 = math.floor(box[0] * width + eps), math.floor(box[1] * height + eps)
    c1 = max(c0 + 1, math.ceil(box[2] * width - eps))
    r1 = max(r0 + 1, math.ceil(box[3] * height - eps))
    return [[c0, r0, c1, r0, c1, r1, c0, r1]]


def _instance(ann: dict, height: int, width: int):
    """(segmentation for the mask or None, normalised box or None, repair note or None)."""
    seg = _segmentation(ann.get("segmentation"), height, width)
    box = _box(ann["bbox"], height, width) if ann.get("bbox") is not None else None
    if seg is not None and box is not None:
        return seg, box, None
    if seg is not None:
        box = _segmentation_box(seg, height, width)
        if box is None:  # wholly outside the image, or an RLE without a pixel
            return None, None, NOTE_INSTANCE_LEFT_OUT
        return seg, box, NOTE_BOX_FROM_SEGMENTATION
    if box is not None:
        return _box_polygon(box, height, width), box, NOTE_BOX_AS_MASK
    return None, None, NOTE_INSTANCE_LEFT_OUT


def _ground_truth(anns: list, height: int, width: int):
    """(annotation id, segmentation) pairs, normalised boxes [K, 4] and the repair notes of one image."""
    instances, boxes, notes = [], [], []
    for ann in anns:
        try:
            seg, box, note = _instance(ann, height, width)
        except _Malformed as e:
            raise _Malformed(f"annotation {ann.get('id')!r}: {e}") from None
        if seg is not None:
            instances.append((ann.get("id"), seg))
        if box is not None:
            boxes.append(box)
        if note is not None and note not in notes:
            notes.append(note)
    return instances, np.array(boxes, dtype=np.float32).reshape(-1, 4), notes


# ---------------------------------------------------------------------------------------------
# the json


def _is_id(v) -> bool:
    return isinstance(v, (int, str)) and not isinstance(v, bool)


def _load(json_path: str) -> dict:
    if not os.path.isfile(json_path):
        raise SourceError(f"COCO json {json_path!r} does not exist")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"cannot parse COCO json {json_path!r}: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(f"{json_path!r} is not a COCO instances file (no 'images' list)")
    return data


def _check_categories(data: dict, json_path: str) -> None:
    """Category ids name the classes of every annotation: two categories under one id make the
    whole table ambiguous (no record to count it against), so the json is refused."""
    cats = data.get("categories")
    if not isinstance(cats, list):
        return
    seen: dict = {}
    for i, c in enumerate(cats):
        if isinstance(c, dict) and _is_id(c.get("id")):
            seen.setdefault(c["id"], []).append(f"categories[{i}] ({c.get('name')!r})")
    for cat_id, parties in seen.items():
        if len(parties) > 1:
            raise SourceError(f"COCO json {json_path!r}: category id {cat_id!r} is given to {_and(parties)}; "
                              "category ids must be unique")


def _and(items: list) -> str:
    items = [str(v) for v in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _is_outside(file_name: str) -> bool:
    """The file name leads out of the images folder (absolute, or up through '..'); judged on the
    text, so nothing outside is touched to find out."""
    norm = posixpath.normpath(file_name)
    return os.path.isabs(file_name) or norm == ".." or norm.startswith("../")


def _entry_problems(images: list, image_root: str, allow_outside: bool) -> Tuple[dict, dict]:
    """(image index -> why it cannot be a record, image id -> indices of its entries), for the
    rules between entries: an image id or a file (after normalisation) may be named once only,
    and a file name may not lead out of image_root unless allow_outside."""
    problems: dict = {}
    by_id: dict = {}
    by_file: dict = {}
    for i, entry in enumerate(images):
        if not isinstance(entry, dict):
            continue
        if _is_id(entry.get("id")):
            by_id.setdefault(entry["id"], []).append(i)
        name = entry.get("file_name")
        if isinstance(name, str) and name:
            by_file.setdefault(os.path.normpath(os.path.join(image_root, name)), []).append(i)
            if not allow_outside and _is_outside(name):
                problems.setdefault(i, []).append(
                    f"file name {printable(name)!r} leads outside the images folder {image_root!r}: not read "
                    "(pass --coco-allow-outside to read it)")

    def parties(indices):
        return _and([f"images[{i}] ({printable(str(images[i].get('file_name')))!r})" for i in indices])

    for image_id, indices in by_id.items():
        if len(indices) > 1:
            for i in indices:
                problems.setdefault(i, []).append(
                    f"image id {image_id!r} is given to {len(indices)} images, {parties(indices)}: "
                    "skipped, as their annotations cannot be told apart")
    for path, indices in by_file.items():
        if len(indices) > 1:
            ids = _and([repr(images[i].get("id")) for i in indices])
            name = printable(os.path.relpath(path, image_root))
            for i in indices:
                problems.setdefault(i, []).append(
                    f"images {ids} {'both' if len(indices) == 2 else 'all'} name the file {name!r}: skipped, as one file cannot be "
                    f"{len(indices)} records (each without the others' objects)")
    return problems, by_id


def _annotations_by_image(data: dict, json_path: str, by_id: dict, problems: dict):
    """(image id -> its annotations, the Samples that count the annotations given to no single
    image as skipped). An annotation id given twice makes the images holding it ambiguous: their
    entries get a problem."""
    anns = data.get("annotations", [])
    if not isinstance(anns, list):
        raise SourceError(f"COCO json {json_path!r}: 'annotations' is not a list")
    by_image: dict = {}
    orphans: List[Sample] = []
    ann_ids: dict = {}
    for i, ann in enumerate(anns):
        where = f"COCO json annotations[{i}]"
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not isinstance(ann, dict):
            reason = f"is not an object: {ann!r:.60}"
        elif not _is_id(image_id):
            reason = f"names no image ('image_id' {image_id!r})"
        elif image_id not in by_id:
            reason = f"names image id {image_id!r}, which no image has"
        elif len(by_id[image_id]) > 1:
            reason = f"names image id {image_id!r}, which {len(by_id[image_id])} images have"
        else:
            reason = None
            by_image.setdefault(image_id, []).append(ann)
        if isinstance(ann, dict) and _is_id(ann.get("id")):
            where += f" (id {ann['id']!r})"
            ann_ids.setdefault(ann["id"], []).append((i, image_id if reason is None else None))
        if reason is not None:
            orphans.append(Sample(key=f"annotations[{i}]", path=json_path, invalid=f"{where} {reason}: skipped"))
    for ann_id, holders in ann_ids.items():
        if len(holders) > 1:
            named = _and([f"annotations[{i}]" + (f" (image {img!r})" if img is not None else "") for i, img in holders])
            for img in dict.fromkeys(img for _, img in holders if img is not None):  # each image once
                problems.setdefault(by_id[img][0], []).append(
                    f"annotation id {ann_id!r} is given to {named}: skipped, as the instance is ambiguous")
    return by_image, orphans


def _sample(index: int, entry, by_image: dict, image_root: str, json_path: str, problems: list,
            allow_outside: bool) -> Sample:
    """The Sample of images[index]; one that is skipped with the reason when the entry is malformed
    or has problems (see _entry_problems)."""
    file_name = entry.get("file_name") if isinstance(entry, dict) else None
    if not isinstance(file_name, str) or not file_name:
        what = f"image id {entry.get('id')!r}" if isinstance(entry, dict) else f"{entry!r:.60}"
        return Sample(key=f"images[{index}]", path=json_path,
                      invalid=f"COCO json images[{index}] ({what}) has no 'file_name'")
    image_id = entry.get("id")
    key = posixpath.normpath(file_name)  # the key names the file, so 'a/./b.jpg' and 'a/b.jpg' are one
    path = os.path.join(image_root, key)  # the file the key names, read as such (no trip through "sub/..")
    origin = f"COCO image id {image_id!r} ({printable(file_name)!r})"
    if problems:
        # A refused path stays unread, even by the build's fingerprint (which stats every sample's file).
        where = json_path if not allow_outside and _is_outside(file_name) else path
        return Sample(key=printable(key), path=where, origin=origin, invalid=f"{origin}: {'; '.join(problems)}")
    try:
        if not _is_id(image_id):
            raise _Malformed(f"image 'id' must be a number or a string, got {image_id!r}")
        h, w = _dimension(entry, "height"), _dimension(entry, "width")
        instances, boxes, notes = _ground_truth(by_image.get(image_id, []), h, w)
    except _Malformed as e:
        return Sample(key=printable(key), path=path, origin=origin, invalid=f"{origin}: {e}")
    return file_sample(key, path, label=-1, gt_segments=instances, gt_size=(h, w), gt_boxes=boxes,
                       origin=origin, notes=notes)


def read_coco(json_path: str, image_root: Optional[str] = None, allow_outside: bool = False) -> List[Sample]:
    """The Samples of a COCO instances json: one per image entry, and one skipped Sample per
    annotation that belongs to no single image. ``allow_outside``: read file names that lead
    outside image_root (absolute, or through '..'); refused by default."""
    data = _load(json_path)
    if image_root is None:
        here = os.path.dirname(os.path.abspath(json_path))
        image_root = os.path.join(here, "images") if os.path.isdir(os.path.join(here, "images")) else here
    _check_categories(data, json_path)
    images = data["images"]
    problems, by_id = _entry_problems(images, image_root, allow_outside)
    by_image, orphans = _annotations_by_image(data, json_path, by_id, problems)
    samples = [_sample(i, entry, by_image, image_root, json_path, problems.get(i, []), allow_outside)
               for i, entry in enumerate(images)]
    if not samples:
        raise SourceError(f"COCO json {json_path!r} lists no images")
    samples.sort(key=lambda s: s.key)
    return samples + orphans
