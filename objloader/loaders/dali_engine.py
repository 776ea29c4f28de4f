"""dali engine: an external source that reads this rank's share of the epoch order (the same
records, in the same order, as the torch and FFCV engines) -> decoders.image (mixed on GPU, cpu
otherwise) -> one resize-with-roi per view for the image and, with the same roi and flip, for
the mask -> the background patch cut from the same decoded image. On the CPU the view masks
are cut in the external source instead, by the compiled resampler the other engines use, and
only for the views the device stage mixes: a 64-px mask is tiny work, and DALI's operators and
per-sample conditionals for it cost more than the work itself (benchmarks/results/dali_stages.md).

The external source is a Python callback: DALI asks it for batch k of epoch e (``batch_info``)
and it returns the JPEG (and mask) bytes of records ``epoch_order(...)[k*B:(k+1)*B]``, read
through the shard indexes, with every view's crop window from the shared sampler
(objloader.augment.params) on each record's index, epoch, image size (the JPEG's frame header,
no decode) and boxes. Order and parameters are therefore the same in every engine, and a resumed
epoch replays the uninterrupted one. The callback depends on nothing but (epoch, batch), so DALI
runs it in ``num_workers`` Python worker processes (a parallel external source; forked, or spawned
once CUDA is initialised): the reading and sampling of upcoming batches scales with cores and
leaves the training process's thread free.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..augment.params import sample_geometry_batch
from ..augment.reference import EDGE_SLACK_PX
from ..procs import exit_with_parent
from ..errors import DatasetError
from ..store.integrity import read_manifest
from ..store.reader import BuiltDataset, decode_npy, decode_png, jpeg_shape
from ..store.schema import MEMBER
from .config import LoaderConfig, view_masks_resampled
from .device_stage import EngineBatch, has_background
from .order import batches_per_epoch, epoch_order, per_rank
from .resample import resample_hwc_to_chw, table_arrays, tables_fit

# What the pipeline passes through from the source to the EngineBatch.
_PASSED = ("index", "epoch", "label", "has_bg", "window", "box_index", "flip")
_PATCH = ("bg_anchor", "bg_shape", "bg_start", "bg_end")  # the patch's slice and roi (_patch_slices)


def pipeline_outputs(cfg: LoaderConfig) -> tuple:
    """The names of the pipeline's outputs, in the order it returns them: the one list that the
    pipeline, the engine's iterator and benchmarks/dali_stages.py read them by."""
    return (("views",) + (("masks",) if cfg.needs_masks else ()) + (("patches",) if cfg.needs_patches else ())
            + _PASSED)


