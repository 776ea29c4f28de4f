"""MoCo v2 (Chen et al. 2020, "Improved Baselines with Momentum Contrastive Learning").

Query encoder = backbone + 2-layer MLP head; key encoder = its momentum copy (m = 0.999);
a queue of past keys serves as negatives; InfoNCE with temperature 0.2 (MoCo eq. 1). Keys are
gathered across ranks before they enter the queue, so every rank holds the same queue.

Shuffle-BN (MoCo Sec. 3.3, on by default, ``shuffle_bn=False`` turns it off). BatchNorm computes
its statistics over a batch, so a query could find its positive key through statistics the two
share rather than through content ("cheating" via intra-batch communication). The keys are
therefore normalised in another grouping of the batch than the queries:

* Several ranks (DDP, world size > 1): the standard batch shuffle. The key views of all ranks
  are all-gathered, permuted by one permutation identical on every rank (drawn from a generator
  seeded by (seed, shuffle step), so no broadcast is needed), each rank runs the key encoder on
  its slice of the permuted batch, and the keys are all-gathered and un-permuted. Each rank's
  ordinary per-rank BatchNorm is the grouping; the trainer builds the model with
  ``bn_splits=1`` (plain BatchNorm) then, as the MoCo ImageNet code does.
* One process: split BatchNorm (as in the MoCo CIFAR demo). Every BatchNorm2d of both encoders
  becomes a :class:`SplitBatchNorm2d` normalising G groups of B / G samples (sample i is in
  group i mod G) with their own statistics, and the key batch is permuted before the key encoder
  and un-permuted after it, so a key is normalised among other samples than its query. G is the
  largest divisor of the batch <= ``bn_splits`` (default 8) that leaves >= 2 samples per group
  (:func:`split_groups`): 8 groups for the usual batch sizes; 1 (plain BN, nothing to shuffle;
  warned once) when there is no such divisor, e.g. for a prime batch size.
  In eval mode SplitBatchNorm2d is plain BatchNorm with the running statistics, and its
  state_dict keys are BatchNorm2d's, so saved backbones load into :func:`build_backbone`.

The permutation comes from its own generator, seeded by (``seed``, ``shuffle_step``), where the
step count is a buffer of the model: runs are reproducible and resume exactly, and the global
RNG is left alone.
"""

from __future__ import annotations

import copy
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..checkpoint import DEFAULT_WIDTH, build_backbone, feature_dim
from ..runtime import group_rank_world

__all__ = ["MoCo", "info_nce", "queue_size_for", "SplitBatchNorm2d", "split_batchnorm", "split_groups", "DEFAULT_BN_SPLITS"]

DEFAULT_BN_SPLITS = 8  # the MoCo CIFAR demo's number of BN groups


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


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float,
             k_bg: torch.Tensor | None = None, bg_valid: torch.Tensor | None = None) -> torch.Tensor:
    """MoCo's InfoNCE (eq. 1): query i's positive is key i, its negatives the queue's keys and,
    with ``k_bg`` [M, D], the background keys whose ``bg_valid`` is set (the others' logits are
    -inf, so they take no part). All embeddings L2-normalised; the positive is logit 0."""
    logits = [(q * k).sum(1, keepdim=True), q @ queue.t()]
    if k_bg is not None:
        l_bg = q @ k_bg.t()
        if bg_valid is not None:
            l_bg = l_bg.masked_fill(~bg_valid.view(1, -1), float("-inf"))
        logits.append(l_bg)
    logits = torch.cat(logits, 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))


