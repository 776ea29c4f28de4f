"""Parameter sampler for the object-aware augmentations (draw first, apply later).

Like torchvision.transforms.v2's ``make_params``/``transform`` split, every random choice of a
training batch is drawn here into plain numpy arrays (:class:`AugParams`). The appliers
(``reference.py``, the fused kernels, every engine) only *read* these arrays, so the same window
cuts the image, the mask and every engine's output, and tests can draw once and compare engines.

Reproducibility (DESIGN.md "Op semantics"): every draw comes from a counter-based generator keyed
by (seed, epoch, sample index, view, stream). A sample's parameters therefore never depend on
which batch, worker, engine or position it lands in. The only batch-dependent choice is the
BG-Mixup partner, which must be another member of the same batch; it has its own stream.

The sampler is numba code so that engines can call it where the parameters are needed: the
geometry inside FFCV's compiled decoder and DALI's pipeline (it needs the decoded image size),
the appearance in the device stage. Two halves:

* :func:`sample_geometry` (engine stage): OA-Crop box, RandomResizedCrop window, flip.
* :func:`sample_appearance` (device stage): BG-Mixup flag and partner, colour parameters.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..errors import ConfigError
from .renamed import renamed_keywords

__all__ = [
    "AugParams",
    "ColorConfig",
    "COLOR_PRESETS",
    "resolve_color",
    "sample_params",
    "sample_geometry",
    "sample_appearance",
    "DEFAULT_CROP_SCALE",
    "check_crop_scale",
]

# Stream tags: the independent decisions of one (seed, epoch, index, view) never share numbers.
_GEOMETRY_STREAM = 0  # crop window and flip: key (seed, epoch, index, view, 0)
_PARTNER_STREAM = 1  # BG-Mixup partner: key (seed, epoch, index, view, 1)
_BOX_STREAM = 2  # OA-Crop box, shared by all views: key (seed, epoch, index, 0, 2)
_APPEARANCE_STREAM = 3  # mix flag and colour: key (seed, epoch, index, view, 3)

# RandomResizedCrop area range (a fraction of the region cropped from). torchvision's default
# (0.08, 1) is BYOL's; MoCo v2's published recipe (facebookresearch/moco, aug_plus) uses (0.2, 1).
DEFAULT_CROP_SCALE = (0.08, 1.0)
_RRC_LOG_RATIO = (math.log(3.0 / 4.0), math.log(4.0 / 3.0))


@dataclass(frozen=True)
class ColorConfig:
    """Colour recipe of one SSL method; ``*_p`` are per-view probabilities (tuple = per view)."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: tuple[float, ...] = (0.5,)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: tuple[float, ...] = (0.0,)

    def per_view(self, probs: tuple[float, ...], views: int) -> np.ndarray:
        """One probability per view: a single value applies to every view (BYOL: one each)."""
        if len(probs) == 1:
            return np.full(views, probs[0], np.float64)
        if len(probs) != views:
            raise ConfigError(f"colour recipe has {len(probs)} per-view probabilities for {views} views")
        return np.asarray(probs, np.float64)

    @property
    def gray_p(self) -> float:
        """Deprecated spelling of :attr:`grayscale_p`."""
        warnings.warn("ColorConfig.gray_p is deprecated; use grayscale_p", DeprecationWarning, stacklevel=2)
        return self.grayscale_p


# The field was gray_p before the API took torchvision's spelling (AugParams.grayscale).
ColorConfig.__init__ = renamed_keywords(gray_p="grayscale_p")(ColorConfig.__init__)


COLOR_PRESETS: dict[str, ColorConfig | None] = {
    # MoCo v2 (Chen et al. 2020): ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale p 0.2, blur p 0.5.
    "mocov2": ColorConfig(),
    # BYOL (Grill et al. 2020): saturation 0.2, blur 1.0 / 0.1, solarise 0 / 0.2 on views 0 / 1.
    "byol": ColorConfig(saturation=0.2, blur_p=(1.0, 0.1), solarize_p=(0.0, 0.2)),
    "none": None,
}


