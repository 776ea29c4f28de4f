"""File hashing shared by the stages (the builder's manifest checksums, ContraCAM's checkpoint
identity); imports nothing of objloader."""
from __future__ import annotations

import hashlib

__all__ = ["file_sha256"]


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
