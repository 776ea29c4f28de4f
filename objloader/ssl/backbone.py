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

__all__ = ["CHECKPOINT_FORMAT", "ARCHS", "build_backbone", "feature_dim", "load_backbone", "load_encoder", "CheckpointError"]

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


def _read_checkpoint(path: str, map_location) -> dict:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path!r} is not an objloader checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


def _backbone_of(path: str, ckpt: dict) -> nn.Module:
    net = build_backbone(ckpt["arch"], ckpt["small_stem"])
    try:
        net.load_state_dict(ckpt["backbone"])
    except RuntimeError as e:
        raise CheckpointError(f"{path!r}: backbone weights do not fit {ckpt['arch']} "
                              f"(small_stem={ckpt['small_stem']}): {e}") from e
    return net


def _meta(ckpt: dict) -> dict:
    return {k: v for k, v in ckpt.items() if not isinstance(v, (dict, torch.Tensor))}


def load_backbone(path: str, map_location="cpu") -> tuple[nn.Module, dict]:
    """The encoder of a trainer checkpoint, and the checkpoint's metadata (no tensors)."""
    ckpt = _read_checkpoint(path, map_location)
    return _backbone_of(path, ckpt), _meta(ckpt)


# The projection each method trains its contrastive / predictive objective on, as the prefix of
# its parameters in the trainer's model state: MoCo v2's MLP head, BYOL's online projector.
PROJECTION_PREFIX = {"moco": "head.", "byol": "projector."}


def load_encoder(path: str, map_location="cpu") -> tuple[nn.Module, nn.Module, dict]:
    """(backbone, projection head, metadata) of a trainer checkpoint: what ContraCAM explains.

    The head is rebuilt from the shapes of its weights, so it needs no trainer config.
    """
    ckpt = _read_checkpoint(path, map_location)
    method = ckpt.get("method")
    if method not in PROJECTION_PREFIX or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path!r} holds no MoCo or BYOL model state (method {method!r}); "
                              "ContraCAM needs the projection head a trainer checkpoint carries")
    prefix = PROJECTION_PREFIX[method]
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    try:
        if method == "moco":  # Linear - ReLU - Linear
            head = nn.Sequential(nn.Linear(*state["0.weight"].shape[::-1]), nn.ReLU(),
                                 nn.Linear(*state["2.weight"].shape[::-1]))
        else:  # Linear - BatchNorm1d - ReLU - Linear
            hidden = state["0.weight"].shape[0]
            head = nn.Sequential(nn.Linear(*state["0.weight"].shape[::-1]), nn.BatchNorm1d(hidden), nn.ReLU(),
                                 nn.Linear(*state["3.weight"].shape[::-1]))
        head.load_state_dict(state)
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path!r}: the {method} projection head cannot be rebuilt: {e}") from e
    return _backbone_of(path, ckpt), head, _meta(ckpt)
