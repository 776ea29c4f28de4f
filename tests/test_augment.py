"""Tests of the augmentation sampler and the torch reference ops (objloader.augment)."""

import dataclasses

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from objloader.augment import apply_device_ops, bg_mixup, crop_views, cut_bg_patch, sample_params
from objloader.augment import reference as R


def _batch(b=6, k=4, seed=0):
    """A small synthetic batch: sizes, boxes (some samples without), background flags."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(40, 120, size=(b, 2))
    lo = rng.uniform(0.0, 0.5, size=(b, k, 2))
    hi = lo + rng.uniform(0.1, 0.5, size=(b, k, 2))
    boxes = np.concatenate([lo, np.minimum(hi, 1.0)], axis=-1).astype(np.float32)
    n_boxes = rng.integers(0, k + 1, size=b)
    n_boxes[0], n_boxes[1] = 0, 2
    has_bg = rng.random(b) < 0.6
    has_bg[:2] = True
    return dict(indices=np.arange(100, 100 + b), n_boxes=n_boxes, boxes=boxes, has_bg=has_bg, image_sizes=sizes)


def _sample(batch, **kw):
    kw = {"oa_crop": True, "p_mix": 0.5, **kw}
    return sample_params(
        kw.pop("seed", 1),
        kw.pop("epoch", 0),
        batch["indices"],
        batch["n_boxes"],
        batch["boxes"],
        batch["has_bg"],
        image_sizes=batch["image_sizes"],
        **kw,
    )


def _fields_equal(a, b, skip=()):
    return all(
        np.array_equal(getattr(a, f.name), getattr(b, f.name))
        for f in dataclasses.fields(a)
        if f.name not in skip
    )


@pytest.mark.parametrize("color", ["mocov2", "byol", "none"])
def test_same_seed_same_params_other_epoch_differs(color):
    batch = _batch()
    a, b = _sample(batch, color=color), _sample(batch, color=color)
    assert _fields_equal(a, b)
    c = _sample(batch, color=color, epoch=1)
    assert not np.array_equal(a.window, c.window)


def test_params_independent_of_batch_position_and_composition():
    batch = _batch(b=8)
    full = _sample(batch)
    perm = np.array([5, 2, 7, 0])  # a different, smaller batch in another order
    sub = {k: v[perm] for k, v in batch.items()}
    part = _sample(sub)
    for f in dataclasses.fields(full):
        if f.name == "partner":
            continue
        assert np.array_equal(getattr(full, f.name)[perm], getattr(part, f.name)), f.name


def test_oa_crop_windows_inside_shared_box_and_whole_image_without_boxes():
    batch = _batch(b=16, seed=3)
    p = _sample(batch, views=4)
    for i in range(16):
        h, w = batch["image_sizes"][i]
        win = p.window[i]
        # Whole pixels of the source image.
        assert np.allclose(win[:, [0, 2]] * w, np.round(win[:, [0, 2]] * w), atol=1e-3)
        assert np.allclose(win[:, [1, 3]] * h, np.round(win[:, [1, 3]] * h), atol=1e-3)
        assert np.all(win[:, 2] > win[:, 0]) and np.all(win[:, 3] > win[:, 1])
        if batch["n_boxes"][i] == 0:
            assert p.box_index[i] == -1
            continue
        k = p.box_index[i]
        assert 0 <= k < batch["n_boxes"][i]
        box = batch["boxes"][i, k]
        tol = 1e-5
        assert np.all(win[:, 0] >= box[0] - tol) and np.all(win[:, 2] <= box[2] + tol)
        assert np.all(win[:, 1] >= box[1] - tol) and np.all(win[:, 3] <= box[3] + tol)
    # OA-Crop off: every sample crops the whole image, no box chosen.
    off = _sample(batch, oa_crop=False)
    assert np.all(off.box_index == -1)
    assert np.all(off.window[..., :2] >= 0) and np.all(off.window[..., 2:] <= 1)
    # Samples without boxes crop the whole image whether OA-Crop is on or off.
    no_box = batch["n_boxes"] == 0
    assert no_box.any() and np.array_equal(p.window[no_box, :2], off.window[no_box])


def test_no_boxes_whole_image_region():
    # A region too thin for any RandomResizedCrop try falls back to the centre crop of the
    # whole image; with OA-Crop but no boxes the window must span the full image height here.
    p = sample_params(0, 0, [0], [0], np.zeros((1, 2, 4), np.float32), [False],
                      image_sizes=[[10, 1000]], oa_crop=True)
    assert p.box_index[0] == -1
    assert np.all(p.window[0, :, 1] == 0) and np.all(p.window[0, :, 3] == 1)


def test_partner_never_self_and_has_background():
    batch = _batch(b=10, seed=5)
    p = _sample(batch, p_mix=1.0)
    assert p.mix.all()
    for i in range(10):
        for v in range(p.views):
            j = p.partner[i, v]
            assert j != i and batch["has_bg"][j]
    # Nobody has a background: partner -1, the loader's ring buffer decides.
    none = _sample({**batch, "has_bg": np.zeros(10, bool)}, p_mix=1.0)
    assert np.all(none.partner == -1)


def _views_masks(b=3, v=2, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    views = torch.rand(b, v, 3, s, s, generator=g)
    masks = torch.rand(b, v, 1, s, s, generator=g)
    masks[..., : s // 4, :] = 0.0  # some pure background ...
    masks[..., -s // 4 :, :] = 1.0  # ... and some pure object
    patches = torch.rand(b, 3, 5, 7, generator=g)  # P does not divide S: exercises the tiling
    return views, masks, patches


@pytest.mark.parametrize("hard", [False, True])
def test_bg_mixup_eq4(hard):
    views, masks, patches = _views_masks()
    mix = np.ones((3, 2), bool)
    partner = np.array([[1, 2], [0, 2], [1, -1]])
    out = bg_mixup(views, masks, patches, mix, partner, hard=hard)
    s = views.shape[-1]
    for b in range(3):
        for v in range(2):
            j = partner[b, v]
            if j < 0:  # no partner: unmixed
                assert torch.equal(out[b, v], views[b, v])
                continue
            ys, xs = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
            tiled = patches[j][:, ys % 5, xs % 7]
            m = masks[b, v, 0]
            bg, fg = m == 0, m == 1
            assert torch.allclose(out[b, v][:, bg], tiled[:, bg])
            assert torch.allclose(out[b, v][:, fg], views[b, v][:, fg])
            if hard:  # every pixel is either the sample or the partner's patch
                obj = m >= 0.5
                assert torch.allclose(out[b, v][:, obj], views[b, v][:, obj])
                assert torch.allclose(out[b, v][:, ~obj], tiled[:, ~obj])
            else:
                assert torch.allclose(out[b, v], m * views[b, v] + (1 - m) * tiled)


def test_crop_flip_keeps_mask_aligned():
    h, w, m_res = 30, 40, 8
    image = np.zeros((h, w, 3), np.uint8)
    image[:, : w // 2] = 255  # left half bright = the object
    mask = np.zeros((m_res, m_res), np.uint8)
    mask[:, : m_res // 2] = 255
    window = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.float32)
    views, masks = crop_views(image, mask, window, np.array([False, True]), 16)
    assert views.dtype == torch.uint8 and views.shape == (2, 3, 16, 16)
    assert masks.shape == (2, 1, 16, 16) and masks.dtype == torch.uint8
    # Unflipped: object on the left; flipped: object on the right, in image and mask alike.
    assert views[0, :, :, :7].min() == 255 and views[0, :, :, 9:].max() == 0
    assert views[1, :, :, 9:].min() == 255 and views[1, :, :, :7].max() == 0
    for v in range(2):
        assert torch.equal((views[v, 0] > 127), (masks[v, 0] > 127))
    # A crop of a whole-pixel window matches torchvision's resized_crop (antialiased when downsampling).
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    win = np.array([[8 / w, 4 / h, 32 / w, 28 / h]], np.float32)
    views, _ = crop_views(image, mask, win, np.array([False]), 12)  # 2x downsample
    tv = TF.resized_crop(torch.from_numpy(image).permute(2, 0, 1), 4, 8, 24, 24, [12, 12], antialias=True)
    assert (views[0].int() - tv.int())[:, 1:-1, 1:-1].abs().max() <= 1


def test_cut_bg_patch():
    image = np.zeros((20, 20, 3), np.uint8)
    image[10:, 10:] = 200
    patch = cut_bg_patch(image, np.array([0.5, 0.5, 1.0, 1.0], np.float32), 6)
    assert patch.shape == (3, 6, 6) and torch.all(patch == 200)
    assert torch.all(cut_bg_patch(image, np.zeros(4, np.float32), 6) == 0)


@pytest.mark.parametrize(
    "ours, theirs, arg",
    [
        (R.adjust_brightness, TF.adjust_brightness, 1.3),
        (R.adjust_contrast, TF.adjust_contrast, 0.7),
        (R.adjust_saturation, TF.adjust_saturation, 1.35),
        (R.adjust_hue, TF.adjust_hue, 0.08),
        (R.adjust_hue, TF.adjust_hue, -0.1),
        (R.solarize, TF.solarize, 0.5),
    ],
)
def test_colour_ops_match_torchvision(ours, theirs, arg):
    x = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(1))
    x[:, :2, :2] = 0.5  # grey pixels exercise the hue edge case
    assert torch.allclose(ours(x, arg), theirs(x, arg), atol=1e-5)


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_blur_and_gray_match_torchvision(sigma):
    x = torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(2))
    k = R.blur_kernel_size(sigma)
    assert torch.allclose(R.gaussian_blur(x, sigma), TF.gaussian_blur(x, [k, k], [sigma, sigma]), atol=1e-5)
    gray = R.rgb_to_grayscale(x)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.allclose(gray, TF.rgb_to_grayscale(x, num_output_channels=3), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_device_ops_matches_torchvision_chain(dtype):
    batch = _batch(b=4, seed=7)
    p = _sample(batch, color="byol", p_mix=0.0)
    g = torch.Generator().manual_seed(3)
    views = torch.randint(0, 256, (4, 2, 3, 16, 16), generator=g, dtype=torch.uint8)
    masks = torch.ones(4, 2, 1, 16, 16)
    out = apply_device_ops(views, masks, None, p, dtype=dtype)
    assert out.dtype == dtype and out.shape == (4, 2, 3, 16, 16)
    tv_ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for b in range(4):
        for v in range(2):
            x = views[b, v].float() / 255
            if p.jitter[b, v]:
                f = [p.brightness[b, v], p.contrast[b, v], p.saturation[b, v], p.hue[b, v]]
                for op in p.jitter_order[b, v]:
                    x = tv_ops[op](x, float(f[op]))
            if p.grayscale[b, v]:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            if p.blur[b, v]:
                s = float(p.sigma[b, v])
                k = R.blur_kernel_size(s)
                x = TF.gaussian_blur(x, [k, k], [s, s])
            if p.solarize[b, v]:
                x = TF.solarize(x, 0.5)
            ref = TF.normalize(x, list(R.IMAGENET_MEAN), list(R.IMAGENET_STD)).to(dtype)
            atol = 1e-4 if dtype == torch.float32 else 1e-2
            assert torch.allclose(out[b, v].float(), ref.float(), atol=atol)
    # BYOL asymmetry: view 0 always blurred, never solarised.
    assert p.blur[:, 0].all() and not p.solarize[:, 0].any()


def test_color_none_is_identity_before_normalise():
    batch = _batch(b=3)
    p = _sample(batch, color="none")
    assert not (p.jitter.any() or p.grayscale.any() or p.blur.any() or p.solarize.any())
    views = torch.randint(0, 256, (3, 2, 3, 8, 8), dtype=torch.uint8)
    out = apply_device_ops(views, torch.ones(3, 2, 1, 8, 8), None, p)
    assert torch.allclose(out, R.normalize(views.float() / 255), atol=1e-6)


def _torchvision_get_params_literal(key, height, width, scale):
    """torchvision RandomResizedCrop.get_params written out in Python, drawing its uniforms from
    the sampler's counter-based stream instead of torch's generator."""
    from objloader.augment.params import _uniform

    area = height * width
    log_ratio = (np.log(3 / 4), np.log(4 / 3))
    for t in range(10):
        target_area = area * (scale[0] + (scale[1] - scale[0]) * _uniform(key, 4 * t))
        aspect_ratio = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * _uniform(key, 4 * t + 1))
        w = int(round(np.sqrt(target_area * aspect_ratio)))
        h = int(round(np.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(_uniform(key, 4 * t + 2) * (height - h + 1)), height - h)
            left = min(int(_uniform(key, 4 * t + 3) * (width - w + 1)), width - w)
            return top, left, h, w
    return None  # the centre fallback (not reached by the sizes below)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.2, 1.0), (0.5, 0.6)])
def test_crop_scale_is_torchvisions_scale_argument(scale):
    """Every window is torchvision's get_params(scale=scale) on the same draws, and its area is a
    fraction of the image inside the scale range (up to rounding to whole pixels)."""
    from objloader.augment.params import _GEOMETRY_STREAM, stream_key

    b, h, w = 64, 300, 400
    p = sample_params(4, 2, np.arange(b), image_sizes=np.full((b, 2), (h, w)), crop_scale=scale)
    for i in range(b):
        for v in range(2):
            key = np.uint64(stream_key(4, 2, i, v, _GEOMETRY_STREAM))  # uint64, as inside the sampler
            top, left, hh, ww = _torchvision_get_params_literal(key, h, w, scale)
            assert np.allclose(p.window[i, v], [left / w, top / h, (left + ww) / w, (top + hh) / h], atol=1e-6)
    area = (p.window[..., 2] - p.window[..., 0]) * (p.window[..., 3] - p.window[..., 1])
    assert area.min() >= scale[0] * 0.97 and area.max() <= scale[1] * 1.03


@pytest.mark.parametrize("bad", [(0.0, 1.0), (0.5, 0.4), (0.2, 1.2), (0.2,), "0.2", (float("nan"), 1.0)])
def test_bad_crop_scale_is_refused(bad):
    with pytest.raises(ValueError, match="crop_scale"):
        sample_params(0, 0, [0], image_sizes=[[32, 32]], crop_scale=bad)


@pytest.mark.parametrize("top, left, h, w, size", [(10, 20, 250, 300, 224), (0, 0, 300, 400, 112),
                                                   (50, 60, 180, 230, 64), (3, 1, 297, 100, 96)])
def test_downscaled_views_are_torchvisions_antialiased_resized_crop(top, left, h, w, size):
    """A window larger than the view is resampled as torchvision's resized_crop(antialias=True)
    (PIL's triangle filter) on the same float image, and the uint8 path within one grey level,
    inside the view; on its outermost ring torchvision drops the taps beyond the crop, where the
    reference reads them (as DALI does), so there the two only stay close."""
    img = torch.rand(300, 400, 3, generator=torch.Generator().manual_seed(1)) * 255
    window = np.array([[left / 400, top / 300, (left + w) / 400, (top + h) / 300]], np.float32)
    ours = R._resample(img.permute(2, 0, 1), torch.from_numpy(window), torch.tensor([False]), size)[0]
    want = TF.resized_crop(img.permute(2, 0, 1), top, left, h, w, [size, size], antialias=True)
    inner = (slice(None), slice(1, -1), slice(1, -1))
    assert (ours - want)[inner].abs().max() < 0.01
    assert (ours - want).abs().mean() < 1.0
    u8 = img.round().to(torch.uint8)
    views, _ = crop_views(u8, torch.zeros(8, 8, dtype=torch.uint8), window, [False], size)
    tv = TF.resized_crop(u8.permute(2, 0, 1), top, left, h, w, [size, size], antialias=True)
    assert (views[0].int() - tv.int())[inner].abs().max() <= 1


def test_upscaled_views_are_bilinear_at_pixel_centres():
    """A window smaller than the view: each output pixel is the bilinear sample at its centre's
    point of the unit square (grid_sample, align_corners=False, border padding)."""
    import torch.nn.functional as F

    img = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(2))
    window = torch.tensor([[0.1, 0.2, 0.7, 0.9]])
    ours = R._resample(img, window, torch.tensor([True]), 64)[0]
    centres = (torch.arange(64, dtype=torch.float64) + 0.5) / 64
    xs = (0.1 + centres * 0.6).flip(0)
    ys = 0.2 + centres * 0.7
    grid = torch.stack(torch.meshgrid(2 * ys - 1, 2 * xs - 1, indexing="ij")[::-1], -1)[None].float()
    want = F.grid_sample(img[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    assert (ours - want).abs().max() < 1e-5
