"""objloader-linear (and train/linear.py): linear probe + Background-Challenge report of a trained
checkpoint on a built demo folder or a built Background-Challenge root.

    objloader-linear --checkpoint runs/moco/checkpoint.pt [--data demo/built] [--out DIR]
    objloader-build bg_challenge/ built_bg/ --masks none      # Xiao et al.'s release + IN-9L train
    objloader-linear --checkpoint runs/moco/checkpoint.pt --data built_bg/

Fits one linear probe (L-BFGS, weight decay chosen on a held-out split) on the frozen features of
`train`, reports top-1 on `val` and on every `bgchallenge/<variant>`, and the BG-gap; writes
report.json and report.md into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from objloader.ranges import IMAGE_SIZE, SEED, WORKERS, Range

from .args import Parser, device, ranged

# objloader-linear's numeric flags
RANGES = {"image_size": IMAGE_SIZE, "batch_size": Range(int, 1, 65_536), "workers": WORKERS, "seed": SEED}


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="objloader-linear", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, default=None, metavar="CKPT",
                   help="checkpoint written by train/moco.py or train/byol.py, or a pretrained ResNet: the official "
                        "MoCo format, a torchvision / timm state_dict, solo-learn or lightly (see objloader-export)")
    p.add_argument("--data", default=os.path.join("demo", "built"),
                   help="built demo folder or built Background-Challenge root (objloader-build ROOT OUT) holding "
                        "train, val and bgchallenge/<variant> (relative to the current directory)")
    p.add_argument("--out", default=None, help="folder for report.json and report.md; None: the checkpoint's folder")
    p.add_argument("--image-size", type=ranged(RANGES["image_size"]), default=None,
                   help="eval resolution; None: the checkpoint's training image_size")
    p.add_argument("--batch-size", type=ranged(RANGES["batch_size"]), default=256, help="feature-extraction batch size")
    p.add_argument("--workers", type=ranged(RANGES["workers"]), default=2, help="DataLoader workers for decoding")
    p.add_argument("--device", type=device, default="cuda" if _cuda() else "cpu", help="device of the encoder")
    p.add_argument("--seed", type=ranged(RANGES["seed"]), default=0, help="seed of the 80/20 split the weight decay is chosen on")
    p.add_argument("--compare", default=None, metavar="REPORT_JSON",
                   help="report.json of another run (e.g. the vanilla baseline): also write comparison.md")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return parser().parse_args(argv)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv=None) -> int:
    args = parse_args(argv)
    from objloader.errors import ObjloaderError
    from objloader.ssl.bgchallenge import bgchallenge_report, format_comparison, format_report

    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    try:
        report = bgchallenge_report(args.checkpoint, args.data, out, image_size=args.image_size,
                                    batch_size=args.batch_size, workers=args.workers, device=args.device,
                                    seed=args.seed, log=lambda m: print(m, file=sys.stderr))
    except ObjloaderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    print(f"\nwrote {os.path.join(out, 'report.json')} and report.md", file=sys.stderr)
    if args.compare:
        with open(args.compare, encoding="utf-8") as f:
            baseline = json.load(f)
        table = format_comparison(baseline, report, ("baseline", "this run"))
        with open(os.path.join(out, "comparison.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
        print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
