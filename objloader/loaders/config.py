"""The loader's configuration: :class:`LoaderConfig` (the arguments of :func:`objloader.make_loader`,
validated once) and the rule, shared by every engine, of which view masks an engine resamples."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from numba import njit

from ..augment.params import DEFAULT_CROP_SCALE, check_crop_scale, mix_draw, resolve_color
from ..errors import ConfigError
from ..ranges import IMAGE_SIZE, SEED, WORKERS

__all__ = ["ENGINES", "LoaderConfig", "resamples_view_mask", "view_masks_resampled"]

ENGINES = ("torch", "ffcv", "dali")


@dataclass(frozen=True)
class LoaderConfig:
    """Arguments of :func:`objloader.make_loader`, validated once (defaults: MoCo v2 recipe)."""

    batch_size: int
    image_size: int
    views: int = 2
    oa_crop: bool = False
    crop_scale: tuple = DEFAULT_CROP_SCALE  # RandomResizedCrop area range; MoCo v2's recipe: (0.2, 1)
    bg_mixup: float = 0.0  # per-view probability p_mix (paper: 0.4 for MoCo v2)
    bg_mode: str = "soft"  # "soft" (eq. 4) or "hard" (BG-HardMix)
    color: str = "mocov2"
    normalize: bool = True
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = True
    num_workers: int = 2
    rank: int = 0
    world_size: int = 1
    patch_size: Optional[int] = None  # background patch side; None = image_size // 2
    ring_size: int = 64  # recent background patches kept as BG-Mixup partners of last resort
    return_masks: bool = False  # also return the view masks (inspection, tests)
    return_backgrounds: bool = False  # also each sample's background image (MoCo --bg-negatives)

    def __post_init__(self):
        def bad(msg):
            raise ConfigError(f"make_loader: {msg}")

        # Types first: a float batch size or a numpy bool would fail later inside an engine's
        # thread or compiled code, far from the call that passed it.
        for name in ("batch_size", "image_size", "views", "seed", "num_workers", "rank", "world_size", "ring_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                bad(f"{name} must be an integer, got {value!r}")
        for name in ("oa_crop", "normalize", "shuffle", "drop_last", "return_masks", "return_backgrounds"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                bad(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.batch_size < 1:
            bad(f"batch_size must be >= 1, got {self.batch_size}")
        if not IMAGE_SIZE.contains(self.image_size):  # the range the trainers' --image-size shares
            bad(f"image_size {IMAGE_SIZE.limits()}, got {self.image_size}")
        if self.views < 1:
            bad(f"views must be >= 1, got {self.views}")
        if not 0.0 <= self.bg_mixup <= 1.0:
            bad(f"bg_mixup is a probability in [0, 1], got {self.bg_mixup}")
        if self.bg_mode not in ("soft", "hard"):
            bad(f"bg_mode must be 'soft' or 'hard', got {self.bg_mode!r}")
        resolve_color(self.color)
        object.__setattr__(self, "crop_scale", check_crop_scale(self.crop_scale))  # a plain pair of floats
        if not 0 <= self.rank < self.world_size:
            bad(f"rank {self.rank} outside world_size {self.world_size}")
        if not WORKERS.contains(self.num_workers):
            bad(f"num_workers {WORKERS.limits()}, got {self.num_workers}")
        if self.dtype == torch.uint8 and self.normalize:
            bad("uint8 views cannot be normalised; pass normalize=False")
        if not SEED.contains(self.seed):  # one range with the trainers, which seed numpy with it
            bad(f"seed {SEED.limits()}, got {self.seed}")
        if self.world_size < 1:
            bad(f"world_size must be >= 1, got {self.world_size}")
        if self.patch_size is not None and (isinstance(self.patch_size, bool) or not isinstance(self.patch_size, (int, np.integer))
                                            or not 1 <= self.patch_size <= self.image_size):
            bad(f"patch_size must be None or an integer in [1, image_size={self.image_size}], got {self.patch_size!r}")
        if self.ring_size < 1:
            bad(f"ring_size must be >= 1, got {self.ring_size}")
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.uint8):
            bad(f"dtype must be torch.float32, float16, bfloat16 or uint8, got {self.dtype}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            bad(f"device {self.device!r} is not a torch device ({e})")

    @property
    def patch(self) -> int:
        return self.patch_size or max(self.image_size // 2, 1)

    @property
    def needs_masks(self) -> bool:
        return self.bg_mixup > 0 or self.return_masks

    @property
    def needs_patches(self) -> bool:
        return self.bg_mixup > 0 or self.return_backgrounds


# A view's mask is resampled only when the device stage mixes it (the engines draw the same seeded
# flag the device stage draws, so no mask it reads is missing), or for every view when the caller
# wants the masks back: the other views' masks stay zero and a record none of whose views needs
# its mask may skip the mask's decode. Written once here; the FFCV decoder calls the per-view
# form from its compiled loop, the other engines the batch form.
@njit(cache=True)
def resamples_view_mask(all_masks, seed, epoch, index, view, p_mix):
    """Whether an engine resamples the mask of view ``view`` of record ``index`` in ``epoch``."""
    return all_masks or mix_draw(seed, epoch, index, view, p_mix)


@njit(cache=True)
def _view_masks_resampled(all_masks, seed, epoch, indices, p_mix, out):
    for i in range(out.shape[0]):
        for v in range(out.shape[1]):
            out[i, v] = resamples_view_mask(all_masks, seed, epoch, indices[i], v, p_mix)


def view_masks_resampled(cfg: LoaderConfig, epoch: int, indices) -> np.ndarray:
    """bool [B, V]: :func:`resamples_view_mask` for every view of the records ``indices``."""
    out = np.zeros((len(indices), cfg.views), np.bool_)
    _view_masks_resampled(bool(cfg.return_masks), int(cfg.seed), int(epoch), np.asarray(indices, np.int64),
                          float(cfg.bg_mixup), out)
    return out
