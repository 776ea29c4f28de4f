"""Localisation quality of ContraCAM masks against ground truth (objloader-cam --eval).

Metrics, on built datasets that carry gt_mask / gt_boxes (the demo's val and multi sets):
- mask mIoU: the soft mask binarised at a threshold tau, IoU with the ground-truth mask, averaged
  over images; reported for every tau of the sweep and at the best tau.
- MaxBoxAccV2 (Choe et al. 2020, "Evaluating Weakly Supervised Object Localization Methods Right"):
  at threshold tau, every connected region of the binarised mask gives a box; an image is a hit
  at IoU level delta when one of its boxes overlaps one ground-truth box with IoU >= delta.
  MaxBoxAcc(delta) is the best hit rate over tau; MaxBoxAccV2 the mean over delta in {0.3, 0.5, 0.7}.
- object recall: the fraction of all ground-truth instances (not images) matched by a predicted
  box at IoU >= 0.5, best over tau. On multi-object scenes it says whether a method finds more
  than the most salient object, which is what iterative refinement is for.

Variants: a centre-prior baseline (a Gaussian bump in the middle of the image, no model) alone
and refined by the CRF (what the CRF finds without ContraCAM), ContraCAM without the ReLU on
channel weights, single-step, single-step + CRF (what a single-object build stores with
--iterations 1), iterative, and iterative + CRF.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from typing import Dict, List, Optional

import cv2
import numpy as np
from tqdm import tqdm

from ..cam.geometry import box_iou, mask_to_boxes
from ..cam.settings import CamSettings
from ..errors import DatasetError
from ..store.integrity import read_manifest
from ..store.reader import BuiltDataset, decode_npy, decode_png, decode_rgb
from ..store.schema import MEMBER

__all__ = ["THRESHOLDS", "IOU_LEVELS", "mask_miou_sweep", "max_box_acc", "object_recall", "centre_prior",
           "evaluate_localisation"]

THRESHOLDS = np.round(np.arange(0.05, 1.0, 0.05), 2)  # tau; 0 would make every mask the whole image
IOU_LEVELS = (0.3, 0.5, 0.7)
RECALL_IOU = 0.5  # a ground-truth instance is found by a predicted box at IoU >= 0.5
VARIANTS = ("centre prior", "centre prior + CRF", "no ReLU", "single-step", "single-step + CRF", "iterative",
            "iterative + CRF")


def mask_miou_sweep(pred: np.ndarray, gt: np.ndarray, thresholds=THRESHOLDS) -> np.ndarray:
    """Mean IoU over images of (pred >= tau) and gt, per tau: pred float [N, R, R] in [0, 1],
    gt bool [N, R, R] -> float [len(thresholds)]. An image where both are empty counts IoU 1."""
    gt = gt.reshape(len(gt), -1)
    out = []
    for t in thresholds:
        p = pred.reshape(len(pred), -1) >= t
        inter = (p & gt).sum(1)
        union = (p | gt).sum(1)
        out.append(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())
    return np.array(out)


def _best_ious(pred: np.ndarray, gt_boxes: List[np.ndarray], thresholds=THRESHOLDS) -> List[np.ndarray]:
    """Per image, float [len(thresholds), k]: for each of its k ground-truth boxes, the best IoU
    of a predicted box (one per connected region of pred >= tau) at each threshold tau."""
    out = []
    for m, gt in zip(pred, gt_boxes):
        m8 = np.clip(np.rint(m * 255.0), 0, 255).astype(np.uint8)
        best = np.zeros((len(thresholds), len(gt)))
        for j, t in enumerate(thresholds):
            boxes = mask_to_boxes(m8, threshold=float(t), max_boxes=1 << 20, min_area_frac=0.0)
            if len(boxes) and len(gt):
                best[j] = box_iou(boxes, gt).max(0)
        out.append(best)
    return out


def max_box_acc(pred: np.ndarray, gt_boxes: List[np.ndarray], thresholds=THRESHOLDS,
                levels=IOU_LEVELS, best_ious: Optional[List[np.ndarray]] = None) -> np.ndarray:
    """Box accuracy [len(thresholds), len(levels)]: the fraction of images with a predicted box
    (one per connected region of pred >= tau) at IoU >= delta with one of its ground-truth boxes."""
    best_ious = _best_ious(pred, gt_boxes, thresholds) if best_ious is None else best_ious
    per_image = np.stack([b.max(1) if b.shape[1] else np.zeros(len(thresholds)) for b in best_ious], axis=1)
    return np.stack([(per_image >= d).mean(1) for d in levels], axis=1)


def object_recall(pred: np.ndarray, gt_boxes: List[np.ndarray], thresholds=THRESHOLDS, iou: float = RECALL_IOU,
                  best_ious: Optional[List[np.ndarray]] = None) -> np.ndarray:
    """Object recall per threshold [len(thresholds)]: the fraction of all ground-truth instances
    matched by some predicted box (one per connected region of pred >= tau) at IoU >= ``iou``.
    Unlike MaxBoxAcc, which needs one hit per image, it rewards finding every object of a scene."""
    best_ious = _best_ious(pred, gt_boxes, thresholds) if best_ious is None else best_ious
    total = sum(b.shape[1] for b in best_ious)
    if total == 0:
        return np.zeros(len(thresholds))
    return sum((b >= iou).sum(1) for b in best_ious) / total


def centre_prior(n: int, res: int, sigma: float = 0.25) -> np.ndarray:
    """The no-model baseline: exp(-d^2 / 2 sigma^2) around the image centre (unit-square units)."""
    c = (np.arange(res) + 0.5) / res - 0.5
    d2 = c[None, :] ** 2 + c[:, None] ** 2
    return np.broadcast_to(np.exp(-d2 / (2 * sigma ** 2)).astype(np.float32), (n, res, res))


def _load_set(path: str, size: int, limit: Optional[int]):
    """Prepared images uint8 [N, S, S, 3], gt masks bool [N, R, R], gt boxes (list of [k, 4])."""
    from ..cam.masks import prepare_rgb

    ds = BuiltDataset(path)
    picked = range(len(ds))
    if limit is not None and limit < len(ds):
        # Evenly spaced, not the first N: ImageFolder records are sorted by class.
        picked = np.unique(np.linspace(0, len(ds) - 1, limit).round().astype(int))
    images, masks, boxes = [], [], []
    for i in picked:
        raw = ds.raw(i, (MEMBER.image, MEMBER.gt_mask, MEMBER.gt_boxes, MEMBER.meta))
        if MEMBER.gt_mask not in raw:
            raise DatasetError(f"{path!r} has no ground truth (gt_mask); evaluate sets built with --masks gt")
        images.append(prepare_rgb(decode_rgb(raw[MEMBER.image]), size))
        masks.append(decode_png(raw[MEMBER.gt_mask]) >= 128)
        k = json.loads(raw[MEMBER.meta])["n_gt_boxes"]
        boxes.append(decode_npy(raw[MEMBER.gt_boxes])[:k])
    ds.close()
    return np.stack(images), np.stack(masks), boxes


def _explain_set(model, settings: CamSettings, images: np.ndarray, device, pool, progress, label):
    """Every variant's soft masks float [N, R, R] for one set, in batches of settings.batch_size."""
    from ..cam.contracam import ContraCAM
    from ..cam.masks import chunk_bounds, explain_batch, n_chunks, refine_batch

    # The ablation shares the encoder: only its ContraCAM config differs.
    no_relu = ContraCAM(model.trunk, model.head,
                        dataclasses.replace(model.cfg, relu_weights=False, iterations=1))
    out = {v: [] for v in VARIANTS[1:]}
    chunks = n_chunks(len(images), settings.batch_size)
    for c in tqdm(range(chunks), desc=f"contracam eval {label}", unit="batch", disable=not progress, leave=False):
        lo, hi = chunk_bounds(len(images), settings.batch_size, c)
        rgb = images[lo:hi]
        steps = explain_batch(model, rgb, device)
        out["single-step"].append(steps[0])
        out["iterative"].append(steps[-1])
        out["no ReLU"].append(explain_batch(no_relu, rgb, device)[0])
        out["single-step + CRF"].append(refine_batch(rgb, steps[0], pool))
        out["centre prior + CRF"].append(refine_batch(rgb, centre_prior(len(rgb), settings.mask_res), pool))
        out["iterative + CRF"].append(refine_batch(rgb, steps[-1], pool))
    return {k: np.concatenate(v) for k, v in out.items()}


