"""Readable torch reference of every objloader op (CPU or CUDA). This file *is* the semantics.

Data flow of one training batch (DESIGN.md "Op semantics"):

    engine stage   crop_views (image + mask, same window and flip)   cut_bg_patch
    device stage   bg_mixup (eq. 4) -> colour (jitter, grayscale, blur, solarise) -> normalize

All parameters come from :func:`objloader.augment.params.sample_params`; nothing here is random.
Fast paths (numba, DALI, Triton) are tested against these functions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .params import AugParams
from .renamed import renamed_keywords

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LUMA_WEIGHTS",
    "HARD_MIX_THRESHOLD",
    "SOLARIZE_THRESHOLD",
    "crop_views",
    "cut_bg_patch",
    "bg_mixup",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_hue",
    "rgb_to_grayscale",
    "blur_kernel_size",
    "gaussian_blur",
    "solarize",
    "normalize",
    "apply_device_ops",
]

# The numbers every implementation of these ops shares. The numba (kernels/cpu_ops.py) and
# Triton (kernels/device_ops.py) twins import them from here, so they cannot drift apart.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma (r, g, b), torchvision's rgb_to_grayscale weights
HARD_MIX_THRESHOLD = 0.5  # BG-HardMix: a pixel is object when its soft mask is >= 0.5
SOLARIZE_THRESHOLD = 0.5  # on [0, 1] images, as in BYOL
EDGE_SLACK_PX = 1e-3  # a window meant to lie on whole pixels lies within this of them (float32 storage)

# --------------------------------------------------------------------------------------------
# Geometry (engine stage)
# --------------------------------------------------------------------------------------------


def _as_tensor(x, device=None) -> torch.Tensor:
    return x.to(device) if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x), device=device)


def _axis_weights(lo: float, hi: float, extent: int, size: int, inside: bool = False) -> torch.Tensor:
    """[size, extent] float64: row k holds the weights output pixel k gives each source pixel
    along an axis of ``extent`` pixels, for the window [lo, hi] of the unit square.

    scale = (hi - lo) * extent / size source pixels per output pixel.
    - scale <= 1 (upsampling): output k reads the point p = lo * extent + (k + 0.5) * scale - 0.5
      (pixel centres, align_corners=False) linearly from its two neighbours, p clamped to the
      image border: torchvision's ``resized_crop(..., antialias=False)``, except that points
      within half a pixel of the window's edge read the neighbouring source pixels, where
      torchvision clamps to the crop's edge.
    - scale > 1 (downsampling): antialiased: a triangle of half-width ``scale`` centred on
      lo * extent + (k + 0.5) * scale, normalised to sum 1 (PIL's bilinear filter, which
      torchvision's ``antialias=True`` applies); taps beyond the window read the pixels there,
      and beyond the image border the border pixel. torchvision drops the taps outside the
      crop, so the two differ on the view's outermost ring of pixels only; DALI's antialiased
      resize pads as here.
    Because windows are defined on the unit square, an image of any size and a mask of any M
    cut with the same window sample the same points, which keeps them aligned.
    ``inside`` (the background patch): the window's own pixels play the image's part, its edge
    the border's, so no pixel outside the window contributes.
    """
    a, b = lo * extent, hi * extent
    scale = (b - a) / size
    k = torch.arange(size, dtype=torch.float64)
    edge_lo, edge_hi = 0, extent
    if inside:
        edge_lo = max(math.floor(a + EDGE_SLACK_PX), 0)
        edge_hi = min(max(math.ceil(b - EDGE_SLACK_PX), edge_lo + 1), extent)
    if scale <= 1.0:
        j = torch.arange(extent, dtype=torch.float64)
        p = (a + (k + 0.5) * scale - 0.5).clamp(edge_lo, edge_hi - 1)
        return (1 - (p[:, None] - j[None, :]).abs()).clamp(min=0)  # linear interpolation as a tent of width 1
    reach = math.ceil(scale) + 1  # taps this far beyond the border still carry weight
    j = torch.arange(-reach, extent + reach, dtype=torch.float64)
    centre = a + (k + 0.5) * scale
    tri = (1 - ((j[None, :] + 0.5) - centre[:, None]).abs() / scale).clamp(min=0)  # [size, extent + 2 reach]
    border = j.clamp(edge_lo, edge_hi - 1).long().expand(size, -1)
    w = torch.zeros(size, extent, dtype=torch.float64).scatter_add_(1, border, tri)
    return w / w.sum(1, keepdim=True)


def _resample(src: torch.Tensor, windows: torch.Tensor, flip: torch.Tensor, size: int,
              inside: bool = False) -> torch.Tensor:
    """Samples of ``src`` [C, H, W] (float) in each normalised window (x0, y0, x1, y1) -> [V, C,
    S, S]: view = Wy @ src @ Wx^T per channel, with the per-axis weights of :func:`_axis_weights`
    (bilinear when upsampling, antialiased when downsampling). A flipped view mirrors its output
    columns (= horizontal flip of the output)."""
    c, h, w = src.shape
    views = []
    for win, fl in zip(windows.tolist(), flip.tolist()):
        wx = _axis_weights(win[0], win[2], w, size, inside).to(src)
        wy = _axis_weights(win[1], win[3], h, size, inside).to(src)
        if fl:
            wx = wx.flip(0)
        views.append(wy @ src @ wx.T)  # [C, S, S]
    return torch.stack(views) if views else src.new_zeros(0, c, size, size)


def crop_views(image, mask, window, flip, out_size: int, mask_views=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut V views of one image and its mask with the same windows and flips.

    Args:
        image: uint8 [H, W, 3] (tensor or array).
        mask: uint8 [M, M] in [0, 255] over the unit square of the image.
        window: [V, 4] normalised (x0, y0, x1, y1); flip: bool [V].
        out_size: S.
        mask_views: optional bool [V]: resample the mask only for these views (the others stay
            0), as the engines do for views the device stage will not mix.
    Returns:
        uint8 views [V, 3, S, S] and uint8 view masks [V, 1, S, S] (255 = object), both
        bilinear samples at the same points, rounded to the nearest integer.
    """
    img = _as_tensor(image)
    device = img.device
    m = _as_tensor(mask, device)
    if m.dtype != torch.uint8:
        raise TypeError(f"mask must be uint8 in [0, 255], got {m.dtype}")
    win = _as_tensor(window, device).reshape(-1, 4)
    fl = _as_tensor(flip, device).reshape(-1).bool()
    views = _resample(img.permute(2, 0, 1).to(torch.float32), win, fl, out_size)
    if mask_views is None:
        return _to_uint8(views), _to_uint8(_resample(m.to(torch.float32).unsqueeze(0), win, fl, out_size))
    which = _as_tensor(mask_views, device).reshape(-1).bool()
    masks = torch.zeros(len(win), 1, out_size, out_size, dtype=torch.uint8, device=device)
    if which.any():
        masks[which] = _to_uint8(_resample(m.to(torch.float32).unsqueeze(0), win[which], fl[which], out_size))
    return _to_uint8(views), masks


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)


