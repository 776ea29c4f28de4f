"""Build throughput of objloader-build on the demo data (records/s), median of repeats.

    python benchmarks/build_throughput.py [--data DEMO_DIR] [--repeats 3] [--workers N]

Generates the demo data at default size if --data is not given, builds each configuration
(both formats; FFCV only; WebDataset only) `--repeats` times with the configurations alternating,
and writes JSON + Markdown under benchmarks/results/ with the machine and date.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from objloader.sources.demo import generate_demo
from objloader.store import BuildOptions, build

CONFIGS = {"ffcv+wds": ("ffcv", "wds"), "ffcv": ("ffcv",), "wds": ("wds",)}


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="an objloader-demo folder (default: generate one)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="objloader-bench-")
    try:
        data = args.data
        if data is None:
            data = os.path.join(work, "demo")
            t = time.time()
            generate_demo(data)
            print(f"demo data generated in {time.time() - t:.1f} s", file=sys.stderr)
        runs = {name: [] for name in CONFIGS}
        records = None
        for r in range(args.repeats):
            for name, formats in CONFIGS.items():  # alternate configurations within the run
                out = os.path.join(work, f"out-{name}-{r}")
                t = time.perf_counter()
                m = build(data, out, BuildOptions(masks="gt"), formats=formats, workers=args.workers,
                          log=lambda *a: None)
                seconds = time.perf_counter() - t
                records = sum(d["records"] for d in m["datasets"].values())
                runs[name].append(seconds)
                print(f"repeat {r} {name}: {records} records in {seconds:.1f} s", file=sys.stderr)
                shutil.rmtree(out)
        result = {
            "benchmark": "build_throughput",
            "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "machine": machine(),
            "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True, cwd=os.path.dirname(__file__)).stdout.strip(),
            "workers": args.workers,
            "records": records,
            "repeats": args.repeats,
            "seconds": runs,
            "median_records_per_s": {n: round(records / statistics.median(s), 1) for n, s in runs.items()},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "build_throughput.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"Build throughput, demo data ({records} records, all splits), {args.workers} workers, "
             f"{result['machine']['cpu']} ({result['machine']['cores']} cores), {result['date']}, "
             f"median of {args.repeats}", "", "| formats | records/s | median s |", "|---|---:|---:|"]
    for n, s in runs.items():
        lines.append(f"| {n} | {result['median_records_per_s'][n]:.0f} | {statistics.median(s):.1f} |")
    with open(os.path.join(args.out, "build_throughput.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