def resolve_color(color: str | ColorConfig | None) -> ColorConfig | None:
    if color is None or isinstance(color, ColorConfig):
        return color
    if color not in COLOR_PRESETS:
        raise ConfigError(f"unknown colour preset {color!r}; choose one of {sorted(COLOR_PRESETS)}")
    return COLOR_PRESETS[color]


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


# --------------------------------------------------------------------------------------------
# Counter-based generator: uniform(key, k) is the k-th draw of the stream `key`.
# --------------------------------------------------------------------------------------------

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


@njit(cache=True, inline="always")
def _mix64(z):
    # splitmix64's finaliser: a bijection of uint64 with full avalanche.
    z = (z ^ (z >> _S30)) * _MUL1
    z = (z ^ (z >> _S27)) * _MUL2
    return z ^ (z >> _S31)


@njit(cache=True)
def stream_key(seed, epoch, index, view, stream):
    """Hash of the whole key (seed, epoch, index, view, stream); neighbours are unrelated."""
    h = _mix64(np.uint64(seed) + _GOLDEN)
    h = _mix64(h ^ (np.uint64(epoch) + _GOLDEN))
    h = _mix64(h ^ (np.uint64(index) + _GOLDEN))
    h = _mix64(h ^ (np.uint64(view) + _GOLDEN))
    return _mix64(h ^ (np.uint64(stream) + _GOLDEN))


@njit(cache=True, inline="always")
def _uniform(key, k):
    """The k-th uniform double in [0, 1) of stream ``key`` (53 random bits)."""
    return float(_mix64(key + np.uint64(k + 1) * _GOLDEN) >> _S11) * (1.0 / 9007199254740992.0)


@njit(cache=True, inline="always")
def _below(u, n):
    """Integer uniform in [0, n) from a uniform double."""
    return min(int(u * n), n - 1)


# --------------------------------------------------------------------------------------------
# Geometry (engine stage): OA-Crop box, RandomResizedCrop window, flip
# --------------------------------------------------------------------------------------------


@njit(cache=True)
def _inner_span(lo, hi, size):
    """Whole pixels [a, b) inside the normalised span [lo, hi] of an axis of ``size`` pixels.

    Rounding inwards keeps every window inside the box; the 1e-4 pixel slack absorbs float32
    error in boxes stored from pixel coordinates. A span thinner than one pixel falls back to
    the pixel holding its centre, so a crop always exists.
    """
    lo, hi = min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)
    a = max(math.ceil(lo * size - 1e-4), 0)
    b = min(math.floor(hi * size + 1e-4), size)
    if b <= a:
        a = min(int((lo + hi) / 2 * size), size - 1)
        b = a + 1
    return a, b


