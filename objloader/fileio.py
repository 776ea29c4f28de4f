"""File I/O shared by the stages: hashing (the builder's manifest checksums, ContraCAM's
checkpoint identity) and atomic writes (manifests, build state, staged chunks, mask stores,
trainer checkpoints); imports nothing of objloader but its errors."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from typing import Callable

from .errors import FileWriteError

__all__ = ["FileWriteError", "file_sha256", "write_atomic", "write_failure", "write_json_atomic"]


def write_failure(path: str, e: OSError) -> str:
    """One line for a failed write of ``path``: a full disk says so in those words (ENOSPC), and
    what to do; anything else gives the system's reason."""
    if getattr(e, "errno", None) == errno.ENOSPC:
        return f"cannot write {path}: no space left on device; free some space and rerun"
    return f"cannot write {path}: {getattr(e, 'strerror', None) or e}"


def file_sha256(path: str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str, write: Callable, mode: str = "wb") -> None:
    """``write(f)`` into a file beside ``path``, flushed to disk and renamed into place, so a
    reader sees the old file or the new one, never half. A write that fails (a full disk shows
    at write, flush, fsync or close) removes the partial file and raises FileWriteError naming
    ``path``; whatever was at ``path`` before is left untouched."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise FileWriteError(write_failure(path, e)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json_atomic(path: str, obj) -> None:
    """``obj`` as JSON at ``path``, written atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda f: json.dump(obj, f, indent=1), mode="w")
