"""make_loader refuses bad arguments before any engine starts, refuses a loader that would yield
nothing, and an exception inside FFCV's loader thread reaches the consumer instead of hanging it."""
from __future__ import annotations

import os
import signal

import cv2
import numpy as np
import pytest
import torch

from objloader.errors import ConfigError
from objloader.loaders import make_loader
from objloader.store import BuildOptions, build

N = 6


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    src = tmp_path_factory.mktemp("args_src")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(src / c)
    for i in range(N):
        img = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        mask = np.zeros((40, 48), np.uint8)
        mask[10:30, 12:36] = 255
        cv2.imwrite(str(src / "ab"[i % 2] / f"{i}.png"), img)
        cv2.imwrite(str(src / "ab"[i % 2] / f"{i}.mask.png"), mask)
    out = tmp_path_factory.mktemp("args") / "ds"
    build(str(src), str(out), BuildOptions(masks="gt", max_res=64, mask_res=16), workers=1, log=lambda *a: None)
    return str(out)


BAD = [
    ({"patch_size": -4, "bg_mixup": 1.0}, "patch_size"),
    ({"patch_size": 33}, "patch_size"),
    ({"seed": 2 ** 64}, "seed"),
    ({"seed": -1}, "seed"),
    ({"seed": 1.5}, "seed must be an integer"),
    ({"batch_size": 2.0}, "batch_size must be an integer"),
    ({"oa_crop": "yes"}, "oa_crop must be True or False"),
    ({"ring_size": 0}, "ring_size"),
    ({"world_size": 0}, "rank 0 outside world_size 0|world_size"),
    ({"dtype": torch.int32}, "dtype"),
    ({"device": "gpu:x"}, "device"),
    ({"bg_mixup": 1.5}, "bg_mixup"),
]


@pytest.mark.parametrize("engine", ["torch", "ffcv", "dali"])
@pytest.mark.parametrize("kwargs, message", BAD, ids=[m.split()[0] for _, m in BAD])
def test_bad_arguments_are_refused_before_the_engine_starts(small, engine, kwargs, message):
    args = {"batch_size": 2, "image_size": 32, "num_workers": 1, **kwargs}
    with pytest.raises(ConfigError, match=message):
        make_loader(small, engine, **args)


@pytest.mark.parametrize("engine", ["torch", "ffcv", "dali"])
def test_a_loader_with_nothing_to_yield_is_refused(small, engine):
    # 6 records over 2 ranks: 3 per rank, fewer than a batch of 4 with drop_last
    with pytest.raises(ConfigError, match="3 per rank.*fewer than batch_size 4"):
        make_loader(small, engine, batch_size=4, image_size=32, num_workers=1, rank=0, world_size=2)
    # without drop_last the same loader yields its one short batch
    loader = make_loader(small, engine, batch_size=4, image_size=32, num_workers=1, rank=0, world_size=2,
                         drop_last=False)
    assert [len(b.views) for b in loader] == [3]


class _Hang(Exception):
    pass


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's own report
def test_an_exception_in_the_ffcv_loader_thread_reaches_the_consumer(small, monkeypatch):
    from ffcv.loader.epoch_iterator import EpochIterator

    def broken(self, *a, **k):
        raise ValueError("a record the pipeline cannot decode")

    monkeypatch.setattr(EpochIterator, "run_pipeline", broken)
    loader = make_loader(small, "ffcv", batch_size=2, image_size=32, num_workers=1)

    def on_alarm(*_):
        raise _Hang("the consumer still waits for the dead thread's batches")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(60)
    try:
        with pytest.raises(RuntimeError, match="FFCV loader thread stopped"):
            next(iter(loader))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_one_spelling_at_the_api_boundary_and_the_old_one_still_works():
    """normalize / color / grayscale (torchvision's) from make_loader down to the kernels; the
    older normalise= and gray_p= still work, with a DeprecationWarning, and give the same result."""
    import dataclasses
    import inspect

    from objloader.augment import ColorConfig, apply_device_ops, sample_params
    from objloader.kernels.cpu_ops import apply_device_ops_cpu
    from objloader.kernels.device_ops import apply_device_ops_fused
    from objloader.loaders import LoaderConfig

    assert {"normalize", "color"} <= set(inspect.signature(make_loader).parameters)
    assert {"normalize", "color"} <= {f.name for f in dataclasses.fields(LoaderConfig)}
    impls = (apply_device_ops, apply_device_ops_cpu, apply_device_ops_fused)
    signatures = [list(inspect.signature(f).parameters) for f in impls]
    assert all(s == signatures[0] for s in signatures) and "normalize" in signatures[0]

    rng = np.random.default_rng(0)
    views = torch.from_numpy(rng.integers(0, 256, (2, 2, 3, 8, 8), dtype=np.uint8))
    params = sample_params(0, 0, np.arange(2), image_sizes=np.full((2, 2), 8), views=2, color="mocov2")
    for fn in impls[:2]:
        want = fn(views, None, None, params, normalize=False)
        with pytest.warns(DeprecationWarning, match=r"normalise=\) is deprecated; pass normalize="):
            assert torch.equal(fn(views, None, None, params, normalise=False), want)
        with pytest.raises(TypeError, match="both normalise= and normalize="):
            fn(views, None, None, params, normalise=False, normalize=False)

    with pytest.warns(DeprecationWarning, match="gray_p"):
        old = ColorConfig(gray_p=0.7)
    assert old == ColorConfig(grayscale_p=0.7)
    with pytest.warns(DeprecationWarning, match="grayscale_p"):
        assert old.gray_p == 0.7
