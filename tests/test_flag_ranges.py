"""Every numeric flag of every command has a declared range, checked when the command line is
parsed: a value outside it exits with status 2 and one stderr line naming the flag, the value and
the range. The flags are read from the parsers the commands really build (every console script
of setup.py and every train/*.py script), so a new numeric flag without a range fails here.
The config dataclasses refuse the same values (one Range, objloader/ranges.py), the trainers and
make_loader share one seed range, --device is checked against the machine, and ContraCAM refuses
an input too small for its trunk's stride."""
from __future__ import annotations

import argparse
import contextlib
import glob
import importlib
import io
import os
import re
import runpy

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands() -> dict:
    """name -> a callable that runs the command's entry point with an empty command line."""
    text = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
    out = {}
    for name, module, func in re.findall(r'"([\w-]+)=([\w.]+):(\w+)"', text):
        out[name] = lambda module=module, func=func: getattr(importlib.import_module(module), func)([])
    for path in sorted(glob.glob(os.path.join(REPO, "train", "*.py"))):
        out[os.path.relpath(path, REPO)] = lambda path=path: runpy.run_path(path, run_name="__main__")
    return out


COMMANDS = _commands()


class _Parsed(Exception):
    pass


def _parser_of(name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser the command builds, caught at its parse_args call (nothing of the command runs)."""
    seen = []

    def grab(self, args=None, namespace=None):
        seen.append(self)
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        with pytest.raises(_Parsed):
            COMMANDS[name]()
    return seen[0]


def _numeric_actions(p: argparse.ArgumentParser):
    """Flags that take a number: typed int or float, typed by a Range, or with a numeric default."""
    for a in p._actions:
        if not isinstance(a, argparse._StoreAction) or not a.option_strings:
            continue
        numeric_default = isinstance(a.default, (int, float)) and not isinstance(a.default, bool)
        if a.type in (int, float) or hasattr(a.type, "range") or (a.type is None and numeric_default):
            yield a


def _unranged(p: argparse.ArgumentParser) -> list:
    return [a.option_strings[-1] for a in _numeric_actions(p) if not hasattr(a.type, "range")]


def _outside(r) -> list:
    """Values just outside the range: below its minimum and above its maximum (plus NaN for floats)."""
    step = 1 if r.kind is int else 1.0
    below = r.lo if r.lo_open else r.kind(r.lo - step)
    above = r.hi if r.hi_open else r.kind(r.hi + step)
    return [below, above] + ([float("nan")] if r.kind is float else [])


def _parse_error(p: argparse.ArgumentParser, argv: list) -> list:
    """stderr lines of a parse that must fail with status 2."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        p.parse_args(argv)
    assert e.value.code == 2, (argv, e.value.code)
    return err.getvalue().strip().splitlines()


def test_the_commands_are_found():
    assert {"objloader-build", "objloader-cam", "objloader-train-moco", "train/moco.py", "train/byol.py"} <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_numeric_flag_has_a_range_and_refuses_values_outside_it(name, monkeypatch):
    p = _parser_of(name, monkeypatch)
    assert not _unranged(p), f"{name}: numeric flags without a declared range: {_unranged(p)}"
    actions = list(_numeric_actions(p))
    for a in actions:
        flag, r = a.option_strings[-1], a.type.range
        if a.default is not None:  # the default is inside its own range
            for d in (a.default if isinstance(a.default, (list, tuple)) else [a.default]):
                assert r.contains(d), f"{name} {flag}: default {d!r} is outside {r.bounds()}"
        n = a.nargs if isinstance(a.nargs, int) else 1
        for bad in _outside(r):
            lines = _parse_error(p, [flag] + [str(bad)] * n)
            assert len(lines) == 1, (name, flag, bad, lines)
            line = lines[0]
            assert flag in line and str(bad) in line and str(r.lo) in line and str(r.hi) in line, (name, line)


def test_the_walk_catches_a_numeric_flag_without_a_range():
    from objloader.cli.args import Parser

    p = Parser(prog="x")
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--rate", default=0.5)  # a number parsed as a string
    assert _unranged(p) == ["--count", "--rate"]


# the commands that run no network (objloader-export only re-keys tensors, on the CPU) have no --device
@pytest.mark.parametrize("name", sorted(n for n in COMMANDS if not any(c in n for c in ("demo", "build", "viz", "export"))))
def test_device_is_checked_when_parsed(name, monkeypatch):
    import torch

    p = _parser_of(name, monkeypatch)
    assert "--device" in p._option_string_actions, name
    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"  # absent CUDA or index
    for bad in ("tpu", "cuda:x", missing):
        lines = _parse_error(p, ["--device", bad])
        assert len(lines) == 1 and "--device" in lines[0] and bad in lines[0], (name, bad, lines)
    assert p._option_string_actions["--device"].type("cpu") == "cpu"


def test_configs_refuse_what_the_flags_refuse():
    from objloader.cam.settings import CamSettings
    from objloader.errors import ConfigError
    from objloader.ssl.trainer import TrainConfig
    from objloader.store import BuildOptions

    for bad in (dict(ema=1.5), dict(temperature=-0.2), dict(lr=-1.0), dict(queue_size=0), dict(seed=-1),
                dict(seed=2 ** 33), dict(image_size=4096), dict(workers=10 ** 6), dict(device="tpu"),
                dict(device="cuda:99")):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig(**bad)
    for bad in (dict(mask_res=0), dict(box_margin=-1.0), dict(jpeg_quality=101)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            BuildOptions(**bad)
    for bad in (dict(image_size=8), dict(batch_size=1), dict(temperature=0.0)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            CamSettings(**bad)


def test_trainers_and_make_loader_share_one_seed_range():
    import numpy as np

    from objloader.errors import ConfigError
    from objloader.loaders import LoaderConfig
    from objloader.ssl.trainer import TrainConfig

    top = 2 ** 32 - 1  # the largest seed numpy's global seeding (the trainer's) accepts
    np.random.seed(top)
    TrainConfig(seed=top)
    LoaderConfig(batch_size=2, image_size=32, seed=top)
    for bad in (top + 1, 2 ** 33, -1):
        with pytest.raises(ConfigError, match="seed"):
            TrainConfig(seed=bad)
        with pytest.raises(ConfigError, match="seed"):
            LoaderConfig(batch_size=2, image_size=32, seed=bad)


def _standard_stem_checkpoint(path, image_size):
    import torch

    from objloader.checkpoint import CHECKPOINT_FORMAT
    from objloader.ssl.moco import MoCo

    torch.manual_seed(0)
    model = MoCo("resnet18", False, queue_size=16, width=8)
    torch.save({"format": CHECKPOINT_FORMAT, "method": "moco", "arch": "resnet18", "small_stem": False,
                "width": 8, "image_size": image_size, "backbone": model.backbone.state_dict(),
                "model": model.state_dict()}, path)


def test_contracam_refuses_an_input_too_small_for_the_trunk_stride(tmp_path):
    from objloader.cam.masks import load_contracam
    from objloader.cam.settings import CamSettings
    from objloader.errors import ConfigError

    ckpt = str(tmp_path / "ckpt.pt")
    _standard_stem_checkpoint(ckpt, image_size=16)
    # ResNet stem: stride 32, 16 with stride expansion; a CAM needs a 4 x 4 map
    with pytest.raises(ConfigError, match=r"image size 32 px \(asked for\).*stride is 16.*>= 64"):
        load_contracam(ckpt, CamSettings(image_size=32, batch_size=2))
    with pytest.raises(ConfigError, match=r"image size 32 px \(2 x the checkpoint's training size 16\)"):
        load_contracam(ckpt, CamSettings(batch_size=2))  # the default, derived from the checkpoint
    with pytest.raises(ConfigError, match=r"stride is 32.*>= 128"):
        load_contracam(ckpt, CamSettings(image_size=64, stride_expansion=False, batch_size=2))
    _, size, _ = load_contracam(ckpt, CamSettings(image_size=64, batch_size=2))
    assert size == 64
