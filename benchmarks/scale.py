"""How objloader behaves at 10^5 records against 5k: build, open, first batch, throughput, memory,
verify, and the ContraCAM + CRF cost per image, in one command.

    python benchmarks/scale.py [--large 100000] [--small 5000] [--data DIR] [--image-size 128]
                               [--batch-size 64] [--workers N] [--batches 30] [--quick]

Data: ``--large`` photo JPEGs with exact masks (benchmarks/photo_data.py, long side 128-160 px so
10^5 generate in minutes; cached under DATA/photos). The small set is the first ``--small`` of
those same images: a tree of symbolic links (DATA/small), so both build through the same command,
``objloader-build SRC OUT --gt-masks MASKS --formats ffcv,wds --overwrite`` (``--gt-masks``
applies to image folders only, not to list files).

Measured, small and large:
1. the build (a subprocess): wall seconds, records/s per core, the peak resident memory of the
   builder's process tree (RSS summed over it, polled every 0.2 s; also its largest process and
   the summed PSS, which counts pages shared by forked workers once), bytes per record, manifest;
2. per engine (torch, ffcv, dali), each loader alone in a fresh process of this script (OA-Crop,
   BG-Mixup 0.4, colour off, uint8: the engine's own work): ``make_loader`` time, first-batch
   latency (iter + next), images/s over ``--batches`` batches after 5 warm-up batches, and memory:
   per loader worker process (mean RSS and PSS; the torch engine's DataLoader workers, the dali
   engine's parallel external source), for ffcv (threads) the process's RSS after the steady run
   minus before ``make_loader``; the loading process's own growth for every engine. One engine's
   loaders run back to back, small / large alternating twice; reported: the median of the rounds;
3. ``objloader-build --verify OUT`` wall seconds;
4. ContraCAM (objloader-cam's default settings, at 224 px) + dense CRF ms per image on the CPU, with
   a randomly initialised MoCo v2 ResNet-18 (the cost does not depend on the weights);
5. from these, labelled as such, an extrapolation to ImageNet-1k on 16 cores: build hours (the cost
   of one more record between the two builds, scaled by pixels), disk, manifest, ContraCAM hours.
Every result is kept in DATA/scale_partial.json as it is measured, so a rerun resumes (delete it
to measure again, e.g. after a code change). Output: ``benchmarks/results/scale.{json,md}``;
``--quick`` (300 / 1200 records, 5 batches of 16, one round, 8 CAM images) writes to DATA_quick.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from objloader.loaders import make_loader  # noqa: E402
from objloader.store.schema import MANIFEST_FILE  # noqa: E402

# The modules beside this file are imported where they are used, not here: the dali engine's worker
# processes are spawned, and each re-imports this file first (as a training script's would be);
# photo_data and throughput (torchvision, OpenCV) would make them slower to start than a trainer's.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
BUILD = os.path.join(os.path.dirname(sys.executable), "objloader-build")  # the console script
ENGINES = ("torch", "ffcv", "dali")
SIZES = ("small", "large")
LONG_SIDE = (128, 160)
WARMUP, ROUNDS, POLL = 5, 2, 0.2
P_MIX, CROP_SCALE, CAM_SIZE = 0.4, (0.2, 1.0), 224
IMAGENET = {"records": 1_281_167, "width": 400, "height": 350, "cores": 16}
PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2 ** 20
CORES = len(os.sched_getaffinity(0))


# --------------------------------------------------------------------------------------------
# Processes and memory (/proc)
# --------------------------------------------------------------------------------------------


def _proc_table() -> dict:
    """pid -> (parent pid, RSS MiB) of every process on the machine."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # comm may hold spaces and ')'
            except OSError:
                continue  # exited meanwhile
            table[int(entry)] = (int(fields[1]), int(fields[21]) * PAGE_MIB)
    return table


def _descendants(root: int, table: dict) -> list:
    children: dict = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), ()):
            found.append(c)
            todo.append(c)
    return found


