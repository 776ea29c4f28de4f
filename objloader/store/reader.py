"""open_dataset(OUT): random access to built records as numpy, for tests, visualisation and
the torch engine. Reads the WebDataset shards through their .idx files (no tar scan); the
open-time integrity check, and the manifest and header parsers it shares, are in integrity.py.
"""
from __future__ import annotations

import bisect
import io
import json
import os
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from numba import njit

from ..errors import DatasetError
from .integrity import index_entry, manifest_problems, read_index_file, read_manifest
from .schema import MANIFEST_FILE, MEMBER, record_digest, wds_members


def read_index(idx_path: str) -> List[dict]:
    """Parse a DALI webdataset index: per sample, suffix -> (offset, size, member name)."""
    count, body = read_index_file(idx_path)
    samples = []
    for n, line in enumerate(body.split(b"\n"), start=2):
        if not line.strip():
            continue
        try:
            samples.append(index_entry(line))
        except ValueError as e:
            raise DatasetError(f"{idx_path}: line {n} cannot be parsed ({e}); the index is damaged") from None
    if len(samples) != count:
        raise DatasetError(f"{idx_path}: header says {count} samples, found {len(samples)}")
    return samples


# .npy header bytes -> (dtype, shape, data offset). Every record's boxes (and bg rect) share one
# header, and parsing it is most of np.load's cost (an ast.literal_eval per call: ~30 us).
_NPY_HEADERS: Dict[bytes, tuple] = {}


def decode_npy(data: bytes) -> np.ndarray:
    """A stored ``.npy`` member (boxes, bg rect) -> a fresh array (no pickles)."""
    if data[:6] == b"\x93NUMPY" and len(data) >= 10 and data[6] == 1:  # format 1.0: 2-byte header length
        end = 10 + int.from_bytes(data[8:10], "little")
        known = _NPY_HEADERS.get(data[:end])
        if known is not None:
            dtype, shape = known
            if len(data) - end == dtype.itemsize * int(np.prod(shape)):
                return np.frombuffer(data, dtype, offset=end).reshape(shape).copy()
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if data[:6] == b"\x93NUMPY" and data[6] == 1 and not array.dtype.hasobject and len(_NPY_HEADERS) < 64:
        end = 10 + int.from_bytes(data[8:10], "little")
        if array.flags.c_contiguous and not np.isfortran(array):
            _NPY_HEADERS[data[:end]] = (array.dtype, array.shape)
    return array


def decode_png(data: bytes) -> np.ndarray:
    """A stored lossless mask (``.mask.png``) -> uint8 [M, M]; raises when it does not decode."""
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DatasetError("stored mask does not decode")
    return mask