def cut_bg_patch(image, bg_rect, size: int) -> torch.Tensor:
    """The background rectangle of an image resized to uint8 [3, size, size].

    Only the rectangle's own pixels are read (``_axis_weights(inside=True)``), so no object pixel
    leaks into the patch at its edge. A zero-area ``bg_rect`` (no background) gives an all-zero
    patch; the sampler never picks such a sample as a partner (``has_bg`` false).
    """
    img = _as_tensor(image)
    rect = _as_tensor(bg_rect, img.device).reshape(1, 4).to(torch.float32)
    if (rect[0, 2] - rect[0, 0]) * (rect[0, 3] - rect[0, 1]) <= 0:
        return torch.zeros(3, size, size, dtype=torch.uint8, device=img.device)
    no_flip = torch.zeros(1, dtype=torch.bool, device=img.device)
    return _to_uint8(_resample(img.permute(2, 0, 1).to(torch.float32), rect, no_flip, size, inside=True)[0])


# --------------------------------------------------------------------------------------------
# Soft BG-Mixup (device stage), paper eq. 4
# --------------------------------------------------------------------------------------------


def _tile(patches: torch.Tensor, size: int) -> torch.Tensor:
    """Tile [..., C, P, P] patches over an S x S view: out[..., y, x] = patch[..., y % P, x % P].

    Tiling rule: one patch pixel per view pixel (the patch is not rescaled to the view), starting
    at the view's top-left corner and repeating right and down, cut at the view's edge.
    """
    p_h, p_w = patches.shape[-2:]
    reps = (math.ceil(size / p_h), math.ceil(size / p_w))
    tiled = patches.repeat(*([1] * (patches.dim() - 2)), *reps)
    return tiled[..., :size, :size]


