"""The GPU verification in one command: everything the CPU machines cannot check, measured.

    PYTHONUNBUFFERED=1 python benchmarks/gpu_check.py [--device cuda] [--quick] [--out DIR]

Sections, each timed and recorded even when another fails (results are rewritten after each):
1. environment: GPU, driver, versions, which optional engines import;
2. kernel parity: every case of tests/test_kernels.py with the compiled Triton kernels on the
   device against the torch reference on the device and on the CPU (largest errors reported);
3. kernel speed: the device stage chosen for the device (kernels.select_device_ops) against the
   torch reference and against torchvision.transforms.v2 applied per view, on one batch
   (256 x 2 views at 224 px, uint8 in, fp16 and fp32 out); medians after warm-up, CUDA events;
   achieved GB/s and their fraction of a device-to-device copy measured in the same run;
4. loader throughput with the device stage on the device: every importable engine, vanilla /
   +OA-Crop / +BG-Mixup / +both, 224 px views of a demo set generated at 256 px;
5. training: MoCo v2 and BYOL steps/s, ResNet-50 at 224 and ResNet-18 at 112, fp16 autocast +
   GradScaler and channels-last, on synthetic batches and on loader batches in the same run
   (the data-wait fraction), then the trainer itself for a few steps (--amp --channels-last);
6. one nccl process group (single process) with an all-reduce;
7. ContraCAM on the device: images/s, and its masks against the CPU's on the same images.
Writes gpu_check.json and gpu_check.md (machine, versions, date) under --out. On a CPU,
`--device cpu --quick` runs every section small in well under a minute (tests/test_gpu_check.py),
so the script does not rot between GPU sessions.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

SIZES = {  # what each section runs on, full (a GPU, ~5 minutes) and quick (a CPU, seconds)
    "full": {"kernel_batch": 256, "kernel_size": 224, "kernel_reps": 20, "copy_mib": 1024,
             "demo": ["--per-class-train", "300", "--per-class-val", "2", "--multi", "0", "--resolution", "256"],
             "loader_batch": 256, "loader_size": 224, "loader_batches": 12,
             "train": [("resnet50", 224, 128), ("resnet18", 112, 256)], "train_steps": 12, "train_width": 64,
             "cam_images": 64, "cam_size": 224, "engines": ("torch", "dali", "ffcv"),
             # the sm_90 compile test is redundant where the kernels run compiled anyway
             "parity_filter": "not compile_for_sm90"},
    "quick": {"kernel_batch": 4, "kernel_size": 32, "kernel_reps": 3, "copy_mib": 8,
              "demo": ["--per-class-train", "3", "--per-class-val", "2", "--multi", "0", "--resolution", "64"],
              "loader_batch": 8, "loader_size": 32, "loader_batches": 2,
              "train": [("resnet18", 32, 8)], "train_steps": 2, "train_width": 8,
              "cam_images": 4, "cam_size": 32, "engines": ("torch",), "parity_filter": "test_float_outputs"},
}
CONFIGS = {"vanilla": (False, 0.0), "+OA-Crop": (True, 0.0), "+BG-Mixup": (False, 0.4), "+both": (True, 0.4)}


class Timer:
    """Median seconds of a function over repeats after warm-up: CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def median(self, fn, reps: int, warmup: int = 2) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


# ------------------------------------------------------------------ 1. environment


