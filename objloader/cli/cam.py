"""objloader-cam --checkpoint CKPT SRC --out MASKS: ContraCAM masks of a source (resumable,
sharded by rank under torchrun). objloader-cam --eval --checkpoint CKPT --data BUILT --out DIR:
localisation quality (mask mIoU, MaxBoxAccV2) against the ground truth of built datasets."""
from __future__ import annotations

import argparse
import sys

from ..cam.settings import CamSettings
from ..errors import ObjloaderError
from ..ranges import DIST_TIMEOUT, WORKERS, Range
from .args import Parser, device, ranged

# objloader-cam's flags outside CamSettings
RANGES = {"workers": Range(int, 1, WORKERS.hi, why=WORKERS.why), "limit": Range(int, 1, 10 ** 9),
          "dist_timeout": DIST_TIMEOUT}

def add_cam_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """The flags of :class:`objloader.cam.masks.CamSettings`; objloader-build prefixes them with 'cam-'."""
    D = CamSettings()
    R = {name: ranged(r) for name, r in CamSettings.RANGES.items()}
    g = p.add_argument_group("ContraCAM")
    g.add_argument(f"--{prefix}iterations", type=R["iterations"], default=D.iterations, metavar="T",
                   help="iterative refinement steps (paper: 10 to find several objects, 1 for one object per image)")
    g.add_argument(f"--{prefix}temperature", type=R["temperature"], default=D.temperature, help="temperature of the contrastive score")
    g.add_argument(f"--{prefix}no-relu", action="store_true",
                   help="keep negative channel weights (the ablation of negative-signal removal)")
    g.add_argument(f"--{prefix}no-stride-expansion", action="store_true",
                   help="keep the last ResNet stage at stride 2 (default: stride 1, a feature map twice as fine)")
    g.add_argument(f"--{prefix}image-size", type=R["image_size"], default=None, metavar="PX",
                   help="side of the square input (default: twice the checkpoint's training view size); at least 4 x the "
                        "trunk's stride (64 px for a ResNet with stride expansion, 128 without), for a CAM of >= 4 x 4 cells")
    g.add_argument(f"--{prefix}no-crf", action="store_true", help="skip the dense-CRF refinement")
    g.add_argument(f"--{prefix}batch-size", type=R["batch_size"], default=D.batch_size,
                   help="images per ContraCAM batch; they are each other's negatives")


def cam_settings(args, prefix: str = "", mask_res: int = 64) -> CamSettings:
    a = {k: getattr(args, (prefix + k).replace("-", "_")) for k in
         ("iterations", "temperature", "no_relu", "no_stride_expansion", "image_size", "no_crf", "batch_size")}
    return CamSettings(temperature=a["temperature"], iterations=a["iterations"], relu_weights=not a["no_relu"],
                       stride_expansion=not a["no_stride_expansion"], image_size=a["image_size"], mask_res=mask_res,
                       crf=not a["no_crf"], batch_size=a["batch_size"])


def parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="objloader-cam", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="ContraCAM (Mo et al. 2021): object masks from a MoCo v2 / BYOL checkpoint of this project "
                    "or a pretrained ResNet of another codebase, "
                    "without labels. Writes a mask store that objloader-build --masks contracam --cam-masks reads. "
                    "Multi-process: torchrun --nproc_per_node N objloader-cam ... (ranks take batches round-robin).")
    p.add_argument("src", nargs="?", help="source: ImageFolder dir, COCO .json, list file, or objloader-demo dir")
    p.add_argument("--checkpoint", required=True,
                   help="checkpoint.pt written by train/moco.py or train/byol.py, or a pretrained ResNet-18/50: the official "
                        "MoCo v1/v2 format, a torchvision or timm state_dict, solo-learn or lightly; without a "
                        "projection head, z is the backbone's pooled features")
    p.add_argument("--out", required=True, help="mask store directory (with --eval: the results directory)")
    p.add_argument("--mask-res", type=ranged(CamSettings.RANGES["mask_res"]), default=CamSettings().mask_res, help="side R of the stored [R, R] masks")
    add_cam_arguments(p)
    p.add_argument("--workers", type=ranged(RANGES["workers"]), default=None,
                   help="CRF processes; half as many (1 to 4) decode images (default: the CPUs available, divided "
                        "among torchrun's processes on this machine)")
    p.add_argument("--device", type=device, default=None, help="cpu or cuda[:i] (default: cuda:LOCAL_RANK when available)")
    p.add_argument("--overwrite", action="store_true", help="replace a store that holds masks of another run")
    p.add_argument("--dist-timeout", type=ranged(RANGES["dist_timeout"]), default=300.0, metavar="S",
                   help="under torchrun: seconds a rank waits for the others at a barrier before it stops")
    p.add_argument("--coco-images", default=None, help="image folder of a COCO json (default: images/ beside it)")
    p.add_argument("--coco-allow-outside", action="store_true",
                   help="read COCO file names that lead outside the images folder (as objloader-build's flag)")
    p.add_argument("--follow-links", action="store_true",
                   help="as objloader-build --follow-links (give both or neither): read files outside SRC that links "
                        "or list-file paths lead to")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = p.add_argument_group("evaluation (--eval)")
    e.add_argument("--eval", action="store_true",
                   help="evaluate localisation on built datasets with ground truth instead of writing masks")
    e.add_argument("--data", default=None, help="a built collection (e.g. demo/built) or dataset directory")
    e.add_argument("--sets", default="val,multi", help="datasets of the collection to evaluate")
    e.add_argument("--limit", type=ranged(RANGES["limit"]), default=None, metavar="N", help="evaluate N records of each set, evenly spaced through it")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from ..sources import open_source

    try:
        settings = cam_settings(args, mask_res=args.mask_res)
        if args.eval:
            from ..ssl.localisation import evaluate_localisation

            if not args.data:
                parser().error("--eval needs --data BUILT (a built dataset with ground-truth masks)")
            evaluate_localisation(args.checkpoint, args.data, args.out, settings,
                                  sets=[s for s in args.sets.split(",") if s], limit=args.limit,
                                  device=args.device, workers=args.workers, progress=not args.no_progress)
            return 0
        if not args.src:
            parser().error("SRC is required (or --eval --data BUILT)")
        from ..cam.masks import compute_masks

        specs = open_source(args.src, args.coco_images, coco_allow_outside=args.coco_allow_outside,
                            follow_links=args.follow_links)
        info = compute_masks(specs, args.out, args.checkpoint, settings, workers=args.workers, device=args.device,
                             overwrite=args.overwrite, progress=not args.no_progress,
                             dist_timeout=args.dist_timeout)
        n = sum(d["masked"] for d in info["datasets"].values())
        skipped = sum(len(d["skipped"]) for d in info["datasets"].values())
        print(f"objloader-cam: {n} masks, {skipped} skipped in {args.out} (see {args.out}/masks.json); build with "
              f"objloader-build {args.src} OUT --masks contracam --cam-masks {args.out}")
        return 0
    except ObjloaderError as e:
        print(f"objloader-cam: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
