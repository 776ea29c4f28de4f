"""The CPU fused device stage (kernels/cpu_ops.py) against the torch reference, same parameters."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from objloader.augment import sample_params
from objloader.augment import reference as R
from objloader.kernels.cpu_ops import apply_device_ops_cpu


def _inputs(rng, b=6, s=24, ring=3):
    views = torch.from_numpy(rng.integers(0, 256, (b, 2, 3, s, s), dtype=np.uint8))
    masks = torch.from_numpy(rng.integers(0, 256, (b, 2, 1, s, s), dtype=np.uint8))
    patches = torch.from_numpy(rng.integers(0, 256, (b + ring, 3, s // 2, s // 2), dtype=np.uint8))
    return views, masks, patches


@pytest.mark.parametrize("color, p_mix, hard", [("mocov2", 1.0, False), ("mocov2", 0.4, True), ("byol", 1.0, False),
                                                ("none", 1.0, True), ("mocov2", 0.0, False)])
@pytest.mark.parametrize("normalize, dtype", [(True, torch.float32), (True, torch.float16), (False, torch.float32)])
def test_cpu_fused_equals_reference(color, p_mix, hard, normalize, dtype):
    rng = np.random.default_rng(hash((color, p_mix, hard)) % 2**32)
    views, masks, patches = _inputs(rng)
    b = views.shape[0]
    p = sample_params(3, 1, np.arange(b) + 10, has_bg=rng.random(b) < 0.6, image_sizes=np.full((b, 2), 64),
                      p_mix=p_mix, color=color, ring_count=3)
    want = R.apply_device_ops(views, masks, patches, p, hard=hard, normalize=normalize, dtype=dtype)
    got = apply_device_ops_cpu(views, masks, patches, p, hard=hard, normalize=normalize, dtype=dtype)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    assert (got.float() - want.float()).abs().max() <= tol


def test_every_jitter_order_and_uint8_output():
    rng = np.random.default_rng(1)
    orders = np.array(list(itertools.permutations(range(4))), np.int64)  # 24 orders
    views, masks, patches = _inputs(rng, b=12, s=20, ring=0)
    p = sample_params(0, 0, np.arange(12), has_bg=np.ones(12, bool), image_sizes=np.full((12, 2), 40), p_mix=1.0)
    p = dataclasses.replace(p, jitter=np.ones((12, 2), bool), jitter_order=orders.reshape(12, 2, 4))
    want = R.apply_device_ops(views, masks, patches, p, normalize=False, dtype=torch.uint8)
    got = apply_device_ops_cpu(views, masks, patches, p, normalize=False, dtype=torch.uint8)
    assert (got.int() - want.int()).abs().max() <= 1
    float_want = R.apply_device_ops(views, masks, patches, p)
    assert (apply_device_ops_cpu(views, masks, patches, p) - float_want).abs().max() <= 1e-5


def test_no_patches_means_no_mixup():
    rng = np.random.default_rng(2)
    views, masks, _ = _inputs(rng)
    p = sample_params(0, 0, np.arange(6), image_sizes=np.full((6, 2), 64), p_mix=1.0, color="none")
    assert torch.equal(apply_device_ops_cpu(views, None, None, p, normalize=False, dtype=torch.uint8), views)


@pytest.mark.parametrize("hard", [False, True])
def test_uint8_mix_only_path_equals_reference(hard):
    """colour "none", uint8 out (the engines' raw pixels + BG-Mixup): the one-pass uint8 kernel
    gives the reference's bytes, mixed views blended, the others untouched."""
    rng = np.random.default_rng(5)
    views, masks, patches = _inputs(rng, b=8, s=20, ring=2)
    p = sample_params(0, 3, np.arange(8), has_bg=rng.random(8) < 0.7, image_sizes=np.full((8, 2), 40), p_mix=0.5,
                      color="none", ring_count=2)
    assert p.mix.any() and not p.mix.all()
    want = R.apply_device_ops(views, masks, patches, p, hard=hard, normalize=False, dtype=torch.uint8)
    got = apply_device_ops_cpu(views, masks, patches, p, hard=hard, normalize=False, dtype=torch.uint8)
    assert got.dtype == torch.uint8 and got.shape == want.shape
    assert (got.int() - want.int()).abs().max() <= 1 and (got != want).float().mean() < 0.01
    unmixed = torch.from_numpy(~(p.mix & (p.partner >= 0)))
    assert torch.equal(got[unmixed], views[unmixed])
    # reuse_views: the same bytes, written into the caller's views (no fresh batch).
    given = views.clone()
    in_place = apply_device_ops_cpu(given, masks, patches, p, hard=hard, normalize=False, dtype=torch.uint8,
                                    reuse_views=True)
    assert torch.equal(in_place, got) and torch.equal(given, got)
    assert in_place.data_ptr() == given.data_ptr()
