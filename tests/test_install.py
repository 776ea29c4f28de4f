"""A plain (non-editable) install: the console commands work without a checkout, and defaults
that write data point under the current directory, never into site-packages."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = ["objloader-build", "objloader-cam", "objloader-demo", "objloader-viz", "objloader-train-moco",
            "objloader-train-byol", "objloader-linear", "objloader-export"]

# In the installed copy: stop the demo generation and build at their first call and report the
# paths they were asked to write, so the default can be checked without generating anything.
_PROBE = """
import sys
from objloader.cli import train as trainer

class Called(Exception):
    pass

def record(path, *a, **k):
    raise Called(path)

trainer.generate_demo = record
trainer.build = record
try:
    trainer.demo_train_path(log=lambda *a: None)
except Called as e:
    print("WRITES", e.args[0])
print("PACKAGE", trainer.__file__)
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    prefix = tmp_path_factory.mktemp("prefix")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(prefix), REPO], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    env = dict(os.environ, PYTHONPATH=str(prefix))
    return prefix, env


def test_console_commands_run_from_the_install(installed, tmp_path):
    prefix, env = installed
    for cmd in COMMANDS:
        path = prefix / "bin" / cmd
        assert path.is_file(), f"{cmd} is not installed"
        r = subprocess.run([sys.executable, str(path), "--help"], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0 and "usage:" in r.stdout, (cmd, r.stderr[-2000:])


def test_demo_data_default_is_under_the_current_directory(installed, tmp_path):
    prefix, env = installed
    r = subprocess.run([sys.executable, "-c", _PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["PACKAGE"].startswith(str(prefix))  # the installed copy, not the checkout
    assert lines["WRITES"] == os.path.join(str(tmp_path), "demo", "data")
