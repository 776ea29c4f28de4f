"""WebDataset writer: shards/shard-NNNNN.tar plus the .idx files DALI's readers.webdataset uses.

Members per record: schema.WDS_MEMBERS (KEY.jpg, KEY.cls, KEY.mask.png, ..., DESIGN.md), KEY
the record's zero-padded index (schema.record_name).

Each tar starts with a pax global header (archive-wide metadata that tar readers apply, not a
member) holding the build's identity, and each .idx carries it after its sample count (DALI
reads the first two words of that line); the loaders compare both with the manifest at open.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Iterable, List

import cv2
import numpy as np

from ..errors import FileWriteError
from ..fileio import write_failure
from .schema import IDENTITY_PREFIX, INDEX_VERSION, PAX_IDENTITY, TAR_BLOCK, WDS_MEMBERS, Record, record_name


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def png_bytes(mask: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", mask)
    if not ok:
        raise RuntimeError("PNG encoding of a mask failed")
    return buf.tobytes()


def record_members(r: Record, with_gt: bool = True) -> List[tuple]:
    """(suffix, bytes) for each member of a record, in a fixed order."""
    members = [
        (WDS_MEMBERS["image"], r.image),
        (WDS_MEMBERS["label"], str(r.label).encode()),
        (WDS_MEMBERS["mask"], png_bytes(r.mask)),
        (WDS_MEMBERS["boxes"], npy_bytes(r.boxes)),
        (WDS_MEMBERS["bg_rect"], npy_bytes(r.bg_rect)),
        (WDS_MEMBERS["meta"], json.dumps(r.meta(), sort_keys=True).encode()),
    ]
    if with_gt and r.gt_mask is not None:
        members += [(WDS_MEMBERS["gt_mask"], png_bytes(r.gt_mask)),
                    (WDS_MEMBERS["gt_boxes"], npy_bytes(r.gt_boxes))]
    return members


def write_shard(tar_path: str, idx_path: str, records: Iterable[tuple], with_gt: bool, identity: str) -> int:
    """Write (index, Record) pairs to one tar and its DALI index ("v1.2 N objloader-id=ID", then
    per sample 'ext offset size name' for each member, offsets pointing at the member's data).
    A failed write raises FileWriteError naming the file."""
    lines = []
    try:
        with tarfile.open(tar_path, "w", format=tarfile.PAX_FORMAT, pax_headers={PAX_IDENTITY: identity}) as tar:
            for index, rec in records:
                name = record_name(index)
                parts = []
                for suffix, data in record_members(rec, with_gt):
                    info = tarfile.TarInfo(f"{name}.{suffix}")
                    info.size, info.mtime, info.mode = len(data), 0, 0o644  # mtime 0: reproducible bytes
                    tar.addfile(info, io.BytesIO(data))
                    # The data ends, padded to whole blocks, where the archive now stands.
                    data_offset = tar.offset - -(-len(data) // TAR_BLOCK) * TAR_BLOCK
                    parts.append(f"{suffix} {data_offset} {len(data)} {info.name}")
                lines.append(" ".join(parts))
    except OSError as e:
        raise FileWriteError(write_failure(tar_path, e)) from None
    try:
        with open(idx_path, "w") as f:
            f.write(f"{INDEX_VERSION} {len(lines)} {IDENTITY_PREFIX}{identity}\n")
            f.write("\n".join(lines) + "\n")
    except OSError as e:
        raise FileWriteError(write_failure(idx_path, e)) from None
    return len(lines)


def write_shards(shard_dir: str, records: Iterable[Record], shard_size: int, with_gt: bool,
                 progress=None, *, identity: str) -> List[str]:
    """Write all records into shards of shard_size; returns the tar file names (relative)."""
    os.makedirs(shard_dir, exist_ok=True)
    names, batch = [], []

    def flush():
        nonlocal batch
        name = f"shard-{len(names):05d}.tar"
        write_shard(os.path.join(shard_dir, name), os.path.join(shard_dir, name[:-4] + ".idx"), batch, with_gt, identity)
        names.append(name)
        if progress is not None:
            progress.update(len(batch))
        batch = []

    for i, rec in enumerate(records):
        batch.append((i, rec))
        if len(batch) == shard_size:
            flush()
    if batch:
        flush()
    return names
