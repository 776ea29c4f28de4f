"""BYOL (Grill et al. 2020, "Bootstrap Your Own Latent").

Online network = backbone + projector + predictor; target network = momentum copy of backbone +
projector, with tau = 1 - (1 - tau_base) * (cos(pi * k / K) + 1) / 2 rising from 0.996 to 1
(paper Sec. 3.2). Loss: 2 - 2 cos(q, z') for each view predicting the other, summed (eq. 2).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import DEFAULT_WIDTH, build_backbone, feature_dim

__all__ = ["BYOL"]


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, d_out))


class BYOL(nn.Module):
    """``forward(views [B, 2, 3, H, W]) -> loss`` (symmetric, in [0, 8])."""

    def __init__(self, arch: str = "resnet18", small_stem: bool = False, dim: int = 256,
                 hidden: int = 4096, momentum: float = 0.996, width: int = DEFAULT_WIDTH):
        super().__init__()
        self.base_momentum = float(momentum)
        self.momentum = float(momentum)  # the current tau, for logging
        self.backbone = build_backbone(arch, small_stem, width)
        self.projector = _mlp(feature_dim(arch, width), hidden, dim)
        self.predictor = _mlp(dim, hidden, dim)
        self.target_backbone = copy.deepcopy(self.backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self._target_params():
            p.requires_grad_(False)

    def _target_params(self):
        return [*self.target_backbone.parameters(), *self.target_projector.parameters()]

    def _online_params(self):
        return [*self.backbone.parameters(), *self.projector.parameters()]

    @torch.no_grad()
    def momentum_update(self, progress: float) -> None:
        """target <- tau * target + (1 - tau) * online, tau on the cosine schedule at ``progress`` in [0, 1]."""
        progress = min(max(float(progress), 0.0), 1.0)
        self.momentum = 1.0 - (1.0 - self.base_momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0
        torch._foreach_lerp_(self._target_params(), self._online_params(), 1.0 - self.momentum)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        if views.dim() != 5 or views.shape[1] < 2:
            raise ValueError(f"BYOL expects views [B, 2, 3, H, W], got {tuple(views.shape)}")
        b = views.shape[0]
        x = torch.cat([views[:, 0], views[:, 1]])  # one pass over both views
        p = self.predictor(self.projector(self.backbone(x)))
        with torch.no_grad():
            z = self.target_projector(self.target_backbone(x))
        p, z = F.normalize(p.float(), dim=1), F.normalize(z.float(), dim=1)
        z = torch.cat([z[b:], z[:b]])  # each view predicts the other view's target
        return (2 - 2 * (p * z).sum(1)).view(2, b).sum(0).mean()
