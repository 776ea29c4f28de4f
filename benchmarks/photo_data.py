"""An ImageNet-like image set for benchmarks at the settings users run (generated once, cached).

    python benchmarks/photo_data.py OUT [--images 3000] [--classes 10] [--seed 0] [--long-side 400 500]

ImageFolder layout, as torchvision's ``ImageFolder`` and ``objloader-build --gt-masks`` read it:
``OUT/images/<class>/<id>.jpg`` (JPEG quality 90, long side 400-500 px by default, aspect 3:4 to 4:3) and
``OUT/masks/<class>/<id>.png`` (the object's exact mask). Every pixel is real photo content:
the background is a random crop of one of scikit-image's bundled photos, scaled, flipped and
tinted; the object is a crop of the class's own photo, cut out by a random smooth blob (10-45 %
of the image). ``OUT/photo_data.json`` is written last, with the options and the set's mean
size and bytes, so a set interrupted half-way is regenerated rather than used.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from multiprocessing import Pool

import cv2
import numpy as np

VERSION = 1
LONG_SIDE = (400, 500)  # default long side range, px (ImageNet-like); the cached options omit it
# Colour photos of scikit-image (bundled in its wheel, no download): each class's objects are
# cut from one of them; backgrounds come from any of these and the grey ones, tinted.
_CLASS_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                 "retina", "colorwheel", "stereo_motorcycle", "logo", "coins", "camera")
_BACKGROUND_PHOTOS = _CLASS_PHOTOS + ("brick", "grass", "gravel", "moon", "clock", "page", "text")


def _load(name: str) -> np.ndarray:
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / max(float(img.max()), 1.0))).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


_PHOTOS: dict = {}


def _photo(name: str) -> np.ndarray:
    if name not in _PHOTOS:
        _PHOTOS[name] = _load(name)
    return _PHOTOS[name]


def _random_crop(rng, photo: np.ndarray, height: int, width: int) -> np.ndarray:
    """A crop of ``photo`` with the aspect of (height, width), 30-100 % of its shorter side,
    resized to (height, width), flipped half the time, tinted per channel and in gamma."""
    ph, pw = photo.shape[:2]
    aspect = width / height
    side = rng.uniform(0.3, 1.0)
    ch = int(min(ph, pw / aspect) * side)
    cw = max(int(ch * aspect), 1)
    ch = max(ch, 1)
    y, x = int(rng.integers(0, ph - ch + 1)), int(rng.integers(0, pw - cw + 1))
    crop = cv2.resize(photo[y:y + ch, x:x + cw], (width, height), interpolation=cv2.INTER_AREA
                      if cw > width else cv2.INTER_CUBIC)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    gain = rng.uniform(0.8, 1.2, 3)
    gamma = rng.uniform(0.8, 1.25)
    out = 255.0 * (crop.astype(np.float32) / 255.0) ** gamma * gain
    return np.clip(out, 0, 255).astype(np.uint8)


def _blob(rng, height: int, width: int) -> np.ndarray:
    """A smooth star-shaped blob covering 10-45 % of the image: a radius function of a few
    random harmonics around a random centre -> uint8 mask (255 = object)."""
    area = rng.uniform(0.10, 0.45) * height * width
    r0 = math.sqrt(area / math.pi)
    cy = rng.uniform(r0, height - r0) if height > 2 * r0 else height / 2
    cx = rng.uniform(r0, width - r0) if width > 2 * r0 else width / 2
    theta = np.linspace(0, 2 * np.pi, 128, endpoint=False)
    radius = np.ones_like(theta)
    for k in (2, 3, 5):
        radius += rng.uniform(0, 0.35 / k * 2) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    pts = np.stack([cx + r0 * radius * np.cos(theta), cy + r0 * radius * np.sin(theta)], 1)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 255)
    return mask


def _complete(path: str, ending: bytes) -> bool:
    """The file is there and ends as a whole JPEG (EOI marker) or PNG (IEND chunk) does."""
    try:
        with open(path, "rb") as f:
            f.seek(-len(ending), os.SEEK_END)
            return f.read() == ending
    except OSError:
        return False


def _one(job) -> tuple[int, int, int, int]:
    """Write image ``i`` and its mask (or, with ``reuse``, keep them when an interrupted run of the
    same options wrote both whole); -> (i, width, height, JPEG bytes)."""
    out, i, label, seed, (lo, hi), reuse = job
    rng = np.random.default_rng([seed, i])
    long_side = int(rng.integers(lo, hi + 1))
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    width, height = (long_side, int(round(long_side / aspect))) if aspect >= 1 else (int(round(long_side * aspect)), long_side)
    name, cls = f"{i:06d}", f"class{label:02d}"
    jpg = os.path.join(out, "images", cls, name + ".jpg")
    png = os.path.join(out, "masks", cls, name + ".png")
    if reuse and _complete(jpg, b"\xff\xd9") and _complete(png, b"IEND\xaeB`\x82"):
        return i, width, height, os.path.getsize(jpg)
    others = [n for n in _BACKGROUND_PHOTOS if n != _CLASS_PHOTOS[label]]
    image = _random_crop(rng, _photo(others[int(rng.integers(len(others)))]), height, width)
    obj = _random_crop(rng, _photo(_CLASS_PHOTOS[label]), height, width)
    mask = _blob(rng, height, width)
    soft = cv2.GaussianBlur(mask, (0, 0), 1.0).astype(np.float32)[:, :, None] / 255.0  # no cut-out seam
    image = (soft * obj + (1 - soft) * image).astype(np.uint8)
    cv2.imwrite(jpg, image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    cv2.imwrite(png, mask)
    return i, width, height, os.path.getsize(jpg)


def photo_set(out: str, images: int = 3000, classes: int = 10, seed: int = 0, workers: int | None = None,
              log=print, long_side: tuple = LONG_SIDE) -> dict:
    """The set under ``out`` (generated unless a complete one with the same options is there);
    returns its photo_data.json record. ``long_side``: (min, max) of the images' long side, px."""
    if not 1 <= classes <= len(_CLASS_PHOTOS):
        raise SystemExit(f"photo_data: classes must be in [1, {len(_CLASS_PHOTOS)}]")
    lo, hi = int(long_side[0]), int(long_side[1])
    if not 8 <= lo <= hi:
        raise SystemExit(f"photo_data: long side must satisfy 8 <= MIN <= MAX, got {lo} {hi}")
    options = {"version": VERSION, "images": images, "classes": classes, "seed": seed}
    if (lo, hi) != LONG_SIDE:  # only then, so sets cached before the option existed stay valid
        options["long_side"] = [lo, hi]
    marker = os.path.join(out, "photo_data.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            info = json.load(f)
        if info.get("options") == options:
            return info
    for c in range(classes):
        os.makedirs(os.path.join(out, "images", f"class{c:02d}"), exist_ok=True)
        os.makedirs(os.path.join(out, "masks", f"class{c:02d}"), exist_ok=True)
    # An interrupted run of the same options left photo_data.partial.json: its whole files are kept.
    started = os.path.join(out, "photo_data.partial.json")
    reuse = os.path.isfile(started) and json.load(open(started)) == options
    with open(started, "w") as f:
        json.dump(options, f)
    log(f"photo_data: generating {images} JPEGs under {out}" + (" (resuming)" if reuse else ""))
    jobs = [(out, i, i % classes, seed, (lo, hi), reuse) for i in range(images)]
    rows, step = [], max(images // 10, 10000)  # a progress line per 10 % of a large set
    with Pool(workers or os.cpu_count() or 1) as pool:
        for row in pool.imap(_one, jobs, chunksize=32):
            rows.append(row)
            if len(rows) % step == 0 and len(rows) < images:
                log(f"photo_data: {len(rows)}/{images}")
    rows = np.array(rows, np.float64)
    info = {"options": options, "images": images,
            "mean_width": float(rows[:, 1].mean()), "mean_height": float(rows[:, 2].mean()),
            "mean_kb": float(rows[:, 3].mean() / 1000)}
    tmp = marker + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, marker)
    os.remove(started)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long-side", type=int, nargs=2, default=LONG_SIDE, metavar=("MIN", "MAX"),
                   help="range of the images' long side, px")
    a = p.parse_args(argv)
    print(json.dumps(photo_set(a.out, a.images, a.classes, a.seed, long_side=tuple(a.long_side))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
