"""Sources on bad input: COCO instances whose mask and box disagree are repaired and counted,
malformed COCO fields skip their record alone with a reason naming it, EXIF-rotated photos are
paired with their masks as displayed, and file names that are not UTF-8 skip only themselves."""
import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from objloader.cli.build import main as build_main
from objloader.sources import SourceError, open_source, read_coco, read_imagefolder
from objloader.sources.coco import NOTE_BOX_AS_MASK, NOTE_BOX_FROM_SEGMENTATION, NOTE_INSTANCE_LEFT_OUT
from objloader.store import BuildError, BuildOptions, build, open_dataset

H, W = 20, 30  # size of the COCO test images


def _quiet(*_):
    pass


def _build(src, out, masks="gt", on_error="skip", mask_res=16):
    """A quick single-process build of the WebDataset format only."""
    return build(str(src), str(out), BuildOptions(masks=masks, max_res=64, mask_res=mask_res),
                 formats=("wds",), workers=1, on_error=on_error, log=_quiet)


def _records(out) -> dict:
    ds = open_dataset(str(out))
    return {ds[i]["key"]: ds[i] for i in range(len(ds))}


def _coco(root, images, annotations):
    """A COCO source under root: the json and a black PNG for every image entry that names a file."""
    os.makedirs(root / "images", exist_ok=True)
    for entry in images:
        if "file_name" in entry:
            cv2.imwrite(str(root / "images" / entry["file_name"]), np.zeros((H, W, 3), np.uint8))
    (root / "inst.json").write_text(json.dumps({"images": images, "annotations": annotations}))
    return root / "inst.json"


def _image(ident, name):
    return {"id": ident, "file_name": name, "height": H, "width": W}


def _rle_counts(mask):
    """Uncompressed COCO RLE counts of a bool mask: column-major runs, starting with zeros."""
    flat = mask.T.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return runs if flat[0] == 0 else [0] + runs


def _rle_string(counts):
    """COCO's compressed RLE string of counts (an independent writer of the format)."""
    out = []
    for i, x in enumerate(counts):
        x = x - counts[i - 2] if i > 2 else x
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            out.append(chr((c | 0x20 if more else c) + 48))
    return "".join(out)


def _block(rows, cols):
    m = np.zeros((H, W), bool)
    m[rows, cols] = True
    return m


# ---------------------------------------------------------------------------------------------
# 1a/1b: instances whose mask and box disagree are repaired consistently, and the repair counted


@pytest.mark.parametrize("segmentation", [[[5, 7, 10, 9]], [[5, 7]], [], None])
def test_coco_polygon_of_fewer_than_3_points_fills_its_box(tmp_path, segmentation):
    """The object of a 2-point polygon (or of no segmentation) stays foreground: its box is
    filled, so BG-Mixup does not paste over it; a 2-point part beside a real polygon changes nothing."""
    short = {"id": 1, "image_id": 1, "bbox": [4, 6, 8, 5]}
    if segmentation is not None:
        short["segmentation"] = segmentation
    anns = [short, {"id": 2, "image_id": 1, "bbox": [20, 2, 6, 6],
                    "segmentation": [[20, 2, 26, 2, 26, 8, 20, 8], [1, 1, 2, 2]]}]
    (s,) = read_coco(str(_coco(tmp_path, [_image(1, "a.png")], anns)))
    m = s.load_gt_mask()
    expected = _block(slice(6, 11), slice(4, 12)) | _block(slice(2, 8), slice(20, 26))
    np.testing.assert_array_equal(m == 255, expected)
    np.testing.assert_allclose(s.gt_boxes, [[4 / W, 6 / H, 12 / W, 11 / H], [20 / W, 2 / H, 26 / W, 8 / H]],
                               atol=1e-6)
    assert s.notes == [NOTE_BOX_AS_MASK] and s.invalid is None


