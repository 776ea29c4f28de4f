"""The open-time integrity check of a built dataset, and the manifest and file headers it reads.

check_integrity(OUT, manifest, engine): the cheap check, before an engine starts, that the files
it reads are all there, whole, and agree with the manifest (sizes, record counts, the build's
identity), without reading the records themselves; ``objloader-build --verify`` is the full
check (checksums, every record). It parses the manifest, the .idx headers and sample lines, the
tars' pax global headers and data.beton's header; random access to the records (reader.py)
reads the same manifest and .idx lines through the parsers here.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..errors import DatasetError
from .schema import BETON_FILE, IDENTITY_PREFIX, INDEX_VERSION, MANIFEST_FILE, PAX_IDENTITY, TAR_BLOCK


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(mpath):
        hint = " (an interrupted build? rerun objloader-build)" if os.path.isdir(path.rstrip("/") + ".partial") else ""
        raise DatasetError(f"{path!r} is not a built objloader dataset: no {MANIFEST_FILE}{hint}")
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
            raise DatasetError(f"{os.path.join(path, MANIFEST_FILE)}: a collection manifest without its "
                               "'datasets'; rebuild the output")
        return [os.path.join(path, name) for name in datasets]
    return [path]


def _index_header(line: bytes) -> int:
    """The sample count of a DALI webdataset index's first line ("v1.2 N", then the build's
    identity as objloader-build writes it, which DALI ignores: it reads two words)."""
    parts = line.split()
    if (len(parts) not in (2, 3) or parts[0] != INDEX_VERSION.encode() or not parts[1].isdigit()
            or (len(parts) == 3 and not parts[2].startswith(IDENTITY_PREFIX.encode()))):
        raise DatasetError(f"not a {INDEX_VERSION} webdataset index (first line {line[:40]!r})")
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


def index_entry(line: bytes) -> dict:
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


def read_index_file(idx_path: str) -> Tuple[int, bytes]:
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


# Per-record lists of a dataset manifest; readers index each of them by record.
RECORD_LISTS = ("keys", "digests", "labels", "n_boxes")


def manifest_problems(manifest: dict) -> List[str]:
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


# The files each engine reads: torch and DALI the shards through their .idx, FFCV data.beton.
ENGINE_FORMATS = {"torch": "wds", "dali": "wds", "ffcv": "ffcv"}

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
        first = index_entry(lines[1])
        last = index_entry(tail.rstrip(b"\n").rsplit(b"\n", 1)[-1])
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
    rel = BETON_FILE
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
    (MANIFEST_FILE for the manifest itself): [one short sentence per problem]}; empty when
    all is well. ``engine=None`` checks the files of every format the manifest lists."""
    problems = collections.defaultdict(list)
    if manifest.get("kind") == "collection":
        return {MANIFEST_FILE: ["holds several datasets; check one of them"]}
    problems[MANIFEST_FILE] += manifest_problems(manifest)
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
            what = "WebDataset shards" if fmt == "wds" else BETON_FILE
            problems[MANIFEST_FILE].append(f"built without {what}, which the {engine} engine reads; "
                                           "rebuild with objloader-build --formats ffcv,wds")
            return dict(problems)
        formats = [fmt]
    sizes = manifest.get("sizes") if isinstance(manifest.get("sizes"), dict) else {}
    identity = manifest.get("dataset_id")
    identity = identity if isinstance(identity, str) else None  # missing: manifest_problems says so
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
