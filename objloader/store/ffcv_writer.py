"""FFCV writer: data.beton with the fields of DESIGN.md's record schema.

The image field stores the record's JPEG bytes as they are (no second lossy encode), in the
layout of ffcv's RGBImageField, so every stock FFCV image decoder reads it.

ffcv's DatasetWriter writes from worker processes and its parent waits until they have counted
every record as written, so a worker that raised or was killed left the parent waiting forever.
The workers here report their failure and the parent watches them (``_write_records``).
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback

import numpy as np
from tqdm import tqdm

from ..errors import BuildError, ObjloaderError
from ..fileio import write_failure
from ..optional import require
from .schema import IDENTITY_PREFIX, BuildOptions, Record, ffcv_fields
from .staging import StagedRecords


def _fields(opts: BuildOptions, with_gt: bool) -> dict:
    require("ffcv", "objloader-build --formats ffcv (data.beton); build --formats wds without it")
    from ffcv.fields import IntField, JSONField, NDArrayField

    M, K = opts.mask_res, opts.max_boxes
    kinds = {
        "image": _make_jpeg_field_class(),
        "label": IntField, "n_boxes": IntField, "n_gt_boxes": IntField,
        "mask": lambda: NDArrayField(np.dtype("uint8"), (M, M)),
        "gt_mask": lambda: NDArrayField(np.dtype("uint8"), (M, M)),
        "boxes": lambda: NDArrayField(np.dtype("float32"), (K, 4)),
        "gt_boxes": lambda: NDArrayField(np.dtype("float32"), (K, 4)),
        "bg_rect": lambda: NDArrayField(np.dtype("float32"), (4,)),
        "key": JSONField,
    }
    # The names and their order are the schema's; this only says how ffcv stores each.
    return {name: kinds[name]() for name in ffcv_fields(with_gt)}


def _make_jpeg_field_class():
    # Built on demand so that importing objloader.store does not import ffcv (~5 s).
    from ffcv.fields import RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES

    class JpegBytesField(RGBImageField):
        """RGBImageField whose input is (jpeg bytes, height, width): stored verbatim as 'jpg'."""

        def encode(self, destination, value, malloc):
            jpeg, height, width = value
            destination["mode"] = IMAGE_MODES["jpg"]
            destination["height"], destination["width"] = height, width
            destination["data_ptr"], storage = malloc(len(jpeg))
            storage[:] = np.frombuffer(jpeg, dtype=np.uint8)

    return JpegBytesField


class _RecordTuples:
    """Indexed dataset for ffcv's DatasetWriter: record i as a tuple in field order."""

    def __init__(self, staged: StagedRecords, fields: dict):
        self.staged, self.fields = staged, fields
        self.with_gt = "gt_mask" in fields

    def __len__(self):
        return len(self.staged)

    def __getitem__(self, i):
        r: Record = self.staged[i]
        arrays = [("mask", r.mask), ("boxes", r.boxes), ("bg_rect", r.bg_rect)]
        if self.with_gt:
            arrays += [("gt_mask", r.gt_mask), ("gt_boxes", r.gt_boxes)]
        for name, a in arrays:
            # NDArrayField copies the raw bytes: an array of another dtype with the same item size
            # would be stored reinterpreted, without any error. (The parent names the record.)
            want = self.fields[name]
            if not (isinstance(a, np.ndarray) and a.dtype == want.dtype and a.shape == want.shape):
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise BuildError(f"{name} is {got}, expected {want.dtype} {want.shape}")
        values = {"image": (r.image, r.height, r.width), "label": r.label, "mask": r.mask, "boxes": r.boxes,
                  "n_boxes": r.n_boxes, "bg_rect": r.bg_rect, "key": {"key": r.key, "sha1": r.sha1},
                  "gt_mask": r.gt_mask, "gt_boxes": r.gt_boxes, "n_gt_boxes": r.n_gt_boxes}
        return tuple(values[name] for name in self.fields)  # the beton's field order


def identity_arguments(identity: str) -> bytes:
    """What the key field's descriptor holds in its (otherwise unused) arguments: the build's
    identity, so a beton from another build is refused by reading its header. ffcv's JSONField
    ignores its arguments (BytesField.from_binary), so stock readers are unaffected."""
    return (IDENTITY_PREFIX + identity).encode("ascii")


def write_beton(path: str, staged: StagedRecords, opts: BuildOptions, with_gt: bool, workers: int,
                identity: str) -> None:
    from ffcv.types import FieldDescType, HeaderType
    from ffcv.writer import DatasetWriter

    fields = _fields(opts, with_gt)
    image_slot = list(fields).index("image")
    key_slot = list(fields).index("key")
    # Offset of the arguments inside a field descriptor (type_id, name, arguments).
    args_at = FieldDescType.fields["arguments"][1]

    class _Writer(DatasetWriter):
        def prepare(self):
            super().prepare()
            # ffcv records a subclass as a custom field (type 255); ours has RGBImageField's exact
            # layout, so mark it as one (type 2) and plain ffcv readers need no custom_fields.
            with open(self.fname, "r+b") as f:
                f.seek(HeaderType.itemsize + image_slot * FieldDescType.itemsize)
                f.write(np.uint8(2).tobytes())
                f.seek(HeaderType.itemsize + key_slot * FieldDescType.itemsize + args_at)
                f.write(identity_arguments(identity))

    try:
        _write_records(_Writer(path, fields, num_workers=max(1, workers)), _RecordTuples(staged, fields),
                       chunksize=64, name_record=lambda i: _record_name(staged, i))
    except BaseException:
        # A beton whose write failed is incomplete: leave nothing that could pass for one.
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        raise