@njit(cache=True)
def _resized_crop(key, height, width, scale_lo, scale_hi):
    """torchvision RandomResizedCrop.get_params(scale=(scale_lo, scale_hi)) on a (height, width)
    region -> (top, left, h, w).

    Same logic as torchvision: 10 tries of area / log-ratio rejection sampling (4 draws each),
    then the centre crop with the aspect ratio clamped to the allowed range.
    """
    area = height * width
    for t in range(10):
        target_area = area * (scale_lo + (scale_hi - scale_lo) * _uniform(key, 4 * t))
        log_r = _RRC_LOG_RATIO[0] + (_RRC_LOG_RATIO[1] - _RRC_LOG_RATIO[0]) * _uniform(key, 4 * t + 1)
        aspect_ratio = math.exp(log_r)
        w = int(np.rint(math.sqrt(target_area * aspect_ratio)))
        h = int(np.rint(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = _below(_uniform(key, 4 * t + 2), height - h + 1)
            left = _below(_uniform(key, 4 * t + 3), width - w + 1)
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < 3.0 / 4.0:
        w, h = width, int(np.rint(width / (3.0 / 4.0)))
    elif in_ratio > 4.0 / 3.0:
        h, w = height, int(np.rint(height * (4.0 / 3.0)))
    else:
        w, h = width, height
    h, w = min(h, height), min(w, width)
    return (height - h) // 2, (width - w) // 2, h, w


_FLIP_DRAW = 40  # after the 40 draws the crop may use


@njit(cache=True)
def sample_geometry(seed, epoch, index, height, width, boxes, n_boxes, oa_crop, scale_lo, scale_hi, window, flip):
    """Geometry of every view of one sample, written into ``window`` [V, 4] and ``flip`` [V].

    OA-Crop (paper Sec. 2.3): one box per sample, shared by its views so both see the same
    object; each view's RandomResizedCrop window lies inside it, then a flip with p = 0.5.
    Without OA-Crop, or without boxes, the region is the whole image; a window's area is a
    fraction in [scale_lo, scale_hi] of the region's. Returns the box index (-1 = whole image).
    """
    left0, top0, right0, bottom0 = 0, 0, width, height
    box_index = -1
    if oa_crop and n_boxes > 0:
        box_index = _below(_uniform(stream_key(seed, epoch, index, 0, _BOX_STREAM), 0), n_boxes)
        left0, right0 = _inner_span(boxes[box_index, 0], boxes[box_index, 2], width)
        top0, bottom0 = _inner_span(boxes[box_index, 1], boxes[box_index, 3], height)
    for v in range(window.shape[0]):
        key = stream_key(seed, epoch, index, v, _GEOMETRY_STREAM)
        top, left, h, w = _resized_crop(key, bottom0 - top0, right0 - left0, scale_lo, scale_hi)
        x0, y0 = left0 + left, top0 + top
        window[v, 0] = x0 / width
        window[v, 1] = y0 / height
        window[v, 2] = (x0 + w) / width
        window[v, 3] = (y0 + h) / height
        flip[v] = _uniform(key, _FLIP_DRAW) < 0.5
    return box_index


@njit(cache=True)
def _geometry_batch(seed, epoch, indices, sizes, boxes, n_boxes, oa_crop, scale_lo, scale_hi, window, flip,
                    box_index):
    for i in range(indices.shape[0]):
        box_index[i] = sample_geometry(seed, epoch, indices[i], sizes[i, 0], sizes[i, 1], boxes[i],
                                       n_boxes[i], oa_crop, scale_lo, scale_hi, window[i], flip[i])


# --------------------------------------------------------------------------------------------
# Appearance (device stage): BG-Mixup flag and partner, colour
# --------------------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def mix_draw(seed, epoch, index, view, p_mix):
    """Whether the device stage BG-mixes this view (eq. 4; it stays unmixed when no partner is
    found): the appearance stream's first draw. The engine stage asks it too, before cropping,
    so it resamples a view's mask only when the mix will read it."""
    return _uniform(stream_key(seed, epoch, index, view, _APPEARANCE_STREAM), 0) < p_mix


@njit(cache=True)
def _mix_flags(seed, epoch, indices, p_mix, out):
    for i in range(out.shape[0]):
        for v in range(out.shape[1]):
            out[i, v] = mix_draw(seed, epoch, indices[i], v, p_mix)


def mix_flags(seed, epoch, indices, *, views: int, p_mix: float) -> np.ndarray:
    """bool [B, views]: :func:`mix_draw` of every view of the records ``indices``."""
    out = np.zeros((len(indices), views), np.bool_)
    if p_mix > 0:
        _mix_flags(int(seed), int(epoch), np.asarray(indices, np.int64), float(p_mix), out)
    return out


@njit(cache=True)
def _appearance_batch(seed, epoch, indices, has_bg, ring_count, p_mix, use_color, jitter_ranges,
                      jitter_p, grayscale_p, blur_p, sigma_range, solarize_p,
                      mix, partner, jitter, factors, order, grayscale, blur, sigma, solarize):
    b, views = mix.shape
    n_bg = 0
    for i in range(b):
        n_bg += has_bg[i]
    for i in range(b):
        for v in range(views):
            key = stream_key(seed, epoch, indices[i], v, _APPEARANCE_STREAM)
            # Draw positions are fixed, so toggling one op leaves every other draw unchanged.
            mix[i, v] = mix_draw(seed, epoch, indices[i], v, p_mix)
            if use_color:
                jitter[i, v] = _uniform(key, 1) < jitter_p
                for op in range(4):  # brightness, contrast, saturation: [lo, hi]; hue: [-h, h]
                    lo, hi = jitter_ranges[op, 0], jitter_ranges[op, 1]
                    factors[i, v, op] = lo + (hi - lo) * _uniform(key, 2 + op)
                for k in range(4):  # Fisher-Yates shuffle of the jitter order
                    order[i, v, k] = k
                for k in range(3, 0, -1):
                    j = _below(_uniform(key, 6 + k), k + 1)
                    order[i, v, k], order[i, v, j] = order[i, v, j], order[i, v, k]
                grayscale[i, v] = _uniform(key, 10) < grayscale_p
                blur[i, v] = _uniform(key, 11) < blur_p[v]
                sigma[i, v] = sigma_range[0] + (sigma_range[1] - sigma_range[0]) * _uniform(key, 12)
                solarize[i, v] = _uniform(key, 13) < solarize_p[v]
            # BG-Mixup partner (eq. 4): another batch member with a background; else a ring
            # buffer patch (indices b .. b + ring_count - 1); else none.
            partner[i, v] = -1
            if mix[i, v]:
                u = _uniform(stream_key(seed, epoch, indices[i], v, _PARTNER_STREAM), 0)
                others = n_bg - has_bg[i]
                if others > 0:
                    pick = _below(u, others)
                    for j in range(b):
                        if has_bg[j] and j != i:
                            if pick == 0:
                                partner[i, v] = j
                                break
                            pick -= 1
                elif ring_count > 0:
                    partner[i, v] = b + _below(u, ring_count)


def check_crop_scale(crop_scale) -> tuple[float, float]:
    """``crop_scale`` as a (min, max) pair of floats with 0 < min <= max <= 1, or a ConfigError."""
    try:
        lo, hi = (float(x) for x in crop_scale)
    except (TypeError, ValueError):
        raise ConfigError(f"crop_scale must be a pair (min, max) of area fractions, got {crop_scale!r}") from None
    if not (0.0 < lo <= hi <= 1.0):
        raise ConfigError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale!r}")
    return lo, hi


def sample_geometry_batch(seed, epoch, indices, image_sizes, n_boxes=None, boxes=None, *, views=2,
                          oa_crop=False, crop_scale=DEFAULT_CROP_SCALE):
    """Vectorised :func:`sample_geometry` over a batch -> (window [B,V,4], flip [B,V], box_index [B])."""
    scale_lo, scale_hi = check_crop_scale(crop_scale)
    indices = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    b = len(indices)
    sizes = np.ascontiguousarray(image_sizes, dtype=np.int64).reshape(b, 2)
    if np.any(sizes <= 0):
        raise ConfigError("image sizes must be positive")
    n_boxes = np.zeros(b, np.int64) if n_boxes is None else np.ascontiguousarray(n_boxes, np.int64).reshape(b)
    boxes = np.zeros((b, 1, 4), np.float32) if boxes is None else np.ascontiguousarray(boxes, np.float32)
    window = np.zeros((b, views, 4), np.float32)
    flip = np.zeros((b, views), np.bool_)
    box_index = np.full(b, -1, np.int64)
    _geometry_batch(int(seed), int(epoch), indices, sizes, boxes, n_boxes, bool(oa_crop), scale_lo, scale_hi,
                    window, flip, box_index)
    return window, flip, box_index


def sample_appearance(seed, epoch, indices, has_bg=None, *, views=2, p_mix=0.0, color="mocov2",
                      ring_count=0) -> dict:
    """BG-Mixup and colour parameters of a batch (the AugParams fields other than the geometry).

    ``ring_count`` patches of a ring buffer follow the batch's own patches; a view whose batch
    has no other sample with a background draws its partner among them.
    """
    cfg = resolve_color(color)
    indices = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    b = len(indices)
    has_bg = np.zeros(b, np.bool_) if has_bg is None else np.ascontiguousarray(has_bg, np.bool_).reshape(b)
    shape = (b, views)
    out = dict(
        mix=np.zeros(shape, np.bool_),
        partner=np.full(shape, -1, np.int64),
        jitter=np.zeros(shape, np.bool_),
        jitter_order=np.tile(np.arange(4, dtype=np.int64), shape + (1,)),
        grayscale=np.zeros(shape, np.bool_),
        blur=np.zeros(shape, np.bool_),
        sigma=np.zeros(shape, np.float32),
        solarize=np.zeros(shape, np.bool_),
    )
    factors = np.zeros(shape + (4,), np.float32)
    factors[..., :3] = 1.0
    c = cfg or ColorConfig()
    ranges = np.array([[max(0.0, 1 - c.brightness), 1 + c.brightness],
                       [max(0.0, 1 - c.contrast), 1 + c.contrast],
                       [max(0.0, 1 - c.saturation), 1 + c.saturation],
                       [-c.hue, c.hue]], np.float64)
    _appearance_batch(int(seed), int(epoch), indices, has_bg, int(ring_count), float(p_mix), cfg is not None,
                      ranges, c.jitter_p, c.grayscale_p, c.per_view(c.blur_p, views),
                      np.asarray(c.blur_sigma, np.float64), c.per_view(c.solarize_p, views),
                      out["mix"], out["partner"], out["jitter"], factors, out["jitter_order"],
                      out["grayscale"], out["blur"], out["sigma"], out["solarize"])
    out.update(brightness=factors[..., 0].copy(), contrast=factors[..., 1].copy(),
               saturation=factors[..., 2].copy(), hue=factors[..., 3].copy())
    return out


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
    crop_scale: tuple[float, float] = DEFAULT_CROP_SCALE,
    p_mix: float = 0.0,
    color: str | ColorConfig = "mocov2",
    ring_count: int = 0,
) -> AugParams:
    """Draw the augmentation parameters of one batch (geometry + appearance).

    Args:
        seed, epoch: run seed and epoch; with the dataset index they key every draw.
        indices: int [B] dataset index of each batch member (not its batch position).
        n_boxes: int [B] number of valid rows in ``boxes`` (None = no boxes anywhere).
        boxes: float [B, K, 4] normalised (x0, y0, x1, y1), zero-padded.
        has_bg: bool [B] whether the sample has a background patch (non-empty ``bg_rect``);
            None = nobody has one.
        image_sizes: int [B, 2] the decoded image's (height, width) in pixels, so that windows
            fall on whole pixels exactly as torchvision's RandomResizedCrop would.
        views: views per sample (2 for MoCo v2 / BYOL).
        oa_crop: OA-Crop (paper Sec. 2.3): crop inside one box per sample.
        crop_scale: RandomResizedCrop's (min, max) area fraction of the region cropped from.
        p_mix: per-view probability of BG-Mixup (paper eq. 4).
        color: "mocov2", "byol", "none" or a :class:`ColorConfig`.
        ring_count: ring-buffer patches available after the batch's own (partner fallback).
    """
    window, flip, box_index = sample_geometry_batch(seed, epoch, indices, image_sizes, n_boxes, boxes,
                                                    views=views, oa_crop=oa_crop, crop_scale=crop_scale)
    appearance = sample_appearance(seed, epoch, indices, has_bg, views=views, p_mix=p_mix, color=color,
                                   ring_count=ring_count)
    return AugParams(window=window, flip=flip, box_index=box_index, **appearance)
