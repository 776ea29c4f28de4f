"""Which implementation of the device stage runs on a device: the one place that decides.

- CUDA with a working Triton driver: the fused Triton kernels (kernels/device_ops.py);
- CPU: the fused numba kernel (kernels/cpu_ops.py), ~2x the torch ops on 2 cores;
- anything else (CUDA without Triton, MPS, ...): the torch reference of objloader.augment.
All three compute the same function (tests/test_kernels.py, tests/test_cpu_ops.py), so the choice
changes speed only. Importing this module imports neither Triton nor numba.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import Callable, Tuple

import torch

from objloader.augment.reference import apply_device_ops

__all__ = ["fused_available", "select_device_ops"]


def _fused_module():
    """objloader.kernels.device_ops, or None when Triton (or its kernels) cannot be imported."""
    try:
        return importlib.import_module(f"{__package__}.device_ops")
    except ImportError as e:
        warnings.warn(f"fused Triton kernels unavailable ({e}); the torch reference runs on CUDA devices")
        return None


@functools.lru_cache(maxsize=None)
def _cuda_driver_ok() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        from triton.runtime import driver

        return driver.active.get_current_target().backend == "cuda"
    except Exception:  # no driver, a broken install, an unsupported GPU
        return False


def fused_available(device) -> bool:
    """True when the fused Triton kernels can run on ``device``'s tensors: a CUDA device with a
    working Triton driver."""
    return torch.device(device).type == "cuda" and _cuda_driver_ok() and _fused_module() is not None


def select_device_ops(device) -> Tuple[Callable, str]:
    """(the device-stage function for tensors on ``device``, its name: "triton", "numba" or
    "torch reference"). Every function has the signature of
    objloader.augment.reference.apply_device_ops."""
    kind = torch.device(device).type
    if kind == "cuda" and fused_available(device):
        return _fused_module().apply_device_ops_fused, "triton"
    if kind == "cpu":
        from .cpu_ops import apply_device_ops_cpu

        return apply_device_ops_cpu, "numba"
    return apply_device_ops, "torch reference"
