"""make_loader on all three engines: black-box checks on crafted data (OA-Crop containment,
BG-Mixup provenance, masks through flips), engine parity, seeds, edge cases, sharding."""

import dataclasses
import os

import cv2
import numpy as np
import pytest
import torch

from objloader.augment import apply_device_ops, crop_views, cut_bg_patch, sample_params
from objloader.errors import ConfigError
from objloader.loaders import DeviceStage, EngineBatch, LoaderConfig, epoch_order, make_loader
from objloader.loaders.resample import crop_views_into, cut_patch_into, table_arrays
from objloader.store import BuildOptions, build

ENGINES = ["torch", "ffcv", "dali"]
# Flat colours far apart, so JPEG error never confuses them: background of sample i is BG[i % 4],
# every object is OBJ. Sample i's partner background is then recognisable by its colour.
BG = np.array([[0, 0, 255], [0, 160, 0], [255, 255, 0], [120, 0, 120]], np.int64)
OBJ = np.array([255, 255, 255], np.int64)
N_RECORDS = 16
# Record index -> scene number: ImageFolder sorts by class ("a" holds the odd scenes, "b" the even).
SCENE = [*range(1, 16, 2), *range(0, 16, 2)]


def _write_scene(path, i, rng):
    """One object rectangle (white) on a flat background; records 14 and 15 are edge cases:
    14 has an empty mask (no object: no boxes, all background), 15 a full one (no background)."""
    h, w = int(rng.integers(96, 128)), int(rng.integers(96, 128))
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = BG[i % 4]
    mask = np.zeros((h, w), np.uint8)
    if i != 14:
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = y0 + h // 3 + int(rng.integers(0, h // 4)), x0 + w // 3 + int(rng.integers(0, w // 4))
        if i == 15:
            y0, x0, y1, x1 = 0, 0, h, w
        img[y0:y1, x0:x1] = OBJ
        mask[y0:y1, x0:x1] = 255
    cv2.imwrite(os.path.join(path, f"{i:02d}.png"), img[:, :, ::-1])
    cv2.imwrite(os.path.join(path, f"{i:02d}.mask.png"), mask)


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    src = tmp_path_factory.mktemp("crafted_src")
    rng = np.random.default_rng(7)
    for c in ("a", "b"):
        os.makedirs(src / c)
    for i in range(N_RECORDS):
        _write_scene(str(src / ("a" if i % 2 else "b")), i, rng)
    out = tmp_path_factory.mktemp("crafted") / "ds"
    build(str(src), str(out), BuildOptions(masks="gt", max_res=128, mask_res=32, shard_size=5, jpeg_quality=95),
          workers=1, log=lambda *a: None)
    return str(out)


def _raw_loader(path, engine, **kw):
    """uint8 views straight from the engine (+ mixup), so pixel provenance can be inspected."""
    args = dict(batch_size=8, image_size=32, color="none", normalize=False, dtype=torch.uint8, shuffle=False,
                num_workers=1, return_masks=True, seed=3)
    args.update(kw)
    return make_loader(path, engine, **args)


def _max_abs(diff, where):
    d = diff.abs()[where]
    return int(d.max()) if d.numel() else 0


def _epoch(loader, epoch=0):
    loader.set_epoch(epoch)
    return list(loader)


@pytest.fixture(scope="module")
def full_batches(crafted):
    """Per engine, one epoch with OA-Crop and BG-Mixup p = 1 (hard), shared by several tests."""
    out = {}
    for engine in ENGINES:
        out[engine] = _epoch(_raw_loader(crafted, engine, oa_crop=True, bg_mixup=1.0, bg_mode="hard"))
    return out


def _record_boxes(crafted):
    from objloader.store import open_dataset

    ds = open_dataset(crafted)
    return [ds[i] for i in range(len(ds))]