OBJ = _block(slice(5, 11), slice(10, 16))  # rows 5..10, cols 10..15: an RLE object
OBJ_BOX = [10 / W, 5 / H, 16 / W, 11 / H]
POLY = [[10, 5, 16, 5, 16, 11, 10, 11]]  # the same box as a polygon: pycocotools covers [10, 16) x [5, 11)
POLY_OBJ = OBJ
NOTHING = np.zeros((H, W), bool)


@pytest.mark.parametrize("bbox, segmentation, box, mask, note", [
    ([10, 5, -4, 6], POLY, OBJ_BOX, POLY_OBJ, NOTE_BOX_FROM_SEGMENTATION),                      # negative width
    ([10, 5, 6, 0], POLY, OBJ_BOX, POLY_OBJ, NOTE_BOX_FROM_SEGMENTATION),                       # zero height
    (None, POLY, OBJ_BOX, POLY_OBJ, NOTE_BOX_FROM_SEGMENTATION),                                # no bbox
    ([40, 30, 5, 5], {"size": [H, W], "counts": _rle_counts(OBJ)}, OBJ_BOX, OBJ, NOTE_BOX_FROM_SEGMENTATION),
    ([-9, 2, 5, 5], {"size": [H, W], "counts": _rle_string(_rle_counts(OBJ))}, OBJ_BOX, OBJ,
     NOTE_BOX_FROM_SEGMENTATION),                                                                # outside, left
    ([40, 30, 5, 5], None, None, NOTHING, NOTE_INSTANCE_LEFT_OUT),                              # nothing left
])
def test_coco_box_without_area_is_taken_from_the_segmentation(tmp_path, bbox, segmentation, box, mask, note):
    ann = {"id": 7, "image_id": 1}
    if bbox is not None:
        ann["bbox"] = bbox
    if segmentation is not None:
        ann["segmentation"] = segmentation
    (s,) = read_coco(str(_coco(tmp_path, [_image(1, "a.png")], [ann])))
    np.testing.assert_allclose(s.gt_boxes, [box] if box else np.zeros((0, 4)), atol=1e-6)
    np.testing.assert_array_equal(s.load_gt_mask() == 255, mask)
    assert s.notes == [note]


def _repaired_source(tmp_path):
    """a.png: a 2-point polygon with a box; b.png: a polygon with a box of negative width."""
    images = [_image(1, "a.png"), _image(2, "b.png")]
    anns = [{"id": 1, "image_id": 1, "bbox": [4, 6, 8, 5], "segmentation": [[5, 7, 10, 9]]},
            {"id": 2, "image_id": 2, "bbox": [10, 5, -4, 6], "segmentation": POLY}]
    return _coco(tmp_path / "src", images, anns)


