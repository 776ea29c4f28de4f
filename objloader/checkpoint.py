"""Encoders shared by every SSL method and the evaluations, and the checkpoint contract.

A checkpoint written by the trainers is a dict loadable with ``torch.load(path, weights_only=True)``:

    {"format": CHECKPOINT_FORMAT, "method": "moco" | "byol", "arch": "resnet18" | "resnet50",
     "small_stem": bool, "width": int, "image_size": int, "backbone": state_dict of build_backbone(...),
     "head_prefix": str (the projection head's prefix in "model": the method's recipe), ...}

``width`` is the ResNet's base channel count (64 = torchvision's); checkpoints written before it
existed carry none and mean 64.

plus whatever the trainer needs to resume (optimizer, queue, momentum encoder, step, RNG state).

:func:`load_backbone` and :func:`load_encoder` also read the encoders of other codebases (see
``FOREIGN FORMATS`` below): the official MoCo v1/v2 checkpoint, a torchvision or timm ResNet
state_dict, solo-learn and lightly ``backbone.*`` checkpoints. Every file is read with
``weights_only=True``: nothing read from disk can run code.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

import torch
import torchvision
from torch import nn

from .errors import CheckpointError, ConfigError

__all__ = ["CHECKPOINT_FORMAT", "ARCHS", "DEFAULT_WIDTH", "build_backbone", "feature_dim", "checkpoint_width",
           "load_backbone", "load_encoder", "torchvision_state_dict", "CheckpointError"]

CHECKPOINT_FORMAT = "objloader-ssl/1"
ARCHS = ("resnet18", "resnet50")
DEFAULT_WIDTH = 64  # torchvision's base channels


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


def _read_file(path: str, map_location):
    """Whatever ``path`` holds, read with weights_only=True (tensors, containers, plain types)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            raise CheckpointError(f"checkpoint {path!r} holds pickled Python objects"
                                  f"{f' ({found.group(1)})' if found else ''}, which objloader never unpickles: "
                                  "re-save only its tensors, e.g. torch.save(ckpt['state_dict'], 'weights.pth')") from e
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise CheckpointError(f"checkpoint {path!r} cannot be read ({type(e).__name__}: {first})") from e


def checkpoint_width(ckpt: dict) -> int:
    """The backbone width a checkpoint was written with (64 for checkpoints older than the option)."""
    return int(ckpt.get("width", DEFAULT_WIDTH))


def _backbone_of(path: str, ckpt: dict) -> nn.Module:
    width = checkpoint_width(ckpt)
    try:
        net = build_backbone(ckpt["arch"], ckpt["small_stem"], width)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path!r}: no backbone can be built from its arch/small_stem/width: {e}") from e
    if not isinstance(ckpt.get("backbone"), dict):
        raise CheckpointError(f"{path!r}: an objloader checkpoint without its backbone weights")
    _fit(path, "an objloader checkpoint", net, ckpt["backbone"],
         f"{ckpt['arch']} (small_stem={ckpt['small_stem']}, width={width})")
    return net


def _meta(ckpt: dict) -> dict:
    meta = {k: v for k, v in ckpt.items() if not isinstance(v, (dict, torch.Tensor))}
    meta["width"] = checkpoint_width(ckpt)
    meta.setdefault("source_format", "objloader")
    return meta


def load_backbone(path: str, map_location="cpu") -> tuple[nn.Module, dict]:
    """The encoder of a checkpoint (a trainer's, or one of the foreign formats below) and its
    metadata (no tensors): arch, small_stem, width, source_format, and for a trainer checkpoint
    everything it records (method, image_size, ...)."""
    obj = _read_file(path, map_location)
    if _is_native(obj):
        return _backbone_of(path, obj), _meta(obj)
    enc = _foreign(path, obj)
    return enc.backbone, enc.meta


# The projection each method trains its contrastive / predictive objective on is named by the
# checkpoint's "head_prefix" (the method's recipe, objloader/ssl/methods.py). Checkpoints written
# before it existed are MoCo v2 (MLP head) or BYOL (online projector): these are their prefixes.
PROJECTION_PREFIX = {"moco": "head.", "byol": "projector."}


def load_encoder(path: str, map_location="cpu") -> tuple[nn.Module, Optional[nn.Module], dict]:
    """(backbone, projection head or None, metadata) of a checkpoint: what ContraCAM explains.

    The head is rebuilt from the shapes of its weights, so it needs no trainer config. A
    checkpoint without one (a torchvision / timm classifier, a bare backbone) gives None: the
    caller then takes the backbone's pooled features as the embedding (``meta["projection"]``
    says which).
    """
    obj = _read_file(path, map_location)
    if not _is_native(obj):
        enc = _foreign(path, obj)
        return enc.backbone, enc.head, enc.meta
    ckpt = obj
    method = ckpt.get("method")
    meta = _meta(ckpt)
    backbone = _backbone_of(path, ckpt)
    # the checkpoint names its head (ssl/methods.py's recipe); older ones by their method
    prefix = ckpt.get("head_prefix", PROJECTION_PREFIX.get(method))
    if not isinstance(prefix, str) or not prefix or not isinstance(ckpt.get("model"), dict):
        meta["projection"] = "pooled backbone features"
        return backbone, None, meta
    state = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    head = _head_from(path, f"the {method} projection head", state, feature_dim(ckpt["arch"], checkpoint_width(ckpt)))
    meta["projection"] = "head"
    return backbone, head, meta


