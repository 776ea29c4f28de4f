"""Traversal order (DESIGN.md): every engine visits the same uniformly shuffled permutation for a
given (seed, epoch), split by rank into shards of equal length, so batch-mates, resume and DDP
step counts do not depend on the engine.

The dataset is class-sorted (ImageFolder orders records by class) and larger than the 1024-record
shuffle buffer DALI's readers.webdataset uses, so a buffer shuffle shows up as batches dominated
by one or two classes; its size is odd, so two ranks need padding.
"""

import os
import re

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from objloader.errors import ConfigError
from objloader.loaders import batches_per_epoch, epoch_order, make_loader, per_rank
from objloader.store import BuildOptions, build

ENGINES = ["torch", "ffcv", "dali"]
CLASSES = 4
N_RECORDS = 4 * 512 - 1  # odd: world_size 2 pads rank 1 by one record
BATCH = 128
SEED = 5


@pytest.fixture(scope="module")
def sorted_data(tmp_path_factory):
    """N_RECORDS 16 px noise images in CLASSES folders: record i has label i // 512."""
    src = tmp_path_factory.mktemp("sorted_src")
    rng = np.random.default_rng(0)
    for i in range(N_RECORDS):
        folder = src / f"c{i // 512}"
        os.makedirs(folder, exist_ok=True)
        cv2.imwrite(str(folder / f"{i:04d}.png"), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    out = tmp_path_factory.mktemp("sorted") / "ds"
    build(str(src), str(out), BuildOptions(masks="none", max_res=16, mask_res=8), workers=1, log=lambda *a: None)
    return str(out)


def _loader(path, engine, **kw):
    # oa_crop off: a --masks none dataset has no boxes, and make_loader refuses OA-Crop on it.
    args = dict(batch_size=BATCH, image_size=16, views=2, oa_crop=False, color="none", normalize=False,
                dtype=torch.uint8, return_masks=True, num_workers=1, seed=SEED, shuffle=True, drop_last=False)
    args.update(kw)
    return make_loader(path, engine, **args)


def _order(rank=0, world_size=1, epoch=1):
    return epoch_order(N_RECORDS, seed=SEED, epoch=epoch, shuffle=True, rank=rank, world_size=world_size)


@pytest.fixture(scope="module")
def epoch_batches(sorted_data):
    """(engine, rank, world_size) -> (index, labels) per batch of epoch 1, each computed once."""
    cache = {}

    def get(engine, rank=0, world_size=1):
        key = (engine, rank, world_size)
        if key not in cache:
            loader = _loader(sorted_data, engine, rank=rank, world_size=world_size, views=1, return_masks=False)
            loader.set_epoch(1)
            cache[key] = [(b.index.numpy().copy(), b.labels.cpu().numpy().copy()) for b in loader]
        return cache[key]

    return get


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("engine", ENGINES)
def test_order_is_the_epoch_order(epoch_batches, engine, world_size):
    """Each rank's records, batch by batch, are its slice of epoch_order; labels follow them."""
    labels = np.arange(N_RECORDS) // 512
    for rank in range(world_size):
        batches = epoch_batches(engine, rank, world_size)
        order = _order(rank, world_size)
        assert [len(i) for i, _ in batches] == [len(order[k:k + BATCH]) for k in range(0, len(order), BATCH)]
        assert np.array_equal(np.concatenate([i for i, _ in batches]), order)
        assert all(np.array_equal(lab, labels[i]) for i, lab in batches)


@pytest.mark.parametrize("world_size", [1, 2])
def test_engines_visit_the_same_order(epoch_batches, world_size):
    for rank in range(world_size):
        ref = np.concatenate([i for i, _ in epoch_batches("torch", rank, world_size)])
        for engine in ("ffcv", "dali"):
            assert np.array_equal(np.concatenate([i for i, _ in epoch_batches(engine, rank, world_size)]), ref)


@pytest.mark.parametrize("engine", ENGINES)
def test_batches_mix_the_classes_of_a_sorted_dataset(epoch_batches, engine):
    """Uniform shuffle: a class's share of a batch is (hypergeometric) at most sqrt(p(1-p)/B) from
    p = 1/C in standard deviation; 4 of them is never reached here. A shuffle buffer smaller than
    the dataset holds about two of the four classes at a time: shares near 1/2."""
    p = 1 / CLASSES
    for k, (_, labels) in enumerate(epoch_batches(engine)):
        share = np.bincount(labels, minlength=CLASSES).max() / len(labels)
        assert share <= p + 4 * np.sqrt(p * (1 - p) / len(labels)), (engine, k, share)


def _batches(loader):
    return [(b.index.clone(), b.views.clone(), b.masks.clone()) for b in loader]


@pytest.mark.parametrize("engine", ENGINES)
def test_resume_mid_epoch_replays_the_uninterrupted_run(sorted_data, engine):
    """A fresh loader at epoch e that skips k batches yields batches k.. of the uninterrupted run's
    epoch e, pixel for pixel, and then epoch e + 1."""
    e, k = 2, 5
    straight = _loader(sorted_data, engine)
    straight.set_epoch(0)
    run = [_batches(straight) for _ in range(e + 2)]  # epochs 0 .. e + 1, one after the other
    resumed = _loader(sorted_data, engine)
    resumed.set_epoch(e)
    rest = _batches(resumed)[k:]
    following = _batches(resumed)
    assert len(rest) == len(run[e]) - k and len(following) == len(run[e + 1])
    for got, expected in zip(rest + following, run[e][k:] + run[e + 1]):
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    assert np.array_equal(torch.cat([b[0] for b in run[e]]).numpy(), _order(epoch=e))
    assert np.array_equal(torch.cat([b[0] for b in following]).numpy(), _order(epoch=e + 1))


def test_an_epoch_left_mid_way_starts_again_from_its_first_batch(sorted_data):
    loader = _loader(sorted_data, "dali", views=1, return_masks=False)
    loader.set_epoch(3)
    for k, _ in enumerate(loader):
        if k == 2:
            break
    loader.set_epoch(3)
    assert np.array_equal(torch.cat([b.index for b in loader]).numpy(), _order(epoch=3))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("batch_size, drop_last", [(64, True), (100, False), (1023, False), (2048, True)])
def test_every_rank_has_as_many_batches(sorted_data, world_size, batch_size, drop_last):
    """N_RECORDS % 2 == N_RECORDS % 3 == 1: every rank still gets ceil(N / world_size) records
    (epoch_order pads), hence as many batches as the torch engine's DistributedSampler-like
    formula, in every engine and for both drop_last settings; a loader with no batch at all (a
    batch larger than a rank's records, drop_last) is refused when it is made."""
    per_rank = -(-N_RECORDS // world_size)
    expected = batches_per_epoch(per_rank, batch_size, drop_last)
    kw = dict(batch_size=batch_size, drop_last=drop_last, views=1, return_masks=False, world_size=world_size)
    for engine in ENGINES:
        if expected == 0:
            with pytest.raises(ConfigError, match="no batch would be yielded"):
                _loader(sorted_data, engine, rank=0, **kw)
            continue
        assert [len(_loader(sorted_data, engine, rank=r, **kw)) for r in range(world_size)] == \
            [expected] * world_size, engine
    if expected and world_size == 3:  # DALI took its shards by record ranges: iterate them all
        for rank in range(world_size):
            assert len(list(_loader(sorted_data, "dali", rank=rank, **kw))) == expected


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 500), world_size=st.integers(1, 9), seed=st.integers(0, 2 ** 32 - 1), shuffle=st.booleans())
def test_per_rank_is_every_ranks_share_of_the_order(n, world_size, seed, shuffle):
    """per_rank(n, world) is the fewest records per rank that cover n, and epoch_order gives every
    rank exactly that many, together covering every record (the padding wraps to the start)."""
    share = per_rank(n, world_size)
    assert share * world_size >= n > (share - 1) * world_size
    orders = [epoch_order(n, seed=seed, epoch=2, shuffle=shuffle, rank=r, world_size=world_size)
              for r in range(world_size)]
    assert [len(o) for o in orders] == [share] * world_size
    assert set(np.concatenate(orders).tolist()) == set(range(n))


def test_no_module_computes_a_ranks_share_itself():
    """One per_rank: no other module of the package divides a record count by the world size
    with its own ceiling (the four copies the loaders had)."""
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "objloader")
    ceil_by_world = re.compile(r"-\(-.*//\s*[\w.]*world")
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            if f.endswith(".py") and not path.endswith(os.path.join("loaders", "order.py")):
                with open(path, encoding="utf-8") as fh:
                    found += [f"{path}:{k}" for k, line in enumerate(fh, 1) if ceil_by_world.search(line)]
    assert not found, "use objloader.loaders.order.per_rank:\n" + "\n".join(found)
