"""FFCV writer: data.beton with the fields of DESIGN.md's record schema.

The image field stores the record's JPEG bytes as they are (no second lossy encode), in the
layout of ffcv's RGBImageField, so every stock FFCV image decoder reads it.
"""
from __future__ import annotations

import numpy as np

from ..optional import require
from .schema import BuildOptions, Record
from .staging import StagedRecords


def _fields(opts: BuildOptions, with_gt: bool) -> dict:
    require("ffcv", "objloader-build --formats ffcv (data.beton); build --formats wds without it")
    from ffcv.fields import IntField, JSONField, NDArrayField

    M, K = opts.mask_res, opts.max_boxes
    fields = {
        "image": _make_jpeg_field_class()(),
        "label": IntField(),
        "mask": NDArrayField(np.dtype("uint8"), (M, M)),
        "boxes": NDArrayField(np.dtype("float32"), (K, 4)),
        "n_boxes": IntField(),
        "bg_rect": NDArrayField(np.dtype("float32"), (4,)),
        "key": JSONField(),
    }
    if with_gt:
        fields.update({
            "gt_mask": NDArrayField(np.dtype("uint8"), (M, M)),
            "gt_boxes": NDArrayField(np.dtype("float32"), (K, 4)),
            "n_gt_boxes": IntField(),
        })
    return fields


def _make_jpeg_field_class():
    # Built on demand so that importing objloader.store does not import ffcv (~5 s).
    from ffcv.fields import RGBImageField
    from ffcv.fields.rgb_image import IMAGE_MODES

    class JpegBytesField(RGBImageField):
        """RGBImageField whose input is (jpeg bytes, height, width): stored verbatim as 'jpg'."""

        def encode(self, destination, value, malloc):
            jpeg, height, width = value
            destination["mode"] = IMAGE_MODES["jpg"]
            destination["height"], destination["width"] = height, width
            destination["data_ptr"], storage = malloc(len(jpeg))
            storage[:] = np.frombuffer(jpeg, dtype=np.uint8)

    return JpegBytesField


class _RecordTuples:
    """Indexed dataset for ffcv's DatasetWriter: record i as a tuple in field order."""

    def __init__(self, staged: StagedRecords, with_gt: bool):
        self.staged, self.with_gt = staged, with_gt

    def __len__(self):
        return len(self.staged)

    def __getitem__(self, i):
        r: Record = self.staged[i]
        t = ((r.image, r.height, r.width), r.label, r.mask, r.boxes, r.n_boxes, r.bg_rect,
             {"key": r.key, "sha1": r.sha1})
        if self.with_gt:
            t += (r.gt_mask, r.gt_boxes, r.n_gt_boxes)
        return t


def write_beton(path: str, staged: StagedRecords, opts: BuildOptions, with_gt: bool, workers: int) -> None:
    from ffcv.types import FieldDescType, HeaderType
    from ffcv.writer import DatasetWriter

    fields = _fields(opts, with_gt)
    image_slot = list(fields).index("image")

    class _Writer(DatasetWriter):
        def prepare(self):
            super().prepare()
            # ffcv records a subclass as a custom field (type 255); ours has RGBImageField's exact
            # layout, so mark it as one (type 2) and plain ffcv readers need no custom_fields.
            with open(self.fname, "r+b") as f:
                f.seek(HeaderType.itemsize + image_slot * FieldDescType.itemsize)
                f.write(np.uint8(2).tobytes())

    _Writer(path, fields, num_workers=max(1, workers)).from_indexed_dataset(
        _RecordTuples(staged, with_gt), chunksize=64, shuffle_indices=False)
