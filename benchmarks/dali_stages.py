"""Where the DALI engine's time goes on the CPU, op by op: the engine's pipeline rebuilt stage by
stage on the same pre-read batches, each stage adding one piece of the +both pipeline.

    python benchmarks/dali_stages.py [--data demo/photos/built] [--image-size 224] [--batch-size 64]
                                     [--threads 2] [--batches 15] [--repeats 3]

The external source returns batches read and sampled beforehand (the engine's own
_EpochSource, called once per batch up front), so every figure is DALI's work alone: no reading,
no sampling, no Python workers. Stages (images/s of the pipeline, each 2 views a record):

- decode: decoders.image only
- +views: the two antialiased resizes with roi (one per view)
- +layout: each view flipped and made channels-first by crop_mirror_normalize, then stacked to
  [V, 3, S, S] (objloader's vanilla pipeline); and, for the record, the same done the engine's
  former way (fn.flip, fn.stack, fn.transpose)
- +masks: mask PNG decode for every record, its two resizes, flips, stack
- +masks, per view: the same with DALI conditionals, only for the views BG-Mixup mixes (the
  engine's CPU path)
- +patch: the background patch slice + resize + channels-first (objloader's +both pipeline)

plus the engine's +both pipeline itself (_build_pipeline) over its own source's batches (on the
CPU that source cuts the view masks, so the pipeline receives them; the cutting is timed alone,
in one process, as the source's row), and the CPU device stage (BG-Mixup blend, uint8 out) alone
on the engine's own batches. Round-robin repeats, medians. Writes benchmarks/results/dali_stages.{json,md}.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from dataclasses import replace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from throughput import git_state, machine  # noqa: E402
from objloader.loaders import dali_engine  # noqa: E402
from objloader.loaders import DeviceStage, EngineBatch, LoaderConfig  # noqa: E402
from objloader.store.reader import BuiltDataset  # noqa: E402
from objloader.store.schema import MEMBER  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P_MIX = 0.4


class _Replay:
    """A non-parallel external source replaying batches produced up front by the engine's source."""

    def __init__(self, batches: list, names: tuple):
        self.batches, self.names, self.k = batches, names, 0

    def __call__(self):
        out = self.batches[self.k % len(self.batches)]
        self.k += 1
        return out


WINDOWS = ("vanilla", "oa")
ENGINE, DEVICE = "engine +both pipeline", "device stage alone (BG-Mixup, uint8)"
SOURCE_MASKS = "engine's source: view masks cut (one process)"
STOCK = "stock-style: random_resized_crop + crop_mirror_normalize"
STAGES = ("decode", "+views", "+layout", "+masks", "+masks, per view", "+patch")
OLD_LAYOUT = "+layout as before (flip, stack, transpose)"