class _EpochSource:
    """The external source: batch ``iteration`` of epoch ``first_epoch + epoch_idx`` is that
    slice of this rank's epoch order. Outputs, per batch, named by ``names``: JPEG bytes, the
    masks (when needed: with ``view_masks``, the view masks themselves, uint8 [V, 1, S, S] a
    sample, cut here for the views the device stage mixes and zero for the others; otherwise the
    mask PNG bytes), per view v its roi start and end (y, x) and flip, the background patch's
    slice and roi (when patches are needed), then ``_PASSED``. The pipeline is given only what it
    uses (DALI warns of unused outputs).

    Stateless but for a cache of the current epoch's order and the resampler's scratch, as a
    parallel source must be: any worker can produce any batch."""

    def __init__(self, ds: BuiltDataset, cfg: LoaderConfig, first_epoch: int, view_masks: bool):
        self.ds, self.cfg, self.first_epoch = ds, cfg, first_epoch
        self.view_masks = view_masks and cfg.needs_masks
        # Labels and box counts from the records' own members (KEY.cls, KEY.json), never from the
        # manifest's per-record lists, which only --verify checks against the records.
        self.members = ((MEMBER.image, MEMBER.label, MEMBER.boxes, MEMBER.bg_rect, MEMBER.meta)
                        + ((MEMBER.mask,) if cfg.needs_masks else ()))
        views = range(cfg.views)
        mask = ("view_masks",) if self.view_masks else ("mask",) if cfg.needs_masks else ()
        self.names = (("jpg",) + mask + tuple(f"{kind}{v}" for v in views for kind in ("start", "end", "flip"))
                      + (_PATCH if cfg.needs_patches else ()) + _PASSED)
        self._epoch, self._order = None, None
        self._tables = None  # the resampler's scratch for the view masks (made in the worker that uses it)
        self._pid = os.getpid()  # the process that made the source (the loader's)

    def __call__(self, info):
        if self._pid != os.getpid():  # first call in a DALI worker (forked or spawned)
            # DALI's workers do not watch their parent: a training process killed outright
            # would leave them waiting forever.
            exit_with_parent(expected=self._pid)
            self._pid = os.getpid()
        cfg, b = self.cfg, self.cfg.batch_size
        epoch = self.first_epoch + info.epoch_idx
        if epoch != self._epoch:
            self._epoch, self._order = epoch, epoch_order(len(self.ds), seed=cfg.seed, epoch=epoch,
                                                          shuffle=cfg.shuffle, rank=cfg.rank,
                                                          world_size=cfg.world_size)
        if info.iteration >= batches_per_epoch(len(self._order), b, cfg.drop_last):
            raise StopIteration  # the epoch's end (the last batch may have been partial); again past it
        index = self._order[info.iteration * b:(info.iteration + 1) * b].astype(np.int64)
        raws = [self.ds.raw(int(i), self.members) for i in index]
        sizes = np.empty((len(index), 2), np.int64)
        for k, raw in enumerate(raws):
            try:
                sizes[k] = jpeg_shape(raw[MEMBER.image])
            except DatasetError as e:
                raise self._damaged(int(index[k]), e) from None
        labels = np.array([int(raw[MEMBER.label]) for raw in raws], np.int64)
        n_boxes = np.array([json.loads(raw[MEMBER.meta])["n_boxes"] for raw in raws], np.int64)
        boxes = np.stack([decode_npy(raw[MEMBER.boxes]) for raw in raws]).astype(np.float32)
        bg = np.stack([decode_npy(raw[MEMBER.bg_rect]) for raw in raws]).astype(np.float32)
        window, flip, box_index = sample_geometry_batch(cfg.seed, epoch, index, sizes, n_boxes,
                                                        boxes, views=cfg.views, oa_crop=cfg.oa_crop,
                                                        crop_scale=cfg.crop_scale)
        has_bg = has_background(bg)
        bg = np.where(has_bg[:, None], bg, np.array([0, 0, 1, 1], np.float32))  # any valid roi; zeroed later
        mask_views = view_masks_resampled(cfg, epoch, index)
        out = {"jpg": [np.frombuffer(raw[MEMBER.image], np.uint8) for raw in raws], "index": index,
               "epoch": np.full(len(index), epoch, np.int64),
               "label": labels, "has_bg": has_bg.astype(np.uint8), "window": window,
               "box_index": box_index, "flip": flip.astype(np.uint8)}
        if self.view_masks:
            out["view_masks"] = self._cut_view_masks(index, raws, window, flip, mask_views)
        elif cfg.needs_masks:
            out["mask"] = [np.frombuffer(raw[MEMBER.mask], np.uint8) for raw in raws]
        for v in range(cfg.views):
            out.update({f"start{v}": window[:, v, [1, 0]], f"end{v}": window[:, v, [3, 2]],
                        f"flip{v}": flip[:, v].astype(np.int32)})
        if cfg.needs_patches:
            out.update(zip(_PATCH, _patch_slices(bg, sizes)))
        # Dense arrays are batches (first axis: the sample); DALI needs them contiguous.
        return tuple(out[n] if isinstance(out[n], list) else np.ascontiguousarray(out[n]) for n in self.names)

    def _damaged(self, i: int, e: DatasetError) -> DatasetError:
        """Record i's decode failure, naming the record and what to run."""
        return DatasetError(f"{self.ds.path}: record {i} ({self.ds.keys[i]!r}): {e}; run objloader-build --verify")

    def _cut_view_masks(self, index, raws, window, flip, mask_views) -> np.ndarray:
        """uint8 [B, V, 1, S, S]: each record's mask cut with each view's window and flip where
        ``mask_views`` (the torch engine's crop_views_into, masks only), zeros elsewhere."""
        s = self.cfg.image_size
        out = np.zeros((len(index), self.cfg.views, 1, s, s), np.uint8)
        for k in np.flatnonzero(mask_views.any(axis=1)):
            try:
                mask = decode_png(raws[k][MEMBER.mask])
            except DatasetError as e:
                raise self._damaged(int(index[k]), e) from None
            mask = np.ascontiguousarray(mask.reshape(mask.shape[0], mask.shape[1], 1))
            if self._tables is None or not tables_fit(self._tables, s, 1, max(mask.shape[:2]), s):
                self._tables = table_arrays(s, 1, max(max(mask.shape[:2]), 256), s)
            for v in np.flatnonzero(mask_views[k]):
                x0, y0, x1, y1 = window[k, v]
                resample_hwc_to_chw(mask, x0, y0, x1, y1, bool(flip[k, v]), False, out[k, v], *self._tables)
        return out


