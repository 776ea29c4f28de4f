"""make_loader: one entry point over the torch, FFCV and DALI engines (DESIGN.md "Engines").

Every engine runs the same sampler (objloader.augment.params) and the same semantics; an
engine stage produces uint8 views, view masks and background patches, and one device stage
(BG-Mixup, colour, normalisation; fused Triton kernels on CUDA) finishes the batch.
"""

from __future__ import annotations

import os

import torch

from ..optional import require
from ..store.integrity import check_integrity, read_manifest
from ..augment.params import DEFAULT_CROP_SCALE
from .config import ENGINES, LoaderConfig
from .device_stage import Batch, DeviceStage, EngineBatch
from .order import batches_per_epoch, epoch_order, per_rank
from ..errors import ConfigError, DatasetError
from ..runtime import choose_device, default_workers

__all__ = ["make_loader", "default_workers", "ObjectAwareLoader", "Batch", "LoaderConfig", "ENGINES", "DeviceStage",
           "EngineBatch", "epoch_order", "batches_per_epoch", "per_rank"]


class ObjectAwareLoader:
    """Iterable of :class:`Batch`; ``len()`` batches per epoch; ``set_epoch(e)`` before an epoch
    (without it, each new iteration starts the next epoch)."""

    def __init__(self, engine, cfg: LoaderConfig, engine_name: str):
        self.engine, self.cfg, self.engine_name = engine, cfg, engine_name
        self.device_stage = DeviceStage(cfg)
        self._next_epoch = 0

    def __len__(self) -> int:
        return len(self.engine)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ConfigError(f"epoch must be >= 0, got {epoch}")
        self._next_epoch = int(epoch)

    def __iter__(self):
        epoch = self._next_epoch
        self._next_epoch += 1
        self.engine.set_epoch(epoch)
        for engine_batch in self.engine:
            yield self.device_stage(engine_batch)


