"""JPEG decode callable from numba (libjpeg-turbo through ctypes), for the FFCV and torch engines.

ffcv's own decoder trades accuracy for speed (its pixels differ from libjpeg's accurate decode
by up to 5 levels), while OpenCV, PIL and DALI's CPU decoder agree bit for bit. Decoding with
libjpeg-turbo's default (accurate) settings keeps every engine's pixels identical.
libturbojpeg is the library ffcv itself links against, so it is present wherever ffcv runs. It
is also ~25 % faster than OpenCV's imdecode on the same bytes (0.72 against 0.95 ms for a
420-px photo), with the same pixels.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
from numba import njit

_TJPF_RGB = 0  # interleaved RGB output
_ACCURATE = 0  # no TJFLAG_FASTDCT / TJFLAG_FASTUPSAMPLE


def _load():
    name = ctypes.util.find_library("turbojpeg") or "libturbojpeg.so.0"
    try:
        lib = ctypes.CDLL(name)
    except OSError as e:
        raise ImportError(f"libturbojpeg not found ({e}); install libturbojpeg0-dev (apt) as the Makefile does")
    # Pointers travel as integers (array.ctypes.data), which numba passes straight through.
    init = lib.tjInitDecompress
    init.argtypes, init.restype = [], ctypes.c_size_t
    decompress = lib.tjDecompress2
    decompress.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_ulong, ctypes.c_size_t,
                           ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    decompress.restype = ctypes.c_int
    destroy = lib.tjDestroy
    destroy.argtypes, destroy.restype = [ctypes.c_size_t], ctypes.c_int
    header = lib.tjDecompressHeader3
    header.argtypes = [ctypes.c_size_t, ctypes.c_size_t, ctypes.c_ulong] + [ctypes.c_size_t] * 4
    header.restype = ctypes.c_int
    return init, decompress, destroy, header


_tj_init, _tj_decompress, _tj_destroy, _tj_header = _load()


@njit(nogil=True)
def decode_rgb_into(jpeg, out) -> int:
    """Decode JPEG bytes ``jpeg`` (uint8 [n]) into ``out`` uint8 [H, W, 3] (C-contiguous, H and W
    the image's size). Returns 0 on success, non-zero when libjpeg-turbo refuses the data."""
    handle = _tj_init()
    if handle == 0:
        return -1
    height, width = out.shape[0], out.shape[1]
    status = _tj_decompress(handle, jpeg.ctypes.data, jpeg.shape[0], out.ctypes.data, width, width * 3, height,
                            _TJPF_RGB, _ACCURATE)
    _tj_destroy(handle)
    return status


@njit(nogil=True)
def jpeg_size(jpeg, size) -> int:
    """Width and height of JPEG bytes ``jpeg`` (uint8 [n]) -> ``size`` int32 [4] (width, height,
    and libjpeg-turbo's subsampling and colourspace codes), reading only the header. Returns 0
    on success, non-zero when the bytes are not a JPEG libjpeg-turbo reads."""
    handle = _tj_init()
    if handle == 0:
        return -1
    at = size.ctypes.data
    status = _tj_header(handle, jpeg.ctypes.data, jpeg.shape[0], at, at + 4, at + 8, at + 12)
    _tj_destroy(handle)
    return status


def decode_rgb(jpeg: bytes):
    """JPEG bytes -> a fresh RGB uint8 [H, W, 3], or None when libjpeg-turbo refuses them."""
    data = np.frombuffer(jpeg, np.uint8)
    size = np.zeros(4, np.int32)
    if data.size == 0 or jpeg_size(data, size) != 0 or size[0] <= 0 or size[1] <= 0:
        return None
    out = np.empty((size[1], size[0], 3), np.uint8)
    return out if decode_rgb_into(data, out) == 0 else None