def torchvision_state_dict(backbone: nn.Module, arch: str, width: int = DEFAULT_WIDTH, num_classes: int = 1000) -> dict:
    """``backbone`` (build_backbone(arch, ..., width)) as the state_dict of
    ``torchvision.models.<arch>()``: torchvision's key names plus an all-zero ``fc`` (an SSL encoder
    has no classifier; zeros give uniform logits, so it cannot pass for a trained one). Loads with
    strict=True into torchvision's network when the width is 64 and the stem is torchvision's."""
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    state["fc.weight"] = torch.zeros(num_classes, feature_dim(arch, width))
    state["fc.bias"] = torch.zeros(num_classes)
    return state


# ---------------------------------------------------------------------------------------------
# FOREIGN FORMATS: encoders trained elsewhere, recognised by their key names
#
#   official MoCo v1/v2 (facebookresearch/moco main_moco.py): {"epoch", "arch", "state_dict",
#       "optimizer"}, state_dict keys "module.encoder_q.<torchvision name>"; v2's MLP head is
#       encoder_q.fc.0 / fc.2, v1's linear one encoder_q.fc; encoder_k is its momentum copy.
#   torchvision / timm ResNet: a state_dict with torchvision's names (timm's ResNets use the same
#       ones); fc is a classifier, not a projection, and is dropped.
#   solo-learn (Lightning): {"state_dict": {"backbone.<torchvision name>", "projector.N.*", ...}}.
#   lightly: "backbone.<torchvision name>", or "backbone.N.*" for the tutorials'
#       nn.Sequential(*list(resnet.children())[:-1]); its heads are "projection_head.layers.N.*".
#
# Anything else is refused with one line naming what was found.

# torchvision ResNet.children() positions of the modules that hold weights (lightly's layout)
_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
# (bottleneck blocks?, blocks per stage) -> torchvision's name
_RESNETS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
            (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101",
            (True, (3, 8, 36, 3)): "resnet152"}
# first key parts only ViTs have (timm: cls_token, pos_embed, patch_embed; torchvision: class_token, conv_proj)
_VIT_ROOTS = ("cls_token", "pos_embed", "patch_embed", "class_token", "conv_proj")


@dataclass
class _Encoder:
    backbone: nn.Module
    head: Optional[nn.Module]
    meta: dict


