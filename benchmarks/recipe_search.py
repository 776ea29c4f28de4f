"""The small-compute recipe search: which data and training settings let a vanilla MoCo v2 run of
at most about 10 minutes on a 2-core CPU learn the *object*, not only the background.

    python benchmarks/recipe_search.py [--work runs/recipe_search] [--only NAME,...] [--list]

Each candidate is (demo data options, training options). For each, in order: generate the demo
data (`objloader-demo`, once per data variant), build it with ground-truth masks, pre-train
vanilla MoCo v2 (`train/moco.py`), then the linear probe + Background-Challenge report
(`train/linear.py`), whose diagnostic probe on halves of mixed_rand says whether the features
*contain* the object, while only_fg / mixed_rand of the protocol say whether a probe trained on
the biased originals *uses* it. Every step is skipped when its output exists and training resumes
from its checkpoint, so an interrupted search continues where it stopped. After each finished
run, benchmarks/results/recipe_search.json and .md are rewritten with every finished run.

Settings are chosen on val and the diagnostic; the Background-Challenge variants are reported.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# Demo data variants: objloader-demo options (bg_bias, variation). "v1" is the generator's
# behaviour before the recipe search (background always from the class's own pool, objects of a
# class differing only in pose, scale, hue and pattern parameters).
DATA = {
    "v1": {"bg_bias": 1.0, "variation": 0.0, "object_area": [0.1, 0.5], "bg_scenes": 0},
    "v2": {"bg_bias": 0.5, "variation": 1.0, "object_area": [0.1, 0.5], "bg_scenes": 0},
    "v3": {"bg_bias": 0.5, "variation": 1.0, "object_area": [0.3, 0.7], "bg_scenes": 0},
    "v4": {"bg_bias": 0.5, "variation": 1.0, "object_area": [0.3, 0.7], "bg_scenes": 16},
}

# The training settings every candidate starts from (the probe: half-width ResNet-18,
# 64 px, batch 256, base lr 0.06; 30 epochs of the 5,400 demo images is what fits 10 minutes on 2
# CPU cores at the ~270 img/s measured), then what each candidate changes.
BASE = {"width": 32, "image_size": 64, "batch_size": 256, "lr": 0.06, "epochs": 30, "loader": "ffcv"}
CANDIDATES = [
    ("v2", "v2", {}),
    ("v3", "v3", {}),
    ("v3-m0.99", "v3", {"ema": 0.99}),
    ("v3-init", "v3", {"max_steps": 1}),  # control: the encoder as initialised (one step)
    ("v4", "v4", {}),
    ("v4-m0.99", "v4", {"ema": 0.99}),
    # more steps in the same time: batch 128 at the same peak lr (base 0.12 x 128 / 256 = 0.06)
    ("v3-b128-m0.99", "v3", {"batch_size": 128, "lr": 0.12, "ema": 0.99}),
    ("v3-lr0.24-m0.99", "v3", {"lr": 0.24, "ema": 0.99}),
    ("v4-init", "v4", {"max_steps": 1}),
    ("v1", "v1", {}),
]


def _run(cmd: list, log_path: str) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if r.returncode != 0:
        raise SystemExit(f"recipe_search: command failed (rc {r.returncode}), see {log_path}")


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def ensure_data(work: str, name: str) -> str:
    """The built demo folder of data variant ``name`` (generated and built once)."""
    from objloader.store.schema import MANIFEST_FILE  # the venv's objloader, as _bin's commands

    opts = DATA[name]
    data, built = os.path.join(work, "data", name), os.path.join(work, "built", name)
    log = os.path.join(work, f"data_{name}.log")
    if not os.path.isfile(os.path.join(data, "demo.json")):
        _run([_bin("objloader-demo"), data, "--overwrite", "--no-progress", "--multi", "50",
              "--bg-bias", str(opts["bg_bias"]), "--variation", str(opts["variation"]),
              "--object-area", *map(str, opts["object_area"]), "--bg-scenes", str(opts["bg_scenes"])], log)
    if not os.path.isfile(os.path.join(built, MANIFEST_FILE)):
        _run([_bin("objloader-build"), data, built, "--masks", "gt", "--overwrite"], log)
    return built


def run_candidate(work: str, name: str, data_name: str, changes: dict) -> dict:
    settings = {**BASE, **changes}
    built = ensure_data(work, data_name)
    out = os.path.join(work, "runs", name)
    log = os.path.join(work, f"run_{name}.log")
    os.makedirs(out, exist_ok=True)
    if not os.path.isfile(os.path.join(out, "loss.png")):  # loss.png is written last
        cmd = [sys.executable, "train/moco.py", "--data", os.path.join(built, "train"), "--out", out,
               "--loader", settings["loader"], "--width", str(settings["width"]),
               "--image-size", str(settings["image_size"]), "--batch-size", str(settings["batch_size"]),
               "--lr", str(settings["lr"]), "--epochs", str(settings["epochs"]), "--no-progress"]
        for key in ("ema", "temperature", "max_steps"):  # optional: the trainer's defaults otherwise
            if key in settings:
                cmd += [f"--{key.replace('_', '-')}", str(settings[key])]
        if os.path.isfile(os.path.join(out, "checkpoint.pt")):
            cmd.append("--resume")
        _run(cmd, log)
    if not os.path.isfile(os.path.join(out, "report.json")):
        _run([sys.executable, "train/linear.py", "--checkpoint", os.path.join(out, "checkpoint.pt"),
              "--data", built, "--device", "cpu"], log)
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [m for m in (json.loads(line) for line in f if line.strip()) if "loss" in m]  # not kNN lines
    top1 = {k: round(100 * v["top1"], 2) for k, v in report["accuracy"].items()}
    return {"name": name, "data": {"variant": data_name, **DATA[data_name]}, "train": settings,
            "train_seconds": _train_seconds(log), "final_loss": round(metrics[-1]["loss"], 3) if metrics else None,
            "img_per_s": round(sorted(m["img_per_s"] for m in metrics)[len(metrics) // 2], 1) if metrics else None,
            "top1": top1, "bg_gap": round(100 * report["bg_gap"], 2) if report.get("bg_gap") is not None else None,
            "fg_probe": round(100 * report["diagnostic"]["fg_probe_mixed_rand"], 2)
            if report.get("diagnostic", {}).get("fg_probe_mixed_rand") is not None else None,
            "shuffle_bn": report.get("checkpoint_meta", {}).get("shuffle_bn")}


def _train_seconds(log_path: str):
    """Seconds of the last finished training, from the trainer's 'done: N steps in X s' line."""
    seconds = None
    with open(log_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("done: ") and " steps in " in line:
                seconds = float(line.split(" steps in ")[1].split(" s")[0])
    return seconds


COLUMNS = ("val", "original", "only_fg", "mixed_same", "mixed_rand", "only_bg_t")


def write_results(runs: list, pending: list) -> None:
    from throughput import git_state, machine  # the throughput benchmark's records of both

    os.makedirs(RESULTS, exist_ok=True)
    doc = {"machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           **git_state(), "base": BASE, "data_variants": DATA, "runs": runs, "pending": pending}
    with open(os.path.join(RESULTS, "recipe_search.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    lines = [f"# Recipe search ({doc['date']}, commit {doc['commit']}, {doc['machine']['cores']} CPUs, "
             f"{doc['machine']['cpu']})", "",
             "Vanilla MoCo v2, linear probe fitted on the biased train originals (the Background-Challenge "
             "protocol); `fg probe` is the diagnostic probe fitted and scored on halves of mixed_rand. "
             "Top-1 in %, chance = 11.1. Base settings: " + json.dumps(BASE) + ".", "",
             "| run | data (bg_bias, variation, object area, bg scenes) | changes | train s | loss | "
             + " | ".join(COLUMNS) + " | BG-gap | fg probe |",
             "|---|---|---|---:|---:|" + "---:|" * len(COLUMNS) + "---:|---:|"]
    for r in runs:
        changes = {k: v for k, v in r["train"].items() if BASE.get(k) != v}
        cells = " | ".join(f"{r['top1'].get(c, float('nan')):.1f}" for c in COLUMNS)
        d = r["data"]
        lines.append(f"| {r['name']} | {d['variant']} ({d['bg_bias']}, {d['variation']}, {d['object_area']}, "
                     f"{d['bg_scenes']}) "
                     f"| {json.dumps(changes) if changes else '-'} | {r['train_seconds'] or float('nan'):.0f} "
                     f"| {r['final_loss']} | {cells} | {r['bg_gap']} | {r['fg_probe']} |")
    if pending:
        lines += ["", "Not run yet: " + ", ".join(pending)]
    with open(os.path.join(RESULTS, "recipe_search.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=os.path.join("runs", "recipe_search"),
                   help="folder for the data, checkpoints and logs (relative to the current directory)")
    p.add_argument("--only", default=None, help="comma-separated candidate names (default: all, in order)")
    p.add_argument("--list", action="store_true", help="list the candidates and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, data, changes in CANDIDATES:
            print(f"{name}: data {data} {DATA[data]}, training {({**BASE, **changes})}")
        return 0
    wanted = args.only.split(",") if args.only else [c[0] for c in CANDIDATES]
    unknown = set(wanted) - {c[0] for c in CANDIDATES}
    if unknown:
        p.error(f"unknown candidates: {', '.join(sorted(unknown))}")
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    runs, todo = [], [c for c in CANDIDATES if c[0] in wanted]
    for i, (name, data, changes) in enumerate(todo):
        t0 = time.time()
        print(f"[{i + 1}/{len(todo)}] {name}", flush=True)
        runs.append(run_candidate(work, name, data, changes))
        write_results(runs, [c[0] for c in todo[i + 1:]])
        print(f"[{i + 1}/{len(todo)}] {name} done in {time.time() - t0:.0f} s: "
              f"{json.dumps({k: runs[-1][k] for k in ('top1', 'bg_gap', 'fg_probe')})}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
