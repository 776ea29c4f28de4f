"""objloader-build when things go wrong around it: failing FFCV writer processes, two builds into
one OUT, output directories that cannot be written or replaced; and the manifest's file sizes."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import cv2
import numpy as np
import pytest

from objloader.cli.build import main as build_main
from objloader.store import BuildError, BuildOptions, build, read_manifest
from objloader.store import builder as build_module

OPTS = BuildOptions(masks="none", max_res=32, mask_res=16, shard_size=8)
QUIET = dict(log=lambda *a: None)


def _make_source(root, n=3):
    """ImageFolder with one class of n small random images: a/0.png, a/1.png, ..."""
    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "a"), exist_ok=True)
    for i in range(n):
        cv2.imwrite(os.path.join(root, "a", f"{i}.png"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    return str(root)


@pytest.fixture
def src(tmp_path):
    return _make_source(tmp_path / "src")


@pytest.fixture
def count_records(monkeypatch):
    """Counts records processed (build runs in this process with workers=1), to show a refusal
    came before any work."""
    calls = []
    real = build_module.build_record
    monkeypatch.setattr(build_module, "build_record", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _python(script: str, *args, timeout: float, **kw):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kw)


# ---------------------------------------------------------------- 1. failing FFCV writer processes

FFCV_FAILURES = """
    import json, os, signal, sys
    import numpy as np
    from objloader.store import BuildError, BuildOptions, build
    from objloader.store import builder, ffcv_writer

    src, out_root = sys.argv[1], sys.argv[2]
    opts = BuildOptions(masks="none", max_res=32, mask_res=16)
    real_record, real_item = builder.build_record, ffcv_writer._RecordTuples.__getitem__

    def float_mask(*a, **k):  # a malformed value reaching the writer
        r = real_record(*a, **k)
        if r.key == "a/1.png":
            r.mask = r.mask.astype(np.float64)
        return r

    def raising(self, i):  # any exception inside a writer process
        if i == 1:
            raise RuntimeError("simulated failure")
        return real_item(self, i)

    def killed(self, i):  # a writer process that dies without a word (OOM killer)
        if i == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_item(self, i)

    for name, workers in (("float_mask", 1), ("raising", 2), ("killed", 1)):
        builder.build_record = float_mask if name == "float_mask" else real_record
        ffcv_writer._RecordTuples.__getitem__ = {"raising": raising, "killed": killed}.get(name, real_item)
        try:
            build(src, os.path.join(out_root, name), opts, formats=["ffcv"], workers=workers, log=lambda *a: None)
            print(json.dumps([name, None]), flush=True)
        except BuildError as e:
            print(json.dumps([name, str(e)]), flush=True)
"""


def test_ffcv_writer_failures_end_the_build_with_the_record_named(src, tmp_path):
    """Each failure inside an FFCV writer process ends the build within a bounded time (ffcv's own
    writer waited forever) with a BuildError naming the record, and leaves no beton and no OUT."""
    try:
        run = _python(FFCV_FAILURES, src, tmp_path, timeout=300)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the build hung after a writer process failed; output so far:\n{e.stdout}\n{e.stderr}")
    assert run.returncode == 0, run.stderr
    results = dict(json.loads(line) for line in run.stdout.splitlines() if line.startswith("["))
    assert set(results) == {"float_mask", "raising", "killed"}, run.stdout
    # A malformed value is refused where the record is staged (a chunk stacks the arrays, which would
    # convert it), before it reaches the writer; the writer checks the same for what it is handed.
    assert "record 'a/1.png'" in results["float_mask"]
    assert "mask is float64 (16, 16), expected uint8 (16, 16)" in results["float_mask"]
    assert "record 1 ('a/1.png')" in results["raising"] and "RuntimeError: simulated failure" in results["raising"]
    assert "simulated failure" in run.stderr  # an unexpected exception keeps its traceback
    assert "killed by signal 9" in results["killed"]
    for name in results:
        out = tmp_path / name
        assert not out.exists() and not (tmp_path / f"{name}.lock").exists()
        left = sorted(os.listdir(tmp_path / f"{name}.partial"))
        assert not {"data.beton", "data.beton.tmp", "manifest.json"} & set(left), left


# ---------------------------------------------------------------- 2. one build per OUT at a time

HOLD_LOCK = """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f"{os.getpid()}\\n".encode())
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_build_into_the_same_out_is_refused(src, tmp_path, count_records):
    out = tmp_path / "ds"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD_LOCK), f"{out}.lock"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.time()
        with pytest.raises(BuildError, match=rf"another objloader-build is writing {out} \(pid {holder.pid}\)"):
            build(src, str(out), OPTS, formats=["wds"], workers=1, **QUIET)
        assert time.time() - t0 < 30  # refused at once, not after waiting for the lock
        assert count_records == [] and not (tmp_path / "ds.partial").exists()
    finally:
        holder.kill()  # as a crashed build would; its lock file stays behind
        holder.wait()
    assert (tmp_path / "ds.lock").exists()
    build(src, str(out), OPTS, formats=["wds"], workers=1, **QUIET)  # the kernel released the lock
    assert read_manifest(str(out))["counts"]["records"] == 3
    assert not (tmp_path / "ds.lock").exists()


