"""File I/O shared by the stages: hashing (the builder's manifest checksums, ContraCAM's
checkpoint identity) and atomic JSON writes (manifests, build state, mask stores); imports
nothing of objloader."""
from __future__ import annotations

import hashlib
import json
import os

__all__ = ["file_sha256", "write_json_atomic"]


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, written beside it and renamed into place, so a reader never
    sees half a file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
