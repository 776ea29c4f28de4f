"""Staged records: the build's intermediate form, in chunk files written atomically.

Workers' records land here first; the FFCV and WebDataset writers then read them in order.
Chunks make an interrupted build resumable: a chunk file exists only when it is complete.

A chunk is one ``.npz`` of plain arrays (read with ``allow_pickle=False``) plus a JSON text of
the per-item scalars, so reading a chunk back can never run code, whoever wrote the file. Every
array's dtype and shape and every item's fields are checked on read: a damaged, truncated or
foreign chunk raises StageError, and the builder redoes it.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from typing import Iterator, List, Optional, Sequence

import numpy as np

from ..errors import StageError
from ..fileio import write_atomic
from .schema import Record

CHUNK = 512  # records per chunk file
FORMAT = "objloader-stage/1"


# A Record's integer fields, staged in the chunk's JSON; its arrays and bytes go in the npz. Every
# field of Record is one or the other (tests/test_store_integrity.py checks that a record with
# every field set comes back equal), so a new field cannot be dropped on resume unnoticed.
_INT_FIELDS = ("height", "width", "label", "n_boxes", "n_gt_boxes", "boxes_dropped", "gt_boxes_dropped")


def chunk_path(stage_dir: str, i: int) -> str:
    return os.path.join(stage_dir, f"chunk-{i:06d}.npz")


def write_chunk(stage_dir: str, i: int, keys: Sequence[str], items: list) -> None:
    """items: per source sample (``keys`` in source order), a Record or a skip reason (str)."""
    records = [r for r in items if isinstance(r, Record)]
    with_gt = [r for r in records if r.gt_mask is not None]
    _check_arrays(records)
    images = [r.image for r in records]
    meta = []
    for key, item in zip(keys, items):
        if isinstance(item, Record):
            meta.append({"key": item.key, "sha1": item.sha1, **{f: int(getattr(item, f)) for f in _INT_FIELDS},
                         "has_gt": item.gt_mask is not None, "notes": list(item.notes)})
        else:
            meta.append({"key": key, "skip": str(item)})

    def stack(arrays, dtype, tail):
        return np.stack(arrays).astype(dtype, copy=False) if arrays else np.zeros((0,) + tail, dtype)

    m = records[0].mask.shape if records else (0, 0)
    k = records[0].boxes.shape if records else (0, 4)
    arrays = {
        "meta": np.frombuffer(json.dumps({"format": FORMAT, "items": meta}).encode(), np.uint8),
        "image_sizes": np.array([len(b) for b in images], np.int64),
        "images": np.frombuffer(b"".join(images), np.uint8),
        "mask": stack([r.mask for r in records], np.uint8, m),
        "boxes": stack([r.boxes for r in records], np.float32, k),
        "bg_rect": stack([r.bg_rect for r in records], np.float32, (4,)),
        "gt_mask": stack([r.gt_mask for r in with_gt], np.uint8, m),
        "gt_boxes": stack([r.gt_boxes for r in with_gt], np.float32, k),
    }
    write_atomic(chunk_path(stage_dir, i), lambda f: np.savez(f, **arrays))


_SCHEMA_DTYPES = {"mask": np.uint8, "boxes": np.float32, "bg_rect": np.float32, "gt_mask": np.uint8,
                  "gt_boxes": np.float32}


def _check_arrays(records: List[Record]) -> None:
    """Each record's arrays have the schema's dtype and the chunk's shapes: a chunk stacks them,
    and a stack would silently convert a malformed value instead of refusing it."""
    shapes = {}
    for r in records:
        for name, dtype in _SCHEMA_DTYPES.items():
            a = getattr(r, name)
            if a is None and name.startswith("gt_"):
                continue
            want = shapes.setdefault(name, a.shape if isinstance(a, np.ndarray) else None)
            if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == want):
                got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise StageError(f"record {r.key!r}: {name} is {got}, expected {np.dtype(dtype)} {want}")


def read_chunk(stage_dir: str, i: int, keys: Optional[Sequence[str]] = None) -> list:
    """The items of chunk i, as write_chunk was given them; ``keys``: the source keys the chunk
    must hold, in order. Raises StageError saying what is wrong with the file."""
    path = chunk_path(stage_dir, i)
    try:
        return _parse_chunk(path, keys)
    except StageError as e:
        raise StageError(f"staged chunk {path}: {e}") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise StageError(f"staged chunk {path} cannot be read ({type(e).__name__}: {e})") from None


def _parse_chunk(path: str, keys: Optional[Sequence[str]]) -> list:
    with open(path, "rb") as f:
        data = f.read()
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        a = {name: z[name] for name in ("meta", "image_sizes", "images", "mask", "boxes", "bg_rect",
                                       "gt_mask", "gt_boxes")}
    meta = json.loads(a["meta"].tobytes().decode("utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("items"), list):
        raise StageError(f"not a {FORMAT} chunk")
    items_meta = meta["items"]
    if keys is not None and [m.get("key") if isinstance(m, dict) else None for m in items_meta] != list(keys):
        raise StageError("holds other inputs than the build stages there")
    n = sum(1 for m in items_meta if "skip" not in m)
    n_gt = sum(1 for m in items_meta if m.get("has_gt"))
    sizes = a["image_sizes"]
    _expect(a, "image_sizes", np.int64, (n,))
    _expect(a, "images", np.uint8, (int(sizes.sum()),))
    if (sizes < 0).any():
        raise StageError("negative image size")
    _expect(a, "mask", np.uint8, (n,) + a["mask"].shape[1:], ndim=3)
    _expect(a, "boxes", np.float32, (n,) + a["boxes"].shape[1:], ndim=3)
    _expect(a, "bg_rect", np.float32, (n, 4))
    _expect(a, "gt_mask", np.uint8, (n_gt,) + a["mask"].shape[1:])
    _expect(a, "gt_boxes", np.float32, (n_gt,) + a["boxes"].shape[1:])
    ends = np.cumsum(sizes)
    items, r, g = [], 0, 0
    for m in items_meta:
        if "skip" in m:
            if not isinstance(m["skip"], str):
                raise StageError("a skip reason that is not a text")
            items.append(m["skip"])
            continue
        gt = bool(m["has_gt"])
        start = int(ends[r - 1]) if r else 0
        items.append(Record(
            key=str(m["key"]), sha1=str(m["sha1"]), image=a["images"][start:int(ends[r])].tobytes(),
            mask=a["mask"][r], boxes=a["boxes"][r], bg_rect=a["bg_rect"][r],
            gt_mask=a["gt_mask"][g] if gt else None, gt_boxes=a["gt_boxes"][g] if gt else None,
            notes=[str(x) for x in m["notes"]], **{f: int(m[f]) for f in _INT_FIELDS}))
        r, g = r + 1, g + gt
    return items


def _expect(arrays: dict, name: str, dtype, shape: tuple, ndim: Optional[int] = None) -> None:
    a = arrays[name]
    if a.dtype != dtype or a.shape != shape or (ndim is not None and a.ndim != ndim):
        raise StageError(f"{name} is {a.dtype} {a.shape}, expected {np.dtype(dtype)} {shape}")


class StagedRecords:
    """Random access to the staged Records (skips removed), for the format writers.

    Pickles cheaply (paths and the index only), so FFCV's writer processes can each open it.
    """

    def __init__(self, stage_dir: str, n_chunks: int, index: List[tuple]):
        """``index``: record i -> (chunk, position in chunk), from the caller that has just read
        every chunk itself (the builder's survey), so they are not read again here."""
        self.stage_dir = stage_dir
        self.n_chunks = n_chunks
        self.index: List[tuple] = index
        self._cached = (-1, None)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Record:
        c, j = self.index[i]
        if self._cached[0] != c:  # records are read in order, so one cached chunk suffices
            self._cached = (c, read_chunk(self.stage_dir, c))
        return self._cached[1][j]

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):
        return {"stage_dir": self.stage_dir, "n_chunks": self.n_chunks, "index": self.index}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cached = (-1, None)
