"""Encoders shared by every SSL method and the evaluations, and the checkpoint contract.

A checkpoint written by the trainers is a dict loadable with ``torch.load(path, weights_only=True)``:

    {"format": CHECKPOINT_FORMAT, "method": "moco" | "byol", "arch": "resnet18" | "resnet50",
     "small_stem": bool, "image_size": int, "backbone": state_dict of build_backbone(...), ...}

plus whatever the trainer needs to resume (optimizer, queue, momentum encoder, step, RNG state).
"""

from __future__ import annotations

import os

import torch
import torchvision
from torch import nn

__all__ = ["CHECKPOINT_FORMAT", "ARCHS", "build_backbone", "feature_dim", "load_backbone", "CheckpointError"]

CHECKPOINT_FORMAT = "objloader-ssl/1"
ARCHS = ("resnet18", "resnet50")


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, or not what the caller needs."""


def build_backbone(arch: str = "resnet18", small_stem: bool = False) -> nn.Module:
    """torchvision ResNet without its classifier: images [B, 3, H, W] -> features [B, D].

    ``small_stem`` replaces the 7x7 stride-2 conv + max-pool with a 3x3 stride-1 conv (the usual
    CIFAR-size stem), so low-resolution images keep spatial detail through the network.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    net = getattr(torchvision.models, arch)(weights=None)
    if small_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def feature_dim(arch: str) -> int:
    return {"resnet18": 512, "resnet50": 2048}[arch]


def load_backbone(path: str, map_location="cpu") -> tuple[nn.Module, dict]:
    """The encoder of a trainer checkpoint, and the checkpoint's metadata (no tensors)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path!r} is not an objloader checkpoint (format {CHECKPOINT_FORMAT})")
    net = build_backbone(ckpt["arch"], ckpt["small_stem"])
    try:
        net.load_state_dict(ckpt["backbone"])
    except RuntimeError as e:
        raise CheckpointError(f"{path!r}: backbone weights do not fit {ckpt['arch']} "
                              f"(small_stem={ckpt['small_stem']}): {e}") from e
    meta = {k: v for k, v in ckpt.items() if not isinstance(v, (dict, torch.Tensor))}
    return net, meta
