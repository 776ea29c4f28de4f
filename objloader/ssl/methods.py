"""One recipe per self-supervised method: everything the trainer, its command line and its
checkpoints need to know about MoCo v2 or BYOL, in one place, so that a third method (SimCLR,
DINO) is one more :class:`Recipe` here (and its model module).

A recipe holds the model factory, the colour preset and crop scale of its loader, the base
learning rate, the momentum (EMA) of its key / target network, the flags only it has, and the
prefix of its projection head in the model's state (written into every checkpoint, where
ContraCAM finds the head: objloader.checkpoint.load_encoder).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..augment.params import DEFAULT_CROP_SCALE
from .byol import BYOL
from .moco import DEFAULT_BN_SPLITS, MoCo, queue_size_for

__all__ = ["Recipe", "RECIPES", "METHODS", "recipe"]


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str  # the command's help text
    colour: str  # make_loader's colour preset
    crop_scale: tuple[float, float]  # RandomResizedCrop (min, max) area of the loader's views
    base_lr: float  # lr per 256 images (lr = base * global batch / 256, Goyal et al. linear scaling)
    ema: float  # momentum of the key / target network
    ema_help: str
    head_prefix: str  # the projection head's parameters in the model's state_dict
    # (TrainConfig, records in the dataset, world size) -> the model, whose forward(views) is the loss
    build: Callable[..., nn.Module]
    # adds the flags only this method has to its command (parser, TrainConfig defaults, argparse types)
    add_flags: Callable[[argparse.ArgumentParser, object, dict], None] = lambda p, defaults, types: None


def _build_moco(cfg, n_records: int, world_size: int = 1) -> nn.Module:
    # Shuffle-BN: one process splits its BatchNorms into groups and shuffles the keys among
    # them; several ranks shuffle the keys across ranks and keep plain per-rank BatchNorm.
    return MoCo(cfg.arch, cfg.small_stem, queue_size=queue_size_for(n_records, cfg.queue_size),
                momentum=MOCO.ema if cfg.ema is None else cfg.ema, temperature=cfg.temperature,
                width=cfg.width, shuffle_bn=cfg.shuffle_bn,
                bn_splits=1 if world_size > 1 else DEFAULT_BN_SPLITS, seed=cfg.seed)


def _moco_flags(p: argparse.ArgumentParser, D, R: dict) -> None:
    p.add_argument("--queue-size", type=R["queue_size"], default=D.queue_size,
                   help="negatives in the queue; scaled down to a power of two <= records / 2 for small datasets")
    p.add_argument("--temperature", type=R["temperature"], default=D.temperature, help="InfoNCE temperature")
    p.add_argument("--bg-negatives", action="store_true",
                   help="encode each sample's background-only image (its background patch tiled, as BG-Mixup "
                        "blends it in) with the key encoder and add every background of the batch to each "
                        "query's negatives for the step, not to the queue (after CLAD, Wang et al. 2022); "
                        "needs a dataset with object masks")
    p.add_argument("--no-shuffle-bn", dest="shuffle_bn", action="store_false",
                   help="turn Shuffle-BN off. Shuffle-BN (MoCo Sec. 3.3) normalises the keys in another "
                        "grouping of the batch than their queries: in one process BatchNorm is split into up "
                        "to 8 groups and the keys are shuffled among them; with several ranks the keys are "
                        "shuffled across ranks (shuffle_bn=%(default)s without this flag)")


def _build_byol(cfg, n_records: int, world_size: int = 1) -> nn.Module:
    return BYOL(cfg.arch, cfg.small_stem, momentum=BYOL_RECIPE.ema if cfg.ema is None else cfg.ema, width=cfg.width)


MOCO = Recipe(
    name="moco",
    description="MoCo v2 (momentum encoder, queue of negatives, MLP head, InfoNCE at temperature 0.2) on an "
                "object-aware loader. SGD momentum 0.9, wd 1e-4, lr = --lr x global batch / 256, cosine decay.",
    colour="mocov2",
    # MoCo v2's published recipe (facebookresearch/moco main_moco.py, aug_plus) crops at
    # (0.2, 1). Results committed before 2026-12-04 were trained at (0.08, 1).
    crop_scale=(0.2, 1.0),
    base_lr=0.03,  # MoCo v2's public code
    ema=0.999,
    ema_help="momentum of the key encoder",
    head_prefix="head.",  # MoCo v2's MLP head
    build=_build_moco,
    add_flags=_moco_flags,
)

BYOL_RECIPE = Recipe(
    name="byol",
    description="BYOL (projector and predictor MLPs 4096 -> 256, target momentum 0.996 -> 1 on a cosine). "
                "Uses plain SGD (momentum 0.9, wd 1e-4, lr = --lr x global batch / 256, cosine decay) instead "
                "of the paper's LARS, to keep it simple; base lr 0.05.",
    colour="byol",
    crop_scale=DEFAULT_CROP_SCALE,  # (0.08, 1): BYOL's published recipe
    base_lr=0.05,  # the paper uses LARS at 0.2; plain SGD here
    ema=0.996,
    ema_help="base momentum of the target network (raised to 1 on a cosine)",
    head_prefix="projector.",  # BYOL's online projector
    build=_build_byol,
)

RECIPES = {r.name: r for r in (MOCO, BYOL_RECIPE)}
METHODS = tuple(RECIPES)


def recipe(method: str) -> Recipe:
    """The recipe of ``method`` (TrainConfig has validated the name)."""
    return RECIPES[method]
