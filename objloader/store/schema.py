"""The record schema shared by every on-disk format (see DESIGN.md, "Record schema")."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Callable, ClassVar, Dict, Optional, Protocol, Tuple

import numpy as np

from ..ranges import MASK_RES, Range, check_ranges
from ..sources.decode import DecodeLimits  # the decoding limits a build applies, defaults included

SCHEMA_VERSION = 1

# The one contract of every format's layout (DESIGN.md, "Record schema"): writers, readers,
# engines and --verify take every file name, member name and field list from here.

MANIFEST_FILE = "manifest.json"  # a dataset's (or a collection's) manifest
BETON_FILE = "data.beton"        # the FFCV format's one file


@dataclass(frozen=True)
class _Members:
    """WebDataset member suffixes, one per field: record i's field F is the tar member
    ``record_name(i) + "." + MEMBER.F``. Any tar reader (DALI's readers.webdataset in --verify,
    the .idx offsets in the torch and DALI engines) finds a field by its suffix."""

    image: str = "jpg"
    label: str = "cls"
    mask: str = "mask.png"       # lossless
    boxes: str = "boxes.npy"
    bg_rect: str = "bg.npy"
    meta: str = "json"           # key, sha1, height, width, n_boxes, n_gt_boxes
    gt_mask: str = "gt_mask.png"
    gt_boxes: str = "gt_boxes.npy"


MEMBER = _Members()
WDS_MEMBERS = asdict(MEMBER)  # field -> suffix, in the order a record's members are written
_GT_FIELDS = ("gt_mask", "gt_boxes")


def wds_members(with_gt: bool) -> Tuple[str, ...]:
    """The member suffixes of one record, in the order the writer stores them (the gt members
    last, present only in a dataset that keeps ground truth)."""
    return tuple(suffix for name, suffix in WDS_MEMBERS.items() if with_gt or name not in _GT_FIELDS)


def record_name(index: int) -> str:
    """A record's member name stem: its zero-padded index. Source keys may hold dots and slashes,
    which WebDataset would split on; the key travels in the meta member."""
    return f"{index:09d}"


# Tar and .idx layout: tars are read in 512-byte blocks; each tar's pax global header carries the
# build's identity under PAX_IDENTITY, each .idx's first line is "INDEX_VERSION N objloader-id=ID"
# (DALI's webdataset index, whose reader takes the first two words).
TAR_BLOCK = 512
PAX_IDENTITY = "objloader.dataset_id"
INDEX_VERSION = "v1.2"

# data.beton's fields in their order (ffcv's metadata slots follow it); the gt fields only in a
# dataset that keeps ground truth.
_FFCV_FIELDS = ("image", "label", "mask", "boxes", "n_boxes", "bg_rect", "key")
_FFCV_GT_FIELDS = ("gt_mask", "gt_boxes", "n_gt_boxes")


def ffcv_fields(with_gt: bool) -> Tuple[str, ...]:
    """The names of data.beton's fields, in their order."""
    return _FFCV_FIELDS + (_FFCV_GT_FIELDS if with_gt else ())


@dataclass(frozen=True)
class BuildOptions:
    """Every option that changes the bytes of a built dataset; CLI flags map onto it 1:1."""

    masks: str = "gt"            # gt | none | contracam (masks of a ContraCAM mask store)
    max_res: int = DecodeLimits.max_res        # long side of the stored JPEG
    mask_res: int = 64           # M: masks are stored as uint8 [M, M] over the unit square
    max_boxes: int = 8           # K: boxes are padded to [K, 4]
    bg_patch: str = "maxrect"    # maxrect | strip
    jpeg_quality: int = 90
    min_size: int = DecodeLimits.min_size      # images with a side below this are skipped
    max_pixels: int = DecodeLimits.max_pixels  # images above this many pixels are skipped (decompression bombs)
    box_threshold: float = 0.5   # mask -> boxes binarisation, fraction of 255
    bg_threshold: float = 0.2    # mask -> background rectangle binarisation (DESIGN.md)
    min_box_area: float = 0.01   # components smaller than this fraction of the image are dropped
    box_margin: float = 0.0      # boxes grow by this fraction of their size on each side
    shard_size: int = 1000       # records per WebDataset shard

    # Every numeric option's range, which objloader-build's flags share.
    RANGES: ClassVar[dict] = {
        "max_res": Range(int, 8, 8192),
        "mask_res": MASK_RES,
        "max_boxes": Range(int, 1, 256),
        "jpeg_quality": Range(int, 1, 100, why="JPEG quality"),
        "min_size": Range(int, 1, 65_535),
        "max_pixels": Range(int, 1, 2 ** 36),
        "box_threshold": Range(float, 0, 1, why="a fraction of 255"),
        "bg_threshold": Range(float, 0, 1, why="a fraction of 255"),
        "min_box_area": Range(float, 0, 1, why="a fraction of the image"),
        "box_margin": Range(float, 0, 1, why="a fraction of the box per side"),
        "shard_size": Range(int, 1, 1_000_000),
    }

    def __post_init__(self):
        check_ranges(self, self.RANGES, "BuildOptions")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Record:
    """One built record: exactly what every format stores for an image."""

    key: str                  # the source's identity for the image
    sha1: str                 # SHA-1 of the source image file's bytes
    image: bytes              # JPEG, long side <= max_res
    height: int
    width: int
    label: int
    mask: np.ndarray          # uint8 [M, M]
    boxes: np.ndarray         # float32 [K, 4], zero padded
    n_boxes: int
    bg_rect: np.ndarray       # float32 [4]
    gt_mask: Optional[np.ndarray] = None
    gt_boxes: Optional[np.ndarray] = None
    n_gt_boxes: int = 0
    notes: list = field(default_factory=list)  # conversions applied (grayscale, CMYK, alpha, resized)
    boxes_dropped: int = 0     # boxes beyond max_boxes left out of `boxes` (the smallest)
    gt_boxes_dropped: int = 0  # the same for `gt_boxes`

    def meta(self) -> dict:
        return {"key": self.key, "sha1": self.sha1, "height": self.height, "width": self.width,
                "n_boxes": self.n_boxes, "n_gt_boxes": self.n_gt_boxes}


