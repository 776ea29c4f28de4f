"""open_dataset(OUT): random access to built records as numpy, for tests, visualisation and
the torch engine. Reads the WebDataset shards through their .idx files (no tar scan)."""
from __future__ import annotations

import io
import json
import os
from typing import List, Optional

import cv2
import numpy as np

from .wds_writer import record_name
from ..errors import ObjloaderError

class DatasetError(ObjloaderError, ValueError):
    """A path that is not a built dataset, or a dataset that fails its own checks."""


def read_manifest(path: str) -> dict:
    mpath = os.path.join(path, "manifest.json")
    if not os.path.isfile(mpath):
        hint = " (an interrupted build? rerun objloader-build)" if os.path.isdir(path.rstrip("/") + ".partial") else ""
        raise DatasetError(f"{path!r} is not a built objloader dataset: no manifest.json{hint}")
    with open(mpath, encoding="utf-8") as f:
        return json.load(f)


def dataset_dirs(path: str) -> List[str]:
    """The dataset directories under a build output: itself, or each dataset of a collection."""
    m = read_manifest(path)
    if m.get("kind") == "collection":
        return [os.path.join(path, name) for name in m["datasets"]]
    return [path]


def read_index(idx_path: str) -> List[dict]:
    """Parse a DALI webdataset index: per sample, suffix -> (offset, size)."""
    with open(idx_path) as f:
        header = f.readline().split()
        if len(header) != 2 or header[0] != "v1.2":
            raise DatasetError(f"{idx_path}: not a v1.2 webdataset index")
        samples = []
        for line in f:
            parts = line.split()
            if not parts:
                continue
            entry = {}
            for j in range(0, len(parts), 4):
                entry[parts[j]] = (int(parts[j + 1]), int(parts[j + 2]), parts[j + 3])
            samples.append(entry)
    if len(samples) != int(header[1]):
        raise DatasetError(f"{idx_path}: header says {header[1]} samples, found {len(samples)}")
    return samples


def decode_npy(data: bytes) -> np.ndarray:
    """A stored ``.npy`` member (boxes, bg rect) -> array (no pickles)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def decode_png(data: bytes) -> np.ndarray:
    """A stored lossless mask (``.mask.png``) -> uint8 [M, M]; raises when it does not decode."""
    mask = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise DatasetError("stored mask does not decode")
    return mask


def decode_rgb(data: bytes) -> np.ndarray:
    """Stored JPEG bytes -> RGB uint8 [H, W, 3]; raises when they do not decode."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError("stored image does not decode")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


class BuiltDataset:
    """Records of one built dataset; `ds[i]` is a dict of numpy fields (see DESIGN.md)."""

    def __init__(self, path: str, manifest: Optional[dict] = None):
        """``manifest``: PATH/manifest.json when the caller has already read it (it lists every
        record, so a large one is worth reading once)."""
        self.path = path
        self.manifest = manifest if manifest is not None else read_manifest(path)
        if self.manifest.get("kind") == "collection":
            names = ", ".join(self.manifest["datasets"])
            raise DatasetError(f"{path!r} holds several datasets ({names}); open one of them, "
                               f"e.g. {os.path.join(path, next(iter(self.manifest['datasets'])))!r}")
        if "wds" not in self.manifest["formats"]:
            raise DatasetError(f"{path!r} was built without WebDataset shards (--formats); "
                               "open_dataset reads the shards")
        self.classes = self.manifest.get("classes", [])
        self.has_gt = self.manifest["has_gt"]
        self.labels = np.asarray(self.manifest["records"]["labels"], dtype=np.int64)
        self.n_boxes = np.asarray(self.manifest["records"]["n_boxes"], dtype=np.int64)
        self.keys = self.manifest["records"]["keys"]
        self._entries = []  # record i -> (shard file, {suffix: (offset, size, name)})
        for tar in self.manifest["shards"]:
            tar_path = os.path.join(path, tar)
            for entry in read_index(tar_path[:-4] + ".idx"):
                self._entries.append((tar_path, entry))
        if len(self._entries) != len(self.keys):
            raise DatasetError(f"{path!r}: shards hold {len(self._entries)} records, manifest says {len(self.keys)}")
        self._files = {}

    def __len__(self) -> int:
        return len(self._entries)

    def _read(self, tar_path: str, offset: int, size: int) -> bytes:
        fd = self._files.get(tar_path)
        if fd is None:
            fd = self._files[tar_path] = os.open(tar_path, os.O_RDONLY)
        return os.pread(fd, size, offset)

    def raw(self, i: int, members=None) -> dict:
        """suffix -> member bytes of record i (only the suffixes in ``members``, if given)."""
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} out of range (dataset has {len(self)})")
        tar_path, entry = self._entries[i]
        out = {}
        for suffix, (offset, size, name) in entry.items():
            if members is not None and suffix not in members:
                continue
            if not name.startswith(record_name(i) + "."):
                raise DatasetError(f"{tar_path}: index entry {name!r} is not record {i}")
            out[suffix] = self._read(tar_path, offset, size)
        return out

    def __getitem__(self, i: int) -> dict:
        raw = self.raw(i)
        meta = json.loads(raw["json"])
        rec = {
            "index": i,
            "key": meta["key"],
            "sha1": meta["sha1"],
            "jpeg": raw["jpg"],
            "image": decode_rgb(raw["jpg"]),
            "label": int(raw["cls"]),
            "mask": decode_png(raw["mask.png"]),
            "boxes": decode_npy(raw["boxes.npy"]),
            "n_boxes": int(meta["n_boxes"]),
            "bg_rect": decode_npy(raw["bg.npy"]),
        }
        if "gt_mask.png" in raw:
            rec.update(gt_mask=decode_png(raw["gt_mask.png"]), gt_boxes=decode_npy(raw["gt_boxes.npy"]),
                       n_gt_boxes=int(meta["n_gt_boxes"]))
        return rec

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files = {}

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def open_dataset(path: str, split: Optional[str] = None) -> BuiltDataset:
    """Open a built dataset; for a collection (a built demo folder) name the split, e.g. 'train'."""
    return BuiltDataset(os.path.join(path, split) if split else path)