def decode_rgb(data: bytes) -> np.ndarray:
    """Stored JPEG bytes -> RGB uint8 [H, W, 3]; raises when they do not decode."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError("stored image does not decode")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic): they hold the
# image's size. 0xC4 (Huffman tables), 0xC8 (reserved) and 0xCC (arithmetic conditioning) do not.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_shape(data) -> Tuple[int, int]:
    """(height, width) of JPEG bytes from their frame header, without decoding (~5 us: the
    markers before the frame, usually a handful). Raises DatasetError when there is none."""
    view = memoryview(data)
    if bytes(view[:2]) != b"\xff\xd8":
        raise DatasetError("stored image is not a JPEG")
    at, end = 2, len(view)
    while at + 4 <= end:
        if view[at] != 0xFF:
            break
        marker = view[at + 1]
        if marker == 0xFF:  # fill byte before a marker
            at += 1
            continue
        length = (view[at + 2] << 8) | view[at + 3]
        if marker in _SOF_MARKERS:
            if at + 9 > end:
                break
            return (view[at + 5] << 8) | view[at + 6], (view[at + 7] << 8) | view[at + 8]
        if marker == 0xDA or length < 2:  # scan data before any frame header: not a valid JPEG
            break
        at += 2 + length
    raise DatasetError("stored image has no JPEG frame header (damaged)")


def _record_digits(records: np.ndarray) -> np.ndarray:
    """record_name's 9 ASCII digits of each record, as uint8 [n, 9] (records below 10^9)."""
    powers = 10 ** np.arange(8, -1, -1, dtype=np.int64)
    return ((records[:, None] // powers) % 10 + ord("0")).astype(np.uint8)


@njit(cache=True)
def _digits_then(body, pos, end_byte):
    """(value, position after end_byte) of the decimal number at body[pos:], or (-1, pos) when
    it is not 1-18 digits followed by end_byte."""
    value, start = 0, pos
    while pos < body.size and 48 <= body[pos] <= 57 and pos - start < 18:
        value = value * 10 + (body[pos] - 48)
        pos += 1
    if pos == start or pos >= body.size or body[pos] != end_byte:
        return -1, pos
    return value, pos + 1


@njit(cache=True)
def _scan_writer_index(body, count, first_record, offsets, sizes):
    """Parse an .idx body laid out exactly as the writer lays it out (one line a record,
    ``suffix offset size RECORD.suffix`` per member, single spaces, the members of the first line
    in the same order on every line, RECORD the line's own record number in 9 digits) into
    offsets and sizes [count, members]. True when the whole body is that layout; False at the
    first deviation, and the caller re-parses with the general path, which names the problem."""
    members = offsets.shape[1]
    suffix_start = np.empty(members, np.int64)
    suffix_len = np.empty(members, np.int64)
    pos = 0
    for i in range(count):
        record = first_record + i
        for j in range(members):
            last = j == members - 1
            start = pos  # the suffix
            while pos < body.size and body[pos] != 32 and body[pos] != 10:
                pos += 1
            if pos == start or pos >= body.size or body[pos] != 32:
                return False
            if i == 0:
                suffix_start[j], suffix_len[j] = start, pos - start
            elif pos - start != suffix_len[j]:
                return False
            else:
                for b in range(suffix_len[j]):
                    if body[start + b] != body[suffix_start[j] + b]:
                        return False
            offset, pos = _digits_then(body, pos + 1, 32)
            if offset < 0:
                return False
            size, pos = _digits_then(body, pos, 32)
            if size < 0:
                return False
            offsets[i, j], sizes[i, j] = offset, size
            if pos + 10 + suffix_len[j] >= body.size:  # the name and the byte after it
                return False
            divisor = 100_000_000
            for b in range(9):  # the record's own number
                if body[pos + b] != 48 + (record // divisor) % 10:
                    return False
                divisor //= 10
            if body[pos + 9] != 46:  # "."
                return False
            for b in range(suffix_len[j]):
                if body[pos + 10 + b] != body[suffix_start[j] + b]:
                    return False
            pos += 10 + suffix_len[j]
            if body[pos] != (10 if last else 32):
                return False
            pos += 1
    return pos == body.size


def index_arrays(idx_path: str, first_record: int) -> Tuple[Tuple[str, ...], np.ndarray, np.ndarray]:
    """A shard's .idx parsed at once into arrays: (member suffixes in file order, offsets
    int64 [n, members], sizes int64 [n, members]) for records first_record.. in order.

    read_index's dicts cost ~2 KB of Python objects a record and would be pickled to every
    loader worker; BuiltDataset keeps these as 8 bytes a record plus 8 a member. Every line must
    list the same members in the same order (the writer's layout) and name its own record
    (RECORD.suffix): a damaged or misaligned index raises DatasetError instead of pairing a
    record with another's bytes.

    The writer's exact layout is scanned in one compiled pass (~1 us a record: opening 1.28M
    records must not take a quarter of a minute); anything else, damaged or merely spaced
    differently, goes through the general numpy parse below, which accepts any whitespace and
    names what is wrong."""
    count, body = read_index_file(idx_path)
    first_line = body[:body.find(b"\n")] if b"\n" in body else body
    members = len(first_line.split()) // 4
    if count and members and first_record + count <= 10 ** 9:
        offsets, sizes = np.empty((count, members), np.int64), np.empty((count, members), np.int64)
        if _scan_writer_index(np.frombuffer(body, np.uint8), count, first_record, offsets, sizes):
            return tuple(x.decode() for x in first_line.split()[0::4]), offsets, sizes
    return _parse_index_arrays(idx_path, count, body, first_record)


def _parse_index_arrays(idx_path: str, count: int, body: bytes, first_record: int):
    """index_arrays' general path (any whitespace, blank lines skipped), with its messages."""
    lines = [line for line in body.split(b"\n") if line.strip()]  # blank lines are not samples
    if len(lines) != count:
        raise DatasetError(f"{idx_path}: header says {count} samples, found {len(lines)}")
    if count == 0:
        return (), np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64)
    members = len(lines[0].split()) // 4
    tokens = np.array(body.split())  # bytes tokens, 4 per member: suffix offset size name
    if members == 0 or tokens.size != count * members * 4:
        raise DatasetError(f"{idx_path}: lines list different numbers of members; the index is damaged")
    table = tokens.reshape(count, members, 4)
    suffixes = table[0, :, 0]
    if not (table[:, :, 0] == suffixes).all():
        raise DatasetError(f"{idx_path}: lines list different members; the index is damaged")
    try:
        offsets, sizes = table[:, :, 1].astype(np.int64), table[:, :, 2].astype(np.int64)
    except ValueError:
        raise DatasetError(f"{idx_path}: an offset or size is not a number; the index is damaged") from None
    if (offsets < 0).any() or (sizes < 0).any():
        raise DatasetError(f"{idx_path}: negative offset or size; the index is damaged")
    # Names as bytes: the record's 9 digits, then ".suffix", then the array's zero padding.
    names = table[:, :, 3]
    width = names.dtype.itemsize
    raw_names = np.ascontiguousarray(names).view(np.uint8).reshape(count, members, width)
    records = np.arange(first_record, first_record + count, dtype=np.int64)
    good = (raw_names[:, :, :9] == _record_digits(records)[:, None, :]).all(axis=(1, 2))
    for j, suffix in enumerate(suffixes):
        tail = np.zeros(width - 9, np.uint8)
        rest = b"." + bytes(suffix)
        tail[:len(rest)] = np.frombuffer(rest, np.uint8)[:width - 9]
        good &= len(rest) <= width - 9
        good &= (raw_names[:, j, 9:] == tail).all(axis=1)
    if not good.all():
        k = int(np.argmin(good))
        raise DatasetError(f"{idx_path}: line {k + 2} does not name record {first_record + k} "
                           f"({bytes(names[k, 0]).decode('utf-8', 'replace')!r}); the index is damaged")
    return tuple(bytes(x).decode() for x in suffixes), offsets, sizes


class _PackedStrings:
    """A long list of short strings as one UTF-8 blob and offsets (record keys): ~1/5 of a
    Python list's memory, and pickled to a loader worker as two buffers."""

    def __init__(self, strings: List[str]):
        encoded = [x.encode("utf-8") for x in strings]
        self._blob = b"".join(encoded)
        self._ends = np.cumsum(np.fromiter(map(len, encoded), np.int64, len(encoded)))

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return self._blob[start:int(self._ends[i])].decode("utf-8")


class BuiltDataset:
    """Records of one built dataset; `ds[i]` is a dict of numpy fields (see DESIGN.md).

    Per-record state is numpy arrays (offsets and sizes of every member, labels, box counts)
    and packed keys, so opening 10^5-10^6 records stays quick and a pickled copy (one per torch
    loader worker) is small; the manifest itself stays in the opening process."""

    def __init__(self, path: str, manifest: Optional[dict] = None):
        """``manifest``: PATH/manifest.json when the caller has already read it (it lists every
        record, so a large one is worth reading once)."""
        self.path = path
        self.manifest = manifest if manifest is not None else read_manifest(path)
        if self.manifest.get("kind") == "collection":
            names = ", ".join(self.manifest.get("datasets") or [])
            first = next(iter(self.manifest.get("datasets") or ["NAME"]))
            raise DatasetError(f"{path!r} holds several datasets ({names}); open one of them, "
                               f"e.g. {os.path.join(path, first)!r}")
        problems = manifest_problems(self.manifest)
        if problems:
            raise DatasetError(f"{os.path.join(path, MANIFEST_FILE)}: {'; '.join(problems)}; rebuild the dataset")
        if "wds" not in self.manifest["formats"]:
            raise DatasetError(f"{path!r} was built without WebDataset shards (--formats); "
                               "open_dataset reads the shards")
        records = self.manifest["records"]
        self.classes = self.manifest.get("classes", [])
        self.has_gt = self.manifest["has_gt"]
        self.labels = np.asarray(records["labels"], dtype=np.int64)
        self.n_boxes = np.asarray(records["n_boxes"], dtype=np.int64)
        self.keys = _PackedStrings(records["keys"])
        self._tars = [os.path.join(path, tar) for tar in self.manifest["shards"]]
        self._shard_records = {}  # shard as the manifest names it -> range of its records
        starts, offsets, sizes, self._members = [0], [], [], None
        for tar, tar_path in zip(self.manifest["shards"], self._tars):
            idx_path = tar_path[:-4] + ".idx"
            members, off, size = index_arrays(idx_path, starts[-1])
            if len(off) and self._members is None:
                self._members = members
            elif len(off) and members != self._members:
                raise DatasetError(f"{idx_path}: lists members {', '.join(members)}, the first shard "
                                   f"{', '.join(self._members)}; the dataset is damaged")
            offsets.append(off)
            sizes.append(size)
            self._shard_records[tar] = range(starts[-1], starts[-1] + len(off))
            starts.append(starts[-1] + len(off))
        self._members = self._members or ()
        m = len(self._members)
        offsets = np.concatenate([o for o in offsets if len(o)] or [np.zeros((0, m), np.int64)])
        sizes = np.concatenate([x for x in sizes if len(x)] or [np.zeros((0, m), np.int64)])
        # Where a record starts in its tar (int64), and its members from there (uint32; a
        # record's members are adjacent, each far below 4 GiB).
        self._start = offsets[:, 0].copy() if m else np.zeros(len(offsets), np.int64)
        relative = offsets - self._start[:, None]
        if len(offsets) and (relative.min() < 0 or max(relative.max(), sizes.max()) >= 2 ** 32):
            raise DatasetError(f"{path!r}: a record's members are not adjacent in its shard; rebuild the dataset")
        self._relative, self._sizes = relative.astype(np.uint32), sizes.astype(np.uint32)
        self._shard_bounds = starts  # records of shard s: starts[s]..starts[s + 1] (one int a shard)
        self._column = {suffix: j for j, suffix in enumerate(self._members)}
        if len(self._start) != len(self.keys):
            raise DatasetError(f"{path!r}: shards hold {len(self._start)} records, manifest says {len(self.keys)}")
        self._files = {}

    def __getstate__(self) -> dict:
        # A loader worker needs the arrays, not the manifest (every record's key and digest
        # again, as Python objects) nor this process's file descriptors.
        state = self.__dict__.copy()
        state["manifest"], state["_files"] = None, {}
        return state

    def __len__(self) -> int:
        return len(self._start)

    @property
    def members(self) -> Tuple[str, ...]:
        """The member suffixes every record has (jpg, cls, mask.png, ...)."""
        return self._members

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        fd = self._files.get(shard)
        if fd is None:
            fd = self._files[shard] = os.open(self._tars[shard], os.O_RDONLY)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise DatasetError(f"{self._tars[shard]}: ends before byte {offset + size}; the shard is truncated")
        return data

    def raw(self, i: int, members=None) -> dict:
        """suffix -> member bytes of record i (only the suffixes in ``members``, if given)."""
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range (dataset has {len(self)})")
        shard = bisect.bisect_right(self._shard_bounds, i) - 1
        wanted = self._members if members is None else [m for m in members if m in self._column]
        if not wanted:
            return {}
        # One read from the record's first wanted member to the end of its last (they are adjacent).
        relative, sizes = self._relative[i].tolist(), self._sizes[i].tolist()  # Python ints: ~1 us
        spans = [(m, relative[self._column[m]], sizes[self._column[m]]) for m in wanted]
        lo = min(r for _, r, _ in spans)
        hi = max(r + n for _, r, n in spans)
        data = self._read(shard, int(self._start[i]) + lo, hi - lo)
        return {m: data[r - lo:r - lo + n] for m, r, n in spans}

    def __getitem__(self, i: int) -> dict:
        raw = self.raw(i)
        meta = json.loads(raw[MEMBER.meta])
        rec = {
            "index": i,
            "key": meta["key"],
            "sha1": meta["sha1"],
            "jpeg": raw[MEMBER.image],
            "image": decode_rgb(raw[MEMBER.image]),
            "label": int(raw[MEMBER.label]),
            "mask": decode_png(raw[MEMBER.mask]),
            "boxes": decode_npy(raw[MEMBER.boxes]),
            "n_boxes": int(meta["n_boxes"]),
            "bg_rect": decode_npy(raw[MEMBER.bg_rect]),
        }
        if MEMBER.gt_mask in raw:
            rec.update(gt_mask=decode_png(raw[MEMBER.gt_mask]), gt_boxes=decode_npy(raw[MEMBER.gt_boxes]),
                       n_gt_boxes=int(meta["n_gt_boxes"]))
        return rec

    def shard_records(self, shard: str) -> range:
        """The records stored in ``shard`` (a path as the manifest's "shards" lists it)."""
        return self._shard_records[shard]

    def digest(self, i: int) -> str:
        """Record i's digest over its stored members, as the manifest's records.digests lists it
        (schema.record_digest; the JPEG is hashed as stored, not decoded). Raises DatasetError,
        ValueError or KeyError when a member is missing or no longer decodes."""
        raw = self.raw(i, wds_members(self.has_gt))
        meta = json.loads(raw[MEMBER.meta])
        gt = ((decode_png(raw[MEMBER.gt_mask]), decode_npy(raw[MEMBER.gt_boxes]), int(meta["n_gt_boxes"]))
              if self.has_gt else (None, None, 0))
        return record_digest(raw[MEMBER.image], int(raw[MEMBER.label]), decode_png(raw[MEMBER.mask]),
                             decode_npy(raw[MEMBER.boxes]), int(meta["n_boxes"]), decode_npy(raw[MEMBER.bg_rect]), *gt)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def open_dataset(path: str, split: Optional[str] = None) -> BuiltDataset:
    """Open a built dataset; for a collection (a built demo folder) name the split, e.g. 'train'."""
    return BuiltDataset(os.path.join(path, split) if split else path)