def _patch_slices(bg: np.ndarray, sizes: np.ndarray) -> list:
    """Per sample, the background patch as DALI cuts it: the whole pixels the rectangle touches
    (slice anchor and shape, y x), and the rectangle in that slice's pixels (resize roi start and
    end, y x), so the resize reads only the rectangle's own pixels (reference.cut_bg_patch)."""
    hw = sizes[:, :2].astype(np.float64)
    lo = bg[:, [1, 0]].astype(np.float64) * hw  # y0, x0 in pixels
    hi = bg[:, [3, 2]].astype(np.float64) * hw
    anchor = np.clip(np.floor(lo + EDGE_SLACK_PX), 0, hw - 1)  # the reference's edges (reference._axis_weights)
    end = np.minimum(np.maximum(np.ceil(hi - EDGE_SLACK_PX), anchor + 1), hw)
    return [anchor.astype(np.int32), (end - anchor).astype(np.int32), (lo - anchor).astype(np.float32),
            (hi - anchor).astype(np.float32)]


def _build_pipeline(source: _EpochSource, cfg: LoaderConfig, device_id):
    """The pipeline over ``source``; with ``source.view_masks`` the source gives the view masks
    themselves, otherwise the pipeline decodes and resamples every view's mask."""
    from nvidia.dali import fn, pipeline_def, types

    gpu = device_id is not None
    s, p = cfg.image_size, cfg.patch
    parallel = cfg.num_workers > 0

    def resize(image, start, end, size):
        return fn.resize(image, roi_start=start, roi_end=end, roi_relative=True, size=[size, size],
                         antialias=True, interp_type=types.INTERP_LINEAR)  # antialiased when downscaling

    def chw(x, mirror=0):
        """HWC -> CHW uint8, mirrored where ``mirror``: one crop_mirror_normalize pass (DALI's
        fn.transpose of the same data costs 4-5 times as long: +34 ms a batch of 64 x 2 views
        at 224 px on 2 threads, benchmarks/results/dali_stages.md)."""
        return fn.crop_mirror_normalize(x, mirror=mirror, output_layout="CHW", dtype=types.UINT8)

    def view_crop(x, parts, v):
        """View v of ``x``: its roi resized to S, flipped as the view is, channels first."""
        return chw(resize(x, parts[f"start{v}"], parts[f"end{v}"], s), parts[f"flip{v}"])

    # Python workers are forked (quick, and a script needs no main guard) unless this process
    # already holds a CUDA context, which a forked child would inherit broken: then they are
    # spawned, and each re-imports the main script (which needs `if __name__ == "__main__":`).
    start = "spawn" if torch.cuda.is_initialized() else "fork"

    @pipeline_def(batch_size=cfg.batch_size, num_threads=max(cfg.num_workers, 1), device_id=device_id,
                  prefetch_queue_depth=2,  # no random numbers: no seed
                  py_num_workers=max(cfg.num_workers, 1), py_start_method=start)
    def object_aware_views():
        queue = {"prefetch_queue_depth": 2} if parallel else {}  # batches each worker prepares ahead
        parts = dict(zip(source.names, fn.external_source(source, num_outputs=len(source.names), batch=True,
                                                          batch_info=True, parallel=parallel, **queue)))
        image = fn.decoders.image(parts["jpg"], device="mixed" if gpu else "cpu", output_type=types.RGB)
        out = {n: parts[n] for n in _PASSED}
        out["views"] = fn.stack(*(view_crop(image, parts, v) for v in range(cfg.views)))  # [V, 3, S, S]
        # OA masks: the same roi and flip as each view.
        if source.view_masks:  # cut by the source (the CPU): [V, 1, S, S]
            out["masks"] = parts["view_masks"]
        elif cfg.needs_masks:
            mask = fn.decoders.image(parts["mask"], device="mixed" if gpu else "cpu", output_type=types.GRAY)
            out["masks"] = fn.stack(*(view_crop(mask, parts, v) for v in range(cfg.views)))  # [V, 1, S, S]
        if cfg.needs_patches:  # background patch from the same decoded image, from its own pixels only
            region = fn.slice(image, parts["bg_anchor"], parts["bg_shape"], axes=[0, 1])
            patch = fn.resize(region, roi_start=parts["bg_start"], roi_end=parts["bg_end"], roi_relative=False,
                              size=[p, p], antialias=True, interp_type=types.INTERP_LINEAR)
            out["patches"] = chw(patch)  # [3, P, P]
        return tuple(out[n] for n in pipeline_outputs(cfg))

    return object_aware_views()


