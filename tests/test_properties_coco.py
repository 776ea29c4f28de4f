"""COCO sources against their input invariants (DESIGN.md, "COCO: identifiers, paths, boxes"):
masks rasterised as pycocotools draws them, identifiers that must be unique, file names that lead
outside the images folder, boxes cut to --max-boxes (largest kept, the rest counted), and random
COCO files built from the outside."""
import builtins
import contextlib
import json
import os
import posixpath
import tempfile

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from objloader.cli.build import main as build_main
from objloader.sources import SourceError, read_coco, rle_to_mask, segments_to_mask
from objloader.store import BuildError, BuildOptions, build, open_dataset

mask_util = pytest.importorskip("pycocotools.mask")

S = 16  # side of the square test images; with --mask-res S the stored masks are the image's pixels


def _quiet(*_):
    pass


def _build(src, out, max_boxes=8, allow_outside=False, log=_quiet):
    extra = {"coco_allow_outside": True} if allow_outside else {}
    return build(str(src), str(out), BuildOptions(masks="gt", max_res=64, mask_res=S, max_boxes=max_boxes),
                 formats=("wds",), workers=1, on_error="skip", log=log, **extra)


def _records(out) -> dict:
    ds = open_dataset(str(out))
    return {ds[i]["key"]: ds[i] for i in range(len(ds))}


def _png(path, h=S, w=S):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 128, np.uint8))


def _write_json(path, images, annotations, categories=None):
    data = {"images": images, "annotations": annotations}
    if categories is not None:
        data["categories"] = categories
    path.write_text(json.dumps(data))
    return path


def _image(ident, name, h=S, w=S):
    return {"id": ident, "file_name": name, "height": h, "width": w}


