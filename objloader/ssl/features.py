"""Frozen-encoder features of a built dataset, for the linear probe and the Background Challenge.

The eval transform is deterministic: decode the stored JPEG once, resize the whole image to
image_size x image_size (bilinear, antialiased, as torchvision's Resize), ImageNet mean/std.
"""
from __future__ import annotations

import multiprocessing
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from objloader.augment.reference import normalize
from objloader.errors import DatasetError
from objloader.store.reader import BuiltDataset, decode_rgb
from objloader.store.schema import MEMBER

__all__ = ["extract_features", "encode_records", "eval_transform"]


def eval_transform(jpeg: bytes, image_size: int) -> torch.Tensor:
    """Stored JPEG bytes -> normalised float32 [3, image_size, image_size] (RGB)."""
    x = torch.from_numpy(decode_rgb(jpeg)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    return normalize(x.clamp_(0.0, 1.0))[0]  # the training pipeline's ImageNet normalisation


class _EvalImages(Dataset):
    """Record i -> normalised image; the shards are opened lazily, once per worker."""

    def __init__(self, path: str, image_size: int):
        self.path = path
        self.image_size = image_size
        self._n = len(BuiltDataset(path))
        self._ds = None

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._ds is None:
            self._ds = BuiltDataset(self.path)
        try:
            return eval_transform(self._ds.raw(i, (MEMBER.image,))[MEMBER.image], self.image_size)
        except DatasetError as e:
            raise DatasetError(f"{self.path}: record {i} ({self._ds.keys[i]!r}): {e}") from e

    def __getstate__(self):
        # Open file descriptors stay in the process that opened them.
        return {**self.__dict__, "_ds": None}


def _worker_init(_):
    torch.set_num_threads(1)  # the workers are the parallelism


def _worker_context():
    # forkserver, not fork: a child forked next to numba/OpenMP threads can deadlock on their locks.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def encode_records(backbone: nn.Module, dataset_dir: str, image_size: int, indices=None, *, batch_size: int = 256,
                   workers: int = 0, device: str = "cpu", progress: bool = False) -> torch.Tensor:
    """``backbone``'s features float32 [n, D] (on ``device``) of records ``indices`` (default: all,
    in record order) under the eval transform; the backbone's mode is the caller's."""
    images = _EvalImages(dataset_dir, image_size)
    if indices is not None:
        images = Subset(images, [int(i) for i in indices])
    loader = DataLoader(images, batch_size=batch_size, shuffle=False, num_workers=workers,
                        multiprocessing_context=_worker_context() if workers > 0 else None,
                        worker_init_fn=_worker_init if workers > 0 else None,
                        pin_memory=str(device).startswith("cuda"))
    feats = []
    with torch.no_grad():
        for x in tqdm(loader, desc=f"features {dataset_dir}", unit="batch", disable=not progress, leave=False):
            feats.append(backbone(x.to(device, non_blocking=True)).float().flatten(1))
    return torch.cat(feats) if feats else torch.zeros(0, 0, device=device)


def extract_features(backbone: nn.Module, dataset_dir: str, image_size: int, batch_size: int = 256,
                     workers: int = 2, device: str = "cpu", allow_unlabelled: bool = False,
                     progress: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Features float32 [N, D] of every record of a built dataset, in record order, and its labels
    int64 [N]. Records labelled -1 are an error unless ``allow_unlabelled`` (a probe needs labels)."""
    ds = BuiltDataset(dataset_dir)
    labels = ds.labels.copy()
    ds.close()
    if not allow_unlabelled and (labels < 0).any():
        n = int((labels < 0).sum())
        raise DatasetError(f"{dataset_dir!r}: {n} of {len(labels)} records are unlabelled (label -1); "
                           "the linear probe needs a class for every record (build from an ImageFolder "
                           "with class folders)")
    feats = encode_records(backbone.to(device).eval(), dataset_dir, image_size, batch_size=batch_size,
                           workers=workers, device=device, progress=progress)
    if not len(feats):
        raise DatasetError(f"{dataset_dir!r} holds no records")
    out = feats.cpu().numpy().astype(np.float32, copy=False)
    if len(out) != len(labels):
        raise DatasetError(f"{dataset_dir!r}: extracted {len(out)} features for {len(labels)} records")
    return out, labels