def environment(ctx) -> dict:
    from throughput import git_state, machine

    dev = ctx["device"]
    info = {"machine": machine(), **git_state(), "python": platform.python_version(), "torch": torch.__version__,
            "cuda_runtime": torch.version.cuda, "device": str(dev),
            "engines": {name: importlib.util.find_spec(mod) is not None
                        for name, mod in (("torch", "torch"), ("ffcv", "ffcv"), ("dali", "nvidia.dali"))}}
    for mod in ("torchvision", "triton", "numba", "cv2"):
        spec = importlib.util.find_spec(mod)
        info[mod] = __import__(mod).__version__ if spec else None
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info["gpu"] = {"name": p.name, "memory_gib": round(p.total_memory / 2 ** 30, 1),
                       "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count}
    from objloader.kernels import select_device_ops

    info["device_stage"] = select_device_ops(dev)[1]
    return info


# ------------------------------------------------------------------ 2. kernel parity


def kernel_parity(ctx) -> dict:
    report = os.path.join(ctx["work"], "kernel_errors.json")
    env = dict(os.environ, OBJLOADER_KERNEL_REPORT=report)
    if ctx["device"].type == "cuda":
        env["OBJLOADER_KERNELS_ON"] = "cuda"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(REPO, "tests", "test_kernels.py")]
    if ctx["size"]["parity_filter"]:
        cmd += ["-k", ctx["size"]["parity_filter"]]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    out = {"command": " ".join(cmd[2:]), "returncode": proc.returncode, "summary": summary}
    if proc.returncode:
        out["failures"] = proc.stdout[-3000:]
    if os.path.isfile(report):
        with open(report, encoding="utf-8") as f:
            rep = json.load(f)
        cases = rep["cases"]
        out.update(kernel_device=rep["device"], interpreted=rep["interpreted"], cases=len(cases),
                   max_err=_max_by_dtype(cases, "max_err"), max_err_vs_cpu_reference=_max_by_dtype(cases, "max_err_vs_cpu_reference"))
    out["ok"] = proc.returncode == 0
    return out


def _max_by_dtype(cases, key):
    out = {}
    for c in cases:
        if c[key] is not None:
            out[c["dtype"]] = max(out.get(c["dtype"], 0.0), c[key])
    return out


# ------------------------------------------------------------------ 3. kernel speed


def _batch(b, s, device, seed=0):
    from objloader.augment import sample_params

    g = torch.Generator().manual_seed(seed)
    views = torch.randint(0, 256, (b, 2, 3, s, s), dtype=torch.uint8, generator=g).to(device)
    masks = torch.randint(0, 256, (b, 2, 1, s, s), dtype=torch.uint8, generator=g).to(device)
    p = s // 2
    patches = torch.randint(0, 256, (b, 3, p, p), dtype=torch.uint8, generator=g).to(device)
    params = sample_params(seed, 0, np.arange(b), has_bg=np.ones(b, bool), image_sizes=np.full((b, 2), s),
                           views=2, p_mix=0.4, color="mocov2")
    return views, masks, patches, params


def _torchvision_per_view(s: int):
    """MoCo v2's colour pipeline the usual way: one torchvision.transforms.v2 call per view."""
    from torchvision.transforms import v2

    from objloader.augment.reference import IMAGENET_MEAN, IMAGENET_STD

    k = max(3, int(0.1 * s) // 2 * 2 + 1)
    return v2.Compose([v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), v2.RandomGrayscale(0.2),
                       v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5),
                       v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))])


