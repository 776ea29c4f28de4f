"""Loader throughput (images/s; every image yields V = 2 views) of each engine, vanilla MoCo v2
and with the object-aware ops, against a reference-style baseline (benchmarks/reference_style.py).

    python benchmarks/throughput.py [--data BUILT_SPLIT] [--engines torch,ffcv,dali,reference]
                                    [--repeats 7] [--batches 40] [--batch-size 64] [--image-size 112]
                                    [--workers N] [--quick] [--plot | --no-plot]

Runs, for each engine: the full pipeline (engine stage + CPU device stage: BG-Mixup, MoCo v2
colour, normalise) in four configurations, vanilla / +OA-Crop / +BG-Mixup / +both; the engine
stage alone (decode, crops, view masks, patches: the engine's own batches, before the device
stage) for vanilla / +both; the device stage alone on cached engine batches; and the
reference-style pipeline in the same four configurations. Writes throughput.json (every repeat,
machine, versions, command), throughput.md and throughput.png under --out.

Protocol: every loader is built once and warmed up (FFCV compiles its decoder on first use).
Then, for each repeat, every run in turn (round-robin, the order rotated by one each repeat):
``set_epoch(repeat + 1)``, one untimed batch (pipeline fill), ``--batches`` timed batches, stop,
and wait until no process of the benchmark uses CPU any more (work a loader prefetched must not
run during the next run's timing). Reported: the median over repeats, and for every repeat the
share of the machine's CPU that processes outside the benchmark took meanwhile.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the modules beside this file

from objloader.loaders import make_loader  # noqa: E402
from objloader.loaders import DeviceStage, LoaderConfig  # noqa: E402
from objloader.store.reader import open_dataset  # noqa: E402
from objloader.store.schema import MANIFEST_FILE  # noqa: E402
from build_throughput import machine as base_machine  # noqa: E402
from reference_style import ReferenceStyleLoader  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DEMO = os.path.join(REPO, "demo")  # the Makefile's DEMO_DIR
ENGINES = ("torch", "ffcv", "dali")
REFERENCE = "reference"
DEVICE = "device stage"  # the device stage alone, on cached engine batches
P_MIX = 0.4  # MoCo v2's BG-Mixup probability (paper)
CONFIGS = {  # name -> (oa_crop, bg_mixup)
    "vanilla": (False, 0.0),
    "+OA-Crop": (True, 0.0),
    "+BG-Mixup": (False, P_MIX),
    "+both": (True, P_MIX),
}
SPLIT_CONFIGS = ("vanilla", "+both")  # configurations of the engine-stage / device-stage runs
VERSIONED = ("torch", "torchvision", "ffcv", "nvidia-dali-cuda130", "numba", "numpy", "pillow",
             "opencv-python", "matplotlib")
QUICK = dict(repeats=2, batches=3, warmup=1, batch_size=16)
NORMAL = dict(repeats=7, batches=40, warmup=3, batch_size=64)


@dataclass
class Run:
    engine: str  # torch | ffcv | dali | reference | device stage
    config: str
    stage: str  # "full" | "engine" (engine stage alone) | "device" (device stage alone)
    loader: object = None
    images_per_s: list = field(default_factory=list)
    seconds: list = field(default_factory=list)
    other_cpu: list = field(default_factory=list)  # share of the machine other processes took, per repeat
    error: str | None = None

    @property
    def name(self) -> str:
        suffix = {"full": "", "engine": " [engine stage]", "device": ""}[self.stage]
        return f"{self.engine} {self.config}{suffix}"


class _EngineStage:
    """The engine stage of a loader alone: its EngineBatches, before BG-Mixup, colour, normalise."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch):
        self.loader.engine.set_epoch(epoch)

    def __iter__(self):
        yield from self.loader.engine


