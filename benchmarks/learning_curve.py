"""Does more compute teach the encoder the object? MoCo v2 checkpoints along one long schedule.

    python benchmarks/learning_curve.py [--work runs/learning_curve] [--budgets 10,30,100,300]
                                        [--runs vanilla,+OA-Crop,+BG-Mixup] [--seed 0]
                                        [--schedule-epochs N] [--quick] [--list]

On the demo data with the recipe of benchmarks/fidelity.py (half-width ResNet-18, 64 px, batch
256, base lr 0.06) and MoCo v2's own crop scale (0.2, 1), three runs of one seed share one
cosine schedule that spans the largest budget (``--budgets``, epochs): vanilla, +OA-Crop and
+BG-Mixup (p 0.4), both object-aware runs on ground-truth masks. Each run trains to a budget
(``--max-steps``: the schedule still spans the largest), its checkpoint is kept as
``ckpt_e<N>.pt`` and evaluated: linear probe on the biased train originals, top-1 on val and on
every Background-Challenge variant, BG-gap, and the diagnostic foreground probe (a probe fitted
and scored on halves of mixed_rand: how much of the object the features hold). The runs advance
budget by budget, all three to 10 epochs, then all three to 30, ..., so the comparison is
complete at every budget reached; the vanilla run alone would be the issue's minimum.

Every step is skipped when its output exists and training resumes from the run's checkpoint,
so an interrupted benchmark continues where it stopped (``kill -STOP``/``-CONT`` pauses it).
After each evaluation benchmarks/results/learning_curve.{json,md,png} are rewritten. Settings
are the fidelity benchmark's (chosen on val); the Background Challenge is only reported.
``--runs`` trains a subset of the three (by label); ``--seed`` another seed (its results are
learning_curve_s<seed>.*); ``--schedule-epochs`` a schedule longer than the largest budget, so a
second seed can stop at 100 epochs of the same 300-epoch schedule as the first;
``--seeds-summary`` sets the seeds' files side by side (learning_curve_seeds.md). ``--quick``:
budgets 1, 2 on the tiny profile (a smoke run, minutes).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import shutil
import sys
from typing import Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
sys.path.insert(0, HERE)

from fidelity import LRS, P_MIX, PROFILES, Bench, Run, _write_json, bg_mixup_met  # noqa: E402
from throughput import git_state, machine  # noqa: E402

CROP_SCALE = (0.2, 1.0)  # MoCo v2's published recipe (facebookresearch/moco main_moco.py, aug_plus)
BUDGETS = (10, 30, 100, 300)
COLUMNS = ("val", "only_fg", "mixed_same", "mixed_rand")
RUNS = (Run(), Run(oa_crop=True, masks="gt"), Run(bg_mixup=P_MIX, masks="gt"))


class Curve(Bench):
    """Bench's data and evaluation, with runs trained to a budget along one long schedule."""

    def __init__(self, work: str, profile: dict, budgets: List[int], log=print, schedule_epochs: int = 0):
        self.budgets = sorted(budgets)
        self.schedule_epochs = schedule_epochs or self.budgets[-1]
        p = dict(profile, budgets=list(budgets), crop_scale=list(CROP_SCALE))
        if self.schedule_epochs != self.budgets[-1]:  # recorded only then: older work folders stay resumable
            p["schedule_epochs"] = self.schedule_epochs
        super().__init__(work, p, log)

    def steps_per_epoch(self) -> int:
        from objloader.store.reader import read_manifest

        n = read_manifest(os.path.join(self.built, "train"))["counts"]["records"]
        return n // self.p["batch_size"]  # the trainer's loader drops the last partial batch

    def kept(self, run: Run, budget: int) -> str:
        return os.path.join(self.run_dir(run), f"ckpt_e{budget}.pt")

    def train_to(self, run: Run, budget: int) -> str:
        """The run's checkpoint after ``budget`` epochs of the schedule of max(budgets) epochs."""
        from objloader.cli.train import main as train_main

        kept = self.kept(run, budget)
        if os.path.isfile(kept):
            return kept
        out = self.run_dir(run)
        ckpt = os.path.join(out, "checkpoint.pt")
        argv = ["--loader", "ffcv", "--data", self.train_data(run), "--out", out, "--seed", str(run.seed),
                "--width", str(self.p["width"]), "--image-size", str(self.p["image_size"]),
                "--batch-size", str(self.p["batch_size"]), "--lr", str(LRS[run.method]),
                "--epochs", str(self.schedule_epochs), "--max-steps", str(budget * self.steps_per_epoch()),
                "--crop-scale", *(str(x) for x in CROP_SCALE), "--no-progress"]
        if run.oa_crop:
            argv.append("--oa-crop")
        if run.bg_mixup:
            argv += ["--bg-mixup", str(run.bg_mixup)]
        if os.path.isfile(ckpt):
            argv.append("--resume")
        self._step(f"training {run.name} to epoch {budget}", run.name, train_main, run.method, argv)
        tmp = kept + ".tmp"
        shutil.copyfile(ckpt, tmp)
        os.replace(tmp, kept)  # a kept checkpoint is whole or absent
        return kept

    def evaluate_at(self, run: Run, budget: int) -> dict:
        path = os.path.join(self.run_dir(run), f"eval_e{budget}", "result.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        from objloader.ssl.bgchallenge import bgchallenge_report

        ckpt = self.train_to(run, budget)
        report = self._step(f"linear probe + Background Challenge of {run.name} at epoch {budget}", run.name,
                            bgchallenge_report, ckpt, self.built, os.path.dirname(path), workers=1, log=print)
        fg = report.get("diagnostic", {}).get("fg_probe_mixed_rand")
        entry = {**dataclasses.asdict(run), "label": run.label, "epochs": budget,
                 "steps": budget * self.steps_per_epoch(),
                 "top1": {k: round(100 * v["top1"], 2) for k, v in report["accuracy"].items()},
                 "bg_gap": round(100 * report["bg_gap"], 2) if report.get("bg_gap") is not None else None,
                 "fg_probe": round(100 * fg, 2) if fg is not None else None}
        _write_json(path, entry)
        return entry


def render_md(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# Learning curve: MoCo v2 along one long schedule", "",
             f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), {doc['date']}, commit {doc['commit'].get('commit')}"
             + (" + uncommitted changes" if doc["commit"].get("uncommitted") else "") + ". "
             f"Demo data ({doc['records']['train']} train records), half-width ResNet-18, "
             f"{doc['settings']['image_size']} px, batch {doc['settings']['batch_size']}, base lr "
             f"{doc['settings']['lr']}, crop scale {tuple(doc['settings']['crop_scale'])}, seed {doc['settings']['seed']}, one cosine "
             f"schedule of {doc['settings']['schedule_epochs']} epochs; object-aware runs on ground-truth masks. "
             "Top-1 (%) of a linear probe fitted on the biased train originals; BG-gap = mixed_same - mixed_rand "
             "(smaller is less biased); fg probe: a probe fitted and scored on halves of mixed_rand (a "
             "diagnostic, not the protocol).", "",
             "| run | epochs | steps | " + " | ".join(COLUMNS) + " | BG-gap | fg probe |",
             "|---|---:|---:|" + "---:|" * (len(COLUMNS) + 2)]
    for e in sorted(doc["evaluations"], key=lambda e: (e["epochs"], e["label"] != "vanilla", e["label"])):
        cells = " | ".join(f"{e['top1'].get(c, float('nan')):.1f}" for c in COLUMNS)
        gap = "–" if e["bg_gap"] is None else f"{e['bg_gap']:.1f}"
        fg = "–" if e["fg_probe"] is None else f"{e['fg_probe']:.1f}"
        lines.append(f"| {e['label']} | {e['epochs']} | {e['steps']} | {cells} | {gap} | {fg} |")
    steps = rates(doc["evaluations"])
    if steps:
        lines += ["", "Rate between budgets: change in points per doubling of epochs, (y_b - y_a) / log2(b / a).", "",
                  "| run | epochs | " + " | ".join(RATE_COLUMNS) + " |", "|---|---|" + "---:|" * len(RATE_COLUMNS)]
        for r in steps:
            lines.append(f"| {r['label']} | {r['from']} -> {r['to']} | "
                         + " | ".join(f"{r[c]:+.1f}" for c in RATE_COLUMNS) + " |")
    if doc["missing"]:
        lines += ["", "Not yet run: " + ", ".join(doc["missing"]) + "."]
    return "\n".join(lines) + "\n"


