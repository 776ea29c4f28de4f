"""benchmarks/ddp_teardown.py: the process tree it dumps and kills reaches ranks that run in
sessions of their own (as torchrun starts them)."""
import importlib.util
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module():
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    spec = importlib.util.spec_from_file_location("ddp_teardown", os.path.join(REPO, "benchmarks", "ddp_teardown.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (killed, not yet reaped by its dead parent)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_tree_holds_grandchildren_in_other_sessions_and_kill_ends_them(tmp_path):
    mod = _module()
    pidfile = tmp_path / "grandchild"
    child = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "time.sleep(60)\n")])
    try:
        deadline = time.time() + 30
        while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
            time.sleep(0.05)
        grandchild = int(pidfile.read_text())
        assert os.getsid(grandchild) != os.getsid(child.pid)  # a process group kill would miss it
        tree = mod._tree(child.pid)
        assert tree[0] == child.pid and grandchild in tree
        mod._kill(tree)
        child.wait(timeout=10)
        deadline = time.time() + 10
        while _running(grandchild) and time.time() < deadline:
            time.sleep(0.05)
        assert not _running(grandchild)
    finally:
        child.kill()
