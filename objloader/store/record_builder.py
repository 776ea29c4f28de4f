"""Turn one source Sample into one Record: decode once, normalise colour, resize, encode,
and derive the mask geometry. Runs in build worker processes."""
from __future__ import annotations

import hashlib
from typing import Optional

import cv2
import numpy as np

from ..cam.geometry import bg_rect, mask_to_boxes, pad_boxes
from ..sources.base import Sample
from ..sources.decode import SkipRecord, decode_image
from ..errors import ConfigError, MaskPairingError, SourceError
from .schema import BuildOptions, Record

__all__ = ["MaskPairingError", "SkipRecord", "build_record"]  # SkipRecord: sources.decode's, re-exported


def resize_long_side(img: np.ndarray, max_side: int) -> np.ndarray:
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img
    s = max_side / max(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise SkipRecord("JPEG encoding failed")
    return buf.tobytes()


def _boxes_from(mask_hw: np.ndarray, given: Optional[np.ndarray], opts: BuildOptions):
    """(padded [K, 4] boxes, their count, how many boxes beyond K were dropped): the source's own
    boxes when it has them (COCO instances stay separate even when they touch), otherwise the
    mask's components. Both are ordered largest first (a box's area, a component's pixel count)
    and cut to --max-boxes here alone, so every source keeps its largest objects and the build
    counts what it drops."""
    if given is not None and len(given):
        b = np.asarray(given, dtype=np.float32).reshape(-1, 4)
        b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]  # degenerate boxes cannot hold a crop
        b = b[np.argsort(-(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]), kind="stable")]
    else:
        # Every component (a mask has no more than pixels), so the cut below is the only one.
        b = mask_to_boxes(mask_hw, threshold=opts.box_threshold, max_boxes=mask_hw.size,
                          min_area_frac=opts.min_box_area, margin=opts.box_margin)
    boxes, n = pad_boxes(b, opts.max_boxes)
    return boxes, n, len(b) - n


def _contracam_mask(sample: Sample, sha1: str, cam_entry: Optional[tuple], size) -> np.ndarray:
    """The sample's ContraCAM mask at the stored image's size [h, w], after checking it is this image's."""
    if cam_entry is None:
        raise MaskPairingError(f"record {sample.key!r} ({sample.path}): the ContraCAM mask store has no mask "
                               "for this key; was it computed on another source?")
    cam_sha1, cam_mask, reason = cam_entry
    if cam_sha1 and cam_sha1 != sha1:
        raise MaskPairingError(f"record {sample.key!r} ({sample.path}): the image's content (sha1 {sha1[:12]}) is "
                               f"not the one ContraCAM explained (sha1 {cam_sha1[:12]}); the source changed "
                               "since objloader-cam ran: rerun it")
    if cam_mask is None:
        raise SkipRecord(f"no ContraCAM mask: {reason}")
    h, w = size
    return cv2.resize(cam_mask, (w, h), interpolation=cv2.INTER_LINEAR)


def build_record(sample: Sample, opts: BuildOptions, cam_entry: Optional[tuple] = None) -> Record:
    """The Record for one sample. Raises SkipRecord (a reason for the manifest) or SourceError.

    With ``--masks contracam``, ``cam_entry`` is the mask store's (sha1, uint8 mask or None, skip
    reason) for the sample's key; a missing entry or a different image hash raises MaskPairingError.
    """
    data = sample.read_bytes()
    sha1 = hashlib.sha1(data).hexdigest()
    rgb, (src_h, src_w), notes = decode_image(data, opts)
    notes = list(sample.notes) + notes  # repairs made while reading the source (e.g. sources/coco.py)
    rgb = resize_long_side(rgb, opts.max_res)
    if rgb.shape[:2] != (src_h, src_w):
        notes.append(f"resized from {src_w}x{src_h}")
    h, w = rgb.shape[:2]
    jpeg = encode_jpeg(rgb, opts.jpeg_quality)
    M = opts.mask_res

    gt = None
    if sample.has_gt_mask:
        try:
            gt = sample.load_gt_mask()
        except SourceError as e:
            raise SkipRecord(str(e)) from None
        if gt.shape != (src_h, src_w):
            where = f" ({sample.gt_mask_path})" if sample.gt_mask_path else ""
            raise SkipRecord(f"ground-truth mask{where} is {gt.shape[1]}x{gt.shape[0]} but the image is "
                             f"{src_w}x{src_h}: refusing to pair them")
        gt = cv2.resize(gt, (w, h), interpolation=cv2.INTER_AREA) if gt.shape != (h, w) else gt

    if opts.masks == "gt":
        if gt is None:
            raise SkipRecord("no ground-truth mask (--masks gt)")
        mask_hw, given_boxes = gt, sample.gt_boxes
    elif opts.masks == "none":
        mask_hw, given_boxes = None, None
    elif opts.masks == "contracam":
        mask_hw, given_boxes = _contracam_mask(sample, sha1, cam_entry, (h, w)), None
    else:
        raise ConfigError(f"unknown --masks {opts.masks!r}")

    if mask_hw is None:
        # No object knowledge: the whole image is the object, there is no background.
        mask = np.full((M, M), 255, np.uint8)
        boxes, n_boxes = pad_boxes(np.zeros((0, 4), np.float32), opts.max_boxes)
        boxes_dropped = 0
        bg = np.zeros(4, np.float32)
    else:
        mask = cv2.resize(mask_hw, (M, M), interpolation=cv2.INTER_AREA)
        boxes, n_boxes, boxes_dropped = _boxes_from(mask_hw, given_boxes, opts)
        bg = bg_rect(mask_hw, method=opts.bg_patch, threshold=opts.bg_threshold).astype(np.float32)

    rec = Record(key=sample.key, sha1=sha1, image=jpeg, height=h, width=w,
                 label=int(sample.label), mask=mask, boxes=boxes, n_boxes=int(n_boxes), bg_rect=bg,
                 notes=notes, boxes_dropped=int(boxes_dropped))
    if gt is not None:
        rec.gt_mask = cv2.resize(gt, (M, M), interpolation=cv2.INTER_AREA)
        rec.gt_boxes, rec.n_gt_boxes, rec.gt_boxes_dropped = _boxes_from(gt, sample.gt_boxes, opts)
    return rec
