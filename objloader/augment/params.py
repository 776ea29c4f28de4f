"""Parameter sampler for the object-aware augmentations (draw first, apply later).

Like torchvision.transforms.v2's ``make_params``/``transform`` split, every random choice of a
training batch is drawn here, once, into plain numpy arrays (:class:`AugParams`). The appliers
(``reference.py``, the fused kernels, every engine) only *read* these arrays, so the same window
cuts the image, the mask and every engine's output, and tests can draw once and compare engines.

Reproducibility (DESIGN.md "Op semantics"): each (seed, epoch, sample index, view) owns one
``numpy.random.Generator``; a sample's parameters therefore never depend on which batch it lands
in or at which position. The only batch-dependent choice is the BG-Mixup partner, which must be
another member of the same batch; it is drawn from its own keyed generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["AugParams", "ColorConfig", "COLOR_PRESETS", "sample_params"]

# Stream tags appended to the generator key so the independent decisions of one
# (seed, epoch, index) never share random numbers.
_VIEW_STREAM = 0  # crop window, flip, mix flag, colour: key (seed, epoch, index, view, 0)
_PARTNER_STREAM = 1  # BG-Mixup partner: key (seed, epoch, index, view, 1)
_BOX_STREAM = 2  # OA-Crop box, shared by all views: key (seed, epoch, index, 0, 2)

# torchvision RandomResizedCrop defaults, used by MoCo v2 / BYOL.
_RRC_SCALE = (0.08, 1.0)
_RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)


@dataclass(frozen=True)
class ColorConfig:
    """Colour recipe of one SSL method; ``*_p`` are per-view probabilities (tuple = per view)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: tuple[float, ...] = (0.5,)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[float, ...] = (0.0,)

    def per_view(self, probs: tuple[float, ...], view: int) -> float:
        # A single value applies to every view; otherwise one value per view (BYOL's asymmetry).
        return probs[0] if len(probs) == 1 else probs[view]


COLOR_PRESETS: dict[str, ColorConfig | None] = {
    # MoCo v2 (Chen et al. 2020): ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, gray p 0.2, blur p 0.5.
    "mocov2": ColorConfig(),
    # BYOL (Grill et al. 2020): saturation 0.2, blur 1.0 / 0.1, solarise 0 / 0.2 on views 0 / 1.
    "byol": ColorConfig(saturation=0.2, blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)),
    "none": None,
}


@dataclass(frozen=True)
class AugParams:
    """Everything random about one batch, as numpy arrays indexed [sample, view].

    ``window`` is (x0, y0, x1, y1) in normalised image coordinates and always lies on whole
    pixels of the source image. ``partner`` indexes the patch tensor handed to the mixup op
    (the batch itself, optionally followed by ring-buffer patches); -1 = no partner found.
    ``jitter_order`` lists ops 0=brightness, 1=contrast, 2=saturation, 3=hue in applied order.
    """

    window: np.ndarray  # float32 [B, V, 4]
    flip: np.ndarray  # bool [B, V]
    box_index: np.ndarray  # int64 [B], -1 = whole image (OA-Crop off or no boxes)
    mix: np.ndarray  # bool [B, V], BG-Mixup requested for this view
    partner: np.ndarray  # int64 [B, V], -1 = none
    jitter: np.ndarray  # bool [B, V]
    brightness: np.ndarray  # float32 [B, V] multiplicative factor
    contrast: np.ndarray  # float32 [B, V]
    saturation: np.ndarray  # float32 [B, V]
    hue: np.ndarray  # float32 [B, V] shift in turns, [-0.5, 0.5]
    jitter_order: np.ndarray  # int64 [B, V, 4], a permutation of 0..3
    grayscale: np.ndarray  # bool [B, V]
    blur: np.ndarray  # bool [B, V]
    sigma: np.ndarray  # float32 [B, V], meaningful where blur
    solarize: np.ndarray  # bool [B, V]

    @property
    def batch_size(self) -> int:
        return self.window.shape[0]

    @property
    def views(self) -> int:
        return self.window.shape[1]


