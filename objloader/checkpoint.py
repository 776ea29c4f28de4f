"""Encoders shared by every SSL method and the evaluations, and the checkpoint contract.

A checkpoint written by the trainers is a dict loadable with ``torch.load(path, weights_only=True)``:

    {"format": CHECKPOINT_FORMAT, "method": "moco" | "byol", "arch": "resnet18" | "resnet50",
     "small_stem": bool, "width": int, "image_size": int, "backbone": state_dict of build_backbone(...),
     "head_prefix": str (the projection head's prefix in "model": the method's recipe), ...}

``width`` is the ResNet's base channel count (64 = torchvision's); checkpoints written before it
existed carry none and mean 64.

plus whatever the trainer needs to resume (optimizer, queue, momentum encoder, step, RNG state).
"""

from __future__ import annotations

import os

import torch
import torchvision
from torch import nn

from .errors import ConfigError, ObjloaderError

__all__ = ["CHECKPOINT_FORMAT", "ARCHS", "DEFAULT_WIDTH", "build_backbone", "feature_dim", "checkpoint_width",
           "load_backbone", "load_encoder", "CheckpointError"]

CHECKPOINT_FORMAT = "objloader-ssl/1"
ARCHS = ("resnet18", "resnet50")
DEFAULT_WIDTH = 64  # torchvision's base channels


class CheckpointError(ObjloaderError, ValueError):
    """A checkpoint that is missing, corrupt, or not what the caller needs."""


def build_backbone(arch: str = "resnet18", small_stem: bool = False, width: int = DEFAULT_WIDTH) -> nn.Module:
    """torchvision ResNet without its classifier: images [B, 3, H, W] -> features [B, D].

    ``small_stem`` replaces the 7x7 stride-2 conv + max-pool with a 3x3 stride-1 conv (the usual
    CIFAR-size stem), so low-resolution images keep spatial detail through the network.
    ``width`` is the base channel count: the stem and the four stages have width, width, 2 width,
    4 width, 8 width channels (x4 at the output of resnet50's bottleneck blocks), so
    D = :func:`feature_dim` (arch, width). 64 is torchvision's network, unchanged.
    """
    if arch not in ARCHS:
        raise ConfigError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    width = int(width)
    if width < 1:
        raise ConfigError(f"width must be >= 1, got {width}")
    net = getattr(torchvision.models, arch)(weights=None)
    if width != DEFAULT_WIDTH:
        _rewidth(net, width)
    if small_stem:
        net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def _rewidth(net: torchvision.models.ResNet, width: int) -> None:
    """Rebuild the stem and the four stages of a torchvision ResNet with ``width`` base channels,
    initialised as torchvision does (kaiming-normal fan-out convs, BN weight 1 and bias 0)."""
    block = type(net.layer1[0])
    depths = [len(getattr(net, f"layer{i}")) for i in range(1, 5)]
    net.inplanes, net.dilation = width, 1
    net.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = net._norm_layer(width)
    net.layer1 = net._make_layer(block, width, depths[0])
    net.layer2 = net._make_layer(block, 2 * width, depths[1], stride=2)
    net.layer3 = net._make_layer(block, 4 * width, depths[2], stride=2)
    net.layer4 = net._make_layer(block, 8 * width, depths[3], stride=2)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def feature_dim(arch: str, width: int = DEFAULT_WIDTH) -> int:
    """Channels of build_backbone(arch, width=width)'s output: 8 width (x4 for resnet50)."""
    return {"resnet18": 8, "resnet50": 32}[arch] * int(width)


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


def checkpoint_width(ckpt: dict) -> int:
    """The backbone width a checkpoint was written with (64 for checkpoints older than the option)."""
    return int(ckpt.get("width", DEFAULT_WIDTH))


def _backbone_of(path: str, ckpt: dict) -> nn.Module:
    width = checkpoint_width(ckpt)
    try:
        net = build_backbone(ckpt["arch"], ckpt["small_stem"], width)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path!r}: no backbone can be built from its arch/small_stem/width: {e}") from e
    try:
        net.load_state_dict(ckpt["backbone"])
    except RuntimeError as e:
        raise CheckpointError(f"{path!r}: backbone weights do not fit {ckpt['arch']} "
                              f"(small_stem={ckpt['small_stem']}, width={width}): {e}") from e
    return net


def _meta(ckpt: dict) -> dict:
    meta = {k: v for k, v in ckpt.items() if not isinstance(v, (dict, torch.Tensor))}
    meta["width"] = checkpoint_width(ckpt)
    return meta


def load_backbone(path: str, map_location="cpu") -> tuple[nn.Module, dict]:
    """The encoder of a trainer checkpoint, and the checkpoint's metadata (no tensors)."""
    ckpt = _read_checkpoint(path, map_location)
    return _backbone_of(path, ckpt), _meta(ckpt)


# The projection each method trains its contrastive / predictive objective on is named by the
# checkpoint's "head_prefix" (the method's recipe, objloader/ssl/methods.py). Checkpoints written
# before it existed are MoCo v2 (MLP head) or BYOL (online projector): these are their prefixes.
PROJECTION_PREFIX = {"moco": "head.", "byol": "projector."}


def _mlp_from_state(state: dict) -> nn.Module:
    """The nn.Sequential MLP a projection head's state_dict describes: a 2-D ``i.weight`` is a
    Linear, ``i.running_mean`` a BatchNorm1d, and an index without parameters a ReLU (the heads
    are Linear [- BatchNorm1d] - ReLU - ... - Linear)."""
    indices = sorted({int(k.split(".")[0]) for k in state})
    layers = []
    for i in range(indices[-1] + 1):
        if f"{i}.running_mean" in state:
            layers.append(nn.BatchNorm1d(state[f"{i}.running_mean"].shape[0]))
        elif f"{i}.weight" in state:
            out_features, in_features = state[f"{i}.weight"].shape
            layers.append(nn.Linear(in_features, out_features, bias=f"{i}.bias" in state))
        else:
            layers.append(nn.ReLU())
    head = nn.Sequential(*layers)
    head.load_state_dict(state)
    return head


def load_encoder(path: str, map_location="cpu") -> tuple[nn.Module, nn.Module, dict]:
    """(backbone, projection head, metadata) of a trainer checkpoint: what ContraCAM explains.

    The head is rebuilt from the shapes of its weights, so it needs no trainer config.
    """
    ckpt = _read_checkpoint(path, map_location)
    method = ckpt.get("method")
    prefix = ckpt.get("head_prefix", PROJECTION_PREFIX.get(method))
    if not isinstance(prefix, str) or not prefix or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path!r} holds no model state with a projection head (method {method!r}); "
                              "ContraCAM needs the projection head a trainer checkpoint carries")
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    try:
        if not state:
            raise KeyError(f"no parameters under {prefix!r}")
        head = _mlp_from_state(state)
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path!r}: the {method} projection head cannot be rebuilt: {e}") from e
    return _backbone_of(path, ckpt), head, _meta(ckpt)
