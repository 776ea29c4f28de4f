"""ffcv engine: one custom FFCV decoder decodes each JPEG once and writes, per sample, all V views,
their masks and the background patch (numba, parallel over the batch, no Python per sample).

FFCV gives an operation only its own field, so the record's other fields (boxes, n_boxes,
bg_rect, mask pointers) are read once into tables when the loader is built, and the compiled
decoder reaches them (and the current epoch) through their addresses: numba would otherwise
freeze captured arrays into the compiled code as constants.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace

import numba
import numpy as np
import torch
from numba import types
from numba.extending import intrinsic

from ..augment.params import sample_geometry, sample_geometry_batch
from ..errors import DatasetError
from ..store.integrity import read_manifest
from ..store.schema import BETON_FILE, ffcv_fields
from .config import LoaderConfig, resamples_view_mask
from .device_stage import EngineBatch, has_background
from .order import batches_per_epoch, epoch_order
from .jpeg import decode_rgb_into
from .resample import crop_views_into, cut_patch_into, table_arrays

_INDEX_BYTES = 8  # each packed sample starts with its record index, to check alignment


def _pointer_to(nbtype):
    @intrinsic
    def pointer(typingctx, address):
        sig = types.CPointer(nbtype)(types.intp)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(nbtype)))

        return sig, codegen

    return pointer


_f32_at, _i64_at, _u64_at = _pointer_to(types.float32), _pointer_to(types.int64), _pointer_to(types.uint64)


class _RecordTables:
    """Per-record boxes, n_boxes, bg_rect, mask pointer and image size, read from the .beton."""

    def __init__(self, beton: str, manifest: dict):
        from ffcv.fields.rgb_image import IMAGE_MODES
        from ffcv.reader import Reader

        r = Reader(beton)
        slot = {name: r.metadata.dtype.names[k] for k, name in enumerate(r.field_names)}
        meta = r.metadata
        opts = manifest["options"]
        self.mask_res, self.max_boxes = int(opts["mask_res"]), int(opts["max_boxes"])
        self.n = len(meta)
        self.heights = meta[slot["image"]]["height"].astype(np.int64)
        self.widths = meta[slot["image"]]["width"].astype(np.int64)
        self.labels = meta[slot["label"]].astype(np.int64)
        self.n_boxes = np.ascontiguousarray(meta[slot["n_boxes"]].astype(np.int64))
        self.mask_ptr = np.ascontiguousarray(meta[slot["mask"]].astype(np.uint64))
        data = np.memmap(beton, dtype=np.uint8, mode="r")
        self.boxes = np.ascontiguousarray(self._gather(data, meta[slot["boxes"]], self.max_boxes * 16)
                                          .view(np.float32).reshape(self.n, self.max_boxes, 4))
        self.bg_rect = np.ascontiguousarray(self._gather(data, meta[slot["bg_rect"]], 16).view(np.float32))
        self.has_bg = has_background(self.bg_rect)
        if np.any(meta[slot["image"]]["mode"] != IMAGE_MODES["jpg"]):
            raise DatasetError(f"{beton}: image field holds non-JPEG records; it was not written by objloader-build")
        self.epoch = np.zeros(1, np.int64)  # read by the compiled decoder at every batch

    @staticmethod
    def _gather(data: np.ndarray, ptrs: np.ndarray, nbytes: int) -> np.ndarray:
        offsets = ptrs.astype(np.int64)[:, None] + np.arange(nbytes, dtype=np.int64)[None, :]
        return np.ascontiguousarray(data[offsets])


def _make_decoder_class():
    from ffcv.fields.rgb_image import SimpleRGBImageDecoder
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler

    class ObjectAwareViews(SimpleRGBImageDecoder):
        """image field -> uint8 [B, packed]: index | V views [3,S,S] | V masks [S,S] | patch [3,P,P].

        A subclass of the field's decoder class only because ffcv recognises a pipeline's decoder
        by that isinstance check; nothing of SimpleRGBImageDecoder's code is used.
        """

        def __init__(self, tables: _RecordTables, cfg: LoaderConfig):
            super().__init__()  # Operation's state: metadata and memory_read arrive via accept_globals
            self.tables, self.cfg = tables, cfg
            s, v, p = cfg.image_size, cfg.views, cfg.patch
            self.view_bytes = v * 3 * s * s
            self.mask_bytes = v * s * s if cfg.needs_masks else 0
            self.patch_bytes = 3 * p * p if cfg.needs_patches else 0
            self.packed = _INDEX_BYTES + self.view_bytes + self.mask_bytes + self.patch_bytes
            largest = int(max(tables.heights.max(), tables.widths.max(), tables.mask_res))
            self.table_shapes = [t.shape for t in table_arrays(s, 3, largest, min(s, p) if cfg.needs_patches else s)]

        def declare_state_and_memory(self, previous_state):
            t = self.tables
            biggest = int((t.heights * t.widths).max()) * 3
            v = self.cfg.views
            return (replace(previous_state, jit_mode=True, shape=(self.packed,), dtype=np.dtype("u1")),
                    [AllocationQuery((self.packed,), np.dtype("u1")),
                     AllocationQuery((biggest,), np.dtype("u1")),  # decoded image
                     AllocationQuery((v, 4), np.dtype("f4")),  # windows
                     AllocationQuery((v,), np.dtype("?")),  # flips
                     AllocationQuery((v,), np.dtype("?")),  # views whose mask is resampled
                     AllocationQuery(self.table_shapes[0], np.dtype("i4")),  # resample tables
                     AllocationQuery(self.table_shapes[1], np.dtype("i4")),
                     AllocationQuery(self.table_shapes[2], np.dtype("f4")),
                     AllocationQuery(self.table_shapes[3], np.dtype("f4"))])

        def generate_code(self):
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            t, cfg = self.tables, self.cfg
            n, k_max, m_res = t.n, t.max_boxes, t.mask_res
            boxes_at, n_boxes_at = t.boxes.ctypes.data, t.n_boxes.ctypes.data
            bg_at, mask_ptr_at, epoch_at = t.bg_rect.ctypes.data, t.mask_ptr.ctypes.data, t.epoch.ctypes.data
            seed, oa_crop, views, size, patch = cfg.seed, cfg.oa_crop, cfg.views, cfg.image_size, cfg.patch
            scale_lo, scale_hi = cfg.crop_scale
            view_end = _INDEX_BYTES + self.view_bytes
            mask_end = view_end + self.mask_bytes
            with_masks, with_patch = self.mask_bytes > 0, self.patch_bytes > 0
            all_masks, p_mix = bool(cfg.return_masks), float(cfg.bg_mixup)  # for resamples_view_mask

            def decode(batch_indices, storage, metadata, storage_state):
                destination, images, windows, flips, mask_flags, first, count, weights, work = storage
                boxes = numba.carray(_f32_at(boxes_at), (n, k_max, 4))
                n_boxes = numba.carray(_i64_at(n_boxes_at), (n,))
                bg_rect = numba.carray(_f32_at(bg_at), (n, 4))
                mask_ptr = numba.carray(_u64_at(mask_ptr_at), (n,))
                epoch = numba.carray(_i64_at(epoch_at), (1,))[0]
                for i in my_range(len(batch_indices)):
                    idx = np.int64(batch_indices[i])
                    field = metadata[idx]
                    h, w = np.int64(field["height"]), np.int64(field["width"])
                    image = images[i][: h * w * 3].reshape(h, w, 3)
                    status = decode_rgb_into(mem_read(field["data_ptr"], storage_state), image)
                    sample_geometry(seed, epoch, idx, h, w, boxes[idx], n_boxes[idx], oa_crop, scale_lo, scale_hi,
                                    windows[i], flips[i])
                    out = destination[i]
                    tag = idx if status == 0 else np.int64(-1)  # -1: the main thread reports the record
                    for b in range(_INDEX_BYTES):
                        out[b] = np.uint8((tag >> (8 * b)) & 255)
                    view_out = out[_INDEX_BYTES:view_end].reshape(views, 3, size, size)
                    if with_masks:
                        mask = mem_read(mask_ptr[idx], storage_state)[: m_res * m_res].reshape(m_res, m_res, 1)
                        mask_out = out[view_end:mask_end].reshape(views, 1, size, size)
                    else:
                        mask = images[i][:1].reshape(1, 1, 1)  # a contiguous stand-in, never read
                        mask_out = out[view_end:view_end].reshape(0, 1, size, size)
                    mask_views = mask_flags[i]
                    for v in range(views):
                        mask_views[v] = resamples_view_mask(all_masks, seed, epoch, idx, v, p_mix)
                    crop_views_into(image, mask, windows[i], flips[i], view_out, mask_out, mask_views, first[i], count[i],
                                    weights[i], work[i])
                    if with_patch:
                        cut_patch_into(image, bg_rect[idx], out[mask_end:].reshape(3, patch, patch), first[i], count[i],
                                       weights[i], work[i])
                return destination[: len(batch_indices)]

            decode.is_parallel = True
            return decode

    return ObjectAwareViews


class FFCVEngine:
    """Engine stage on an FFCV Loader over ``PATH/data.beton``; iterating yields EngineBatch."""

    def __init__(self, path: str, cfg: LoaderConfig, manifest: dict | None = None):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader

        beton = os.path.join(path, BETON_FILE)
        manifest = manifest or read_manifest(path)
        if "ffcv" not in manifest.get("formats", []) or not os.path.isfile(beton):
            raise DatasetError(f"{path!r} has no {BETON_FILE}; rebuild with objloader-build --formats ffcv,wds")
        self.cfg, self.beton = cfg, beton
        self.tables = _RecordTables(beton, manifest)
        self.epoch = 0
        from ffcv.traversal_order.base import TraversalOrder

        self._order = self._epoch_order()
        decoder = _make_decoder_class()(self.tables, cfg)
        self.packed = decoder
        pipelines = {name: None for name in ffcv_fields(bool(manifest.get("has_gt")))}  # None: not decoded
        pipelines.update(image=[decoder], label=[IntDecoder()])

        engine = self

        class _Order(TraversalOrder):
            """Visits exactly the order the engine computed for its epoch (epoch_order).

            ffcv 1.0.2 accepts a custom order only as an *instance* that it then calls with the
            loader (isinstance check, then order(loader)), so the instance binds itself.
            """

            def __call__(self, loader):
                TraversalOrder.__init__(self, loader)
                return self

            def sample_order(self, epoch):
                return engine._order

        with _lean_os_cache():
            self.loader = Loader(beton, batch_size=cfg.batch_size, num_workers=max(cfg.num_workers, 1),
                                 os_cache=True, order=object.__new__(_Order), drop_last=cfg.drop_last,
                                 pipelines=pipelines, batches_ahead=2)

    def _epoch_order(self) -> np.ndarray:
        c = self.cfg
        return epoch_order(self.tables.n, seed=c.seed, epoch=self.epoch, shuffle=c.shuffle, rank=c.rank,
                           world_size=c.world_size).astype(np.uint64)

    def __len__(self) -> int:
        return batches_per_epoch(len(self._order), self.cfg.batch_size, self.cfg.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._order = self._epoch_order()

    def __iter__(self):
        self.tables.epoch[0] = self.epoch  # read by the compiled decoder
        epoch_iter = iter(self.loader)
        try:
            yield from self._batches(epoch_iter, self._order.astype(np.int64))
        finally:
            # Stopping mid-epoch would otherwise leave ffcv's worker thread blocked, holding buffers.
            epoch_iter.close()

    def _batches(self, epoch_iter, order):
        cfg, t, dec = self.cfg, self.tables, self.packed
        b, s, v, p = cfg.batch_size, cfg.image_size, cfg.views, cfg.patch
        view_end = _INDEX_BYTES + dec.view_bytes
        mask_end = view_end + dec.mask_bytes
        for k, (packed, labels) in enumerate(_while_alive(epoch_iter)):
            packed = packed.numpy() if isinstance(packed, torch.Tensor) else packed
            labels = labels.numpy() if isinstance(labels, torch.Tensor) else labels
            index = order[k * b:k * b + len(packed)]
            got = packed[:, :_INDEX_BYTES].copy().view(np.int64).reshape(-1)
            if np.any(got == -1):
                bad = index[got == -1]
                raise DatasetError(f"{self.beton}: record(s) {bad.tolist()} do not decode as JPEG; "
                                   "run objloader-build --verify on this dataset")
            if not np.array_equal(got, index):
                raise RuntimeError(f"ffcv engine: batch {k} holds records {got[:4]}..., expected {index[:4]}...")
            data = torch.from_numpy(packed)
            window, flip, box_index = sample_geometry_batch(cfg.seed, self.epoch, index,
                                                            np.stack([t.heights[index], t.widths[index]], 1),
                                                            t.n_boxes[index], t.boxes[index], views=v,
                                                            oa_crop=cfg.oa_crop, crop_scale=cfg.crop_scale)
            yield EngineBatch(
                views=data[:, _INDEX_BYTES:view_end].view(-1, v, 3, s, s),
                masks=data[:, view_end:mask_end].view(-1, v, 1, s, s) if dec.mask_bytes else None,
                patches=data[:, mask_end:].view(-1, 3, p, p) if dec.patch_bytes else None,
                index=index, labels=torch.from_numpy(np.asarray(labels).reshape(-1).astype(np.int64)),
                has_bg=t.has_bg[index], epoch=self.epoch, window=window, flip=flip, box_index=box_index,
                aliased=True,
            )


@contextlib.contextmanager
def _lean_os_cache():
    """While a Loader is built here, ffcv's OS-cache memory manager skips its per-allocation tables.

    ffcv 1.0.2's MemoryManager base class builds three Python containers over every allocation of
    the file (ptr_to_size, sample_to_pages, page_to_samples): at 100,000 records 1.5 s of the
    loader's opening and ~200 MB that never shrink. Only the process cache and the QUASI_RANDOM
    order read them; this engine uses the OS cache (os_cache=True) and its own order, which need
    only the allocation table sorted by address, as the base class leaves it. Loader.__init__
    builds its manager from its module's global, so the global is swapped for the duration of the
    construction only: a stock ffcv Loader in the same process keeps ffcv's own class.
    """
    import ffcv.loader.loader as loader_module
    from ffcv.memory_managers.os_cache import OSCacheContext, OSCacheManager

    class SortedTableOSCache(OSCacheManager):
        def __init__(self, reader):  # noqa: super().__init__ is what is skipped
            self.reader = reader
            table = reader.alloc_table
            order = np.argsort(table["ptr"], kind="stable")
            self.ptrs, self.sizes = table["ptr"][order], table["size"][order]
            self.context = OSCacheContext(self)

    stock = loader_module.OSCacheManager
    loader_module.OSCacheManager = SortedTableOSCache
    try:
        yield
    finally:
        loader_module.OSCacheManager = stock


def _while_alive(epoch_iter):
    """ffcv's epoch iterator, but raising when its thread has died.

    ffcv 1.0.2 runs the pipeline in a thread that only forwards StopIteration: any other exception
    ends the thread (its traceback goes to stderr through threading.excepthook) while the consumer
    waits on the output queue forever. So before each get, wait on the queue's own condition,
    which a put wakes at once, and look at the thread every 0.1 s.
    """
    q = epoch_iter.output_queue
    while True:
        with q.not_empty:
            while not q._qsize():  # the queue's own size, under its lock
                if not epoch_iter.is_alive():
                    raise RuntimeError("the FFCV loader thread stopped with an exception (its traceback is "
                                       "printed above); no further batches will come")
                q.not_empty.wait(0.1)
        try:
            yield next(epoch_iter)
        except StopIteration:
            return