def _record_name(staged: StagedRecords, i: int) -> str:
    try:
        return f"record {i} ({staged[i].key!r})"
    except Exception:  # the record may be what could not be read; its index still names it
        return f"record {i}"


def _write_records(writer, dataset, chunksize: int, name_record) -> None:
    """ffcv's ``DatasetWriter.from_indexed_dataset`` (without shuffling), with its workers watched:
    the first failure stops the others and raises BuildError naming the record. Uses the same
    DatasetWriter internals (prepare, metadata_sm, finalize) as ffcv 1.0.2's own loop, which
    constraints.txt pins."""
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.utils import chunks

    ctx = mp.get_context("fork")  # the fields are local classes, which a spawned worker could not unpickle
    n = len(dataset)
    writer.num_samples = n
    writer.prepare()
    work, allocations, failures = ctx.Queue(), ctx.Queue(), ctx.Queue()
    for chunk in chunks(list(enumerate(range(n))), chunksize):
        work.put(chunk)
    for _ in range(writer.num_workers):
        work.put(None)
    done = ctx.Value(ctypes.c_uint64, 0)
    allocator = MemoryAllocator(writer.fname, writer.data_region_start, writer.page_size)
    args = (work, writer.metadata_sm, writer.metadata_type, writer.fields, allocator, done, allocations,
            failures, dataset)
    processes = [ctx.Process(target=_worker, args=args, daemon=True) for _ in range(writer.num_workers)]
    try:
        for p in processes:
            p.start()
        with tqdm(total=n, desc="beton", unit="rec", file=sys.stderr, dynamic_ncols=True) as bar:
            while (written := done.value) < n:
                _raise_on_failure(processes, failures, name_record)
                bar.update(written - bar.n)
                time.sleep(0.05)
            bar.update(n - bar.n)
        tables = []
        while len(tables) < len(processes):
            try:
                tables.append(allocations.get(timeout=0.5))
            except queue.Empty:
                _raise_on_failure(processes, failures, name_record)
                if not any(p.is_alive() for p in processes) and allocations.empty():
                    raise BuildError("writing data.beton failed: its writer processes ended without "
                                     "reporting what they wrote") from None
        writer.finalize([a for table in tables for a in table])
    finally:
        for p in processes:
            if p.is_alive():
                p.terminate()  # after a failure the others may wait forever for the failed one's page
        for p in processes:
            if p.pid is not None:
                p.join()
        writer.metadata_sm.close()
        writer.metadata_sm.unlink()


def _raise_on_failure(processes, failures, name_record) -> None:
    """BuildError for the first worker that reported a failure or ended with an error."""
    try:
        index, message = failures.get_nowait()
    except queue.Empty:
        dead = [p for p in processes if p.exitcode not in (None, 0)]
        if not dead:
            return
        code = dead[0].exitcode
        try:  # a worker that raised has flushed its report before exiting
            index, message = failures.get(timeout=1 if code > 0 else 0.01)
        except queue.Empty:
            index = None
            message = (f"a writer process was killed by signal {-code}" if code < 0
                       else f"a writer process ended with exit code {code}")
    where = f" at {name_record(index)}" if index is not None else ""
    raise BuildError(f"writing data.beton failed{where}: {message}")


def _worker(work, metadata_sm, metadata_type, fields, allocator, done, allocations, failures, dataset):
    """ffcv's ``worker_job_indexed_dataset``, except that a failure is reported on ``failures`` as
    (record index or None, message) before the worker exits with status 1."""
    from ffcv.writer import handle_sample

    metadata = np.frombuffer(metadata_sm.buf, dtype=metadata_type)
    index = None
    try:
        # Entered and left by hand, not with ``with``: leaving writes this worker's last page and
        # waits for the pages before it, which a failed worker must not do (they may never come).
        allocator.__enter__()
        for chunk in iter(work.get, None):
            for dest, index in chunk:
                handle_sample(dataset[index], dest, metadata_type.names, metadata, allocator, fields)
            with done.get_lock():
                done.value += len(chunk)
        index = None  # a failure from here on is no record's
        allocator.__exit__(None, None, None)
        allocations.put(allocator.allocations)
    except BaseException as e:
        if isinstance(e, ObjloaderError):
            message = str(e)
        elif isinstance(e, OSError):  # a page that could not be written (a full disk): one line
            message = write_failure(allocator.fname, e)
        else:  # a bug rather than bad data: keep where it happened
            traceback.print_exc()
            message = f"{type(e).__name__}: {e} (traceback above)"
        failures.put((None if index is None else int(index), message))
        sys.exit(1)
