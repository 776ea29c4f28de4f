"""Choosing between the fused kernels and the torch reference for the device stage.

The loaders call :func:`apply_device_ops_auto` (or test :func:`fused_available` themselves): the
fused Triton kernels run on CUDA devices with a working Triton driver, the torch reference of
objloader.augment everywhere else, with the same result. Importing this module does not import
Triton.
"""

from __future__ import annotations

import functools
import importlib

import torch

from objloader.augment.reference import apply_device_ops

__all__ = ["fused_available", "apply_device_ops_auto"]


def _fused_module():
    """objloader.kernels.device_ops, or None when Triton (or its kernels) cannot be imported."""
    try:
        return importlib.import_module(f"{__package__}.device_ops")
    except ImportError:
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
    """True when :func:`apply_device_ops_fused` can run on ``device``'s tensors: a CUDA device with
    a working Triton driver, or any device when the kernels were built by Triton's interpreter
    (TRITON_INTERPRET=1 when they were imported; for tests, slow)."""
    mod = _fused_module()
    if mod is None:
        return False
    if mod.INTERPRETED:
        return True
    return torch.device(device).type == "cuda" and _cuda_driver_ok()


def apply_device_ops_auto(views_uint8, masks, patches, params, *, hard=False, dtype=torch.float32,
                          normalise=True):
    """objloader.augment.reference.apply_device_ops, fused where :func:`fused_available`."""
    if fused_available(views_uint8.device):
        fn = _fused_module().apply_device_ops_fused
    else:
        fn = apply_device_ops
    return fn(views_uint8, masks, patches, params, hard=hard, dtype=dtype, normalise=normalise)
