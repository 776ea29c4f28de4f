"""The traversal order every engine shares: which records a rank visits in an epoch, in which
order, and how many batches that makes (DESIGN.md "Traversal order")."""

from __future__ import annotations

import numpy as np

__all__ = ["per_rank", "epoch_order", "batches_per_epoch"]


def per_rank(n: int, world_size: int) -> int:
    """Records each rank visits in an epoch of ``n``: ceil(n / world_size), the same for every
    rank (:func:`epoch_order` pads by wrapping), so every rank takes as many steps."""
    return -(-n // world_size)


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool, rank: int, world_size: int) -> np.ndarray:
    """The record indices this rank visits in ``epoch``, in order (every engine).

    Shuffled by a generator keyed by (seed, epoch), so every rank computes the same permutation
    and takes every world_size-th element: shards are disjoint and, together, complete. Like
    DistributedSampler, the permutation is padded by wrapping so every rank gets as many.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
    # np.resize repeats the permutation cyclically: padding by one slice of it fell short when
    # world_size > 2 n, leaving the last ranks fewer records than per_rank (and than len()).
    order = np.resize(order, per_rank(n, world_size) * world_size)
    return order[rank::world_size].astype(np.int64)


def batches_per_epoch(n_per_rank: int, batch_size: int, drop_last: bool) -> int:
    """Batches of ``batch_size`` in a rank's ``n_per_rank`` records (a partial last one unless drop_last)."""
    return n_per_rank // batch_size if drop_last else -(-n_per_rank // batch_size)
