"""The record a source yields, before any mask is computed or any format is written."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np

from ..errors import SourceError
from .rasterise import instances_to_mask


@dataclass
class Sample:
    """One image of a source; plain data, so it pickles to build workers.

    key          stable identity of the image within its source (relative path, COCO file
                 name, ...): a record built from it carries the key, so a mask can never pair
                 with the wrong image. Always valid UTF-8 text (see `file_sample`).
    path         file the image bytes come from.
    label        class id, -1 when unlabelled.
    gt_mask_path optional mask image (0 = background, >0 = object; a JPEG mask: >= half its
                 range, see `load_gt_mask`), beside the image or in a parallel mask tree.
    gt_mask_error why the mask this image should have cannot be used though its source says it
                 has one (a parallel mask tree without a file for it, or with two): raised as
                 SourceError when the mask is loaded, so the build skips this record alone with
                 the reason. Never read as "no object" or "all object".
    gt_segments  optional COCO instances as (annotation id, segmentation) pairs, each
                 segmentation polygons or RLE, with (height, width) in gt_size; their union is
                 the ground-truth mask.
    gt_boxes     optional float32 [K, 4] (x0, y0, x1, y1) normalised to [0, 1].
    origin       where the image is described in its source, for messages (e.g. "COCO image id
                 7 ('a.jpg')"); the key when empty.
    notes        repairs made to the source's description of this image while reading it; they
                 are conversions of the record built from it, counted like them.
    invalid      why the source's entry cannot become a record (a malformed field, a name that is
                 not UTF-8), found while reading the source. It is raised as SourceError when the
                 sample is first used, so the build skips or stops on this record alone, with
                 the reason, instead of the whole source failing to open.
    """

    key: str
    path: str
    label: int = -1
    gt_mask_path: Optional[str] = None
    gt_segments: Optional[list] = None
    gt_size: Optional[tuple] = None
    gt_boxes: Optional[np.ndarray] = None
    origin: str = ""
    notes: List[str] = field(default_factory=list)
    invalid: Optional[str] = None
    gt_mask_error: Optional[str] = None

    @property
    def has_gt_mask(self) -> bool:
        return self.gt_mask_path is not None or self.gt_segments is not None or self.gt_mask_error is not None

    def _raise_if_invalid(self) -> None:
        if self.invalid is not None:
            raise SourceError(self.invalid)

    def read_bytes(self) -> bytes:
        self._raise_if_invalid()
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError as e:
            raise SourceError(f"cannot read image {self.path!r} (record {self.key!r}): {e}") from e

    def load_gt_mask(self) -> Optional[np.ndarray]:
        """uint8 [H, W] with 0 = background, 255 = object, or None when there is no ground truth.

        A palette image (PNG mode "P", as Pascal VOC stores masks) is read by palette index, not by
        displayed colour: 0 = background, 255 = void (not object: stored masks are binary), any
        other index = object. Any other mask file's pixels are used as stored (any EXIF orientation of the mask file itself is
        not applied): a mask is drawn on the image as displayed, see imagefolder.py. A pixel is
        object when its value (the largest channel's) is above 0, or, in a JPEG mask, at least
        half the range (128 of 255): JPEG's ringing leaves small non-zero values in the background
        around every edge, which "> 0" would turn into object."""
        self._raise_if_invalid()
        if self.gt_mask_error is not None:
            raise SourceError(self.gt_mask_error)
        if self.gt_mask_path is not None:
            import cv2

            # Read through open(), not cv2.imread: OpenCV cannot take a path that is not UTF-8.
            try:
                with open(self.gt_mask_path, "rb") as f:
                    data = f.read()
            except OSError as e:
                raise SourceError(f"cannot read mask {self.gt_mask_path!r} (record {self.key!r}): {e}") from e
            index = _palette_indices(data, self.gt_mask_path, self.key)
            if index is not None:
                # A palette mask (Pascal VOC's format) means its indices, whatever colours its
                # palette shows them in: 0 background, 255 void (kept out of the object), else object.
                return np.where((index != 0) & (index != PALETTE_VOID), 255, 0).astype(np.uint8)
            m = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
            if m is None:
                raise SourceError(f"cannot read mask {self.gt_mask_path!r} (record {self.key!r})")
            if m.ndim == 3:
                m = m.max(axis=2)
            lossy = self.gt_mask_path.lower().endswith((".jpg", ".jpeg"))
            threshold = np.iinfo(m.dtype).max // 2 if lossy and m.dtype.kind == "u" else 0
            return np.where(m > threshold, 255, 0).astype(np.uint8)
        if self.gt_segments is not None:
            return instances_to_mask(self.gt_segments, *self.gt_size, origin=self.origin or repr(self.key))
        return None


# Pascal VOC's "void" index: object borders and pixels not to be scored.
PALETTE_VOID = 255


def _palette_indices(data: bytes, path: str, key: str) -> Optional[np.ndarray]:
    """The palette indices [H, W] of a palette-image mask, None for any other kind of file."""
    import io

    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data))  # the header only
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None  # not something PIL reads as a palette image: OpenCV's decoder says what it is
    if im.mode != "P":
        return None
    try:
        return np.asarray(im)
    except (OSError, SyntaxError, ValueError) as e:
        raise SourceError(f"cannot read mask {path!r} (record {key!r}): {e}") from None


@dataclass
class SourceSpec:
    """One dataset to build: `name` is its folder inside the output ("" = the output itself).

    gt_mask_root: the parallel mask tree the samples' ground-truth masks come from (None: the
    source's own masks); the build's fingerprint covers its files, so editing a mask restarts
    an interrupted build instead of resuming with the old one."""

    name: str
    kind: str
    path: str
    samples: List[Sample]
    classes: List[str] = field(default_factory=list)
    gt_mask_root: Optional[str] = None

    def __post_init__(self):
        # The build writes this dataset to OUT/<name> (and ContraCAM to its store/<name>): a
        # name read from a file (a demo marker's variants) must not lead out of OUT.
        parts = self.name.split("/") if self.name else []
        if self.name.startswith("/") or any(p in ("", ".", "..") or "\\" in p for p in parts):
            raise SourceError(f"dataset name {self.name!r} of {self.path!r} is not a plain relative folder name "
                              "(no '..', '.', empty or absolute parts): it would be written outside OUT")


def printable(name: str) -> str:
    """`name` as valid UTF-8 text. Python keeps the bytes of a file name that are not UTF-8 as
    lone surrogates, which can be neither encoded, hashed into the build's fingerprint nor
    printed everywhere; here they become \\xNN."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates no byte decodes to, e.g. a JSON "\\ud800" escape
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def file_sample(key: str, path: str, **fields) -> Sample:
    """The Sample of one file of a source; when its key is not valid UTF-8, one that is skipped
    with a reason naming the escaped name. Such a key cannot be hashed or stored as text, and
    escaping it into a record key could make it collide with a file literally named that way."""
    shown = printable(key)
    if shown == key:
        return Sample(key=key, path=path, **fields)
    reason = f"file name is not valid UTF-8: {shown} (bytes that are not written as \\xNN)"
    return Sample(key=shown, path=path, invalid=reason, **fields)
