"""generate_demo: every image as an independent task (a worker pool when workers > 1), written
into a temporary folder that becomes OUT by one rename."""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

import cv2

from ...errors import DemoError
from ...ranges import SEED, WORKERS, Range, check_ranges
from .backgrounds import preload_photos
from .files import _assemble, _jpeg, _png, _write, rle_encode, tight_box
from .render import _multi_scene, _single
from .style import (BGCHALLENGE_VARIANTS, CLASSES, DEFAULT_BG_BIAS, DEFAULT_BG_SCENES, DEFAULT_N_MULTI,
                    DEFAULT_OBJECT_AREA, DEFAULT_PER_CLASS_TRAIN, DEFAULT_PER_CLASS_VAL, DEFAULT_RESOLUTION,
                    DEFAULT_VARIATION, MASK_SUFFIX, NUM_CLASSES, VARIANTS_WITH_MASK, Style)
from .variants import _bgchallenge_variants

# ----------------------------------------------------------------------------------------------
# Per-image tasks (run in worker processes; each writes its own files and returns provenance)
# ----------------------------------------------------------------------------------------------

def _task_single(args) -> dict:
    root, seed, split, cls, k, idx, res, style = args
    img, mask, fg, pool, source = _single(seed, split, cls, k, res, style)
    name = CLASSES[cls]
    ident = f"{idx:06d}"
    rel = f"{split}/{name}/{ident}"
    jpg = _jpeg(img)
    _write(root / f"{rel}.jpg", jpg)
    _write(root / f"{rel}{MASK_SUFFIX}", _png(mask))
    box = tight_box(mask)
    record = {"id": ident, "file": f"{rel}.jpg", "mask": f"{rel}{MASK_SUFFIX}", "label": cls,
              "bg_pool": pool, "bg_source": source, "bbox": box, "area": int(mask.sum())}
    if split != "val":
        return {"split": split, "record": record}

    # Background Challenge variants of this val image (Xiao et al. 2021), same id.
    variants, pools, sources, (sx, sy, sw, sh) = _bgchallenge_variants(seed, cls, k, img, mask, fg, pool, source,
                                                                       box, res, style)
    png = _png(mask)
    for v in BGCHALLENGE_VARIANTS:
        vrel = f"bgchallenge/{v}/{name}/{ident}"
        _write(root / f"{vrel}.jpg", jpg if v == "original" else _jpeg(variants[v]))
        if v in VARIANTS_WITH_MASK:
            _write(root / f"{vrel}{MASK_SUFFIX}", png)
    bgc = {"id": ident, "label": cls, "bbox": box, "bg_pool": pools, "bg_source": sources,
           "tile_strip": [sx, sy, sw, sh]}
    return {"split": split, "record": record, "bgchallenge": bgc}


def _task_multi(args) -> dict:
    root, seed, idx, res, style = args
    img, pool, source, objects = _multi_scene(seed, idx, res, style)
    ident = f"{idx:06d}"
    _write(root / "multi" / "images" / f"{ident}.jpg", _jpeg(img))
    anns = [{"category_id": c + 1, "bbox": tight_box(vis), "area": int(vis.sum()), "iscrowd": 0,
             "segmentation": rle_encode(vis)} for c, _, vis in objects]
    return {"split": "multi", "record": {"id": idx, "file_name": f"{ident}.jpg", "width": res, "height": res,
                                         "bg_pool": pool, "bg_source": source}, "annotations": anns}


def _run_task(task) -> dict:
    kind, args = task
    return _task_multi(args) if kind == "multi" else _task_single(args)


def _worker_init() -> None:
    cv2.setNumThreads(1)  # one image per process; avoid oversubscribing the cores