def make_loader(
    path: str,
    engine: str,
    *,
    batch_size: int,
    image_size: int,
    views: int = 2,
    oa_crop: bool = False,
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    bg_mixup: float = 0.0,
    bg_mode: str = "soft",
    color: str = "mocov2",
    normalize: bool = True,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    patch_size: int | None = None,
    ring_size: int = 64,
    return_masks: bool = False,
    return_backgrounds: bool = False,
) -> ObjectAwareLoader:
    """A loader of object-aware multi-view batches from a dataset built by objloader-build.

    Args:
        path: a built dataset directory (for a built demo folder, one split: ``built/train``).
        engine: "torch" (DataLoader workers), "ffcv" (data.beton) or "dali" (shards/*.tar).
        batch_size, image_size: samples per batch (per rank) and the views' side in pixels.
        views: views per sample (2 for MoCo v2 / BYOL).
        oa_crop: OA-Crop, each sample's views cropped inside one of its boxes (paper Sec. 2.3).
        crop_scale: RandomResizedCrop's (min, max) area, a fraction of the image (of the box with
            OA-Crop). (0.08, 1) is torchvision's default and BYOL's; MoCo v2's recipe uses (0.2, 1).
        bg_mixup: per-view BG-Mixup probability p_mix (paper eq. 4; 0.4 for MoCo v2).
        bg_mode: "soft" (the soft mask blends) or "hard" (BG-HardMix, mask binarised at 0.5).
        color: "mocov2", "byol" or "none".
        normalize, dtype: ImageNet normalisation and the output dtype; ``color="none",
            normalize=False, dtype=torch.uint8`` returns the raw uint8 pixels.
        device: where the device stage runs and batches land (default: this rank's GPU,
            cuda:LOCAL_RANK, when CUDA is available, else cpu; see objloader.runtime).
        seed, shuffle, drop_last: the run's seed (keys every random choice), order, last batch.
        num_workers: engine CPU workers/threads (default: :func:`objloader.runtime.default_workers`,
            the CPUs available to this process divided among the processes of this machine).
        rank, world_size: this process's shard (torchrun: RANK, WORLD_SIZE).
        patch_size: background patch side (default image_size // 2); ring_size: how many recent
            background patches serve as BG-Mixup partners when a batch has no other background.
        return_masks: also return the uint8 view masks in ``batch.masks``.
        return_backgrounds: also each sample's background-only image (its own background patch
            tiled at the views' pixel scale, normalised like the views) in ``batch.backgrounds``
            and ``batch.has_bg`` (MoCo's --bg-negatives).
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    try:  # validated; None or "cuda": this rank's own GPU, so torchrun's ranks do not all share cuda:0
        device = choose_device(device)
    except ConfigError as e:
        raise ConfigError(f"make_loader: {e}") from None
    if num_workers is None:
        num_workers = default_workers()
    cfg = LoaderConfig(batch_size=batch_size, image_size=image_size, views=views, oa_crop=oa_crop,
                       crop_scale=crop_scale, bg_mixup=float(bg_mixup), bg_mode=bg_mode, color=color,
                       normalize=normalize, dtype=dtype,
                       device=str(device), seed=seed, shuffle=shuffle, drop_last=drop_last,
                       num_workers=num_workers, rank=rank, world_size=world_size,
                       patch_size=patch_size, ring_size=ring_size, return_masks=return_masks,
                       return_backgrounds=return_backgrounds)
    manifest = read_manifest(path)
    if manifest.get("kind") == "collection":
        names = ", ".join(manifest["datasets"])
        raise DatasetError(f"{path!r} holds several datasets ({names}); pass one of them, "
                           f"e.g. {os.path.join(path, next(iter(manifest['datasets'])))!r}")
    if engine == "ffcv":
        require("ffcv", "make_loader(engine='ffcv')")
    elif engine == "dali":
        require("nvidia.dali", "make_loader(engine='dali')")
    check_integrity(path, manifest, engine)  # sizes, record counts, build identity: milliseconds, no record read
    _check_batches(path, manifest, cfg)
    _check_object_knowledge(path, manifest, cfg)
    if engine == "torch":
        from .torch_engine import TorchEngine

        stage = TorchEngine(path, cfg, manifest)
    elif engine == "ffcv":
        from .ffcv_engine import FFCVEngine

        stage = FFCVEngine(path, cfg, manifest)
    else:
        from .dali_engine import DALIEngine

        stage = DALIEngine(path, cfg, manifest)
    return ObjectAwareLoader(stage, cfg, engine)


def _check_object_knowledge(path: str, manifest: dict, cfg: LoaderConfig) -> None:
    """Refuse OA-Crop or BG-Mixup on a dataset built without object masks: its masks are all
    object and its boxes the whole image, so both ops would silently do nothing and the run
    would train the plain method. The manifest's options say what the build used (after
    objloader-build replaced --masks gt by none for a source without masks); "masks" says why."""
    options = manifest.get("options")
    if not isinstance(options, dict) or options.get("masks") != "none":
        return
    wanted = [op for op, on in (("oa_crop=True", cfg.oa_crop), (f"bg_mixup={cfg.bg_mixup}", cfg.bg_mixup > 0),
                                ("return_backgrounds=True", cfg.return_backgrounds)) if on]
    if wanted:
        raise ConfigError(f"make_loader: {path!r} was built with masks {manifest.get('masks', 'none')!r}: it has no "
                          f"object masks or boxes, so {' and '.join(wanted)} would change nothing; rebuild it with "
                          "objloader-build --masks gt or --masks contracam, or turn them off")


def _check_batches(path: str, manifest: dict, cfg: LoaderConfig) -> None:
    """Refuse a loader that would yield nothing: every engine would silently end its epochs at once
    (DALI with a misleading error about its last-batch policy)."""
    n = int(manifest["counts"]["records"])
    if n == 0:
        raise DatasetError(f"{path!r} holds no records")
    share = per_rank(n, cfg.world_size)
    if cfg.drop_last and share < cfg.batch_size:
        raise ConfigError(f"make_loader: {path!r} has {n} records, {share} per rank for {cfg.world_size} "
                          f"rank(s), fewer than batch_size {cfg.batch_size}: with drop_last=True no batch would "
                          "be yielded; lower batch_size or pass drop_last=False")
