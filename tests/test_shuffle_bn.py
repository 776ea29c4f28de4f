"""MoCo v2 Shuffle-BN: split BatchNorm, the in-process key shuffle, the cross-rank shuffle (2 ranks
under torchrun, gloo), and that neither changes anything for a model without BatchNorm.
Tiny encoders (ResNet-18 at width 4, 16 px views) keep it fast on a CPU."""

import copy
import os
import subprocess
import sys
import textwrap

import torch
from torch import nn

from objloader.checkpoint import build_backbone
from objloader.ssl.moco import MoCo, SplitBatchNorm2d, split_batchnorm, split_groups

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _views(b, seed=0, size=16):
    return torch.randn(b, 2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _moco(**kw):
    torch.manual_seed(0)
    args = dict(width=4, queue_size=32, dim=16)
    args.update(kw)
    return MoCo(**args)


def _record_permutations(model):
    """Wrap model._permutation; returns the list every permutation it draws is appended to."""
    seen = []
    draw = model._permutation

    def recording(n, step, device):
        p = draw(n, step, device)
        seen.append(p.clone())
        return p

    model._permutation = recording
    return seen


# ---------------------------------------------------------------------------------------------
# split BatchNorm


def test_split_groups():
    assert split_groups(128, 8) == 8
    assert split_groups(12, 8) == 6  # largest divisor <= 8
    assert split_groups(4, 8) == 2  # at least two samples per group
    assert split_groups(10, 8) == 5
    assert split_groups(3, 8) == 1 and split_groups(2, 8) == 1 and split_groups(1, 8) == 1
    assert split_groups(128, 1) == 1


def test_split_bn_equals_plain_bn_on_each_group():
    torch.manual_seed(0)
    g, c = 4, 3
    x = torch.randn(12, c, 5, 5) * 3 + 1
    split = SplitBatchNorm2d(c, num_splits=g)
    with torch.no_grad():
        split.weight.uniform_(0.5, 2.0)
        split.bias.uniform_(-1.0, 1.0)
        split.running_mean.uniform_(-1, 1)
        split.running_var.uniform_(0.5, 2)
    # the same parameters and statistics in plain BatchNorm2d: the state_dicts are interchangeable
    plain = nn.BatchNorm2d(c)
    assert list(plain.state_dict()) == list(split.state_dict())
    plain.load_state_dict(split.state_dict())
    groups = [copy.deepcopy(plain) for _ in range(g)]

    xs = x.clone().requires_grad_(True)
    y = split.train()(xs)
    r = torch.randn_like(y)
    (y * r).sum().backward()
    # group j = samples j, j + G, ...: each normalised by plain BN with its own statistics
    for j, bn in enumerate(groups):
        xj = x[j::g].clone().requires_grad_(True)
        yj = bn.train()(xj)
        torch.testing.assert_close(y[j::g], yj, rtol=1e-5, atol=1e-5)
        (yj * r[j::g]).sum().backward()
        torch.testing.assert_close(xs.grad[j::g], xj.grad, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(y, plain.train()(x), atol=1e-3), "split BN normalised the batch as a whole"
    # running statistics: the average of the groups' (equal-size groups)
    torch.testing.assert_close(split.running_mean, torch.stack([b.running_mean for b in groups]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([b.running_var for b in groups]).mean(0))
    assert int(split.num_batches_tracked) == 1
    # the affine gradients are the groups' summed
    torch.testing.assert_close(split.weight.grad, sum(b.weight.grad for b in groups), rtol=1e-4, atol=1e-5)

    # eval mode: plain BatchNorm with the running statistics (no grouping)
    plain2 = nn.BatchNorm2d(c)
    plain2.load_state_dict(split.state_dict())
    split.eval(), plain2.eval()
    with torch.no_grad():
        torch.testing.assert_close(split(x), plain2(x))
        torch.testing.assert_close(split(x[:5]), plain2(x[:5]))


def test_split_backbone_state_dict_is_a_plain_backbone():
    net = split_batchnorm(build_backbone("resnet18", small_stem=True, width=8), 4)
    assert sum(isinstance(m, SplitBatchNorm2d) for m in net.modules()) == 20
    assert not any(type(m) is nn.BatchNorm2d for m in net.modules())
    x = torch.randn(8, 3, 16, 16)
    net.train()(x)  # move the running statistics
    plain = build_backbone("resnet18", small_stem=True, width=8)
    plain.load_state_dict(net.state_dict())  # strict: the same keys and shapes
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), plain.eval()(x))


# ---------------------------------------------------------------------------------------------
# MoCo, one process


def test_keys_are_normalised_in_a_shuffled_grouping():
    model = _moco(bn_splits=4).train()
    assert isinstance(model.backbone.bn1, SplitBatchNorm2d) and isinstance(model.key_backbone.bn1, SplitBatchNorm2d)
    perms = _record_permutations(model)
    x = _views(8)[:, 1]
    g = split_groups(8, 4)
    assert g == 4
    with torch.no_grad():
        k_all, k = model._keys(x)
        assert len(perms) == 1 and torch.equal(k_all, k)
        perm = perms[0]
        assert sorted(perm.tolist()) == list(range(8)) and not torch.equal(perm, torch.arange(8))
        # == the key encoder run on the permuted batch, its output un-permuted
        reference = model._encode_keys(x[perm])[torch.argsort(perm)]
        torch.testing.assert_close(k, reference, rtol=1e-5, atol=1e-6)
        # != the keys of the batch in its own order (the queries' grouping)
        unshuffled = model._encode_keys(x)
        assert (k - unshuffled).abs().max() > 1e-3, "the keys were normalised in the queries' grouping"

    # which samples shared BN statistics: a query's group is {j : j = i mod G}; its key's group is
    # that of the position the shuffle moved it to
    pos = torch.argsort(perm)
    query_group = [frozenset(j for j in range(8) if j % g == i % g) for i in range(8)]
    key_group = [frozenset(int(perm[q]) for q in range(8) if q % g == int(pos[i]) % g) for i in range(8)]
    assert all(i in key_group[i] for i in range(8))
    assert sum(query_group[i] != key_group[i] for i in range(8)) >= 4

    # the shuffle advances each training step, reproducibly from (seed, step), and is skipped in eval mode
    with torch.no_grad():
        model._keys(x)
        assert model._shuffle_step == 2 and int(model.shuffle_step) == 2 and not torch.equal(perms[0], perms[1])
        model.eval()
        model._keys(x)
    assert len(perms) == 2 and model._shuffle_step == 2
    again = _moco(bn_splits=4)
    assert torch.equal(again._permutation(8, 0, "cpu"), perms[0])
    assert torch.equal(again._permutation(8, 1, "cpu"), perms[1])


def test_shuffle_step_survives_a_state_dict_round_trip():
    model = _moco(bn_splits=4).train()
    with torch.no_grad():
        for _ in range(3):
            model(_views(8))
    fresh = _moco(bn_splits=4)
    fresh.load_state_dict(model.state_dict())
    assert fresh._shuffle_step == 3
    # a state from before Shuffle-BN (no shuffle_step) still loads, and starts at 0
    old = {k: v for k, v in model.state_dict().items() if k != "shuffle_step"}
    fresh.load_state_dict(old)
    assert fresh._shuffle_step == 0 and int(fresh.shuffle_step) == 0


def test_no_shuffle_bn_is_plain_moco():
    model = _moco(shuffle_bn=False).train()
    assert not any(isinstance(m, SplitBatchNorm2d) for m in model.modules())
    perms = _record_permutations(model)
    x = _views(8)[:, 1]
    with torch.no_grad():
        _, k = model._keys(x)
        torch.testing.assert_close(k, model._encode_keys(x))
    assert not perms


def _without_bn(module):
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, nn.Identity())
        else:
            _without_bn(child)
    return module