def _pss_mib(pid: int) -> float | None:
    """Proportional set size: each shared page counted once over the processes sharing it."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(l.split()[1]) / 1024 for l in f if l.startswith("Pss:"))
    except (OSError, StopIteration):
        return None


def _rss_split_mib(pid: int) -> tuple:
    """(anonymous, file-backed) resident MiB: mapped dataset pages are page cache, shared and
    reclaimable, so a loader that reads through mmap (ffcv) is judged by its anonymous memory."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                found[line.split(":")[0]] = int(line.split()[1]) / 1024
    return found["RssAnon"], found["RssFile"] + found["RssShmem"]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def run_tracked(cmd: list) -> dict:
    """Run ``cmd`` (output to the terminal); its wall seconds, exit status and the peak memory of
    its process tree, sampled every POLL seconds; the share of the machine's CPU other processes
    took meanwhile (the tree's own CPU time counts once it is reaped: os.times)."""
    from throughput import _machine_busy_ticks

    busy0, own0, start = _machine_busy_ticks(), os.times(), time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = {"peak_rss_mib": 0.0, "peak_single_rss_mib": 0.0, "peak_pss_mib": 0.0}
    while True:
        try:
            proc.wait(timeout=POLL)  # returns at once when it exits: the wall time stays exact
            break
        except subprocess.TimeoutExpired:
            pass
        table = _proc_table()
        pids = [p for p in [proc.pid, *_descendants(proc.pid, table)] if p in table]
        rss = [table[p][1] for p in pids]
        pss = sum(x for x in map(_pss_mib, pids) if x is not None)
        for k, v in (("peak_rss_mib", sum(rss)), ("peak_single_rss_mib", max(rss, default=0.0)), ("peak_pss_mib", pss)):
            peak[k] = max(peak[k], v)
    seconds, own1 = time.perf_counter() - start, os.times()
    own = own1.children_user + own1.children_system - own0.children_user - own0.children_system
    other = None if busy0 is None else max(0.0, (_machine_busy_ticks() - busy0) / os.sysconf("SC_CLK_TCK") - own)
    return {"rc": proc.returncode, "seconds": seconds, "other_cpu": None if other is None else other / (seconds * CORES),
            **{k: round(v, 1) for k, v in peak.items()}}


def _settle(timeout: float = 20.0) -> None:
    """Wait until the machine is idle (< 0.2 core busy over 0.5 s), so a run does not start while
    the previous one's processes still exit."""
    from throughput import _machine_busy_ticks

    hz, start = os.sysconf("SC_CLK_TCK"), time.perf_counter()
    while time.perf_counter() - start < timeout:
        before = _machine_busy_ticks()
        time.sleep(0.5)
        if before is None or (_machine_busy_ticks() - before) / hz < 0.1:
            return


# --------------------------------------------------------------------------------------------
# Resumable results
# --------------------------------------------------------------------------------------------