def _summary(pred, gt_masks, gt_boxes) -> dict:
    sweep = mask_miou_sweep(pred, gt_masks)
    ious = _best_ious(pred, gt_boxes)
    acc = max_box_acc(pred, gt_boxes, best_ious=ious)
    recall = object_recall(pred, gt_boxes, best_ious=ious)
    best = acc.max(0)
    return {
        "miou": float(sweep.max()), "miou_threshold": float(THRESHOLDS[sweep.argmax()]),
        "miou_sweep": {f"{t:.2f}": round(float(v), 4) for t, v in zip(THRESHOLDS, sweep)},
        "maxboxacc": {f"{d}": float(b) for d, b in zip(IOU_LEVELS, best)},
        "maxboxacc_threshold": {f"{d}": float(THRESHOLDS[acc[:, k].argmax()]) for k, d in enumerate(IOU_LEVELS)},
        "maxboxaccv2": float(best.mean()),
        # best over the thresholds, like MaxBoxAcc; the threshold says how fragmented the masks are
        "object_recall": float(recall.max()), "object_recall_threshold": float(THRESHOLDS[recall.argmax()]),
    }


def _set_dirs(data: str, sets: List[str]) -> Dict[str, str]:
    m = read_manifest(data)
    if m.get("kind") != "collection":
        return {os.path.basename(os.path.normpath(data)): data}
    missing = [s for s in sets if s not in m["datasets"]]
    if missing:
        raise DatasetError(f"{data!r} has no dataset {', '.join(missing)}; it holds {', '.join(m['datasets'])}")
    return {s: os.path.join(data, s) for s in sets}