def _stage_pipeline(stage: str, replay: _Replay, cfg: LoaderConfig):
    """The pipeline up to ``stage`` (or OLD_LAYOUT: +views, then the layout ops the engine used
    until crop_mirror_normalize replaced them)."""
    from nvidia.dali import fn, pipeline_def, types

    s, p = cfg.image_size, cfg.patch
    old = stage == OLD_LAYOUT
    upto = STAGES.index("+layout") if old else STAGES.index(stage)
    conditional = upto >= STAGES.index("+masks, per view")
    laid_out = upto >= STAGES.index("+layout")

    def resize(x, start, end, size):
        return fn.resize(x, roi_start=start, roi_end=end, roi_relative=True, size=[size, size], antialias=True,
                         interp_type=types.INTERP_LINEAR)

    def chw(x, mirror=0):
        return fn.crop_mirror_normalize(x, mirror=mirror, output_layout="CHW", dtype=types.UINT8)

    def view(x, parts, v):
        out = resize(x, parts[f"start{v}"], parts[f"end{v}"], s)
        if old:
            return fn.flip(out, horizontal=parts[f"flip{v}"])
        return chw(out, parts[f"flip{v}"]) if laid_out else out

    def zeros(size, layout):
        shape = [1, size, size] if layout == "CHW" else [size, size, 1]
        return fn.constant(idata=0, shape=shape, dtype=types.UINT8, layout=layout)

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.num_workers, device_id=None, prefetch_queue_depth=2,
                  enable_conditionals=conditional)
    def pipe():
        parts = dict(zip(replay.names, fn.external_source(replay, num_outputs=len(replay.names), batch=True)))
        image = fn.decoders.image(parts["jpg"], device="cpu", output_type=types.RGB)
        if upto == 0:
            return image
        views = [view(image, parts, v) for v in range(cfg.views)]
        if old:
            return fn.transpose(fn.stack(*views), perm=[0, 3, 1, 2])
        out = [fn.stack(*views)] if laid_out else views
        if upto >= STAGES.index("+masks"):
            if conditional:
                if parts["any_mask"]:
                    mask = fn.decoders.image(parts["mask"], device="cpu", output_type=types.GRAY)
                else:
                    mask = zeros(1, "HWC")
                masks = []
                for v in range(cfg.views):
                    if parts[f"mask{v}"]:
                        m = view(mask, parts, v)
                    else:
                        m = zeros(s, "CHW")
                    masks.append(m)
            else:
                mask = fn.decoders.image(parts["mask"], device="cpu", output_type=types.GRAY)
                masks = [view(mask, parts, v) for v in range(cfg.views)]
            out.append(fn.stack(*masks))
        if upto >= STAGES.index("+patch"):
            region = fn.slice(image, parts["bg_anchor"], parts["bg_shape"], axes=[0, 1])
            patch = fn.resize(region, roi_start=parts["bg_start"], roi_end=parts["bg_end"], roi_relative=False,
                              size=[p, p], antialias=True, interp_type=types.INTERP_LINEAR)
            out.append(chw(patch))
        return tuple(out)

    return pipe()


def _stock_pipeline(replay: _Replay, cfg: LoaderConfig):
    """benchmarks/peers.py's stock DALI pipeline after its reader, on the replayed JPEGs."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=cfg.batch_size, num_threads=cfg.num_workers, device_id=None, prefetch_queue_depth=2,
                  seed=0)
    def pipe():
        parts = dict(zip(replay.names, fn.external_source(replay, num_outputs=len(replay.names), batch=True)))
        image = fn.decoders.image(parts["jpg"], device="cpu", output_type=types.RGB)
        views = [fn.crop_mirror_normalize(fn.random_resized_crop(image, size=[cfg.image_size] * 2,
                                                                 random_area=list(cfg.crop_scale),
                                                                 random_aspect_ratio=[3 / 4, 4 / 3], antialias=True),
                                          mirror=fn.random.coin_flip(), output_layout="CHW", dtype=types.UINT8)
                 for _ in range(cfg.views)]
        return tuple(views)

    return pipe()


class _ReplayWithInfo:
    """The replay behind the batch_info signature the engine's pipeline calls its source with."""

    def __init__(self, replay: _Replay, view_masks: bool):
        self.replay, self.names, self.view_masks = replay, replay.names, view_masks

    def __call__(self, info):
        return self.replay()


def _with_mix_flags(batch: tuple, names: tuple, cfg: LoaderConfig) -> tuple:
    """A PNG-mask source batch plus, per view, whether BG-Mixup mixes it, and whether any view of
    the sample is mixed (what the DALI conditionals of the '+masks, per view' stage branch on)."""
    from objloader.augment.params import mix_flags

    index = batch[names.index("index")]
    flags = mix_flags(cfg.seed, 0, index, views=cfg.views, p_mix=cfg.bg_mixup)
    return batch + tuple(np.ascontiguousarray(flags[:, v]) for v in range(cfg.views)) + (flags.any(axis=1),)


