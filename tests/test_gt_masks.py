"""Ground-truth masks from a parallel mask tree: objloader-build SRC OUT --gt-masks DIR pairs the
image SRC/a/b/x.jpg with the mask DIR/a/b/x.png (or .bmp/.jpg/.jpeg), for CUB-200-2011's
images/ + segmentations/ and DUTS-style images/ + masks/ (flat or nested). A missing, doubled,
unreadable or mis-sized mask is a counted skip with its reason; wrong use is a one-line error."""

import json
import os

import cv2
import numpy as np
import pytest

from objloader.cli import build as build_cli
from objloader.sources import open_source
from objloader.sources.resolve import source_fingerprint
from objloader.store.reader import open_dataset

M = 32  # --mask-res


def _image(path, h, w, seed):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)
    assert cv2.imwrite(path, img)


def _rect(h, w, y0, y1, x0, x1, value=255):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = value
    return m


def _mask(path, m, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    assert cv2.imwrite(path, m, *kw.values())


def _build(src, out, masks_dir, *extra):
    return build_cli.main([src, out, "--gt-masks", masks_dir, "--masks", "gt", "--formats", "wds", "--workers", "1",
                           "--mask-res", str(M), "--box-margin", "0", *extra])


def _records(out):
    ds = open_dataset(out)
    return {ds[i]["key"]: ds[i] for i in range(len(ds))}


def _manifest(out):
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


def _check_record(r, given, box):
    """The record's gt mask (and --masks gt mask) is the given mask (object where > 0) at M x M;
    its one box is the object's rectangle in unit coordinates."""
    expected = cv2.resize(np.where(given > 0, 255, 0).astype(np.uint8), (M, M), interpolation=cv2.INTER_AREA)
    for field in ("gt_mask", "mask"):
        got = np.asarray(r[field])
        assert got.shape == (M, M)
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, (r["key"], field)
    h, w = given.shape
    y0, y1, x0, x1 = box
    unit = np.array([x0 / w, y0 / h, x1 / w, y1 / h], np.float32)
    for boxes, n in ((r["boxes"], r["n_boxes"]), (r["gt_boxes"], 1)):
        assert int(n) == 1
        np.testing.assert_allclose(np.asarray(boxes)[0], unit, atol=1.01 / min(h, w))


# ---- CUB-200-2011: images/<class>/<stem>.jpg + segmentations/<class>/<stem>.png ----------------


@pytest.fixture(scope="module")
def cub(tmp_path_factory):
    root = tmp_path_factory.mktemp("CUB_200_2011")
    images, segs = str(root / "images"), str(root / "segmentations")
    given = {}
    for c, cls in enumerate(("001.Black_footed_Albatross", "002.Laysan_Albatross")):
        for i in range(3):
            h, w = 40 + 4 * i, 48 - 2 * c
            stem = f"{cls.split('.')[1]}_{i:04d}_{c}"
            _image(os.path.join(images, cls, stem + ".jpg"), h, w, seed=10 * c + i)
            box = (4 + i, 30 + i, 8 + c, 36)
            # CUB's segmentations are soft: the annotators' uncertain border is grey. > 0 is object.
            m = _rect(h, w, box[0] - 2, box[1] + 2, box[2] - 2, box[3] + 2, value=51)
            m[box[0]:box[1], box[2]:box[3]] = 255
            key = f"{cls}/{stem}.jpg"
            if key.startswith("002") and i == 1:
                continue  # no mask for this image
            if key.startswith("002") and i == 2:
                m = m[:, :-3]  # a mask of another size
            _mask(os.path.join(segs, cls, stem + ".png"), m)
            given[key] = (m, (box[0] - 2, box[1] + 2, box[2] - 2, box[3] + 2), c)
    return images, segs, given


def test_cub_layout(cub, tmp_path):
    images, segs, given = cub
    out = str(tmp_path / "out")
    assert _build(images, out, segs) == 0
    man = _manifest(out)
    assert man["counts"]["inputs"] == 6 and man["counts"]["records"] == 4 and man["counts"]["skipped"] == 2
    assert man["has_gt"] is True and man["masks"] == "gt"
    assert man["classes"] == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    skipped = {s["key"]: s["reason"] for s in man["skipped"]}
    missing, missized = "002.Laysan_Albatross/Laysan_Albatross_0001_1.jpg", "002.Laysan_Albatross/Laysan_Albatross_0002_1.jpg"
    assert set(skipped) == {missing, missized}
    assert "no ground-truth mask" in skipped[missing]
    assert os.path.join(segs, "002.Laysan_Albatross", "Laysan_Albatross_0001_1.png") in skipped[missing]
    assert "43x48" in skipped[missized] and "46x48" in skipped[missized]  # mask WxH vs image WxH
    recs = _records(out)
    assert set(recs) == set(given) - {missized}
    for key, r in recs.items():
        m, box, label = given[key]
        assert int(r["label"]) == label
        _check_record(r, m, box)


# ---- DUTS-style: images/ + masks/, flat or nested ------------------------------------------------


@pytest.mark.parametrize("sub", ["", "batch_a"], ids=["flat", "nested"])
def test_duts_layout(tmp_path, sub):
    images, masks = str(tmp_path / "DUTS-TE" / "images"), str(tmp_path / "DUTS-TE" / "masks")
    h, w = 48, 48
    box = (10, 30, 12, 40)
    rect = _rect(h, w, *box)
    for i, stem in enumerate(("ILSVRC2012_test_00000003", "ILSVRC2012_test_00000025", "sun_abc",
                              "sun_jpeg_mask", "sun_missing", "sun_small", "sun_two", "sun_upper")):
        _image(os.path.join(images, sub, stem + ".jpg"), h, w, seed=i)
    _mask(os.path.join(masks, sub, "ILSVRC2012_test_00000003.png"), rect)
    _mask(os.path.join(masks, sub, "ILSVRC2012_test_00000025.png"), rect)
    _mask(os.path.join(masks, sub, "sun_abc.bmp"), rect)
    _mask(os.path.join(masks, sub, "sun_upper.PNG"), rect)
    # A JPEG mask: compression leaves small non-zero values around the edges; >= 128 is object.
    _mask(os.path.join(masks, sub, "sun_jpeg_mask.jpg"), rect, q=[cv2.IMWRITE_JPEG_QUALITY, 75])
    assert ((cv2.imread(os.path.join(masks, sub, "sun_jpeg_mask.jpg"), 0) > 0) != (rect > 0)).sum() > 20
    _mask(os.path.join(masks, sub, "sun_small.png"), rect[:40, :40])
    _mask(os.path.join(masks, sub, "sun_two.png"), rect)
    _mask(os.path.join(masks, sub, "sun_two.jpg"), rect)
    _mask(os.path.join(masks, sub, "orphan_without_image.png"), rect)  # ignored

    out = str(tmp_path / "out")
    assert _build(images, out, masks, "--mask-res", str(h)) == 0  # masks at the images' own size
    man = _manifest(out)
    prefix = f"{sub}/" if sub else ""
    skipped = {s["key"]: s["reason"] for s in man["skipped"]}
    assert set(skipped) == {prefix + "sun_missing.jpg", prefix + "sun_small.jpg", prefix + "sun_two.jpg"}
    assert os.path.join(masks, sub, "sun_missing") + ".png (or .bmp, .jpg, .jpeg)" in skipped[prefix + "sun_missing.jpg"]
    assert "40x40" in skipped[prefix + "sun_small.jpg"] and "48x48" in skipped[prefix + "sun_small.jpg"]
    assert "2 ground-truth masks match" in skipped[prefix + "sun_two.jpg"]
    assert man["counts"]["records"] == 5 and man["counts"]["skipped"] == 3
    recs = _records(out)
    for key, r in recs.items():
        assert int(r["label"]) == (0 if sub else -1)  # flat: unlabelled; nested: its folder is a class
        # At the images' own size the stored mask is the given one, pixel for pixel.
        wrong = int((np.asarray(r["gt_mask"]) != rect).sum())
        assert wrong <= 2, (key, wrong)
        np.testing.assert_allclose(np.asarray(r["boxes"])[0], [12 / w, 10 / h, 40 / w, 30 / h], atol=1.01 / w)


# ---- plumbing, fingerprint, refusals -------------------------------------------------------------


def test_mask_tree_is_read_only_when_given(cub):
    images, segs, _ = cub
    (spec,) = open_source(images, gt_masks=segs)
    assert spec.gt_mask_root == os.path.abspath(segs)
    with_masks = [s for s in spec.samples if s.gt_mask_path]
    assert len(with_masks) == 5 and all(s.gt_mask_path.startswith(segs) for s in with_masks)
    (plain,) = open_source(images)
    assert plain.gt_mask_root is None and not any(s.has_gt_mask for s in plain.samples)


def test_fingerprint_follows_the_masks(tmp_path):
    images, masks = str(tmp_path / "images"), str(tmp_path / "masks")
    _image(os.path.join(images, "a.jpg"), 20, 20, seed=0)
    _mask(os.path.join(masks, "a.png"), _rect(20, 20, 2, 10, 2, 10))
    before = source_fingerprint(open_source(images, gt_masks=masks))
    assert before != source_fingerprint(open_source(images))
    # An edited mask must not let an interrupted build resume with records of the old one.
    _mask(os.path.join(masks, "a.png"), _rect(20, 20, 2, 18, 2, 18) | np.uint8(7))
    assert source_fingerprint(open_source(images, gt_masks=masks)) != before


def _error(capsys, argv):
    rc = build_cli.main(argv)
    err = capsys.readouterr().err.strip()
    return rc, err


def test_refusals_are_one_line_errors(cub, tmp_path, capsys):
    images, segs, _ = cub
    out = str(tmp_path / "out")
    cases = [
        ([images, out, "--gt-masks", segs, "--masks", "none"], "needs --masks gt, not --masks none"),
        ([images, out, "--gt-masks", segs, "--masks", "contracam", "--cam-masks", str(tmp_path)],
         "needs --masks gt, not --masks contracam"),
        ([images, out, "--gt-masks", str(tmp_path / "no_such_dir")], "no_such_dir' is not a directory"),
        ([os.path.dirname(images), out, "--gt-masks", segs], "lies inside the image folder"),
        ([images, out, "--gt-masks", str(tmp_path)], "holds no mask for any of the 6 images"),
    ]
    coco = tmp_path / "instances.json"
    coco.write_text(json.dumps({"images": [], "annotations": []}))
    cases.append(([str(coco), out, "--gt-masks", segs], "is a COCO json"))
    for argv, message in cases:
        rc, err = _error(capsys, argv)
        assert rc == 2, argv
        assert err.startswith("objloader-build: error: ") and "\n" not in err, err
        assert message in err, (message, err)
        assert not os.path.exists(out)


def test_help_states_the_rule():
    text = " ".join(build_cli.parser().format_help().split())
    assert "the mask of SRC/a/b/x.jpg is DIR/a/b/x.png" in text
    assert "skipped with its reason in the manifest" in text