RATE_COLUMNS = ("val", "mixed_rand", "BG-gap", "fg probe")


def _metric(e: dict, col: str):
    return {"BG-gap": e["bg_gap"], "fg probe": e["fg_probe"]}.get(col, e["top1"].get(col))


def rates(evaluations: List[dict]) -> List[dict]:
    """Per run, the change of each metric per doubling of epochs between consecutive budgets."""
    by_run: Dict[str, List[dict]] = {}
    for e in evaluations:
        by_run.setdefault(e["label"], []).append(e)
    out = []
    for label, evals in by_run.items():
        evals = sorted(evals, key=lambda e: e["epochs"])
        for a, b in zip(evals, evals[1:]):
            doublings = math.log2(b["epochs"] / a["epochs"])
            row = {"label": label, "from": a["epochs"], "to": b["epochs"]}
            for c in RATE_COLUMNS:
                ya, yb = _metric(a, c), _metric(b, c)
                row[c] = float("nan") if ya is None or yb is None else (yb - ya) / doublings
            out.append(row)
    return out


def render_png(doc: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    by_run: Dict[str, List[dict]] = {}
    for e in doc["evaluations"]:
        by_run.setdefault(e["label"], []).append(e)
    # a run is a line style and a marker (a run with one budget so far is a lone marker), a metric a colour
    styles = {"vanilla": ("-", "o", "k"), "+OA-Crop": ("--", "s", "C4"), "+BG-Mixup": (":", "^", "C5")}
    for label, evals in by_run.items():
        evals.sort(key=lambda e: e["epochs"])
        x = [e["epochs"] for e in evals]
        line, marker, colour_of_run = styles.get(label, ("-", "o", "k"))
        for c, colour in zip(("val", "only_fg", "mixed_rand"), ("C0", "C1", "C2")):
            axes[0].plot(x, [e["top1"].get(c) for e in evals], line, color=colour, marker=marker,
                         label=f"{c} ({label})")
        axes[1].plot(x, [e["bg_gap"] for e in evals], line, color=colour_of_run, marker=marker, label=label)
        axes[2].plot(x, [e["fg_probe"] for e in evals], line, color=colour_of_run, marker=marker, label=label)
    for ax, title in zip(axes, ("linear probe top-1 (%)", "BG-gap (points, lower = less biased)",
                                "foreground probe on mixed_rand (%)")):
        ax.set_xscale("log")
        ax.set_xlabel("epochs (one schedule of %d)" % doc["settings"]["schedule_epochs"])
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SEED_COLUMNS = ("val", "mixed_rand", "BG-gap", "fg probe")


def _cell(values: List[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{sum(values) / len(values):.1f} ({min(values):.1f}–{max(values):.1f})"


def render_seeds(docs: List[dict]) -> str:
    """The curves of several seeds side by side (learning_curve_seeds.md): per budget and run,
    mean (min–max) over the seeds that reached it; then +BG-Mixup against vanilla over the seeds
    both reached, with the fidelity benchmark's target (BG-gap mean >= 3 points lower and every
    seed's below every vanilla seed's, val at most 1 point lower, mixed_rand higher)."""
    docs = sorted(docs, key=lambda d: d["settings"]["seed"])
    by: Dict[tuple, Dict[int, dict]] = {}
    for doc in docs:
        for e in doc["evaluations"]:
            by.setdefault((e["epochs"], e["label"]), {})[doc["settings"]["seed"]] = e
    lines = ["# Learning curve over seeds", "",
             "One file a seed, each with its machine, date and commit: "
             + "; ".join(f"seed {d['settings']['seed']} ({results_stem(d['settings']['seed'])}.md): "
                         f"{d['machine'].get('cpu', '?')}, {d['date'][:10]}, commit {d['commit'].get('commit')}"
                         for d in docs) + ". The same recipe and schedule "
             f"({docs[0]['settings']['schedule_epochs']} epochs) in every file; trained weights also depend on "
             "the machine. Cells: mean (min–max) over the seeds that reached the budget.", "",
             "| run | epochs | seeds | " + " | ".join(SEED_COLUMNS) + " |", "|---|---:|---|" + "---:|" * len(SEED_COLUMNS)]
    order = sorted(by, key=lambda k: (k[0], k[1] != "vanilla", k[1]))
    for epochs, label in order:
        evals = by[(epochs, label)]
        cells = " | ".join(_cell([_metric(e, c) for e in evals.values() if _metric(e, c) is not None]) or "–"
                           for c in SEED_COLUMNS)
        lines.append(f"| {label} | {epochs} | {', '.join(map(str, sorted(evals)))} | {cells} |")
    lines += ["", "+BG-Mixup against vanilla over the seeds both reached (changes in points; per seed in brackets):", "",
              "| epochs | seeds | BG-gap change | every seed below | val change | mixed_rand change | target |",
              "|---:|---|---:|---|---:|---:|---|"]
    for epochs in sorted({k[0] for k in by}):
        van, mix = by.get((epochs, "vanilla"), {}), by.get((epochs, "+BG-Mixup"), {})
        seeds = sorted(set(van) & set(mix))
        if not seeds:
            continue

        def change(col):
            # the mean of the per-seed changes, from unrounded figures (fidelity's _paired rounds first)
            d = [_metric(mix[s], col) - _metric(van[s], col) for s in seeds]
            return sum(d) / len(d), "[" + ", ".join(f"{x:+.1f}" for x in d) + "]"

        (d_gap, per_gap), (d_val, per_val), (d_rand, per_rand) = change("BG-gap"), change("val"), change("mixed_rand")
        below = max(mix[s]["bg_gap"] for s in seeds) < min(van[s]["bg_gap"] for s in seeds)
        met = bg_mixup_met(d_gap, below, d_val, d_rand)
        lines.append(f"| {epochs} | {', '.join(map(str, seeds))} | {d_gap:+.1f} {per_gap} | {'yes' if below else 'no'} | "
                     f"{d_val:+.1f} {per_val} | {d_rand:+.1f} {per_rand} | {'met' if met else 'missed'} |")
    return "\n".join(lines) + "\n"


def write_seeds(results: str) -> str:
    """learning_curve_seeds.md from every seed's JSON in ``results``; returns its path."""
    names = sorted(n for n in os.listdir(results) if re.fullmatch(r"learning_curve(_s\d+)?\.json", n))  # the names results_stem gives
    docs = []
    for n in names:
        with open(os.path.join(results, n), encoding="utf-8") as f:
            docs.append(json.load(f))
    if not docs:
        raise SystemExit(f"learning_curve: no learning_curve*.json in {results}")
    path = os.path.join(results, "learning_curve_seeds.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_seeds(docs))
    return path


def results_stem(seed: int) -> str:
    return "learning_curve" if seed == 0 else f"learning_curve_s{seed}"


def write_results(doc: dict, results: str) -> None:
    os.makedirs(results, exist_ok=True)
    stem = os.path.join(results, results_stem(doc["settings"]["seed"]))
    _write_json(stem + ".json", doc)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(render_md(doc))
    if doc["evaluations"]:
        render_png(doc, stem + ".png")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=os.path.join(REPO, "runs", "learning_curve"))
    ap.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="epochs at which checkpoints are kept")
    ap.add_argument("--runs", default=",".join(r.label for r in RUNS), help="which runs, by label")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schedule-epochs", type=int, default=0,
                    help="epochs the cosine schedule spans (default: the largest budget)")
    ap.add_argument("--quick", action="store_true", help="the tiny profile, budgets 1,2: a smoke run")
    ap.add_argument("--results", default=RESULTS)
    ap.add_argument("--list", action="store_true", help="print the plan and exit")
    ap.add_argument("--render", action="store_true", help="rewrite the .md and .png from the results' JSON and exit")
    ap.add_argument("--seeds-summary", action="store_true",
                    help="write learning_curve_seeds.md from every seed's JSON in --results and exit")
    args = ap.parse_args(argv)
    profile = PROFILES["tiny" if args.quick else "full"]
    budgets = [1, 2] if args.quick else [int(b) for b in args.budgets.split(",") if b.strip()]
    if not budgets or min(budgets) < 1:
        ap.error("--budgets: positive epoch counts, e.g. 10,30,100,300")
    labels = [x.strip() for x in args.runs.split(",") if x.strip()]
    unknown = sorted(set(labels) - {r.label for r in RUNS})
    if unknown or not labels:
        ap.error(f"--runs: labels among {', '.join(r.label for r in RUNS)}; got {args.runs!r}")
    if args.seed < 0:
        ap.error("--seed: a non-negative integer")
    if args.schedule_epochs and args.schedule_epochs < max(budgets):
        ap.error(f"--schedule-epochs {args.schedule_epochs}: at least the largest budget, {max(budgets)}")
    runs = [dataclasses.replace(r, seed=args.seed) for r in RUNS if r.label in labels]
    plan = [(run, b) for b in sorted(budgets) for run in runs]
    if args.seeds_summary:
        print(write_seeds(args.results))
        return 0
    if args.render:
        with open(os.path.join(args.results, results_stem(args.seed) + ".json"), encoding="utf-8") as f:
            write_results(json.load(f), args.results)
        return 0
    if args.list:
        for run, b in plan:
            print(f"{run.name} to epoch {b}")
        return 0
    curve = Curve(args.work, profile, budgets, schedule_epochs=args.schedule_epochs)
    curve.ensure_data()
    from objloader.store.reader import read_manifest

    evaluations, missing = [], []
    for k, (run, b) in enumerate(plan):
        print(f"[{k + 1}/{len(plan)}] {run.name}, epoch {b}", flush=True)
        evaluations.append(curve.evaluate_at(run, b))
        missing = [f"{r.label} at epoch {e}" for r, e in plan[k + 1:]]
        doc = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "commit": git_state(), "command": " ".join(["python", "benchmarks/learning_curve.py", *(argv or sys.argv[1:])]),
               "records": {"train": read_manifest(os.path.join(curve.built, "train"))["counts"]["records"]},
               "settings": {"image_size": profile["image_size"], "batch_size": profile["batch_size"],
                            "width": profile["width"], "lr": LRS["moco"], "crop_scale": list(CROP_SCALE),
                            "schedule_epochs": curve.schedule_epochs, "budgets": sorted(budgets), "p_mix": P_MIX,
                            "seed": args.seed,
                            "steps_per_epoch": curve.steps_per_epoch()},
               "evaluations": evaluations, "missing": missing}
        write_results(doc, args.results if not args.quick else os.path.join(args.work, "results"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
