"""Object-aware augmentations: a parameter sampler (params) and the torch reference ops (reference).

Draw once with :func:`sample_params`, then apply with :func:`crop_views` (engine stage) and
:func:`apply_device_ops` (device stage); every fast engine is tested against these.
"""

from .params import COLOR_PRESETS, AugParams, ColorConfig, sample_params
from .reference import apply_device_ops, bg_mixup, crop_views, cut_bg_patch, normalize

__all__ = [
    "AugParams",
    "ColorConfig",
    "COLOR_PRESETS",
    "sample_params",
    "crop_views",
    "cut_bg_patch",
    "bg_mixup",
    "normalize",
    "apply_device_ops",
]
