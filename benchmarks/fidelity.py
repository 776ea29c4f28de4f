"""The paper's tables in miniature, over seeds: does the object-aware loader debias anything?

    python benchmarks/fidelity.py [--quick] [--study main|bg-negatives] [--work DIR] [--list]

On the demo data and the small-compute recipe (benchmarks/recipe_search.md), in this order:
1. Localisation (Table 1 in miniature) from the vanilla MoCo v2 encoder of seed 0: mask mIoU,
   MaxBoxAccV2 and (multi-object set) object recall of the centre prior, ContraCAM variants and
   the CRF (`objloader-cam --eval`, T = 10).
2. Debiasing (Tables 4 and 7): MoCo v2 vanilla, +OA-Crop, +BG-Mixup (p 0.4, soft) and +both on
   ContraCAM masks of the vanilla encoder of the same seed, and +BG-Mixup on ground-truth masks;
   seeds 0, 1, 2, seed-major, so the main comparison is complete first. Each run: linear probe on
   the biased train originals, top-1 on val and every Background-Challenge variant, BG-gap.
3. Multi-object scenes: MoCo v2 vanilla and +OA-Crop (ground-truth boxes) pre-trained on the
   multi-object set, scored by a linear probe on object crops (scenes split in halves), 3 seeds.
4. BYOL vanilla and +both (ContraCAM masks), BG-HardMix against soft BG-Mixup: 2 seeds; then
   +OA-Crop and +both on ground-truth masks.

`--study bg-negatives` is a study of its own (results fidelity_bg_negatives.*, work folder
runs/fidelity_bg_negatives): MoCo v2 --bg-negatives (after CLAD) with and without BG-Mixup, on
ground-truth and ContraCAM masks, beside vanilla and BG-Mixup runs of the same seeds (0, 1)
trained in the same folder, since trained weights depend on the machine's CPU kernels.

Every step is skipped when its output exists and training resumes from its checkpoint, so an
interrupted benchmark continues where it stopped. After each finished run,
benchmarks/results/fidelity.{json,md,png} are rewritten with every finished run and the list of
those still missing. Settings come from the recipe search (chosen on val); the Background
Challenge is only reported. `--quick` is one seed of the main comparison at 8 epochs (~20 min).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)  # throughput.machine() / git_state()

# The recipe of benchmarks/recipe_search.py (half-width ResNet-18, 64 px, batch 256, base lr
# 0.06, 30 epochs of 5,400 images: about 8 minutes of MoCo v2 on 2 CPU cores).
PROFILES = {
    "full": {"seeds": [0, 1, 2], "extra_seeds": [0, 1], "epochs": 30, "width": 32, "image_size": 64,
             "batch_size": 256, "demo": [], "multi": 3000, "cam_limit": 400, "cam_iterations": 10},
    "quick": {"seeds": [0], "extra_seeds": [], "epochs": 8, "width": 32, "image_size": 64,
              "batch_size": 256, "demo": [], "multi": 1000, "cam_limit": 200, "cam_iterations": 10},
    # the CI test's (tests/test_fidelity.py), to keep the script alive: every step on tiny data, one
    # worker process or thread per command and feature extraction in-process, since starting
    # workers costs more than their work here (the other profiles keep each command's default)
    "tiny": {"seeds": [0], "extra_seeds": [], "epochs": 1, "width": 8, "image_size": 32, "batch_size": 16,
             "demo": ["--per-class-train", "4", "--per-class-val", "2", "--resolution", "48"], "multi": 20,
             "cam_limit": 6, "cam_iterations": 2, "workers": 1, "eval_workers": 0},
}
LRS = {"moco": 0.06, "byol": 0.05}  # base lr per 256 images: MoCo from the recipe search, BYOL its default
P_MIX = 0.4  # the paper's BG-Mixup probability for MoCo v2
LOADER = "ffcv"
# The crop scale the committed runs (and the recipe search) trained with; the trainers' MoCo v2
# default became its published (0.2, 1) later, so it is pinned here to keep runs comparable.
CROP_SCALE = (0.08, 1.0)
TOP1_COLUMNS = ("val", "original", "only_fg", "mixed_same", "mixed_rand", "only_bg_t")


@dataclasses.dataclass(frozen=True)
class Run:
    method: str = "moco"     # moco | byol
    data: str = "train"      # train (single objects, BG-challenge eval) | multi (scenes, object-crop eval)
    oa_crop: bool = False
    bg_mixup: float = 0.0
    bg_mode: str = "soft"    # soft | hard
    masks: str = "none"      # none | gt | contracam
    seed: int = 0
    bg_negatives: bool = False  # MoCo --bg-negatives (background images as extra negatives, after CLAD)

    @property
    def label(self) -> str:
        neg = "+bg-negatives" if self.bg_negatives else ""
        if not self.oa_crop and not self.bg_mixup:
            return neg or "vanilla"
        mix = "+BG-HardMix" if self.bg_mode == "hard" else "+BG-Mixup"
        return neg + ("+both" if self.oa_crop and self.bg_mixup else ("+OA-Crop" if self.oa_crop else mix))

    @property
    def config(self) -> str:
        """The run without its seed: the row of a table."""
        parts = [self.method, self.data]
        if self.oa_crop:
            parts.append("oacrop")
        if self.bg_mixup:
            parts.append(f"{self.bg_mode}mix{self.bg_mixup:g}")
        if self.bg_negatives:
            parts.append("bgneg")
        if self.masks != "none":
            parts.append(self.masks)
        return "-".join(parts)

    @property
    def name(self) -> str:
        return f"{self.config}-s{self.seed}"


def plan(profile: dict) -> List[Run]:
    """Every run, most important first (see the module docstring)."""
    cc = dict(masks="contracam")
    runs = []
    for s in profile["seeds"]:
        runs += [Run(seed=s), Run(bg_mixup=P_MIX, seed=s, **cc), Run(bg_mixup=P_MIX, masks="gt", seed=s),
                 Run(oa_crop=True, seed=s, **cc), Run(oa_crop=True, bg_mixup=P_MIX, seed=s, **cc)]
    for s in profile["seeds"]:
        runs += [Run(data="multi", seed=s), Run(data="multi", oa_crop=True, masks="gt", seed=s)]
    for s in profile["extra_seeds"]:
        runs += [Run(method="byol", seed=s), Run(method="byol", oa_crop=True, bg_mixup=P_MIX, seed=s, **cc),
                 Run(bg_mixup=P_MIX, bg_mode="hard", seed=s, **cc)]
    for s in profile["extra_seeds"]:
        runs += [Run(oa_crop=True, masks="gt", seed=s), Run(oa_crop=True, bg_mixup=P_MIX, masks="gt", seed=s)]
    return runs


def plan_bg_negatives(profile: dict) -> List[Run]:
    """MoCo v2 --bg-negatives (after CLAD) beside its baselines, trained in the same work folder at
    the same commit on the same machine (trained weights depend on the CPU's kernels, so runs of
    the main study made elsewhere are no baseline): per seed, seed-major, vanilla, then for
    ground-truth and ContraCAM masks +BG-Mixup, +bg-negatives and +bg-negatives +BG-Mixup. Seeds:
    the profile's extra seeds (0, 1 in the full profile), its seeds where it has none."""
    runs = []
    for s in profile["extra_seeds"] or profile["seeds"]:
        runs.append(Run(seed=s))
        for m in ("gt", "contracam"):
            runs += [Run(bg_mixup=P_MIX, masks=m, seed=s), Run(bg_negatives=True, masks=m, seed=s),
                     Run(bg_negatives=True, bg_mixup=P_MIX, masks=m, seed=s)]
    return runs