def _rng(seed: int, epoch: int, index: int, view: int, stream: int) -> np.random.Generator:
    # SeedSequence hashes the whole key, so neighbouring keys give unrelated streams.
    return np.random.default_rng([int(seed), int(epoch), int(index), int(view), stream])


def _box_pixels(box: np.ndarray, height: int, width: int) -> tuple[int, int, int, int]:
    """Whole-pixel region (left, top, right, bottom) lying inside a normalised box.

    Rounding inwards keeps every window inside the box; the 1e-4 pixel slack absorbs float32
    error in boxes stored from pixel coordinates. A box thinner than one pixel falls back to
    the pixel holding its centre, so a crop always exists.
    """
    x0, y0, x1, y1 = np.clip(box.astype(np.float64), 0.0, 1.0)
    eps = 1e-4

    def inner(lo: float, hi: float, size: int) -> tuple[int, int]:
        a, b = math.ceil(lo * size - eps), math.floor(hi * size + eps)
        a, b = max(a, 0), min(b, size)
        if b <= a:  # sub-pixel box: take the pixel containing its centre
            a = min(int((lo + hi) / 2 * size), size - 1)
            b = a + 1
        return a, b

    left, right = inner(x0, x1, width)
    top, bottom = inner(y0, y1, height)
    return left, top, right, bottom