def test_coco_repairs_reach_the_built_records(tmp_path):
    out = tmp_path / "out"
    m = _build(_repaired_source(tmp_path), out, mask_res=16)
    assert m["counts"]["skipped"] == 0 and m["counts"]["records_without_boxes"] == 0
    recs = _records(out)
    for key, obj, box in (("a.png", _block(slice(6, 11), slice(4, 12)), [4 / W, 6 / H, 12 / W, 11 / H]),
                          ("b.png", POLY_OBJ, OBJ_BOX)):
        r = recs[key]
        expected = cv2.resize(np.where(obj, 255, 0).astype(np.uint8), (16, 16), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(r["gt_mask"], expected)
        np.testing.assert_array_equal(r["mask"], expected)
        assert r["n_boxes"] == 1
        np.testing.assert_allclose(r["boxes"][0], box, atol=1e-6)


def test_coco_repairs_are_counted_in_the_manifest(tmp_path):
    """The repairs read_coco notes on a sample are counted under conversions: this needs
    objloader/store/record_builder.py build_record to add `sample.notes` to the record's notes."""
    m = _build(_repaired_source(tmp_path), tmp_path / "out")
    assert m["conversions"].get(NOTE_BOX_AS_MASK) == 1
    assert m["conversions"].get(NOTE_BOX_FROM_SEGMENTATION) == 1


# ---------------------------------------------------------------------------------------------
# 1c: a malformed field is an error of its record alone, named


GOOD_ANN = {"id": 1, "image_id": 1, "bbox": [2, 2, 6, 6], "segmentation": [[2, 2, 8, 2, 8, 8, 2, 8]]}
MALFORMED = {  # what is wrong with image 2 ('b.png') -> (its image entry, its annotation, words of the reason)
    "odd polygon": (_image(2, "b.png"), {"id": 9, "image_id": 2, "bbox": [1, 1, 5, 5],
                                         "segmentation": [[1, 1, 5, 1, 5]]}, "annotation 9", "odd number"),
    "RLE ends inside a value": (_image(2, "b.png"), {"id": 9, "image_id": 2, "bbox": [1, 1, 5, 5],
                                                     "segmentation": {"size": [H, W], "counts": "P"}},
                                "annotation 9", "end inside a value"),
    "RLE characters": (_image(2, "b.png"), {"id": 9, "image_id": 2, "bbox": [1, 1, 5, 5],
                                            "segmentation": {"size": [H, W], "counts": "~~"}},
                       "annotation 9", "outside '0'..'o'"),
    "RLE sum": (_image(2, "b.png"), {"id": 9, "image_id": 2, "bbox": [1, 1, 5, 5],
                                     "segmentation": {"size": [H, W], "counts": _rle_string([5, 7])}},
                "annotation 9", "sum to 12"),
    "no height": ({"id": 2, "file_name": "b.png", "width": W}, None, "'height'", "no 'height'"),
    "no width": ({"id": 2, "file_name": "b.png", "height": H}, None, "'width'", "no 'width'"),
    "bbox of 3": (_image(2, "b.png"), {"id": 9, "image_id": 2, "bbox": [1, 1, 5]}, "annotation 9", "'bbox'"),
    "bbox text": (_image(2, "b.png"), {"id": 9, "image_id": 2, "bbox": ["1", 1, 5, 5]}, "annotation 9", "'bbox'"),
}


def _malformed_source(root, case):
    entry, ann = MALFORMED[case][:2]
    return _coco(root, [_image(1, "a.png"), entry], [GOOD_ANN] + ([ann] if ann else []))


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_coco_malformed_field_skips_only_its_record(tmp_path, case):
    words = MALFORMED[case][2:]
    m = _build(_malformed_source(tmp_path / "src", case), tmp_path / "out")
    assert m["counts"]["records"] == 1 and m["counts"]["skipped"] == 1
    (skip,) = m["skipped"]
    assert skip["key"] == "b.png"
    for w in ("COCO image id 2", "'b.png'") + words:
        assert w in skip["reason"], (w, skip["reason"])
    assert list(_records(tmp_path / "out")) == ["a.png"]
    with pytest.raises(BuildError, match="image id 2") as e:
        _build(tmp_path / "src" / "inst.json", tmp_path / "out2", on_error="fail")
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words)


