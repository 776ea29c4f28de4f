"""Fused Triton kernels of the device stage: BG-Mixup (eq. 4) -> colour -> normalise.

:func:`apply_device_ops_fused` has the signature and the semantics of
:func:`objloader.augment.reference.apply_device_ops` (the normative reference, DESIGN.md "Op
semantics"); tests/test_kernels.py compares the two. The whole batch is handled by at most four
launches, none with a per-view Python loop:

1. ``_contrast_mean_kernel`` (only when some view jitters with a contrast factor != 1): per view,
   the sum of the grey level that ``adjust_contrast`` blends towards, i.e. the view after mixup
   and after the jitter ops that precede contrast in that view's order. Partial sums per
   (view, chunk), so small batches still fill the GPU and the result is deterministic.
2. ``_mix_colour_kernel``: one program per (view, pixel block) loads the uint8 pixel, its mask and
   the tiled partner patch pixel, blends, runs the view's four jitter ops in its own order,
   grayscale; views without blur are finished here (solarise + normalise + store), views with
   blur go to a float32 buffer.
3. ``_blur_rows_kernel`` / ``_blur_cols_finish_kernel``: separable Gaussian blur of the blurred
   views only, the vertical pass fused with solarise + normalise + store.

Every per-view decision is known on the host (``AugParams`` is numpy), so the kernels branch on a
small per-view table uploaded once per call; no host/device synchronisation happens.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from objloader.augment import reference as R
from objloader.augment.params import AugParams
from objloader.augment.renamed import renamed_keywords

__all__ = ["apply_device_ops_fused", "INTERPRETED"]

# Columns of the per-view int32 table (row n = view n of the flattened [B * V] batch).
_I_PARTNER = tl.constexpr(0)  # row of `patches` to mix with, -1 = view left unmixed
_I_JITTER = tl.constexpr(1)  # ColorJitter applied (0/1)
_I_ORDER = tl.constexpr(2)  # 2..5: jitter op ids in application order (0 b, 1 c, 2 s, 3 h)
_I_CPOS = tl.constexpr(6)  # position of contrast in the order when its mean is needed, else -1
_I_GRAYSCALE = tl.constexpr(7)  # grayscale (0/1)
_I_SLOT = tl.constexpr(8)  # row of the blur buffers, -1 = no blur
_I_SOLAR = tl.constexpr(9)  # solarise (0/1)
_I_COLS = tl.constexpr(10)
# Columns of the per-view float32 table.
_F_BRIGHT = tl.constexpr(0)
_F_CONTRAST = tl.constexpr(1)
_F_SAT = tl.constexpr(2)
_F_HUE = tl.constexpr(3)
_F_COLS = tl.constexpr(4)

_MAX_BLOCK = 1024  # pixels per program
_MAX_CHUNKS = 32  # partial sums per view in the contrast-mean reduction
_ROUND_MAGIC = tl.constexpr(8388608.0)  # 2**23: (y + 2**23) - 2**23 rounds 0 <= y < 2**23 half-to-even in fp32

# The reference's constants (objloader.augment.reference is the semantics), bound as constexprs:
# a @triton.jit function reads only constexpr globals. The kernels keep the tensor on the left
# of each operation with them (``x * _LUMA_R``), so the interpreter sees tensor arithmetic too.
_LUMA_R, _LUMA_G, _LUMA_B = (tl.constexpr(w) for w in R.LUMA_WEIGHTS)
_MEAN_R, _MEAN_G, _MEAN_B = (tl.constexpr(m) for m in R.IMAGENET_MEAN)
_STD_R, _STD_G, _STD_B = (tl.constexpr(d) for d in R.IMAGENET_STD)
_HARD_MIX_THRESHOLD = tl.constexpr(R.HARD_MIX_THRESHOLD)
_SOLARIZE_THRESHOLD = tl.constexpr(R.SOLARIZE_THRESHOLD)


# --------------------------------------------------------------------------------------------
# Per-pixel helpers (each equals the reference op named in its docstring)
# --------------------------------------------------------------------------------------------


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _add(a, b):
    return a + b


# Kernels here call no @triton.jit helper of Triton's standard library (tl.sum, tl.zeros, ...):
# interpreted kernels (TRITON_INTERPRET=1 when this module is imported) cannot call them when
# triton itself was imported without the variable. Triton's sum combiner is only *passed* to
# tl.reduce, where the interpreter recognises it and sums with numpy; in compiled code it is the
# same reduction as tl.sum.
_SUM_COMBINE = getattr(tl.standard, "_sum_combine", _add)


@triton.jit
def _total(x):
    """tl.sum of a 1-D block."""
    return tl.reduce(x, 0, _SUM_COMBINE)


@triton.jit
def _luma(r, g, b):
    """reference.rgb_to_grayscale: ITU-R 601-2 luma with torchvision's weights (LUMA_WEIGHTS)."""
    return r * _LUMA_R + g * _LUMA_G + b * _LUMA_B