def _is_native(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _some(keys, n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(repr(k) for k in keys[:n]) + (", ..." if len(keys) > n else "")


def _tensors_of(path: str, obj) -> dict:
    """The state_dict a file holds: itself, or its "state_dict" entry (MoCo, Lightning, timm's
    train script), without a DDP "module." prefix."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        what = (f"a dict with keys {_some(map(str, obj))}" if isinstance(obj, dict) and obj
                else f"a {type(obj).__name__}")
        raise CheckpointError(f"{path!r} holds {what}, not a state_dict of tensors: not a checkpoint "
                              "format objloader reads (objloader, MoCo, torchvision, timm, solo-learn, lightly)")
    if all(k.startswith("module.") for k in obj):
        obj = _strip(obj, "module.")
    return obj


def _split_format(state: dict) -> tuple[str, str, dict, dict]:
    """(format name, how it is described, backbone state with torchvision names, head state with
    nn.Sequential indices)."""
    if any(k.startswith("encoder_q.") for k in state):
        q = _strip(state, "encoder_q.")
        head = _strip(q, "fc.")
        if set(head) == {"weight", "bias"}:  # MoCo v1: one linear layer
            head = {f"0.{k}": v for k, v in head.items()}
        return ("moco", "the official MoCo format (encoder_q.*)",
                {k: v for k, v in q.items() if not k.startswith("fc.")}, head)
    if any(k.startswith("backbone.") for k in state):
        bb = _strip(state, "backbone.")
        if any(k.startswith("projector.") or k.startswith("momentum_backbone.") for k in state):
            return "solo-learn", "a solo-learn checkpoint (backbone.*)", bb, _strip(state, "projector.")
        lightly = "0.weight" in bb and any(k.startswith("4.") for k in bb)
        if lightly:  # nn.Sequential(*list(resnet.children())[:-1]): positions, not names
            bb = {_CHILDREN.get(k.split(".", 1)[0], k.split(".", 1)[0]) + "." + k.split(".", 1)[1]: v
                  for k, v in bb.items()}
        head = _strip(state, "projection_head.layers.")
        if lightly or head:
            return "lightly", "a lightly checkpoint (backbone.*)", bb, head
        return "backbone", "a backbone.* state_dict (solo-learn / lightly layout)", bb, {}
    # torchvision and timm ResNets share their key names; fc is their classifier
    return ("torchvision", "a torchvision/timm state_dict",
            {k: v for k, v in state.items() if not k.startswith("fc.")}, {})


def _resnet_of(path: str, described: str, bb: dict) -> tuple[str, bool, int]:
    """(arch, small_stem, width) of a backbone state with torchvision's names, or a refusal
    naming what it is."""
    vit = [k for k in bb if k.split(".")[0] in _VIT_ROOTS]
    if vit:
        raise CheckpointError(f"{path!r}: {described} of a ViT (keys like {_some(vit)}); objloader reads "
                              f"ResNet encoders only ({', '.join(ARCHS)})")
    if "conv1.weight" not in bb or "bn1.weight" not in bb or "layer1.0.conv1.weight" not in bb:
        raise CheckpointError(f"{path!r}: {described} with unknown keys like {_some(bb)}; objloader reads "
                              f"ResNet encoders ({', '.join(ARCHS)}) from objloader, official MoCo, torchvision, "
                              "timm, solo-learn and lightly checkpoints")
    bottleneck = "layer1.0.conv3.weight" in bb
    depths = tuple(len({k.split(".")[1] for k in bb if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    arch = _RESNETS.get((bottleneck, depths), f"ResNet with {'bottleneck' if bottleneck else 'basic'} blocks {depths}")
    if arch not in ARCHS:
        raise CheckpointError(f"{path!r}: {described} of a {arch}; objloader builds {', '.join(ARCHS)} only")
    return arch, tuple(bb["conv1.weight"].shape[-2:]) == (3, 3), int(bb["bn1.weight"].shape[0])


def _fit(path: str, described: str, net: nn.Module, state: dict, what: str) -> None:
    """load_state_dict(strict=True), its failure as one line naming the format and the keys."""
    want = net.state_dict()
    missing, extra = set(want) - set(state), set(state) - set(want)
    shapes = [k for k in set(want) & set(state) if want[k].shape != state[k].shape]
    if missing or extra or shapes:
        parts = [f"{label} {_some(keys)}" for label, keys in (("missing", missing), ("unexpected", extra),
                                                               ("other shapes", shapes)) if keys]
        raise CheckpointError(f"{path!r}: {described} whose keys do not fit {what}: {'; '.join(parts)}")
    net.load_state_dict(state)


def _head_from(path: str, what: str, state: dict, d_in: int) -> nn.Module:
    """A projection MLP rebuilt from its weights, as nn.Sequential indices: a 2-d weight is a
    Linear, a 1-d weight with running stats a BatchNorm1d, an index without weights a ReLU
    (MoCo v2: Linear-ReLU-Linear; BYOL, solo-learn, lightly: Linear-BN-ReLU-Linear)."""
    try:
        idx = sorted({int(k.split(".")[0]) for k in state})
    except ValueError:
        raise CheckpointError(f"{path!r}: {what} has keys {_some(state)}, not a Sequential of layers") from None
    layers, dim = [], d_in
    for i in range(idx[-1] + 1):
        w = state.get(f"{i}.weight")
        if w is None:
            layers.append(nn.ReLU())
        elif w.dim() == 2:
            if w.shape[1] != dim:
                raise CheckpointError(f"{path!r}: {what} layer {i} takes {w.shape[1]} features, "
                                      f"but the one before gives {dim}")
            layers.append(nn.Linear(w.shape[1], w.shape[0], bias=f"{i}.bias" in state))
            dim = w.shape[0]
        elif w.dim() == 1 and f"{i}.running_mean" in state:
            layers.append(nn.BatchNorm1d(w.shape[0]))
        else:
            raise CheckpointError(f"{path!r}: {what} layer {i} (weight of shape {tuple(w.shape)}) is neither "
                                  "a Linear nor a BatchNorm1d")
    head = nn.Sequential(*layers)
    _fit(path, what, head, state, "the MLP rebuilt from its shapes")
    return head


def _foreign(path: str, obj) -> _Encoder:
    state = _tensors_of(path, obj)
    fmt, described, bb, head_state = _split_format(state)
    arch, small_stem, width = _resnet_of(path, described, bb)
    net = build_backbone(arch, small_stem, width)
    _fit(path, described, net, bb, f"torchvision's {arch} (small_stem={small_stem}, width={width})")
    head = (_head_from(path, f"{described}: its projection head", head_state, feature_dim(arch, width))
            if head_state else None)
    meta = {"source_format": fmt, "arch": arch, "small_stem": small_stem, "width": width,
            "method": "moco" if fmt == "moco" else None,
            "projection": "head" if head is not None else "pooled backbone features"}
    return _Encoder(net, head, meta)
