"""objloader-viz OUT --out grid.png: records drawn with their mask overlay, boxes (green) and
background rectangle (red), to check by eye that geometry and images line up."""
from __future__ import annotations

import argparse
import os
import sys

import cv2
import numpy as np

from ..errors import ObjloaderError
from ..ranges import SEED, Range
from ..store import open_dataset, read_manifest
from .args import Parser, ranged

# objloader-viz's numeric flags: a grid of at most 1024 tiles of at most 1024 px a side
RANGES = {"n": Range(int, 1, 1024), "cols": Range(int, 1, 64), "size": Range(int, 16, 1024), "seed": SEED}


def draw_record(rec: dict, size: int = 160) -> np.ndarray:
    """BGR tile: image with the mask tinted blue, boxes green, bg_rect red."""
    img = cv2.resize(cv2.cvtColor(rec["image"], cv2.COLOR_RGB2BGR), (size, size), interpolation=cv2.INTER_AREA)
    m = cv2.resize(rec["mask"], (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)[..., None] / 255
    tint = np.array([255, 120, 0], np.float32)
    tile = (img * (1 - 0.45 * m) + tint * 0.45 * m).astype(np.uint8)

    def rect(r, colour):
        x0, y0, x1, y1 = (np.asarray(r) * (size - 1)).round().astype(int)
        if x1 > x0 and y1 > y0:
            cv2.rectangle(tile, (x0, y0), (x1, y1), colour, 2)

    for b in rec["boxes"][: rec["n_boxes"]]:
        rect(b, (0, 220, 0))
    rect(rec["bg_rect"], (0, 0, 255))
    return tile


def grid(path: str, n: int = 16, cols: int = 4, size: int = 160, seed: int = 0) -> np.ndarray:
    ds = open_dataset(path)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(ds), size=min(n, len(ds)), replace=False))
    tiles = [draw_record(ds[int(i)], size) for i in idx]
    while len(tiles) % cols:
        tiles.append(np.zeros_like(tiles[0]))
    rows = [np.concatenate(tiles[r:r + cols], axis=1) for r in range(0, len(tiles), cols)]
    return np.concatenate(rows, axis=0)


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="objloader-viz", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("dataset", help="built dataset (or a collection: its 'train' dataset is shown, see --split)")
    p.add_argument("--out", default="grid.png", help="PNG to write")
    p.add_argument("--split", default=None, help="dataset inside a collection, e.g. train, multi, bgchallenge/mixed_rand")
    p.add_argument("-n", type=ranged(RANGES["n"]), default=16, help="records to draw")
    p.add_argument("--cols", type=ranged(RANGES["cols"]), default=4)
    p.add_argument("--size", type=ranged(RANGES["size"]), default=160, help="tile side in pixels")
    p.add_argument("--seed", type=ranged(RANGES["seed"]), default=0, help="which records are drawn")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        path = args.dataset
        if args.split:
            path = os.path.join(path, args.split)
        elif (manifest := read_manifest(path)).get("kind") == "collection":
            names = list(manifest["datasets"])
            path = os.path.join(path, "train" if "train" in names else names[0])
        img = grid(path, args.n, args.cols, args.size, args.seed)
    except ObjloaderError as e:
        print(f"objloader-viz: error: {e}", file=sys.stderr)
        return 2
    if not cv2.imwrite(args.out, img):
        print(f"objloader-viz: error: cannot write {args.out!r}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
