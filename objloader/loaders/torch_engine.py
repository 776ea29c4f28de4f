"""torch engine: DataLoader workers read records from the WebDataset shards (through the .idx
offsets), decode with OpenCV and cut the views, view masks and patch with the compiled resampler
the FFCV engine uses (loaders/resample.py, tested against the torch reference); the loader a
user would write, without FFCV or DALI. A record's mask is decoded only when one of its views
is mixed."""

from __future__ import annotations

import json
import multiprocessing

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..augment.params import sample_geometry_batch
from ..procs import DieWithOwner, raise_if_worker_died
from ..errors import DatasetError
from ..store.reader import BuiltDataset, decode_npy, decode_png, decode_rgb
from ..store.schema import MEMBER
from .config import LoaderConfig, view_masks_resampled
from .device_stage import EngineBatch, has_background
from .order import batches_per_epoch, epoch_order, per_rank
from .resample import crop_views_into, cut_patch_into, table_arrays, tables_fit

try:  # libjpeg-turbo straight from numba: the same pixels as OpenCV's decode, ~25 % sooner
    from .jpeg import decode_rgb as _decode_jpeg
except ImportError:  # no libturbojpeg on this machine: OpenCV's decode
    _decode_jpeg = None

# Every field comes from the record's own members, never from the manifest's per-record lists
# (which --verify checks, but a loader must not trust): the label from KEY.cls, n_boxes from KEY.json.
_MEMBERS = (MEMBER.image, MEMBER.label, MEMBER.mask, MEMBER.boxes, MEMBER.bg_rect, MEMBER.meta)
_NO_MASK = np.zeros((1, 1, 1), np.uint8)  # stands in for the mask of a record none of whose views mixes


def decode_record(ds: BuiltDataset, i: int, with_mask: bool = True) -> dict:
    """The fields of record i the engines use: RGB image, label, mask (uint8 [M, M, 1], or None
    unless ``with_mask``), boxes, n_boxes, bg_rect."""
    raw = ds.raw(i, _MEMBERS if with_mask else tuple(m for m in _MEMBERS if m != MEMBER.mask))
    try:
        jpeg = raw[MEMBER.image]
        image = _decode_jpeg(jpeg) if _decode_jpeg is not None else decode_rgb(jpeg)
        if image is None:
            raise DatasetError("stored image does not decode")
        mask = decode_png(raw[MEMBER.mask])[:, :, None] if with_mask else None
    except DatasetError as e:
        raise DatasetError(f"{ds.path}: record {i} ({ds.keys[i]!r}): {e}; run objloader-build --verify") from e
    return {
        "image": image,
        "label": int(raw[MEMBER.label]),
        "mask": mask,
        "boxes": decode_npy(raw[MEMBER.boxes]),
        "n_boxes": int(json.loads(raw[MEMBER.meta])["n_boxes"]),
        "bg_rect": decode_npy(raw[MEMBER.bg_rect]),
    }


class _BatchRequest(tuple):
    """(epoch, indices) handed from the batch sampler to a worker."""


class _EpochBatches:
    """Batch sampler: this rank's share of the epoch order, cut into batches."""

    def __init__(self, n: int, cfg: LoaderConfig):
        self.n, self.cfg, self.epoch = n, cfg, 0

    def order(self) -> np.ndarray:
        c = self.cfg
        return epoch_order(self.n, seed=c.seed, epoch=self.epoch, shuffle=c.shuffle, rank=c.rank,
                           world_size=c.world_size)

    def __len__(self) -> int:
        return batches_per_epoch(per_rank(self.n, self.cfg.world_size), self.cfg.batch_size, self.cfg.drop_last)

    def __iter__(self):
        order, b = self.order(), self.cfg.batch_size
        for k in range(len(self)):
            yield _BatchRequest((self.epoch, order[k * b:(k + 1) * b]))


