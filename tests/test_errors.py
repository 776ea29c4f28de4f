"""One base for the errors objloader raises on purpose; the CLIs print those and nothing else."""
from __future__ import annotations

import pytest

from objloader.cam.masks import CamError
from objloader.cli import build as build_cli
from objloader.errors import (ConfigError, DivergedError, FileWriteError, MaskPairingError, ObjloaderError, ProbeError,
                              RunError, StageError)
from objloader.optional import MissingDependency
from objloader.sources import SourceError
from objloader.sources.demo import DemoError
from objloader.checkpoint import CheckpointError
from objloader.store import BuildError, DatasetError


@pytest.mark.parametrize("cls, builtin", [
    (SourceError, ValueError), (DatasetError, ValueError), (BuildError, RuntimeError), (CamError, RuntimeError),
    (CheckpointError, ValueError), (MaskPairingError, RuntimeError), (DemoError, RuntimeError),
    (MissingDependency, ImportError), (ConfigError, ValueError), (ProbeError, ValueError),
    (RunError, RuntimeError), (DivergedError, FloatingPointError), (StageError, ValueError), (FileWriteError, OSError)])
def test_every_deliberate_error_has_the_base_and_its_old_type(cls, builtin):
    assert issubclass(cls, ObjloaderError) and issubclass(cls, builtin)


def test_make_loader_argument_errors_are_config_errors(tmp_path):
    from objloader import make_loader

    with pytest.raises(ConfigError, match="unknown engine"):
        make_loader(str(tmp_path), "no-such-engine", batch_size=2, image_size=32)


def test_cli_prints_deliberate_errors_and_keeps_tracebacks_of_bugs(tmp_path, monkeypatch, capsys):
    src = tmp_path / "missing"
    assert build_cli.main([str(src), str(tmp_path / "out")]) == 2  # a SourceError: one line, rc 2
    err = capsys.readouterr().err
    assert err.startswith("objloader-build: error: ") and "Traceback" not in err

    def buggy(*a, **k):
        raise ValueError("a bug, not a user error")  # a plain ValueError is not caught any more

    monkeypatch.setattr(build_cli, "build", buggy)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="a bug"):
        build_cli.main([str(tmp_path / "imgs"), str(tmp_path / "out2")])


def test_training_command_prints_deliberate_errors(tmp_path, capsys):
    from objloader.cli.train import main

    assert main("moco", ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("train/moco.py: error: ") and "missing" in err and "Traceback" not in err


def test_every_error_kind_is_defined_in_errors_py():
    """DESIGN.md: the error kinds live in objloader/errors.py, so a reader finds them in one place
    and any stage can raise any of them without importing another stage."""
    import ast
    import os

    from objloader import errors

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    kinds = set(errors.__all__)
    # optional.py's MissingDependency names the pip package of a missing library: it stays with
    # the table of those packages.
    allowed = {("objloader/optional.py", "MissingDependency")}
    bad = []
    for top in ("objloader", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(repo, top)):
            for f in files:
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, repo)
                if not f.endswith(".py") or rel == "objloader/errors.py":
                    continue
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
                    if isinstance(node, ast.ClassDef) and (rel, node.name) not in allowed and any(
                            isinstance(b, ast.Name) and b.id in kinds for b in node.bases):
                        bad.append(f"{rel}:{node.lineno}: {node.name}")
    assert not bad, "error kinds defined outside objloader/errors.py:\n" + "\n".join(bad)