def test_without_batchnorm_shuffle_bn_changes_nothing():
    """No BatchNorm, no batch statistics: the keys, the loss and the queue are the same with and
    without the shuffle (so it is undone exactly)."""
    model = _moco(bn_splits=4)
    _without_bn(model.backbone), _without_bn(model.key_backbone)
    on, off = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    off.shuffle_bn = False
    perms = _record_permutations(on)
    for step in range(2):
        views = _views(8, seed=step)
        with torch.no_grad():
            loss_on, loss_off = on(views), off(views)
        assert abs(float(loss_on) - float(loss_off)) < 1e-6
        torch.testing.assert_close(on.queue, off.queue, rtol=0, atol=1e-6)
    assert len(perms) == 2 and not torch.equal(perms[0], torch.arange(8))


# ---------------------------------------------------------------------------------------------
# MoCo, two ranks (torchrun, gloo)

_DDP_SCRIPT = """
import os, sys, torch
import torch.distributed as dist
from objloader.runtime import leave_process_group
from objloader.ssl.moco import MoCo, _gather

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = MoCo(width=4, queue_size=32, dim=16, bn_splits=1, seed=7).train()  # per-rank plain BN, as the trainer
gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data

# 1. the keys: the key encoder on this rank's slice of the globally shuffled batch, gathered, un-shuffled
probe = MoCo(width=4, queue_size=32, dim=16, bn_splits=1, seed=7).train()
probe.load_state_dict(model.state_dict())
perms = []
draw = probe._permutation
probe._permutation = lambda n, s, d: perms.append(draw(n, s, d)) or perms[-1]
x = torch.randn(4, 3, 16, 16, generator=gen)
with torch.no_grad():
    k_all, k = probe._keys(x)
    perm = perms[0]
    assert sorted(perm.tolist()) == list(range(4 * world)) and not torch.equal(perm, torch.arange(4 * world))
    assert torch.equal(_gather(perm[None]), perm.repeat(world, 1)), "ranks drew different permutations"
    x_all = _gather(x)
    chunks = [probe._encode_keys(x_all[perm.view(world, -1)[r]]) for r in range(world)]
    reference = torch.cat(chunks)[torch.argsort(perm)]
    torch.testing.assert_close(k_all, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(k, reference[4 * rank:4 * (rank + 1)], rtol=1e-5, atol=1e-6)
    assert (k - probe._encode_keys(x)).abs().max() > 1e-3, "the keys were normalised with their own rank's batch"

# 2. a few DDP steps
ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
for step in range(3):
    loss = ddp(torch.randn(4, 2, 3, 16, 16, generator=gen))
    opt.zero_grad()
    loss.backward()
    opt.step()
    model.momentum_update()
assert model._shuffle_step == 3
torch.save(model.state_dict(), os.path.join(sys.argv[1], f"state{rank}.pt"))
leave_process_group(True)  # destroy_process_group alone can deadlock (see there)
"""


def test_two_ranks_shuffle_across_ranks(tmp_path):
    script = tmp_path / "ddp_shuffle.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"state{r}.pt", weights_only=True) for r in (0, 1))
    # parameters, the key encoder and the queue are the same on both ranks (BN statistics are per rank)
    shared = [k for k in a if "running_" not in k and "num_batches" not in k]
    assert "queue" in shared and "key_backbone.conv1.weight" in shared
    diff = [k for k in shared if not torch.equal(a[k], b[k])]
    assert not diff, f"ranks differ: {diff[:5]}"
    assert int(a["shuffle_step"]) == 3