class _DeviceStageAlone:
    """The device stage of one configuration, fed again and again with cached engine batches."""

    def __init__(self, cfg: LoaderConfig, batches: list):
        self.stage, self.batches, self.epoch = DeviceStage(cfg), batches, 0

    def __len__(self):
        return 1 << 30

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        k = 0
        while True:
            yield self.stage(self.batches[k % len(self.batches)])
            k += 1


# --------------------------------------------------------------------------------------------
# Machine, data
# --------------------------------------------------------------------------------------------


def machine() -> dict:
    """build_throughput's machine record, plus package versions and this run's threads."""
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {**base_machine(),
            "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "torch_threads_main": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "versions": versions}


def git_state() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=REPO).stdout.rstrip("\n")  # keep " M path"

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "uncommitted": [l[3:] for l in git("status", "--porcelain", "objloader", "kernels", "benchmarks").splitlines()]}


def default_data() -> str:
    """The demo's train split; generated and built as `make demo` does when it is missing."""
    built = os.path.join(DEFAULT_DEMO, "built")
    if not os.path.isfile(os.path.join(built, "train", MANIFEST_FILE)):
        from objloader.cli import build as build_cli
        from objloader.cli import demo as demo_cli

        src = os.path.join(DEFAULT_DEMO, "data")
        if not os.path.isfile(os.path.join(src, "demo.json")):
            print(f"no demo data: objloader-demo {src}", file=sys.stderr)
            if demo_cli.main([src, "--overwrite", "--no-progress"]):
                sys.exit(f"throughput: objloader-demo {src} failed")
        print(f"no built demo: objloader-build {src} {built} --masks gt", file=sys.stderr)
        if build_cli.main([src, built, "--masks", "gt", "--overwrite"]):
            sys.exit(f"throughput: objloader-build {src} {built} failed")
    return os.path.join(built, "train")


# --------------------------------------------------------------------------------------------
# Quiescing between runs
# --------------------------------------------------------------------------------------------


def _tree_cpu_ticks() -> int:
    """CPU ticks used so far by this process (all its threads) and all its descendants (the
    torch engine's workers are grandchildren: they fork from a forkserver child)."""
    me = os.getpid()
    stats = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, utime + stime
    total = 0
    for pid, (ppid, ticks) in stats.items():
        p = pid
        while p and p != me and p in stats:  # walk up to this process, or to the root
            p = stats[p][0]
        if p == me:
            total += ticks
    return total