def test_the_lock_is_held_for_the_whole_build_and_released_on_error(src, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    from objloader.store import wds_writer

    seen = []

    def second_build(*a, **k):
        try:
            build(src, str(out), OPTS, formats=["wds"], workers=1, **QUIET)
        except BuildError as e:
            seen.append(str(e))
        raise OSError(errno.ENOSPC, "simulated full disk")

    monkeypatch.setattr(wds_writer, "write_shards", second_build)
    with pytest.raises(BuildError, match="no space left on device"):  # a full disk is one line
        build(src, str(out), OPTS, formats=["wds"], workers=1, **QUIET)
    assert len(seen) == 1 and f"(pid {os.getpid()})" in seen[0]
    assert not (tmp_path / "ds.lock").exists()
    monkeypatch.undo()
    build(src, str(out), OPTS, formats=["wds"], workers=1, **QUIET)
    assert read_manifest(str(out))["counts"]["records"] == 3


BUILD_THEN_STALL = """
    import json, multiprocessing, sys, time
    from objloader.store import BuildOptions, build, wds_writer

    def stall(*a, **k):
        print(json.dumps([p.pid for p in multiprocessing.active_children()]), flush=True)
        time.sleep(600)

    wds_writer.write_shards = stall
    build(sys.argv[1], sys.argv[2], BuildOptions(masks="none", max_res=32, mask_res=16), formats=["wds"],
          workers=2, log=lambda *a: None)
"""


def test_a_killed_build_does_not_lock_out_the_next_one(src, tmp_path):
    """The record pool's processes outlive a build killed with SIGKILL for a while; they must not
    keep its lock."""
    out = tmp_path / "ds"
    stalled = subprocess.Popen([sys.executable, "-c", textwrap.dedent(BUILD_THEN_STALL), src, str(out)],
                               stdout=subprocess.PIPE, text=True)
    children = []
    try:
        children = json.loads(stalled.stdout.readline())
        assert len(children) == 2  # the record pool
        stalled.kill()
        stalled.wait()
        build(src, str(out), OPTS, formats=["wds"], workers=1, **QUIET)
        assert read_manifest(str(out))["counts"]["records"] == 3
    finally:
        if stalled.poll() is None:
            stalled.kill()
            stalled.wait()
        for pid in children:  # the pool's orphans, if they have not left by themselves
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------- 3. output directories

@pytest.mark.parametrize("overwrite", [False, True])
def test_out_that_is_a_file_is_refused_before_any_work(src, tmp_path, count_records, capsys, overwrite):
    out = tmp_path / "ds"
    out.write_text("not a dataset")
    rc = build_main([src, str(out), "--formats", "wds", "--workers", "1"] + ["--overwrite"] * overwrite)
    err = capsys.readouterr().err
    assert rc == 2 and err == f"objloader-build: error: {out} exists and is not a directory; " \
                              "remove it or choose another OUT\n"
    assert count_records == [] and out.read_text() == "not a dataset"
    assert not (tmp_path / "ds.partial").exists() and not (tmp_path / "ds.lock").exists()


def _refuse(monkeypatch, name, blocked):
    """Make os.<name>(path, ...) fail with EACCES for the paths blocked(path) picks, as a
    read-only directory would for a user that is not root (the tests run as root)."""
    real = getattr(os, name)

    def refusing(path, *a, **k):
        if blocked(os.fspath(path)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path, *a, **k)

    monkeypatch.setattr(os, name, refusing)


@pytest.mark.parametrize("what", ["parent", "new parent", "partial"])
def test_unwritable_output_location_is_refused_before_any_work(src, tmp_path, count_records, monkeypatch, what):
    parent = tmp_path / "ro"
    os.makedirs(parent)
    out = parent / "sub" / "ds" if what == "new parent" else parent / "ds"
    if what == "parent":  # nothing can be created in OUT's parent
        _refuse(monkeypatch, "open", lambda p: p.startswith(str(parent)))
        message = "cannot write beside"
    elif what == "new parent":  # OUT's missing parent cannot be made
        _refuse(monkeypatch, "makedirs", lambda p: p.startswith(str(parent)))
        message = "cannot write beside"
    else:  # OUT.partial cannot be made
        _refuse(monkeypatch, "makedirs", lambda p: p.endswith(".partial"))
        message = "cannot prepare"
    with pytest.raises(BuildError, match=f"{message} .*Permission denied"):
        build(src, str(out), OPTS, formats=["wds"], workers=1, **QUIET)
    assert count_records == []
    monkeypatch.undo()
    assert sorted(os.listdir(parent)) == []


def _immutable(path) -> bool:
    return shutil.which("chattr") is not None and subprocess.run(["chattr", "+i", str(path)],
                                                                 capture_output=True).returncode == 0


@pytest.mark.parametrize("how", ["simulated", "chattr"])
def test_immutable_out_with_overwrite_is_refused_before_any_work(src, tmp_path, count_records, monkeypatch, how):
    out = tmp_path / "ds"
    os.makedirs(out)
    (out / "old.txt").write_text("previous build")
    if how == "simulated":
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **k: False if os.fspath(p) == str(out)
                            else real_access(p, mode, **k))
    elif not _immutable(out):
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(BuildError, match=f"{out} cannot be replaced: it is read-only or immutable"):
            build(src, str(out), OPTS, formats=["wds"], workers=1, overwrite=True, **QUIET)
    finally:
        if how == "chattr":
            subprocess.run(["chattr", "-i", str(out)], check=True)
    assert count_records == [] and (out / "old.txt").read_text() == "previous build"