class DALIEngine:
    """Engine stage on a DALI pipeline over ``PATH/shards/*.tar``; iterating yields EngineBatch."""

    def __init__(self, path: str, cfg: LoaderConfig, manifest: dict | None = None):
        manifest = manifest or read_manifest(path)
        if "wds" not in manifest.get("formats", []):
            raise DatasetError(f"{path!r} has no WebDataset shards; rebuild with objloader-build --formats ffcv,wds")
        self.cfg = cfg
        self.ds = BuiltDataset(path, manifest)  # the shard indexes, parsed once
        self.epoch = 0
        self._pipe_epoch = None  # epoch the running pipeline will produce next; None: mid-epoch
        self._pipe = None

    def __len__(self) -> int:
        return batches_per_epoch(per_rank(len(self.ds), self.cfg.world_size), self.cfg.batch_size, self.cfg.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _start(self, first_epoch: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        cfg = self.cfg
        device_id = None
        if cfg.device.startswith("cuda"):
            device_id = torch.device(cfg.device).index or 0
        self._pipe = None  # a previous pipeline's Python workers go before new ones start
        # On the CPU the source cuts the view masks, only for the views the device stage mixes; on
        # the GPU the pipeline resamples every view's mask there (too little work to be worth a
        # per-sample branch, and it would cost the source's time and a transfer).
        source = _EpochSource(self.ds, cfg, first_epoch, view_masks=device_id is None)
        self._pipe = _build_pipeline(source, cfg, device_id)
        self._pipe.build()
        # No reader: the iterator runs until the source's StopIteration (a partial last batch included).
        self._iter = DALIGenericIterator([self._pipe], list(pipeline_outputs(cfg)), auto_reset=True)
        self._pipe_epoch = first_epoch

    def __iter__(self):
        if len(self) == 0:  # batch larger than the shard, drop_last: no batch (DALI's iterator would refuse)
            return
        if self._pipe_epoch != self.epoch:
            # The pipeline runs whole epochs in sequence; another epoch, or the rest of one that was
            # left mid-way, needs a fresh one (its source starts at batch 0 of self.epoch).
            self._start(self.epoch)
        self._pipe_epoch = None
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
