"""The record a source yields, before any mask is computed or any format is written."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..errors import ObjloaderError


class SourceError(ObjloaderError, ValueError):
    """A source path or file that cannot be read; the message names the path."""


@dataclass
class Sample:
    """One image of a source; plain data, so it pickles to build workers.

    key          stable identity of the image within its source (relative path, COCO file
                 name, ...): a record built from it carries the key, so a mask can never pair
                 with the wrong image.
    path         file the image bytes come from.
    label        class id, -1 when unlabelled.
    gt_mask_path optional 8-bit mask image (0 = background, >0 = object) beside the image.
    gt_segments  optional COCO segmentations (polygons or RLE) of the image's instances,
                 with (height, width) in gt_size; their union is the ground-truth mask.
    gt_boxes     optional float32 [K, 4] (x0, y0, x1, y1) normalised to [0, 1].
    """

    key: str
    path: str
    label: int = -1
    gt_mask_path: Optional[str] = None
    gt_segments: Optional[list] = None
    gt_size: Optional[tuple] = None
    gt_boxes: Optional[np.ndarray] = None

    @property
    def has_gt_mask(self) -> bool:
        return self.gt_mask_path is not None or self.gt_segments is not None

    def read_bytes(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError as e:
            raise SourceError(f"cannot read image {self.path!r} (record {self.key!r}): {e}") from e

    def load_gt_mask(self) -> Optional[np.ndarray]:
        """uint8 [H, W] with 0 = background, 255 = object, or None when there is no ground truth."""
        if self.gt_mask_path is not None:
            import cv2

            m = cv2.imread(self.gt_mask_path, cv2.IMREAD_UNCHANGED)
            if m is None:
                raise SourceError(f"cannot read mask {self.gt_mask_path!r} (record {self.key!r})")
            if m.ndim == 3:
                m = m.max(axis=2)
            return np.where(m > 0, 255, 0).astype(np.uint8)
        if self.gt_segments is not None:
            from .coco import segments_to_mask

            return segments_to_mask(self.gt_segments, *self.gt_size)
        return None
