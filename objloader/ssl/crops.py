"""Object-crop linear probe on multi-object scenes (the evaluation OA-Crop is for, Mo et al. Table 4).

Every ground-truth box of a COCO-format scene collection is cut out of its scene, resized to the
encoder's input size and labelled by its category. The scenes (not the crops) are split into a
probe-training and a test part, so no scene contributes crops to both. A linear probe on the
frozen features of the training crops is scored on the test crops: how well an encoder
pre-trained on whole scenes represents the single objects in them.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import cv2
import numpy as np
import torch
from torch import nn

from objloader.augment.reference import normalize

from .linear import linear_probe
from ..errors import ConfigError, ProbeError

__all__ = ["read_object_crops", "object_crop_probe"]

MIN_CROP_SIDE = 4  # px; a thinner box holds no recognisable object and is counted as skipped


def read_object_crops(coco_json: str, image_dir: Optional[str] = None, image_size: int = 64):
    """Crops uint8 [K, S, S, 3] (RGB), labels int64 [K] (0-based, in the order of the json's
    categories), scene index int64 [K], the category names, and the number of boxes skipped
    (thinner than MIN_CROP_SIDE after clipping to the image)."""
    with open(coco_json, encoding="utf-8") as f:
        coco = json.load(f)
    image_dir = image_dir or os.path.join(os.path.dirname(coco_json), "images")
    cat_index = {c["id"]: i for i, c in enumerate(coco["categories"])}
    scene_of = {im["id"]: i for i, im in enumerate(coco["images"])}
    by_scene: dict = {}
    for a in coco["annotations"]:
        by_scene.setdefault(a["image_id"], []).append(a)
    crops, labels, scenes, skipped = [], [], [], 0
    for im in coco["images"]:
        anns = by_scene.get(im["id"], [])
        if not anns:
            continue
        path = os.path.join(image_dir, im["file_name"])
        bgr = cv2.imread(path, cv2.IMREAD_COLOR)
        if bgr is None:
            raise ProbeError(f"{coco_json}: image {path!r} is missing or not an image")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        h, w = rgb.shape[:2]
        for a in anns:
            x, y, bw, bh = a["bbox"]
            x0, y0 = max(0, int(np.floor(x))), max(0, int(np.floor(y)))
            x1, y1 = min(w, int(np.ceil(x + bw))), min(h, int(np.ceil(y + bh)))
            if x1 - x0 < MIN_CROP_SIDE or y1 - y0 < MIN_CROP_SIDE:
                skipped += 1
                continue
            crops.append(cv2.resize(rgb[y0:y1, x0:x1], (image_size, image_size), interpolation=cv2.INTER_AREA))
            labels.append(cat_index[a["category_id"]])
            scenes.append(scene_of[im["id"]])
    if not crops:
        raise ProbeError(f"{coco_json}: no object box of at least {MIN_CROP_SIDE} px to crop")
    names = [c["name"] for c in coco["categories"]]
    return (np.stack(crops), np.asarray(labels, np.int64), np.asarray(scenes, np.int64), names, skipped)


@torch.no_grad()
def _features(backbone: nn.Module, crops: np.ndarray, batch_size: int, device: str) -> np.ndarray:
    backbone = backbone.to(device).eval()
    out = []
    for lo in range(0, len(crops), batch_size):
        x = torch.from_numpy(crops[lo:lo + batch_size]).permute(0, 3, 1, 2).float().div_(255.0)
        out.append(backbone(normalize(x).to(device)).float().flatten(1).cpu())
    return torch.cat(out).numpy()


def object_crop_probe(backbone: nn.Module, coco_json: str, image_size: int, *, image_dir: Optional[str] = None,
                      test_fraction: float = 0.5, seed: int = 0, batch_size: int = 256,
                      device: str = "cpu") -> dict:
    """Top-1 of a linear probe on object crops (fitted on the crops of one part of the scenes,
    scored on the rest); returns {"top1", "train_crops", "test_crops", "skipped_boxes", "classes",
    "wd"}."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"test_fraction must be in (0, 1), got {test_fraction}")
    crops, labels, scenes, names, skipped = read_object_crops(coco_json, image_dir, image_size)
    n_scenes = int(scenes.max()) + 1
    order = np.random.default_rng(seed).permutation(n_scenes)
    is_test = np.zeros(n_scenes, bool)
    is_test[order[:int(round(test_fraction * n_scenes))]] = True
    test = is_test[scenes]
    if test.all() or not test.any():
        raise ProbeError(f"{coco_json}: {n_scenes} scenes are too few to split into probe-training and test scenes")
    feats = _features(backbone, crops, batch_size, device)
    probe = linear_probe(feats[~test], labels[~test], feats[test], labels[test], seed=seed,
                         num_classes=len(names))
    return {"top1": probe.test_top1, "train_crops": int((~test).sum()), "test_crops": int(test.sum()),
            "skipped_boxes": skipped, "classes": names, "wd": probe.wd}
