"""objloader-demo OUT: write the built-in demo data set (see objloader.sources.demo)."""
from __future__ import annotations

import argparse
import sys
import time

from objloader.errors import ObjloaderError
from objloader.sources import demo

from .args import Parser, ranged

_R = {name: ranged(r) for name, r in demo.RANGES.items()}


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="objloader-demo",
        description="Generate the demo data: 9 shape classes on class-biased backgrounds with exact masks "
                    "(ImageFolder train/val), the Background Challenge variants of val, and multi-object "
                    "scenes in COCO format. Deterministic from --seed, whatever --workers.",
    )
    p.add_argument("out", help="output directory (must not exist or be empty, unless --overwrite)")
    p.add_argument("--per-class-train", type=_R["per_class_train"], default=demo.DEFAULT_PER_CLASS_TRAIN, metavar="N",
                   help="training images per class (default %(default)s)")
    p.add_argument("--per-class-val", type=_R["per_class_val"], default=demo.DEFAULT_PER_CLASS_VAL, metavar="N",
                   help="validation images per class; each also yields one image per Background "
                        "Challenge variant (default %(default)s)")
    p.add_argument("--multi", type=_R["n_multi"], default=demo.DEFAULT_N_MULTI, metavar="N",
                   help="multi-object scenes (default %(default)s)")
    p.add_argument("--resolution", type=_R["resolution"], default=demo.DEFAULT_RESOLUTION, metavar="PX",
                   help="side of the square images in pixels (default %(default)s)")
    p.add_argument("--seed", type=_R["seed"], default=0, help="random seed (default %(default)s)")
    p.add_argument("--bg-bias", type=_R["bg_bias"], default=demo.DEFAULT_BG_BIAS, metavar="P",
                   help="probability that an image's background comes from its class's own pool "
                        "(1 = the background always tells the class; default %(default)s)")
    p.add_argument("--variation", type=_R["variation"], default=demo.DEFAULT_VARIATION, metavar="S",
                   help="strength of each object's own deformation and markings, 0-2 "
                        "(0 = only pose, scale, hue and pattern vary; default %(default)s)")
    p.add_argument("--object-area", type=_R["object_area"], nargs=2, default=list(demo.DEFAULT_OBJECT_AREA), metavar=("MIN", "MAX"),
                   help="range of the fraction of the image a single object covers (default %(default)s)")
    p.add_argument("--bg-scenes", type=_R["bg_scenes"], default=demo.DEFAULT_BG_SCENES, metavar="N",
                   help="fixed background scenes per class pool, reused like a camera trap's sites "
                        "(0 = a fresh background for every image; default %(default)s)")
    p.add_argument("--workers", type=_R["workers"], default=None,
                   help="worker processes (default: all available cores)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.add_argument("--no-progress", action="store_true", help="do not show a progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    workers = args.workers if args.workers is not None else demo.default_workers()
    start = time.perf_counter()
    try:
        marker = demo.generate_demo(
            args.out,
            per_class_train=args.per_class_train,
            per_class_val=args.per_class_val,
            n_multi=args.multi,
            resolution=args.resolution,
            seed=args.seed,
            bg_bias=args.bg_bias,
            variation=args.variation,
            object_area=tuple(args.object_area),
            bg_scenes=args.bg_scenes,
            workers=workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except ObjloaderError as e:
        print(f"objloader-demo: error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    n = marker["counts"]
    print(
        f"objloader-demo: wrote {args.out} in {elapsed:.1f}s ({workers} workers, seed {args.seed}, "
        f"{args.resolution}px)\n"
        f"  train        {n['train']:6d} images, {len(marker['classes'])} classes: {', '.join(marker['classes'])}\n"
        f"  val          {n['val']:6d} images\n"
        f"  bgchallenge  {n['bgchallenge']:6d} images x {len(marker['bgchallenge_variants'])} variants: "
        f"{', '.join(marker['bgchallenge_variants'])}\n"
        f"  multi        {n['multi']:6d} scenes, {n['multi_instances']} instances (multi/instances.json)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
