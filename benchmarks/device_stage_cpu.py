"""Where the CPU device stage (kernels/cpu_ops.py, the fused numba kernel) spends its time.

    python benchmarks/device_stage_cpu.py [--batch 64] [--size 112] [--reps 15]

One batch of B x 2 views (uint8, random pixels and masks), MoCo v2 parameters with BG-Mixup
p = 0.4, timed whole and with single ops switched off (median and min of --reps calls after one
warm-up call). Run it against two commits (PYTHONPATH=<worktree>) to compare implementations.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import numpy as np
import torch

from objloader.augment import sample_params
from objloader.kernels.cpu_ops import apply_device_ops_cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args(argv)
    b, s = args.batch, args.size
    g = torch.Generator().manual_seed(0)
    views = torch.randint(0, 256, (b, 2, 3, s, s), dtype=torch.uint8, generator=g)
    masks = torch.randint(0, 256, (b, 2, 1, s, s), dtype=torch.uint8, generator=g)
    patches = torch.randint(0, 256, (b, 3, s // 2, s // 2), dtype=torch.uint8, generator=g)
    params = sample_params(0, 0, np.arange(b), has_bg=np.ones(b, bool), image_sizes=np.full((b, 2), s), views=2,
                           p_mix=0.4, color="mocov2")
    off = np.zeros(params.mix.shape, bool)
    variants = {
        "full (MoCo v2, p_mix 0.4)": params,
        "without blur": dataclasses.replace(params, blur=off),
        "without colour jitter": dataclasses.replace(params, jitter=off),
        "blur only": dataclasses.replace(params, jitter=off, mix=off, grayscale=off),
        "colour jitter only": dataclasses.replace(params, blur=off, mix=off, grayscale=off),
        "BG-Mixup only": dataclasses.replace(params, jitter=off, blur=off, grayscale=off),
        "normalise only": dataclasses.replace(params, jitter=off, blur=off, grayscale=off, mix=off),
    }
    print(f"batch {b} x 2 views at {s} px, {torch.get_num_threads()} threads; median / min of {args.reps} calls")
    for name, q in variants.items():
        apply_device_ops_cpu(views, masks, patches, q)  # compile and warm up
        t = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            apply_device_ops_cpu(views, masks, patches, q)
            t.append(time.perf_counter() - t0)
        med = statistics.median(t)
        print(f"{name:28s} {1e3 * med:7.1f} ms  (min {1e3 * min(t):6.1f})  {b / med:7.0f} img/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
