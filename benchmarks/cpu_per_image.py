"""CPU time per image of each engine's full pipeline, vanilla against +both: tells extra work
(more CPU per image) from stalls (fewer cores busy), which images/s alone cannot.

    python benchmarks/cpu_per_image.py [--data demo/built/train] [--engines torch,ffcv,dali]
                                       [--batches 48] [--repeats 3]

Per engine, vanilla and +both (OA-Crop + BG-Mixup p 0.4, MoCo v2 colour, CPU device stage)
alternate; each repeat starts an epoch, skips one batch, then times --batches batches of 64 at
112 px with 2 workers. CPU is the whole machine's busy time from /proc/stat (engine workers
may be grandchildren), so run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import os
import time

from objloader.loaders import make_loader

CONFIGS = {"vanilla": (False, 0.0), "+both": (True, 0.4)}


def busy_seconds() -> float:
    with open("/proc/stat") as f:
        ticks = [int(t) for t in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="demo/built/train")
    p.add_argument("--engines", default="torch,ffcv,dali")
    p.add_argument("--batches", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}, {os.cpu_count()} CPUs, {args.data}, batch 64, 112 px, "
          f"2 workers, {args.batches} batches per repeat")
    for engine in args.engines.split(","):
        loaders = {name: make_loader(args.data, engine, batch_size=64, image_size=112, num_workers=2, oa_crop=oa,
                                     bg_mixup=p_mix, color="mocov2") for name, (oa, p_mix) in CONFIGS.items()}
        for rep in range(args.repeats):
            for name, loader in loaders.items():
                loader.set_epoch(rep + 1)
                batches = iter(loader)
                next(batches)  # pipeline fill
                cpu0, t0 = busy_seconds(), time.perf_counter()
                for _ in range(args.batches):
                    next(batches)
                wall, cpu = time.perf_counter() - t0, busy_seconds() - cpu0
                n = args.batches * 64
                print(f"{engine:6s} {name:8s} repeat {rep}: {n / wall:5.0f} images/s, {cpu / wall:4.2f} cores busy, "
                      f"{1e3 * cpu / n:.3f} ms CPU per image", flush=True)
                del batches
                time.sleep(1)  # let prefetched work drain before the next run
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