@pytest.mark.parametrize("engine", ENGINES)
def test_epoch_covers_records_with_labels(full_batches, crafted, engine):
    batches = full_batches[engine]
    assert len(batches) == N_RECORDS // 8
    seen = np.concatenate([b.index.numpy() for b in batches])
    assert sorted(seen.tolist()) == list(range(N_RECORDS))
    recs = _record_boxes(crafted)
    for b in batches:
        assert b.views.shape == (8, 2, 3, 32, 32) and b.views.dtype == torch.uint8
        assert b.masks.shape == (8, 2, 1, 32, 32)
        assert [recs[i]["label"] for i in b.index.tolist()] == b.labels.tolist()


def test_engines_produce_the_same_tensors(full_batches):
    """Same parameters -> same pixels. Every engine decodes bit-identically (libjpeg-turbo, accurate
    DCT); bilinear arithmetic in float32 (torch, DALI) vs float64 (numba) may round a few pixels
    one level apart."""
    ref = full_batches["torch"]
    for engine in ("ffcv", "dali"):
        for a, b in zip(ref, full_batches[engine]):
            assert torch.equal(a.index, b.index)
            for f in ("window", "flip", "box_index", "mix", "partner", "jitter", "brightness", "sigma"):
                assert np.array_equal(getattr(a.params, f), getattr(b.params, f)), (engine, f)
            for name in ("views", "masks"):
                d = (getattr(a, name).int() - getattr(b, name).int()).abs()
                assert d.max() <= 1, (engine, name, int(d.max()))
                assert (d > 0).float().mean() < 0.02, (engine, name)


@pytest.mark.parametrize("engine", ENGINES)
def test_crop_scale_reaches_every_engine(crafted, engine):
    """A non-default crop_scale: every engine cuts the sampler's windows for that scale, with the
    pixels of the reference crop of the same windows."""
    from objloader.store import open_dataset

    batch = next(iter(_raw_loader(crafted, engine, crop_scale=(0.3, 0.5), bg_mixup=0.0)))
    ds = open_dataset(crafted)
    index = batch.index.numpy()
    recs = [ds[int(i)] for i in index]
    sizes = np.array([r["image"].shape[:2] for r in recs])
    expect = sample_params(3, 0, index, image_sizes=sizes, crop_scale=(0.3, 0.5))
    default = sample_params(3, 0, index, image_sizes=sizes)
    assert np.array_equal(batch.params.window, expect.window)
    assert not np.array_equal(expect.window, default.window)
    for k, r in enumerate(recs):
        ref, _ = crop_views(r["image"], r["mask"], expect.window[k], expect.flip[k], 32)
        assert (batch.views[k].int() - ref.int()).abs().max() <= 1, (engine, k)


def test_engines_agree_after_colour_and_normalisation(crafted):
    """The full MoCo v2 pipeline (OA-Crop + soft BG-Mixup 0.4 + colour + normalise), torch vs DALI."""
    kw = dict(batch_size=8, image_size=32, oa_crop=True, bg_mixup=0.4, shuffle=False, num_workers=1, seed=5)
    a = next(iter(make_loader(crafted, "torch", **kw)))
    b = next(iter(make_loader(crafted, "dali", **kw)))
    assert a.views.dtype == torch.float32 and a.views.shape == (8, 2, 3, 32, 32)
    assert np.array_equal(a.params.partner, b.params.partner) and a.params.jitter.any()
    # One uint8 level is 1 / 255 / 0.225 ~ 0.017 after normalisation; blur spreads a rare level.
    assert (a.views - b.views).abs().max() < 0.05


@pytest.mark.parametrize("engine", ENGINES)
def test_oa_crop_views_stay_inside_the_box(crafted, engine, full_batches):
    """With OA-Crop every view pixel comes from the object (white), never the coloured background."""
    for b in full_batches[engine]:
        for row, i in enumerate(SCENE[k] for k in b.index.tolist()):
            if i == 14:  # no object, no box: OA-Crop falls back to the whole image
                assert b.params.box_index[row] == -1
                continue
            assert b.params.box_index[row] == 0
            # Mixup would paint background over; look at the mask's object pixels and, for the
            # sample's own content, at the pre-mixup view via the mask == 255 region.
            for v in range(2):
                obj = b.masks[row, v, 0] == 255
                assert obj.float().mean() > 0.5, (i, v)  # the view is mostly object
                px = b.views[row, v].permute(1, 2, 0)[obj].int()
                assert (px - torch.tensor(OBJ)).abs().max() <= 40