def _resized_crop_window(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params on a (height, width) region: (top, left, h, w).

    Same logic as torchvision (10 tries of area/log-ratio rejection sampling, then the centre
    crop clamped to the ratio range), but drawing from our keyed numpy generator.
    """
    area = height * width
    log_ratio = (math.log(_RRC_RATIO[0]), math.log(_RRC_RATIO[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*_RRC_SCALE)
        aspect_ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: central crop with the aspect ratio clamped to the allowed range.
    in_ratio = width / height
    if in_ratio < min(_RRC_RATIO):
        w, h = width, int(round(width / min(_RRC_RATIO)))
    elif in_ratio > max(_RRC_RATIO):
        h, w = height, int(round(height * max(_RRC_RATIO)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(
    seed: int,
    epoch: int,
    indices,
    n_boxes=None,
    boxes=None,
    has_bg=None,
    *,
    image_sizes,
    views: int = 2,
    oa_crop: bool = False,
    p_mix: float = 0.0,
    color: str | ColorConfig = "mocov2",
) -> AugParams:
    """Draw the augmentation parameters of one batch.

    Args:
        seed, epoch: run seed and epoch; with the dataset index they key every generator.
        indices: int [B] dataset index of each batch member (not its batch position).
        n_boxes: int [B] number of valid rows in ``boxes`` (None = no boxes anywhere).
        boxes: float [B, K, 4] normalised (x0, y0, x1, y1), zero-padded.
        has_bg: bool [B] whether the sample has a background patch (non-empty ``bg_rect``);
            None = nobody has one.
        image_sizes: int [B, 2] the decoded image's (height, width) in pixels, so that windows
            fall on whole pixels exactly as torchvision's RandomResizedCrop would.
        views: views per sample (2 for MoCo v2 / BYOL).
        oa_crop: OA-Crop (paper Sec. 2.3): crop inside one box per sample.
        p_mix: per-view probability of BG-Mixup (paper eq. 4).
        color: "mocov2", "byol", "none" or a :class:`ColorConfig`.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    b = len(indices)
    sizes = np.asarray(image_sizes, dtype=np.int64).reshape(b, 2)
    n_boxes = np.zeros(b, np.int64) if n_boxes is None else np.asarray(n_boxes, np.int64).reshape(b)
    boxes = np.zeros((b, 0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32)
    has_bg = np.zeros(b, bool) if has_bg is None else np.asarray(has_bg, bool).reshape(b)
    if isinstance(color, str) and color not in COLOR_PRESETS:
        raise ValueError(f"unknown colour preset {color!r}; choose one of {sorted(COLOR_PRESETS)}")
    cfg = COLOR_PRESETS[color] if isinstance(color, str) else color

    shape = (b, views)
    out = dict(
        window=np.zeros(shape + (4,), np.float32),
        flip=np.zeros(shape, bool),
        box_index=np.full(b, -1, np.int64),
        mix=np.zeros(shape, bool),
        partner=np.full(shape, -1, np.int64),
        jitter=np.zeros(shape, bool),
        brightness=np.ones(shape, np.float32),
        contrast=np.ones(shape, np.float32),
        saturation=np.ones(shape, np.float32),
        hue=np.zeros(shape, np.float32),
        jitter_order=np.tile(np.arange(4, dtype=np.int64), shape + (1,)),
        grayscale=np.zeros(shape, bool),
        blur=np.zeros(shape, bool),
        sigma=np.zeros(shape, np.float32),
        solarize=np.zeros(shape, bool),
    )

    for i in range(b):
        height, width = int(sizes[i, 0]), int(sizes[i, 1])
        # OA-Crop: one box per sample, shared by its views, so both views see the same object.
        region = (0, 0, width, height)
        if oa_crop and n_boxes[i] > 0:
            box_rng = _rng(seed, epoch, indices[i], 0, _BOX_STREAM)
            k = int(box_rng.integers(0, n_boxes[i]))
            out["box_index"][i] = k
            region = _box_pixels(boxes[i, k], height, width)
        left0, top0, right0, bottom0 = region

        for v in range(views):
            rng = _rng(seed, epoch, indices[i], v, _VIEW_STREAM)
            # Geometry first (RandomResizedCrop then flip, as in the MoCo v2 / BYOL recipes).
            top, left, h, w = _resized_crop_window(rng, bottom0 - top0, right0 - left0)
            x0, y0 = left0 + left, top0 + top
            out["window"][i, v] = (x0 / width, y0 / height, (x0 + w) / width, (y0 + h) / height)
            out["flip"][i, v] = rng.random() < 0.5
            # Always consume the mix draw so toggling p_mix leaves the colour draws unchanged.
            out["mix"][i, v] = rng.random() < p_mix
            if cfg is not None:
                _draw_color(rng, cfg, v, out, i)

    # BG-Mixup partners (eq. 4): another batch member that has a background. This is the one
    # batch-dependent choice; its own generator keeps every other parameter batch-independent.
    for i in range(b):
        candidates = np.flatnonzero(has_bg & (np.arange(b) != i))
        for v in range(views):
            if out["mix"][i, v] and len(candidates) > 0:
                prng = _rng(seed, epoch, indices[i], v, _PARTNER_STREAM)
                out["partner"][i, v] = candidates[int(prng.integers(0, len(candidates)))]
            # else partner stays -1: the loader may substitute a ring-buffer patch, or leave it.

    return AugParams(**out)


def _draw_color(rng: np.random.Generator, cfg: ColorConfig, v: int, out: dict, i: int) -> None:
    """ColorJitter / grayscale / blur / solarise draws for view v of sample i.

    All values are drawn even when the op is off, so each op's draw count is fixed.
    """
    out["jitter"][i, v] = rng.random() < cfg.jitter_p
    # ColorJitter: factors uniform in [1 - s, 1 + s] (hue: [-h, h]), ops in random order.
    out["brightness"][i, v] = rng.uniform(max(0.0, 1 - cfg.brightness), 1 + cfg.brightness)
    out["contrast"][i, v] = rng.uniform(max(0.0, 1 - cfg.contrast), 1 + cfg.contrast)
    out["saturation"][i, v] = rng.uniform(max(0.0, 1 - cfg.saturation), 1 + cfg.saturation)
    out["hue"][i, v] = rng.uniform(-cfg.hue, cfg.hue)
    out["jitter_order"][i, v] = rng.permutation(4)
    out["grayscale"][i, v] = rng.random() < cfg.gray_p
    out["blur"][i, v] = rng.random() < cfg.per_view(cfg.blur_p, v)
    out["sigma"][i, v] = rng.uniform(*cfg.blur_sigma)
    out["solarize"][i, v] = rng.random() < cfg.per_view(cfg.solarize_p, v)