def _machine_busy_ticks() -> int | None:
    """CPU ticks spent by everything on the machine (user, nice, system, irq, softirq, steal)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    return sum(ticks[:3]) + sum(ticks[5:8])


def _release_ffcv_iterators() -> None:
    """Stop FFCV epoch threads left behind by a run stopped mid-epoch.

    The ffcv engine's epoch iterator is a thread that nobody closes when its consumer stops
    early: it would wait forever on its full queue, holding its buffers and page-reader threads.
    """
    try:
        from ffcv.loader.epoch_iterator import EpochIterator
    except ImportError:
        return
    for t in threading.enumerate():
        if isinstance(t, EpochIterator):
            t.terminate_event.set()
            t.join(timeout=60)
            t.close()


def _wait_idle(timeout: float = 30.0, window: float = 0.2) -> float:
    """Wait until the benchmark's processes stop using CPU (< 10 % of a core over ``window``), so
    batches a loader prefetched before it was stopped are not computed during the next run."""
    _release_ffcv_iterators()
    if not os.path.isdir("/proc"):
        time.sleep(2.0)
        return 2.0
    hz = os.sysconf("SC_CLK_TCK")
    start = time.perf_counter()
    before = _tree_cpu_ticks()
    while time.perf_counter() - start < timeout:
        time.sleep(window)
        now = _tree_cpu_ticks()
        if (now - before) / hz < 0.1 * window:
            break
        before = now
    return time.perf_counter() - start


# --------------------------------------------------------------------------------------------
# Building and timing runs
# --------------------------------------------------------------------------------------------


def _build(run: Run, args, cached: list) -> None:
    oa_crop, bg_mixup = CONFIGS[run.config]
    if run.engine == REFERENCE:
        run.loader = ReferenceStyleLoader(args.data, batch_size=args.batch_size, image_size=args.image_size,
                                          oa_crop=oa_crop, bg_mixup=bg_mixup, num_workers=args.workers,
                                          seed=args.seed)
    elif run.stage == "device":
        cfg = LoaderConfig(batch_size=args.batch_size, image_size=args.image_size, oa_crop=oa_crop,
                           bg_mixup=bg_mixup, device="cpu", seed=args.seed, num_workers=args.workers)
        run.loader = _DeviceStageAlone(cfg, cached)
    else:
        uint8 = run.stage == "engine"  # the engine stage's own output: no colour, no normalisation
        loader = make_loader(args.data, run.engine, batch_size=args.batch_size, image_size=args.image_size,
                             oa_crop=oa_crop, bg_mixup=bg_mixup, color="none" if uint8 else "mocov2",
                             normalize=not uint8, dtype=torch.uint8 if uint8 else torch.float32, device="cpu",
                             seed=args.seed, num_workers=args.workers)
        run.loader = _EngineStage(loader) if uint8 else loader


def _first_error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"


def _time_repeat(run: Run, epoch: int, batches: int, batch_size: int) -> tuple[float, float, float | None]:
    """(images/s, seconds, share of the machine's CPU other processes took meanwhile) over
    ``batches`` batches after one untimed batch of a fresh epoch."""
    loader = run.loader
    loader.set_epoch(epoch)
    it = iter(loader)
    try:
        next(it)  # pipeline fill (and DALI's restart at a new epoch): not throughput
        busy0, mine0 = _machine_busy_ticks(), _tree_cpu_ticks()
        start = time.perf_counter()
        for _ in range(batches):
            next(it)
        seconds = time.perf_counter() - start
        busy1, mine1 = _machine_busy_ticks(), _tree_cpu_ticks()
    finally:
        it.close()
    other = None
    if busy0 is not None:
        other = max(0.0, (busy1 - busy0) - (mine1 - mine0)) / os.sysconf("SC_CLK_TCK") / (seconds * (os.cpu_count() or 1))
    return batches * batch_size / seconds, seconds, other


def _warm_up(run: Run, batches: int, cached: list | None) -> None:
    run.loader.set_epoch(0)
    it = iter(run.loader)
    try:
        for k in range(batches):
            batch = next(it)
            if cached is not None and k < 4:  # engine batches for the device-stage-alone runs
                cached.append(_detached(batch))
    finally:
        it.close()


def _detached(eb):
    """A copy of an EngineBatch that owns its tensors (FFCV's alias buffers it will reuse)."""
    import dataclasses

    clone = lambda t: None if t is None else t.clone()  # noqa: E731
    return dataclasses.replace(eb, views=clone(eb.views), masks=clone(eb.masks), patches=clone(eb.patches),
                               labels=clone(eb.labels), aliased=False)


def _plan(engines: list) -> list:
    """Runs in warm-up order: torch-based loaders fork their workers before FFCV/DALI start threads."""
    runs = []
    for engine in engines:
        if engine in ENGINES:
            runs += [Run(engine, c, "full") for c in CONFIGS]
            runs += [Run(engine, c, "engine") for c in SPLIT_CONFIGS]
        else:
            runs += [Run(engine, c, "full") for c in CONFIGS]
    if any(e in ENGINES for e in engines):
        runs += [Run(DEVICE, c, "device") for c in SPLIT_CONFIGS]
    order = {"torch": 0, REFERENCE: 1, "ffcv": 2, "dali": 3, DEVICE: 4}
    return sorted(runs, key=lambda r: order[r.engine])


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _median(run: Run):
    return statistics.median(run.images_per_s) if run.images_per_s and not run.error else None


def summarise(runs: list, cores: int | None = None) -> dict:
    full = {}
    split = {}
    for r in runs:
        target = full if r.stage == "full" else split
        target.setdefault(r.engine, {})[r.config] = _median(r)
    overhead = {}
    for engine, by_config in full.items():
        base = by_config.get("vanilla")
        overhead[engine] = {c: (round((base / v - 1) * 100, 1) if base and v else None)
                            for c, v in by_config.items() if c != "vanilla"}
    ref = full.get(REFERENCE, {}).get("+both")
    speedup = {e: (round(v["+both"] / ref, 2) if ref and v.get("+both") else None)
               for e, v in full.items() if e != REFERENCE}
    # Per core: every engine keeps all of the machine's cores busy (its workers and the device
    # stage in the main process), so images/s over the cores available is what one core delivers.
    per_core = {e: {c: (round(v / cores, 1) if v and cores else None) for c, v in by_config.items()}
                for e, by_config in full.items()}
    return {"median_images_per_s": full, "median_images_per_s_split": split,
            "overhead_percent_vs_vanilla": overhead, "speedup_both_vs_reference_both": speedup,
            "cores": cores, "median_images_per_s_per_core": per_core}


def _fmt(x, spec=".0f", none="—"):
    return none if x is None else format(x, spec)


def markdown(result: dict, runs: list) -> str:
    s, m = result["settings"], result["machine"]
    summary = result["summary"]
    lines = [
        f"# Loader throughput — {s['records']} records of `{s['data']}`",
        "",
        f"{m['cpu']} ({m['cores']} cores), no GPU: device stage on the CPU; {result['date']}.",
        f"Batch {s['batch_size']}, {s['image_size']} px, V = {s['views']} views, {s['workers']} workers, "
        f"median of {s['repeats']} repeats x {s['batches']} batches (round-robin).",
        f"`{result['command']}` — {result['total_seconds']:.0f} s in all.",
        f"Other processes used {_fmt(100 * (result['other_processes_cpu'] or {}).get('share_of_capacity', 0), '.1f')} % "
        f"of the machine's CPU during the run (load average {result['load_average']['before'][0]:.2f} at the start).",
        "",
        "images/s = source images per second (each gives 2 views; views/s = 2 x images/s). "
        "Full pipeline = engine stage + device stage (BG-Mixup, MoCo v2 colour, normalise).",
        "",
        "## Full pipeline, images/s (median [min–max])",
        "",
        "| engine | " + " | ".join(CONFIGS) + " |",
        "|---|" + "---:|" * len(CONFIGS),
    ]
    by_key = {(r.engine, r.config, r.stage): r for r in runs}
    engines = [e for e in (*ENGINES, REFERENCE) if any(r.engine == e for r in runs)]
    for e in engines:
        cells = []
        for c in CONFIGS:
            r = by_key.get((e, c, "full"))
            if r is None:
                cells.append("—")
            elif r.error:
                cells.append("failed")
            else:
                cells.append(f"{_median(r):.0f} [{min(r.images_per_s):.0f}–{max(r.images_per_s):.0f}]")
        label = "reference-style" if e == REFERENCE else e
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Overhead of the object-aware ops vs the same engine's vanilla, and speedup vs the reference",
        "",
        "Overhead = extra time per image from the medians (vanilla / config - 1). "
        "Speedup = engine +both / reference-style +both.",
        "",
        "| engine | +OA-Crop | +BG-Mixup | +both | +both vs reference-style +both |",
        "|---|---:|---:|---:|---:|",
    ]
    for e in engines:
        o = summary["overhead_percent_vs_vanilla"].get(e, {})
        sp = summary["speedup_both_vs_reference_both"].get(e)
        label = "reference-style" if e == REFERENCE else e
        lines.append(f"| {label} | " + " | ".join(_fmt(o.get(c), "+.1f") + ("" if o.get(c) is None else " %")
                                                   for c in ("+OA-Crop", "+BG-Mixup", "+both"))
                     + f" | {'—' if e == REFERENCE else _fmt(sp, '.2f') + ('' if sp is None else ' x')} |")
    per_core = summary.get("median_images_per_s_per_core")
    if per_core:
        lines += [
            "",
            f"## Per core: images/s / {summary['cores']} cores (2 views per image, with view masks and "
            "patches where the ops need them)",
            "",
            "| engine | " + " | ".join(CONFIGS) + " |",
            "|---|" + "---:|" * len(CONFIGS),
        ]
        for e in engines:
            label = "reference-style" if e == REFERENCE else e
            lines.append(f"| {label} | " + " | ".join(_fmt(per_core.get(e, {}).get(c), ".1f") for c in CONFIGS) + " |")
    split = summary["median_images_per_s_split"]
    if split:
        lines += [
            "",
            "## Where the time goes, images/s (median)",
            "",
            "Engine stage alone = the engine's uint8 views, view masks and patches (decode, crops; no "
            "BG-Mixup, colour or normalisation). Device stage alone = BG-Mixup + colour + normalise "
            "in the main process on cached engine batches, no workers running.",
            "",
            "| stage | vanilla | +both |",
            "|---|---:|---:|",
        ]
        full = summary["median_images_per_s"]
        for e in engines:
            if e in split:
                lines.append(f"| {e} engine stage alone | {_fmt(split[e].get('vanilla'))} | "
                             f"{_fmt(split[e].get('+both'))} |")
        if DEVICE in split:
            lines.append(f"| device stage alone (CPU) | {_fmt(split[DEVICE].get('vanilla'))} | "
                         f"{_fmt(split[DEVICE].get('+both'))} |")
        for e in engines:
            if e in full and e != REFERENCE:
                lines.append(f"| {e} full pipeline | {_fmt(full[e].get('vanilla'))} | {_fmt(full[e].get('+both'))} |")
    disturbed = [(r.name, k, x) for r in runs for k, x in enumerate(r.other_cpu) if x is not None and x > 0.1]
    if disturbed:
        lines += ["", f"## Repeats disturbed by other processes (> 10 % of the CPU): {len(disturbed)} of "
                      f"{sum(len(r.other_cpu) for r in runs)}", ""]
        lines += [f"- {name}, repeat {k}: {x:.0%}" for name, k, x in disturbed]
    failed = [r for r in runs if r.error]
    if failed:
        lines += ["", "## Failed runs", ""] + [f"- {r.name}: {r.error}" for r in failed]
    return "\n".join(lines) + "\n"


def plot(result: dict, runs: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_key = {(r.engine, r.config, r.stage): r for r in runs if r.images_per_s and not r.error}
    engines = [e for e in (*ENGINES, REFERENCE) if any(k[0] == e and k[2] == "full" for k in by_key)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / len(CONFIGS)
    for j, c in enumerate(CONFIGS):
        xs, ys, lo, hi = [], [], [], []
        for i, e in enumerate(engines):
            r = by_key.get((e, c, "full"))
            if r is None:
                continue
            med = _median(r)
            xs.append(i + (j - (len(CONFIGS) - 1) / 2) * width)
            ys.append(med)
            lo.append(med - min(r.images_per_s))
            hi.append(max(r.images_per_s) - med)
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=c)
    ax.set_xticks(range(len(engines)), ["reference-style" if e == REFERENCE else e for e in engines])
    ax.set_ylabel("images/s (2 views each)")
    ax.set_title("Full pipeline (median, min–max)")
    ax.legend(fontsize=8)
    stages = [(e, "engine") for e in ENGINES if (e, "vanilla", "engine") in by_key] + \
             ([(DEVICE, "device")] if (DEVICE, "vanilla", "device") in by_key else [])
    for j, c in enumerate(SPLIT_CONFIGS):
        xs, ys = [], []
        for i, (e, st) in enumerate(stages):
            r = by_key.get((e, c, st))
            if r is not None:
                xs.append(i + (j - 0.5) * 0.4)
                ys.append(_median(r))
        ax2.bar(xs, ys, 0.4, label=c)
    ax2.set_xticks(range(len(stages)), [f"{e}\nengine stage" if st == "engine" else "device stage\n(CPU)"
                                        for e, st in stages])
    ax2.set_title("Stages alone (median)")
    ax2.legend(fontsize=8)
    s, m = result["settings"], result["machine"]
    fig.suptitle(f"objloader throughput: batch {s['batch_size']}, {s['image_size']} px, {s['workers']} workers, "
                 f"{m['cpu']} ({m['cores']} cores), {result['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help=f"a built dataset split (default: {DEFAULT_DEMO}/built/train, generated and built if missing)")
    p.add_argument("--engines", default=",".join((*ENGINES, REFERENCE)),
                   help="comma-separated subset of torch, ffcv, dali, reference (default: all)")
    p.add_argument("--repeats", type=int, default=None, help=f"timed repeats per run (default {NORMAL['repeats']})")
    p.add_argument("--batches", type=int, default=None,
                   help=f"timed batches per repeat (default {NORMAL['batches']})")
    p.add_argument("--warmup", type=int, default=None, help=f"warm-up batches per loader (default {NORMAL['warmup']})")
    p.add_argument("--batch-size", type=int, default=None, help=f"default {NORMAL['batch_size']}")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="engine workers/threads (default: all CPUs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()) +
                        "; results go to a temporary folder unless --out is given")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--plot", dest="plot", action="store_true", default=None,
                   help="write throughput.png (needs matplotlib; default: when matplotlib is installed)")
    g.add_argument("--no-plot", dest="plot", action="store_false")
    args = p.parse_args(argv)
    base = QUICK if args.quick else NORMAL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.out is None:
        args.out = (tempfile.mkdtemp(prefix="objloader-throughput-quick-") if args.quick
                    else os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    bad = [e for e in args.engines if e not in (*ENGINES, REFERENCE)]
    if bad or not args.engines:
        p.error(f"--engines: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join((*ENGINES, REFERENCE))}")
    if args.repeats < 1 or args.batches < 1 or args.warmup < 1 or args.workers < 1:
        p.error("--repeats, --batches, --warmup and --workers must be >= 1")
    return args


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("throughput: --plot needs matplotlib, which is not installed; "
                  "install it (.venv/bin/pip install matplotlib) or run with --no-plot", file=sys.stderr)
            return 2
    if args.data is None:
        args.data = default_data()
    elif not os.path.isfile(os.path.join(args.data, MANIFEST_FILE)):
        print(f"throughput: {args.data!r} is not a built dataset split (no manifest.json); "
              "pass e.g. demo/built/train, or build one with objloader-build", file=sys.stderr)
        return 2
    records = len(open_dataset(args.data))
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"throughput: warning: load average {load_before[0]:.2f} before the start; other work on this "
              "machine will slow every run", file=sys.stderr)

    hz = os.sysconf("SC_CLK_TCK")
    busy0, mine0, wall0 = _machine_busy_ticks(), _tree_cpu_ticks(), time.perf_counter()
    runs = _plan(args.engines)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    # Build and warm up every loader once; each is reused across repeats (FFCV compiles once).
    cached = []
    capture_from = next((r for r in runs if r.stage == "engine" and r.config == "+both"), None)
    for run in runs:
        t = time.perf_counter()
        try:
            if run.stage == "device" and not cached:
                raise RuntimeError("no engine batches were captured to feed the device stage")
            _build(run, args, cached)
            if len(run.loader) < args.batches + 1:
                raise RuntimeError(f"an epoch has {len(run.loader)} batches; --batches must be at most "
                                   f"{len(run.loader) - 1}")
            _warm_up(run, args.warmup, cached if run is capture_from else None)
        except Exception as e:  # a broken engine must not stop the others
            run.error = _first_error_line(e)
            log(f"warm-up {run.name}: FAILED: {run.error}")
            traceback.print_exc()
        else:
            log(f"warm-up {run.name}: {time.perf_counter() - t:.1f} s")
        _wait_idle()

    quiesce = []
    for rep in range(args.repeats):
        live = [r for r in runs if not r.error]
        shift = rep % max(len(live), 1)
        for run in live[shift:] + live[:shift]:  # round-robin, rotated so no run always goes first
            try:
                ips, sec, other_cpu = _time_repeat(run, rep + 1, args.batches, args.batch_size)
            except Exception as e:
                run.error = _first_error_line(e)
                log(f"repeat {rep} {run.name}: FAILED: {run.error}")
                traceback.print_exc()
            else:
                run.images_per_s.append(ips)
                run.seconds.append(sec)
                run.other_cpu.append(other_cpu)
                busy = "" if not other_cpu or other_cpu < 0.05 else f" (other processes took {other_cpu:.0%} of the CPU)"
                log(f"repeat {rep} {run.name}: {ips:.0f} images/s{busy}")
            quiesce.append(_wait_idle())

    # CPU that other processes took from this benchmark: every run is slowed by it.
    busy1, mine1, wall1 = _machine_busy_ticks(), _tree_cpu_ticks(), time.perf_counter()
    other = None if busy0 is None else max(0.0, ((busy1 - busy0) - (mine1 - mine0)) / hz)
    result = {
        "benchmark": "throughput",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": shlex.join([os.path.relpath(sys.executable, REPO) if sys.executable.startswith(REPO)
                               else sys.executable, os.path.relpath(os.path.abspath(__file__), REPO),
                               *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine(),
        "git": git_state(),
        "settings": {"data": args.data, "records": records, "engines": args.engines, "batch_size": args.batch_size,
                     "image_size": args.image_size, "views": 2, "workers": args.workers, "repeats": args.repeats,
                     "batches": args.batches, "warmup_batches": args.warmup, "untimed_batches_per_repeat": 1,
                     "p_mix": P_MIX, "device": "cpu", "seed": args.seed, "quick": args.quick},
        "protocol": __doc__.split("Protocol:", 1)[1].strip(),
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "other_processes_cpu": None if other is None else {
            "cpu_seconds": round(other, 1),
            "share_of_capacity": round(other / ((wall1 - wall0) * (os.cpu_count() or 1)), 3)},
        "quiesce_seconds": {"total": round(sum(quiesce), 1), "max": round(max(quiesce, default=0), 2)},
        "runs": [{"name": r.name, "engine": r.engine, "config": r.config, "stage": r.stage,
                  "oa_crop": CONFIGS[r.config][0], "bg_mixup": CONFIGS[r.config][1],
                  "images_per_s": [round(x, 1) for x in r.images_per_s], "seconds": [round(x, 3) for x in r.seconds],
                  "other_processes_cpu_share": [None if x is None else round(x, 3) for x in r.other_cpu],
                  "median_images_per_s": None if _median(r) is None else round(_median(r), 1),
                  "error": r.error} for r in runs],
        "failed": {r.name: r.error for r in runs if r.error},
    }
    result["summary"] = summarise(runs, result["machine"]["cores_available"] or result["machine"]["cores"])
    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "throughput.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result, runs)
    with open(os.path.join(args.out, "throughput.md"), "w") as f:
        f.write(md)
    if args.plot is not False:
        try:
            plot(result, runs, os.path.join(args.out, "throughput.png"))
        except ImportError:
            log("throughput: matplotlib is not installed: no throughput.png (pip install matplotlib)")
    print(md)
    log(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