class _ViewsDataset(Dataset):
    """Each worker call builds one whole batch: decode once, then views, view masks, patch."""

    def __init__(self, path: str, cfg: LoaderConfig, manifest: dict | None = None):
        # Opened (and its shard indexes parsed) once here; each worker receives a pickled copy
        # and opens its own file descriptors on first read.
        self.ds, self.cfg = BuiltDataset(path, manifest), cfg
        self._tables = table_arrays(cfg.image_size)  # the resampler's scratch, reused (and grown) by every batch

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        raise TypeError("the torch engine fetches whole batches (__getitems__)")

    def __getitems__(self, request: _BatchRequest) -> EngineBatch:
        cfg = self.cfg
        epoch, indices = request
        b, v, s = len(indices), cfg.views, cfg.image_size
        mask_views = view_masks_resampled(cfg, epoch, indices)  # the others' masks stay zero, unread
        recs = [decode_record(self.ds, int(i), bool(mask_views[k].any())) for k, i in enumerate(indices)]
        sizes = np.array([r["image"].shape[:2] for r in recs], np.int64)
        boxes = np.stack([r["boxes"] for r in recs])
        n_boxes = np.array([r["n_boxes"] for r in recs], np.int64)
        bg = np.stack([r["bg_rect"] for r in recs]).astype(np.float32)
        window, flip, box_index = sample_geometry_batch(cfg.seed, epoch, indices, sizes, n_boxes, boxes,
                                                        views=v, oa_crop=cfg.oa_crop, crop_scale=cfg.crop_scale)
        views = np.empty((b, v, 3, s, s), np.uint8)
        masks = np.empty((b, v if cfg.needs_masks else 0, 1, s, s), np.uint8)
        patches = np.empty((b, 3, cfg.patch, cfg.patch), np.uint8) if cfg.needs_patches else None
        largest, smallest = int(sizes.max()), min(s, cfg.patch) if patches is not None else s
        if not tables_fit(self._tables, s, 3, largest, smallest):
            self._tables = table_arrays(s, 3, max(largest, 256), smallest)
        tables = self._tables
        for k, r in enumerate(recs):
            mask = _NO_MASK if r["mask"] is None else r["mask"]
            crop_views_into(r["image"], mask, window[k], flip[k], views[k], masks[k], mask_views[k], *tables)
            if patches is not None:
                cut_patch_into(r["image"], bg[k], patches[k], *tables)
        return EngineBatch(
            views=torch.from_numpy(views),
            masks=torch.from_numpy(masks) if cfg.needs_masks else None,
            patches=torch.from_numpy(patches) if patches is not None else None,
            index=np.asarray(indices, np.int64),
            labels=torch.tensor([r["label"] for r in recs], dtype=torch.int64),
            has_bg=has_background(bg),
            epoch=int(epoch), window=window, flip=flip, box_index=box_index,
        )


def _identity(batch):
    return batch


class TorchEngine:
    """Engine stage on torch DataLoader workers; iterating yields :class:`EngineBatch`."""

    def __init__(self, path: str, cfg: LoaderConfig, manifest: dict | None = None):
        self.dataset = _ViewsDataset(path, cfg, manifest)
        self.sampler = _EpochBatches(len(self.dataset), cfg)
        # Each worker runs torch ops on one thread: the workers are the parallelism. Workers come
        # from a forkserver, not fork: a training process has OpenMP, TBB, CUDA and logging threads,
        # and a child forked while one of them holds a lock deadlocks (seen with plain fork).
        # A forkserver child outlives a run killed outright unless it watches the run (DieWithOwner).
        self.loader = DataLoader(self.dataset, batch_sampler=self.sampler, collate_fn=_identity,
                                 num_workers=cfg.num_workers, pin_memory=cfg.device.startswith("cuda"),
                                 multiprocessing_context=_worker_context() if cfg.num_workers > 0 else None,
                                 persistent_workers=cfg.num_workers > 0,
                                 worker_init_fn=DieWithOwner(_worker_init) if cfg.num_workers > 0 else None,
                                 prefetch_factor=4 if cfg.num_workers > 0 else None)

    def __len__(self) -> int:
        return len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def __iter__(self):
        it = iter(self.loader)
        try:
            yield from it
        except Exception as e:  # noqa: BLE001 - a dead worker surfaces as several kinds of error
            raise_if_worker_died(it, "torch engine", e)
            raise


def _worker_context():
    ctx = multiprocessing.get_context("forkserver")
    # Workers then fork from a server that has already imported torch, numba and this module.
    ctx.set_forkserver_preload([__name__])
    return ctx


def _worker_init(_):
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
