"""objloader-train-moco / objloader-train-byol (and train/moco.py, train/byol.py): the command
line of the trainer in objloader.ssl.trainer, and its default data, the demo's train split,
generated and built on first use. Multi-process: ``torchrun --nproc_per_node N train/moco.py ...``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional

from ..checkpoint import ARCHS
from ..errors import ConfigError, ObjloaderError
from ..loaders import ENGINES
from ..sources.demo import generate_demo
from ..runtime import ranks
from ..ssl.methods import recipe
from ..ssl.trainer import CROP_SCALE, TrainConfig, train
from ..store import BuildOptions, build
from ..store.schema import MANIFEST_FILE
from .args import Parser, device, ranged

__all__ = ["build_parser", "main", "moco", "byol", "demo_train_path"]

DEMO_WAIT_S = 3 * 3600  # the other processes wait this long for the first one's demo build


def demo_train_path(root: Optional[str] = None, log: Callable = print) -> str:
    """``ROOT/demo/built/train``, generated (objloader-demo) and built (objloader-build --masks gt)
    first when it does not exist, as ``make demo`` does. ROOT defaults to the current directory
    (never the package's own folder: an installed package lives in site-packages)."""

    root = os.path.abspath(root or os.getcwd())
    data, built = os.path.join(root, "demo", "data"), os.path.join(root, "demo", "built")
    train = _demo_train_dir(root)
    if os.path.isfile(os.path.join(train, MANIFEST_FILE)):
        return train
    if not os.path.isfile(os.path.join(data, "demo.json")):
        log(f"generating the demo data in {data} (first use; takes a few minutes)")
        generate_demo(data, overwrite=True)
    log(f"building {built} from {data}")
    build(data, built, BuildOptions(masks="gt"), overwrite=True)
    return train


def _demo_train_dir(root: str) -> str:
    return os.path.join(root, "demo", "built", "train")


def _default_data(log: Callable) -> str:
    """The demo's train split under the current directory. Under torchrun the first process of
    each machine generates and builds it (minutes, once); the others wait for its manifest.
    torchrun stops them if that process fails."""
    if ranks().local_rank == 0:
        return demo_train_path(log=log)
    train_dir = _demo_train_dir(os.path.abspath(os.getcwd()))
    deadline = time.monotonic() + DEMO_WAIT_S
    while not os.path.isfile(os.path.join(train_dir, MANIFEST_FILE)):
        if time.monotonic() > deadline:
            raise ConfigError(f"waited {DEMO_WAIT_S} s for {train_dir} from local rank 0; pass --data")
        time.sleep(2)
    return train_dir


def build_parser(method: str) -> argparse.ArgumentParser:
    """The flags of train/{method}.py, mapped 1:1 onto :class:`TrainConfig`."""

    D = TrainConfig(method=method)
    R = {name: ranged(r) for name, r in TrainConfig.RANGES.items()}  # each numeric flag's type
    rec = recipe(method)  # what differs between the methods (objloader/ssl/methods.py)
    desc = rec.description
    p = Parser(
        prog=f"train/{method}.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=desc + " Multi-process: torchrun --nproc_per_node N train/" + method + ".py ... "
                    "(gloo on CPU, nccl on CUDA; each rank reads its own shard; --batch-size is per rank).")
    p.add_argument("--loader", default=D.loader, choices=list(ENGINES), help="loading engine")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="a built dataset directory; None: demo/built/train under the current directory, "
                        "generated and built on first use")
    p.add_argument("--oa-crop", action="store_true", help="OA-Crop: crop each sample's views inside one of its boxes")
    p.add_argument("--crop-scale", type=ranged(CROP_SCALE), nargs=2, default=list(rec.crop_scale), metavar=("MIN", "MAX"),
                   help="RandomResizedCrop's (min, max) area fraction of the region a view is cut from (this "
                        "method's recipe by default)")
    p.add_argument("--bg-mixup", type=R["bg_mixup"], default=D.bg_mixup, metavar="P",
                   help="per-view BG-Mixup probability (the paper uses 0.4 with MoCo v2)")
    p.add_argument("--bg-mode", default=D.bg_mode, choices=["soft", "hard"], help="soft BG-Mixup or BG-HardMix")
    p.add_argument("--arch", default=D.arch, choices=list(ARCHS), help="torchvision ResNet backbone")
    p.add_argument("--small-stem", action="store_true", help="3x3 stride-1 stem without max-pool (low resolutions)")
    p.add_argument("--width", type=R["width"], default=D.width, help="base channels of the ResNet (64 = torchvision)")
    p.add_argument("--image-size", type=R["image_size"], default=D.image_size, help="side of the views in pixels")
    p.add_argument("--epochs", type=R["epochs"], default=D.epochs, help="epochs (the cosine schedule spans them)")
    p.add_argument("--batch-size", type=R["batch_size"], default=D.batch_size, help="images per rank per step")
    p.add_argument("--lr", type=R["lr"], default=rec.base_lr,
                   help="base learning rate per 256 images (peak lr = LR x global batch / 256)")
    p.add_argument("--amp", action="store_true",
                   help="mixed precision: bfloat16 autocast on CPU, float16 + GradScaler on CUDA")
    p.add_argument("--channels-last", action="store_true",
                   help="channels-last (NHWC) memory format for the network: faster with --amp on CUDA")
    p.add_argument("--out", default=f"runs/{method}", metavar="DIR",
                   help="output directory: checkpoint.pt, metrics.jsonl, loss.png, tb/")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="continue from CKPT (no value: DIR/checkpoint.pt) at the same step")
    p.add_argument("--init", default=None, metavar="CKPT",
                   help="start the backbone from CKPT: an objloader checkpoint, the official MoCo v1/v2 format, a "
                        "torchvision or timm ResNet state_dict, or a solo-learn / lightly checkpoint (its arch, "
                        "stem and width must match this run's); heads and optimizer start fresh; ignored by --resume")
    p.add_argument("--seed", type=R["seed"], default=D.seed, help="seed of the weights and of every augmentation")
    p.add_argument("--workers", type=R["workers"], default=None,
                   help="loader CPU workers/threads per process (None: the CPUs available to this process "
                        "divided by torchrun's processes on this machine, LOCAL_WORLD_SIZE, at least 1)")
    p.add_argument("--save-every", type=R["save_every"], default=D.save_every, metavar="N",
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--knn-every", type=R["knn_every"], default=D.knn_every, metavar="E",
                   help="kNN top-1 on the val split every E epochs (k 20, T 0.07; 0: off); on when a labelled "
                        "val split is found (--knn-val, or 'val' beside --data)")
    p.add_argument("--knn-bank", type=R["knn_bank"], default=D.knn_bank, metavar="N",
                   help="train records (evenly spread) whose features form the kNN bank")
    p.add_argument("--knn-val", default=None, metavar="PATH", help="the kNN monitor's labelled query split")
    p.add_argument("--log-every", type=R["log_every"], default=D.log_every, metavar="N", help="metrics.jsonl line every N steps")
    p.add_argument("--max-steps", type=R["max_steps"], default=None, metavar="N",
                   help="stop after N steps (the schedule still spans --epochs)")
    rec.add_flags(p, D, R)
    p.add_argument("--ema", type=R["ema"], default=rec.ema, help=rec.ema_help)
    p.add_argument("--device", type=device, default=None, help="cpu or cuda[:i] (None: cuda:LOCAL_RANK when available, else cpu)")
    p.add_argument("--dist-timeout", type=R["dist_timeout"], default=D.dist_timeout, metavar="S",
                   help="under torchrun: seconds a rank waits in a collective for the others before every rank "
                        "stops with an error (a stopped or hung rank would otherwise stall the run)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(method: str, argv=None) -> int:
    args = build_parser(method).parse_args(argv)
    kw = {k: v for k, v in vars(args).items() if k != "no_progress"}
    kw["crop_scale"] = tuple(kw["crop_scale"])
    try:
        if kw["data"] is None:
            kw["data"] = _default_data(print if ranks().main else (lambda *a, **k: None))
        train(TrainConfig(method=method, progress=not args.no_progress, **kw))
    except ObjloaderError as e:
        print(f"train/{method}.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def moco(argv=None) -> int:
    return main("moco", argv)


def byol(argv=None) -> int:
    return main("byol", argv)
