"""objloader-export CKPT OUT.pth: a checkpoint's backbone as a torchvision ResNet state_dict.

    objloader-export runs/moco/checkpoint.pt moco_r18.pth
    python -c "import torch, torchvision; torchvision.models.resnet18().load_state_dict(torch.load('moco_r18.pth', weights_only=True))"

CKPT is any checkpoint objloader reads (a trainer's, official MoCo, torchvision, timm, solo-learn,
lightly). OUT holds torchvision's key names and nothing else, with an all-zero ``fc`` (1000
classes): an SSL encoder has no classifier, and zeros cannot pass for a trained one. It loads
with strict=True into ``torchvision.models.resnet18()`` / ``resnet50()`` when the backbone is
torchvision's network (width 64, 7x7 stem); a --width other than 64 or --small-stem changes
tensor shapes, so such a backbone is refused unless --any-shape, which writes it with the same
key names for a network built with those shapes (objloader reads it back with its width and stem).
"""
from __future__ import annotations

import argparse
import io
import os
import sys

from .args import Parser


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="objloader-export", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint to read (any format objloader-cam reads)")
    p.add_argument("out", metavar="OUT.pth", help="file to write: the backbone as a torchvision state_dict")
    p.add_argument("--any-shape", action="store_true",
                   help="also write a backbone whose width is not 64 or whose stem is the small one: torchvision's "
                        "key names, this network's shapes (it then does not load into torchvision's resnetXX())")
    return p


def export(checkpoint: str, out: str, any_shape: bool = False) -> dict:
    """Write ``checkpoint``'s backbone to ``out``; returns its metadata (arch, width, source_format, ...)."""
    import torch

    from objloader.checkpoint import CheckpointError, DEFAULT_WIDTH, load_backbone, torchvision_state_dict
    from objloader.fileio import FileWriteError, write_atomic

    net, meta = load_backbone(checkpoint)
    if not any_shape and (meta["width"] != DEFAULT_WIDTH or meta["small_stem"]):
        raise CheckpointError(f"{checkpoint!r} holds a {meta['arch']} with width {meta['width']} and "
                              f"small_stem={meta['small_stem']}: torchvision's {meta['arch']}() has width "
                              f"{DEFAULT_WIDTH} and the 7x7 stem, so it would not load; pass --any-shape to write "
                              "it anyway")
    buf = io.BytesIO()
    torch.save(torchvision_state_dict(net, meta["arch"], meta["width"]), buf)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    try:
        write_atomic(out, lambda f: f.write(buf.getbuffer()))
    except FileWriteError as e:
        raise CheckpointError(f"backbone not exported: {e}") from None
    return meta


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    from objloader.checkpoint import DEFAULT_WIDTH
    from objloader.errors import ObjloaderError

    try:
        meta = export(args.checkpoint, args.out, args.any_shape)
    except ObjloaderError as e:
        print(f"objloader-export: error: {e}", file=sys.stderr)
        return 2
    shape = "" if meta["width"] == DEFAULT_WIDTH and not meta["small_stem"] else (
        f" (width {meta['width']}, small_stem={meta['small_stem']}: not torchvision's shapes)")
    print(f"wrote {args.out}: torchvision {meta['arch']} state_dict{shape} from {args.checkpoint} "
          f"({meta['source_format']}); fc is all zeros (no classifier)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
