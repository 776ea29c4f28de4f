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
]