@pytest.mark.parametrize("refused", ["old out", "partial"])
def test_failed_replace_keeps_the_old_out_and_says_where_the_build_is(src, tmp_path, monkeypatch, refused):
    """A rename refused at the very end (the up-front check cannot foresee every one)."""
    out = tmp_path / "ds"
    os.makedirs(out)
    (out / "old.txt").write_text("previous build")
    source = str(out) if refused == "old out" else f"{out}.partial"
    _refuse(monkeypatch, "rename", lambda p: p == source)
    with pytest.raises(BuildError, match=f"the build is complete in {out}.partial but could not be moved to {out}"):
        build(src, str(out), OPTS, formats=["wds"], workers=1, overwrite=True, **QUIET)
    assert (out / "old.txt").read_text() == "previous build"  # put back when it had been moved aside
    assert (tmp_path / "ds.partial" / "manifest.json").exists()
    assert sorted(os.listdir(tmp_path)) == ["ds", "ds.partial", "src"]


def test_old_out_that_cannot_be_removed_is_a_warning_not_a_failure(src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "ds"
    os.makedirs(out)
    (out / "old.txt").write_text("previous build")
    real_rmtree = shutil.rmtree

    def rmtree(path, *a, **k):
        if os.fspath(path).startswith(f"{out}.old-"):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), os.fspath(path))
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(shutil, "rmtree", rmtree)
    rc = build_main([src, str(out), "--formats", "wds", "--workers", "1", "--overwrite", "--masks", "none"])
    printed = capsys.readouterr().out
    assert rc == 0 and f"built {out}: 3 records" in printed
    assert f"warning: could not remove {out}.old-{os.getpid()}" in printed
    assert read_manifest(str(out))["counts"]["records"] == 3 and not (out / "old.txt").exists()


# ---------------------------------------------------------------- 4. sizes in the manifest

def test_manifest_records_the_size_of_every_checksummed_file(src, tmp_path):
    out = tmp_path / "ds"
    m = build(src, str(out), OPTS, workers=1, **QUIET)
    assert set(m["sizes"]) == set(m["checksums"])
    assert {"data.beton", "shards/shard-00000.tar", "shards/shard-00000.idx"} <= set(m["sizes"])
    assert m["sizes"] == {f: os.path.getsize(out / f) for f in m["checksums"]}
    assert read_manifest(str(out))["sizes"] == m["sizes"]