# study -> (plan, results stem, the targets it measures)
STUDIES = {
    "main": (plan, "fidelity", ("bg_mixup_contracam", "bg_mixup_gt", "contracam_vs_centre", "iterative_recall",
                                "oa_crop_multi")),
    "bg-negatives": (plan_bg_negatives, "fidelity_bg_negatives",
                     ("bg_mixup_gt", "bg_mixup_contracam", "bg_negatives_gt", "bg_negatives_contracam")),
}


class Bench:
    """One benchmark's work folder: data, built datasets, runs; every step idempotent."""

    def __init__(self, work: str, profile: dict, log=print, commit: Optional[str] = None):
        self.work, self.p, self.log, self.commit = work, profile, log, commit
        self.data = os.path.join(work, "data")
        self.built = os.path.join(work, "built")

    def _step(self, what: str, log_name: str, fn, *args, **kwargs):
        """Run a step in this process, its output appended to WORK/logs/<log_name>.log."""
        os.makedirs(os.path.join(self.work, "logs"), exist_ok=True)
        path = os.path.join(self.work, "logs", f"{log_name}.log")
        self.log(f"  {what} (log: {os.path.relpath(path)})")
        with open(path, "a", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            print(f"\n## {datetime.datetime.now().isoformat(timespec='seconds')} {what}", flush=True)
            try:
                rc = fn(*args, **kwargs)
            except SystemExit as e:  # a CLI's argparse or fatal error: report it with its log
                rc = e.code if isinstance(e.code, int) else 1
        if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
            raise SystemExit(f"fidelity: {what} failed (rc {rc}); see {path}")
        return rc

    def check_profile(self) -> None:
        """A work folder holds the runs of one profile: resuming with other settings would mix them."""
        path = os.path.join(self.work, "profile.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                before = json.load(f)
            if before != self.p:
                raise SystemExit(f"fidelity: {self.work} holds runs of other settings ({before}); "
                                 "pass another --work or delete it")
        else:
            os.makedirs(self.work, exist_ok=True)
            _write_json(path, self.p)

    def ensure_data(self) -> None:
        from objloader.cli import build as build_cli
        from objloader.cli import demo as demo_cli
        from objloader.store.schema import MANIFEST_FILE

        self.check_profile()
        if not os.path.isfile(os.path.join(self.data, "demo.json")):
            self._step("generating the demo data", "data", demo_cli.main,
                       [self.data, "--overwrite", "--no-progress", "--multi", str(self.p["multi"]), *self.p["demo"],
                        *self._workers()])
        if not os.path.isfile(os.path.join(self.built, MANIFEST_FILE)):
            self._step("building it with ground-truth masks", "data", build_cli.main,
                       [self.data, self.built, "--masks", "gt", "--overwrite", *self._workers()])

    def _workers(self) -> list:
        """--workers of the profile for the commands it runs (none: their defaults)."""
        return ["--workers", str(self.p["workers"])] if self.p.get("workers") else []

    def run_dir(self, run: Run) -> str:
        return os.path.join(self.work, "runs", run.name)

    def contracam_train(self, seed: int) -> str:
        """The train split with single-step ContraCAM + CRF masks of the vanilla MoCo encoder of
        ``seed`` (the training images hold one object each, as in `make demo`)."""
        from objloader.cli import build as build_cli
        from objloader.store.schema import MANIFEST_FILE

        out = os.path.join(self.work, "built_contracam", f"s{seed}")
        if not os.path.isfile(os.path.join(out, MANIFEST_FILE)):
            ckpt = self.train(Run(seed=seed))
            self._step(f"ContraCAM masks of the vanilla encoder, seed {seed}", f"contracam_s{seed}", build_cli.main,
                       [os.path.join(self.data, "train"), out, "--masks", "contracam", "--checkpoint", ckpt,
                        "--cam-iterations", "1", "--overwrite", *self._workers()])
        return out

    def train_data(self, run: Run) -> str:
        if run.data == "multi":
            if run.masks == "contracam":
                raise ValueError("multi-object runs use ground-truth boxes")
            return os.path.join(self.built, "multi")
        return self.contracam_train(run.seed) if run.masks == "contracam" else os.path.join(self.built, "train")

    def epochs(self, run: Run) -> int:
        """Multi-object runs take as many steps as single-object ones (their set is smaller)."""
        if run.data != "multi":
            return self.p["epochs"]
        from objloader.store.reader import read_manifest

        n_train = read_manifest(os.path.join(self.built, "train"))["counts"]["records"]
        n_multi = read_manifest(os.path.join(self.built, "multi"))["counts"]["records"]
        return max(1, round(self.p["epochs"] * n_train / n_multi))

    def train(self, run: Run) -> str:
        from objloader.cli.train import main as train_main

        out = self.run_dir(run)
        ckpt = os.path.join(out, "checkpoint.pt")
        if os.path.isfile(os.path.join(out, "loss.png")):  # the trainer writes it last
            return ckpt
        data = self.train_data(run)
        argv = ["--loader", LOADER, "--data", data, "--out", out, "--seed", str(run.seed),
                "--width", str(self.p["width"]), "--image-size", str(self.p["image_size"]),
                "--batch-size", str(self.p["batch_size"]), "--lr", str(LRS[run.method]),
                "--epochs", str(self.epochs(run)), "--crop-scale", *map(str, CROP_SCALE), "--no-progress",
                *self._workers()]
        if run.oa_crop:
            argv.append("--oa-crop")
        if run.bg_mixup:
            argv += ["--bg-mixup", str(run.bg_mixup), "--bg-mode", run.bg_mode]
        if run.bg_negatives:
            argv.append("--bg-negatives")
        if os.path.isfile(ckpt):
            argv.append("--resume")
        t0 = time.time()
        self._step(f"training {run.name}", run.name, train_main, run.method, argv)
        with open(os.path.join(out, "train_seconds.txt"), "a", encoding="utf-8") as f:
            f.write(f"{time.time() - t0:.1f}\n")  # one line per (resumed) part
        return ckpt

    def evaluate(self, run: Run) -> dict:
        """The run's result entry (fidelity.json schema), cached in its folder as result.json."""
        path = os.path.join(self.run_dir(run), "result.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        ckpt = self.train(run)
        entry = {**dataclasses.asdict(run), "top1": {}, "bg_gap": None, "crop_top1": None}
        if run.data == "train":
            from objloader.ssl.bgchallenge import bgchallenge_report

            report = self._step(f"linear probe + Background Challenge of {run.name}", run.name, bgchallenge_report,
                                ckpt, self.built, self.run_dir(run), workers=self.p.get("eval_workers", 1), log=print)
            entry["top1"] = {k: round(100 * v["top1"], 2) for k, v in report["accuracy"].items()}
            entry["bg_gap"] = round(100 * report["bg_gap"], 2)
        else:
            from objloader.checkpoint import load_backbone
            from objloader.ssl.crops import object_crop_probe

            backbone, meta = load_backbone(ckpt)
            res = self._step(f"object-crop probe of {run.name}", run.name, object_crop_probe, backbone,
                             os.path.join(self.data, "multi", "instances.json"), int(meta["image_size"]))
            entry["crop_top1"] = round(100 * res["top1"], 2)
            entry["crop_probe"] = {k: v for k, v in res.items() if k != "top1"}
        with open(os.path.join(self.run_dir(run), "train_seconds.txt"), encoding="utf-8") as f:
            entry["train_seconds"] = round(sum(float(line) for line in f if line.strip()), 1)
        entry["commit"] = self.commit
        _write_json(path, entry)
        return entry

    def localisation(self) -> dict:
        """Table 1 in miniature from the vanilla encoder of the first seed (cached)."""
        from objloader.cli import cam as cam_cli

        out = os.path.join(self.work, "localisation")
        path = os.path.join(out, "contracam_eval.json")
        if not os.path.isfile(path):
            ckpt = self.train(Run(seed=self.p["seeds"][0]))
            self._step("localisation of the vanilla encoder", "localisation", cam_cli.main,
                       ["--eval", "--checkpoint", ckpt, "--data", self.built, "--sets", "val,multi",
                        "--limit", str(self.p["cam_limit"]), "--iterations", str(self.p["cam_iterations"]),
                        "--out", out, "--no-progress", *self._workers()])
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
        loc = {name: {v: {"miou": round(r["miou"], 4), "maxboxacc": round(r["maxboxaccv2"], 4)}
                      for v, r in res.items() if isinstance(r, dict)} for name, res in report["sets"].items()}
        loc["multi_recall"] = {v: round(r["object_recall"], 4) for v, r in report["sets"]["multi"].items()
                               if isinstance(r, dict)}
        loc["settings"] = {"iterations": report["settings"]["iterations"], "limit": report["limit"],
                           "input_size": report["input_size"]}
        loc["commit"] = self.commit
        return loc


def _write_json(path: str, doc) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)  # a reader never sees half a file


# ---------------------------------------------------------------- tables


def _stats(values: List[float]) -> Optional[dict]:
    if not values:
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "n": len(values)}


def _cell(values: List[float]) -> str:
    s = _stats(values)
    if s is None:
        return "–"
    return f"{s['mean']:.1f}" + (f" ({s['min']:.1f}–{s['max']:.1f})" if s["n"] > 1 else "") + f" [{s['n']}]"


def _group(runs: List[dict]) -> Dict[str, List[dict]]:
    groups: Dict[str, List[dict]] = {}
    for r in runs:
        groups.setdefault(Run(**{k: r[k] for k in Run.__dataclass_fields__ if k in r}).config, []).append(r)
    return groups


def _row_name(r: dict) -> str:
    run = Run(**{k: r[k] for k in Run.__dataclass_fields__ if k in r})
    masks = {"none": "", "gt": ", ground-truth masks", "contracam": ", ContraCAM masks"}[run.masks]
    return f"{run.method.upper() if run.method == 'byol' else 'MoCo v2'} {run.label}{masks}"


def targets(runs: List[dict], loc: Optional[dict]) -> List[dict]:
    """The issue's targets, each with its figures and whether it is met (None: not yet measurable)."""
    g = _group(runs)
    out = []

    def cfg(**kw):
        return g.get(Run(**kw).config, [])

    van = cfg()
    for masks in ("contracam", "gt"):
        mix = cfg(bg_mixup=P_MIX, masks=masks)
        t = {"id": f"bg_mixup_{masks}", "target": f"BG-Mixup ({masks} masks) lowers the BG-gap by >= 3 points (mean; every seed below every "
                       "vanilla seed), val top-1 at most 1 point lower, mixed_rand higher", "met": None}
        if van and mix:
            gap_v, gap_m = [r["bg_gap"] for r in van], [r["bg_gap"] for r in mix]
            d_gap = sum(gap_m) / len(gap_m) - sum(gap_v) / len(gap_v)
            d_val = _mean(mix, "val") - _mean(van, "val")
            d_rand = _mean(mix, "mixed_rand") - _mean(van, "mixed_rand")
            separated = max(gap_m) < min(gap_v)
            t.update(figures={"bg_gap_change": round(d_gap, 2), "every_seed_below": separated,
                              "val_change": round(d_val, 2), "mixed_rand_change": round(d_rand, 2),
                              "seeds": [len(van), len(mix)]},
                     met=bg_mixup_met(d_gap, separated, d_val, d_rand))
        out.append(t)
    t = {"id": "contracam_vs_centre", "target": "ContraCAM single-step + CRF: higher mIoU than the centre prior + CRF on the multi-object set",
         "met": None}
    if loc and "multi" in loc:
        a, b = loc["multi"]["single-step + CRF"]["miou"], loc["multi"]["centre prior + CRF"]["miou"]
        t.update(figures={"single-step + CRF": a, "centre prior + CRF": b}, met=a > b)
    out.append(t)
    t = {"id": "iterative_recall", "target": "Iterative ContraCAM: higher object recall than single-step on the multi-object set", "met": None}
    if loc and "multi_recall" in loc:
        a, b = loc["multi_recall"]["iterative"], loc["multi_recall"]["single-step"]
        t.update(figures={"iterative": a, "single-step": b,
                          "iterative + CRF": loc["multi_recall"]["iterative + CRF"],
                          "single-step + CRF": loc["multi_recall"]["single-step + CRF"]}, met=a > b)
    out.append(t)
    t = {"id": "oa_crop_multi", "target": "OA-Crop raises the object-crop top-1 on the multi-object set (mean over seeds)", "met": None}
    mv, mo = cfg(data="multi"), cfg(data="multi", oa_crop=True, masks="gt")
    if mv and mo:
        a, b = [r["crop_top1"] for r in mo], [r["crop_top1"] for r in mv]
        t.update(figures={"oa_crop": round(sum(a) / len(a), 2), "vanilla": round(sum(b) / len(b), 2),
                          "seeds": [len(b), len(a)]}, met=sum(a) / len(a) > sum(b) / len(b))
    out.append(t)
    for masks in ("gt", "contracam"):  # issue 23 §3, on the study's two seeds
        t = {"id": f"bg_negatives_{masks}",
             "target": f"Background negatives ({masks} masks) lower the BG-gap against vanilla of the same seeds "
                       "(mean; every seed below every vanilla seed), val top-1 at most 1 point lower", "met": None}
        neg = cfg(bg_negatives=True, masks=masks)
        paired = _paired(neg, van)
        if paired:
            t.update(figures=paired, met=bool(paired["bg_gap_change"] < 0 and paired["every_seed_below"]
                                              and paired["val_change"] >= -1))
            on_mix = _paired(cfg(bg_negatives=True, bg_mixup=P_MIX, masks=masks), cfg(bg_mixup=P_MIX, masks=masks))
            if on_mix:  # reported beside it: the same comparison on top of BG-Mixup
                t["figures"]["with_bg_mixup_against_bg_mixup"] = on_mix
        out.append(t)
    return out


def bg_mixup_met(gap_change: float, every_seed_below: bool, val_change: float, mixed_rand_change: float) -> bool:
    """The BG-Mixup target, in points against vanilla: BG-gap at least 3 lower on the mean with every
    seed's below every vanilla seed's, val top-1 at most 1 lower, mixed_rand higher."""
    return bool(gap_change <= -3 and every_seed_below and val_change >= -1 and mixed_rand_change > 0)


def _paired(runs: List[dict], baseline: List[dict]) -> Optional[dict]:
    """Mean changes of ``runs`` against ``baseline`` over the seeds both have (None: no such seed)."""
    seeds = sorted({r["seed"] for r in runs} & {r["seed"] for r in baseline})
    if not seeds:
        return None
    a = [r for r in runs if r["seed"] in seeds]
    b = [r for r in baseline if r["seed"] in seeds]
    return {"bg_gap_change": round(sum(r["bg_gap"] for r in a) / len(a) - sum(r["bg_gap"] for r in b) / len(b), 2),
            "val_change": round(_mean(a, "val") - _mean(b, "val"), 2),
            "mixed_rand_change": round(_mean(a, "mixed_rand") - _mean(b, "mixed_rand"), 2), "seeds": seeds,
            "every_seed_below": max(r["bg_gap"] for r in a) < min(r["bg_gap"] for r in b)}


def _mean(runs: List[dict], col: str) -> float:
    return sum(r["top1"][col] for r in runs) / len(runs)


def render_md(doc: dict) -> str:
    runs, loc = doc["runs"], doc.get("localisation")
    study = "" if doc.get("study", "main") == "main" else f", {doc['study']} study"
    lines = [f"# Fidelity benchmark{study} ({doc['profile']} profile; {doc['date']}, commit {doc['commit']}, "
             f"{doc['machine']['cores']} CPUs, {doc['machine']['cpu']})", "",
             f"Recipe: {json.dumps(doc['recipe'])}. Top-1 in % (chance 11.1), linear probe fitted on the biased "
             "train originals; each cell: mean (min–max) [seeds]. BG-gap = mixed_same − mixed_rand (lower: "
             "less reliance on the background).", ""]
    if loc:
        s = loc["settings"]
        lines += [f"## Localisation (vanilla MoCo v2, seed {doc['plan_seeds'][0]}; {s['limit']} images per set, "
                  f"input {s['input_size']} px, T = {s['iterations']})", "",
                  "| variant | val mIoU | val MaxBoxAccV2 | multi mIoU | multi MaxBoxAccV2 | multi object recall |",
                  "|---|---:|---:|---:|---:|---:|"]
        for v, r in loc["val"].items():
            m = loc["multi"][v]
            lines.append(f"| {v} | {100 * r['miou']:.1f} | {100 * r['maxboxacc']:.1f} | {100 * m['miou']:.1f} | "
                         f"{100 * m['maxboxacc']:.1f} | {100 * loc['multi_recall'][v]:.1f} |")
        lines.append("")
    single = [r for r in runs if r["data"] == "train"]
    if single:
        lines += ["## Debiasing (single-object train split, Background Challenge)", "",
                  "| run | " + " | ".join(TOP1_COLUMNS) + " | BG-gap |", "|---|" + "---:|" * (len(TOP1_COLUMNS) + 1)]
        for rs in _group(single).values():
            lines.append(f"| {_row_name(rs[0])} | " + " | ".join(_cell([r["top1"][c] for r in rs]) for c in TOP1_COLUMNS)
                         + f" | {_cell([r['bg_gap'] for r in rs])} |")
        lines.append("")
    multi = [r for r in runs if r["data"] == "multi"]
    if multi:
        lines += ["## Multi-object scenes (object-crop linear probe, scenes split in halves)", "",
                  "| run | object-crop top-1 |", "|---|---:|"]
        for rs in _group(multi).values():
            lines.append(f"| {_row_name(rs[0])} | {_cell([r['crop_top1'] for r in rs])} |")
        lines.append("")
    lines += ["## Targets", ""]
    for t in doc["targets"]:
        state = {True: "met", False: "**missed**", None: "not measured yet"}[t["met"]]
        lines.append(f"- {t['target']}: {state}" + (f" — {json.dumps(t['figures'])}" if "figures" in t else ""))
    commits: Dict[str, int] = {}
    for r in runs:
        commits[r.get("commit", "?")] = commits.get(r.get("commit", "?"), 0) + 1
    if len(commits) > 1:
        lines += ["", "Runs were evaluated at more than one commit (each run's is in the json): "
                  + ", ".join(f"{c}: {n} runs" for c, n in commits.items()) + "."]
    if doc["pending"]:
        lines += ["", f"Not run yet ({len(doc['pending'])}): " + ", ".join(doc["pending"])]
    return "\n".join(lines) + "\n"


def render_png(doc: dict, path: str) -> None:
    """BG-gap and val top-1 per configuration of the single-object runs: mean bars, seed range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(_group([r for r in doc["runs"] if r["data"] == "train"]).values())
    if not groups:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(groups) + 2), sharey=True)
    names = [_row_name(rs[0]) for rs in groups]
    for ax, key, title in ((axes[0], "bg_gap", "BG-gap (points, lower is better)"),
                           (axes[1], "val", "val top-1 (%)")):
        vals = [[r["bg_gap"] if key == "bg_gap" else r["top1"]["val"] for r in rs] for rs in groups]
        means = [sum(v) / len(v) for v in vals]
        err = [[m - min(v) for m, v in zip(means, vals)], [max(v) - m for m, v in zip(means, vals)]]
        ax.barh(range(len(groups)), means, xerr=err, color="#4c72b0", capsize=3)
        for i, v in enumerate(vals):
            ax.plot(v, [i] * len(v), "k.", ms=4)
        ax.set_title(title)
    axes[0].set_yticks(range(len(groups)), names)
    axes[0].invert_yaxis()
    fig.suptitle(f"fidelity benchmark ({doc['profile']}), bars: mean, whiskers and dots: seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_results(doc: dict, results: str) -> None:
    os.makedirs(results, exist_ok=True)
    stem = STUDIES[doc.get("study", "main")][1] + ("" if doc["profile"] == "full" else f"_{doc['profile']}")
    _write_json(os.path.join(results, f"{stem}.json"), doc)
    with open(os.path.join(results, f"{stem}.md"), "w", encoding="utf-8") as f:
        f.write(render_md(doc))
    render_png(doc, os.path.join(results, f"{stem}.png"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one seed of the main comparison at 8 epochs (~20 minutes)")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the CI test's profile
    p.add_argument("--work", default=None, help="folder for data, checkpoints and logs (default: runs/<results stem>[_quick])")
    p.add_argument("--results", default=RESULTS, help="folder for fidelity[_bg_negatives].json, .md and .png")
    p.add_argument("--max-runs", type=int, default=None, help="stop after finishing N more runs (the rest stays pending)")
    p.add_argument("--list", action="store_true", help="list the runs in order and exit")
    p.add_argument("--study", choices=sorted(STUDIES), default="main",
                   help="main: the paper's tables; bg-negatives: MoCo v2 --bg-negatives against its baselines")
    args = p.parse_args(argv)
    name = "tiny" if args.tiny else "quick" if args.quick else "full"
    profile = PROFILES[name]
    plan_of, stem, target_ids = STUDIES[args.study]
    runs = plan_of(profile)
    if args.list:
        for i, r in enumerate(runs):
            print(f"{i + 1:2d}. {r.name}")
        return 0
    from throughput import git_state, machine

    work = os.path.abspath(args.work or os.path.join("runs", stem + ("" if name == "full" else f"_{name}")))
    state = git_state()
    bench = Bench(work, profile, log=lambda m: print(m, flush=True), commit=state["commit"])
    bench.ensure_data()
    recipe = {k: profile[k] for k in ("width", "image_size", "batch_size", "epochs")}
    doc = {"machine": machine(), "date": None, **state, "study": args.study, "profile": name,
           "recipe": {**recipe, "lr": LRS, "loader": LOADER, "p_mix": P_MIX}, "plan_seeds": profile["seeds"],
           "runs": [], "localisation": None, "targets": [], "pending": []}
    finished = 0
    for i, run in enumerate(runs):
        if args.max_runs is not None and finished >= args.max_runs:
            break
        t0 = time.time()
        cached = os.path.isfile(os.path.join(bench.run_dir(run), "result.json"))
        print(f"[{i + 1}/{len(runs)}] {run.name}" + (" (done before)" if cached else ""), flush=True)
        doc["runs"].append(bench.evaluate(run))
        if doc["localisation"] is None and args.study == "main":  # right after the first vanilla run
            doc["localisation"] = bench.localisation()
        finished += not cached
        done = {r.name for r in runs[:i + 1]}
        doc.update(date=datetime.datetime.now().isoformat(timespec="seconds"),
                   pending=[r.name for r in runs if r.name not in done])
        doc["targets"] = [t for t in targets(doc["runs"], doc["localisation"]) if t["id"] in target_ids]
        write_results(doc, args.results)
        if not cached:
            print(f"    {run.name}: {json.dumps({k: doc['runs'][-1][k] for k in ('top1', 'bg_gap', 'crop_top1')})} "
                  f"({time.time() - t0:.0f} s)", flush=True)
    print(render_md(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
