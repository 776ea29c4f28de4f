"""What the online kNN monitor costs an epoch, at the demo recipe.

    python benchmarks/knn_cost.py --data runs/learning_curve/built/train [--epochs 2] [--knn-bank 1000]

Trains MoCo v2 with the fidelity benchmark's recipe (half-width ResNet-18, 64 px, batch 256, FFCV
engine) for ``--epochs`` epochs twice, the kNN monitor off and on (every ``--knn-every`` epochs,
the trainers' default; the val split beside ``--data`` as queries), and reports the monitor's
seconds per evaluation (logged by the trainer) against the seconds of a steady training epoch
(the run without it: records per epoch / its median images/s), and that share per epoch.
Writes benchmarks/results/knn_cost.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import git_state, machine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 256  # the fidelity recipe's batch


def _train(data: str, out: str, epochs: int, knn_every: int, knn_bank: int) -> float:
    from objloader.cli.train import main as train_main

    t = time.perf_counter()
    rc = train_main("moco", ["--loader", "ffcv", "--data", data, "--out", out, "--width", "32", "--image-size", "64",
                             "--batch-size", str(BATCH), "--lr", "0.06", "--epochs", str(epochs), "--knn-every", str(knn_every),
                             "--knn-bank", str(knn_bank), "--save-every", "0", "--no-progress"])
    if rc:
        raise SystemExit(f"knn_cost: training failed (rc {rc})")
    return time.perf_counter() - t


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a built train split with a labelled val split beside it")
    p.add_argument("--epochs", type=int, default=2)
    from objloader.ssl.trainer import TrainConfig

    p.add_argument("--knn-bank", type=int, default=TrainConfig.knn_bank)
    p.add_argument("--knn-every", type=int, default=TrainConfig.knn_every)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        off = _train(args.data, os.path.join(tmp, "off"), args.epochs, 0, args.knn_bank)
        on = _train(args.data, os.path.join(tmp, "on"), args.epochs, args.knn_every, args.knn_bank)
        with open(os.path.join(tmp, "on", "metrics.jsonl"), encoding="utf-8") as f:
            knn = [r for r in (json.loads(ln) for ln in f if ln.strip()) if "knn_top1" in r]
        with open(os.path.join(tmp, "off", "metrics.jsonl"), encoding="utf-8") as f:
            steps = [r for r in (json.loads(ln) for ln in f if ln.strip()) if "loss" in r]
    from objloader.store.reader import BuiltDataset

    records = len(BuiltDataset(args.data)) // BATCH * BATCH
    rates = sorted(r["img_per_s"] for r in steps[1:])  # the first line holds the pipeline's start
    epoch_s = records / rates[len(rates) // 2]
    per_eval = [r["knn_seconds"] for r in knn]
    share = sum(per_eval) / len(per_eval) / epoch_s / args.knn_every
    result = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_state(), "command": " ".join(["python", "benchmarks/knn_cost.py", *(argv or sys.argv[1:])]),
              "data": args.data, "epochs": args.epochs, "knn_bank": args.knn_bank, "knn_every": args.knn_every,
              "train_seconds": {"knn_off": off, "knn_on": on}, "epoch_seconds": epoch_s,
              "knn_seconds_per_evaluation": per_eval, "knn_top1": [r["knn_top1"] for r in knn],
              "share_of_an_epoch": share}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "knn_cost.json"), "w") as f:
        json.dump(result, f, indent=1)
    m = result["machine"]
    md = (f"# The kNN monitor's cost\n\n{m.get('cpu', '?')} ({m.get('cores', '?')} cores), {result['date']}, "
          f"commit {result['commit']['commit']}{' + uncommitted changes' if result['commit'].get('uncommitted') else ''}. "
          f"MoCo v2, fidelity recipe (half-width ResNet-18, 64 px, batch 256, FFCV), {args.data}, {args.epochs} epochs "
          f"with the monitor off and on (every {args.knn_every} epoch(s), bank {args.knn_bank} train records, the val split as queries).\n\n"
          f"| figure | value |\n|---|---:|\n| steady training epoch, s (monitor off) | {epoch_s:.1f} |\n"
          f"| one kNN evaluation, s | {', '.join(f'{s:.1f}' for s in per_eval)} |\n"
          f"| its share of an epoch (one evaluation every {args.knn_every} epoch(s)) | {100 * share:.1f} % |\n"
          f"| whole run off / on, s | {off:.1f} / {on:.1f} |\n")
    with open(os.path.join(args.out, "knn_cost.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
