"""Fused Triton kernels of the device stage (installed as objloader.kernels).

``apply_device_ops_fused`` equals objloader.augment.reference.apply_device_ops (BG-Mixup eq. 4 ->
colour -> normalise) in a few fused passes; ``fused_available(device)`` says whether it can run
there and ``apply_device_ops_auto`` picks it or the reference. Triton is imported only when the
fused function is first asked for, so ``import objloader.kernels`` works without it.
"""

from .dispatch import apply_device_ops_auto, fused_available

__all__ = ["apply_device_ops_fused", "apply_device_ops_auto", "fused_available"]


def __getattr__(name):
    if name == "apply_device_ops_fused":
        from .device_ops import apply_device_ops_fused

        return apply_device_ops_fused
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
