"""The allowed range of every numeric setting, declared once and checked in one place.

A config dataclass (TrainConfig, CamSettings, BuildOptions, LoaderConfig) or a command without
one declares ``RANGES = {name: Range(...)}``; its ``__post_init__`` calls :func:`check_ranges`,
and the command builds each numeric flag's argparse type from the same Range (objloader/cli/args.py),
so a flag and the API refuse the same values with the same words. Ranges shared by several
stages (seed, workers, image size) live here.

Neutral layer: imports only objloader.errors (torch only inside :func:`check_device`).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

from .errors import ConfigError

__all__ = ["Range", "check_ranges", "check_device", "available_cpus", "SEED", "WORKERS", "IMAGE_SIZE", "MAX_WORKERS",
           "MAX_IMAGE_SIZE", "MASK_RES", "DIST_TIMEOUT"]


@dataclass(frozen=True)
class Range:
    """lo <= value <= hi for ``kind`` int or float (a bound excluded when ``lo_open`` / ``hi_open``).
    Both bounds are finite, so NaN and inf are always refused. ``why`` is said with the refusal."""

    kind: type
    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def contains(self, value) -> bool:
        # NaN fails every comparison, so it is outside every range
        above = value > self.lo if self.lo_open else value >= self.lo
        below = value < self.hi if self.hi_open else value <= self.hi
        return bool(above and below)

    def bounds(self) -> str:
        """'>= 1 and <= 1024', the words of every refusal."""
        return f"{'>' if self.lo_open else '>='} {self.lo} and {'<' if self.hi_open else '<='} {self.hi}"

    def limits(self) -> str:
        """'must be >= 1 and <= 1024 (why)'."""
        return f"must be {self.bounds()}{f' ({self.why})' if self.why else ''}"

    def is_type(self, value) -> bool:
        """An int (not a bool) for kind int; any real number for kind float."""
        import numbers

        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        return self.kind is float or isinstance(value, numbers.Integral)

    def check(self, name: str, value, owner: str = "", error: type = ConfigError) -> None:
        """Raise ``error`` '<owner>: <name> must be ...' unless value is of the kind and in range."""
        where = f"{owner}: " if owner else ""
        if not self.is_type(value):
            raise error(f"{where}{name} must be {'an integer' if self.kind is int else 'a number'}, got {value!r}")
        if not self.contains(value):
            raise error(f"{where}{name} {self.limits()}, got {value!r}")


def check_ranges(obj, ranges: dict, owner: str, error: type = ConfigError) -> None:
    """Check every attribute (or, for a dict, item) of ``obj`` named in ``ranges``; None means
    'not set' (a default resolved later) and is skipped."""
    for name, r in ranges.items():
        value = obj[name] if isinstance(obj, dict) else getattr(obj, name)
        if value is not None:
            r.check(name, value, owner, error)


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# Seeds: numpy's legacy seeding (the trainer seeds np.random) takes 32 bits, and MoCo's Shuffle-BN
# packs the seed into 32 bits of its generator's key; one range for trainers and loaders alike.
SEED = Range(int, 0, 2 ** 32 - 1, why="32-bit seeds")

# More than 4 workers per CPU only adds memory (each holds decoders and buffers) and context
# switches: refused, not clamped, so a value copied from a bigger machine is noticed.
MAX_WORKERS = 4 * available_cpus()
WORKERS = Range(int, 0, MAX_WORKERS, why=f"4 x the {available_cpus()} CPUs available")

# Views are float [B, V, 3, S, S]: at 1024 px a batch of 128 two-view samples is 3 GiB before the
# network, and ResNet-50 training activations are ~1.7 GB per image (21x those at 224 px), so a
# larger side fits no useful batch on one GPU (4096 px ran out of memory at batch 1 on the CPU).
MAX_IMAGE_SIZE = 1024
IMAGE_SIZE = Range(int, 16, MAX_IMAGE_SIZE, why="16: room for the blur's padding; 1024: memory")

# Stored and ContraCAM masks are uint8 [M, M]: below 4 a mask has no shape, above 1024 it is
# larger than any stored image (--max-res).
MASK_RES = Range(int, 4, 1024)

_DEVICE = re.compile(r"cpu|cuda(?::(\d+))?")


def check_device(device: Optional[str]) -> Optional[str]:
    """'cpu', 'cuda' or 'cuda:N' on a machine that has it (N < the CUDA device count); None
    (choose later) passes. Raises ConfigError naming the device and what exists."""
    if device is None:
        return None
    text = str(device)
    m = _DEVICE.fullmatch(text)
    if m is None:
        raise ConfigError(f"device must be cpu, cuda or cuda:N, got {text!r}")
    if text.startswith("cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device {text!r}: CUDA is not available on this machine; use cpu")
        if m.group(1) is not None and int(m.group(1)) >= n:
            raise ConfigError(f"device {text!r}: this machine has {n} CUDA device(s), cuda:0 to cuda:{n - 1}")
    return text


# Seconds a torchrun rank waits in a collective for the others (trainers, objloader-cam): a day at most.
DIST_TIMEOUT = Range(float, 0, 86_400, lo_open=True, why="seconds")
