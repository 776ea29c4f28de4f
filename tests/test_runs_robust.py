"""Runs end with one clear line, never hang and never leak processes (DESIGN.md, "Runs: failures,
hangs and leaks"): a diverging loss, a killed loader worker, a killed training process's workers,
a stopped torchrun rank. A tiny built dataset (16 records, 32 px views, batch 4) keeps it fast."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import cv2
import numpy as np
import pytest
import torch

import objloader
from objloader.errors import ObjloaderError
from objloader.store import BuildOptions, build

N_RECORDS = 16
# Subprocesses import the objloader this test imported (not whatever their working directory holds).
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(objloader.__file__)))


def _env(**kw):
    path = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **kw)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """16 scenes (a rectangle on a flat background, exact masks), built."""
    src = tmp_path_factory.mktemp("runs_src")
    rng = np.random.default_rng(5)
    for i in range(N_RECORDS):
        h, w = int(rng.integers(64, 96)), int(rng.integers(64, 96))
        img = np.empty((h, w, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3)
        mask = np.zeros((h, w), np.uint8)
        img[h // 4:h // 2, w // 4:w // 2] = rng.integers(0, 256, 3)
        mask[h // 4:h // 2, w // 4:w // 2] = 255
        d = src / ("a" if i % 2 else "b")
        d.mkdir(exist_ok=True)
        cv2.imwrite(str(d / f"{i:02d}.png"), img)
        cv2.imwrite(str(d / f"{i:02d}.mask.png"), mask)
    out = tmp_path_factory.mktemp("runs_built") / "ds"
    build(str(src), str(out), BuildOptions(masks="gt", max_res=96, mask_res=32, shard_size=8),
          workers=1, log=lambda *a: None)
    return str(out)


def _train_args(data, out, *extra):
    return ["--data", data, "--out", str(out), "--loader", "torch", "--workers", "0", "--image-size", "32",
            "--batch-size", "4", "--device", "cpu", "--no-progress", "--log-every", "1", *extra]


# ---------------------------------------------------------------------------------------------
# 1. a diverging loss


# A temperature this close to 0 (in the accepted range) overflows the logits to inf: a NaN loss.
TINY_TEMPERATURE = "1e-300"


@pytest.mark.filterwarnings("ignore:MoCo queue")
def test_diverging_run_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny, tmp_path, capsys):
    from objloader.cli.train import main

    # 2 good steps, a checkpoint after each; then resumed with a temperature that diverges at step 3
    assert main("moco", _train_args(tiny, tmp_path, "--save-every", "1", "--max-steps", "2", "--epochs", "2")) == 0
    good = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert good["step"] == 2
    capsys.readouterr()
    rc = main("moco", _train_args(tiny, tmp_path, "--save-every", "1", "--epochs", "2", "--resume",
                                  "--temperature", TINY_TEMPERATURE))
    err = capsys.readouterr().err.strip()
    assert rc == 2, err[-2000:]
    assert "Traceback" not in err and len(err.splitlines()) == 1, err[-2000:]
    assert err.startswith("train/moco.py: error: training diverged at step 3: loss nan"), err
    assert f"temperature {float(TINY_TEMPERATURE):g}" in err and "lr 0.03 per 256 images" in err
    assert "raise --temperature" in err and "(step 2) is kept" in err, err
    # the checkpoint on disk is still the good one, untouched by the diverged steps
    kept = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert kept["step"] == 2
    assert all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])


@pytest.mark.filterwarnings("ignore:MoCo queue")
def test_diverged_error_keeps_its_old_type(tiny, tmp_path):
    from objloader.ssl.trainer import TrainConfig, train

    cfg = TrainConfig(method="moco", loader="torch", data=tiny, image_size=32, batch_size=4, epochs=1, workers=0,
                      out=str(tmp_path), progress=False, save_every=0, device="cpu",
                      temperature=float(TINY_TEMPERATURE))
    with pytest.raises(FloatingPointError) as e:  # what it was before it became a deliberate error
        train(cfg)
    assert isinstance(e.value, ObjloaderError) and "no checkpoint of this run had been written" in str(e.value)
    assert "at step 1:" in str(e.value)
    assert not (tmp_path / "checkpoint.pt").exists()  # the end-of-run save never ran on a diverged state


# ---------------------------------------------------------------------------------------------
# 2. a loader worker killed (kill -9, the OOM killer)


def test_killed_torch_worker_is_one_line_naming_it(tiny):
    from objloader import make_loader

    loader = make_loader(tiny, "torch", batch_size=2, image_size=32, num_workers=2, device="cpu", color="none",
                         normalize=False, dtype=torch.uint8)
    it = iter(loader)
    next(it)
    victim = loader.engine.loader._iterator._workers[0].pid
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(ObjloaderError) as e:
        for _ in range(3):  # its batches may already be queued: the next epoch needs it at the latest
            for _ in it:
                pass
            it = iter(loader)
    msg = str(e.value)
    assert "\n" not in msg and f"pid {victim}" in msg and "signal 9 (SIGKILL" in msg and "OOM" in msg, msg
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------------------------------------
# 3. the workers of a killed process end with it

_HOLDER = """
import sys, time
from objloader import make_loader
loader = make_loader(sys.argv[1], sys.argv[2], batch_size=2, image_size=32, num_workers=2, device="cpu")
it = iter(loader)
next(it)
print("ready", flush=True)
time.sleep(600)
"""


def _marked(mark: str) -> list:
    """Live (not zombie) processes whose environment holds ``mark``."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if mark.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] != b"Z":
                    found.append(int(pid))
        except OSError:  # gone meanwhile, or not ours
            continue
    return found


