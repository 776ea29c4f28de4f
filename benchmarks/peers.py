"""objloader against the stock loaders users run today, at ImageNet-like settings, in one command.

    python benchmarks/photo_data.py ...   (called for you: the image set, generated once, cached)
    python benchmarks/peers.py [--data DIR] [--images 3000] [--repeats 5] [--batches 20]
                               [--batch-size 64] [--image-size 224] [--workers N] [--quick]

Data: ``benchmarks/photo_data.py`` (photo JPEGs, long side 400-500 px, quality 90, a mask beside
each), built once with ``objloader-build --gt-masks --max-res 512 --jpeg-quality 90`` (the
stored JPEGs keep their size and quality) and once as a stock FFCV beton (RGBImageField, JPEG,
quality 90): both preparation times are reported per 1,000 images.

Contestants, each written as its own documentation recommends, all with RandomResizedCrop
scale ``--crop-scale`` (MoCo v2's (0.2, 1) by default), ratio (3/4, 4/3), a horizontal flip, 2
views of ``--image-size`` px, ``--batch-size``, ``--workers`` (default: the cores):
- ``torchvision``: ``ImageFolder`` (``torchvision.io.decode_image``) + ``DataLoader`` +
  ``transforms.v2`` RandomResizedCrop(antialias) + flip per view, uint8 tensors;
- ``ffcv-stock``: ``Loader`` over the beton, two pipelines on the one image field
  (``RandomResizedCropRGBImageDecoder`` + ``RandomHorizontalFlip`` + ``ToTensor`` +
  ``ToTorchImage``), random order;
- ``dali-stock``: ``readers.file`` (random shuffle) -> ``decoders.image`` once ->
  ``random_resized_crop`` per view -> ``crop_mirror_normalize`` (uint8, CHW, random mirror) ->
  ``DALIGenericIterator``, on the CPU;
- ``objloader-torch|ffcv|dali``: vanilla / +OA-Crop / +BG-Mixup 0.4 / +both, with the colour
  ops off (uint8 out: the stock loaders' exact work) and with MoCo v2 colour + normalise.
Also the DALI engine's vanilla with 1 and 2 pipeline threads (its scaling with cores).

Protocol (benchmarks/throughput.py's): every loader built and warmed up once; then round-robin
repeats, the order rotated each repeat; per run one untimed batch then ``--batches`` timed
ones; between runs, wait until the benchmark's processes are idle. A repeat during which other
processes took over 5 % of the CPU is redone (up to twice). Medians with min-max.
Output: ``benchmarks/results/peers.{json,md,png}``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from objloader.loaders import make_loader  # noqa: E402
from objloader.store.schema import MANIFEST_FILE  # noqa: E402
from photo_data import photo_set  # noqa: E402
from throughput import _time_repeat, _wait_idle, git_state, machine  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")
P_MIX = 0.4
OPS = {"vanilla": (False, 0.0), "oa_crop": (True, 0.0), "bg_mixup": (False, P_MIX), "both": (True, P_MIX)}
DISTURBED = 0.05  # a repeat during which other processes took more of the CPU is redone


class Contestant:
    """One loader under test: ``set_epoch``, ``iter`` yielding batches; images per batch fixed."""

    def __init__(self, loader: str, ops: str, colour: str, build, note: str = ""):
        self.loader, self.ops, self.colour, self.build_fn, self.note = loader, ops, colour, build, note
        self.obj = None
        self.images_per_s: list = []
        self.other_cpu: list = []
        self.error = None

    @property
    def name(self) -> str:
        return f"{self.loader} {self.ops} colour={self.colour}{' ' + self.note if self.note else ''}"

    # the loader interface throughput._time_repeat times
    def set_epoch(self, epoch):
        self.obj.set_epoch(epoch)

    def __iter__(self):
        while True:  # a timed run may cross an epoch's end: carry on into the next
            for batch in self.obj:
                yield batch


# --------------------------------------------------------------------------------------------
# Stock loaders
# --------------------------------------------------------------------------------------------


class _TwoViews:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, x):
        return [self.transform(x), self.transform(x)]


def _decode(path: str):
    import torchvision.io

    return torchvision.io.decode_image(path, mode=torchvision.io.ImageReadMode.RGB)


class _EpochLoader:
    """A DataLoader with a sampler re-seeded by set_epoch (as DistributedSampler users do)."""

    def __init__(self, dataset, args):
        from torch.utils.data import DataLoader, RandomSampler

        self.generator = torch.Generator()
        self.loader = DataLoader(dataset, batch_size=args.batch_size, sampler=RandomSampler(dataset, generator=self.generator),
                                 num_workers=args.workers, drop_last=True, persistent_workers=True, prefetch_factor=4)

    def set_epoch(self, epoch):
        self.generator.manual_seed(epoch)

    def __iter__(self):
        return iter(self.loader)


def torchvision_loader(args):
    from torchvision import datasets
    from torchvision.transforms import v2

    view = v2.Compose([v2.RandomResizedCrop(args.image_size, scale=tuple(args.crop_scale), antialias=True),
                       v2.RandomHorizontalFlip()])
    dataset = datasets.ImageFolder(os.path.join(args.data, "images"), loader=_decode, transform=_TwoViews(view))
    return _EpochLoader(dataset, args)


def write_stock_beton(args, path: str) -> float:
    """The images as FFCV's docs write them (RGBImageField, JPEG at quality 90, no resize);
    -> seconds taken (0 when cached)."""
    if os.path.isfile(path):
        return 0.0
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    from torchvision import datasets

    dataset = datasets.ImageFolder(os.path.join(args.data, "images"))  # PIL images, labels
    start = time.perf_counter()
    writer = DatasetWriter(path + ".tmp", {"image": RGBImageField(write_mode="jpg", jpeg_quality=90),
                                           "label": IntField()}, num_workers=args.workers)
    writer.from_indexed_dataset(dataset)
    os.replace(path + ".tmp", path)
    return time.perf_counter() - start


class _FFCVStock:
    def __init__(self, beton, args):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.decoders import RandomResizedCropRGBImageDecoder
        from ffcv.loader import Loader, OrderOption
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

        def view():
            return PipelineSpec("image", decoder=RandomResizedCropRGBImageDecoder(
                (args.image_size, args.image_size), scale=tuple(args.crop_scale)),
                transforms=[RandomHorizontalFlip(), ToTensor(), ToTorchImage()])

        self.loader = Loader(beton, batch_size=args.batch_size, num_workers=args.workers, order=OrderOption.RANDOM,
                             drop_last=True, seed=0, pipelines={"image": view(), "image2": view(), "label": [IntDecoder()]})

    def set_epoch(self, epoch):
        pass  # ffcv reseeds its RANDOM order by epoch itself

    def __iter__(self):
        return iter(self.loader)


class _DALIStock:
    def __init__(self, args):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        s = args.image_size

        @pipeline_def(batch_size=args.batch_size, num_threads=args.workers, device_id=None, seed=0)
        def pipe():
            jpegs, labels = fn.readers.file(file_root=os.path.join(args.data, "images"), random_shuffle=True,
                                            name="reader")
            images = fn.decoders.image(jpegs, device="cpu", output_type=types.RGB)
            views = []
            for _ in range(2):
                crop = fn.random_resized_crop(images, size=[s, s], random_area=list(args.crop_scale),
                                              random_aspect_ratio=[3 / 4, 4 / 3], antialias=True)
                views.append(fn.crop_mirror_normalize(crop, dtype=types.UINT8, output_layout="CHW",
                                                      mirror=fn.random.coin_flip()))
            return (*views, labels)

        self.pipe = pipe()
        self.pipe.build()
        self.iter = DALIGenericIterator([self.pipe], ["view0", "view1", "label"], reader_name="reader",
                                        auto_reset=True)

    def set_epoch(self, epoch):
        pass

    def __iter__(self):
        return iter(self.iter)


# --------------------------------------------------------------------------------------------
# Plan, data, report
# --------------------------------------------------------------------------------------------


def objloader_loader(args, engine, ops, colour, workers=None):
    oa_crop, bg_mixup = OPS[ops]
    raw = colour == "off"
    return make_loader(args.built, engine, batch_size=args.batch_size, image_size=args.image_size, oa_crop=oa_crop,
                       bg_mixup=bg_mixup, crop_scale=tuple(args.crop_scale), color="none" if raw else "mocov2",
                       normalize=not raw, dtype=torch.uint8 if raw else torch.float32, device="cpu", seed=0,
                       num_workers=workers or args.workers)


def plan(args) -> list:
    runs = []
    if "torchvision" in args.loaders:
        runs.append(Contestant("torchvision", "vanilla", "off", lambda: torchvision_loader(args)))
    for engine in ("torch", "ffcv", "dali"):
        if f"objloader-{engine}" not in args.loaders:
            continue
        if engine == "ffcv" and "ffcv-stock" in args.loaders:
            runs.append(Contestant("ffcv-stock", "vanilla", "off", lambda: _FFCVStock(args.stock_beton, args)))
        if engine == "dali" and "dali-stock" in args.loaders:
            runs.append(Contestant("dali-stock", "vanilla", "off", lambda: _DALIStock(args)))
        for colour in ("off", "mocov2"):
            for ops in OPS:
                runs.append(Contestant(f"objloader-{engine}", ops, colour,
                                       lambda e=engine, o=ops, c=colour: objloader_loader(args, e, o, c)))
        if engine == "dali" and args.workers > 1:  # the DALI engine's scaling with pipeline threads
            for threads in (1, args.workers):
                runs.append(Contestant("objloader-dali", "vanilla", "off",
                                       lambda t=threads: objloader_loader(args, "dali", "vanilla", "off", t),
                                       note=f"threads={threads}"))
    return runs


def prepare(args) -> dict:
    """The photo set, its objloader build and the stock beton; preparation seconds per 1,000."""
    info = photo_set(args.data, images=args.images, log=lambda m: print(m, flush=True))
    prep = {}
    if not os.path.isfile(os.path.join(args.built, MANIFEST_FILE)):
        from objloader.cli import build as build_cli

        print(f"objloader-build {args.data}/images {args.built}", flush=True)
        start = time.perf_counter()
        if build_cli.main([os.path.join(args.data, "images"), args.built, "--gt-masks", os.path.join(args.data, "masks"),
                           "--masks", "gt", "--max-res", "512", "--jpeg-quality", "90", "--overwrite"]):
            sys.exit("peers: objloader-build failed")
        prep["objloader-build (ffcv+wds)"] = (time.perf_counter() - start) / info["images"] * 1000
    if "ffcv-stock" in args.loaders:
        seconds = write_stock_beton(args, args.stock_beton)
        if seconds:
            prep["ffcv-stock beton"] = seconds / info["images"] * 1000
    prep_file = os.path.join(args.data, "preparation.json")  # cached builds keep their first timing
    old = json.load(open(prep_file)) if os.path.isfile(prep_file) else {}
    old.update(prep)
    with open(prep_file, "w") as f:
        json.dump(old, f, indent=1)
    return {"data": info, "prep_s_per_1000": {"torchvision": 0.0, "dali-stock": 0.0, **old}}


def _stats(xs):
    return {"median": round(statistics.median(xs), 1), "min": round(min(xs), 1), "max": round(max(xs), 1)} if xs else None


def summarise(args, runs, prepared, cores) -> dict:
    rows = []
    for r in runs:
        row = {"loader": r.loader, "ops": r.ops, "colour": r.colour, "images_per_s": _stats(r.images_per_s),
               "per_core": round(statistics.median(r.images_per_s) / cores, 1) if r.images_per_s else None,
               "other_cpu_share": round(max(r.other_cpu), 4) if r.other_cpu else None,
               "repeats": [round(x, 1) for x in r.images_per_s]}
        if r.note:
            row["note"] = r.note
        if r.error:
            row["error"] = r.error
        rows.append(row)
    d = prepared["data"]
    return {"machine": machine(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_state(), "command": " ".join(sys.argv),
            "data": {"images": d["images"], "mean_width": round(d["mean_width"], 1),
                     "mean_height": round(d["mean_height"], 1), "mean_kb": round(d["mean_kb"], 1)},
            "settings": {"image_size": args.image_size, "views": 2, "batch_size": args.batch_size,
                         "workers": args.workers, "crop_scale": list(args.crop_scale), "repeats": args.repeats,
                         "batches": args.batches},
            "prep_s_per_1000_images": {k: round(v, 2) for k, v in prepared["prep_s_per_1000"].items()},
            "rows": rows}


def _row(result, loader, ops, colour, note=None):
    """The result row of one contestant, or None."""
    return next((row for row in result["rows"]
                 if (row["loader"], row["ops"], row["colour"], row.get("note")) == (loader, ops, colour, note)), None)


def _median_of(result, loader, ops, colour):
    row = _row(result, loader, ops, colour)
    return row["images_per_s"]["median"] if row and row["images_per_s"] else None


def markdown(result) -> str:
    d, st, m = result["data"], result["settings"], result["machine"]
    lines = [f"# objloader against the stock loaders ({st['image_size']} px)", "",
             f"{m.get('cpu', '?')} ({m.get('cores', '?')} cores), {result['date']}, commit {result['commit']['commit']}"
             f"{' + uncommitted changes' if result['commit']['uncommitted'] else ''}.",
             f"Data: {d['images']} photo JPEGs (benchmarks/photo_data.py), mean {d['mean_width']:.0f} x "
             f"{d['mean_height']:.0f} px, {d['mean_kb']:.0f} KB. {st['image_size']}-px views, 2 per image, batch "
             f"{st['batch_size']}, {st['workers']} workers, RandomResizedCrop scale {tuple(st['crop_scale'])} for every "
             f"loader. Images/s, median (min-max) of {st['repeats']} round-robin repeats of {st['batches']} batches.", "",
             "| loader | colour | vanilla | +OA-Crop | +BG-Mixup 0.4 | +both | +both vs vanilla |",
             "|---|---|---:|---:|---:|---:|---:|"]

    def cell(loader, ops, colour):
        row = _row(result, loader, ops, colour)
        if row is None:
            return "—"
        s = row["images_per_s"]
        return "error" if s is None else f"{s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f})"

    seen = []
    for row in result["rows"]:
        key = (row["loader"], row["colour"])
        if row.get("note") or key in seen:
            continue
        seen.append(key)
        van, both = _median_of(result, key[0], "vanilla", key[1]), _median_of(result, key[0], "both", key[1])
        cost = f"{(van / both - 1) * 100:+.0f} %" if van and both else "—"
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cell(key[0], o, key[1]) for o in OPS) + f" | {cost} |")
    lines += ["", "+both vs vanilla: the time per image that OA-Crop + BG-Mixup add to the same engine's vanilla "
              "pipeline ((vanilla / +both - 1) x 100)."]
    threads = [row for row in result["rows"] if row.get("note", "").startswith("threads=")]
    if threads:
        one = next((r for r in threads if r["note"] == "threads=1"), None)
        lines += ["", "DALI engine, vanilla, colour off, by pipeline threads:", "", "| threads | images/s | per thread | efficiency |",
                  "|---:|---:|---:|---:|"]
        for r in threads:
            t = int(r["note"].split("=")[1])
            s = r["images_per_s"]["median"] if r["images_per_s"] else None
            eff = f"{s / t / one['images_per_s']['median'] * 100:.0f} %" if s and one and one["images_per_s"] else "—"
            lines.append(f"| {t} | {s:.0f} | {s / t:.0f} | {eff} |" if s else f"| {t} | error | | |")
    lines += ["", "One-off preparation, seconds per 1,000 images:", ""]
    lines += [f"- {k}: {v:.1f}" for k, v in result["prep_s_per_1000_images"].items()]
    errors = [r for r in result["rows"] if r.get("error")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {r['loader']} {r['ops']} {r['colour']}: {r['error']}" for r in errors]
    return "\n".join(lines) + "\n"


def plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if not r.get("note") and r["images_per_s"]]
    labels = [f"{r['loader']} {r['ops']} {r['colour']}" for r in rows]
    values = [r["images_per_s"]["median"] for r in rows]
    lo = [v - r["images_per_s"]["min"] for v, r in zip(values, rows)]
    hi = [r["images_per_s"]["max"] - v for v, r in zip(values, rows)]
    colours = ["tab:grey" if not r["loader"].startswith("objloader") else
               {"vanilla": "tab:blue", "oa_crop": "tab:cyan", "bg_mixup": "tab:olive", "both": "tab:orange"}[r["ops"]]
               for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(rows) + 1.5))
    ax.barh(range(len(rows)), values, xerr=[lo, hi], color=colours)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    st, d = result["settings"], result["data"]
    ax.set_xlabel("images/s (2 views each)")
    ax.set_title(f"{st['image_size']} px views from {d['images']} photo JPEGs ~{d['mean_width']:.0f}x{d['mean_height']:.0f}, "
                 f"batch {st['batch_size']}, {st['workers']} workers", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(REPO, "demo", "photos"), help="photo set folder (generated if missing)")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.2, 1.0), metavar=("MIN", "MAX"))
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--loaders", default="torchvision,ffcv-stock,dali-stock,objloader-torch,objloader-ffcv,objloader-dali")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--quick", action="store_true", help="a smoke run: 300 images, 1 repeat of 2 batches of 16")
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.repeats, a.batches, a.warmup, a.batch_size = 300, 1, 2, 1, 16
        a.data = a.data + "_quick"
    a.loaders = a.loaders.split(",")
    a.built = os.path.join(a.data, "built")
    a.stock_beton = os.path.join(a.data, "stock.beton")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    prepared = prepare(args)
    runs = plan(args)
    cores = len(os.sched_getaffinity(0))
    for r in runs:  # build and warm up every loader once (FFCV compiles its pipeline on first use)
        print(f"warm-up: {r.name}", flush=True)
        try:
            r.obj = r.build_fn()
            r.set_epoch(0)
            it = iter(r)
            for _ in range(args.warmup):
                next(it)
            del it
        except Exception as e:  # noqa: BLE001 - reported, the others still run
            traceback.print_exc()
            r.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        _wait_idle()
    live = [r for r in runs if not r.error]
    for rep in range(args.repeats):
        order = live[rep % len(live):] + live[:rep % len(live)] if live else []
        for r in order:
            for attempt in range(3):
                ips, seconds, other = _time_repeat(SimpleNamespace(loader=r), rep + 1, args.batches, args.batch_size)
                _wait_idle()
                if other is None or other <= DISTURBED or attempt == 2:
                    break
                print(f"  disturbed ({other:.0%} other CPU): redo", flush=True)
            r.images_per_s.append(ips)
            r.other_cpu.append(other or 0.0)
            print(f"repeat {rep + 1}/{args.repeats} {r.name}: {ips:.0f} img/s (other CPU {other or 0:.1%})", flush=True)
    result = summarise(args, runs, prepared, cores)
    os.makedirs(args.out, exist_ok=True)
    stem = "peers_quick" if args.quick else "peers"
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(md)
    try:
        plot(result, os.path.join(args.out, stem + ".png"))
    except Exception:  # noqa: BLE001 - the numbers are written; a plot failure is reported only
        traceback.print_exc()
    print(md)
    os._exit(0)  # stock FFCV/DALI threads can keep the interpreter from exiting


if __name__ == "__main__":
    sys.exit(main())
