"""open_dataset(OUT): random access to built records as numpy, for tests, visualisation and
the torch engine. Reads the WebDataset shards through their .idx files (no tar scan).

check_integrity(OUT, manifest, engine): the cheap open-time check that the files an engine reads
are all there, whole, and agree with the manifest (sizes, record counts), without reading the
records themselves; ``objloader-build --verify`` is the full check (checksums, every record).
"""
from __future__ import annotations

import bisect
import collections
import io
import json
import os
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from numba import njit

from .schema import IDENTITY_PREFIX, record_digest
from .wds_writer import PAX_IDENTITY, TAR_BLOCK
from ..errors import ObjloaderError

class DatasetError(ObjloaderError, ValueError):
    """A path that is not a built dataset, or a dataset that fails its own checks."""


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        hint = " (an interrupted build? rerun objloader-build)" if os.path.isdir(path.rstrip("/") + ".partial") else ""
        raise DatasetError(f"{path!r} is not a built objloader dataset: no manifest.json{hint}")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{mpath} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                           "it is damaged or cut short: rebuild the dataset") from None
    except ValueError as e:  # bytes that are not UTF-8
        raise DatasetError(f"{mpath} is not a JSON text ({e}); it is damaged: rebuild the dataset") from None
    except OSError as e:
        raise DatasetError(f"{mpath} cannot be read: {e.strerror or e}") from None
    if not isinstance(manifest, dict):
        raise DatasetError(f"{mpath} holds a JSON {type(manifest).__name__}, not an objloader manifest "
                           "(an object); rebuild the dataset")
    return manifest


def dataset_dirs(path: str) -> List[str]:
    """The dataset directories under a build output: itself, or each dataset of a collection."""
    m = read_manifest(path)
    if m.get("kind") == "collection":
        datasets = m.get("datasets")
        if not isinstance(datasets, (dict, list)):
            raise DatasetError(f"{os.path.join(path, 'manifest.json')}: a collection manifest without its "
                               "'datasets'; rebuild the output")
        return [os.path.join(path, name) for name in datasets]
    return [path]


def _index_header(line: bytes) -> int:
    """The sample count of a DALI webdataset index's first line ("v1.2 N", then the build's
    identity as objloader-build writes it, which DALI ignores: it reads two words)."""
    parts = line.split()
    if (len(parts) not in (2, 3) or parts[0] != b"v1.2" or not parts[1].isdigit()
            or (len(parts) == 3 and not parts[2].startswith(IDENTITY_PREFIX.encode()))):
        raise DatasetError(f"not a v1.2 webdataset index (first line {line[:40]!r})")
    return int(parts[1])


def _index_identity(line: bytes) -> Optional[str]:
    """The build identity on an index's first line, or None when it carries none."""
    parts = line.split()
    return parts[2][len(IDENTITY_PREFIX):].decode("ascii", "replace") if len(parts) == 3 else None