def evaluate_localisation(checkpoint: str, data: str, out: str, settings: CamSettings = CamSettings(), *,
                          sets=("val", "multi"), limit: Optional[int] = None, device: Optional[str] = None,
                          workers: Optional[int] = None, progress: bool = True, plot: bool = True,
                          log=print) -> dict:
    """Evaluate every variant on each set; writes contracam_eval.{json,md} (and .png with ``plot``)
    under ``out``."""
    import torch

    from ..cam.crf import crf_pool
    from ..cam.masks import load_contracam

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, size, meta = load_contracam(checkpoint, settings, device)
    t0 = time.time()
    results, examples = {}, {}
    pool = crf_pool(workers or os.cpu_count() or 1)
    try:
        for name, path in _set_dirs(data, list(sets)).items():
            images, gt_masks, gt_boxes = _load_set(path, size, limit)
            preds = {"centre prior": centre_prior(len(images), settings.mask_res)}
            preds.update(_explain_set(model, settings, images, device, pool, progress, name))
            gt_r = np.stack([cv2.resize(g.astype(np.uint8), (settings.mask_res,) * 2,
                                        interpolation=cv2.INTER_NEAREST) for g in gt_masks]).astype(bool)
            results[name] = {"records": len(images), **{v: _summary(preds[v], gt_r, gt_boxes) for v in VARIANTS}}
            # The grid shows four images per set, spread through it (sets are sorted by class).
            shown = np.linspace(0, len(images) - 1, min(4, len(images))).round().astype(int)
            examples[name] = (images[shown], gt_r[shown], {v: preds[v][shown] for v in VARIANTS[1:]}, results[name])
            log(f"{name}: " + ", ".join(f"{v} mIoU {results[name][v]['miou']:.3f}" for v in VARIANTS))
    finally:
        if pool is not None:
            pool.shutdown()
    report = {
        "checkpoint": os.path.abspath(checkpoint), "method": meta.get("method"), "arch": meta.get("arch"),
        "width": meta.get("width"), "train_image_size": meta.get("image_size"), "input_size": size,
        "settings": settings.to_dict(),
        "data": os.path.abspath(data), "limit": limit, "thresholds": [float(t) for t in THRESHOLDS],
        "iou_levels": list(IOU_LEVELS), "seconds": round(time.time() - t0, 1), "device": str(device),
        "machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "date": time.strftime("%Y-%m-%d %H:%M"),
        "sets": results,
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "contracam_eval.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "contracam_eval.md"), "w", encoding="utf-8") as f:
        f.write(format_table(report))
    if plot:
        _plot_examples(examples, settings, os.path.join(out, "contracam_eval.png"))
    log(f"wrote {out}/contracam_eval.json, .md, .png ({report['seconds']:.0f} s)")
    return report


def format_table(report: dict) -> str:
    s = report["settings"]
    lines = [f"# ContraCAM localisation ({report['method']} {report['arch']}, input {report['input_size']} px, "
             f"T = {s['iterations']}, temperature {s['temperature']}, stride expansion {s['stride_expansion']})", "",
             f"Checkpoint `{report['checkpoint']}`; {report['machine']}, {report['date']}, {report['seconds']:.0f} s.",
             "mIoU at the best threshold of the sweep (threshold in brackets); MaxBoxAcc at IoU 0.3 / 0.5 / 0.7 "
             "(boxes of every connected region, best threshold) and their mean, MaxBoxAccV2; object recall: the "
             "fraction of ground-truth instances matched by a box at IoU >= 0.5 (best threshold in brackets).", ""]
    for name, res in report["sets"].items():
        lines += [f"## {name} ({res['records']} images)", "",
                  "| variant | mIoU | MaxBoxAcc@0.3 | @0.5 | @0.7 | MaxBoxAccV2 | object recall |",
                  "|---|---|---|---|---|---|---|"]
        for v in VARIANTS:
            r = res[v]
            b = r["maxboxacc"]
            lines.append(f"| {v} | {100 * r['miou']:.1f} ({r['miou_threshold']:.2f}) | {100 * b['0.3']:.1f} | "
                         f"{100 * b['0.5']:.1f} | {100 * b['0.7']:.1f} | {100 * r['maxboxaccv2']:.1f} | "
                         f"{100 * r['object_recall']:.1f} ({r['object_recall_threshold']:.2f}) |")
        lines += ["", "mIoU over the threshold sweep:", "",
                  "| threshold | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|"]
        for t in res[VARIANTS[0]]["miou_sweep"]:
            lines.append(f"| {t} | " + " | ".join(f"{100 * res[v]['miou_sweep'][t]:.1f}" for v in VARIANTS) + " |")
        lines.append("")
    return "\n".join(lines)


def _plot_examples(examples: dict, settings: CamSettings, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["image", "ground truth"] + list(VARIANTS[1:])
    rows = [(name, i) for name, ex in examples.items() for i in range(len(ex[0]))]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.6 * len(cols), 1.6 * len(rows)), squeeze=False)
    for r, (name, i) in enumerate(rows):
        images, gts, preds, res = examples[name]
        size = images.shape[1]
        for c, col in enumerate(cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.imshow(images[i])
            if col == "ground truth":
                ax.imshow(cv2.resize(gts[i].astype(np.float32), (size, size)), alpha=0.5, cmap="jet", vmin=0, vmax=1)
            elif col != "image":
                m = preds[col][i]
                ax.imshow(cv2.resize(m, (size, size)), alpha=0.5, cmap="jet", vmin=0, vmax=1)
                # Boxes at the threshold that gave this variant its best MaxBoxAcc@0.5.
                t = res[col]["maxboxacc_threshold"]["0.5"]
                for x0, y0, x1, y1 in mask_to_boxes(np.clip(np.rint(m * 255), 0, 255).astype(np.uint8),
                                                    threshold=t, max_boxes=8, min_area_frac=0.01) * size:
                    ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="white", lw=1.2))
            if r == 0:
                ax.set_title(col, fontsize=7)
            if c == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