@pytest.mark.parametrize("engine", ["torch", "dali"])
def test_workers_die_with_a_killed_process(tiny, tmp_path, engine):
    if engine == "dali":
        pytest.importorskip("nvidia.dali")
    mark = f"OBJLOADER_TEST_MARK={uuid.uuid4().hex}"
    env = _env(OBJLOADER_TEST_MARK=mark.split("=", 1)[1])
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, tiny, engine], cwd=str(tmp_path), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", line + proc.stderr.read()[-3000:]
        before = _marked(mark)
        assert len(before) >= 3, before  # the process and its 2 workers (and, torch, the forkserver)
        proc.kill()  # kill -9: nothing of the process runs any more
        proc.wait(10)
        deadline = time.monotonic() + 10
        while _marked(mark) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _marked(mark), f"still running after their process was killed: {_marked(mark)} of {before}"
    finally:
        proc.kill()
        for pid in _marked(mark):  # on failure, leave nothing behind
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# 4. a stopped rank: the others time out with one line

_RANK = """
import os, signal, sys, time
rank, ready = int(os.environ["RANK"]), sys.argv[1]
import objloader.ssl.trainer as trainer
from objloader.cli.train import main
open(os.path.join(ready, f"ready{rank}"), "w").close()  # imports done: the 10 s are for the run
while not all(os.path.exists(os.path.join(ready, f"ready{r}")) for r in (0, 1)):
    time.sleep(0.1)
if rank == 1:  # rank 1 stops (SIGSTOP) before its second step, as a rank stopped by a debugger or the OS
    step_once = trainer._train_step
    def stop_at_second(run, batch, step):
        if step == 1:
            open(os.path.join(ready, "stopped"), "w").close()
            os.kill(os.getpid(), signal.SIGSTOP)
        return step_once(run, batch, step)
    trainer._train_step = stop_at_second
sys.exit(main("moco", sys.argv[2:]))
"""


@pytest.mark.filterwarnings("ignore:MoCo queue")
def test_stopped_rank_times_out_the_others_with_one_line(tiny, tmp_path):
    timeout = 10
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(_RANK))
    args = _train_args(tiny, tmp_path / "run", "--dist-timeout", str(timeout), "--epochs", "2")
    procs = []
    try:
        for rank in (0, 1):
            env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path), *args], cwd=str(tmp_path), env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + 180
        while not (tmp_path / "stopped").exists() and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        t_stop = time.monotonic()
        try:
            _, err = procs[0].communicate(timeout=timeout + 60)
        except subprocess.TimeoutExpired:
            pytest.fail(f"rank 0 still waiting {timeout + 60} s after rank 1 stopped (--dist-timeout {timeout})")
        waited = time.monotonic() - t_stop
        assert (tmp_path / "stopped").exists(), err[-3000:]
        assert procs[0].returncode == 2, err[-3000:]
        last = err.strip().splitlines()[-1]
        assert "Traceback" not in err, err[-3000:]
        assert last.startswith("train/moco.py: error: rank 0 of 2: ") and f"--dist-timeout {timeout} s" in last, last
        assert "rank 1 did not answer" in last, last
        assert timeout - 1 <= waited <= timeout + 45, waited
    finally:
        for p in procs:
            p.kill()
            p.wait()
