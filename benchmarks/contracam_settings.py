"""Which ContraCAM input size and stride give the best masks for a checkpoint?

    python benchmarks/contracam_settings.py --checkpoint demo/runs/moco_vanilla/checkpoint.pt \
        --data demo/built --out benchmarks/results/demo_loop/contracam_settings

Runs the localisation evaluation (single step, T = 1) for every input size x stride expansion and
writes one table: mIoU and MaxBoxAccV2 of single-step ContraCAM with and without the CRF. The
defaults of objloader-cam (stride expansion on, input = 2x the training view size) come from it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from objloader.ssl.localisation import evaluate_localisation  # noqa: E402
from objloader.cam.settings import CamSettings  # noqa: E402

VARIANTS = ("single-step", "single-step + CRF")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True, help="built collection with ground truth (e.g. demo/built)")
    p.add_argument("--out", required=True)
    p.add_argument("--sizes", default="128,224", help="input sides in pixels")
    p.add_argument("--limit", type=int, default=192, help="records per set, evenly spaced")
    args = p.parse_args(argv)
    rows, raw = [], {}
    for size in [int(s) for s in args.sizes.split(",")]:
        for expand in (False, True):
            name = f"{size}px_{'stride1' if expand else 'stride2'}"
            report = evaluate_localisation(args.checkpoint, args.data, os.path.join(args.out, name),
                                           CamSettings(iterations=1, image_size=size, stride_expansion=expand),
                                           limit=args.limit, progress=False, plot=False, log=lambda *a: None)
            raw[name] = report
            for set_name, res in report["sets"].items():
                cells = " | ".join(f"{100 * res[v]['miou']:.1f} | {100 * res[v]['maxboxaccv2']:.1f}" for v in VARIANTS)
                rows.append(f"| {set_name} | {size} | {'yes' if expand else 'no'} | {cells} |")
                print(rows[-1], flush=True)
    rows.sort()
    header = ["# ContraCAM input size and stride expansion", "",
              f"Checkpoint `{args.checkpoint}`, {args.limit} records per set, evenly spaced; "
              f"{raw[next(iter(raw))]['machine']}, {raw[next(iter(raw))]['date']}.", "",
              "| set | input px | stride expansion | single-step mIoU | MaxBoxAccV2 | + CRF mIoU | + CRF MaxBoxAccV2 |",
              "|---|---:|---|---:|---:|---:|---:|"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(header + rows) + "\n")
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({k: {s: {v: r["sets"][s][v] for v in VARIANTS} for s in r["sets"]} for k, r in raw.items()}, f, indent=1)
    print(f"wrote {args.out}/summary.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