@triton.jit
def _load_mixed(views_ptr, masks_ptr, patches_ptr, n, partner, offs, valid, S, PH, PW,
                HAS_MIX: tl.constexpr, MASK_U8: tl.constexpr, PATCH_U8: tl.constexpr, HARD: tl.constexpr):
    """``views_uint8.float() / 255`` then reference.bg_mixup (paper eq. 4) for one pixel block:
    x = m * x + (1 - m) * patch[partner, :, y % PH, x % PW], m = mask / 255 (uint8) or mask
    (float), binarised at HARD_MIX_THRESHOLD when HARD; views with partner < 0 are returned unmixed."""
    ss = S * S
    base = views_ptr + n.to(tl.int64) * 3 * ss + offs
    r = tl.load(base, mask=valid, other=0).to(tl.float32) / 255.0
    g = tl.load(base + ss, mask=valid, other=0).to(tl.float32) / 255.0
    b = tl.load(base + 2 * ss, mask=valid, other=0).to(tl.float32) / 255.0
    if HAS_MIX:
        if partner >= 0:
            m = tl.load(masks_ptr + n.to(tl.int64) * ss + offs, mask=valid, other=0).to(tl.float32)
            if MASK_U8:
                m = m / 255.0
            if HARD:
                m = tl.where(m >= _HARD_MIX_THRESHOLD, 1.0, 0.0)
            py = (offs // S) % PH
            px = (offs % S) % PW
            pss = PH * PW
            pbase = patches_ptr + partner.to(tl.int64) * 3 * pss + py * PW + px
            pr = tl.load(pbase, mask=valid, other=0).to(tl.float32)
            pg = tl.load(pbase + pss, mask=valid, other=0).to(tl.float32)
            pb = tl.load(pbase + 2 * pss, mask=valid, other=0).to(tl.float32)
            if PATCH_U8:
                pr = pr / 255.0
                pg = pg / 255.0
                pb = pb / 255.0
            r = m * r + (1 - m) * pr
            g = m * g + (1 - m) * pg
            b = m * b + (1 - m) * pb
    return r, g, b


@triton.jit
def _adjust_hue(r, g, b, shift):
    """reference.adjust_hue: RGB -> HSV (ties resolve r, g, b), h = (h + shift) mod 1, -> RGB."""
    maxc = tl.maximum(r, tl.maximum(g, b))
    minc = tl.minimum(r, tl.minimum(g, b))
    delta = maxc - minc
    grey = delta == 0.0
    safe_delta = tl.where(grey, 1.0, delta)
    s = delta / tl.where(grey, 1.0, maxc)
    h = tl.where(maxc == r, (g - b) / safe_delta,
                 tl.where(maxc == g, 2.0 + (b - r) / safe_delta, 4.0 + (r - g) / safe_delta))
    h = tl.where(grey, 0.0, h)
    h = h / 6.0
    h = h - tl.floor(h)  # torch.remainder(h, 1.0)
    h = h + shift
    h = h - tl.floor(h)
    # HSV -> RGB (reference._hsv_to_rgb), v = maxc.
    h6 = h * 6.0
    sector_f = tl.floor(h6)
    f = h6 - sector_f
    sector = sector_f.to(tl.int32) % 6
    p = _clamp01(maxc * (1.0 - s))
    q = _clamp01(maxc * (1.0 - s * f))
    t = _clamp01(maxc * (1.0 - s * (1.0 - f)))
    # sector: 0 (v,t,p) 1 (q,v,p) 2 (p,v,t) 3 (p,q,v) 4 (t,p,v) 5 (v,p,q)
    r2 = tl.where((sector == 0) | (sector == 5), maxc, tl.where(sector == 1, q, tl.where(sector == 4, t, p)))
    g2 = tl.where(sector == 0, t, tl.where((sector == 1) | (sector == 2), maxc, tl.where(sector == 3, q, p)))
    b2 = tl.where(sector <= 1, p, tl.where(sector == 2, t, tl.where(sector == 5, q, maxc)))
    return r2, g2, b2


@triton.jit
def _jitter_op(r, g, b, op, bright, contrast, sat, hue, mean):
    """One ColorJitter op of reference._JITTER_OPS, chosen by ``op``:
    0 adjust_brightness, 1 adjust_contrast (towards ``mean``, the view's mean grey at this point
    of its chain), 2 adjust_saturation, 3 adjust_hue. Each clamps to [0, 1] like the reference."""
    if op == 0:
        r = _clamp01(r * bright)
        g = _clamp01(g * bright)
        b = _clamp01(b * bright)
    elif op == 1:
        r = _clamp01(contrast * r + (1 - contrast) * mean)
        g = _clamp01(contrast * g + (1 - contrast) * mean)
        b = _clamp01(contrast * b + (1 - contrast) * mean)
    elif op == 2:
        grey = _luma(r, g, b)
        r = _clamp01(sat * r + (1 - sat) * grey)
        g = _clamp01(sat * g + (1 - sat) * grey)
        b = _clamp01(sat * b + (1 - sat) * grey)
    else:
        r, g, b = _adjust_hue(r, g, b, hue)
    return r, g, b


@triton.jit
def _finish(x, C: tl.constexpr, solar, out_ptr, valid, NORMALIZE: tl.constexpr, OUT_U8: tl.constexpr):
    """reference.solarize (x >= SOLARIZE_THRESHOLD -> 1 - x, where ``solar``), then the end of
    reference.apply_device_ops for channel C: normalize (ImageNet mean/std) cast to the output
    dtype, or [0, 1] cast to it, or uint8 round-half-even(x * 255) clamped to [0, 255]."""
    x = tl.where((solar != 0) & (x >= _SOLARIZE_THRESHOLD), 1.0 - x, x)
    if NORMALIZE:
        if C == 0:
            x = (x - _MEAN_R) / _STD_R
        elif C == 1:
            x = (x - _MEAN_G) / _STD_G
        else:
            x = (x - _MEAN_B) / _STD_B
    elif OUT_U8:
        x = tl.minimum(tl.maximum(x * 255.0, 0.0), 255.0)
        x = (x + _ROUND_MAGIC) - _ROUND_MAGIC
    tl.store(out_ptr, x.to(out_ptr.dtype.element_ty), mask=valid)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _contrast_mean_kernel(views_ptr, masks_ptr, patches_ptr, ip_ptr, fp_ptr, red_ptr, partials_ptr,
                          S, PH, PW, NCHUNK,
                          HAS_MIX: tl.constexpr, MASK_U8: tl.constexpr, PATCH_U8: tl.constexpr,
                          HARD: tl.constexpr, BLOCK: tl.constexpr):
    """Sum of ``rgb_to_grayscale(x)`` over one chunk of a view, where x is the view at the point of
    reference._colour_batch where its adjust_contrast runs (mixup + the jitter ops before it).
    Grid (views needing a mean, NCHUNK); partials[n, chunk] receives the chunk's sum."""
    j = tl.program_id(0)
    chunk = tl.program_id(1)
    n = tl.load(red_ptr + j)
    row = ip_ptr + n * _I_COLS
    frow = fp_ptr + n * _F_COLS
    partner = tl.load(row + _I_PARTNER)
    cpos = tl.load(row + _I_CPOS)
    bright = tl.load(frow + _F_BRIGHT)
    contrast = tl.load(frow + _F_CONTRAST)
    sat = tl.load(frow + _F_SAT)
    hue = tl.load(frow + _F_HUE)
    ss = S * S
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for start in range(chunk * BLOCK, ss, NCHUNK * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < ss
        r, g, b = _load_mixed(views_ptr, masks_ptr, patches_ptr, n, partner, offs, valid, S, PH, PW,
                              HAS_MIX, MASK_U8, PATCH_U8, HARD)
        for pos in range(cpos):
            op = tl.load(row + _I_ORDER + pos)
            r, g, b = _jitter_op(r, g, b, op, bright, contrast, sat, hue, 0.0)
        acc += tl.where(valid, _luma(r, g, b), 0.0)
    tl.store(partials_ptr + n * NCHUNK + chunk, _total(acc))


@triton.jit
def _mix_colour_kernel(views_ptr, masks_ptr, patches_ptr, ip_ptr, fp_ptr, partials_ptr, buf_ptr, out_ptr,
                       S, PH, PW, NCHUNK,
                       HAS_MIX: tl.constexpr, MASK_U8: tl.constexpr, PATCH_U8: tl.constexpr,
                       HARD: tl.constexpr, ANY_JITTER: tl.constexpr, ANY_BLUR: tl.constexpr,
                       NORMALIZE: tl.constexpr, OUT_U8: tl.constexpr,
                       NCHUNK_P2: tl.constexpr, BLOCK: tl.constexpr):
    """reference.apply_device_ops up to the blur, per (view, pixel block): bg_mixup (eq. 4) ->
    ColorJitter in the view's order -> rgb_to_grayscale. Views without blur are finished here
    (solarize + normalize + store into ``out``); views with blur are stored as float32 [0, 1]
    into row ``slot`` of ``buf`` for the blur passes."""
    n = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ss = S * S
    valid = offs < ss
    row = ip_ptr + n * _I_COLS
    partner = tl.load(row + _I_PARTNER)
    r, g, b = _load_mixed(views_ptr, masks_ptr, patches_ptr, n, partner, offs, valid, S, PH, PW,
                          HAS_MIX, MASK_U8, PATCH_U8, HARD)
    if ANY_JITTER:
        if tl.load(row + _I_JITTER) != 0:
            frow = fp_ptr + n * _F_COLS
            bright = tl.load(frow + _F_BRIGHT)
            contrast = tl.load(frow + _F_CONTRAST)
            sat = tl.load(frow + _F_SAT)
            hue = tl.load(frow + _F_HUE)
            # adjust_contrast's mean grey (0 when contrast == 1 and no mean was computed).
            k = tl.arange(0, NCHUNK_P2)
            need = tl.load(row + _I_CPOS) >= 0
            part = tl.load(partials_ptr + n * NCHUNK + k, mask=(k < NCHUNK) & need, other=0.0)
            mean = _total(part) / ss
            for pos in range(4):
                op = tl.load(row + _I_ORDER + pos)
                r, g, b = _jitter_op(r, g, b, op, bright, contrast, sat, hue, mean)
    if tl.load(row + _I_GRAYSCALE) != 0:
        grey = _luma(r, g, b)
        r = grey
        g = grey
        b = grey
    solar = tl.load(row + _I_SOLAR)
    out = out_ptr + n.to(tl.int64) * 3 * ss + offs
    if ANY_BLUR:
        slot = tl.load(row + _I_SLOT)
        if slot >= 0:
            dst = buf_ptr + slot.to(tl.int64) * 3 * ss + offs
            tl.store(dst, r, mask=valid)
            tl.store(dst + ss, g, mask=valid)
            tl.store(dst + 2 * ss, b, mask=valid)
        else:
            _finish(r, 0, solar, out, valid, NORMALIZE, OUT_U8)
            _finish(g, 1, solar, out + ss, valid, NORMALIZE, OUT_U8)
            _finish(b, 2, solar, out + 2 * ss, valid, NORMALIZE, OUT_U8)
    else:
        _finish(r, 0, solar, out, valid, NORMALIZE, OUT_U8)
        _finish(g, 1, solar, out + ss, valid, NORMALIZE, OUT_U8)
        _finish(b, 2, solar, out + 2 * ss, valid, NORMALIZE, OUT_U8)


@triton.jit
def _reflect(i, size):
    """Index into a reflect-padded axis (F.pad mode="reflect": -1 -> 1, size -> size - 2)."""
    i = tl.where(i < 0, -i, i)
    return tl.where(i > size - 1, 2 * (size - 1) - i, i)


@triton.jit
def _blur_pass(src_ptr, taps_ptr, j, offs, S, K, ALONG_Y: tl.constexpr, BLOCK: tl.constexpr):
    """One pass of reference.gaussian_blur for view slot j at pixels ``offs``: the K taps of that
    view (zero beyond its own radius) along x, or along y with ALONG_Y, over reflect padding.
    Returns the three channel sums."""
    ss = S * S
    valid = offs < ss
    y = offs // S
    x = offs % S
    half = K // 2
    base = src_ptr + j.to(tl.int64) * 3 * ss
    acc_r = tl.full([BLOCK], 0.0, tl.float32)
    acc_g = tl.full([BLOCK], 0.0, tl.float32)
    acc_b = tl.full([BLOCK], 0.0, tl.float32)
    for k in range(K):
        w = tl.load(taps_ptr + j * K + k)
        if ALONG_Y:
            src = base + _reflect(y + (k - half), S) * S + x
        else:
            src = base + y * S + _reflect(x + (k - half), S)
        acc_r += w * tl.load(src, mask=valid, other=0.0)
        acc_g += w * tl.load(src + ss, mask=valid, other=0.0)
        acc_b += w * tl.load(src + 2 * ss, mask=valid, other=0.0)
    return acc_r, acc_g, acc_b


@triton.jit
def _blur_rows_kernel(src_ptr, dst_ptr, taps_ptr, S, K, BLOCK: tl.constexpr):
    """First pass of reference.gaussian_blur: conv along x. Grid (blurred views, pixel blocks);
    src/dst rows = slots."""
    j = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ss = S * S
    valid = offs < ss
    acc_r, acc_g, acc_b = _blur_pass(src_ptr, taps_ptr, j, offs, S, K, False, BLOCK)
    dst = dst_ptr + j.to(tl.int64) * 3 * ss + offs
    tl.store(dst, acc_r, mask=valid)
    tl.store(dst + ss, acc_g, mask=valid)
    tl.store(dst + 2 * ss, acc_b, mask=valid)


@triton.jit
def _blur_cols_finish_kernel(src_ptr, taps_ptr, blur_ptr, ip_ptr, out_ptr, S, K,
                             NORMALIZE: tl.constexpr, OUT_U8: tl.constexpr, BLOCK: tl.constexpr):
    """Second pass of reference.gaussian_blur (conv along y) fused with the rest of the chain:
    reference.solarize + normalize + store into view blur_views[j] of ``out``."""
    j = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ss = S * S
    valid = offs < ss
    acc_r, acc_g, acc_b = _blur_pass(src_ptr, taps_ptr, j, offs, S, K, True, BLOCK)
    n = tl.load(blur_ptr + j)
    solar = tl.load(ip_ptr + n * _I_COLS + _I_SOLAR)
    out = out_ptr + n.to(tl.int64) * 3 * ss + offs
    _finish(acc_r, 0, solar, out, valid, NORMALIZE, OUT_U8)
    _finish(acc_g, 1, solar, out + ss, valid, NORMALIZE, OUT_U8)
    _finish(acc_b, 2, solar, out + 2 * ss, valid, NORMALIZE, OUT_U8)


def _is_interpreted(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - layout of other triton versions
        return False
    return isinstance(fn, InterpretedFunction)


# True when this module's kernels were built by triton's CPU interpreter (TRITON_INTERPRET=1 at
# import time): they then run on CPU tensors, for tests.
INTERPRETED: bool = _is_interpreted(_mix_colour_kernel)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------

_FLOAT_OUT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _flat(a, dtype) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a).reshape(-1), dtype=dtype)


@renamed_keywords(normalise="normalize")
def apply_device_ops_fused(
    views_uint8: torch.Tensor,
    masks: torch.Tensor | None,
    patches: torch.Tensor | None,
    params: AugParams,
    *,
    hard: bool = False,
    dtype: torch.dtype = torch.float32,
    normalize: bool = True,
    reuse_views: bool = False,
) -> torch.Tensor:
    """Fused equivalent of :func:`objloader.augment.reference.apply_device_ops` (same arguments,
    same result up to float rounding): BG-Mixup (eq. 4) -> colour -> normalise for a batch.

    Args:
        views_uint8: uint8 [B, V, 3, S, S]; masks: [B, V, 1, S, S] uint8 (255 = object) or float
            in [0, 1] (None: no mixup).
        patches: [N, 3, P, P] background patches indexed by ``params.partner`` (N >= B with a
            ring buffer; None: no mixup).
        params: the batch's :class:`AugParams` (numpy; uploaded once as one small table).
        normalize: False returns [0, 1] values (uint8 when ``dtype`` is torch.uint8).
        reuse_views: the caller gives up ``views_uint8``: an implementation may return it,
            overwritten with the result (the CPU one does for uint8 output without colour).
    Returns:
        [B, V, 3, S, S] in ``dtype``, ImageNet-normalised when ``normalize``.
    """
    bsz, nv, size = _check_batch(views_uint8, params)
    supported = dtype in _FLOAT_OUT or (dtype == torch.uint8 and not normalize)
    if not supported or bsz * nv == 0 or size == 0:
        # Casts the reference defines but no kernel needs (e.g. normalised integers), empty batches.
        return R.apply_device_ops(views_uint8, masks, patches, params, hard=hard, dtype=dtype, normalize=normalize)
    views = views_uint8.contiguous()
    table = _view_table(params, bsz * nv, size, can_mix=patches is not None and masks is not None)
    mix = _mix_inputs(views, masks, patches, table, (bsz, nv, 1, size, size))
    on_device = _upload(table, views.device)
    grid = _grid(size)
    bufs = _allocate(table, on_device, (bsz, nv, 3, size, size), dtype, grid.nchunk)
    _launch(views, mix, table, on_device, bufs, grid, hard=hard, normalize=normalize)
    return bufs.out


# ---- 1. checking the batch and packing its per-view parameters (host, numpy) ----------------


def _check_batch(views_uint8: torch.Tensor, params: AugParams) -> tuple[int, int, int]:
    """(B, V, S) of a batch the kernels can address: uint8 square views [B, V, 3, S, S] and
    parameters drawn for exactly B x V views. Checked before anything else, so a wrong batch
    fails with the same error whichever path (kernels or reference) would have run it."""
    if views_uint8.dim() != 5 or views_uint8.shape[2] != 3 or views_uint8.dtype != torch.uint8:
        raise ValueError(f"views must be uint8 [B, V, 3, S, S], got {views_uint8.dtype} {tuple(views_uint8.shape)}")
    bsz, nv, _, height, width = views_uint8.shape
    if height != width:
        raise ValueError(f"views must be square, got {height} x {width}")
    if tuple(np.shape(params.mix)) != (bsz, nv):
        raise ValueError(f"params are for {np.shape(params.mix)} views, the batch has {(bsz, nv)}")
    return bsz, nv, height


# The host-side records below are NamedTuples, not dataclasses: tests/test_kernels.py loads this
# file as a module missing from sys.modules (to build it under Triton's interpreter), where
# dataclass() cannot look its module up.
class _ViewTable(NamedTuple):
    """Every per-view decision of a batch, known on the host (``AugParams`` is numpy), in the form
    the kernels branch on, so they need no host/device synchronisation."""

    itab: np.ndarray  # int32 [N, _I_COLS]: partner, jitter, op order, contrast position, grayscale, slot, solarise
    factors: np.ndarray  # float32 [N, _F_COLS]: brightness, contrast, saturation, hue
    red_views: np.ndarray  # int32: views whose adjust_contrast needs the view's mean grey
    blur_views: np.ndarray  # int32: views that blur; view blur_views[j] uses blur buffer row j
    taps: np.ndarray  # float32 [len(blur_views) * ktaps]: each blurred view's Gaussian taps
    ktaps: int  # taps per blurred view (0 when none blurs)
    has_mix: bool  # some view is mixed, and masks and patches were given
    max_partner: int  # largest patch row a mixed view reads (-1 without mixing)
    any_jitter: bool


def _view_table(params: AugParams, n_views: int, size: int, can_mix: bool) -> _ViewTable:
    """Pack ``params`` for the N = B * V views into the per-view tables (see _I_* / _F_*).
    ``can_mix``: masks and patches were given (without them no view is mixed)."""
    mix = _flat(params.mix, np.bool_)
    partner = _flat(params.partner, np.int64)
    mixed = mix & (partner >= 0)
    has_mix = can_mix and bool(mixed.any())
    jitter = _flat(params.jitter, np.bool_)
    factors = np.stack([_flat(params.brightness, np.float32), _flat(params.contrast, np.float32),
                        _flat(params.saturation, np.float32), _flat(params.hue, np.float32)], axis=1)
    order = _jitter_order(params, jitter, n_views)
    blur = _flat(params.blur, np.bool_)
    icols = int(_I_COLS.value)
    itab = np.zeros((n_views, icols), np.int32)
    itab[:, _I_PARTNER.value] = np.where(mixed, partner, -1) if has_mix else -1
    itab[:, _I_JITTER.value] = jitter
    itab[:, _I_ORDER.value:_I_ORDER.value + 4] = order
    cpos = np.argmax(order == 1, axis=1)
    # A view needs adjust_contrast's mean when it jitters with a factor != 1 (with 1 the blend
    # f * x + (1 - f) * mean is x whatever the mean).
    need_mean = jitter & (factors[:, 1] != 1.0)
    itab[:, _I_CPOS.value] = np.where(need_mean, cpos, -1)
    itab[:, _I_GRAYSCALE.value] = _flat(params.grayscale, np.bool_)
    blur_views = np.flatnonzero(blur).astype(np.int32)
    slots = np.full(n_views, -1, np.int32)
    slots[blur_views] = np.arange(len(blur_views), dtype=np.int32)
    itab[:, _I_SLOT.value] = slots
    itab[:, _I_SOLAR.value] = _flat(params.solarize, np.bool_)
    red_views = np.flatnonzero(need_mean).astype(np.int32)
    ktaps, taps = _blur_taps(params, blur_views, size)
    return _ViewTable(itab=itab, factors=factors, red_views=red_views, blur_views=blur_views, taps=taps,
                      ktaps=ktaps, has_mix=has_mix, max_partner=int(partner[mixed].max()) if has_mix else -1,
                      any_jitter=bool(jitter.any()))


def _jitter_order(params: AugParams, jitter: np.ndarray, n_views: int) -> np.ndarray:
    """Each view's ColorJitter op order, int64 [N, 4] (0 b, 1 c, 2 s, 3 h). Parameters drawn
    without jitter may carry no order at all: any order then does, as no view reads it."""
    if np.size(params.jitter_order):
        order = np.asarray(params.jitter_order, np.int64).reshape(n_views, 4)
    elif jitter.any():
        raise ValueError("params.jitter_order is empty but some views jitter")
    else:
        order = np.tile(np.arange(4, dtype=np.int64), (n_views, 1))
    if jitter.any() and not np.array_equal(np.sort(order[jitter], axis=1), np.tile(np.arange(4), (int(jitter.sum()), 1))):
        raise ValueError("params.jitter_order rows must be permutations of 0..3")
    return order


def _blur_taps(params: AugParams, blur_views: np.ndarray, size: int) -> tuple[int, np.ndarray]:
    """(taps per view, float32 taps of the blurred views, flat). One kernel size for the batch
    (the largest sigma's), each view's row zero beyond its own radius: the reference's own taps
    (reference.gaussian_taps), so both blur with identical weights."""
    if not len(blur_views):
        return 0, np.zeros((0,), np.float32)
    sigma = torch.as_tensor(_flat(params.sigma, np.float64)[blur_views])
    ktaps = R.blur_kernel_size(float(sigma.max()))
    if ktaps // 2 >= size:
        raise ValueError(f"blur radius {ktaps // 2} needs views larger than {size} px (reflect padding)")
    return ktaps, R.gaussian_taps(sigma, ktaps).to(torch.float32).numpy().reshape(-1)


class _MixInputs(NamedTuple):
    """Masks and patches as the kernels read them, and how to read them."""

    masks: torch.Tensor
    patches: torch.Tensor
    ph: int  # patch height and width: the tiling period of the background
    pw: int
    mask_u8: bool  # uint8 masks (0..255) rather than float (0..1)
    patch_u8: bool


def _mix_inputs(views: torch.Tensor, masks: torch.Tensor | None, patches: torch.Tensor | None,
                table: _ViewTable, mask_shape: tuple) -> _MixInputs:
    """Masks and patches on the views' device, contiguous (bool masks as float), checked against
    the batch. Without mixing the kernels never read them; the views then stand in for both,
    since every kernel argument must be a tensor."""
    if not table.has_mix:
        return _MixInputs(masks=views, patches=views, ph=1, pw=1, mask_u8=True, patch_u8=True)
    device = views.device
    if table.max_partner >= patches.shape[0]:
        raise IndexError(f"partner index {table.max_partner} out of range for {patches.shape[0]} patches")
    if masks.shape != mask_shape:
        raise ValueError(f"masks must be [B, V, 1, S, S], got {tuple(masks.shape)}")
    masks_d = masks.to(device)
    if masks_d.dtype == torch.bool:
        masks_d = masks_d.to(torch.float32)
    masks_d = masks_d.contiguous()
    patches_d = patches.to(device).contiguous()
    if patches_d.dim() != 4 or patches_d.shape[1] != 3:
        raise ValueError(f"patches must be [N, 3, P, P], got {tuple(patches_d.shape)}")
    return _MixInputs(masks=masks_d, patches=patches_d, ph=int(patches_d.shape[2]), pw=int(patches_d.shape[3]),
                      mask_u8=masks_d.dtype == torch.uint8, patch_u8=patches_d.dtype == torch.uint8)


# ---- 2. upload and buffers ------------------------------------------------------------------


class _DeviceTable(NamedTuple):
    """The per-view tables on the device: slices of one uploaded int32 tensor."""

    ip: torch.Tensor  # int32 [N * _I_COLS]
    fp: torch.Tensor  # float32 [N * _F_COLS]
    red: torch.Tensor  # int32: red_views
    blur: torch.Tensor  # int32: blur_views
    taps: torch.Tensor  # float32


def _upload(table: _ViewTable, device: torch.device) -> _DeviceTable:
    """All tables in one host-to-device copy: [int table | float table (bits) | reduction views |
    blur views | taps (bits)], the float parts reinterpreted as float32 on the device."""
    parts = [table.itab.reshape(-1), table.factors.reshape(-1).view(np.int32), table.red_views, table.blur_views,
             table.taps.view(np.int32)]
    bounds = [int(b) for b in np.cumsum([0] + [len(p) for p in parts])]
    packed = torch.from_numpy(np.concatenate(parts)).to(device, non_blocking=True)
    return _DeviceTable(ip=packed[bounds[0]:bounds[1]], fp=packed[bounds[1]:bounds[2]].view(torch.float32),
                        red=packed[bounds[2]:bounds[3]], blur=packed[bounds[3]:bounds[4]],
                        taps=packed[bounds[4]:bounds[5]].view(torch.float32))


class _Grid(NamedTuple):
    block: int  # pixels per program (BLOCK)
    n_blocks: int  # programs per view
    nchunk: int  # partial sums per view in the contrast-mean reduction


def _grid(size: int) -> _Grid:
    """How a view of size x size pixels is cut into programs (read at call time: tests shrink
    _MAX_BLOCK and _MAX_CHUNKS to reach several blocks and chunks on small views)."""
    ss = size * size
    block = min(_MAX_BLOCK, triton.next_power_of_2(ss))
    n_blocks = triton.cdiv(ss, block)
    return _Grid(block=block, n_blocks=n_blocks, nchunk=min(n_blocks, _MAX_CHUNKS))


class _Buffers(NamedTuple):
    out: torch.Tensor  # [B, V, 3, S, S] in the output dtype
    partials: torch.Tensor  # float32 [N, nchunk]: contrast-mean partial sums
    buf: torch.Tensor  # float32 [n_blur, 3, S, S]: blurred views after colour, before the blur
    rows: torch.Tensor | None  # like buf: after the horizontal blur pass


def _allocate(table: _ViewTable, on_device: _DeviceTable, out_shape: tuple, dtype: torch.dtype,
              nchunk: int) -> _Buffers:
    """The output and the scratch the launches write. Scratch a batch does not need is replaced
    by a tensor that is never read (a kernel argument must still be a tensor)."""
    device = on_device.ip.device
    n_views, size = len(table.itab), out_shape[-1]
    n_blur = len(table.blur_views)
    out = torch.empty(out_shape, dtype=dtype, device=device)
    partials = on_device.fp  # placeholder when no view needs a mean (never read)
    if len(table.red_views):
        partials = torch.empty((n_views, nchunk), dtype=torch.float32, device=device)
    buf = torch.empty((n_blur, 3, size, size), dtype=torch.float32, device=device) if n_blur else out
    rows = torch.empty_like(buf) if n_blur else None
    return _Buffers(out=out, partials=partials, buf=buf, rows=rows)


# ---- 3. the launches (module docstring: at most four, none per view) ------------------------


def _launch(views: torch.Tensor, mix: _MixInputs, table: _ViewTable, on_device: _DeviceTable, bufs: _Buffers,
            grid: _Grid, *, hard: bool, normalize: bool) -> None:
    """Run the batch: contrast means (only when some view needs one), mix + colour for every view,
    then the two blur passes over the blurred views only. Constexpr flags say which branches a
    batch can take, so each compiled variant carries only the code it runs."""
    size = views.shape[-1]
    n_views, n_blur = len(table.itab), len(table.blur_views)
    out_u8 = bufs.out.dtype == torch.uint8
    flags = dict(HAS_MIX=table.has_mix, MASK_U8=mix.mask_u8, PATCH_U8=mix.patch_u8, HARD=bool(hard))
    if len(table.red_views):
        _contrast_mean_kernel[(len(table.red_views), grid.nchunk)](
            views, mix.masks, mix.patches, on_device.ip, on_device.fp, on_device.red, bufs.partials,
            size, mix.ph, mix.pw, grid.nchunk, BLOCK=grid.block, **flags)
    _mix_colour_kernel[(n_views, grid.n_blocks)](
        views, mix.masks, mix.patches, on_device.ip, on_device.fp, bufs.partials, bufs.buf, bufs.out,
        size, mix.ph, mix.pw, grid.nchunk,
        ANY_JITTER=table.any_jitter, ANY_BLUR=bool(n_blur),
        NORMALIZE=bool(normalize), OUT_U8=out_u8,
        NCHUNK_P2=triton.next_power_of_2(grid.nchunk), BLOCK=grid.block, **flags)
    if n_blur:
        _blur_rows_kernel[(n_blur, grid.n_blocks)](bufs.buf, bufs.rows, on_device.taps, size, table.ktaps,
                                                   BLOCK=grid.block)
        _blur_cols_finish_kernel[(n_blur, grid.n_blocks)](
            bufs.rows, on_device.taps, on_device.blur, on_device.ip, bufs.out, size, table.ktaps,
            NORMALIZE=bool(normalize), OUT_U8=out_u8, BLOCK=grid.block)