@pytest.mark.parametrize("engine", ENGINES)
def test_bg_mixup_p1_pixel_provenance(crafted, engine):
    """p_mix = 1 (hard): every background pixel of a view is the partner's background patch (cut
    from another record, tiled), every object pixel the sample's own; masks follow the flips."""
    recs = _record_boxes(crafted)
    patches = [cut_bg_patch(r["image"], r["bg_rect"], 16) for r in recs]  # patch_size = 32 // 2
    batches = _epoch(_raw_loader(crafted, engine, bg_mixup=1.0, bg_mode="hard"))
    flipped = 0
    for b in batches:
        p = b.params
        assert p.mix.all()
        for row, k in enumerate(b.index.tolist()):
            i = SCENE[k]
            for v in range(2):
                j = p.partner[row, v]
                assert j != row and j >= 0
                partner = b.index[j].item()
                assert SCENE[partner] != 15  # the full-mask record has no background to give
                view = b.views[row, v].int()
                m = b.masks[row, v, 0]
                tiled = patches[partner].repeat(1, 2, 2).int()  # patch[y % P, x % P]
                background, obj = (m < 128).expand(3, 32, 32), (m == 255).expand(3, 32, 32)
                assert _max_abs(view - tiled, background) <= 1, (i, v)
                own = torch.tensor(OBJ if i != 14 else BG[i % 4]).view(3, 1, 1)
                assert _max_abs(view - own, obj) <= 40, (i, v)  # JPEG error only
                flipped += int(p.flip[row, v])
    assert 0 < flipped < 2 * N_RECORDS


def test_soft_mixup_blends_by_the_mask(crafted):
    """Soft mode (eq. 4): at soft mask edges the pixel is m * own + (1 - m) * partner background,
    not a hard switch; object pixels keep the view's own value exactly."""
    recs = _record_boxes(crafted)
    patches = [cut_bg_patch(r["image"], r["bg_rect"], 16).repeat(1, 2, 2).float() for r in recs]
    raw = _epoch(_raw_loader(crafted, "torch"))  # same geometry: it does not depend on p_mix
    mixed = _epoch(_raw_loader(crafted, "torch", bg_mixup=1.0))
    errors, hard_errors = [], []
    for r, m in zip(raw, mixed):
        assert np.array_equal(r.params.window, m.params.window)
        for row in range(len(m.index)):
            for v in range(2):
                partner_bg = patches[m.index[m.params.partner[row, v]].item()]
                w = m.masks[row, v].float() / 255
                expected = w * r.views[row, v].float() + (1 - w) * partner_bg
                hard = torch.where(w >= 0.5, r.views[row, v].float(), partner_bg)
                edge = ((w > 0.25) & (w < 0.75)).expand(3, 32, 32)
                errors.append((m.views[row, v].float() - expected).abs()[edge])
                hard_errors.append((m.views[row, v].float() - hard).abs()[edge])
                own = (w == 1).expand(3, 32, 32)
                assert torch.equal(m.views[row, v][own], r.views[row, v][own])
    errors, hard_errors = torch.cat(errors), torch.cat(hard_errors)
    assert len(errors) > 100 and errors.max() <= 1  # the formula, up to uint8 rounding
    assert hard_errors.mean() > 10 * max(errors.mean(), 0.05)  # and visibly not a hard switch


@pytest.mark.parametrize("engine", ["torch", "dali"])
def test_same_seed_same_batches_other_seed_differs(crafted, engine):
    kw = dict(batch_size=8, image_size=24, oa_crop=True, bg_mixup=0.4, num_workers=1)
    a = next(iter(make_loader(crafted, engine, seed=11, **kw)))
    b = next(iter(make_loader(crafted, engine, seed=11, **kw)))
    c = next(iter(make_loader(crafted, engine, seed=12, **kw)))
    assert torch.equal(a.index, b.index) and torch.equal(a.views, b.views)
    assert not torch.equal(a.views, c.views)