def kernel_speed(ctx) -> dict:
    from objloader.augment.reference import apply_device_ops
    from objloader.kernels import select_device_ops

    dev, sz, timer = ctx["device"], ctx["size"], ctx["timer"]
    b, s, reps = sz["kernel_batch"], sz["kernel_size"], sz["kernel_reps"]
    views, masks, patches, params = _batch(b, s, dev)
    fused, name = select_device_ops(dev)
    n = views.numel() // 3  # pixels
    copy = torch.empty(sz["copy_mib"] * 2 ** 20, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(copy)
    t_copy = timer.median(lambda: dst.copy_(copy), reps)
    copy_gbs = 2 * copy.numel() / t_copy / 1e9  # read + write
    tv = _torchvision_per_view(s)
    flat = views.flatten(0, 1)
    out = {"batch": [b, 2, 3, s, s], "device_stage": name, "d2d_copy_gb_s": round(copy_gbs, 1), "rows": []}
    for dtype in (torch.float16, torch.float32):
        moved = n * 3 + n + patches.numel() + n * 3 * torch.empty((), dtype=dtype).element_size()
        row = {"dtype": str(dtype).replace("torch.", "")}
        for label, fn in ((name, lambda: fused(views, masks, patches, params, dtype=dtype)),
                          ("torch reference", lambda: apply_device_ops(views, masks, patches, params, dtype=dtype)),
                          ("torchvision v2 per view", lambda: [tv(v).to(dtype) for v in flat])):
            t = timer.median(fn, reps)
            row[label] = {"ms": round(1e3 * t, 3), "img_per_s": round(b / t, 1), "gb_s": round(moved / t / 1e9, 2),
                          "fraction_of_copy": round(moved / t / 1e9 / copy_gbs, 3)}
        row["speedup_vs_reference"] = round(row["torch reference"]["ms"] / row[name]["ms"], 2) if name != "torch reference" else 1.0
        row["speedup_vs_torchvision"] = round(row["torchvision v2 per view"]["ms"] / row[name]["ms"], 2)
        out["rows"].append(row)
    out["note"] = "torchvision does no BG-Mixup: its time is a lower bound of the same work done per view"
    return out


# ------------------------------------------------------------------ 4. loader throughput


def demo_dataset(ctx) -> str:
    """A demo train split generated at 256 px (quick: 64 px) and built (cached in the work folder)."""
    from objloader.cli import build as build_cli
    from objloader.cli import demo as demo_cli
    from objloader.store.schema import MANIFEST_FILE

    src, built = os.path.join(ctx["work"], "demo"), os.path.join(ctx["work"], "built")
    if not os.path.isfile(os.path.join(built, "train", MANIFEST_FILE)):
        if demo_cli.main([src, "--overwrite", "--no-progress", *ctx["size"]["demo"]]):
            raise RuntimeError("objloader-demo failed")
        formats = "ffcv,wds" if ctx["env"]["engines"]["ffcv"] else "wds"
        if build_cli.main([os.path.join(src, "train"), os.path.join(built, "train"), "--masks", "gt",
                           "--formats", formats, "--overwrite"]):
            raise RuntimeError("objloader-build failed")
    return os.path.join(built, "train")


def _loader(ctx, engine, oa_crop, bg_mixup, size, batch, dtype=torch.float16):
    from objloader import make_loader

    return make_loader(ctx["data"], engine, batch_size=batch, image_size=size, oa_crop=oa_crop, bg_mixup=bg_mixup,
                       device=str(ctx["device"]), dtype=dtype, num_workers=ctx["workers"], seed=0)


def loader_throughput(ctx) -> dict:
    ctx["data"] = demo_dataset(ctx)
    sz, timer = ctx["size"], ctx["timer"]
    engines = [e for e in sz["engines"] if ctx["env"]["engines"][e]]
    out = {"batch": sz["loader_batch"], "image_size": sz["loader_size"], "workers": ctx["workers"], "engines": {}}
    for engine in engines:
        res = {}
        for name, (oa, mix) in CONFIGS.items():
            try:
                loader = _loader(ctx, engine, oa, mix, sz["loader_size"], sz["loader_batch"])
                it = iter(loader)
                next(it)  # pipeline fill, compilation
                timer.sync()
                t0, n = time.perf_counter(), 0
                for _ in range(sz["loader_batches"]):
                    batch = next(it)
                    n += len(batch.views)
                timer.sync()
                res[name] = {"img_per_s": round(n / (time.perf_counter() - t0), 1)}
                del it, loader
            except Exception as e:  # one engine's failure must not hide the others' figures
                res[name] = {"error": f"{type(e).__name__}: {e}"}
        van = res.get("vanilla", {}).get("img_per_s")
        for name, r in res.items():
            if van and "img_per_s" in r:
                r["overhead_vs_vanilla"] = round(van / r["img_per_s"] - 1, 3)
        out["engines"][engine] = res
    return out


# ------------------------------------------------------------------ 5. training


def _model(method, arch, width, n_records):
    from objloader.ssl.byol import BYOL
    from objloader.ssl.moco import MoCo, queue_size_for

    if method == "moco":
        return MoCo(arch, arch == "resnet18", queue_size=queue_size_for(max(n_records, 2), 65536), width=width)
    return BYOL(arch, arch == "resnet18", width=width)


def _train_steps(model, batches, steps, device, amp):
    """Seconds of ``steps`` optimiser steps and the part of it spent waiting for ``batches``."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None
    amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    wait = 0.0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        tw = time.perf_counter()
        views = next(batches)
        wait += time.perf_counter() - tw
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss = model(views)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        model.momentum_update(0.5)
    sync()
    if not torch.isfinite(loss):
        raise FloatingPointError(f"loss {float(loss)}")
    return time.perf_counter() - t0, wait


def training(ctx) -> dict:
    dev, sz = ctx["device"], ctx["size"]
    amp = dev.type == "cuda"  # bf16 autocast on a CPU is slower than fp32 there: measured as fp32
    rows = []
    for arch, size, batch in sz["train"]:
        for method in ("moco", "byol"):
            model = _model(method, arch, sz["train_width"], 10 ** 6).to(dev, memory_format=torch.channels_last).train()
            synthetic = torch.randn(batch, 2, 3, size, size, device=dev)
            syn = iter(lambda: synthetic, None)
            _train_steps(model, syn, 2, dev, amp)  # warm-up: cuDNN autotuning, allocator
            t_syn, _ = _train_steps(model, syn, sz["train_steps"], dev, amp)
            row = {"method": method, "arch": arch, "image_size": size, "batch": batch, "amp": amp,
                   "channels_last": True, "synthetic_steps_per_s": round(sz["train_steps"] / t_syn, 2)}
            try:
                loader = _loader(ctx, "torch", True, 0.4, size, batch, dtype=torch.float32)
                real = (b.views for _ in range(10 ** 6) for b in loader)
                _train_steps(model, real, 2, dev, amp)
                t_real, wait = _train_steps(model, real, sz["train_steps"], dev, amp)
                row.update(loader_steps_per_s=round(sz["train_steps"] / t_real, 2),
                           data_wait_fraction=round(wait / t_real, 3), loader="torch +both")
                real.close()
            except Exception as e:
                row["loader_error"] = f"{type(e).__name__}: {e}"
            rows.append(row)
            del model
    # the trainer end to end: --amp (GradScaler on CUDA) and --channels-last, checkpoint written
    from objloader.cli.train import main as train_main

    out_dir = os.path.join(ctx["work"], "trainer")
    arch, size, batch = sz["train"][-1]
    argv = ["--loader", "torch", "--data", ctx["data"], "--out", out_dir, "--arch", arch, "--width", str(sz["train_width"]),
            "--image-size", str(size), "--batch-size", str(min(batch, 64)), "--max-steps", "4", "--epochs", "1",
            "--save-every", "0", "--oa-crop", "--bg-mixup", "0.4", "--channels-last", "--no-progress",
            "--device", str(dev), "--workers", str(ctx["workers"])] + (["--amp"] if amp else [])
    if arch == "resnet18":
        argv.append("--small-stem")
    rc = train_main("moco", argv)
    ctx["checkpoint"] = os.path.join(out_dir, "checkpoint.pt") if rc == 0 else None
    return {"rows": rows, "trainer": {"argv": " ".join(argv), "returncode": rc}}


# ------------------------------------------------------------------ 6. nccl


def process_group(ctx) -> dict:
    import torch.distributed as dist

    from objloader.runtime import leave_process_group

    backend = "nccl" if ctx["device"].type == "cuda" else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        x = torch.full((4,), 2.0, device=ctx["device"])
        dist.all_reduce(x)
        ok = bool((x == 2.0).all())
    finally:
        leave_process_group(True)  # destroy_process_group alone can deadlock (see there)
    return {"backend": backend, "all_reduce_ok": ok, "seconds": round(time.perf_counter() - t0, 2)}


# ------------------------------------------------------------------ 7. ContraCAM


def contracam(ctx) -> dict:
    from objloader.cam.masks import explain_batch, load_contracam, prepare_rgb
    from objloader.cam.settings import CamSettings
    from objloader.store.reader import BuiltDataset, decode_rgb
    from objloader.store.schema import MEMBER

    if not ctx.get("checkpoint"):
        raise RuntimeError("no checkpoint: the training section's trainer run failed")
    sz, dev = ctx["size"], ctx["device"]
    settings = CamSettings(iterations=3, image_size=sz["cam_size"], batch_size=max(2, sz["cam_images"]))
    ds = BuiltDataset(ctx["data"])
    rgb = np.stack([prepare_rgb(decode_rgb(ds.raw(i, (MEMBER.image,))[MEMBER.image]), sz["cam_size"])
                    for i in range(min(sz["cam_images"], len(ds)))])
    ds.close()
    model_dev, _, _ = load_contracam(ctx["checkpoint"], settings, dev)
    model_cpu, _, _ = load_contracam(ctx["checkpoint"], settings, "cpu")
    masks_dev = explain_batch(model_dev, rgb, dev)
    masks_cpu = explain_batch(model_cpu, rgb, "cpu")
    t = ctx["timer"].median(lambda: explain_batch(model_dev, rgb, dev), 3, warmup=1)
    diff = np.abs(masks_dev[-1] - masks_cpu[-1])
    a, b = masks_dev[-1] >= 0.5, masks_cpu[-1] >= 0.5
    iou = float((a & b).sum() / max((a | b).sum(), 1))
    # Tolerance: float sums in another order (cuDNN, TF32 off by default for convolutions' grads).
    return {"images": len(rgb), "iterations": settings.iterations, "input_size": sz["cam_size"],
            "img_per_s": round(len(rgb) / t, 1), "max_abs_diff_vs_cpu": round(float(diff.max()), 5),
            "mean_abs_diff_vs_cpu": round(float(diff.mean()), 6), "iou_at_0.5_vs_cpu": round(iou, 4),
            "ok": bool(diff.mean() < 0.01 and iou > 0.95)}


SECTIONS = [("environment", environment), ("kernel parity", kernel_parity), ("kernel speed", kernel_speed),
            ("loader throughput", loader_throughput), ("training", training), ("process group", process_group),
            ("contracam", contracam)]


# ------------------------------------------------------------------ report


def markdown(doc: dict) -> str:
    env = doc["sections"].get("environment", {}).get("result", {})
    gpu = env.get("gpu", {})
    lines = [f"# GPU check ({doc['date']}, {doc['profile']}, device {doc['device']}"
             + (f": {gpu.get('name')}" if gpu else "") + f", commit {env.get('commit', '?')})", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda_runtime')}, triton {env.get('triton')}, "
             f"torchvision {env.get('torchvision')}; engines importable: "
             + ", ".join(k for k, v in env.get("engines", {}).items() if v) + f"; device stage: {env.get('device_stage')}", ""]
    for name, sec in doc["sections"].items():
        state = "ok" if sec.get("ok") else "**FAILED**"
        lines.append(f"## {name}: {state} ({sec['seconds']:.1f} s)")
        if "error" in sec:
            lines += ["", "```", sec["error"][-1500:], "```"]
        res = sec.get("result") or {}
        if name == "kernel parity" and res:
            lines += ["", f"`{res['command']}`: {res['summary']}; {res.get('cases', 0)} comparisons on "
                      f"{res.get('kernel_device')} (interpreted: {res.get('interpreted')}); max error vs the reference "
                      f"on the device {json.dumps(res.get('max_err'))}, vs the CPU reference "
                      f"{json.dumps(res.get('max_err_vs_cpu_reference'))}"]
        if name == "kernel speed" and res:
            lines += ["", f"Batch {res['batch']} uint8; device-to-device copy {res['d2d_copy_gb_s']} GB/s. "
                      "ms (images/s, GB/s, fraction of the copy's bandwidth):", "",
                      f"| out | {res['device_stage']} | torch reference | torchvision v2 per view | "
                      "speed-up vs reference | vs torchvision |", "|---|---|---|---|---:|---:|"]
            for r in res["rows"]:
                cells = [f"{r[k]['ms']} ({r[k]['img_per_s']}, {r[k]['gb_s']}, {r[k]['fraction_of_copy']})"
                         for k in (res["device_stage"], "torch reference", "torchvision v2 per view")]
                lines.append(f"| {r['dtype']} | " + " | ".join(cells)
                             + f" | {r['speedup_vs_reference']} | {r['speedup_vs_torchvision']} |")
            lines += ["", res["note"]]
        if name == "loader throughput" and res:
            lines += ["", f"images/s (2 views of {res['image_size']} px, batch {res['batch']}, {res['workers']} workers), "
                      "overhead vs the same engine's vanilla in brackets:", "",
                      "| engine | " + " | ".join(CONFIGS) + " |", "|---|" + "---:|" * len(CONFIGS)]
            for engine, r in res["engines"].items():
                cells = [r[c].get("error", "")[:60] if "error" in r[c] else
                         f"{r[c]['img_per_s']}" + (f" ({100 * r[c]['overhead_vs_vanilla']:+.1f} %)" if c != "vanilla" else "")
                         for c in CONFIGS]
                lines.append(f"| {engine} | " + " | ".join(cells) + " |")
        if name == "training" and res:
            lines += ["", "| method | arch | px | batch | amp | synthetic steps/s | loader steps/s | data-wait |",
                      "|---|---|---:|---:|---|---:|---:|---:|"]
            for r in res["rows"]:
                lines.append(f"| {r['method']} | {r['arch']} | {r['image_size']} | {r['batch']} | {r['amp']} | "
                             f"{r['synthetic_steps_per_s']} | {r.get('loader_steps_per_s', r.get('loader_error', '—'))} | "
                             f"{r.get('data_wait_fraction', '—')} |")
            lines += ["", f"Trainer run (`train/moco.py {res['trainer']['argv']}`): rc {res['trainer']['returncode']}"]
        if name in ("process group", "contracam") and res:
            lines += ["", "`" + json.dumps(res) + "`"]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="every section small (a CPU run in seconds)")
    p.add_argument("--out", default=RESULTS, help="folder for gpu_check.json and .md")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: all CPUs)")
    args = p.parse_args(argv)
    sys.path.insert(0, HERE)  # throughput.machine() / git_state()
    device = torch.device(args.device)
    profile = "quick" if args.quick else "full"
    work = args.work or tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    ctx = {"device": device, "size": SIZES[profile], "timer": Timer(device), "work": work,
           "workers": args.workers or len(os.sched_getaffinity(0))}
    doc = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "profile": profile, "device": str(device),
           "command": " ".join(["python", "benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
           "sections": {}}
    os.makedirs(args.out, exist_ok=True)
    stem = "gpu_check" if profile == "full" and device.type == "cuda" else f"gpu_check_{device.type}_{profile}"
    for name, fn in SECTIONS:
        print(f"[gpu_check] {name} ...", flush=True)
        t0 = time.perf_counter()
        sec = {}
        try:
            res = fn(ctx)
            sec = {"ok": bool(res.get("ok", True)) if isinstance(res, dict) else True, "result": res}
        except Exception:
            sec = {"ok": False, "error": traceback.format_exc()}
        sec["seconds"] = round(time.perf_counter() - t0, 2)
        if name == "environment" and sec["ok"]:
            ctx["env"] = sec["result"]
        elif name == "environment":
            ctx["env"] = {"engines": {"torch": True, "ffcv": False, "dali": False}}
        doc["sections"][name] = sec
        print(f"[gpu_check] {name}: {'ok' if sec['ok'] else 'FAILED'} ({sec['seconds']:.1f} s)", flush=True)
        with open(os.path.join(args.out, f"{stem}.json"), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        with open(os.path.join(args.out, f"{stem}.md"), "w", encoding="utf-8") as f:
            f.write(markdown(doc))
    print(markdown(doc))
    return 0 if all(s["ok"] for s in doc["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
