"""Where this process runs: its place among torchrun's processes, its device, its process group
and its share of the machine's CPUs.

The trainers, objloader-cam and make_loader read all four from here, so that every stage of one
rank agrees on them:

* ranks: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE as torchrun sets them (0, 1, 0, 1
  outside torchrun); a value that is not an integer, or a rank outside its world, is refused.
* device: an explicit ``cpu`` or ``cuda:N`` as given (validated); ``cuda`` and no choice at all
  mean this rank's own GPU, cuda:LOCAL_RANK, when CUDA is available (else cpu), so that the
  ranks of one machine never all land on cuda:0.
* process group: nccl when the device is CUDA, gloo on the CPU, every collective bounded by the
  run's --dist-timeout; a collective that timed out or lost a peer becomes one RunError line.
* workers: the CPUs this process may use, divided among torchrun's processes on this machine.

Neutral layer: objloader.errors, procs and ranges only; torch only inside the functions, so
reading the ranks or the worker count imports no torch.
"""
from __future__ import annotations

import ctypes
import datetime
import os
from dataclasses import dataclass
from typing import Mapping, Optional

from .errors import ConfigError, ObjloaderError, RunError
from .procs import dist_failure
from .ranges import available_cpus, check_device

__all__ = ["Ranks", "ranks", "available_cpus", "default_workers", "choose_device", "backend_for",
           "join_process_group", "leave_process_group", "barrier", "group_rank_world", "raise_if_dist_failed",
           "DEFAULT_DIST_TIMEOUT"]

DEFAULT_DIST_TIMEOUT = 300.0  # seconds a rank waits in a collective for the others (--dist-timeout)


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job (the defaults: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "")
    if text.strip() == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"environment variable {name}={text!r} is not an integer (torchrun sets it; "
                          "unset it to run as a single process)") from None


def ranks(environ: Optional[Mapping[str, str]] = None) -> Ranks:
    """The ranks torchrun gave this process (``environ`` defaults to os.environ).
    LOCAL_WORLD_SIZE unset means 1: one process on this machine."""
    env = os.environ if environ is None else environ
    r = Ranks(_env_int(env, "RANK", 0), _env_int(env, "WORLD_SIZE", 1), _env_int(env, "LOCAL_RANK", 0),
              _env_int(env, "LOCAL_WORLD_SIZE", 1))
    if r.world_size < 1 or not 0 <= r.rank < r.world_size:
        raise ConfigError(f"environment: RANK={r.rank} is outside WORLD_SIZE={r.world_size} (ranks are 0 to "
                          "WORLD_SIZE - 1); start the processes with torchrun")
    if r.local_world_size < 1 or r.local_rank < 0 or ("LOCAL_WORLD_SIZE" in env and r.local_rank >= r.local_world_size):
        raise ConfigError(f"environment: LOCAL_RANK={r.local_rank} is outside LOCAL_WORLD_SIZE={r.local_world_size}; "
                          "start the processes with torchrun")
    return r