def test_epochs_differ_and_set_epoch_repeats(crafted):
    loader = _raw_loader(crafted, "torch", shuffle=True)
    e0, e1 = _epoch(loader, 0), _epoch(loader, 1)
    again = _epoch(loader, 0)
    assert not torch.equal(e0[0].index, e1[0].index)
    assert all(torch.equal(x.views, y.views) for x, y in zip(e0, again))


def test_no_boxes_no_background_dataset(tmp_path, crafted):
    """--masks none: full masks, no boxes, no background anywhere. OA-Crop and BG-Mixup would
    change nothing (the views would be the plain views), so make_loader refuses them rather than
    train the plain method under their name; the plain loader reads it."""
    from objloader.store import read_manifest

    src = tmp_path / "src" / "a"
    os.makedirs(src)
    rng = np.random.default_rng(0)
    for i in range(8):
        cv2.imwrite(str(src / f"{i}.png"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    out = tmp_path / "none"
    build(str(tmp_path / "src"), str(out), BuildOptions(masks="none", max_res=64, mask_res=16), workers=1,
          log=lambda *a: None)
    assert read_manifest(str(out))["counts"]["records_without_background"] == 8
    plain = next(iter(_raw_loader(str(out), "torch")))
    assert (plain.params.partner == -1).all()
    with pytest.raises(ConfigError, match="built with masks 'none'"):
        _raw_loader(str(out), "torch", oa_crop=True, bg_mixup=1.0)


def _flat_batch(has_bg, value):
    """An engine batch of black 16 px views with all-background masks and patches of ``value``."""
    b = len(has_bg)
    return EngineBatch(views=torch.zeros(b, 2, 3, 16, 16, dtype=torch.uint8),
                       masks=torch.zeros(b, 2, 1, 16, 16, dtype=torch.uint8),
                       patches=torch.full((b, 3, 8, 8), value, dtype=torch.uint8),
                       index=np.arange(b) + value, labels=torch.zeros(b, dtype=torch.int64),
                       has_bg=np.array(has_bg), epoch=0, window=np.zeros((b, 2, 4), np.float32),
                       flip=np.zeros((b, 2), bool), box_index=np.full(b, -1))


def test_ring_buffer_serves_partners_when_a_batch_has_no_background():
    cfg = LoaderConfig(batch_size=4, image_size=16, bg_mixup=1.0, color="none", normalize=False, dtype=torch.uint8,
                       ring_size=3)
    stage = DeviceStage(cfg)

    first = stage(_flat_batch([False] * 4, 10))  # nothing anywhere: views stay unmixed
    assert (first.params.partner == -1).all() and first.views.max() == 0
    stage(_flat_batch([True, False, True, True], 50))  # fills the ring with three patches of 50
    third = stage(_flat_batch([False] * 4, 90))
    assert (third.params.partner >= 4).all()  # partners from the ring, after the batch's own
    assert torch.all(third.views == 50)  # mask 0 everywhere: every pixel is the ring patch


def test_a_batch_enters_the_ring_after_its_partners_are_cut():
    """The one sample with a background has no partner in its batch: it takes the ring's patch of
    an earlier batch, never its own (with one slot, its own would have overwritten it)."""
    cfg = LoaderConfig(batch_size=4, image_size=16, bg_mixup=1.0, color="none", normalize=False, dtype=torch.uint8,
                       ring_size=1)
    stage = DeviceStage(cfg)

    stage(_flat_batch([True, True, True, True], 50))
    second = stage(_flat_batch([True, False, False, False], 120))
    assert (second.params.partner[0] == 4).all()  # the ring's only slot, after the batch's own
    assert torch.all(second.views[0] == 50)
    assert torch.all(second.views[1:] == 120)  # the others' partner is sample 0


def test_epoch_order_shards_are_disjoint_and_complete():
    for n, world in ((17, 2), (16, 4), (5, 3)):
        parts = [epoch_order(n, seed=1, epoch=2, shuffle=True, rank=r, world_size=world) for r in range(world)]
        assert len({len(p) for p in parts}) == 1
        assert set(np.concatenate(parts).tolist()) == set(range(n))
        if n % world == 0:
            assert len(np.concatenate(parts)) == n


@pytest.mark.parametrize("largest", [90, 300])  # 300 px into 20 px views: antialiased downscaling
def test_numba_geometry_equals_the_reference(largest):
    rng = np.random.default_rng(largest)
    tables = table_arrays(20, 3, largest, 8)
    for _ in range(20):
        h, w = int(rng.integers(10, largest)), int(rng.integers(10, largest))
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        mask = rng.integers(0, 256, (12, 12), dtype=np.uint8)
        p = sample_params(int(rng.integers(0, 100)), 0, [int(rng.integers(0, 1000))], image_sizes=[[h, w]])
        views = np.zeros((2, 3, 20, 20), np.uint8)
        masks = np.zeros((2, 1, 20, 20), np.uint8)
        crop_views_into(image, mask[:, :, None].copy(), p.window[0], p.flip[0], views, masks, np.ones(2, bool),
                        *tables)
        ref_v, ref_m = crop_views(image, mask, p.window[0], p.flip[0], 20)
        assert (torch.from_numpy(views).int() - ref_v.int()).abs().max() <= 1
        assert (torch.from_numpy(masks).int() - ref_m.int()).abs().max() <= 1
        rect = np.sort(rng.uniform(0, 1, (2, 2)), axis=0).T.reshape(-1)[[0, 2, 1, 3]].astype(np.float32)
        patch = np.zeros((3, 8, 8), np.uint8)
        cut_patch_into(image, rect, patch, *tables)
        assert (torch.from_numpy(patch).int() - cut_bg_patch(image, rect, 8).int()).abs().max() <= 1
    with pytest.raises(ValueError, match="table_arrays"):  # scratch for smaller outputs: refused, not overrun
        cut_patch_into(image, rect, np.zeros((3, 24, 24), np.uint8), *tables)
    with pytest.raises(ValueError, match="table_arrays"):  # an image taller than the tables: refused
        cut_patch_into(np.zeros((largest + 50, 20, 3), np.uint8), np.array([0, 0, 1, 1], np.float32),
                       np.zeros((3, 8, 8), np.uint8), *tables)


def test_bad_arguments_are_refused(crafted):
    with pytest.raises(ValueError, match="engine"):
        make_loader(crafted, "tf", batch_size=2, image_size=32)
    with pytest.raises(ValueError, match="bg_mixup"):
        make_loader(crafted, "torch", batch_size=2, image_size=32, bg_mixup=1.5)
    with pytest.raises(ValueError, match="normalised"):
        make_loader(crafted, "torch", batch_size=2, image_size=32, dtype=torch.uint8)
    with pytest.raises(ValueError, match="crop_scale"):
        make_loader(crafted, "torch", batch_size=2, image_size=32, crop_scale=(0.5, 0.2))
    with pytest.raises(Exception, match="manifest"):
        make_loader(crafted + "_missing", "torch", batch_size=2, image_size=32)


def test_device_stage_matches_reference_on_engine_output(crafted):
    """The loader's normalised output is the reference device stage applied to its raw views."""
    kw = dict(batch_size=8, image_size=32, oa_crop=True, shuffle=False, num_workers=1, seed=9)
    raw = next(iter(_raw_loader(crafted, "torch", oa_crop=True, seed=9)))
    full = next(iter(make_loader(crafted, "torch", **kw)))
    expect = apply_device_ops(raw.views, None, None, full.params)
    assert torch.allclose(full.views, expect, atol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_rank_shards_keep_partial_batches_and_every_option(crafted, engine):
    """world_size 2, drop_last False: each rank's batches (the last one partial) are disjoint and
    together cover every record; BYOL colour in float16 comes out normalised."""
    seen = []
    for rank in range(2):
        loader = make_loader(crafted, engine, batch_size=3, image_size=16, color="byol", dtype=torch.float16,
                             drop_last=False, rank=rank, world_size=2, num_workers=1, bg_mixup=0.4,
                             bg_mode="hard", oa_crop=True, seed=4)
        batches = list(loader)
        assert len(loader) == len(batches) == 3 and [len(b.index) for b in batches] == [3, 3, 2]
        assert all(b.views.dtype == torch.float16 and b.views.shape[1:] == (2, 3, 16, 16) for b in batches)
        lo, hi = (0 - 0.485) / 0.229 - 0.01, (1 - 0.406) / 0.225 + 0.01  # normalised [0, 1] range
        assert all(b.views.min() >= lo and b.views.max() <= hi for b in batches)
        seen.append(torch.cat([b.index for b in batches]).tolist())
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(N_RECORDS))


def test_default_workers_divide_the_cpus_among_local_processes(monkeypatch):
    from objloader.loaders import default_workers

    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == cpus
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers() == max(1, cpus // 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(4 * cpus))
    assert default_workers() == 1


def test_mix_flags_are_the_device_stages_mix_draws():
    from objloader.augment.params import mix_flags, sample_appearance

    idx = np.arange(50, 90)
    app = sample_appearance(7, 3, idx, np.ones(len(idx), bool), views=2, p_mix=0.4, color="mocov2")
    assert np.array_equal(mix_flags(7, 3, idx, views=2, p_mix=0.4), app["mix"])
    assert not mix_flags(7, 3, idx, views=2, p_mix=0.0).any()


def test_the_view_mask_rule_is_the_device_stages_mix_draws():
    """One rule says which view masks an engine resamples (loaders/config.py): the views the
    device stage mixes, or all of them with return_masks; its per-view form (the FFCV decoder's)
    and its batch form (the torch and DALI engines') agree."""
    from objloader.augment.params import sample_appearance
    from objloader.loaders.config import resamples_view_mask, view_masks_resampled

    idx = np.arange(50, 90)
    cfg = LoaderConfig(batch_size=8, image_size=32, views=3, bg_mixup=0.4, seed=7)
    app = sample_appearance(7, 3, idx, np.ones(len(idx), bool), views=3, p_mix=0.4, color="mocov2")
    rule = view_masks_resampled(cfg, 3, idx)
    assert np.array_equal(rule, app["mix"]) and rule.any() and not rule.all()
    per_view = [[resamples_view_mask(False, 7, 3, int(i), v, 0.4) for v in range(3)] for i in idx]
    assert np.array_equal(np.array(per_view), rule)
    assert view_masks_resampled(dataclasses.replace(cfg, return_masks=True), 3, idx).all()
    assert not view_masks_resampled(dataclasses.replace(cfg, bg_mixup=0.0), 3, idx).any()


@pytest.mark.parametrize("engine", ENGINES)
def test_masks_resampled_only_for_mixed_views_change_nothing(crafted, engine):
    """The engine stage resamples exactly the masks the rule names (the others are zero, the
    named ones as when every mask is resampled), and the mixed, coloured, normalised views are
    the same as when every mask is resampled."""
    from objloader.loaders.config import view_masks_resampled

    args = dict(batch_size=8, image_size=32, num_workers=1, seed=5, shuffle=False, oa_crop=True, bg_mixup=0.4)
    loader = make_loader(crafted, engine, **args)
    loader.engine.set_epoch(0)
    lean, lean_masks = [], []
    for eb in loader.engine:  # what ObjectAwareLoader does, keeping the engine stage's masks
        lean_masks.append((view_masks_resampled(loader.cfg, 0, eb.index), eb.masks.cpu().clone()))
        lean.append(loader.device_stage(eb))
    full = _epoch(make_loader(crafted, engine, return_masks=True, **args))
    assert any(b.params.mix.any() and not b.params.mix.all() for b in lean)  # some views mixed, some not
    for a, b, (rule, masks) in zip(lean, full, lean_masks):
        assert torch.equal(a.views, b.views)
        assert np.array_equal(rule, a.params.mix)
        if engine != "dali" or loader.cfg.device == "cpu":  # DALI on the GPU resamples every mask
            assert not masks[torch.from_numpy(~rule)].any()
        assert torch.equal(masks[torch.from_numpy(rule)], b.masks.cpu()[torch.from_numpy(rule)])
    assert any(masks.any() for _, masks in lean_masks)
