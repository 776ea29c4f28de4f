"""ContraCAM, CRF refinement, mask -> boxes / background rectangle, localisation metrics."""

from objloader.cam.geometry import (
    BG_RECT_METHODS,
    bg_rect,
    box_iou,
    largest_empty_rect,
    mask_to_boxes,
    pad_boxes,
    strip_bg_rect,
)

__all__ = [
    "BG_RECT_METHODS",
    "bg_rect",
    "box_iou",
    "largest_empty_rect",
    "mask_to_boxes",
    "pad_boxes",
    "strip_bg_rect",
    "ContraCAM",
    "CamSettings",
    "resnet_trunk",
    "CRFConfig",
    "crf_refine",
    "crf_refine_batch",
]

_LAZY = {"ContraCAM": "contracam", "CamSettings": "settings", "resnet_trunk": "contracam",
         "CRFConfig": "crf", "crf_refine": "crf", "crf_refine_batch": "crf"}


def __getattr__(name):
    # ContraCAM needs torch; objloader-build imports this package for the geometry only.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"objloader.cam.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
