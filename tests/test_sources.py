"""Source readers: ImageFolder (+ masks beside), COCO (polygons, RLE), list files, wrong paths."""
import json

import cv2
import numpy as np
import pytest

from objloader.sources import SourceError, open_source, read_coco, read_imagefolder, read_listfile, rle_to_mask
from objloader.sources.rasterise import decode_rle_string


def _encode_rle_string(counts):
    """Independent writer of COCO's compressed RLE (the inverse of the format's definition)."""
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_rle_string_roundtrip():
    rng = np.random.default_rng(0)
    for _ in range(50):
        counts = list(rng.integers(0, 3000, size=rng.integers(1, 30)))
        assert decode_rle_string(_encode_rle_string(counts)) == counts


def test_rle_to_mask_column_major():
    # 3x2 image (h=3, w=2); column-major runs: 1 zero, 3 ones, 2 zeros.
    m = rle_to_mask({"size": [3, 2], "counts": [1, 3, 2]})
    assert m.tolist() == [[False, True], [True, False], [True, False]]
    with pytest.raises(SourceError, match="RLE counts"):
        rle_to_mask({"size": [3, 2], "counts": [1, 3]})


def test_imagefolder_reads_classes_and_masks(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        cv2.imwrite(str(tmp_path / c / "1.jpg"), np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "dog" / "1.mask.png"), np.zeros((8, 8), np.uint8))
    samples, classes = read_imagefolder(str(tmp_path))
    assert classes == ["cat", "dog"]
    assert [(s.key, s.label, s.gt_mask_path is not None) for s in samples] == [("cat/1.jpg", 0, False), ("dog/1.jpg", 1, True)]


def test_coco_reader(tmp_path):
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.jpg"), np.zeros((10, 20, 3), np.uint8))
    mask = np.zeros((10, 20), bool)
    mask[2:5, 3:9] = True
    flat = mask.T.reshape(-1)  # column-major
    runs, cur, n = [], False, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 20, "height": 10}],
            "categories": [{"id": 1, "name": "x"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 1, "bbox": [3, 2, 6, 3], "iscrowd": 0,
                 "segmentation": {"size": [10, 20], "counts": _encode_rle_string(runs)}},
                {"id": 2, "image_id": 1, "category_id": 1, "bbox": [12, 6, 4, 3], "iscrowd": 0,
                 "segmentation": [[12, 6, 16, 6, 16, 9, 12, 9]]}]}
    (tmp_path / "inst.json").write_text(json.dumps(data))
    (s,) = read_coco(str(tmp_path / "inst.json"))
    assert s.key == "a.jpg" and s.label == -1
    np.testing.assert_allclose(s.gt_boxes, [[0.15, 0.2, 0.45, 0.5], [0.6, 0.6, 0.8, 0.9]], atol=1e-6)
    m = s.load_gt_mask()
    assert m.shape == (10, 20)
    assert (m[mask] == 255).all()
    assert (m[6:9, 12:16] == 255).all() and m.sum() // 255 == mask.sum() + 4 * 3  # as pycocotools draws it


def test_listfile(tmp_path):
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "list.txt").write_text("# comment\na.png 3\n\n")
    (s,) = read_listfile(str(tmp_path / "list.txt"))
    assert (s.key, s.label) == ("a.png", 3) and s.path == str(tmp_path / "a.png")
    (tmp_path / "bad.txt").write_text("a.png three\n")
    with pytest.raises(SourceError, match="bad.txt:1"):
        read_listfile(str(tmp_path / "bad.txt"))


@pytest.mark.parametrize("make", ["missing", "empty_dir", "bad_json", "not_coco"])
def test_wrong_paths_name_the_path(tmp_path, make):
    p = tmp_path / "thing"
    if make == "empty_dir":
        p.mkdir()
    elif make == "bad_json":
        p = tmp_path / "x.json"
        p.write_text("{not json")
    elif make == "not_coco":
        p = tmp_path / "x.json"
        p.write_text("[1, 2]")
    with pytest.raises(SourceError) as e:
        open_source(str(p))
    assert str(p) in str(e.value)
