"""Worker processes that die with the run, and one-line descriptions of how a worker or a rank failed.

Two rules (DESIGN.md, "Runs: failures, hangs and leaks"):

* A worker process (DataLoader worker, DALI worker) ends when the process that owns it ends, even
  when that process is killed outright (kill -9, the OOM killer). DataLoader workers started from
  a forkserver are children of the forkserver, not of the run, and torch's own watchdog watches
  the forkserver; the forkserver in turn stays up while any worker holds its "alive" pipe. So a
  killed run left both behind for ever. :class:`DieWithOwner` (a ``worker_init_fn``) makes the
  worker watch its owner's pid as well as its parent.
* A dead worker or a collective that failed is reported in one line that says what happened and
  what to do, not as a traceback from deep inside torch.

Standard library and objloader.errors only, so every layer can use it.
"""
from __future__ import annotations

import ctypes
import os
import select
import signal
import threading
import time
from typing import Callable, Optional

from multiprocessing.connection import wait

from .errors import ObjloaderError, RunError

__all__ = ["exit_with_parent", "DieWithOwner", "describe_exit", "raise_if_worker_died", "dist_failure"]

_PR_SET_PDEATHSIG = 1


def exit_with_parent(sig: int = signal.SIGKILL, expected: Optional[int] = None) -> None:
    """Ask Linux to send this process ``sig`` when its parent exits (prctl PR_SET_PDEATHSIG);
    exits at once when the parent (``expected``, when given) is already gone. Elsewhere, nothing."""
    parent = os.getppid() if expected is None else expected
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent went before the request took effect
        os._exit(1)


def _watch(pid: int) -> None:
    """Block until process ``pid`` has exited (a zombie counts), then end this process."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # no pidfd (old kernel, seccomp): poll once a second
        while _alive(pid):
            time.sleep(1.0)
        os._exit(1)
    poller = select.poll()
    poller.register(fd, select.POLLIN)  # readable once the process has exited
    while not poller.poll():
        pass
    os._exit(1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: signal 0 (a zombie still answers it)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


class DieWithOwner:
    """A DataLoader ``worker_init_fn``: the worker dies with its parent (PR_SET_PDEATHSIG) and with
    the process that built the loader (a daemon thread on its pid: a forkserver child's parent is
    the forkserver), then runs ``then(worker_id)``. Built in the owning process; picklable."""

    def __init__(self, then: Optional[Callable[[int], None]] = None):
        self.owner = os.getpid()
        self.then = then

    def __call__(self, worker_id: int) -> None:
        exit_with_parent()
        if os.getppid() != self.owner:
            threading.Thread(target=_watch, args=(self.owner,), name="objloader-owner-watch", daemon=True).start()
        if self.then is not None:
            self.then(worker_id)


def describe_exit(exitcode: Optional[int]) -> str:
    """How a worker process ended (multiprocessing's exitcode: -N = killed by signal N) and the
    likely cause, in words."""
    if exitcode is None:
        return "stopped answering"
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    sig = -exitcode
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = "unknown signal"
    cause = {
        signal.SIGKILL: "most likely the kernel's OOM killer (see `dmesg`): lower --workers or --batch-size, "
                        "or give the job more memory",
        signal.SIGSEGV: "a crash in native code",
        signal.SIGBUS: "often /dev/shm too small for the shared-memory batches",
        signal.SIGTERM: "terminated from outside",
    }.get(sig, "a signal from outside")
    return f"was killed by signal {sig} ({name}; {cause})"


def raise_if_worker_died(it, who: str, error: BaseException) -> None:
    """RunError naming the dead workers of DataLoader iterator ``it`` (pid, signal, likely cause)
    when one has died, whatever ``error`` that left in the loading process (torch's "worker
    exited unexpectedly", or a reset connection while fetching a batch it had shared); otherwise
    nothing (the caller re-raises ``error``)."""
    if isinstance(error, ObjloaderError):  # already says what happened (a worker's own DatasetError)
        return
    workers = getattr(it, "_workers", None) or []  # the iterator's multiprocessing.Process objects
    if workers and all(w.exitcode is None for w in workers):
        wait([w.sentinel for w in workers], timeout=2.0)  # a death the forkserver has yet to report
    dead = [(k, w) for k, w in enumerate(workers) if w.exitcode is not None]
    if not dead:
        return
    lines = "; ".join(f"worker {k} (pid {w.pid}) {describe_exit(w.exitcode)}" for k, w in dead)
    raise RunError(f"{who}: DataLoader {lines}. The batches it was preparing are lost, so the run stops; "
                   "rerun (training: --resume) once the cause is fixed") from error


def dist_failure(e: BaseException) -> Optional[str]:
    """'timeout' or 'lost' when ``e`` is a collective that timed out or lost its peer (gloo, nccl,
    the store); None for anything else."""
    text = str(e).lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if any(s in text for s in ("connection closed by peer", "connection reset", "broken pipe",
                               "connection refused", "nccl communicator was aborted")):
        return "lost"
    return None