def _coco_mask(seg, h, w) -> np.ndarray:
    """pycocotools' annToMask of one segmentation: polygons merged, RLE (either form) decoded."""
    if isinstance(seg, list):
        rle = mask_util.merge(mask_util.frPyObjects(seg, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_util.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_util.decode(rle).astype(bool)


def _uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE of a bool mask: column-major runs, starting with zeros."""
    flat = mask.T.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return {"size": list(mask.shape), "counts": runs if flat[0] == 0 else [0] + runs}


def _mask(seg, h, w) -> np.ndarray:
    """objloader's mask of one segmentation (sources/coco.py), as bool."""
    return segments_to_mask([seg], h, w) == 255


def _compressed(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


# ---------------------------------------------------------------------------------------------
# 4: the rasteriser equals pycocotools'


def test_square_polygon_covers_its_area():
    """A 32x32 square covers 1024 pixels, as in pycocotools (a fill including the far edges: 1089)."""
    poly = [10, 10, 42, 10, 42, 42, 10, 42]
    m = _mask([poly], 64, 64)
    assert m.sum() == 1024 and m[10:42, 10:42].all()
    np.testing.assert_array_equal(m, _coco_mask([poly], 64, 64))


coordinate = st.floats(-6.0, 30.0, allow_nan=False).map(lambda v: round(v, 2))
polygon = st.lists(st.tuples(coordinate, coordinate), min_size=3, max_size=8).map(
    lambda pts: [c for p in pts for c in p])


@settings(max_examples=150, deadline=None)
@given(polys=st.lists(polygon, min_size=1, max_size=3), h=st.integers(1, 24), w=st.integers(1, 24))
def test_polygons_rasterise_as_pycocotools(polys, h, w):
    """Exact agreement, pixel for pixel (tolerance 0): polygon_to_mask follows pycocotools'
    scanline rule, and both round the same float64 arithmetic, so any difference is a bug.
    Polygons reach beyond the image on every side, self-intersect and degenerate."""
    ours, theirs = _mask(polys, h, w), _coco_mask(polys, h, w)
    assert ours.sum() == theirs.sum()
    np.testing.assert_array_equal(ours, theirs)


@settings(max_examples=60, deadline=None)
@given(h=st.integers(1, 20), w=st.integers(1, 20), seed=st.integers(0, 2 ** 31 - 1),
       density=st.floats(0.0, 1.0))
def test_rles_decode_as_pycocotools(h, w, seed, density):
    """Uncompressed and compressed (crowd) RLE decode to pycocotools' masks exactly."""
    m = np.random.default_rng(seed).random((h, w)) < density
    for rle in (_uncompressed(m), _compressed(m)):
        np.testing.assert_array_equal(rle_to_mask(rle), _coco_mask(rle, h, w))
        np.testing.assert_array_equal(_mask(rle, h, w), m)


# ---------------------------------------------------------------------------------------------
# 1: file names that lead outside the images folder


def test_file_names_outside_the_images_folder_are_not_read_unless_asked(tmp_path):
    _png(tmp_path / "images" / "a.png")
    _png(tmp_path / "secret.png")
    _png(tmp_path / "abs" / "x.png")
    absolute = str(tmp_path / "abs" / "x.png")
    src = _write_json(tmp_path / "inst.json", [_image(1, "a.png"), _image(2, "../secret.png"),
                                               _image(3, absolute), _image(4, "sub/../../secret.png")], [])
    with _opened_paths() as opened:
        m = _build(src, tmp_path / "out")
    assert not any(p.endswith(("secret.png", "x.png")) for p in opened), opened
    assert list(_records(tmp_path / "out")) == ["a.png"]
    assert sorted(s["key"] for s in m["skipped"]) == sorted(["../secret.png", absolute, "../secret.png"])
    for ident, name in ((2, "../secret.png"), (3, absolute), (4, "sub/../../secret.png")):
        (reason,) = [r for r in m["skipped"] if f"image id {ident} " in r["reason"]]
        assert name in reason["reason"] and "outside the images folder" in reason["reason"]
        assert "--coco-allow-outside" in reason["reason"]

    rc = build_main([str(src), str(tmp_path / "out2"), "--formats", "wds", "--workers", "1", "--max-res", "64",
                     "--coco-allow-outside"])
    assert rc == 0
    # ../secret.png is named twice (ids 2 and 4): the same file, so both are skipped as duplicates.
    recs = _records(tmp_path / "out2")
    assert sorted(recs) == sorted(["a.png", absolute])


@contextlib.contextmanager
def _opened_paths():
    """Every path opened through builtins.open or os.stat'ed meanwhile (the build runs in-process)."""
    seen, real_open, real_stat = [], builtins.open, os.stat

    def spy_open(file, *a, **k):
        seen.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else repr(file))
        return real_open(file, *a, **k)

    def spy_stat(path, *a, **k):
        seen.append(os.fspath(path) if isinstance(path, (str, os.PathLike)) else repr(path))
        return real_stat(path, *a, **k)

    builtins.open, os.stat = spy_open, spy_stat
    try:
        yield seen
    finally:
        builtins.open, os.stat = real_open, real_stat


# ---------------------------------------------------------------------------------------------
# 2: identifiers that must be unique


def _ann(ident, image_id, box=(1, 1, 4, 4)):
    x, y, w, h = box
    return {"id": ident, "image_id": image_id, "bbox": list(box),
            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]}


def test_one_file_under_two_image_ids_is_skipped_naming_both(tmp_path):
    """Before: two records with key 'train/a.png', each missing the other's objects."""
    for n in ("train/a.png", "b.png", "c.png", "d.png"):
        _png(tmp_path / "images" / n)
    images = [_image(12, "train/a.png"), _image(40, "train/./a.png"), _image(7, "b.png"),
              _image(8, "c.png"), _image(8, "b.png"), _image(9, "d.png")]
    src = _write_json(tmp_path / "inst.json", images,
                      [_ann(1, 12), _ann(2, 40), _ann(3, 8), _ann(4, 99), _ann(5, 9)])
    m = _build(src, tmp_path / "out")
    # b.png: its own id (7) is unique, but id 8 names it too; c.png shares id 8
    assert list(_records(tmp_path / "out")) == ["d.png"]
    a = [s["reason"] for s in m["skipped"] if s["key"] == "train/a.png"]
    assert len(a) == 2 and all("images 12 and 40 both name the file 'train/a.png'" in r for r in a), a
    assert m["counts"]["skipped"] == 5 + 2  # + annotations 3 (id 8 is shared) and 4 (no image 99)


def test_identifier_rules_name_every_party(tmp_path):
    for n in ("a.png", "b.png", "c.png", "d.png", "e.png", "f.png"):
        _png(tmp_path / "images" / n)
    images = [_image(12, "a.png"), _image(40, "./a.png"),         # one file, two ids
              _image(5, "b.png"), _image(5, "c.png"),             # one id, two files
              _image(6, "d.png"), _image(7, "e.png"),             # annotation id 30 in both
              _image(9, "f.png")]                                 # clean
    anns = [_ann(1, 12), _ann(2, 5), _ann(30, 6), _ann(30, 7), _ann(31, 9), _ann(32, 77),
            {"id": 33, "bbox": [1, 1, 2, 2]}]
    src = _write_json(tmp_path / "inst.json", images, anns)
    m = _build(src, tmp_path / "out")
    assert list(_records(tmp_path / "out")) == ["f.png"]
    reasons = [s["reason"] for s in m["skipped"]]

    def one(*words):
        found = [r for r in reasons if all(w in r for w in words)]
        assert found, (words, reasons)
        return found

    assert len(one("images 12 and 40 both name the file 'a.png'")) == 2
    assert len(one("image id 5 is given to 2 images", "'b.png'", "'c.png'")) == 2
    assert len(one("annotation id 30", "annotations[2] (image 6)", "annotations[3] (image 7)")) == 2
    one("annotations[1] (id 2) names image id 5, which 2 images have")
    one("annotations[5] (id 32) names image id 77, which no image has")
    one("annotations[6] (id 33) names no image")
    assert m["counts"]["inputs"] == m["counts"]["records"] + m["counts"]["skipped"] == 7 + 3


def test_duplicate_category_id_refuses_the_json(tmp_path):
    _png(tmp_path / "images" / "a.png")
    src = _write_json(tmp_path / "inst.json", [_image(1, "a.png")], [],
                      categories=[{"id": 3, "name": "dog"}, {"id": 3, "name": "cat"}])
    with pytest.raises(SourceError, match=r"category id 3 is given to categories\[0\] \('dog'\) and "
                                          r"categories\[1\] \('cat'\)"):
        read_coco(str(src))


# ---------------------------------------------------------------------------------------------
# 3: --max-boxes keeps the largest boxes and counts the rest


def test_boxes_beyond_max_boxes_are_the_smallest_and_counted(tmp_path):
    _png(tmp_path / "images" / "a.png", 64, 64)
    sizes = [3, 9, 5, 12, 2, 7, 4, 10, 6, 1]  # square sides, in no order
    anns = [_ann(i + 1, 1, (i * 6 % 40, i * 5 % 40, s, s)) for i, s in enumerate(sizes)]
    src = _write_json(tmp_path / "inst.json", [_image(1, "a.png", 64, 64)], anns)
    lines = []
    m = _build(src, tmp_path / "out", max_boxes=4, log=lines.append)
    (rec,) = _records(tmp_path / "out").values()
    widths = np.round((rec["boxes"][:rec["n_boxes"], 2] - rec["boxes"][:rec["n_boxes"], 0]) * 64).astype(int)
    assert sorted(widths.tolist(), reverse=True) == [12, 10, 9, 7]
    assert m["counts"]["boxes_dropped"] == 6 and m["counts"]["records_with_boxes_dropped"] == 1
    assert m["records"]["boxes_dropped"] == [6]
    assert any("6 boxes beyond --max-boxes 4 dropped" in ln for ln in lines), lines


def test_boxes_of_a_ground_truth_mask_are_cut_by_the_same_rule(tmp_path):
    """Components of an image folder's mask: the largest kept, the dropped counted (one rule)."""
    img = tmp_path / "src" / "x.png"
    _png(img, 64, 64)
    mask = np.zeros((64, 64), np.uint8)
    sides = [4, 12, 7, 9, 10]  # components >= 1% of the image (41 px), apart from each other
    for i, s in enumerate(sides):
        mask[2 + 12 * i: 2 + 12 * i + min(s, 10), 2: 2 + s * 4] = 255
    cv2.imwrite(str(tmp_path / "src" / "x.mask.png"), mask)
    m = _build(tmp_path / "src", tmp_path / "out", max_boxes=2)
    (rec,) = _records(tmp_path / "out").values()
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in rec["boxes"][:rec["n_boxes"]]]
    assert rec["n_boxes"] == 2 and min(areas) * 64 * 64 >= 10 * 36 - 1  # sides 12 and 10 (10x48, 10x40)
    assert m["counts"]["boxes_dropped"] == 3 and m["counts"]["gt_boxes_dropped"] == 3