def _tar_identity(tar_path: str) -> Optional[str]:
    """The build identity in a tar's leading pax global header (the first blocks of the file),
    or None when it has none. Reads one header block and its (one-block) records."""
    with open(tar_path, "rb") as f:
        head = f.read(2 * TAR_BLOCK)
    if len(head) < TAR_BLOCK or head[156:157] != b"g":  # typeflag 'g': a pax global header
        return None
    try:
        size = int(head[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    records = head[TAR_BLOCK:TAR_BLOCK + min(size, TAR_BLOCK)].decode("utf-8", "replace")
    for record in records.split("\n"):  # "LENGTH keyword=value"
        keyword, _, value = record.partition(" ")[2].partition("=")
        if keyword == PAX_IDENTITY:
            return value
    return None


def beton_identity(descs: np.ndarray, n_fields: int) -> Optional[str]:
    """The build identity in data.beton's key field descriptor arguments (the writer's
    ffcv_writer.identity_arguments), or None when there is none; ``descs``: the descriptors'
    bytes, as FFCV_FIELD_DESC."""
    for desc in descs.view(FFCV_FIELD_DESC)[:n_fields]:
        if bytes(desc["name"]).rstrip(b"\0") == b"key":
            args = bytes(desc["arguments"]).rstrip(b"\0").decode("ascii", "replace")
            return args[len(IDENTITY_PREFIX):] if args.startswith(IDENTITY_PREFIX) else None
    return None


def _identity_problem(found: Optional[str], want: str) -> List[str]:
    if found == want:
        return []
    what = "carries no build identity" if found is None else f"belongs to another build (identity {found})"
    return [f"{what}, not this dataset's ({want}): copied from another dataset? copy the dataset whole, or rebuild it"]


def _index_entry(line: bytes) -> dict:
    """One sample line of an index: 'suffix offset size name' per member -> suffix -> (offset, size, name)."""
    parts = line.decode("utf-8", "replace").split()
    if not parts or len(parts) % 4:
        raise ValueError("not 'suffix offset size name' groups")
    entry = {}
    for j in range(0, len(parts), 4):
        offset, size = int(parts[j + 1]), int(parts[j + 2])
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        entry[parts[j]] = (offset, size, parts[j + 3])
    return entry


def _entry_record(entry: dict) -> int:
    """The record index an index entry belongs to: its members are named RECORD.suffix."""
    names = {name.split(".", 1)[0] for _, _, name in entry.values()}
    if len(names) != 1:
        raise ValueError(f"members of several records in one entry ({', '.join(sorted(names))})")
    return int(names.pop())


def _read_index_file(idx_path: str) -> Tuple[int, bytes]:
    """(sample count of its header, the sample lines) of an .idx; DatasetError when it is
    missing, unreadable or has no v1.2 header."""
    try:
        with open(idx_path, "rb") as f:
            head, _, body = f.read().partition(b"\n")
    except FileNotFoundError:
        raise DatasetError(f"{idx_path} is missing; rebuild the dataset") from None
    except OSError as e:
        raise DatasetError(f"{idx_path} cannot be read: {e.strerror or e}") from None
    try:
        return _index_header(head), body
    except DatasetError as e:
        raise DatasetError(f"{idx_path}: {e}") from None


def read_index(idx_path: str) -> List[dict]:
    """Parse a DALI webdataset index: per sample, suffix -> (offset, size, member name)."""
    count, body = _read_index_file(idx_path)
    samples = []
    for n, line in enumerate(body.split(b"\n"), start=2):
        if not line.strip():
            continue
        try:
            samples.append(_index_entry(line))
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


# Per-record lists of a dataset manifest; readers index each of them by record.
RECORD_LISTS = ("keys", "digests", "labels", "n_boxes")


def _manifest_problems(manifest: dict) -> List[str]:
    """What makes a dataset manifest unusable: an entry the readers need that is missing, or
    per-record lists that disagree with counts.records (a reader would pair record i with another
    record's label or box count)."""
    problems = []
    for key, kind in (("formats", list), ("has_gt", bool), ("shards", list), ("counts", dict), ("records", dict)):
        if not isinstance(manifest.get(key), kind):
            problems.append(f"{key!r} is missing or not a {kind.__name__}")
    if not isinstance(manifest.get("dataset_id"), str):
        # Without it a data file of another build would be read unnoticed (built before identities).
        problems.append("'dataset_id' is missing or not a text (built by an older objloader-build)")
    if problems:
        return problems
    n = manifest["counts"].get("records")
    if not isinstance(n, int):
        return ["counts.records is missing or not an integer"]
    wrong = []
    for name in RECORD_LISTS:
        values = manifest["records"].get(name)
        if not isinstance(values, list):
            problems.append(f"records.{name} is missing or not a list")
        elif len(values) != n:
            wrong.append(f"records.{name} lists {len(values)}")
    if wrong:
        problems.append(f"counts.records says {n} records but {', '.join(wrong)}")
    return problems


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
    count, body = _read_index_file(idx_path)
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
        problems = _manifest_problems(self.manifest)
        if problems:
            raise DatasetError(f"{os.path.join(path, 'manifest.json')}: {'; '.join(problems)}; rebuild the dataset")
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
        meta = json.loads(raw["json"])
        rec = {
            "index": i,
            "key": meta["key"],
            "sha1": meta["sha1"],
            "jpeg": raw["jpg"],
            "image": decode_rgb(raw["jpg"]),
            "label": int(raw["cls"]),
            "mask": decode_png(raw["mask.png"]),
            "boxes": decode_npy(raw["boxes.npy"]),
            "n_boxes": int(meta["n_boxes"]),
            "bg_rect": decode_npy(raw["bg.npy"]),
        }
        if "gt_mask.png" in raw:
            rec.update(gt_mask=decode_png(raw["gt_mask.png"]), gt_boxes=decode_npy(raw["gt_boxes.npy"]),
                       n_gt_boxes=int(meta["n_gt_boxes"]))
        return rec

    def shard_records(self, shard: str) -> range:
        """The records stored in ``shard`` (a path as the manifest's "shards" lists it)."""
        return self._shard_records[shard]

    def digest(self, i: int) -> str:
        """Record i's digest over its stored members, as the manifest's records.digests lists it
        (schema.record_digest; the JPEG is hashed as stored, not decoded). Raises DatasetError,
        ValueError or KeyError when a member is missing or no longer decodes."""
        members = ["jpg", "cls", "mask.png", "boxes.npy", "bg.npy", "json"]
        if self.has_gt:
            members += ["gt_mask.png", "gt_boxes.npy"]
        raw = self.raw(i, members)
        meta = json.loads(raw["json"])
        gt = ((decode_png(raw["gt_mask.png"]), decode_npy(raw["gt_boxes.npy"]), int(meta["n_gt_boxes"]))
              if self.has_gt else (None, None, 0))
        return record_digest(raw["jpg"], int(raw["cls"]), decode_png(raw["mask.png"]), decode_npy(raw["boxes.npy"]),
                             int(meta["n_boxes"]), decode_npy(raw["bg.npy"]), *gt)

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


# --- open-time integrity check -------------------------------------------------------------

# The files each engine reads: torch and DALI the shards through their .idx, FFCV data.beton.
ENGINE_FORMATS = {"torch": "wds", "dali": "wds", "ffcv": "ffcv"}
MANIFEST_FILE = "manifest.json"

# FFCV's on-disk layout (ffcv/types.py: HeaderType, FieldDescType, ALLOC_TABLE_TYPE), repeated
# here so that the check reads a header without importing ffcv (~5 s). A .beton is: header,
# one descriptor per field, per-record metadata, data pages, and last the allocation table
# (one entry per value stored outside the metadata: images, arrays, JSON), which ends the file.
FFCV_VERSION = 2
FFCV_HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"),
                        ("num_samples", "<u8"), ("alloc_table_ptr", "<u8")], align=True)
