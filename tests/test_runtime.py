"""objloader.runtime: torchrun's ranks, each rank's device, the process group's backend and the
worker count, checked on the CPU by faking the environment (torchrun's variables, a machine with
CUDA devices, init_process_group)."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from objloader import runtime
from objloader.errors import ConfigError
from objloader.runtime import Ranks, choose_device, default_workers, ranks

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@pytest.fixture
def env(monkeypatch):
    """A clean environment: set(**vars) plays torchrun for this test."""
    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)

    def set_(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))
    return set_


@pytest.fixture
def gpus(monkeypatch):
    """gpus(n): this machine has n CUDA devices (set_device becomes a no-op)."""
    def fake(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    return fake


class _Joined(Exception):
    """Raised by the fake init_process_group once it has recorded its backend."""


@pytest.fixture
def joins(monkeypatch):
    """The backends init_process_group was called with (it then raises _Joined)."""
    seen = []

    def fake_init(backend, **kw):
        seen.append(backend)
        raise _Joined(backend)
    monkeypatch.setattr(dist, "init_process_group", fake_init)
    return seen


def test_ranks_come_from_torchrun_and_default_to_one_process(env):
    assert ranks() == Ranks(0, 1, 0, 1)
    env(RANK=3, WORLD_SIZE=4, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2)
    r = ranks()
    assert (r.rank, r.world_size, r.local_rank, r.local_world_size) == (3, 4, 1, 2)
    assert r.distributed and not r.main


@pytest.mark.parametrize("values, words", [
    ({"RANK": "one"}, "RANK='one' is not an integer"),
    ({"RANK": 2, "WORLD_SIZE": 2}, "RANK=2 is outside WORLD_SIZE=2"),
    ({"WORLD_SIZE": 0}, "outside WORLD_SIZE=0"),
    ({"LOCAL_RANK": 2, "LOCAL_WORLD_SIZE": 2}, "LOCAL_RANK=2 is outside LOCAL_WORLD_SIZE=2"),
])
def test_a_bad_torchrun_variable_is_one_line_naming_it(env, values, words):
    env(**values)
    with pytest.raises(ConfigError, match=words):
        ranks()


def test_workers_divide_the_cpus_among_the_local_processes(env, monkeypatch):
    monkeypatch.setattr(runtime, "available_cpus", lambda: 16)
    assert default_workers() == 16
    env(LOCAL_WORLD_SIZE=4)
    assert default_workers() == 4
    assert default_workers(Ranks(local_world_size=64)) == 1


def test_each_local_rank_gets_its_own_gpu(env, gpus):
    gpus(4)
    env(RANK=6, WORLD_SIZE=8, LOCAL_RANK=2, LOCAL_WORLD_SIZE=4)
    assert choose_device() == torch.device("cuda", 2)
    assert choose_device("cuda") == torch.device("cuda", 2)  # "cuda" is this rank's GPU, not cuda:0
    assert choose_device("cuda:1") == torch.device("cuda", 1)  # an explicit index is taken as given
    assert choose_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="cuda:7.*4 CUDA device"):
        choose_device("cuda:7")
    env(LOCAL_RANK=5, LOCAL_WORLD_SIZE=8)
    with pytest.raises(ConfigError, match="LOCAL_RANK 5 has no GPU of its own: this machine has 4"):
        choose_device()


def test_without_cuda_the_device_is_the_cpu_and_cuda_is_refused(env, gpus):
    gpus(0)
    env(LOCAL_RANK=1, LOCAL_WORLD_SIZE=2)
    assert choose_device() == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        choose_device("cuda")


def test_make_loader_puts_each_rank_on_its_own_gpu_by_default(env, gpus, monkeypatch):
    """make_loader's default device used to be "cuda" for every rank, i.e. cuda:0."""
    import objloader.loaders as loaders

    class Built(Exception):
        pass

    def capture(**kw):
        raise Built(kw["device"])
    monkeypatch.setattr(loaders, "LoaderConfig", capture)
    gpus(2)
    env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2)
    with pytest.raises(Built) as e:
        loaders.make_loader("unused", "torch", batch_size=2, image_size=32, num_workers=1)
    assert e.value.args[0] == "cuda:1"


@pytest.mark.parametrize("cuda", [True, False])
def test_the_trainer_joins_with_the_backend_of_its_device(env, gpus, joins, cuda, tmp_path):
    from objloader.ssl.trainer import TrainConfig, train

    gpus(2 if cuda else 0)
    env(RANK=1, WORLD_SIZE=2, LOCAL_RANK=1, LOCAL_WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=1)
    with pytest.raises(_Joined):
        train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), progress=False))
    assert joins == ["nccl" if cuda else "gloo"]


@pytest.mark.parametrize("cuda", [True, False])
def test_objloader_cam_joins_with_the_backend_of_its_device(env, gpus, joins, cuda, tmp_path):
    """objloader-cam used to start gloo even on CUDA: fine for its barriers, wrong for any
    collective on CUDA tensors."""
    from objloader.cam.masks import compute_masks

    gpus(2 if cuda else 0)
    env(RANK=0, WORLD_SIZE=2, LOCAL_RANK=0, LOCAL_WORLD_SIZE=2)
    with pytest.raises(_Joined):
        compute_masks([], str(tmp_path / "masks"), str(tmp_path / "missing.pt"), progress=False)
    assert joins == ["nccl" if cuda else "gloo"]


def test_one_process_joins_no_group(env, joins):
    assert runtime.join_process_group(torch.device("cpu"), 10) is False
    assert joins == [] and runtime.group_rank_world() == (0, 1)


def test_a_left_group_is_shut_down_but_never_destructed(tmp_path):
    """leave_process_group ends the group's use (a new one can be joined after it) but keeps the
    object: destructing a gloo group joins its threads under the GIL, which deadlocks when one of
    them still has to release a finished collective's Python tensors."""
    for i in range(2):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store{i}", rank=0, world_size=1)
        group = dist.group.WORLD
        x = torch.ones(3)
        dist.all_reduce(x)
        del x
        runtime.leave_process_group(True)
        assert not dist.is_initialized()
        assert any(g is group for g in runtime._LEFT_GROUPS)
