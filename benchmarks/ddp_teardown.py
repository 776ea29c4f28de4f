"""Does a 2-rank CPU training run always end? A stress run of the DDP teardown.

    python benchmarks/ddp_teardown.py [--runs 100] [--parallel 2] [--load 2] [--timeout 100]
                                      [--method byol] [--work runs/ddp_teardown] [--results DIR]

Trains a 2-rank job like the CI test's (torchrun --nproc_per_node 2, gloo, the fidelity
benchmark's tiny demo data built with ground-truth masks, 32 px, batch 4 a rank, one epoch with
OA-Crop, BG-Mixup and the kNN monitor) ``--runs`` times,
``--parallel`` jobs at once beside ``--load`` busy-looping processes, since the hang this
measures (a rank that finished training but never exited: a process group destructed while
one of its threads waits for the GIL, objloader/runtime.py ``leave_process_group``) needs a
loaded machine to show. A job that has not ended after ``--timeout`` seconds counts as hung,
its ranks' stacks are dumped with py-spy when it is installed, and it is killed. A job that
ended keeps only its log.
Writes ddp_teardown.{json,md} to ``--results`` (benchmarks/results).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from fidelity import PROFILES, Bench, _write_json  # noqa: E402
from throughput import git_state, machine  # noqa: E402

_JOB = """
import sys
from objloader.ssl.trainer import TrainConfig, train

train(TrainConfig(method=sys.argv[3], loader="torch", data=sys.argv[2], image_size=32, batch_size=4, epochs=1,
                  workers=0, out=sys.argv[1], progress=False, save_every=0, device="cpu", oa_crop=True,
                  bg_mixup=0.4, knn_every=1, knn_bank=8, dist_timeout=60))
"""

_BUSY = "while True:\n    sum(range(10 ** 6))\n"


def _tree(pid: int) -> list:
    """``pid`` and its descendants (torchrun starts its ranks in sessions of their own, so a
    process group does not hold them)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _dump_stacks(pids: list, path: str) -> None:
    """py-spy's stacks of the job's processes (torchrun and its ranks), when py-spy is there."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.isfile(spy):
        return
    with open(path, "w", encoding="utf-8") as f:
        for pid in pids:
            f.write(f"== pid {pid}\n")
            f.flush()
            subprocess.run([spy, "dump", "--native", "--pid", str(pid)], stdout=f, stderr=subprocess.STDOUT, timeout=60)


def _kill(pids: list) -> None:
    """SIGKILL each of ``pids`` (one already gone is skipped)."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--parallel", type=int, default=2, help="jobs at once")
    ap.add_argument("--load", type=int, default=2, help="busy-looping processes beside them")
    ap.add_argument("--timeout", type=float, default=100.0, help="seconds after which a job counts as hung")
    ap.add_argument("--method", default="byol", choices=("byol", "moco"))
    ap.add_argument("--work", default=os.path.join(REPO, "runs", "ddp_teardown"))
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    if args.runs < 1 or args.parallel < 1 or args.load < 0:
        ap.error("--runs and --parallel at least 1, --load at least 0")

    bench = Bench(os.path.join(args.work, "data"), PROFILES["tiny"], log=lambda m: print(m, flush=True))
    bench.ensure_data()
    data = os.path.join(bench.built, "train")  # its labelled val split beside it feeds the kNN monitor
    from objloader.store.reader import read_manifest

    records = read_manifest(data)["counts"]["records"]
    script = os.path.join(args.work, "job.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(_JOB))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    busy = [subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(args.load)]
    results, running, started = [], {}, 0
    try:
        while len(results) < args.runs:
            while len(running) < args.parallel and started < args.runs:
                out = os.path.join(args.work, "jobs", str(started))
                shutil.rmtree(out, ignore_errors=True)
                os.makedirs(out)
                log = open(os.path.join(out, "log.txt"), "w", encoding="utf-8")
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       script, os.path.join(out, "run"), data, args.method]
                job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
                running[started] = (job, time.perf_counter(), log, out)
                started += 1
            time.sleep(0.5)
            for i, (job, t0, log, out) in list(running.items()):
                seconds = time.perf_counter() - t0
                if job.poll() is None and seconds < args.timeout:
                    continue
                hung = job.poll() is None
                if hung:
                    pids = _tree(job.pid)
                    _dump_stacks(pids, os.path.join(out, "stacks.txt"))
                    _kill(pids)
                    job.wait()
                log.close()
                del running[i]
                if not hung and job.returncode == 0:  # its checkpoint (~180 MB) proves nothing more
                    shutil.rmtree(os.path.join(out, "run"), ignore_errors=True)
                results.append({"job": i, "seconds": round(seconds, 1), "rc": job.returncode, "hung": hung})
                print(f"job {i}: {'HUNG' if hung else f'rc {job.returncode}'} after {seconds:.1f} s "
                      f"({len(results)}/{args.runs})", flush=True)
    finally:
        for p in busy:
            p.kill()
        for job, *_ in running.values():
            _kill(_tree(job.pid))

    hung = [r for r in results if r["hung"]]
    failed = [r for r in results if not r["hung"] and r["rc"] != 0]
    ended = [r["seconds"] for r in results if not r["hung"]]
    doc = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_state(), "command": " ".join(["python", "benchmarks/ddp_teardown.py", *(argv or sys.argv[1:])]),
           "settings": {k: getattr(args, k) for k in ("runs", "parallel", "load", "timeout", "method")},
           "records": records, "image_size": 32, "hung": len(hung), "failed": len(failed),
           "median_seconds": statistics.median(ended) if ended else None, "jobs": results}
    os.makedirs(args.results, exist_ok=True)
    _write_json(os.path.join(args.results, "ddp_teardown.json"), doc)
    m = doc["machine"]
    with open(os.path.join(args.results, "ddp_teardown.md"), "w", encoding="utf-8") as f:
        f.write(f"# DDP teardown stress: {len(hung)} of {len(results)} jobs hung, {len(failed)} failed\n\n"
                f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), {doc['date']}, commit {doc['commit']['commit']}"
                + (" + uncommitted changes" if doc["commit"]["uncommitted"] else "") + ".\n"
                f"`{doc['command']}`: 2-rank gloo {args.method} jobs on {records} records at 32 px, {args.parallel} at a time "
                f"beside {args.load} busy processes; hung = not ended after {args.timeout:g} s. Median time of a job "
                f"that ended: {doc['median_seconds']} s.\n")
    print(f"{len(hung)} of {len(results)} jobs hung, {len(failed)} failed; {os.path.join(args.results, 'ddp_teardown.md')}")
    return 1 if hung or failed else 0


if __name__ == "__main__":
    sys.exit(main())
