"""Online kNN monitor: is a self-supervised run learning? (the InstDisc / solo-learn protocol)

Features of a fixed subset of the train split form the bank, the val split is the query set;
each query is classified by a weighted vote of its k nearest bank features by cosine
similarity, weight exp(similarity / T) (k = 20, T = 0.07, Wu et al. 2018), and the top-1 against
the val labels is logged. Features come from the frozen backbone with the evaluation transform
of objloader.ssl.features (the whole image resized, ImageNet normalisation). Under DDP each
rank extracts every world-th record of both sets and the ranks all-gather only the features
and labels; every rank then scores the same kNN (cheap) so all log the same number.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from objloader.errors import ConfigError
from objloader.loaders.order import per_rank
from objloader.store.reader import BuiltDataset
from objloader.store.schema import MANIFEST_FILE

from .features import encode_records

__all__ = ["knn_predict", "KnnMonitor"]

K, TEMPERATURE = 20, 0.07


def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = K, temperature: float = TEMPERATURE, chunk: int = 1024) -> torch.Tensor:
    """Predicted class of each query: sum over its k most similar bank features (cosine) of
    exp(similarity / temperature), per class; the class with the largest sum. ``bank`` [N, D],
    ``queries`` [Q, D] (normalised here), ``bank_labels`` int64 [N]. Chunked over queries, so the
    similarity matrix never exceeds ``chunk`` x N."""
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    out = []
    for start in range(0, len(queries), chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # [q, k]
        votes = torch.zeros(len(q), num_classes, dtype=torch.float32, device=q.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        out.append(votes.argmax(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64)


class KnnMonitor:
    """kNN top-1 of a backbone: bank = up to ``bank_size`` train records (a fixed, evenly spread
    subset), queries = every val record. ``rank``/``world`` shard the extraction (DDP)."""

    def __init__(self, train_dir: str, val_dir: str, image_size: int, *, bank_size: int = 2000,
                 batch_size: int = 256, workers: int = 0, device: str = "cpu", rank: int = 0, world: int = 1):
        self.image_size, self.batch_size, self.workers, self.device = image_size, batch_size, workers, device
        self.rank, self.world = rank, world
        self.sets = {}
        for name, path, limit in (("bank", train_dir, bank_size), ("val", val_dir, None)):
            ds = BuiltDataset(path)
            labels = ds.labels.copy()
            ds.close()
            n = len(labels)
            index = np.arange(n) if limit is None or limit >= n else np.linspace(0, n - 1, limit).round().astype(np.int64)
            if len(index) < world or (labels[index] < 0).any():
                raise ConfigError(f"kNN monitor: {path!r} needs at least {world} labelled records (one a rank), "
                                  f"has {int((labels[index] >= 0).sum())}")
            self.sets[name] = (path, index, torch.from_numpy(labels[index]).long())
        self.num_classes = int(max(int(self.sets["bank"][2].max()), int(self.sets["val"][2].max()))) + 1

    def _features(self, backbone: nn.Module, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of set ``name`` (every world-th record), all-gathered."""
        path, index, labels = self.sets[name]
        f = encode_records(backbone, path, self.image_size, index[self.rank::self.world], batch_size=self.batch_size,
                           workers=self.workers, device=self.device)
        if self.world > 1:
            f = _gather_strided(f, len(index), self.world)
        return f, labels.to(f.device)

    @torch.no_grad()
    def __call__(self, backbone: nn.Module) -> float:
        """kNN top-1 (a fraction) of ``backbone`` on val; the backbone's mode is restored."""
        was_training = backbone.training
        backbone.eval()
        try:
            bank, bank_labels = self._features(backbone, "bank")
            val, val_labels = self._features(backbone, "val")
        finally:
            backbone.train(was_training)
        pred = knn_predict(bank, bank_labels, val, self.num_classes)
        return float((pred == val_labels).float().mean()) if len(val_labels) else float("nan")


def _gather_strided(f: torch.Tensor, n: int, world: int) -> torch.Tensor:
    """Rank r holds rows r, r + world, ...; all-gather them (padded to one size) back into order."""
    import torch.distributed as dist

    padded = torch.zeros(per_rank(n, world), f.shape[1], dtype=f.dtype, device=f.device)
    padded[:len(f)] = f
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty(n, f.shape[1], dtype=f.dtype, device=f.device)
    for r, part in enumerate(parts):
        rows = np.arange(r, n, world)
        out[torch.from_numpy(rows).to(f.device)] = part[:len(rows)]
    return out


def default_val_dir(train_dir: str) -> Optional[str]:
    """The labelled val split beside a train split (``.../train`` -> ``.../val``), if there is one."""
    import os

    parent, leaf = os.path.split(os.path.normpath(train_dir))
    if leaf != "train":
        return None
    val = os.path.join(parent, "val")
    if not os.path.isfile(os.path.join(val, MANIFEST_FILE)):
        return None
    try:
        ds = BuiltDataset(val)
    except Exception:  # an unreadable val split: no monitor rather than a failed run
        return None
    labelled = bool(len(ds.labels)) and bool((ds.labels >= 0).all())
    ds.close()
    return val if labelled else None