# ---------------------------------------------------------------------------------------------
# random COCO files, built and checked from the outside

NAMES = ["a.png", "b.png", "./a.png", "sub/../b.png", "c/d.png", "../out.png"]
SQUARE = st.tuples(st.integers(0, S - 2), st.integers(0, S - 2)).flatmap(
    lambda xy: st.tuples(st.just(xy[0]), st.just(xy[1]), st.integers(1, S - xy[0]), st.integers(1, S - xy[1])))


@st.composite
def coco_files(draw):
    images = []
    for _ in range(draw(st.integers(1, 5))):
        entry = {"file_name": draw(st.sampled_from(NAMES)), "height": S, "width": S}
        ident = draw(st.one_of(st.integers(1, 4), st.none()))  # small pool: duplicates; None: no id
        if ident is not None:
            entry["id"] = ident
        images.append(entry)
    anns = []
    for _ in range(draw(st.integers(0, 8))):
        x, y, w, h = draw(SQUARE)
        ann = {"image_id": draw(st.integers(1, 5)), "bbox": [x, y, w, h], "iscrowd": 0}
        if draw(st.booleans()):
            ann["id"] = draw(st.integers(1, 12))  # small pool: duplicated annotation ids
        if draw(st.integers(0, 3)) == 0:  # a crowd instance, compressed RLE
            m = np.zeros((S, S), bool)
            m[y:y + h, x:x + w] = True
            m &= np.random.default_rng(draw(st.integers(0, 1000))).random((S, S)) < 0.7
            ann.update(segmentation=_compressed(m), iscrowd=1)
        else:
            pts = draw(st.lists(st.tuples(st.floats(x - 1, x + w + 1), st.floats(y - 1, y + h + 1)),
                                min_size=3, max_size=6))
            ann["segmentation"] = [[round(c, 2) for p in pts for c in p]]
        anns.append(ann)
    return images, anns


