"""Where the torch engine's time goes, part by part: one worker's batch and the main process's
device stage, timed alone in this process on the same records.

    python benchmarks/torch_stages.py [--data demo/photos/built] [--image-size 224] [--batch-size 64]
                                      [--batches 4] [--repeats 7]

Parts, ms a batch (the records of the first ``--batches`` batches of epoch 0, median of
``--repeats``): the record reads + JPEG decodes without and with the masks of the records one of
whose views BG-Mixup mixes; the two views per record (compiled resampler); the views plus the
mixed views' masks; the background patches; and the CPU device stage (BG-Mixup blend, uint8 out)
on the engine's batch. The worker parts run on one thread, as a worker does; the device stage on
the main process's threads. Writes benchmarks/results/torch_stages.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import git_state, machine  # noqa: E402
from objloader.augment.params import mix_flags, sample_geometry_batch  # noqa: E402
from objloader.loaders import make_loader  # noqa: E402
from objloader.loaders.resample import crop_views_into, cut_patch_into, table_arrays  # noqa: E402
from objloader.loaders.torch_engine import _BatchRequest, decode_record  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P_MIX = 0.4


def _median_ms(fn, repeats: int) -> float:
    fn()  # compiled and cached
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "demo", "photos", "built"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)
    s, b = args.image_size, args.batch_size
    loader = make_loader(args.data, "torch", batch_size=b, image_size=s, bg_mixup=P_MIX, color="none",
                         normalize=False, dtype=torch.uint8, device="cpu", num_workers=0, crop_scale=(0.2, 1.0))
    dataset, ds = loader.engine.dataset, loader.engine.dataset.ds
    order = loader.engine.sampler.order()
    no_mask = np.zeros((1, 1, 1), np.uint8)
    parts = {name: [] for name in ("read + decode", "read + decode, with the mixed records' masks", "views",
                                   "views + mixed views' masks", "background patches", "device stage (BG-Mixup)")}
    mixed_views = 0
    for k in range(args.batches):
        index = order[k * b:(k + 1) * b]
        mix = mix_flags(0, 0, index, views=2, p_mix=P_MIX)
        mixed_views += int(mix.sum())
        recs = [decode_record(ds, int(i), bool(mix[j].any())) for j, i in enumerate(index)]
        sizes = np.array([r["image"].shape[:2] for r in recs], np.int64)
        window, flip, _ = sample_geometry_batch(0, 0, index, sizes, np.array([r["n_boxes"] for r in recs]),
                                                np.stack([r["boxes"] for r in recs]), views=2, oa_crop=False,
                                                crop_scale=(0.2, 1.0))
        bg = np.stack([r["bg_rect"] for r in recs]).astype(np.float32)
        tables = table_arrays(s, 3, max(int(sizes.max()), 256), min(s, dataset.cfg.patch))
        views = np.empty((b, 2, 3, s, s), np.uint8)
        masks = np.empty((b, 2, 1, s, s), np.uint8)
        patches = np.empty((b, 3, dataset.cfg.patch, dataset.cfg.patch), np.uint8)
        none = np.zeros((b, 2), bool)

        def crop(with_masks):
            for j, r in enumerate(recs):
                mask = r["mask"] if with_masks and r["mask"] is not None else no_mask
                crop_views_into(r["image"], mask, window[j], flip[j], views[j], masks[j] if with_masks else masks[j, :0],
                                mix[j] if with_masks else none[j], *tables)

        def cut():
            for j, r in enumerate(recs):
                cut_patch_into(r["image"], bg[j], patches[j], *tables)

        eb = dataset.__getitems__(_BatchRequest((0, index)))
        parts["read + decode"].append(_median_ms(lambda: [decode_record(ds, int(i), False) for i in index], args.repeats))
        parts["read + decode, with the mixed records' masks"].append(_median_ms(
            lambda: [decode_record(ds, int(i), bool(mix[j].any())) for j, i in enumerate(index)], args.repeats))
        parts["views"].append(_median_ms(lambda: crop(False), args.repeats))
        parts["views + mixed views' masks"].append(_median_ms(lambda: crop(True), args.repeats))
        parts["background patches"].append(_median_ms(cut, args.repeats))
        fresh = [dataset.__getitems__(_BatchRequest((0, index))) for _ in range(args.repeats + 1)]  # blended in place
        parts["device stage (BG-Mixup)"].append(_median_ms(lambda: loader.device_stage(fresh.pop()), args.repeats))
        del eb
    ms = {name: statistics.median(v) for name, v in parts.items()}
    worker_vanilla = ms["read + decode"] + ms["views"]
    worker_mix = ms["read + decode, with the mixed records' masks"] + ms["views + mixed views' masks"] + ms["background patches"]
    result = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_state(), "command": " ".join(["python", "benchmarks/torch_stages.py", *(argv or sys.argv[1:])]),
              "data": {"path": args.data, "images": len(ds)},
              "settings": {"image_size": s, "batch_size": b, "batches": args.batches, "repeats": args.repeats,
                           "p_mix": P_MIX, "crop_scale": [0.2, 1.0], "patch": dataset.cfg.patch,
                           "mixed_views_per_batch": mixed_views / args.batches},
              "ms_per_batch": ms, "worker_vanilla_ms": worker_vanilla, "worker_bg_mixup_ms": worker_mix,
              "worker_added_share": worker_mix / worker_vanilla - 1}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "torch_stages.json"), "w") as f:
        json.dump(result, f, indent=1)
    m = result["machine"]
    lines = [f"# The torch engine, part by part ({s} px, CPU)", "",
             f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), {result['date']}, commit {result['commit']['commit']}"
             + (" + uncommitted changes" if result["commit"].get("uncommitted") else "") + ". "
             f"{len(ds)} records of {args.data}; batch {b}, 2 views, RandomResizedCrop scale (0.2, 1), BG-Mixup {P_MIX} "
             f"({result['settings']['mixed_views_per_batch']:.0f} mixed views a batch), patch {dataset.cfg.patch} px. "
             f"Median of {args.repeats} repeats on each of {args.batches} batches, then the median over batches; "
             "worker parts on one thread.", "",
             "| part | ms a batch |", "|---|---:|"]
    lines += [f"| {name} | {v:.1f} |" for name, v in ms.items()]
    lines += ["", f"A worker's batch: vanilla {worker_vanilla:.1f} ms (read + decode + views), with BG-Mixup's parts "
              f"{worker_mix:.1f} ms (+{100 * result['worker_added_share']:.0f} %), before the device stage's blend in "
              "the main process."]
    with open(os.path.join(args.out, "torch_stages.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
