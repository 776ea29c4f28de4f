"""Linear probe on frozen features: multinomial logistic regression fitted with L-BFGS.

Protocol (as the paper's linear evaluation, after Kornblith et al. 2019): standardise features
with the training statistics, fit full-batch with L-BFGS (strong-Wolfe line search) for each
weight decay of a log-spaced grid, choose the one with the best accuracy on a stratified 80/20
held-out split of the training features, refit on all training features, report test top-1.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ProbeError

__all__ = ["WD_GRID", "LinearProbe", "linear_probe", "stratified_split"]

# Half-decade steps from 1e-6 to 1e-1 (mean cross-entropy + wd/2 * ||W||^2).
WD_GRID = tuple(float(v) for v in np.logspace(-6, -1, 11))


@dataclass
class LinearProbe:
    """A fitted probe: the chosen weight decay, the sweep, test top-1, and the classifier."""

    wd: float
    val_acc: Dict[float, float]
    test_top1: Optional[float]
    weight: np.ndarray  # [D, C], acting on standardised features
    bias: np.ndarray  # [C]
    mean: np.ndarray  # [D] training-feature statistics used to standardise
    std: np.ndarray  # [D]
    num_classes: int = field(default=0)

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = (np.asarray(features, np.float64) - self.mean) / self.std
        return x @ self.weight + self.bias

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Class ids int64 [N] of features [N, D]."""
        return self.logits(features).argmax(1).astype(np.int64)

    def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
        labels = np.asarray(labels)
        if len(labels) == 0:
            return float("nan")
        return float((self.predict(features) == labels).mean())


def stratified_split(labels: np.ndarray, val_fraction: float = 0.2, seed: int = 0):
    """(train_idx, val_idx), sorted: per class a seeded shuffle, the first round(f * n) to val.
    A class with one example stays in train."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    tr, va = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = min(len(idx) - 1, max(1, int(round(val_fraction * len(idx))))) if len(idx) > 1 else 0
        va.append(idx[:n_val])
        tr.append(idx[n_val:])
    return np.sort(np.concatenate(tr)), np.sort(np.concatenate(va))


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float, max_iter: int):
    """Minimise mean CE + wd/2 ||W||^2 from zero (convex: the result does not depend on a seed)."""
    w = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, requires_grad=True)
    b = torch.zeros(num_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-7,
                            tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * wd * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _acc(w, b, x, y) -> float:
    return float(((x @ w + b).argmax(1) == y).double().mean()) if len(y) else float("nan")


def _check(features, labels, what):
    x = np.asarray(features)
    y = np.asarray(labels)
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise ProbeError(f"{what}: expected features [N, D] and labels [N], got {x.shape} and {y.shape}")
    if (y < 0).any():
        raise ProbeError(f"{what}: {int((y < 0).sum())} labels are negative (unlabelled records); "
                         "the linear probe needs a class for every example")
    if not np.isfinite(x).all():
        raise ProbeError(f"{what}: features contain NaN or inf")
    return x, y.astype(np.int64)


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: Optional[np.ndarray] = None, test_labels: Optional[np.ndarray] = None, *,
                 wd_grid: Sequence[float] = WD_GRID, val_fraction: float = 0.2, seed: int = 0,
                 num_classes: Optional[int] = None, max_iter: int = 1000) -> LinearProbe:
    """Fit the probe on training features (wd chosen on a held-out split), report test top-1."""
    xtr, ytr = _check(train_features, train_labels, "training set")
    if len(ytr) < 2:
        raise ProbeError("training set: the probe needs at least two examples")
    if not wd_grid:
        raise ProbeError("wd_grid is empty")
    c = int(num_classes if num_classes is not None else ytr.max() + 1)
    if ytr.max() >= c:
        raise ProbeError(f"training set: label {int(ytr.max())} >= num_classes {c}")
    mean = xtr.astype(np.float64).mean(0)
    std = xtr.astype(np.float64).std(0) + 1e-6  # constant features (dead units) stay finite
    x = torch.from_numpy((xtr - mean) / std)
    y = torch.from_numpy(ytr)

    tr, va = stratified_split(ytr, val_fraction, seed)
    if len(va) == 0:
        raise ProbeError("training set: no class has two examples, so there is no validation split "
                         "to choose the weight decay on")
    val_acc: Dict[float, float] = {}
    for wd in wd_grid:
        w, b = _fit(x[tr], y[tr], c, float(wd), max_iter)
        val_acc[float(wd)] = _acc(w, b, x[va], y[va])
    # Best validation accuracy; ties go to the strongest regularisation.
    best = max(val_acc.values())
    chosen = max(wd for wd, a in val_acc.items() if a == best)
    w, b = _fit(x, y, c, chosen, max_iter)
    probe = LinearProbe(wd=chosen, val_acc=val_acc, test_top1=None, weight=w.numpy(), bias=b.numpy(),
                        mean=mean, std=std, num_classes=c)
    if test_features is not None:
        xte, yte = _check(test_features, test_labels, "test set")
        probe.test_top1 = probe.accuracy(xte, yte)
    return probe
