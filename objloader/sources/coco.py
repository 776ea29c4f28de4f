"""COCO instances json: boxes and masks (polygons, uncompressed or compressed RLE) per image.

Images are looked up in `image_root` (default: `images/` beside the json if it exists, else the
json's own folder). A record's label is -1 (a scene has no single class); its ground truth is the
union of its instance masks and the instance boxes.
"""
from __future__ import annotations

import json
import os
from typing import List, Optional

import numpy as np

from .base import Sample, SourceError


def decode_rle_string(s: str) -> List[int]:
    """Counts of COCO's compressed RLE: 6-bit chunks offset by 48, 5 value bits each, bit 5
    = more chunks follow, sign from bit 4 of the last chunk; from the third count on, each value
    is stored as a difference to the count two places before."""
    counts: List[int] = []
    p = 0
    while p < len(s):
        value, shift, more = 0, 0, True
        while more:
            c = ord(s[p]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            p += 1
            shift += 5
            if not more and (c & 0x10):
                value |= -1 << shift
        if len(counts) > 2:
            value += counts[-2]
        counts.append(value)
    return counts


def rle_to_mask(rle: dict) -> np.ndarray:
    """bool [h, w] from an RLE dict; runs alternate 0/1 starting with 0, column-major order."""
    h, w = rle["size"]
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = decode_rle_string(counts.decode() if isinstance(counts, bytes) else counts)
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != h * w:
        raise SourceError(f"RLE counts sum to {counts.sum()}, expected {h}x{w}={h * w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T


def segments_to_mask(segments: list, height: int, width: int) -> np.ndarray:
    """uint8 [height, width], 255 where any instance segmentation covers the pixel."""
    import cv2

    mask = np.zeros((height, width), dtype=np.uint8)
    for seg in segments:
        if isinstance(seg, dict):
            m = rle_to_mask(seg)
            if m.shape != mask.shape:
                raise SourceError(f"RLE size {list(m.shape)} differs from image size {[height, width]}")
            mask[m] = 255
        else:  # polygons: list of flat [x0, y0, x1, y1, ...] lists
            for poly in seg:
                pts = np.asarray(poly, dtype=np.float64).reshape(-1, 2)
                if len(pts) >= 3:
                    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255)
    return mask


def read_coco(json_path: str, image_root: Optional[str] = None) -> List[Sample]:
    if not os.path.isfile(json_path):
        raise SourceError(f"COCO json {json_path!r} does not exist")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SourceError(f"cannot parse COCO json {json_path!r}: {e}") from e
    if not isinstance(data, dict) or "images" not in data:
        raise SourceError(f"{json_path!r} is not a COCO instances file (no 'images' list)")
    if image_root is None:
        here = os.path.dirname(os.path.abspath(json_path))
        image_root = os.path.join(here, "images") if os.path.isdir(os.path.join(here, "images")) else here
    by_image: dict = {}
    for ann in data.get("annotations", []):
        by_image.setdefault(ann["image_id"], []).append(ann)
    samples = []
    for img in data["images"]:
        h, w = int(img["height"]), int(img["width"])
        anns = by_image.get(img["id"], [])
        boxes = np.array(
            [[a["bbox"][0] / w, a["bbox"][1] / h, (a["bbox"][0] + a["bbox"][2]) / w, (a["bbox"][1] + a["bbox"][3]) / h]
             for a in anns if "bbox" in a],
            dtype=np.float32,
        ).reshape(-1, 4)
        segments = [a["segmentation"] for a in anns if a.get("segmentation")]
        samples.append(
            Sample(
                key=img["file_name"],
                path=os.path.join(image_root, img["file_name"]),
                label=-1,
                gt_segments=segments,
                gt_size=(h, w),
                gt_boxes=np.clip(boxes, 0.0, 1.0),
            )
        )
    if not samples:
        raise SourceError(f"COCO json {json_path!r} lists no images")
    samples.sort(key=lambda s: s.key)
    return samples