def _mlp_head(d_in: int, hidden: int, d_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


def split_groups(n: int, max_splits: int) -> int:
    """Number of BN groups for a batch of ``n``: the largest divisor of n that is <= max_splits
    and leaves at least 2 samples per group (BatchNorm needs 2 values per channel), else 1."""
    for g in range(min(int(max_splits), n // 2), 1, -1):
        if n % g == 0:
            return g
    return 1


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d that, in training, normalises ``split_groups(B, num_splits)`` groups of the
    batch with their own statistics: group j holds the samples i with i mod G == j (a free
    reshape). Each group updates the running statistics as BatchNorm2d would; they are averaged
    over the groups. In eval mode (running statistics) it is plain BatchNorm2d. Parameters,
    buffers and state_dict keys are exactly BatchNorm2d's (``num_splits`` is a plain attribute)."""

    def __init__(self, num_features: int, num_splits: int = DEFAULT_BN_SPLITS, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = int(num_splits)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        use_batch_stats = self.training or self.running_mean is None
        g = split_groups(x.shape[0], self.num_splits) if use_batch_stats else 1
        if g == 1:
            return super().forward(x)
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as BatchNorm2d
                momentum = 1.0 / float(self.num_batches_tracked)
        n, c = x.shape[:2]
        track = self.training and self.running_mean is not None
        rm = self.running_mean.repeat(g) if track else None
        rv = self.running_var.repeat(g) if track else None
        w = self.weight.repeat(g) if self.weight is not None else None
        b = self.bias.repeat(g) if self.bias is not None else None
        # [B, C, ...] -> [B / G, G * C, ...]: channel block j holds the samples j, j + G, j + 2G, ...
        y = F.batch_norm(x.reshape(n // g, g * c, *x.shape[2:]), rm, rv, w, b, True, momentum, self.eps)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(rm.view(g, c).mean(0))
                self.running_var.copy_(rv.view(g, c).mean(0))
        return y.reshape(x.shape)


def split_batchnorm(module: nn.Module, num_splits: int = DEFAULT_BN_SPLITS) -> nn.Module:
    """``module`` with every BatchNorm2d replaced by a SplitBatchNorm2d that takes over its
    parameters and statistics (as SyncBatchNorm.convert_sync_batchnorm); children are replaced
    in place, and the new module is returned when ``module`` itself is a BatchNorm2d."""
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SplitBatchNorm2d):
        new = SplitBatchNorm2d(module.num_features, num_splits, eps=module.eps, momentum=module.momentum,
                               affine=module.affine, track_running_stats=module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, split_batchnorm(child, num_splits))
    return module


@torch.no_grad()
def _gather(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, in rank order (no gradient: keys are targets)."""
    world = group_rank_world()[1]
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


class MoCo(nn.Module):
    """``forward(views [B, 2, 3, H, W]) -> loss``: view 0 is the query, view 1 the key.

    ``shuffle_bn``: Shuffle-BN (see the module docstring); ``bn_splits``: the most BN groups per
    process (1 = plain BatchNorm, with which only a multi-rank run shuffles); ``seed`` seeds the
    shuffle permutations.
    """

    def __init__(self, arch: str = "resnet18", small_stem: bool = False, dim: int = 128,
                 hidden: int | None = None, queue_size: int = 65536, momentum: float = 0.999,
                 temperature: float = 0.2, width: int = DEFAULT_WIDTH, shuffle_bn: bool = True,
                 bn_splits: int = DEFAULT_BN_SPLITS, seed: int = 0):
        super().__init__()
        d = feature_dim(arch, width)
        hidden = hidden or d  # 2048 for ResNet-50 as in the paper; 512 for ResNet-18 (at width 64)
        self.momentum, self.temperature = float(momentum), float(temperature)
        self.shuffle_bn, self.bn_splits, self.seed = bool(shuffle_bn), int(bn_splits), int(seed)
        self.backbone = build_backbone(arch, small_stem, width)
        if self.shuffle_bn and self.bn_splits > 1:
            self.backbone = split_batchnorm(self.backbone, self.bn_splits)
        self.head = _mlp_head(d, hidden, dim)
        self.key_backbone = copy.deepcopy(self.backbone)
        self.key_head = copy.deepcopy(self.head)
        for p in self._key_params():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        # Shuffles done so far: seeds the next permutation. Kept as a buffer so that a resumed run
        # continues the sequence; mirrored by a Python int so reading it never syncs the device.
        self.register_buffer("shuffle_step", torch.zeros((), dtype=torch.long))
        self._shuffle_step = 0
        self._warned_no_groups = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "shuffle_step"
        had = key in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not had and key in missing_keys:  # a checkpoint from before Shuffle-BN: start at 0
            missing_keys.remove(key)
            self.shuffle_step.zero_()
        self._shuffle_step = int(state_dict[key]) if had else 0

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

    def _permutation(self, n: int, step: int, device: torch.device) -> torch.Tensor:
        """The shuffle of step ``step``: a permutation of range(n), the same on every rank."""
        gen = torch.Generator().manual_seed(((self.seed & 0xFFFFFFFF) << 32) | (step & 0xFFFFFFFF))
        return torch.randperm(n, generator=gen).to(device)

    def _encode_keys(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.key_head(self.key_backbone(x)), dim=1)

    @torch.no_grad()
    def _keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys of every rank's batch in rank order, this rank's keys), Shuffle-BN'd in training."""
        rank, world = group_rank_world()
        shuffle = self.shuffle_bn and self.training
        if shuffle:
            step = self._shuffle_step
            self._shuffle_step += 1
            self.shuffle_step.fill_(self._shuffle_step)
        if world > 1 and shuffle:
            x_all = _gather(x)
            if len(x_all) != world * len(x):
                raise RuntimeError("MoCo Shuffle-BN needs the same batch size on every rank")
            perm = self._permutation(len(x_all), step, x.device)
            k_all = _gather(self._encode_keys(x_all[perm.view(world, -1)[rank]]))[torch.argsort(perm)]
            return k_all, k_all.view(world, len(x), -1)[rank]
        if world == 1 and shuffle:
            if split_groups(len(x), self.bn_splits) > 1:
                perm = self._permutation(len(x), step, x.device)
                k = self._encode_keys(x[perm])[torch.argsort(perm)]
                return k, k
            if not self._warned_no_groups:
                self._warned_no_groups = True
                warnings.warn(f"MoCo Shuffle-BN: a batch of {len(x)} cannot be split into BatchNorm groups of >= 2 "
                              f"samples (bn_splits={self.bn_splits}); its keys share the queries' BN statistics",
                              stacklevel=3)
        k = self._encode_keys(x)
        return _gather(k), k

    def forward(self, views: torch.Tensor, backgrounds: torch.Tensor | None = None,
                has_bg: torch.Tensor | None = None) -> torch.Tensor:
        """InfoNCE of the first view's query against the second view's key and the queue; with
        ``backgrounds`` [B, 3, H, W] (each sample's background-only image, ``has_bg`` bool [B]
        which samples have one), also against the key encoder's embedding of every background
        of the step's global batch (background negatives after CLAD, Wang et al. 2022: not
        queued), so a query that matches a background, its own or another's, is pushed away."""
        if views.dim() != 5 or views.shape[1] < 2:
            raise ValueError(f"MoCo expects views [B, 2, 3, H, W], got {tuple(views.shape)}")
        q = F.normalize(self.head(self.backbone(views[:, 0])), dim=1)
        k_all, k = self._keys(views[:, 1])
        k_bg = valid = None
        if backgrounds is not None:
            k_bg, valid = self._background_keys(backgrounds, has_bg)
        loss = info_nce(q.float(), k.float(), self.queue.clone(), self.temperature, k_bg, valid)  # clone: enqueued below
        if self.training:
            self._enqueue(k_all)
        return loss

    @torch.no_grad()
    def _background_keys(self, backgrounds: torch.Tensor, has_bg: torch.Tensor | None):
        """(key embeddings of every rank's backgrounds, which are real), gathered in rank order."""
        valid = torch.ones(len(backgrounds), dtype=torch.bool, device=backgrounds.device) if has_bg is None else has_bg
        keys = self._encode_keys(backgrounds).float()
        return _gather(keys), _gather(valid.to(keys.device).float()) > 0.5