def _cut_masks_rate(source, replay: _Replay, cfg: LoaderConfig, ds: BuiltDataset, batches: int) -> float:
    """Images/s of the engine source's view-mask cutting alone, on the replayed batches' own
    windows and flips (the records' mask bytes read beforehand)."""
    from objloader.augment.params import mix_flags

    names, prepared = replay.names, []
    for batch in replay.batches:
        index = batch[names.index("index")]
        raws = [ds.raw(int(i), (MEMBER.mask,)) for i in index]
        prepared.append((index, raws, batch[names.index("window")], batch[names.index("flip")].astype(bool),
                         mix_flags(cfg.seed, 0, index, views=cfg.views, p_mix=cfg.bg_mixup)))
    source._cut_view_masks(*prepared[0])
    t = time.perf_counter()
    for k in range(batches):
        source._cut_view_masks(*prepared[k % len(prepared)])
    return batches * cfg.batch_size / (time.perf_counter() - t)


def time_pipeline(pipe, batches: int) -> float:
    pipe.run()  # fill
    t = time.perf_counter()
    for _ in range(batches):
        pipe.run()
    return batches * pipe.max_batch_size / (time.perf_counter() - t)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "demo", "photos", "built"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--batches", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results"))
    args = p.parse_args(argv)

    ds = BuiltDataset(args.data)
    n_batches = min(8, len(ds) // args.batch_size)

    class Info:
        epoch_idx = 0

        def __init__(self, k):
            self.iteration = k

    pipes, stages, engine_batches, cut_masks = {}, {}, {}, {}
    for windows in WINDOWS:
        cfg = LoaderConfig(batch_size=args.batch_size, image_size=args.image_size, oa_crop=windows == "oa",
                           bg_mixup=P_MIX, crop_scale=(0.2, 1.0), color="none", normalize=False, dtype=torch.uint8,
                           num_workers=args.threads)
        # The stages decode the mask PNGs in DALI (the engine's former CPU path, and still its GPU
        # path), with the per-view mix flags the former source gave; the engine's source cuts
        # the view masks itself (timed on its own below, SOURCE_MASKS).
        png_source = dali_engine._EpochSource(ds, cfg, first_epoch=0, view_masks=False)
        replay = _Replay([_with_mix_flags(png_source(Info(k)), png_source.names, cfg) for k in range(n_batches)],
                         png_source.names + tuple(f"mask{v}" for v in range(cfg.views)) + ("any_mask",))
        for name in STAGES + (OLD_LAYOUT,):
            pipes[windows, name] = _stage_pipeline(name, replay, cfg)
        source = dali_engine._EpochSource(ds, cfg, first_epoch=0, view_masks=True)
        engine_replay = _Replay([source(Info(k)) for k in range(n_batches)], source.names)
        pipes[windows, ENGINE] = dali_engine._build_pipeline(_ReplayWithInfo(engine_replay, True), cfg, None)
        cut_masks[windows] = lambda s=source, r=engine_replay, c=cfg: _cut_masks_rate(s, r, c, ds, args.batches)
        if windows == "vanilla":
            pipes[windows, STOCK] = _stock_pipeline(replay, cfg)
        for pipe in (q for (w, _), q in pipes.items() if w == windows):
            pipe.build()
        # The CPU device stage alone, on the engine pipeline's own batches.
        stages[windows], engine_batches[windows] = DeviceStage(cfg), []
        for k in range(n_batches):
            outs = dict(zip(dali_engine.pipeline_outputs(cfg), (np.array(o.as_tensor())
                                                                for o in pipes[windows, ENGINE].run())))
            views, masks, patches = (torch.from_numpy(outs[n]) for n in ("views", "masks", "patches"))
            engine_batches[windows].append(EngineBatch(
                views=views, masks=masks, patches=patches, index=outs["index"].reshape(-1),
                labels=torch.from_numpy(outs["label"].reshape(-1)), epoch=0,
                has_bg=outs["has_bg"].reshape(-1).astype(bool), window=outs["window"],
                flip=outs["flip"].astype(bool), box_index=outs["box_index"].reshape(-1)))

    def device_stage_rate(windows: str) -> float:
        stage, batches = stages[windows], engine_batches[windows]
        stage(batches[0])
        t = time.perf_counter()
        for k in range(args.batches):
            stage(batches[k % len(batches)])
        return args.batches * args.batch_size / (time.perf_counter() - t)

    runs = {**{key: (lambda pipe=pipe: time_pipeline(pipe, args.batches)) for key, pipe in pipes.items()},
            **{(w, DEVICE): (lambda w=w: device_stage_rate(w)) for w in WINDOWS},
            **{(w, SOURCE_MASKS): cut_masks[w] for w in WINDOWS}}
    rates = {key: [] for key in runs}
    keys = list(runs)
    for r in range(args.repeats):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            rates[key].append(runs[key]())
            print(f"repeat {r + 1}/{args.repeats} {key[0]} windows, {key[1]}: {rates[key][-1]:.0f} images/s", flush=True)

    med = {key: statistics.median(v) for key, v in rates.items()}
    ms = {key: 1000 * args.batch_size / v for key, v in med.items()}  # ms a batch
    added_to = {"+views": "decode", "+layout": "+views", "+masks": "+layout", "+masks, per view": "+layout",
                "+patch": "+masks, per view", OLD_LAYOUT: "+views"}
    rows = []
    for name in STAGES + (OLD_LAYOUT, ENGINE, SOURCE_MASKS, DEVICE, STOCK):
        row = {"stage": name}
        for w in WINDOWS:
            if (w, name) in med:
                row[w] = {"images_per_s": med[w, name], "ms_per_batch": ms[w, name],
                          "added_ms_per_batch": ms[w, name] - ms[w, added_to[name]] if name in added_to else None}
        rows.append(row)
    result = {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": git_state(), "command": " ".join(sys.argv), "data": {"path": args.data, "images": len(ds)},
              "settings": {"image_size": args.image_size, "batch_size": args.batch_size, "threads": args.threads,
                           "batches": args.batches, "repeats": args.repeats, "p_mix": P_MIX, "crop_scale": [0.2, 1.0]},
              "rates": {f"{w}|{name}": v for (w, name), v in rates.items()}, "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "dali_stages.json"), "w") as f:
        json.dump(result, f, indent=1)
    m = result["machine"]
    lines = [f"# The DALI engine's pipeline, stage by stage ({args.image_size} px, CPU)", "",
             f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), {result['date']}, commit {result['commit']['commit']}. "
             f"{len(ds)} records of {args.data}; batch {args.batch_size}, 2 views, {args.threads} DALI threads, "
             f"RandomResizedCrop scale (0.2, 1) windows (vanilla) or OA-Crop windows (oa), BG-Mixup {P_MIX}; "
             f"batches read and sampled beforehand (DALI's work only). Median of {args.repeats} round-robin repeats "
             f"of {args.batches} batches; ms a batch of {args.batch_size}.", "",
             "| stage | vanilla windows: images/s | ms | added ms | OA-Crop windows: images/s | ms | added ms |",
             "|---|---:|---:|---:|---:|---:|---:|"]

    def cells(row, w):
        if w not in row:
            return "— | — | —"
        c, added = row[w], row[w]["added_ms_per_batch"]
        return f"{c['images_per_s']:.0f} | {c['ms_per_batch']:.1f} | {'' if added is None else f'{added:+.1f}'}"

    for row in rows:
        lines.append(f"| {row['stage']} | {cells(row, 'vanilla')} | {cells(row, 'oa')} |")
    lines += ["", "Added: against +views for +layout and the former layout, against +layout for both mask variants "
              "(one without, one with DALI conditionals), against +masks, per view for +patch. The engine's pipeline "
              "receives view masks its source cut (the source's row: that work, in one Python worker, which DALI "
              "runs in parallel with its own threads). The device stage runs "
              "on the training thread after DALI. The stock-style row is what benchmarks/peers.py's stock DALI "
              "pipeline does after its file reader, on the same replayed JPEGs."]
    with open(os.path.join(args.out, "dali_stages.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
