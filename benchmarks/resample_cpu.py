"""Where the FFCV and torch engines' compiled resampler (objloader/loaders/resample.py) spends
its time, per source image: 2 views at --size px, the same plus their 2 masks, one background
patch at --size / 2.

    python benchmarks/resample_cpu.py [--images 64] [--size 112] [--reps 9]

Single-threaded, on decoded demo images (demo/data/train, generated first if missing), median
of --reps passes over --images images after one warm-up pass. Run it with PYTHONPATH=<worktree>
at an older commit to compare implementations: before the column tables the resampler took no
scratch arguments, and the script passes none there.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import time

import cv2
import numpy as np

from objloader.loaders import resample

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "demo", "data", "train"))
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args(argv)
    files = sorted(glob.glob(os.path.join(args.data, "*", "*.jpg")))[: args.images]
    if not files:
        p.error(f"no JPEG images under {args.data}/<class>/; run objloader-demo {os.path.dirname(args.data)}")
    images = [np.ascontiguousarray(cv2.cvtColor(cv2.imread(f), cv2.COLOR_BGR2RGB)) for f in files]
    s = args.size
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 256, (64, 64, 1), dtype=np.uint8)
    window = np.array([[0.1, 0.1, 0.8, 0.9], [0.2, 0.0, 1.0, 0.7]], np.float32)
    flip = np.array([True, False])
    views, masks = np.empty((2, 3, s, s), np.uint8), np.empty((2, 1, s, s), np.uint8)
    no_masks = np.empty((0, 1, s, s), np.uint8)
    patch = np.empty((3, s // 2, s // 2), np.uint8)
    bg_rect = np.array([0.0, 0.0, 0.3, 0.4], np.float32)
    tables = resample.table_arrays(s) if hasattr(resample, "table_arrays") else ()
    cases = {
        "2 views": lambda im: resample.crop_views_into(im, mask, window, flip, views, no_masks,
                                                       np.zeros(2, bool), *tables),
        "2 views + 2 masks": lambda im: resample.crop_views_into(im, mask, window, flip, views, masks,
                                                                 np.ones(2, bool), *tables),
        "background patch": lambda im: resample.cut_patch_into(im, bg_rect, patch, *tables),
    }
    h, w = images[0].shape[:2]
    print(f"{len(images)} images of {h} x {w} px -> {s} px views, {s // 2} px patch; one thread; "
          f"median of {args.reps} passes")
    for name, case in cases.items():
        for im in images:  # compile and warm up
            case(im)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for im in images:
                case(im)
            times.append(time.perf_counter() - t0)
        print(f"{name:20s} {1e6 * statistics.median(times) / len(images):7.1f} us/image", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
