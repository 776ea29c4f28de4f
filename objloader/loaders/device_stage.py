"""The device stage, the second half of every loader: the engine -> device contract
(:class:`EngineBatch`), :class:`DeviceStage` and the :class:`Batch` users receive.

An engine (torch, ffcv, dali) turns records into uint8 views, view masks and background patches
(the *engine stage*, DESIGN.md); :class:`DeviceStage` then runs BG-Mixup, colour and
normalisation on the target device with one implementation for every engine.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..augment import AugParams
from ..augment.params import sample_appearance
from ..augment.reference import normalize as normalize_views
from .config import LoaderConfig

__all__ = ["EngineBatch", "Batch", "DeviceStage", "has_background"]


def has_background(bg_rect: np.ndarray) -> np.ndarray:
    """bool [...]: the background rectangle (x0, y0, x1, y1) has positive area."""
    return (bg_rect[..., 2] > bg_rect[..., 0]) & (bg_rect[..., 3] > bg_rect[..., 1])


@dataclass
class EngineBatch:
    """What an engine stage hands to the device stage (CPU tensors, or CUDA for DALI mixed)."""

    views: torch.Tensor  # uint8 [B, V, 3, S, S]
    masks: Optional[torch.Tensor]  # uint8 [B, V, 1, S, S], 255 = object
    patches: Optional[torch.Tensor]  # uint8 [B, 3, P, P], zeros where no background
    index: np.ndarray  # int64 [B] record indices
    labels: torch.Tensor  # int64 [B]
    has_bg: np.ndarray  # bool [B]
    epoch: int
    window: np.ndarray  # float32 [B, V, 4] the geometry the engine applied
    flip: np.ndarray  # bool [B, V]
    box_index: np.ndarray  # int64 [B]
    aliased: bool = False  # tensors are views of engine buffers that the engine will reuse

    def pin_memory(self) -> "EngineBatch":
        """Page-locked copies so the host-to-GPU copy can overlap (DataLoader pin_memory)."""
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return dataclasses.replace(self, views=pin(self.views), masks=pin(self.masks),
                                   patches=pin(self.patches), labels=pin(self.labels), aliased=False)


@dataclass
class Batch:
    """One training batch. ``batch.views`` or ``batch["views"]``.

    views: [B, V, 3, H, W] (normalised float, or uint8 with color="none", normalize=False);
    labels: int64 [B] (-1 = unlabelled); index: int64 [B] record indices;
    masks: uint8 [B, V, 1, H, W] view masks when the loader computed them, else None;
    params: every random choice of the batch (:class:`AugParams`); epoch.
    """

    views: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    masks: Optional[torch.Tensor]
    params: AugParams
    epoch: int
    # with return_backgrounds: each sample's background-only image x^bg (its own patch tiled at
    # the views' pixel scale, as BG-Mixup blends it in; normalised like the views) [B, 3, H, W],
    # and whether the sample has a background rectangle at all (bool [B]; where not, its patch
    # is all zeros and a consumer leaves it out)
    backgrounds: Optional[torch.Tensor] = None
    has_bg: Optional[torch.Tensor] = None

    def __getitem__(self, name: str):
        return getattr(self, name)

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]


class DeviceStage:
    """BG-Mixup (eq. 4) -> colour -> normalise on ``cfg.device``, the same for every engine.

    ``implementation`` says what runs (kernels/dispatch.py): the fused Triton kernels on CUDA, the
    fused numba kernel on the CPU; both are tested against the torch reference of
    objloader.augment, which is the semantics and runs wherever neither applies. Keeps the ring
    buffer of recent background patches that serves as partner pool when a batch has no other
    background.
    """

    def __init__(self, cfg: LoaderConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.hard = cfg.bg_mode == "hard"
        self._ring: Optional[torch.Tensor] = None
        self._ring_count = 0
        self._ring_next = 0
        from ..kernels import select_device_ops

        self._apply, self.implementation = select_device_ops(self.device)

    def reset(self) -> None:
        self._ring_count = self._ring_next = 0

    def __call__(self, eb: EngineBatch) -> Batch:
        cfg = self.cfg
        dev = self.device
        ring_count = self._ring_count if cfg.needs_patches else 0
        appearance = sample_appearance(cfg.seed, eb.epoch, eb.index, eb.has_bg, views=cfg.views,
                                       p_mix=cfg.bg_mixup, color=cfg.color, ring_count=ring_count)
        params = AugParams(window=eb.window, flip=eb.flip, box_index=eb.box_index, **appearance)
        views = eb.views.to(dev, non_blocking=True)
        masks = eb.masks.to(dev, non_blocking=True) if eb.masks is not None else None
        patches = own = None
        if cfg.needs_patches and eb.patches is not None:
            own = eb.patches.to(dev, non_blocking=True)
            patches = _concat_rows(own, self._ring[:ring_count]) if ring_count else own
            self._remember(own, eb.has_bg)  # after the concatenation copied the ring's old rows
        if cfg.color == "none" and not cfg.normalize and cfg.dtype == torch.uint8 and not params.mix.any():
            out = views.clone() if eb.aliased and views is eb.views else views  # the engine's bytes as they are
        else:
            # The engine's views are this batch's own unless aliased (then the engine reuses them).
            out = self._apply(views, masks, patches, params, hard=self.hard, dtype=cfg.dtype,
                              normalize=cfg.normalize, reuse_views=not (eb.aliased and views is eb.views))
        if masks is not None and (not cfg.return_masks):
            masks = None
        elif masks is not None and eb.aliased and masks is eb.masks:
            masks = masks.clone()  # outlives the engine's buffer
        backgrounds = has_bg = None
        if cfg.return_backgrounds:
            has_bg = torch.from_numpy(np.asarray(eb.has_bg, bool)).to(dev)
            backgrounds = background_images(own, cfg.image_size, normalize=cfg.normalize,
                                            dtype=cfg.dtype)
        return Batch(views=out, labels=eb.labels.to(dev, non_blocking=True),
                     index=torch.from_numpy(np.asarray(eb.index, np.int64)).to(dev), masks=masks,
                     params=params, epoch=eb.epoch, backgrounds=backgrounds, has_bg=has_bg)

    def _remember(self, patches: torch.Tensor, has_bg: np.ndarray) -> None:
        """Append this batch's background patches to the ring (oldest overwritten first)."""
        rows = np.flatnonzero(has_bg)
        if not len(rows):
            return
        size = self.cfg.ring_size
        if self._ring is None:
            self._ring = torch.zeros((size,) + tuple(patches.shape[1:]), dtype=patches.dtype, device=patches.device)
        rows = rows[-size:]
        slots = (self._ring_next + np.arange(len(rows))) % size
        if patches.device.type == "cpu":  # numpy, for the reason _concat_rows gives
            self._ring.numpy()[slots] = patches.numpy()[rows]
        else:
            self._ring[torch.from_numpy(slots).to(patches.device)] = patches[torch.from_numpy(rows).to(patches.device)]
        self._ring_next = int((self._ring_next + len(rows)) % size)
        self._ring_count = min(self._ring_count + len(rows), size)


def background_images(patches: torch.Tensor, size: int, *, normalize: bool = True,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Each sample's background-only image (eq. 4's x^bg for its own patch): uint8 patches
    [B, 3, P, P] tiled to [B, 3, size, size] (pixel (y, x) = patch[y % P, x % P], as the BG-Mixup
    kernels tile), then ImageNet-normalised like the views (or left in [0, 1] / uint8)."""
    p = patches.shape[-1]
    reps = -(-size // p)
    tiled = patches.repeat(1, 1, reps, reps)[:, :, :size, :size]
    if dtype == torch.uint8 and not normalize:
        return tiled.contiguous()
    x = tiled.float().div_(255.0)
    return (normalize_views(x) if normalize else x).to(dtype)


def _concat_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.cat([a, b]); on the CPU through numpy. A torch copy of this size starts an OpenMP
    region, and libgomp's threads then spin-wait for the next one, taking a core from the engine's
    workers: on 2 cores this cost the torch engine +both a quarter of its throughput."""
    if a.device.type == "cpu":
        return torch.from_numpy(np.concatenate([a.numpy(), b.numpy()]))
    return torch.cat([a, b])
