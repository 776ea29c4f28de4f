"""Fast implementations of the device stage (installed as objloader.kernels).

``select_device_ops(device)`` picks the implementation for a device (kernels/dispatch.py): the
fused Triton kernels on CUDA (device_ops.py), the fused numba kernel on the CPU (cpu_ops.py), the
torch reference of objloader.augment elsewhere. Triton is imported only when the fused function
is first asked for, so ``import objloader.kernels`` works without it.
"""

from .dispatch import fused_available, select_device_ops

__all__ = ["apply_device_ops_fused", "fused_available", "select_device_ops"]


def __getattr__(name):
    if name == "apply_device_ops_fused":
        from .device_ops import apply_device_ops_fused

        return apply_device_ops_fused
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
