"""JPEG decode callable from numba (libjpeg-turbo through ctypes), for the FFCV engine.

ffcv's own decoder trades accuracy for speed (its pixels differ from libjpeg's accurate decode
by up to 5 levels), while OpenCV, PIL and DALI's CPU decoder agree bit for bit. Decoding with
libjpeg-turbo's default (accurate) settings keeps every engine's pixels identical.
libturbojpeg is the library ffcv itself links against, so it is present wherever ffcv runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util

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
    return init, decompress, destroy


_tj_init, _tj_decompress, _tj_destroy = _load()


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