def _expected_clean(images, anns, allow_outside):
    """Image indices that must become records, by the rules written out independently."""
    ids = [e.get("id") for e in images]
    files = [posixpath.normpath(posixpath.join("images", e["file_name"])) for e in images]
    ann_ids = [a["id"] for a in anns if "id" in a]
    clean = set()
    for i, e in enumerate(images):
        mine = [a for a in anns if a["image_id"] == ids[i]]
        if (ids[i] is not None and ids.count(ids[i]) == 1 and files.count(files[i]) == 1
                and (allow_outside or not e["file_name"].startswith("../"))
                and all(ann_ids.count(a["id"]) == 1 for a in mine if "id" in a)):
            clean.add(i)
    return clean


@settings(max_examples=15, deadline=None)
@given(coco=coco_files(), allow_outside=st.booleans(), max_boxes=st.integers(1, 3))
def test_random_coco_files_build_one_record_per_unambiguous_image(coco, allow_outside, max_boxes):
    images, anns = coco
    with tempfile.TemporaryDirectory() as d:
        root = os.path.join(d, "src")
        for n in ("a.png", "b.png", "c/d.png"):
            _png(os.path.join(root, "images", n))
        _png(os.path.join(root, "out.png"))  # what "../out.png" names: outside the images folder
        src = os.path.join(root, "inst.json")
        with open(src, "w") as f:
            json.dump({"images": images, "annotations": anns}, f)
        clean = _expected_clean(images, anns, allow_outside)
        ids = [e.get("id") for e in images]
        n_orphans = sum(ids.count(a["image_id"]) != 1 for a in anns)
        with _opened_paths() as opened:
            try:
                m = _build(src, os.path.join(d, "out"), max_boxes=max_boxes, allow_outside=allow_outside)
            except BuildError as e:  # nothing left to build: refused, counting every input
                assert not clean and f"every one of {len(images) + n_orphans} inputs was skipped" in str(e)
                m = None
        if not allow_outside:
            assert os.path.join(root, "out.png") not in [os.path.normpath(p) for p in opened]
        if m is None:
            return
        ds = open_dataset(os.path.join(d, "out"))
        records = [ds[i] for i in range(len(ds))]

    keys = [r["key"] for r in records]
    assert len(set(keys)) == len(keys), keys  # no two records of one source file
    assert sorted(keys) == sorted(posixpath.normpath(images[i]["file_name"]) for i in clean)
    skipped = m["skipped"]
    for i, e in enumerate(images):
        if i in clean:
            continue
        named = [s for s in skipped if s["key"] == posixpath.normpath(e["file_name"])
                 and e["file_name"] in s["reason"] and (f"image id {e['id']!r}" in s["reason"] if "id" in e else True)]
        assert named, (i, e, skipped)
    # every annotation given to no single image is a counted skip naming it
    for i, a in enumerate(anns):
        if ids.count(a["image_id"]) != 1:
            assert any(s["key"] == f"annotations[{i}]" for s in skipped), (i, a, skipped)
    assert m["counts"]["records"] + m["counts"]["skipped"] == m["counts"]["inputs"]
    assert m["counts"]["inputs"] == len(images) + n_orphans

    # each record is its annotations processed literally: pycocotools' union, the largest boxes
    by_key = {posixpath.normpath(images[i]["file_name"]): images[i]["id"] for i in clean}
    dropped = []
    for r in records:
        mine = [a for a in anns if a["image_id"] == by_key[r["key"]]]
        union = np.zeros((S, S), bool)
        for a in mine:
            union |= _coco_mask(a["segmentation"], S, S)
        np.testing.assert_array_equal(r["gt_mask"], union * np.uint8(255))
        np.testing.assert_array_equal(r["mask"], union * np.uint8(255))
        boxes = sorted(([x / S, y / S, (x + w) / S, (y + h) / S] for x, y, w, h in (a["bbox"] for a in mine)),
                       key=lambda b: -(b[2] - b[0]) * (b[3] - b[1]))
        kept = boxes[:max_boxes]
        assert r["n_boxes"] == r["n_gt_boxes"] == len(kept)
        np.testing.assert_allclose(r["gt_boxes"][:len(kept)].reshape(-1, 4), np.reshape(kept, (-1, 4)), atol=1e-6)
        np.testing.assert_allclose(r["boxes"][:len(kept)].reshape(-1, 4), np.reshape(kept, (-1, 4)), atol=1e-6)
        dropped.append(len(boxes) - len(kept))
    assert m["counts"]["boxes_dropped"] == sum(dropped)
