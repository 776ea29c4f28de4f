"""objloader-demo: layout, determinism, exact masks, Background Challenge variants, COCO json."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from objloader.cli import demo as demo_cli
from objloader.sources import demo

RES = 48
TINY = dict(per_class_train=2, per_class_val=2, n_multi=4, resolution=RES)
K3 = np.ones((3, 3), np.uint8)

# JPEG (quality 95) tolerances, in grey levels: mean absolute difference over a region / the
# level under which a region counts as black.
MEAN_TOL = 8.0
BLACK_TOL = 6.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    demo.generate_demo(out, seed=0, workers=1, **TINY)
    return out


@pytest.fixture(scope="module")
def marker(tiny) -> dict:
    return json.loads((tiny / "demo.json").read_text())


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _img(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert img is not None, path
    return img.astype(np.float32)


def _mask(path: Path) -> np.ndarray:
    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert m is not None, path
    return m


def _mad(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    assert where.any()
    return float(np.abs(a - b)[where].mean())


def _decode_rle(rle: dict) -> np.ndarray:
    """Independent reference decoder for COCO uncompressed RLE (column-major, zeros first)."""
    h, w = rle["size"]
    flat = np.zeros(h * w, bool)
    pos = 0
    for i, c in enumerate(rle["counts"]):
        if i % 2:
            flat[pos:pos + c] = True
        pos += c
    assert pos == h * w
    return flat.reshape((h, w), order="F")


# --------------------------------------------------------------------------------------------


def test_marker_and_layout(tiny, marker):
    assert marker["kind"] == "objloader-demo" and marker["version"] == 2
    assert marker["seed"] == 0 and marker["resolution"] == RES
    classes = marker["classes"]
    assert len(classes) == 9 and classes == sorted(classes)
    assert marker["counts"]["train"] == 18 and marker["counts"]["val"] == 18
    assert marker["counts"]["bgchallenge"] == 18 and marker["counts"]["multi"] == 4
    assert marker["bgchallenge_variants"] == [
        "original", "only_bg_b", "only_bg_t", "no_fg", "only_fg", "mixed_same", "mixed_rand", "mixed_next"]
    for split in ("train", "val"):
        assert sorted(p.name for p in (tiny / split).iterdir()) == classes  # ImageFolder classes
        jpgs = sorted((tiny / split).glob("*/*.jpg"))
        assert len(jpgs) == 18
        assert {r["file"] for r in marker["images"][split]} == {p.relative_to(tiny).as_posix() for p in jpgs}
    assert not list(tiny.parent.glob("out.tmp-*"))  # atomic: nothing left beside OUT
    every = [p.read_bytes() for s in ("train", "val") for p in (tiny / s).glob("*/*.jpg")]
    assert len(set(every)) == len(every) == 36  # every image drawn afresh


def test_masks_exact_binary_beside_images(tiny, marker):
    for split in ("train", "val"):
        for rec in marker["images"][split]:
            img = cv2.imread(str(tiny / rec["file"]), cv2.IMREAD_UNCHANGED)
            mask = _mask(tiny / rec["mask"])
            assert rec["mask"] == rec["file"][:-4] + ".mask.png"
            assert img.shape == (RES, RES, 3) and mask.shape == (RES, RES) and mask.dtype == np.uint8
            assert set(np.unique(mask).tolist()) == {0, 255}
            # Objects cover roughly 30-70% of the image (elongated ones may shrink to fit).
            assert 0.08 <= (mask > 0).mean() <= 0.75
            ys, xs = np.nonzero(mask)
            assert rec["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert rec["area"] == int((mask > 0).sum())
            assert rec["label"] == marker["classes"].index(rec["file"].split("/")[1])


def test_deterministic_and_independent_of_workers(tiny, tmp_path):
    again = tmp_path / "again"
    demo.generate_demo(again, seed=0, workers=2, **TINY)
    assert _files(again) == _files(tiny)

    other = tmp_path / "other"
    demo.generate_demo(other, seed=1, workers=1, **TINY)
    a, b = _files(tiny), _files(other)
    assert a.keys() == b.keys()
    jpgs = [k for k in a if k.endswith(".jpg")]
    assert sum(a[k] != b[k] for k in jpgs) > 0.9 * len(jpgs)


def test_refuses_non_empty_output_unless_overwrite(tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(demo.DemoError, match="not empty"):
        demo.generate_demo(out, per_class_train=1, per_class_val=1, n_multi=1, resolution=32, workers=1)
    assert (out / "keep.txt").exists()
    demo.generate_demo(out, per_class_train=1, per_class_val=1, n_multi=1, resolution=32, workers=1, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "demo.json").exists()
    assert not list(tmp_path.glob("busy.tmp-*"))
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty directory is fine
    demo.generate_demo(empty, per_class_train=1, per_class_val=0, n_multi=0, resolution=32, workers=1)
    assert (empty / "demo.json").exists()


@pytest.mark.parametrize("bad", [dict(bg_bias=1.5), dict(variation=-1), dict(object_area=(0.5, 0.2)),
                                 dict(object_area=(0.0, 0.5)), dict(object_area=(0.2,)), dict(bg_scenes=-1)])
def test_rejects_bad_generator_options(tmp_path, bad):
    with pytest.raises(demo.DemoError):
        demo.generate_demo(tmp_path / "x", per_class_train=1, per_class_val=0, n_multi=0, resolution=32,
                           workers=1, **bad)


def test_bg_scenes_reuse_a_few_fixed_backgrounds_per_pool():
    def backgrounds(scenes):
        out = []
        for k in range(12):
            img, mask, _, pool, _ = demo._single(0, "train", 4, k, 32, demo.Style(1.0, 0.0, (0.1, 0.1), scenes))
            out.append((img, mask))
        return out

    def shared(pairs, i, j):  # the two backgrounds agree wherever neither object covers them
        (a, ma), (b, mb) = pairs[i], pairs[j]
        free = ~(ma | mb)
        return np.array_equal(a[free], b[free])

    fixed = backgrounds(2)
    assert all(any(shared(fixed, i, j) for j in range(12) if j != i) for i in range(12))
    fresh = backgrounds(0)
    assert not any(shared(fresh, i, j) for i in range(12) for j in range(i))


def test_object_area_sets_the_object_size():
    def mean_area(area):
        return np.mean([demo._single(0, "train", c, k, 64, demo.Style(0.5, 1.0, area))[1].mean()
                        for c in range(9) for k in range(6)])

    small, large = mean_area((0.1, 0.2)), mean_area((0.4, 0.6))
    assert 0.08 < small < 0.22 and 0.3 < large < 0.62  # elongated shapes shrink to fit the frame


def test_background_pools_disjoint_and_biased(marker):
    pools = marker["background_pools"]
    classes = marker["classes"]
    assert list(pools) == classes
    declared = [set(pools[c]) for c in classes]
    for i in range(9):
        for j in range(i + 1, 9):
            assert not declared[i] & declared[j]
    for split in ("train", "val"):
        for rec in marker["images"][split]:
            assert rec["bg_source"] in pools[classes[rec["bg_pool"]]]  # provenance is true


@pytest.mark.parametrize("bias", [0.0, 0.5, 1.0])
def test_bg_bias_is_how_often_the_background_is_the_class_own(bias):
    labels = np.repeat(np.arange(9), 200)
    pools = np.array([demo._single(0, "train", int(c), k, 24, demo.Style(bias, 0.0))[3]
                      for c, k in zip(labels, np.tile(np.arange(200), 9))])
    share = float((pools == labels).mean())
    assert abs(share - bias) < 0.05, share
    if bias < 1:  # the other pools are drawn uniformly among the other classes
        counts = np.bincount((pools - labels)[pools != labels] % 9, minlength=9)[1:]
        assert counts.min() > 0.5 * counts.mean()


def test_variation_gives_each_instance_its_own_shape():
    def masks(variation):
        out = []
        for k in range(2):  # same class, two instances, pose made identical by a shared rng state
            rng = np.random.default_rng(7)
            contours = demo._SHAPES["cross"][0](rng)
            if variation:
                contours = demo._deform(contours, np.random.default_rng(k), variation)
            out.append(demo._fill(contours, (64, 64), lambda p: p * 28 + 32))
        return out

    a, b = masks(0.0)
    assert np.array_equal(a, b)
    a, b = masks(1.0)
    assert (a != b).mean() > 0.01  # another instance, another outline
    assert abs(int(a.sum()) - int(masks(0.0)[0].sum())) < 0.25 * a.sum()  # still the class's shape


def _variant(tiny, variant, name, ident):
    return tiny / "bgchallenge" / variant / name / f"{ident}.jpg"


def test_bgchallenge_files_and_provenance(tiny, marker):
    classes, pools = marker["classes"], marker["background_pools"]
    val_ids = sorted(r["id"] for r in marker["images"]["val"])
    assert sorted(r["id"] for r in marker["images"]["bgchallenge"]) == val_ids
    for rec in marker["images"]["bgchallenge"]:
        c, name, ident = rec["label"], classes[rec["label"]], rec["id"]
        for v in marker["bgchallenge_variants"]:
            path = _variant(tiny, v, name, ident)
            assert path.exists()
            has_mask = path.with_suffix(".mask.png").exists()
            assert has_mask == (v in ("original", "only_fg", "mixed_same", "mixed_rand", "mixed_next"))
            if has_mask:
                assert path.with_suffix(".mask.png").read_bytes() == (tiny / "val" / name / f"{ident}.mask.png").read_bytes()
        # original IS the val image.
        assert _variant(tiny, "original", name, ident).read_bytes() == (tiny / "val" / name / f"{ident}.jpg").read_bytes()
        p = rec["bg_pool"]
        assert p["mixed_same"] == c
        assert p["mixed_rand"] != c and 0 <= p["mixed_rand"] < 9
        assert p["mixed_next"] == (c + 1) % 9
        assert p["only_fg"] is None
        for v in ("mixed_same", "mixed_rand", "mixed_next"):
            assert rec["bg_source"][v] in pools[classes[p[v]]]


def test_bgchallenge_variants_match_definitions(tiny, marker):
    classes = marker["classes"]
    checked_inside = 0
    for rec in marker["images"]["bgchallenge"]:
        name, ident = classes[rec["label"]], rec["id"]
        orig = _img(_variant(tiny, "original", name, ident))
        m = _mask(tiny / "val" / name / f"{ident}.mask.png") > 0
        inner = cv2.erode(m.astype(np.uint8), K3, iterations=1).astype(bool)
        outer = ~cv2.dilate(m.astype(np.uint8), K3, iterations=2).astype(bool)
        x, y, w, h = rec["bbox"]
        box = np.zeros_like(m)
        box[y:y + h, x:x + w] = True
        box_in = np.zeros_like(m)
        box_in[y + 1:y + h - 1, x + 1:x + w - 1] = True
        box_out = ~cv2.dilate(box.astype(np.uint8), K3, iterations=2).astype(bool)
        v = {k: _img(_variant(tiny, k, name, ident)) for k in marker["bgchallenge_variants"]}

        # only_fg: the object on black.
        assert v["only_fg"][outer].mean() < BLACK_TOL
        # no_fg: the object's pixels blacked out, the rest kept.
        assert _mad(v["no_fg"], orig, outer[:, :, None].repeat(3, 2)) < MEAN_TOL
        # only_bg_b: the object's box blacked out, the rest kept.
        assert v["only_bg_b"][box_in].mean() < BLACK_TOL
        if box_out.any():
            assert _mad(v["only_bg_b"], orig, box_out[:, :, None].repeat(3, 2)) < MEAN_TOL
            assert _mad(v["only_bg_t"], orig, box_out[:, :, None].repeat(3, 2)) < MEAN_TOL
        # only_bg_t: the box tiled with the largest object-free strip of the same image.
        sx, sy, sw, sh = rec["tile_strip"]
        assert sw * sh > 0 and not (m[sy:sy + sh, sx:sx + sw]).any()
        strip = orig[sy:sy + sh, sx:sx + sw]
        tiled = np.tile(strip, (-(-h // sh), -(-w // sw), 1))[:h, :w]
        assert float(np.abs(v["only_bg_t"][y:y + h, x:x + w] - tiled).mean()) < MEAN_TOL
        assert not m[y:y + h, x:x + w].all()  # sanity: the box is not all object

        if inner.sum() >= 10:  # thin shapes at 48 px may erode to nothing
            checked_inside += 1
            inner3 = inner[:, :, None].repeat(3, 2)
            assert v["no_fg"][inner].mean() < BLACK_TOL
            for k in ("only_fg", "mixed_same", "mixed_rand", "mixed_next"):
                assert _mad(v[k], orig, inner3) < MEAN_TOL, k  # same foreground pixels
        # The mixed backgrounds are new pictures, not the original background.
        for k in ("mixed_rand", "mixed_next"):
            assert _mad(v[k], orig, outer[:, :, None].repeat(3, 2)) > 3.0, k
    assert checked_inside >= len(marker["images"]["bgchallenge"]) // 2


def test_multi_coco_instances(tiny, marker):
    coco = json.loads((tiny / "multi" / "instances.json").read_text())
    assert [c["id"] for c in coco["categories"]] == list(range(1, 10))
    assert [c["name"] for c in coco["categories"]] == marker["classes"]
    assert len(coco["images"]) == 4
    image_ids = {im["id"] for im in coco["images"]}
    assert len(image_ids) == 4
    for im in coco["images"]:
        img = cv2.imread(str(tiny / "multi" / "images" / im["file_name"]), cv2.IMREAD_COLOR)
        assert img is not None and img.shape == (im["height"], im["width"], 3) == (RES, RES, 3)
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)
    per_image = {}
    for a in coco["annotations"]:
        assert a["image_id"] in image_ids and 1 <= a["category_id"] <= 9 and a["iscrowd"] == 0
        seg = a["segmentation"]
        assert seg["size"] == [RES, RES] and sum(seg["counts"]) == RES * RES
        m = _decode_rle(seg)
        assert m.any()
        ys, xs = np.nonzero(m)
        assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert a["area"] == int(m.sum())
        per_image.setdefault(a["image_id"], []).append(m)
    for masks in per_image.values():
        assert 2 <= len(masks) <= 4
        total = np.sum(masks, axis=0)
        assert total.max() == 1  # visible masks after occlusion never overlap


def test_rle_roundtrip():
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (1, 1), (16, 3)]:
        for first in (False, True):
            m = rng.random(shape) < 0.4
            m.flat[0] = first
            rle = demo.rle_encode(m)
            assert rle["size"] == list(shape)
            assert (first and rle["counts"][0] == 0) or (not first and rle["counts"][0] > 0)
            assert np.array_equal(_decode_rle(rle), m)
            assert np.array_equal(demo.rle_decode(rle), m)


def test_cli(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = [str(out), "--per-class-train", "1", "--per-class-val", "1", "--multi", "1",
            "--resolution", "32", "--workers", "1", "--seed", "3", "--no-progress"]
    assert demo_cli.main(argv) == 0
    assert "bgchallenge" in capsys.readouterr().out
    meta = json.loads((out / "demo.json").read_text())
    assert meta["seed"] == 3 and meta["resolution"] == 32
    assert demo_cli.main(argv) == 2  # exists and not empty
    assert "not empty" in capsys.readouterr().err
    assert demo_cli.main(argv + ["--overwrite"]) == 0
