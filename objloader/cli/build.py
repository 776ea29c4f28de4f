"""objloader-build SRC OUT: bake images, masks, boxes and background patches into FFCV and
WebDataset datasets. objloader-build --verify OUT: re-read everything through FFCV and DALI.

SRC is an ImageFolder tree or flat folder of images, a COCO instances json, a list file, a
folder written by objloader-demo, or a Background-Challenge root as Xiao et al. 2021 publish it
(ROOT/<variant>/val/<class>/, ROOT/original/train/<class>/; the last two build into one dataset
per split and variant, see objloader.sources.bgchallenge).

Ground-truth masks come from the source (masks beside ImageFolder images as `<stem>.mask.png`,
COCO segmentations, a list file's third column) or, with `--gt-masks DIR`, from a parallel mask
tree: the mask of SRC/a/b/x.jpg is DIR/a/b/x.png (or .bmp, .jpg, .jpeg), as CUB-200-2011's
images/ + segmentations/ and DUTS's Image/ + Mask/ folders ship them. An image without its mask,
with two, or with one that cannot be read or differs in size is skipped and listed with the
reason in the manifest. See objloader.sources.imagefolder.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError, ObjloaderError
from ..store import BuildOptions, build
from ..ranges import WORKERS, Range
from .args import Parser, ranged
from .cam import add_cam_arguments, cam_settings

_D = BuildOptions()
_R = {name: ranged(r) for name, r in BuildOptions.RANGES.items()}
_WORKERS = Range(int, 1, WORKERS.hi, why=WORKERS.why)  # build processes: at least one


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="objloader-build",
        description="Build an object-aware dataset (data.beton + shards/*.tar + manifest.json) from an "
                    "ImageFolder tree or flat image folder, a COCO instances json, a list file, an objloader-demo "
                    "folder or a Background-Challenge root (<root>/<variant>/val/<class>/, "
                    "<root>/original/train/<class>/: one dataset per split and variant).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("src", nargs="?", help="source: ImageFolder dir or flat image dir, COCO .json, list file, "
                                          "objloader-demo dir, or Background-Challenge root")
    p.add_argument("out", nargs="?", help="output dataset directory")
    p.add_argument("--verify", metavar="OUT", help="verify a built dataset through FFCV and DALI, then exit")
    p.add_argument("--formats", default="ffcv,wds", help="comma-separated: ffcv, wds")
    p.add_argument("--masks", default=_D.masks, choices=["gt", "none", "contracam"],
                   help="gt: ground-truth masks of the source; none: full masks (no object knowledge); "
                        "contracam: unsupervised ContraCAM masks (needs --checkpoint or --cam-masks)")
    p.add_argument("--checkpoint", default=None, metavar="CKPT",
                   help="--masks contracam: run ContraCAM with this train/moco.py or train/byol.py checkpoint, or a "
                        "pretrained ResNet (official MoCo, torchvision, timm, solo-learn, lightly; see objloader-cam)")
    p.add_argument("--cam-masks", default=None, metavar="DIR",
                   help="--masks contracam: take the masks of an earlier objloader-cam run")
    p.add_argument("--gt-masks", default=None, metavar="DIR",
                   help="--masks gt, SRC an image folder: take the ground-truth masks from the parallel tree DIR "
                        "(CUB-200-2011 segmentations/, DUTS *-Mask/): the mask of SRC/a/b/x.jpg is DIR/a/b/x.png "
                        "(same relative path and stem; .png, .bmp, .jpg or .jpeg; a pixel is object when > 0, "
                        "in a JPEG mask when >= 128). An image with no such mask, two of them, or one that cannot "
                        "be read or differs in size from the image is skipped with its reason in the manifest; "
                        "masks beside the images are not used")
    p.add_argument("--max-res", type=_R["max_res"], default=_D.max_res, help="long side of stored images")
    p.add_argument("--mask-res", type=_R["mask_res"], default=_D.mask_res, help="side M of the stored [M, M] masks")
    p.add_argument("--max-boxes", type=_R["max_boxes"], default=_D.max_boxes, help="boxes per record (K)")
    p.add_argument("--bg-patch", default=_D.bg_patch, choices=["maxrect", "strip"],
                   help="background rectangle: largest empty rectangle, or the reference code's strip")
    p.add_argument("--jpeg-quality", type=_R["jpeg_quality"], default=_D.jpeg_quality)
    p.add_argument("--min-size", type=_R["min_size"], default=_D.min_size, help="skip images with a side below this")
    p.add_argument("--max-pixels", type=_R["max_pixels"], default=_D.max_pixels, help="skip images with more pixels")
    p.add_argument("--box-margin", type=_R["box_margin"], default=_D.box_margin, help="grow boxes by this fraction per side")
    p.add_argument("--min-box-area", type=_R["min_box_area"], default=_D.min_box_area,
                   help="drop mask components below this fraction of the image")
    p.add_argument("--shard-size", type=_R["shard_size"], default=_D.shard_size, help="records per WebDataset shard")
    p.add_argument("--workers", type=ranged(_WORKERS), default=None, help="processes (default: all cores)")
    p.add_argument("--on-error", default="skip", choices=["skip", "fail"],
                   help="bad inputs: skip and report them in the manifest, or stop")
    p.add_argument("--follow-links", action="store_true",
                   help="read files outside SRC that links in an image folder, or a list file's '../' and absolute "
                        "paths, lead to (by default each is skipped and listed in the manifest); a file reached by "
                        "two paths still makes one record")
    p.add_argument("--coco-images", default=None, help="image folder of a COCO json (default: images/ beside it)")
    p.add_argument("--coco-allow-outside", action="store_true",
                   help="read COCO file names that lead outside the images folder (absolute, or through '..'); "
                        "without it such an image is skipped, named in the manifest")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_cam_arguments(p, prefix="cam-")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.verify:
            from ..store.verify import verify

            verify(args.verify)
            return 0
        if not args.src or not args.out:
            parser().error("SRC and OUT are required (or --verify OUT)")
        if args.gt_masks is not None and args.masks != "gt":
            raise ConfigError(f"--gt-masks gives ground-truth masks and needs --masks gt, not --masks {args.masks}")
        opts = BuildOptions(masks=args.masks, max_res=args.max_res, mask_res=args.mask_res,
                            max_boxes=args.max_boxes, bg_patch=args.bg_patch, jpeg_quality=args.jpeg_quality,
                            min_size=args.min_size, max_pixels=args.max_pixels, box_margin=args.box_margin,
                            min_box_area=args.min_box_area, shard_size=args.shard_size)
        contracam = None
        if args.checkpoint or args.cam_masks:
            from ..cam.masks import ContraCAMMasks  # torch and the CRF load only when asked for

            contracam = ContraCAMMasks(checkpoint=args.checkpoint, store=args.cam_masks,
                                       settings=cam_settings(args, "cam-", args.mask_res) if args.checkpoint else None)
        m = build(args.src, args.out, opts, formats=[f.strip() for f in args.formats.split(",") if f.strip()],
                  workers=args.workers, on_error=args.on_error, overwrite=args.overwrite,
                  coco_images=args.coco_images, gt_masks=args.gt_masks, contracam=contracam,
                  coco_allow_outside=args.coco_allow_outside, follow_links=args.follow_links)
        if m["kind"] == "collection":
            n = sum(d["records"] for d in m["datasets"].values())
            skipped = sum(d["skipped"] for d in m["datasets"].values())
            dropped = sum(d.get("boxes_dropped", 0) for d in m["datasets"].values())
        else:
            n, skipped = m["counts"]["records"], m["counts"]["skipped"]
            dropped = m["counts"].get("boxes_dropped", 0)
        boxes = f", {dropped} boxes beyond --max-boxes dropped" if dropped else ""
        print(f"built {args.out}: {n} records, {skipped} skipped{boxes}, {m['build_seconds']:.1f} s "
              f"({n / max(m['build_seconds'], 1e-9):.0f} records/s); see {args.out}/manifest.json")
        return 0
    except ObjloaderError as e:
        print(f"objloader-build: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