def bg_mixup(views, masks, patches, mix, partner, hard: bool = False) -> torch.Tensor:
    """x = m * x + (1 - m) * tile(patch_partner)   (paper eq. 4), per view where mixed.

    Args:
        views: float [B, V, 3, S, S] in [0, 1].
        masks: [B, V, 1, S, S], the views' soft masks: uint8 (255 = object) or float in [0, 1].
        patches: [N, 3, P, P] (uint8 or float in [0, 1]); ``partner`` indexes it. N >= B when
            the loader appends ring-buffer patches after the batch's own.
        mix: bool [B, V]; partner: int [B, V], -1 = no partner (view left unmixed).
        hard: BG-HardMix, binarise m at 0.5 first.
    """
    device = views.device
    mix = _as_tensor(mix, device).bool()
    partner = _as_tensor(partner, device).long()
    pf = patches.to(device)
    pf = pf.float() / 255.0 if pf.dtype == torch.uint8 else pf.to(views.dtype)
    m = masks.to(device)
    m = m.to(views.dtype) / 255.0 if m.dtype == torch.uint8 else m.to(views.dtype)
    if hard:
        m = (m >= HARD_MIX_THRESHOLD).to(views.dtype)
    background = _tile(pf[partner.clamp(min=0)], views.shape[-1]).to(views.dtype)  # [B, V, 3, S, S]
    # Unmixed views keep m = 1 everywhere, so the same formula leaves them untouched.
    mixed = (mix & (partner >= 0)).view(*mix.shape, 1, 1, 1)
    m = torch.where(mixed, m, torch.ones_like(m))
    return m * views + (1 - m) * background


# --------------------------------------------------------------------------------------------
# Colour (device stage), torchvision.transforms.v2.functional semantics on float [3, H, W]
# --------------------------------------------------------------------------------------------


def _per_image(factor, x: torch.Tensor, dims: int):
    """A scalar, or a tensor [N] of per-image factors shaped to broadcast over ``dims`` dims."""
    if isinstance(factor, torch.Tensor) and factor.dim() == 1:
        return factor.to(x.dtype).view(-1, *([1] * dims))
    return factor