class Partial:
    """DATA/scale_partial.json: every measurement under a key naming what it depends on."""

    def __init__(self, path: str):
        self.path = path
        self.data = json.load(open(path)) if os.path.isfile(path) else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        with open(self.path + ".tmp", "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(self.path + ".tmp", self.path)


# --------------------------------------------------------------------------------------------
# Data and builds
# --------------------------------------------------------------------------------------------


def prepare_data(args) -> tuple:
    """(photo_data record, {size: (images dir, masks dir)}); the small set links the first
    ``--small`` images of the large one."""
    from photo_data import photo_set

    photos = os.path.join(args.data, "photos")
    marker = os.path.join(photos, "photo_data.json")
    if os.path.isfile(marker) and json.load(open(marker))["options"].get("images") != args.large:
        # photo_set would regenerate over it and leave the surplus files of a larger set behind
        sys.exit(f"scale: {photos} holds a set of another size; remove it or pass another --data")
    info = photo_set(photos, images=args.large, long_side=LONG_SIDE, log=lambda m: print(m, flush=True))
    classes = info["options"]["classes"]
    small = os.path.join(args.data, "small")
    done = os.path.join(small, "count")
    if not (os.path.isfile(done) and open(done).read() == str(args.small)):
        shutil.rmtree(small, ignore_errors=True)
        for kind, ext in (("images", ".jpg"), ("masks", ".png")):
            for i in range(args.small):  # photo_data names image i f"{i:06d}" in class i % classes
                rel = os.path.join(f"class{i % classes:02d}", f"{i:06d}{ext}")
                os.makedirs(os.path.dirname(os.path.join(small, kind, rel)), exist_ok=True)
                os.symlink(os.path.join(photos, kind, rel), os.path.join(small, kind, rel))
        with open(done, "w") as f:
            f.write(str(args.small))
    return info, {"large": (os.path.join(photos, "images"), os.path.join(photos, "masks")),
                  "small": (os.path.join(small, "images"), os.path.join(small, "masks"))}


def dataset_bytes(path: str) -> dict:
    """Bytes of a built dataset: in all, and per kind of file."""
    kinds = {"total": 0, "beton": 0, "tar": 0, "idx": 0, "manifest": 0}
    for root, _, files in os.walk(path):
        for name in files:
            size = os.path.getsize(os.path.join(root, name))
            kinds["total"] += size
            kind = "manifest" if name == MANIFEST_FILE else os.path.splitext(name)[1][1:]
            if kind in kinds:
                kinds[kind] += size
    return kinds


def build(args, name: str, n: int, src: tuple, partial: Partial) -> dict:
    out = os.path.join(args.data, f"built_{name}")
    key = f"build:{name}:{n}:{args.workers}"
    if partial.get(key) and os.path.isfile(os.path.join(out, MANIFEST_FILE)):
        return partial.get(key)
    shutil.rmtree(out + ".partial", ignore_errors=True)  # a resumed build would time only its rest
    print(f"objloader-build {src[0]} {out} ({n} records)", flush=True)
    r = run_tracked([BUILD, src[0], out, "--gt-masks", src[1], "--formats", "ffcv,wds", "--overwrite",
                     "--follow-links",  # the small set links its files from the large one
                     "--workers", str(args.workers)])
    if r.pop("rc"):
        sys.exit(f"scale: objloader-build of the {name} set failed")
    m = json.load(open(os.path.join(out, MANIFEST_FILE)))
    if m["counts"]["records"] != n:
        sys.exit(f"scale: {out} holds {m['counts']['records']} records, expected {n} ({m['counts']['skipped']} skipped)")
    used = min(args.workers, CORES)
    res = {**r, "path": out, "cores": used, "records_per_s_per_core": n / r["seconds"] / used,
           "builder_seconds": m["build_seconds"], "bytes": dataset_bytes(out)}
    partial.put(key, res)
    return res


def verify(name: str, n: int, out: str, partial: Partial) -> dict:
    key = f"verify:{name}:{n}"
    if not partial.get(key):
        print(f"objloader-build --verify {out}", flush=True)
        r = run_tracked([BUILD, "--verify", out])
        if r.pop("rc"):
            sys.exit(f"scale: objloader-build --verify {out} failed")
        partial.put(key, r)
    return partial.get(key)


# --------------------------------------------------------------------------------------------
# Loaders: one per fresh process
# --------------------------------------------------------------------------------------------


def _batches(loader):
    """Batches without end: a run may cross an epoch's end (a small --quick set)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure_loader(engine: str, path: str, args) -> dict:
    """Open one loader in this process and measure it (see the module docstring)."""
    import importlib

    from throughput import _machine_busy_ticks, _tree_cpu_ticks

    if engine != "torch":  # the engine's library is loaded before the clock starts: open_s is the dataset's
        importlib.import_module({"ffcv": "ffcv.loader", "dali": "nvidia.dali.plugin.pytorch"}[engine])
    importlib.import_module(f"objloader.loaders.{engine}_engine")
    me = os.getpid()
    gc.collect()
    rss0, pss0, split0 = _proc_table()[me][1], _pss_mib(me), _rss_split_mib(me)
    t = time.perf_counter()
    loader = make_loader(path, engine, batch_size=args.batch_size, image_size=args.image_size, oa_crop=True,
                         bg_mixup=P_MIX, color="none", normalize=False, dtype=torch.uint8, device="cpu",
                         num_workers=args.workers, crop_scale=CROP_SCALE)
    res = {"open_s": time.perf_counter() - t}
    batches = _batches(loader)
    t = time.perf_counter()
    next(batches)
    res["first_batch_s"] = time.perf_counter() - t
    for _ in range(WARMUP):
        next(batches)
    busy0, mine0, t = _machine_busy_ticks(), _tree_cpu_ticks(), time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    seconds = time.perf_counter() - t
    res["images_per_s"] = args.batches * args.batch_size / seconds
    if busy0 is not None:  # the share of the machine other processes took meanwhile (noise)
        other = (_machine_busy_ticks() - busy0) - (_tree_cpu_ticks() - mine0)
        res["other_cpu"] = max(0.0, other) / os.sysconf("SC_CLK_TCK") / (seconds * CORES)
    table = _proc_table()
    # Loader workers: the torch engine's (forked by a forkserver child) and the dali engine's (its
    # parallel external source, spawned); the forkserver and the resource tracker are no workers.
    workers = [p for p in _descendants(me, table) if p in table and not (table[p][0] == me and (
        "multiprocessing.forkserver" in _cmdline(p) or "resource_tracker" in _cmdline(p)))]
    res["process_rss_delta_mib"] = table[me][1] - rss0
    res["process_pss_delta_mib"] = (_pss_mib(me) or 0.0) - (pss0 or 0.0)
    split = _rss_split_mib(me)
    res["process_anon_delta_mib"], res["process_file_delta_mib"] = split[0] - split0[0], split[1] - split0[1]
    res["workers"] = len(workers)
    if workers:  # the mean worker process
        res["worker_rss_mib"] = statistics.mean(table[p][1] for p in workers)
        res["worker_pss_mib"] = statistics.mean(_pss_mib(p) or 0.0 for p in workers)
    else:  # threads in this process (ffcv): what the loader added to it
        res["worker_rss_mib"], res["worker_pss_mib"] = res["process_rss_delta_mib"], res["process_pss_delta_mib"]
    batches.close()
    del batches, loader  # the DataLoader shuts its persistent workers down
    gc.collect()
    return res


def child(args) -> None:
    """``--child ENGINE PATH OUT``: measure_loader in this fresh process, its JSON to OUT."""
    from throughput import _first_error_line

    engine, path, out = args.child
    try:
        res = measure_loader(engine, path, args)
    except Exception as e:  # noqa: BLE001 - reported in the results, the other engines still run
        traceback.print_exc()
        res = {"error": _first_error_line(e)}
    with open(out, "w") as f:
        json.dump(res, f)
    sys.stdout.flush()
    os._exit(0)  # ffcv / dali threads can keep the interpreter from exiting


def run_child(args, engine: str, path: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", engine, path, out, "--image-size",
               str(args.image_size), "--batch-size", str(args.batch_size), "--workers", str(args.workers),
               "--batches", str(args.batches)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            return {"error": "the loader process ran past 30 minutes"}
        if os.path.isfile(out):
            res = json.load(open(out))
            if "error" in res:
                print(p.stderr[-3000:], file=sys.stderr)
            return res
        print(p.stderr[-3000:], file=sys.stderr)
        return {"error": f"the loader process exited with {p.returncode} and no result"}


FIGURES = ("open_s", "first_batch_s", "images_per_s", "worker_rss_mib", "worker_pss_mib", "process_rss_delta_mib",
           "process_pss_delta_mib", "process_anon_delta_mib", "process_file_delta_mib", "other_cpu")


def measure_engines(args, paths: dict, counts: dict, partial: Partial) -> dict:
    engines = {}
    for engine in ENGINES:
        rounds, error = {s: [] for s in SIZES}, None
        for rnd in range(args.rounds):
            for size in SIZES:
                key = (f"engine:{engine}:{size}:{rnd}:{counts[size]}:{args.image_size}:{args.batch_size}:"
                       f"{args.workers}:{args.batches}")
                res = partial.get(key)
                if res is None and error is None:
                    _settle()
                    res = run_child(args, engine, paths[size])
                    if "error" in res:
                        error = res["error"]  # not kept: a rerun (e.g. after installing it) tries again
                    else:
                        partial.put(key, res)
                    print(f"{engine} {size} round {rnd + 1}/{args.rounds}: " + (
                        f"error: {error}" if error else f"open {res['open_s']:.2f} s, first batch "
                        f"{res['first_batch_s']:.2f} s, {res['images_per_s']:.0f} img/s, worker RSS "
                        f"{res['worker_rss_mib']:.0f} MiB"), flush=True)
                if res is not None and "error" not in res:
                    rounds[size].append(res)
        figures = {f: {s: (statistics.median(r[f] for r in rounds[s]) if rounds[s] and rounds[s][0].get(f) is not None
                           else None) for s in SIZES} for f in FIGURES}
        engines[engine] = {**figures, "workers": rounds["large"][0]["workers"] if rounds["large"] else None,
                           "rounds": rounds}
        if error:
            engines[engine]["error"] = error
    return engines


# --------------------------------------------------------------------------------------------
# ContraCAM + CRF
# --------------------------------------------------------------------------------------------


def random_checkpoint(path: str) -> str:
    """A MoCo v2 ResNet-18 checkpoint as train/moco.py writes one (its defaults: resnet18, the
    standard stem), randomly initialised (as tests/test_contracam_run.py makes one)."""
    if not os.path.isfile(path):
        from objloader.checkpoint import CHECKPOINT_FORMAT
        from objloader.ssl.moco import MoCo

        torch.manual_seed(0)
        model = MoCo("resnet18", False, queue_size=256).eval()
        torch.save({"format": CHECKPOINT_FORMAT, "method": "moco", "arch": "resnet18", "small_stem": False,
                    "image_size": CAM_SIZE // 2, "backbone": model.backbone.state_dict(), "model": model.state_dict()},
                   path)
    return path


def contracam(args, images: list, repeats: int, partial: Partial) -> dict:
    """ms per image of ContraCAM (default CamSettings at 224 px, the images one batch: each other's
    negatives) and of the dense CRF (a pool of one process per core, as objloader-cam runs it)."""
    key = f"cam:{len(images)}:{repeats}:{CORES}"
    if partial.get(key):
        return partial.get(key)
    import cv2
    from objloader.cam.crf import crf_pool
    from objloader.cam.masks import explain_batch, load_contracam, prepare_rgb, refine_batch
    from objloader.cam.settings import CamSettings

    settings = CamSettings(image_size=CAM_SIZE)
    model, size, _ = load_contracam(random_checkpoint(os.path.join(args.data, "checkpoint_random.pt")), settings)
    torch.set_num_threads(CORES)
    rgb = np.stack([prepare_rgb(cv2.imread(p)[:, :, ::-1], size) for p in images])
    pool = crf_pool(CORES)
    cam, crf = [], []
    try:
        refine_batch(rgb[:2], explain_batch(model, rgb[:2])[-1], pool)  # warm-up: pool start, first-call costs
        for r in range(repeats):
            t0 = time.perf_counter()
            soft = explain_batch(model, rgb)[-1]
            t1 = time.perf_counter()
            refine_batch(rgb, soft, pool)
            cam.append((t1 - t0) * 1000 / len(rgb))
            crf.append((time.perf_counter() - t1) * 1000 / len(rgb))
            print(f"contracam repeat {r + 1}/{repeats}: {cam[-1]:.0f} + CRF {crf[-1]:.0f} ms/image", flush=True)
    finally:
        if pool is not None:
            pool.shutdown()
    res = {"ms_per_image": statistics.median(c + f for c, f in zip(cam, crf)), "cam_ms": statistics.median(cam),
           "crf_ms": statistics.median(crf), "images": len(rgb), "repeats": repeats, "threads": CORES,
           "settings": settings.to_dict(), "input_px": size}
    partial.put(key, res)
    return res


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _line_at(pair: dict, counts: dict, n: int):
    """The value at n records of the line through the small and large measurements."""
    s, l = pair.get("small"), pair.get("large")
    return None if s is None or l is None else s + (l - s) * (n - counts["small"]) / (counts["large"] - counts["small"])


def extrapolate(r: dict) -> dict:
    """ImageNet-1k on 16 cores from the measured figures (the assumptions are in the Markdown)."""
    n, cores, st, counts = IMAGENET["records"], IMAGENET["cores"], r["settings"], r["records"]
    px = st["mean_width"] * st["mean_height"]
    source_px = IMAGENET["width"] * IMAGENET["height"]
    stored_px = source_px * min(1.0, st["max_res"] / max(IMAGENET["width"], IMAGENET["height"])) ** 2
    marginal = r["build_marginal"]
    rate = marginal["records_per_s_per_core"] or r["build"]["large"]["records_per_s_per_core"]
    image_bytes = 2 * st["mean_kb"] * 1000  # the JPEG, once in the beton and once in a shard
    fixed = max(0.0, marginal["bytes_per_record"] - image_bytes)  # mask, boxes, tar headers, index, manifest
    ex = {"time_factor": source_px / px, "disk_factor": stored_px / px,
          "build_hours": n * source_px / px / (rate * cores) / 3600,
          "disk_gb": n * (image_bytes * stored_px / px + fixed) / 1e9, "fixed_bytes_per_record": fixed,
          "manifest_mb": _line_at(r["manifest_bytes"], counts, n) / 1e6,
          "contracam_crf_hours": r["contracam_crf_ms_per_image"] * n / 1000 / 3600 * CORES / cores}
    ref = os.path.join(REPO, "demo", "photos")  # peers.py's build of ImageNet-size photos, when there is one
    if os.path.isfile(os.path.join(ref, "built", MANIFEST_FILE)) and os.path.isfile(os.path.join(ref, "photo_data.json")):
        m, pi = json.load(open(os.path.join(ref, "built", MANIFEST_FILE))), json.load(open(os.path.join(ref, "photo_data.json")))
        records, f = m["counts"]["records"], source_px / (pi["mean_width"] * pi["mean_height"])
        x = {"records": records, "mean_px": [round(pi["mean_width"]), round(pi["mean_height"])],
             "max_res": m["options"]["max_res"], "bytes_per_record": dataset_bytes(os.path.join(ref, "built"))["total"] / records,
             "records_per_s_per_core": records / m["build_seconds"] / m["workers"]}
        x["disk_gb"] = x["bytes_per_record"] * f * n / 1e9
        x["build_hours"] = n * f / (x["records_per_s_per_core"] * cores) / 3600
        ex["reference"] = x
    return ex


def _fmt(x, spec=".2f"):
    return "—" if x is None else format(x, spec)


def markdown(r: dict) -> str:
    st, m, rec = r["settings"], r["machine"], r["records"]
    lines = [f"# objloader at {rec['large']:,} records against {rec['small']:,}", "",
             f"{m.get('cpu', '?')} ({CORES} cores), {r['date']}, commit {r['commit']['commit']}"
             f"{' + uncommitted changes' if r['commit']['uncommitted'] else ''}. Photo JPEGs (benchmarks/photo_data.py) "
             f"mean {st['mean_width']:.0f} x {st['mean_height']:.0f} px, {st['mean_kb']:.1f} KB, with exact masks, built "
             f"with the default --max-res {st['max_res']}; loaders: {st['image_size']}-px views, 2 per image, batch "
             f"{st['batch_size']}, {st['workers']} workers, OA-Crop + BG-Mixup {P_MIX}, colour off, uint8; images/s over "
             f"{st['batches']} batches after {WARMUP}; every loader in a fresh process, median of {st['rounds']} "
             "round(s) alternating small / large.", "",
             f"| figure | small ({rec['small']:,}) | large ({rec['large']:,}) | large / small |", "|---|---:|---:|---:|"]

    def row(label, pair, spec=".2f"):
        s, l = pair.get("small"), pair.get("large")
        ratio = f"{l / s:.2f}" if s and l is not None else "—"
        lines.append(f"| {label} | {_fmt(s, spec)} | {_fmt(l, spec)} | {ratio} |")

    b = r["build"]
    row("build, s", {k: b[k]["seconds"] for k in SIZES}, ".1f")
    row("build, records/s per core", {k: b[k]["records_per_s_per_core"] for k in SIZES}, ".0f")
    row("build, peak RSS of the process tree, MiB", {k: b[k]["peak_rss_mib"] for k in SIZES}, ".0f")
    row("build, peak PSS of the process tree, MiB", {k: b[k]["peak_pss_mib"] for k in SIZES}, ".0f")
    row("build, largest process RSS, MiB", {k: b[k]["peak_single_rss_mib"] for k in SIZES}, ".0f")
    row("build, machine's CPU that other processes took meanwhile", {k: b[k]["other_cpu"] for k in SIZES}, ".0%")
    row("dataset bytes per record (ffcv + wds + manifest)", r["bytes_per_record"], ".0f")
    row("manifest.json, bytes", r["manifest_bytes"], ",.0f")
    row("verify, s", r["verify_s"], ".1f")
    for engine, e in r["engines"].items():
        if e.get("error") and e["open_s"]["small"] is None:
            lines.append(f"| {engine}: error | {e['error']} | | |")
            continue
        row(f"{engine}: make_loader, s", e["open_s"], ".3f")
        row(f"{engine}: first batch, s", e["first_batch_s"], ".2f")
        row(f"{engine}: images/s", e["images_per_s"], ".0f")
        row(f"{engine}: machine's CPU that other processes took meanwhile", e["other_cpu"], ".0%")
        if e["workers"]:
            row(f"{engine}: RSS per worker process ({e['workers']}), MiB", e["worker_rss_mib"], ".0f")
            row(f"{engine}: PSS per worker process, MiB", e["worker_pss_mib"], ".0f")
        row(f"{engine}: RSS growth of the loading process, MiB", e["process_rss_delta_mib"], ".0f")
        if e.get("process_anon_delta_mib", {}).get("small") is not None:
            row(f"{engine}: of which anonymous, MiB", e["process_anon_delta_mib"], ".0f")
            row(f"{engine}: of which file-backed (mapped dataset pages), MiB", e["process_file_delta_mib"], ".0f")
    mg = r["build_marginal"]
    lines += ["", f"Between the two builds (fixed start-up cost and FFCV page padding excluded): "
              f"{_fmt(mg['records_per_s_per_core'], '.0f')} records/s per core, {mg['bytes_per_record']:.0f} bytes per record."]
    c = r["contracam"]
    lines += ["", f"ContraCAM + dense CRF: **{r['contracam_crf_ms_per_image']:.0f} ms/image** (ContraCAM "
              f"{c['cam_ms']:.0f} + CRF {c['crf_ms']:.0f}), CPU, {c['threads']} threads, {c['images']} images in one "
              f"batch at {c['input_px']} px, {c['settings']['iterations']} iterations, stride expansion "
              f"{c['settings']['stride_expansion']}; median of {c['repeats']}. Randomly initialised MoCo v2 "
              "ResNet-18 (objloader-cam with a train/moco.py checkpoint of its default architecture): the cost "
              "does not depend on the weights."]
    x = r["extrapolation"]
    lines += ["", "## Extrapolation to ImageNet-1k (1.28M records, 16 cores)", "",
              "**An extrapolation, not a measurement.** Linear in records; this machine's per-core build rate "
              "between the two builds times 16; build time per record scaled by source pixels "
              f"({IMAGENET['width']} x {IMAGENET['height']} px against the measured {st['mean_width']:.0f} x "
              f"{st['mean_height']:.0f}: x {x['time_factor']:.1f}; decode and re-encode dominate), the stored JPEGs' "
              f"bytes by stored pixels (--max-res {st['max_res']} caps the long side: x {x['disk_factor']:.1f}), the rest "
              f"of a record ({x['fixed_bytes_per_record']:.0f} B: mask, boxes, headers, index, manifest) as measured.", "",
              f"- build: {x['build_hours']:.2f} h",
              f"- disk (ffcv + wds): {x['disk_gb']:.0f} GB",
              f"- manifest.json: {x['manifest_mb']:.0f} MB (per-record keys and digests), read by every make_loader"]
    ref = x.get("reference")
    if ref:
        lines.append(f"- from the ImageNet-size build at demo/photos/built ({ref['records']} records of "
                     f"{ref['mean_px'][0]} x {ref['mean_px'][1]} px, --max-res {ref['max_res']}: {ref['bytes_per_record']:.0f} "
                     f"B/record, {ref['records_per_s_per_core']:.0f} records/s per core), scaled by pixels to "
                     f"{IMAGENET['width']} x {IMAGENET['height']}: disk {ref['disk_gb']:.0f} GB, build {ref['build_hours']:.2f} h "
                     f"at --max-res {ref['max_res']}")
    lines.append(f"- ContraCAM + CRF: {x['contracam_crf_hours']:.1f} h on 16 CPU cores ({r['contracam_crf_ms_per_image']:.0f}"
                 f" ms/image x 1.28M, the speed-up from {CORES} to 16 cores assumed linear; images are resized to "
                 f"{CAM_SIZE} px, so no pixel scaling). CPU only: a GPU runs the CAM far faster.")
    return "\n".join(lines) + "\n"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--large", type=int, default=100_000)
    p.add_argument("--small", type=int, default=5000)
    p.add_argument("--data", default=os.path.join(REPO, "demo", "scale"), help="data folder (generated if missing)")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=CORES)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="a smoke run: 300 / 1200 records, 5 batches of 16, 1 round")
    p.add_argument("--child", nargs=3, metavar=("ENGINE", "PATH", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.rounds = ROUNDS
    if a.quick and not a.child:
        # batch 16: 1 + 5 + 5 batches fit in an epoch of 300; one round: a few minutes in all
        a.small, a.large, a.batches, a.batch_size, a.rounds = 300, 1200, 5, 16, 1
        a.data = a.data + "_quick"
    if not a.child and not 2 <= a.small < a.large:
        p.error("need 2 <= --small < --large")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
    from throughput import git_state, machine

    os.makedirs(args.data, exist_ok=True)
    partial = Partial(os.path.join(args.data, "scale_partial.json"))
    info, sources = prepare_data(args)
    counts = {"small": args.small, "large": args.large}
    builds = {s: build(args, s, counts[s], sources[s], partial) for s in SIZES}
    engines = measure_engines(args, {s: builds[s]["path"] for s in SIZES}, counts, partial)
    verify_s = {s: verify(s, counts[s], builds[s]["path"], partial)["seconds"] for s in SIZES}
    n_cam, repeats = (8, 2) if args.quick else (32, 3)
    images = [os.path.join(sources["large"][0], f"class{i % info['options']['classes']:02d}", f"{i:06d}.jpg")
              for i in range(n_cam)]
    cam = contracam(args, images, repeats, partial)
    # The cost of one more record, between the two builds: without the fixed start-up cost (process
    # pool, imports) and the FFCV writer's page padding, which a 10^6-record build spreads thin.
    d_n = counts["large"] - counts["small"]
    d_s = builds["large"]["seconds"] - builds["small"]["seconds"]
    marginal = {"records_per_s_per_core": d_n / d_s / builds["large"]["cores"] if d_s > 0 else None,
                "bytes_per_record": (builds["large"]["bytes"]["total"] - builds["small"]["bytes"]["total"]) / d_n}
    manifest = json.load(open(os.path.join(builds["large"]["path"], MANIFEST_FILE)))
    result = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_state(), "command": " ".join(sys.argv), "records": counts,
              "build": {s: {k: v for k, v in builds[s].items() if k != "path"} for s in SIZES},
              "manifest_bytes": {s: builds[s]["bytes"]["manifest"] for s in SIZES},
              "bytes_per_record": {s: builds[s]["bytes"]["total"] / counts[s] for s in SIZES},
              "build_marginal": marginal, "engines": engines, "verify_s": verify_s, "contracam_crf_ms_per_image": cam["ms_per_image"],
              "contracam": cam,
              "settings": {"image_size": args.image_size, "batch_size": args.batch_size, "workers": args.workers,
                           "batches": args.batches, "warmup": WARMUP, "rounds": args.rounds, "crop_scale": list(CROP_SCALE),
                           "oa_crop": True, "bg_mixup": P_MIX, "long_side_px": list(LONG_SIDE),
                           "mean_width": info["mean_width"], "mean_height": info["mean_height"],
                           "mean_kb": info["mean_kb"], "max_res": manifest["options"]["max_res"]},
              "notes": ["the small set is the first --small images of the large one (symbolic links)",
                        "ContraCAM timed with a randomly initialised encoder; CPU only",
                        "RSS sums count pages shared between forked processes once per process; PSS does not",
                        "worker_rss_mib: the mean loader worker process (torch; dali's parallel external source), "
                        "else (ffcv, threads) the loading process's RSS growth",
                        "process_anon_delta_mib / process_file_delta_mib: that growth split into anonymous memory and "
                        "file-backed pages (ffcv maps data.beton: its pages are the shared, reclaimable page cache)"]}
    result["extrapolation"] = extrapolate(result)
    out = args.data if args.quick else RESULTS
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "scale.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(out, "scale.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