FFCV_FIELD_DESC = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
FFCV_ALLOC_ENTRY = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
# Field types that store one allocation per record (RGBImage, Bytes, NDArray, JSON, TorchTensor);
# Float (0) and Int (1) live in the metadata; 255 (a custom field) cannot be counted.
FFCV_ALLOCATING_TYPES = (2, 3, 4, 5, 6)
FFCV_CUSTOM_TYPE = 255

# How much of each end of an .idx the check reads: a sample line is a few hundred bytes.
_INDEX_PEEK = 1 << 16


def stat_problems(path: str, rel: str, sizes: dict) -> Tuple[Optional[int], List[str]]:
    """(size of PATH/rel or None when absent, what is wrong with its presence or size);
    ``sizes`` is the manifest's {relative path: bytes}, empty for a manifest without them."""
    want = sizes.get(rel)
    try:
        size = os.stat(os.path.join(path, rel)).st_size
    except FileNotFoundError:
        return None, ["missing" + (f" (expected {want} bytes)" if want is not None else "")]
    except OSError as e:
        return None, [f"cannot be read: {e.strerror or e}"]
    if want is not None and size != want:
        return size, [f"{size} bytes, expected {want}" + (" (truncated)" if size < want else "")]
    return size, []


def _index_ends(idx_path: str) -> Tuple[int, Optional[Tuple[int, int]], Optional[dict], Optional[str]]:
    """(sample count of the header, (first record, last record) listed, last entry, build
    identity of the header) of an .idx, reading only its ends; raises DatasetError saying what
    is wrong with it.

    The writer lists records in order and each record's members in file order, so the first
    and last entries give the shard's record range and how far into its tar the data reaches."""
    try:
        with open(idx_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(_INDEX_PEEK)
            if size > _INDEX_PEEK:
                f.seek(size - _INDEX_PEEK)
                tail = f.read()
            else:
                tail = head
    except OSError as e:
        raise DatasetError(f"cannot be read: {e.strerror or e}") from None
    lines = head.split(b"\n", 2)
    count, identity = _index_header(lines[0]), _index_identity(lines[0])
    if not tail.endswith(b"\n"):
        raise DatasetError("ends in the middle of a line (truncated)")
    if count == 0:
        return 0, None, None, identity
    if len(lines) < 3 or not lines[1].strip():
        raise DatasetError(f"header says {count} samples, the file lists none (truncated)")
    try:
        first = _index_entry(lines[1])
        last = _index_entry(tail.rstrip(b"\n").rsplit(b"\n", 1)[-1])
        return count, (_entry_record(first), _entry_record(last)), last, identity
    except ValueError as e:
        raise DatasetError(f"a sample line cannot be parsed ({e}); the index is damaged") from None


def _check_shards(path: str, manifest: dict, n: Optional[int], sizes: dict, identity: Optional[str],
                  problems) -> None:
    """Every shard and .idx is there, has its recorded size, carries this build's identity, and
    the .idx files cover records 0 .. n-1 in order within their tars; reads 2 x 64 KiB per .idx
    and 1 KiB per tar at most, no record data."""
    total, expect_first = 0, 0  # None once a shard's records are unknown (its .idx unreadable)
    for tar in manifest["shards"]:
        idx = tar[:-4] + ".idx"
        tar_size, facts = stat_problems(path, tar, sizes)
        problems[tar] += facts
        if tar_size is not None and tar_size % TAR_BLOCK:
            problems[tar].append(f"{tar_size} bytes is not a whole number of {TAR_BLOCK}-byte tar blocks (truncated)")
        if tar_size is not None and identity is not None:
            try:
                problems[tar] += _identity_problem(_tar_identity(os.path.join(path, tar)), identity)
            except OSError as e:
                problems[tar].append(f"cannot be read: {e.strerror or e}")
        idx_size, facts = stat_problems(path, idx, sizes)
        problems[idx] += facts
        if idx_size is not None:
            try:
                count, span, last, idx_identity = _index_ends(os.path.join(path, idx))
            except DatasetError as e:
                problems[idx].append(str(e))
                idx_size = None
            else:
                if identity is not None:
                    problems[idx] += _identity_problem(idx_identity, identity)
        if idx_size is None:  # where this shard's records end, and so the next one's begin, is unknown
            total = expect_first = None
            continue
        if span is not None:
            if span[1] - span[0] + 1 != count or (expect_first is not None and span[0] != expect_first):
                want = f"{expect_first}..{expect_first + count - 1}" if expect_first is not None else f"{count} records"
                problems[idx].append(f"lists records {span[0]}..{span[1]} under a header of {count}, expected {want}")
            member, (offset, size, _) = max(last.items(), key=lambda kv: kv[1][0] + kv[1][1])
            if tar_size is not None and offset + size > tar_size:
                problems[tar].append(f"truncated: record {span[1]}'s {member} member ends at byte {offset + size}, "
                                     f"past the end of the tar ({tar_size} bytes)")
        if total is not None:
            total += count
            expect_first = total
    if total is not None and n is not None and total != n:
        problems[MANIFEST_FILE].append(f"counts.records says {n} records, the shards' .idx files hold {total}")


def _check_beton(path: str, n: Optional[int], sizes: dict, identity: Optional[str], problems) -> None:
    """data.beton is there, has its recorded size, carries this build's identity, its header
    counts n records, and its allocation table is whole; reads the header and field descriptors
    (about 1 KiB per field)."""
    rel = "data.beton"
    size, facts = stat_problems(path, rel, sizes)
    problems[rel] += facts
    if size is None:
        return
    with open(os.path.join(path, rel), "rb") as f:
        raw = f.read(FFCV_HEADER.itemsize)
        if len(raw) < FFCV_HEADER.itemsize:
            problems[rel].append(f"{size} bytes, shorter than an FFCV header (truncated)")
            return
        header = np.frombuffer(raw, FFCV_HEADER)[0]
        if header["version"] != FFCV_VERSION:
            problems[rel].append(f"FFCV format version {header['version']}, expected {FFCV_VERSION} (damaged header)")
            return
        n_fields = int(header["num_fields"])
        descs = np.frombuffer(f.read(n_fields * FFCV_FIELD_DESC.itemsize), np.uint8)
    records = int(header["num_samples"])
    if n is not None and records != n:
        problems[rel].append(f"header says {records} records, the manifest {n}")
    descs_end = FFCV_HEADER.itemsize + n_fields * FFCV_FIELD_DESC.itemsize
    if descs.size < n_fields * FFCV_FIELD_DESC.itemsize:
        problems[rel].append(f"{size} bytes end inside the field descriptors (truncated)")
        return
    if identity is not None:
        problems[rel] += _identity_problem(beton_identity(descs, n_fields), identity)
    table = int(header["alloc_table_ptr"])
    if table < descs_end:
        problems[rel].append(f"header points the allocation table at byte {table}, inside the header "
                             "(damaged, or its writer was interrupted)")
        return
    if table > size:
        problems[rel].append(f"truncated: the allocation table starts at byte {table}, past the end of the file "
                             f"({size} bytes)")
        return
    table_bytes = size - table
    if table_bytes % FFCV_ALLOC_ENTRY.itemsize:
        problems[rel].append(f"truncated: the allocation table ({table_bytes} bytes) ends mid-entry")
        return
    type_ids = descs.view(FFCV_FIELD_DESC)["type_id"]
    if FFCV_CUSTOM_TYPE not in type_ids:
        per_record = int(np.isin(type_ids, FFCV_ALLOCATING_TYPES).sum())
        entries, want = table_bytes // FFCV_ALLOC_ENTRY.itemsize, records * per_record
        if entries != want:
            problems[rel].append(f"the allocation table holds {entries} entries, expected {want} ({records} records "
                                 f"x {per_record} stored fields): truncated or damaged")


def integrity_problems(path: str, manifest: dict, engine: Optional[str] = None) -> Dict[str, List[str]]:
    """What :func:`check_integrity` finds wrong, by file: {path relative to the dataset
    ("manifest.json" for the manifest itself): [one short sentence per problem]}; empty when
    all is well. ``engine=None`` checks the files of every format the manifest lists."""
    problems = collections.defaultdict(list)
    if manifest.get("kind") == "collection":
        return {MANIFEST_FILE: ["holds several datasets; check one of them"]}
    problems[MANIFEST_FILE] += _manifest_problems(manifest)
    if not isinstance(manifest.get("formats"), list):
        return dict(problems)  # which files to look at is unknown
    counts = manifest.get("counts")
    n = counts.get("records") if isinstance(counts, dict) else None
    n = n if isinstance(n, int) else None
    formats = [f for f in ("ffcv", "wds") if f in manifest["formats"]]
    if not formats:
        problems[MANIFEST_FILE].append(f"lists no data files (formats {manifest['formats']}): nothing to read; "
                                       "rebuild with objloader-build --formats ffcv,wds")
        return dict(problems)
    if engine is not None:
        fmt = ENGINE_FORMATS[engine]
        if fmt not in formats:
            what = "WebDataset shards" if fmt == "wds" else "data.beton"
            problems[MANIFEST_FILE].append(f"built without {what}, which the {engine} engine reads; "
                                           "rebuild with objloader-build --formats ffcv,wds")
            return dict(problems)
        formats = [fmt]
    sizes = manifest.get("sizes") if isinstance(manifest.get("sizes"), dict) else {}
    identity = manifest.get("dataset_id")
    identity = identity if isinstance(identity, str) else None  # missing: _manifest_problems says so
    if "wds" in formats and isinstance(manifest.get("shards"), list):
        _check_shards(path, manifest, n, sizes, identity, problems)
    if "ffcv" in formats:
        _check_beton(path, n, sizes, identity, problems)
    return {rel: facts for rel, facts in problems.items() if facts}


def describe_problems(path: str, problems: Dict[str, List[str]]) -> List[str]:
    """One line per damaged file: 'PATH/FILE: problem; problem'."""
    return [f"{os.path.join(path, rel)}: {'; '.join(facts)}" for rel, facts in problems.items()]


def check_integrity(path: str, manifest: Optional[dict], engine: str) -> None:
    """Refuse a dataset whose files the ``engine`` ("torch", "ffcv", "dali") reads are damaged.

    Raises DatasetError naming each damaged file when: a file the engine reads is missing; its
    size differs from manifest["sizes"] (when the manifest records sizes); the manifest's
    per-record lists disagree with counts.records; the shards' .idx files (torch, DALI) do not
    hold exactly records 0 .. n-1 in order, end mid-line, or point past the end of their tar;
    or data.beton's header (FFCV) counts another number of records or its allocation table is
    cut short. It reads the ends of each .idx and the beton's header, never record data:
    milliseconds. The checksums of every byte are ``objloader-build --verify``'s job.
    ``manifest``: PATH/manifest.json when the caller has read it, else None.
    """
    if engine not in ENGINE_FORMATS:
        raise DatasetError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINE_FORMATS)}")
    if manifest is None:
        manifest = read_manifest(path)
    problems = integrity_problems(path, manifest, engine)
    if problems:
        lines = describe_problems(path, problems)
        advice = f"rebuild it; objloader-build --verify {path} checks every byte"
        if len(lines) == 1:
            raise DatasetError(f"damaged dataset, the {engine} engine will not read it: {lines[0]} ({advice})")
        raise DatasetError(f"damaged dataset {path}, the {engine} engine will not read it ({advice}):\n"
                           + "\n".join("  " + line for line in lines))