def test_coco_malformed_field_fails_the_cli_in_one_line(tmp_path, capsys):
    src = _malformed_source(tmp_path / "src", "odd polygon")
    rc = build_main([str(src), str(tmp_path / "out"), "--on-error", "fail", "--formats", "wds", "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    (line,) = [ln[ln.index("objloader-build: error:"):] for ln in err.splitlines() if "error:" in ln]
    assert line.startswith("objloader-build: error: record 'b.png'")
    assert "COCO image id 2" in line and "annotation 9" in line and "polygon 0" in line


def test_coco_annotation_naming_no_image_is_a_counted_skip(tmp_path):
    src = _coco(tmp_path, [_image(1, "a.png")], [{"id": 3, "bbox": [1, 1, 2, 2]}])
    (spec,) = open_source(str(src))
    assert [s.key for s in spec.samples] == ["a.png", "annotations[0]"]
    with pytest.raises(SourceError, match=r"annotations\[0\] \(id 3\) names no image"):
        spec.samples[1].read_bytes()


def test_unreadable_demo_marker_is_a_source_error(tmp_path):
    (tmp_path / "demo.json").write_text("{not json")
    with pytest.raises(SourceError, match="demo.json"):
        open_source(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# 2a: EXIF orientation: images are used as displayed, masks are drawn on the displayed image


# EXIF orientation -> the turn np.rot90 makes from the stored pixels to the displayed ones.
DISPLAY_TURNS = {3: 2, 6: -1, 8: 1}


@pytest.mark.parametrize("orientation, size", [(6, (32, 32)), (3, (32, 32)), (8, (32, 48))])
def test_exif_oriented_jpeg_pairs_with_its_displayed_mask(tmp_path, orientation, size):
    """The stored record is the displayed photo, aligned with the mask drawn on it. This needs
    objloader/sources/decode.py decode_image to apply the EXIF orientation."""
    stored = np.zeros(size + (3,), np.uint8)
    stored[0:16, 0:8] = 255  # a white object in the stored top-left: any turn moves it
    displayed = np.ascontiguousarray(np.rot90(stored, DISPLAY_TURNS[orientation]))
    os.makedirs(tmp_path / "src" / "x")
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "src" / "x" / "photo.jpg", quality=95, exif=exif.tobytes())
    cv2.imwrite(str(tmp_path / "src" / "x" / "photo.mask.png"), displayed[..., 0])
    with Image.open(tmp_path / "src" / "x" / "photo.jpg") as im:
        assert im.getexif()[0x0112] == orientation and im.size == (size[1], size[0])

    m = _build(tmp_path / "src", tmp_path / "out", mask_res=8)
    assert m["counts"]["skipped"] == 0, m["skipped"]
    assert m["conversions"].get("EXIF orientation applied") == 1
    (r,) = _records(tmp_path / "out").values()
    assert r["image"].shape[:2] == displayed.shape[:2]
    seen = cv2.resize(r["image"][..., 0], (8, 8), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(seen, r["mask"], atol=8)  # the object is where the mask says


# ---------------------------------------------------------------------------------------------
# 2b: a file name that is not UTF-8 skips that file, named, and the rest is built


@pytest.mark.parametrize("kind", ["imagefolder", "listfile"])
def test_file_name_not_utf8_is_skipped_and_named(tmp_path, kind):
    src = tmp_path / "src"
    src.mkdir()
    png = cv2.imencode(".png", np.full((16, 16, 3), 90, np.uint8))[1]
    (src / "ok.png").write_bytes(png.tobytes())
    with open(os.fsencode(src) + b"/img_\xff.png", "wb") as f:
        f.write(png.tobytes())
    if kind == "listfile":
        (src / "list.txt").write_bytes(b"ok.png 1\nimg_\xff.png 2\n")
    m = _build(src / "list.txt" if kind == "listfile" else src, tmp_path / "out", masks="none")
    assert (m["counts"]["records"], m["counts"]["skipped"]) == (1, 1)
    (skip,) = m["skipped"]
    assert skip["key"] == "img_\\xff.png"
    assert "not valid UTF-8" in skip["reason"] and "img_\\xff.png" in skip["reason"]
    assert list(_records(tmp_path / "out")) == ["ok.png"]
    json.loads((tmp_path / "out" / "manifest.json").read_bytes().decode("utf-8"))  # still UTF-8 JSON


def test_class_folder_not_utf8_is_named_escaped(tmp_path):
    root = os.fsencode(tmp_path)
    for cls in (b"cat", b"d\xe9g"):
        os.makedirs(root + b"/" + cls)
        with open(root + b"/" + cls + b"/1.png", "wb") as f:
            f.write(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    samples, classes = read_imagefolder(str(tmp_path))
    assert classes == ["cat", "d\\xe9g"]
    assert [(s.key, s.label, s.invalid is None) for s in samples] == [("cat/1.png", 0, True), ("d\\xe9g/1.png", 1, False)]
