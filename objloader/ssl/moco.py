"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning").

Query encoder = backbone + 2-layer MLP head; key encoder = its momentum copy (m = 0.999);
a queue of past keys serves as negatives; InfoNCE with temperature 0.2 (MoCo eq. 1). Keys are
gathered across ranks before they enter the queue, so every rank holds the same queue.
Shuffle-BN is not implemented (the loss is the same; it only guards against BN leakage).
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .backbone import build_backbone, feature_dim

__all__ = ["MoCo", "queue_size_for"]


def queue_size_for(n_records: int, requested: int = 65536) -> int:
    """The queue length for a dataset of ``n_records``: ``requested``, or, when the dataset is
    smaller than that, the largest power of two <= n_records // 2, so the queue does not hold
    several stale keys of the same image (warns when it scales down)."""
    if n_records >= requested:
        return requested
    k = 1 << max(int(n_records // 2), 1).bit_length() - 1
    warnings.warn(f"MoCo queue: the dataset has {n_records} records, fewer than the queue's {requested}; "
                  f"using a queue of {k} (largest power of two <= {n_records} // 2)", stacklevel=2)
    return k


def _mlp_head(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


@torch.no_grad()
def _gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, in rank order (no gradient: keys are targets)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class MoCo(nn.Module):
    """``forward(views [B, 2, 3, H, W]) -> loss``: view 0 is the query, view 1 the key."""

    def __init__(self, arch: str = "resnet18", small_stem: bool = False, dim: int = 128,
                 hidden: int | None = None, queue_size: int = 65536, momentum: float = 0.999,
                 temperature: float = 0.2):
        super().__init__()
        d = feature_dim(arch)
        hidden = hidden or d  # 2048 for ResNet-50 as in the paper; 512 for ResNet-18
        self.momentum, self.temperature = float(momentum), float(temperature)
        self.backbone = build_backbone(arch, small_stem)
        self.head = _mlp_head(d, hidden, dim)
        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_head = copy.deepcopy(self.head)
        for p in self._key_params():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _key_params(self):
        return [*self.key_backbone.parameters(), *self.key_head.parameters()]

    def _query_params(self):
        return [*self.backbone.parameters(), *self.head.parameters()]

    @torch.no_grad()
    def momentum_update(self, progress: float = 0.0) -> None:
        """key <- m * key + (1 - m) * query (constant m; ``progress`` is unused, kept for BYOL's API)."""
        torch._foreach_lerp_(self._key_params(), self._query_params(), 1.0 - self.momentum)

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        k = self.queue.shape[0]
        keys = keys[-k:].to(self.queue.dtype)
        ptr = int(self.queue_ptr)
        idx = (ptr + torch.arange(len(keys), device=keys.device)) % k
        self.queue[idx] = keys
        self.queue_ptr.fill_((ptr + len(keys)) % k)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if views.dim() != 5 or views.shape[1] < 2:
            raise ValueError(f"MoCo expects views [B, 2, 3, H, W], got {tuple(views.shape)}")
        q = F.normalize(self.head(self.backbone(views[:, 0])), dim=1)
        with torch.no_grad():
            k = F.normalize(self.key_head(self.key_backbone(views[:, 1])), dim=1)
        q, k = q.float(), k.float()
        l_pos = (q * k).sum(1, keepdim=True)
        l_neg = q @ self.queue.clone().t()  # clone: the queue is updated in place below
        logits = torch.cat([l_pos, l_neg], 1) / self.temperature
        loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
        if self.training:
            self._enqueue(_gather(k))
        return loss