def default_workers(r: Optional[Ranks] = None) -> int:
    """Loader workers (and CPU worker processes) per process: the CPUs available to this process
    divided by the processes torchrun starts on this machine, at least 1, so that
    ``torchrun --nproc_per_node 8`` does not start 8 times as many workers as there are CPUs."""
    r = ranks() if r is None else r
    return max(1, available_cpus() // r.local_world_size)


def choose_device(device=None, r: Optional[Ranks] = None):
    """The torch.device this rank computes on. ``cpu`` and ``cuda:N`` are taken as given once
    validated (cuda:N must exist); ``cuda`` and None mean cuda:LOCAL_RANK (None falls back to cpu
    without CUDA). Raises ConfigError when LOCAL_RANK has no GPU of its own."""
    import torch

    if device is not None:
        text = str(device)
        check_device(text)
        if text != "cuda":
            return torch.device(text)
    elif not torch.cuda.is_available():
        return torch.device("cpu")
    r = ranks() if r is None else r
    n = torch.cuda.device_count()
    if r.local_rank >= n:
        raise ConfigError(f"LOCAL_RANK {r.local_rank} has no GPU of its own: this machine has {n} CUDA device(s); "
                          f"start at most {n} process(es) per machine (torchrun --nproc_per_node) or pass "
                          "the device (cpu or cuda:N)")
    return torch.device("cuda", r.local_rank)


def backend_for(device) -> str:
    """The process-group backend for tensors on ``device``: nccl on CUDA, gloo on the CPU."""
    import torch

    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def join_process_group(device, timeout: float = DEFAULT_DIST_TIMEOUT, r: Optional[Ranks] = None) -> bool:
    """Under torchrun (WORLD_SIZE > 1), make ``device`` this process's current device and join the
    process group with its backend; every collective (and the rendezvous) then waits at most
    ``timeout`` seconds, since a stopped or hung rank would otherwise stall the others for ever.
    Returns whether this call created the group (its owner destroys it: leave_process_group);
    False for a single process or when a group already exists."""
    import torch
    import torch.distributed as dist

    r = ranks() if r is None else r
    if not r.distributed or dist.is_initialized():
        return False
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend_for(device), timeout=datetime.timedelta(seconds=timeout))
    except RuntimeError as e:
        raise_if_dist_failed(r, timeout, e, "joining the process group")
        raise
    return True


# Process groups this process has left, kept referenced until it exits: destructing one can
# deadlock. ~ProcessGroupGloo joins its worker threads while the destructing thread holds the GIL,
# and a worker that has just finished a collective on Python-owned tensors needs the GIL to
# release them (5 of 120 2-rank CPU jobs hung so on a loaded machine, benchmarks/ddp_teardown.py;
# pytorch#75097). A group that is never destructed cannot deadlock there; its idle threads end
# with the process. The list itself holds one extra reference, so interpreter shutdown never
# frees it either.
_LEFT_GROUPS: list = []
ctypes.pythonapi.Py_IncRef(ctypes.py_object(_LEFT_GROUPS))


def leave_process_group(owned: bool) -> None:
    """Leave the process group when this process created it (``owned``, join_process_group's
    answer): destroy_process_group ends its use (shuts its backends down, frees the default
    group's place, so a later join_process_group starts afresh), but the group object itself is
    kept alive (_LEFT_GROUPS)."""
    if owned:
        import torch.distributed as dist

        _LEFT_GROUPS.append(dist.group.WORLD)
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank of the process group (nothing without one). nccl is told the current
    device, which join_process_group set, instead of guessing one from the rank."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def group_rank_world() -> tuple[int, int]:
    """(rank, world size) of the process group in use, (0, 1) without one: what a collective
    over the group (MoCo's key gathering) sees."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def raise_if_dist_failed(r: Ranks, timeout: float, e: BaseException, what: str = "a collective") -> None:
    """One-line RunError when ``e`` is a collective of this job that timed out or lost a peer;
    otherwise nothing (the caller re-raises ``e``)."""
    if not r.distributed or isinstance(e, ObjloaderError):
        return
    kind = dist_failure(e)
    detail = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    # gloo and nccl do not say which peer is missing; with two ranks it can only be the other one.
    who = f"rank {1 - r.rank}" if r.world_size == 2 else "one of the other ranks"
    if kind == "timeout":
        raise RunError(f"rank {r.rank} of {r.world_size}: {what} timed out after --dist-timeout {timeout:g} s: "
                       f"{who} did not answer (stopped, hung, or much slower); raise --dist-timeout if it is "
                       f"only slow [{detail}]") from e
    if kind == "lost":
        raise RunError(f"rank {r.rank} of {r.world_size}: {what} lost its connection to {who} "
                       f"(it exited or was killed: see that rank's own error) [{detail}]") from e
