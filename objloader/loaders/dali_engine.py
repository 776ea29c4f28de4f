"""dali engine: readers.webdataset -> decoders.image (mixed on GPU, cpu otherwise) -> one
resize-with-roi per view for the image and, with the same roi and flip, for the mask -> the
background patch cut from the same decoded image.

The crop windows come from the shared sampler (objloader.augment.params), called once per
batch from a python_function: it needs each record's index (its member name in the shard),
image size (peek_image_shape, no decode) and boxes, all of which DALI provides in-graph. DALI's
reader shuffles with its own buffer, so the sample *order* differs from the torch and FFCV
engines; every sample's parameters are the same function of (seed, epoch, index, view).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..augment.params import sample_geometry_batch
from ..store.reader import DatasetError, read_manifest
from .common import EngineBatch, LoaderConfig, batches_per_epoch, has_background

_NAME_DIGITS = 9  # members are named by record index: 000000123.jpg (store/wds_writer.py)


class _WindowSampler:
    """The python_function of the pipeline: per batch, the record indices, the epoch and every
    view's roi (DALI order y, x) and flip, plus the background rectangle's roi."""

    def __init__(self, cfg: LoaderConfig, n_boxes: np.ndarray, labels: np.ndarray, batches_per_epoch: int,
                 first_epoch: int):
        self.cfg, self.n_boxes, self.labels = cfg, n_boxes, labels
        self.batches_per_epoch, self.first_epoch = batches_per_epoch, first_epoch
        self.batches_done = 0

    def __call__(self, digits, shapes, boxes, bg):
        cfg = self.cfg
        # Pipeline batches arrive in order; pad_last_batch makes every epoch a whole number of them.
        epoch = self.first_epoch + self.batches_done // self.batches_per_epoch
        self.batches_done += 1
        names = np.stack(digits).astype(np.int64) - ord("0")
        index = names @ (10 ** np.arange(_NAME_DIGITS - 1, -1, -1, dtype=np.int64))
        sizes = np.stack(shapes)[:, :2].astype(np.int64)
        boxes = np.stack(boxes).astype(np.float32)
        bg = np.stack(bg).astype(np.float32)
        window, flip, box_index = sample_geometry_batch(cfg.seed, epoch, index, sizes, self.n_boxes[index], boxes,
                                                        views=cfg.views, oa_crop=cfg.oa_crop)
        has_bg = has_background(bg)
        bg = np.where(has_bg[:, None], bg, np.array([0, 0, 1, 1], np.float32))  # any valid roi; zeroed later
        out = [index[:, None], np.full((len(index), 1), epoch, np.int64), self.labels[index][:, None],
               has_bg[:, None].astype(np.uint8), window, box_index[:, None], flip.astype(np.uint8)]
        for v in range(cfg.views):
            out += [window[:, v, [1, 0]], window[:, v, [3, 2]], flip[:, v].astype(np.int32)]
        out += [bg[:, [1, 0]], bg[:, [3, 2]]]
        # DALI wants one array per sample; a 1-D output becomes 0-d arrays (scalars per sample).
        return tuple([np.ascontiguousarray(x) if o.ndim > 1 else np.array(x) for x in o] for o in out)


def _build_pipeline(shards, cfg: LoaderConfig, sampler: _WindowSampler, device_id):
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    ext = ["jpg", "boxes.npy", "bg.npy"] + (["mask.png"] if cfg.needs_masks else [])
    s, p = cfg.image_size, cfg.patch

    def resize(image, start, end, size):
        return fn.resize(image, roi_start=start, roi_end=end, roi_relative=True, size=[size, size],
                         antialias=False, interp_type=types.INTERP_LINEAR)

    @pipeline_def(batch_size=cfg.batch_size, num_threads=max(cfg.num_workers, 1), device_id=device_id,
                  seed=cfg.seed, prefetch_queue_depth=2)
    def object_aware_views():
        parts = fn.readers.webdataset(paths=shards, index_paths=[t[:-4] + ".idx" for t in shards], ext=ext,
                                      random_shuffle=cfg.shuffle, seed=cfg.seed, shard_id=cfg.rank,
                                      num_shards=cfg.world_size, pad_last_batch=True, name="reader")
        jpg, boxes, bg = parts[:3]
        # Record index = the member name's digits (the source key lives in KEY.json).
        info = fn.get_property(jpg, key="source_info")
        name = fn.slice(info, fn.cast(info.shape()[0] - (_NAME_DIGITS + 4), dtype=types.INT32),
                        np.array([_NAME_DIGITS], np.int32), axes=[0])
        outs = fn.python_function(name, fn.peek_image_shape(jpg), fn.decoders.numpy(boxes), fn.decoders.numpy(bg),
                                  function=sampler, batch_processing=True, num_outputs=9 + 3 * cfg.views)
        index, epoch, label, has_bg, window, box_index, flip = outs[:7]
        rois, (bg_start, bg_end) = outs[7:-2], outs[-2:]

        image = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
        views = [fn.flip(resize(image, rois[3 * v], rois[3 * v + 1], s), horizontal=rois[3 * v + 2])
                 for v in range(cfg.views)]
        result = [fn.transpose(fn.stack(*views), perm=[0, 3, 1, 2])]  # [V, 3, S, S]
        if cfg.needs_masks:  # OA masks: the same roi and flip as each view
            mask = fn.decoders.image(parts[3], device="mixed" if gpu else "cpu", output_type=types.GRAY)
            masks = [fn.flip(resize(mask, rois[3 * v], rois[3 * v + 1], s), horizontal=rois[3 * v + 2])
                     for v in range(cfg.views)]
            result.append(fn.transpose(fn.stack(*masks), perm=[0, 3, 1, 2]))  # [V, 1, S, S]
        if cfg.needs_patches:  # background patch from the same decoded image
            result.append(fn.transpose(resize(image, bg_start, bg_end, p), perm=[2, 0, 1]))  # [3, P, P]
        return (*result, index, epoch, label, has_bg, window, box_index, flip)

    return object_aware_views()


class DALIEngine:
    """Engine stage on a DALI pipeline over ``PATH/shards/*.tar``; iterating yields EngineBatch."""

    def __init__(self, path: str, cfg: LoaderConfig, manifest: dict | None = None):
        manifest = manifest or read_manifest(path)
        if "wds" not in manifest.get("formats", []):
            raise DatasetError(f"{path!r} has no WebDataset shards; rebuild with objloader-build --formats ffcv,wds")
        self.cfg = cfg
        self.shards = [os.path.join(path, t) for t in manifest["shards"]]
        self.n_boxes = np.asarray(manifest["records"]["n_boxes"], np.int64)
        self.labels = np.asarray(manifest["records"]["labels"], np.int64)
        n = len(self.labels)
        # DALI's shard i holds records [n*i/k, n*(i+1)/k); padding repeats its last record.
        lo, hi = n * cfg.rank // cfg.world_size, n * (cfg.rank + 1) // cfg.world_size
        self.shard_len = hi - lo
        self.epoch = 0
        self._pipe_epoch = None  # epoch the running pipeline will produce next
        self._pipe = None

    def __len__(self) -> int:
        return batches_per_epoch(self.shard_len, self.cfg.batch_size, self.cfg.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _start(self, first_epoch: int) -> None:
        cfg = self.cfg
        device_id = None
        if cfg.device.startswith("cuda"):
            device_id = torch.device(cfg.device).index or 0
        self._sampler = _WindowSampler(cfg, self.n_boxes, self.labels, -(-self.shard_len // cfg.batch_size),
                                       first_epoch)
        self._pipe = _build_pipeline(self.shards, cfg, self._sampler, device_id)
        self._pipe.build()
        self._pipe_epoch = first_epoch

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        cfg = self.cfg
        if self._pipe is None or self._pipe_epoch != self.epoch:
            # The pipeline runs epochs in sequence; jumping to another epoch (resume) restarts it.
            self._start(self.epoch)
            names = ["views"] + (["masks"] if cfg.needs_masks else []) + (["patches"] if cfg.needs_patches else [])
            names += ["index", "epoch", "label", "has_bg", "window", "box_index", "flip"]
            policy = LastBatchPolicy.DROP if cfg.drop_last else LastBatchPolicy.PARTIAL
            self._iter = DALIGenericIterator([self._pipe], names, reader_name="reader", last_batch_policy=policy,
                                             auto_reset=True)
        for out in self._iter:
            d = out[0]
            index = d["index"].reshape(-1).cpu().numpy()
            has_bg = d["has_bg"].reshape(-1).cpu().numpy().astype(bool)
            epochs = d["epoch"].reshape(-1).cpu().numpy()
            if np.any(epochs != self.epoch):
                raise RuntimeError(f"dali engine: batch of epoch {set(epochs.tolist())} inside epoch {self.epoch}")
            window = d["window"].cpu().numpy()
            patches = d.get("patches")
            if patches is not None and not has_bg.all():
                patches[torch.from_numpy(~has_bg).to(patches.device)] = 0
            yield EngineBatch(
                views=d["views"], masks=d.get("masks"), patches=patches, index=index,
                labels=d["label"].reshape(-1), has_bg=has_bg, epoch=self.epoch, window=window,
                flip=d["flip"].cpu().numpy().astype(bool), box_index=d["box_index"].reshape(-1).cpu().numpy(),
            )
        self._pipe_epoch = self.epoch + 1
