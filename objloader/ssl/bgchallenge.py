"""Background-Challenge report (Xiao et al. 2021) of a trained encoder on a built collection:
the demo's (`objloader-build demo/data demo/built`) or the published challenge's
(`objloader-build BG_ROOT OUT` on <root>/<variant>/val/<class>/ + <root>/original/train/<class>/,
see objloader.sources.bgchallenge). Both hold the same names, so both are reported the same way.

One linear probe is fitted on the frozen features of `train`; it is scored on `val` and on every
`bgchallenge/<variant>` dataset. BG-gap = acc(mixed_same) - acc(mixed_rand): how much the
classifier leans on a background typical of the class (smaller is less biased).

That protocol measures whether a probe trained on the biased originals *uses* the object. A
separate diagnostic measures whether the features *contain* it: a probe fitted on half of
`mixed_rand` (objects over other classes' backgrounds, so the background says nothing) and
scored on the other half (``report["diagnostic"]["fg_probe_mixed_rand"]``). It is not part of
the Background Challenge and must not be used to choose settings for it.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from objloader.errors import DatasetError
from objloader.store.integrity import read_manifest
from objloader.store.schema import MANIFEST_FILE

from ..checkpoint import load_backbone
from .features import extract_features
from .linear import linear_probe, stratified_split

__all__ = ["find_eval_datasets", "bgchallenge_report", "format_report"]

BG_SAME, BG_RAND = "mixed_same", "mixed_rand"


def find_eval_datasets(root: str) -> Dict[str, str]:
    """name -> dataset dir for `train`, `val` and each `bgchallenge/<variant>` under a built root."""
    if not os.path.isdir(root):
        raise DatasetError(f"data folder {root!r} does not exist (build the demo data with `make demo`, or a "
                           "Background-Challenge root with `objloader-build ROOT OUT`)")
    names: List[str] = []
    if os.path.isfile(os.path.join(root, MANIFEST_FILE)):
        m = read_manifest(root)
        if m.get("kind") != "collection":
            raise DatasetError(f"{root!r} is a single dataset; the report needs a built demo folder or "
                               "Background-Challenge root holding train, val and bgchallenge/<variant>")
        names = list(m["datasets"])
    else:  # datasets built one by one into the same folder
        names = [n for n in ("train", "val") if os.path.isdir(os.path.join(root, n))]
        bg = os.path.join(root, "bgchallenge")
        if os.path.isdir(bg):
            names += [f"bgchallenge/{v}" for v in sorted(os.listdir(bg)) if os.path.isdir(os.path.join(bg, v))]
    found = {n: os.path.join(root, n) for n in names if n in ("train", "val") or n.startswith("bgchallenge/")}
    for need in ("train", "val"):
        if need not in found:
            raise DatasetError(f"{root!r} has no built {need!r} dataset; the report needs train and val"
                               + (" (a Background-Challenge root gives train from original/train/<class>/)"
                                  if need == "train" else ""))
    for path in found.values():
        read_manifest(path)  # a clear error for a missing or interrupted dataset
    return found


def bgchallenge_report(checkpoint: str, data_root: str, out_dir: str, *, image_size: Optional[int] = None,
                       batch_size: int = 256, workers: int = 2, device: str = "cpu", seed: int = 0,
                       log: Callable = print) -> dict:
    """Fit the probe on train, score val and every variant; write report.json and report.md to out_dir."""
    datasets = find_eval_datasets(data_root)
    backbone, meta = load_backbone(checkpoint)
    size = int(image_size or meta.get("image_size") or 224)
    t0 = time.time()

    classes = None
    feats = {}
    for name, path in datasets.items():
        ds_classes = read_manifest(path).get("classes", [])
        if classes is None:
            classes = ds_classes
        elif ds_classes != classes:
            raise DatasetError(f"{path!r}: classes {ds_classes} differ from train's {classes}; "
                               "the probe's labels would not mean the same thing")
        log(f"extracting features: {name}")
        feats[name] = extract_features(backbone, path, size, batch_size=batch_size, workers=workers, device=device)

    xtr, ytr = feats["train"]
    xva, yva = feats["val"]
    log("fitting the linear probe (weight-decay sweep)")
    probe = linear_probe(xtr, ytr, xva, yva, seed=seed, num_classes=len(classes) or None)

    accuracy = {}
    for name, (x, y) in feats.items():
        if name == "train":
            continue
        accuracy[name.split("/", 1)[-1]] = {"top1": probe.accuracy(x, y), "records": int(len(y))}
    have_gap = BG_SAME in accuracy and BG_RAND in accuracy
    diagnostic = {}
    rand = f"bgchallenge/{BG_RAND}"
    if rand in feats:  # does the encoder contain the object? (see the module docstring)
        x, y = feats[rand]
        fit, held_out = stratified_split(y, 0.5, seed)
        # the probe chooses its weight decay on a split of the fitted half: some class needs two examples
        if len(held_out) and len(set(y[fit].tolist())) > 1 and np.bincount(y[fit]).max() >= 2:
            fg = linear_probe(x[fit], y[fit], x[held_out], y[held_out], seed=seed, num_classes=len(classes) or None)
            diagnostic["fg_probe_mixed_rand"] = fg.test_top1
    report = {
        "checkpoint": os.path.abspath(checkpoint),
        "checkpoint_meta": {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None},
        "data": os.path.abspath(data_root),
        "image_size": size,
        "classes": classes,
        "train_records": int(len(ytr)),
        "probe": {"wd": probe.wd, "val_acc_per_wd": {f"{k:.3g}": v for k, v in probe.val_acc.items()},
                  "seed": seed},
        "accuracy": accuracy,
        "bg_gap": accuracy[BG_SAME]["top1"] - accuracy[BG_RAND]["top1"] if have_gap else None,
        "diagnostic": diagnostic,
        "seconds": round(time.time() - t0, 3),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(format_report(report) + "\n")
    return report


def format_report(report: dict) -> str:
    """The report as a Markdown table (top-1 in %), with the BG-gap below it."""
    meta = report.get("checkpoint_meta", {})
    lines = [f"Linear probe + Background Challenge: {os.path.basename(report['checkpoint'])} "
             f"({meta.get('method', '?')}, {meta.get('arch', '?')}, {report['image_size']} px), "
             f"probe wd {report['probe']['wd']:.3g} fitted on {report['train_records']} train records",
             "", "| dataset | records | top-1 (%) |", "|---|---:|---:|"]
    for name, a in report["accuracy"].items():
        lines.append(f"| {name} | {a['records']} | {100 * a['top1']:.2f} |")
    gap = report.get("bg_gap")
    lines.append("")
    lines.append(f"BG-gap = acc({BG_SAME}) - acc({BG_RAND}) = "
                 + (f"{100 * gap:.2f} points" if gap is not None else f"n/a ({BG_SAME} or {BG_RAND} missing)"))
    fg = report.get("diagnostic", {}).get("fg_probe_mixed_rand")
    if fg is not None:
        lines.append(f"Diagnostic (not the protocol): a probe fitted and scored on halves of {BG_RAND} "
                     f"reaches {100 * fg:.2f} %: how much of the object the features hold")
    return "\n".join(lines)


def format_comparison(baseline: dict, report: dict, names=("baseline", "this run")) -> str:
    """Two reports side by side (top-1 in %, the difference, and the BG-gap): the demo's vanilla
    vs object-aware table. A lower BG-gap means less reliance on the background."""
    def run(r):
        m = r.get("checkpoint_meta", {})
        return f"{os.path.basename(os.path.dirname(r['checkpoint']))} ({m.get('method', '?')}, step {m.get('step', '?')})"

    lines = [f"{names[0]}: {run(baseline)}; {names[1]}: {run(report)}", "",
             f"| dataset | {names[0]} top-1 (%) | {names[1]} top-1 (%) | difference |", "|---|---:|---:|---:|"]
    for name, a in report["accuracy"].items():
        if name in baseline["accuracy"]:
            x, y = 100 * baseline["accuracy"][name]["top1"], 100 * a["top1"]
            lines.append(f"| {name} | {x:.2f} | {y:.2f} | {y - x:+.2f} |")
    ga, gb = baseline.get("bg_gap"), report.get("bg_gap")
    if ga is not None and gb is not None:
        lines.append(f"| **BG-gap** ({BG_SAME} - {BG_RAND}) | {100 * ga:.2f} | {100 * gb:.2f} | {100 * (gb - ga):+.2f} |")
    return "\n".join(lines)