# The range of every numeric argument of generate_demo, which objloader-demo's flags share.
RANGES = {
    "per_class_train": Range(int, 0, 100_000),
    "per_class_val": Range(int, 0, 100_000),
    "n_multi": Range(int, 0, 1_000_000),
    "resolution": Range(int, 16, 1024),
    "seed": SEED,
    "bg_bias": Range(float, 0, 1, why="a probability"),
    "variation": Range(float, 0, 2),
    "object_area": Range(float, 0, 0.9, lo_open=True, why="a fraction of the image, each of min and max"),
    "bg_scenes": Range(int, 0, 100_000, why="0: a fresh background for every image"),
    "workers": Range(int, 1, WORKERS.hi, why=WORKERS.why),
}


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists():
        if not out.is_dir():
            raise DemoError(f"output {str(out)!r} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise DemoError(f"output directory {str(out)!r} exists and is not empty (use --overwrite to replace it)")


def generate_demo(
    out_dir,
    *,
    per_class_train: int = DEFAULT_PER_CLASS_TRAIN,
    per_class_val: int = DEFAULT_PER_CLASS_VAL,
    n_multi: int = DEFAULT_N_MULTI,
    resolution: int = DEFAULT_RESOLUTION,
    seed: int = 0,
    bg_bias: float = DEFAULT_BG_BIAS,
    variation: float = DEFAULT_VARIATION,
    object_area: Tuple[float, float] = DEFAULT_OBJECT_AREA,
    bg_scenes: int = DEFAULT_BG_SCENES,
    workers: Optional[int] = None,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Write the demo data set to `out_dir` (atomically) and return the contents of demo.json."""
    check_ranges(dict(per_class_train=per_class_train, per_class_val=per_class_val, n_multi=n_multi,
                      resolution=resolution, seed=seed, bg_bias=bg_bias, variation=variation, bg_scenes=bg_scenes,
                      workers=workers), {k: r for k, r in RANGES.items() if k != "object_area"}, "generate_demo",
                 DemoError)  # object_area is a pair: each bound is checked below
    bg_bias, variation = float(bg_bias), float(variation)
    try:
        area = (float(object_area[0]), float(object_area[1]))
    except (TypeError, ValueError, IndexError):
        raise DemoError(f"object_area must be two numbers (min, max), got {object_area!r}") from None
    for bound in area:
        RANGES["object_area"].check("object_area", bound, "generate_demo", DemoError)
    if area[0] > area[1]:
        raise DemoError(f"object_area must be (min, max) with min <= max, got {object_area!r}")
    style = Style(bg_bias, variation, area, int(bg_scenes))
    workers = default_workers() if workers is None else int(workers)
    out = Path(out_dir)
    _check_out(out, overwrite)

    # Generate next to the target and rename at the end, so OUT is either complete or absent.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f"{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        for split in ("train", "val"):
            for name in CLASSES:
                (tmp / split / name).mkdir(parents=True)
        for v in BGCHALLENGE_VARIANTS:
            for name in CLASSES:
                (tmp / "bgchallenge" / v / name).mkdir(parents=True)
        (tmp / "multi" / "images").mkdir(parents=True)

        # Ids run class-major within a split; randomness is keyed by (split, class, k), so the
        # first k images of a class do not change when the per-class count does.
        tasks = []
        for split, per_class in (("train", per_class_train), ("val", per_class_val)):
            for c in range(NUM_CLASSES):
                for k in range(per_class):
                    tasks.append(("single", (tmp, seed, split, c, k, c * per_class + k, resolution, style)))
        tasks += [("multi", (tmp, seed, i + 1, resolution, style)) for i in range(n_multi)]

        results = _run_all(tasks, workers, progress)
        marker = _assemble(tmp, results, seed=seed, resolution=resolution, style=style,
                           per_class_train=per_class_train, per_class_val=per_class_val, n_multi=n_multi)

        if out.exists():
            shutil.rmtree(out) if any(out.iterdir()) else out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return marker


def _run_all(tasks: list, workers: int, progress: bool) -> List[dict]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(tasks), desc="objloader-demo", unit="img", dynamic_ncols=True)
    results: List[dict] = []
    try:
        if workers == 1 or len(tasks) < 2:
            for t in tasks:
                results.append(_run_task(t))
                bar and bar.update()
        else:
            preload_photos()  # parent loads once; forked workers inherit the decoded photos
            with mp.get_context().Pool(min(workers, len(tasks)), initializer=_worker_init) as pool:
                # imap keeps task order, so the assembled json does not depend on scheduling.
                for r in pool.imap(_run_task, tasks, chunksize=4):
                    results.append(r)
                    bar and bar.update()
    finally:
        if bar is not None:
            bar.close()
    return results