def rgb_to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma (torchvision's weights), kept as 3 equal channels."""
    r, g, b = x.unbind(dim=-3)
    wr, wg, wb = LUMA_WEIGHTS
    luma = wr * r + wg * g + wb * b
    return luma.unsqueeze(-3).expand_as(x).contiguous()


# Every colour op takes [3, H, W] with a float factor, or [N, 3, H, W] with a tensor [N].


def _blend(x: torch.Tensor, other: torch.Tensor, factor) -> torch.Tensor:
    f = _per_image(factor, x, 3)
    return (f * x + (1 - f) * other).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor) -> torch.Tensor:
    return (x * _per_image(factor, x, 3)).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor) -> torch.Tensor:
    # Blend towards the mean grey level of the whole image.
    mean = rgb_to_grayscale(x)[..., :1, :, :].mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor) -> torch.Tensor:
    # Blend towards the pixel's own grey level.
    return _blend(x, rgb_to_grayscale(x), factor)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    maxc, minc = x.amax(dim=-3), x.amin(dim=-3)
    delta = maxc - minc
    grey = delta == 0
    safe_delta = torch.where(grey, torch.ones_like(delta), delta)  # grey pixels: hue 0, no NaN
    s = delta / torch.where(grey, torch.ones_like(maxc), maxc)
    # Hexcone hue in sixths; ties resolve r, then g, then b (as torchvision / PIL).
    h = torch.where(
        maxc == r,
        (g - b) / safe_delta,
        torch.where(maxc == g, 2.0 + (b - r) / safe_delta, 4.0 + (r - g) / safe_delta),
    )
    h = torch.where(grey, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(dim=-3)
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    sector = sector.long().remainder(6)
    p = (v * (1 - s)).clamp(0.0, 1.0)
    q = (v * (1 - s * f)).clamp(0.0, 1.0)
    t = (v * (1 - s * (1 - f))).clamp(0.0, 1.0)
    # (r, g, b) for each of the six hue sectors.
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = torch.zeros_like(x)
    for k, rgb in enumerate(table):
        out = torch.where((sector == k).unsqueeze(-3), torch.stack(rgb, dim=-3), out)
    return out


def adjust_hue(x: torch.Tensor, shift) -> torch.Tensor:
    """Rotate hue by ``shift`` turns (in [-0.5, 0.5]) in HSV space."""
    hsv = _rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=-3)
    h = torch.remainder(h + _per_image(shift, x, 2), 1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def blur_kernel_size(sigma: float) -> int:
    """2 * ceil(3 sigma) + 1: the kernel covers +-3 sigma (99.7 % of the mass).

    Chosen over SimCLR's "10 % of the image size" so the blur of a view does not depend on the
    view's resolution, and the kernel stays small (<= 13 taps for sigma <= 2).
    """
    return 2 * math.ceil(3 * sigma) + 1


def gaussian_taps(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """Normalised Gaussian taps [N, size] centred in ``size``; each row keeps only its own
    2 * ceil(3 sigma) + 1 central taps, so one padded kernel serves views of different sigma."""
    half = (size - 1) // 2
    t = torch.arange(-half, half + 1, dtype=sigma.dtype, device=sigma.device)
    radius = torch.ceil(3 * sigma).unsqueeze(1)  # [N, 1]
    w = torch.exp(-0.5 * (t / sigma.unsqueeze(1)) ** 2) * (t.abs() <= radius)
    return w / w.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (torchvision's gaussian_blur).

    ``x`` [C, H, W] with a float sigma, or [N, C, H, W] with a tensor of N sigmas. Reflect padding
    is defined by position, so padding every view by the largest radius and giving each view zero
    taps beyond its own radius equals blurring each view with its own kernel.
    """
    single = not isinstance(sigma, torch.Tensor)
    xs = x.unsqueeze(0) if single else x
    sig = torch.as_tensor([sigma] if single else sigma, dtype=torch.float64, device=x.device).reshape(-1)
    k = blur_kernel_size(float(sig.max()))
    taps = gaussian_taps(sig, k).to(x.dtype)  # [N, k]
    n, c, h, w = xs.shape
    kernel = taps.repeat_interleave(c, dim=0)  # one kernel per (view, channel)
    y = F.pad(xs.reshape(1, n * c, h, w), [k // 2] * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, k), groups=n * c)  # along x
    y = F.conv2d(y, kernel.view(n * c, 1, k, 1), groups=n * c)  # along y
    y = y.reshape(n, c, h, w)
    return y[0] if single else y


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD) -> torch.Tensor:
    return torch.where(x >= threshold, 1.0 - x, x)


def normalize(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ImageNet mean/std normalisation of [..., 3, H, W] in [0, 1], cast to ``dtype``."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return ((x - mean) / std).to(dtype)


_imagenet_normalize = normalize  # apply_device_ops' keyword `normalize` hides the function

_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def _colour_batch(x: torch.Tensor, params: AugParams) -> torch.Tensor:
    """MoCo v2 / BYOL colour chain on [N = B*V, 3, S, S]: jitter (per-view random order) ->
    grayscale -> blur -> solarise, each op applied to the views whose parameters ask for it."""
    dev = x.device

    def flat(a, dtype=None):
        t = torch.as_tensor(np.asarray(a).reshape(-1), device=dev)
        return t if dtype is None else t.to(dtype)

    jitter = flat(params.jitter, torch.bool)
    factors = torch.stack([flat(params.brightness), flat(params.contrast), flat(params.saturation),
                           flat(params.hue)], dim=1).to(x.dtype)  # [N, 4]
    order = flat(params.jitter_order.reshape(-1, 4)).view(-1, 4) if params.jitter_order.size else None
    x = x.clone()
    if bool(jitter.any()):
        # ColorJitter: at position p each jittered view applies its own p-th op.
        for position in range(4):
            for op, fn in enumerate(_JITTER_OPS):
                sel = torch.nonzero(jitter & (order[:, position] == op)).flatten()
                if len(sel):
                    x[sel] = fn(x[sel], factors[sel, op])
    for flag, fn in ((params.grayscale, rgb_to_grayscale), (params.blur, None), (params.solarize, solarize)):
        sel = torch.nonzero(flat(flag, torch.bool)).flatten()
        if not len(sel):
            continue
        if fn is None:
            x[sel] = gaussian_blur(x[sel], flat(params.sigma, torch.float64)[sel])
        else:
            x[sel] = fn(x[sel])
    return x


@renamed_keywords(normalise="normalize")
def apply_device_ops(
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
    """Device stage for a batch: BG-Mixup (eq. 4) -> colour -> normalise.

    Args:
        views_uint8: uint8 [B, V, 3, S, S]; masks: [B, V, 1, S, S] uint8 (255 = object) or float
            in [0, 1] (None: no mixup).
        patches: [N, 3, P, P] background patches indexed by ``params.partner`` (None: no mixup).
        params: the batch's :class:`AugParams`.
        normalize: False returns [0, 1] values (uint8 when ``dtype`` is torch.uint8).
        reuse_views: the caller gives up ``views_uint8``: an implementation may return it,
            overwritten with the result (the CPU one does for uint8 output without colour).
    Returns:
        [B, V, 3, S, S] in ``dtype``, ImageNet-normalised when ``normalize``.
    """
    x = views_uint8.float() / 255.0
    if patches is not None and masks is not None and bool(np.any(params.mix & (params.partner >= 0))):
        x = bg_mixup(x, masks, patches, params.mix, params.partner, hard=hard)
    shape = x.shape
    x = _colour_batch(x.reshape(-1, *shape[2:]), params).view(shape)
    if not normalize:
        return _to_uint8(x * 255.0) if dtype == torch.uint8 else x.to(dtype)
    return _imagenet_normalize(x, dtype)
