"""The demo's files: image and mask encoding, COCO boxes and RLE, and the two json files
(multi/instances.json, demo.json) assembled from the tasks' results."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np

from .backgrounds import BACKGROUND_POOLS
from .style import BGCHALLENGE_VARIANTS, CLASSES, DEMO_KIND, DEMO_VERSION, JPEG_QUALITY, MASK_SUFFIX, VARIANTS_WITH_MASK


def _jpeg(img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    assert ok
    return buf.tobytes()


def _png(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask.astype(np.uint8) * 255, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    assert ok
    return buf.tobytes()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def tight_box(mask: np.ndarray) -> List[int]:
    """[x, y, w, h] of the set pixels (w, h in pixels, COCO convention)."""
    ys, xs = np.nonzero(mask)
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1]


def rle_encode(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with zeros."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"counts": [int(c) for c in counts], "size": [int(mask.shape[0]), int(mask.shape[1])]}


def rle_decode(rle: dict) -> np.ndarray:
    """Inverse of rle_encode: bool [h, w]."""
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape((w, h)).T


def _assemble(root: Path, results: List[dict], **opts) -> dict:
    """Write multi/instances.json and demo.json from the task results (already in task order)."""
    images: Dict[str, list] = {"train": [], "val": [], "bgchallenge": [], "multi": []}
    coco_images, coco_anns = [], []
    for r in results:
        images[r["split"]].append(r["record"])
        if "bgchallenge" in r:
            images["bgchallenge"].append(r["bgchallenge"])
        if r["split"] == "multi":
            rec = r["record"]
            coco_images.append({k: rec[k] for k in ("id", "file_name", "width", "height")})
            for a in r["annotations"]:
                coco_anns.append({"id": len(coco_anns) + 1, "image_id": rec["id"], **a})
    coco = {
        "info": {"description": "objloader demo: multi-object scenes", "version": str(DEMO_VERSION)},
        "images": coco_images,
        "annotations": coco_anns,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CLASSES)],
    }
    with open(root / "multi" / "instances.json", "w") as f:
        json.dump(coco, f, separators=(",", ":"))

    marker = {
        "kind": DEMO_KIND,
        "version": DEMO_VERSION,
        "seed": opts["seed"],
        "resolution": opts["resolution"],
        **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(opts["style"]).items()},
        "classes": list(CLASSES),
        "per_class": {"train": opts["per_class_train"], "val": opts["per_class_val"]},
        "counts": {
            "train": len(images["train"]),
            "val": len(images["val"]),
            "bgchallenge": len(images["bgchallenge"]),  # per variant
            "multi": len(coco_images),
            "multi_instances": len(coco_anns),
        },
        "bgchallenge_variants": list(BGCHALLENGE_VARIANTS),
        "bgchallenge_variants_with_mask": list(VARIANTS_WITH_MASK),
        "mask_suffix": MASK_SUFFIX,
        "background_pools": {name: list(BACKGROUND_POOLS[i]) for i, name in enumerate(CLASSES)},
        "images": images,
    }
    with open(root / "demo.json", "w") as f:
        f.write(_marker_text(marker))
    return marker


def _marker_text(marker: dict) -> str:
    """demo.json text: the header indented for reading, then one line per image record."""
    head = {k: v for k, v in marker.items() if k != "images"}
    text = json.dumps(head, indent=1)[:-2]  # drop the closing "\n}"
    splits = []
    for split, records in marker["images"].items():
        lines = ",\n".join("   " + json.dumps(r, separators=(",", ":")) for r in records)
        splits.append(f"  {json.dumps(split)}: [\n{lines}\n  ]" if records else f"  {json.dumps(split)}: []")
    return text + ',\n "images": {\n' + ",\n".join(splits) + "\n }\n}\n"