def record_digest(image: bytes, label: int, mask: np.ndarray, boxes: np.ndarray, n_boxes: int,
                  bg_rect: np.ndarray, gt_mask=None, gt_boxes=None, n_gt_boxes: int = 0) -> str:
    """Digest over every stored field, so a reader can prove it got each record back bit-exactly."""
    h = _hash_fields(image, label, mask, boxes, n_boxes, bg_rect)
    if gt_mask is not None:
        _hash_gt_fields(h, gt_mask, gt_boxes, n_gt_boxes)
    return h.hexdigest()[:16]


def _hash_fields(image: bytes, label: int, mask: np.ndarray, boxes: np.ndarray, n_boxes: int,
                 bg_rect: np.ndarray):
    """SHA-1 over the fields every record stores, in the digest's order."""
    h = hashlib.sha1()
    h.update(image)
    h.update(np.int64(label).tobytes())
    h.update(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(boxes, dtype=np.float32).tobytes())
    h.update(np.int64(n_boxes).tobytes())
    h.update(np.ascontiguousarray(bg_rect, dtype=np.float32).tobytes())
    return h


def _hash_gt_fields(h, gt_mask: np.ndarray, gt_boxes: np.ndarray, n_gt_boxes: int) -> None:
    """Continue ``h`` over the ground-truth fields, stored only when the dataset keeps them."""
    h.update(np.ascontiguousarray(gt_mask, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(gt_boxes, dtype=np.float32).tobytes())
    h.update(np.int64(n_gt_boxes).tobytes())


def digests_of(rec: Record) -> Tuple[str, str]:
    """(digest without the ground-truth fields, digest with them) of one record, from one hash
    pass (SHA-1 can be read out midway and continued). The builder knows whether a dataset keeps
    its gt fields only once it has seen every record, and reads each record once. Both equal
    record_digest's value for a record without ground truth."""
    h = _hash_fields(rec.image, rec.label, rec.mask, rec.boxes, rec.n_boxes, rec.bg_rect)
    without_gt = h.hexdigest()[:16]
    if rec.gt_mask is None:
        return without_gt, without_gt
    _hash_gt_fields(h, rec.gt_mask, rec.gt_boxes, rec.n_gt_boxes)
    return without_gt, h.hexdigest()[:16]


class MaskProvider(Protocol):
    """Where ``--masks contracam`` takes its masks from. The builder calls it and never imports
    the code behind it (objloader.cam.masks.ContraCAMMasks implements it), so the mask stage
    and the store do not depend on each other."""

    def validate(self) -> None:
        """Raise an ObjloaderError naming what is missing (a checkpoint, a mask store)."""

    def identity(self) -> dict:
        """What the build's fingerprint must know of the masks (a resumed build checks it)."""

    def entries(self, spec, work_dir: str, opts: "BuildOptions", workers: int,
                log: Callable) -> Tuple[Dict[str, tuple], dict]:
        """For one source dataset: key -> (image sha1, uint8 mask [R, R] or None, skip reason), and
        what the manifest records of the masks. ``work_dir`` is the builder's scratch folder
        (kept until the dataset is built, so an interrupted build resumes there)."""


def dataset_identity(options: dict, has_gt: bool, keys, digests) -> str:
    """A build's identity: a digest of its options and of every record's key and digest (which
    cover every stored field). Every format carries it (data.beton's key field descriptor, each
    tar's pax global header, each .idx's first line) and the loaders compare it with the
    manifest's "dataset_id" at open, so a file from another build is refused without reading a
    record. A content digest, not a random id: a resumed build equals an uninterrupted one."""
    h = hashlib.sha256(json.dumps([SCHEMA_VERSION, options, bool(has_gt), list(keys), list(digests)]).encode())
    return h.hexdigest()[:32]


# How each format spells the identity: "objloader-id=" + the 32 hex digits.
IDENTITY_PREFIX = "objloader-id="
