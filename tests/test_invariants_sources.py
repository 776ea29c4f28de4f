"""The input survey's invariants (DESIGN.md, "Inputs: one file, one record"), one plain example
each: a file reached by two paths makes one record, the walk neither leaves SRC nor loops, an
annotation pairs with exactly one image, paths stay in their root, OUT and SRC stay apart,
palette masks are read by index, and --max-pixels (not PIL's own limit) decides what is too large."""
import io
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from objloader.cli.build import main as build_main
from objloader.sources import SourceError, SourceSpec, open_source
from objloader.sources.base import Sample
from objloader.store import BuildError, BuildOptions, build, open_dataset


def _quiet(*_):
    pass


def _png(path, value=90, size=(16, 16)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(str(path), np.full(size + (3,), value, np.uint8))


def _build(src, out, masks="none", **kw):
    return build(str(src), str(out), BuildOptions(masks=masks, max_res=64, mask_res=16), formats=("wds",),
                 workers=1, log=_quiet, **kw)


def _keys(out):
    ds = open_dataset(str(out))
    return sorted(ds[i]["key"] for i in range(len(ds)))


def _skips(m):
    return {s["key"]: s["reason"] for s in m["skipped"]}


# ---------------------------------------------------------------------------------------------
# 1. one file, at most one record; the walk never leaves SRC unless asked, never loops


def test_a_file_reached_through_links_makes_one_record(tmp_path):
    src = tmp_path / "src"
    _png(src / "cat" / "a.png")
    _png(src / "cat" / "sub" / "b.png", 30)
    os.symlink("a.png", src / "cat" / "again.png")  # a second path to one file
    os.link(src / "cat" / "a.png", src / "cat" / "hard.png")  # a hard link is the same file too
    os.symlink("sub", src / "cat" / "sub_link")  # a second path to a folder
    m = _build(src, tmp_path / "out")
    assert _keys(tmp_path / "out") == ["cat/a.png", "cat/sub/b.png"]
    skips = _skips(m)
    assert set(skips) == {"cat/again.png", "cat/hard.png", "cat/sub_link"}
    for key in ("cat/again.png", "cat/hard.png"):
        assert "same file as" in skips[key] and str(src / "cat" / "a.png") in skips[key]
    assert str(src / "cat" / "sub") in skips["cat/sub_link"] and "walked already" in skips["cat/sub_link"]


def test_a_link_to_an_ancestor_does_not_loop(tmp_path):
    src = tmp_path / "src"
    _png(src / "cat" / "a.png")
    os.symlink("..", src / "cat" / "up")
    os.symlink(str(src), src / "cat" / "root")
    m = _build(src, tmp_path / "out")
    assert _keys(tmp_path / "out") == ["cat/a.png"]
    assert set(_skips(m)) == {"cat/up", "cat/root"} and m["counts"]["inputs"] == 3


def test_links_out_of_src_are_skipped_unless_follow_links(tmp_path):
    outside = tmp_path / "outside"
    _png(outside / "sentinel.png", 200)
    _png(outside / "folder" / "x.png", 100)
    src = tmp_path / "src"
    _png(src / "cat" / "a.png")
    os.symlink(outside / "sentinel.png", src / "cat" / "s.png")
    os.symlink(outside / "folder", src / "cat" / "ext")
    os.symlink(tmp_path / "nowhere.png", src / "cat" / "broken.png")
    m = _build(src, tmp_path / "out")
    assert _keys(tmp_path / "out") == ["cat/a.png"]
    skips = _skips(m)
    assert set(skips) == {"cat/s.png", "cat/ext", "cat/broken.png"}
    for key, target in (("cat/s.png", outside / "sentinel.png"), ("cat/ext", outside / "folder")):
        assert "leads outside" in skips[key] and str(target) in skips[key] and "--follow-links" in skips[key]
    assert "broken link" in skips["cat/broken.png"]

    assert build_main([str(src), str(tmp_path / "followed"), "--masks", "none", "--formats", "wds",
                       "--workers", "1", "--max-res", "64", "--follow-links"]) == 0
    assert _keys(tmp_path / "followed") == ["cat/a.png", "cat/ext/x.png", "cat/s.png"]


# ---------------------------------------------------------------------------------------------
# 2. one annotation source, exactly one image


def test_two_images_beside_one_mask_are_both_skipped(tmp_path):
    src = tmp_path / "src"
    _png(src / "cat" / "a.jpg")
    _png(src / "cat" / "a.png")
    _png(src / "cat" / "b.png")
    cv2.imwrite(str(src / "cat" / "a.mask.png"), np.full((16, 16), 255, np.uint8))
    cv2.imwrite(str(src / "cat" / "b.mask.png"), np.full((16, 16), 255, np.uint8))
    m = _build(src, tmp_path / "out", masks="gt")
    assert _keys(tmp_path / "out") == ["cat/b.png"]
    skips = _skips(m)
    assert set(skips) == {"cat/a.jpg", "cat/a.png"}
    for reason in skips.values():
        assert all(str(p) in reason for p in (src / "cat" / "a.mask.png", src / "cat" / "a.jpg", src / "cat" / "a.png"))


def test_two_images_of_one_mask_in_a_mask_tree_are_both_skipped(tmp_path):
    src, tree = tmp_path / "src", tmp_path / "masks"
    for name in ("x.jpg", "x.png", "y.png"):
        _png(src / "cat" / name)
    for name in ("x.png", "y.png"):
        os.makedirs(tree / "cat", exist_ok=True)
        cv2.imwrite(str(tree / "cat" / name), np.full((16, 16), 255, np.uint8))
    m = _build(src, tmp_path / "out", masks="gt", gt_masks=str(tree))
    assert _keys(tmp_path / "out") == ["cat/y.png"]
    assert set(_skips(m)) == {"cat/x.jpg", "cat/x.png"}
    assert all(str(tree / "cat" / "x.png") in r for r in _skips(m).values())


def test_list_file_entries_for_one_file_make_one_record(tmp_path):
    _png(tmp_path / "x" / "a.png")
    _png(tmp_path / "x" / "b.png", 30)
    os.symlink("x/a.png", tmp_path / "l.png")
    (tmp_path / "list.txt").write_text("x/a.png 1\n./x/a.png 1\nx//a.png 1\nl.png 1\nx/a.png 1\nx/b.png 2\n")
    m = _build(tmp_path / "list.txt", tmp_path / "out")
    assert _keys(tmp_path / "out") == ["x/a.png", "x/b.png"]
    assert len(m["skipped"]) == 4
    for s in m["skipped"]:
        assert "same file as" in s["reason"] and f"{tmp_path / 'list.txt'}:1" in s["reason"]


def test_list_file_entries_for_one_file_with_different_labels_are_all_skipped(tmp_path):
    _png(tmp_path / "x" / "a.png")
    _png(tmp_path / "x" / "b.png", 30)
    (tmp_path / "list.txt").write_text("x/a.png 1\n./x/a.png 2\nx/b.png 2\n")
    m = _build(tmp_path / "list.txt", tmp_path / "out")
    assert _keys(tmp_path / "out") == ["x/b.png"]
    assert len(m["skipped"]) == 2
    for s in m["skipped"]:
        assert "ambiguous" in s["reason"] and "label 1" in s["reason"] and "label 2" in s["reason"]


# ---------------------------------------------------------------------------------------------
# 3. paths stay where they belong


def test_list_file_paths_outside_its_folder_are_skipped_unless_follow_links(tmp_path):
    _png(tmp_path / "sentinel.png", 200)
    _png(tmp_path / "other.png", 150)
    cv2.imwrite(str(tmp_path / "sentinel.mask.png"), np.full((16, 16), 255, np.uint8))
    _png(tmp_path / "lists" / "in.png")
    _png(tmp_path / "lists" / "b.png", 30)
    (tmp_path / "lists" / "list.txt").write_text(
        f"in.png 0\n../sentinel.png 1\n{tmp_path / 'other.png'} 2\nb.png 0 ../sentinel.mask.png\n")
    m = _build(tmp_path / "lists" / "list.txt", tmp_path / "out")
    assert _keys(tmp_path / "out") == ["in.png"] and len(m["skipped"]) == 3
    for s in m["skipped"]:
        assert "leads outside" in s["reason"] and "--follow-links" in s["reason"] and "list.txt:" in s["reason"]
    m = _build(tmp_path / "lists" / "list.txt", tmp_path / "out2", follow_links=True)
    assert m["counts"]["records"] == 4, m["skipped"]


def test_out_inside_src_is_refused_before_any_work(tmp_path, capsys):
    src = tmp_path / "src"
    _png(src / "cat" / "a.png")
    with pytest.raises(BuildError, match="inside the source folder"):
        _build(src, src / "built")
    assert sorted(os.listdir(src)) == ["cat"]  # no OUT.lock, no OUT.partial left in SRC
    os.symlink(src, tmp_path / "via_link")
    assert build_main([str(src), str(tmp_path / "via_link" / "built"), "--masks", "none"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inside the source folder" in err
    with pytest.raises(BuildError, match="SRC .* lies inside OUT"):
        _build(src / "cat", src, overwrite=True)
    assert os.path.isfile(src / "cat" / "a.png")


def test_dataset_names_cannot_lead_out_of_out(tmp_path):
    for name in ("../evil", "a/../../b", "/abs", "a//b", "."):
        with pytest.raises(SourceError, match="outside OUT"):
            SourceSpec(name, "imagefolder", str(tmp_path), [])
    SourceSpec("bgchallenge/mixed_rand", "imagefolder", str(tmp_path), [])  # a plain nested name is fine


def test_keys_with_slashes_and_dots_write_nothing_outside_out(tmp_path):
    _png(tmp_path / "d" / "a.png")
    (tmp_path / "list.txt").write_text("d/../d/a.png 1\n")
    before = {p for p in tmp_path.rglob("*")}
    m = _build(tmp_path / "list.txt", tmp_path / "out")
    assert m["records"]["keys"] == ["d/../d/a.png"]
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(str(p).startswith(str(tmp_path / "out")) for p in new)


# ---------------------------------------------------------------------------------------------
# 4. palette masks are read by index, not by displayed colour


def _palette_mask(path, index):
    im = Image.fromarray(index.astype(np.uint8), mode="P")
    palette = [255, 255, 255, 0, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192]  # index 0 white, 1 black
    im.putpalette(palette)
    im.save(path)


def test_palette_mask_is_read_by_index_with_void_not_object(tmp_path):
    index = np.zeros((16, 16), np.uint8)
    index[4:12, 4:12] = 1  # the object, drawn black on a white background
    index[3, 3:13] = 255  # void border
    _palette_mask(tmp_path / "a.mask.png", index)
    s = Sample(key="a.png", path=str(tmp_path / "a.png"), gt_mask_path=str(tmp_path / "a.mask.png"))
    assert Image.open(tmp_path / "a.mask.png").mode == "P"
    got = s.load_gt_mask()
    np.testing.assert_array_equal(got, np.where(index == 1, 255, 0))
    # and through a build: the stored ground truth has the object inside, background outside
    _png(tmp_path / "src" / "a.png")
    os.replace(tmp_path / "a.mask.png", tmp_path / "src" / "a.mask.png")
    _build(tmp_path / "src", tmp_path / "out", masks="gt")
    rec = open_dataset(str(tmp_path / "out"))[0]
    assert rec["gt_mask"][8, 8] == 255 and rec["gt_mask"][0, 0] == 0


# ---------------------------------------------------------------------------------------------
# 5. --max-pixels governs, not PIL's decompression-bomb limit


def test_max_pixels_governs_over_pils_own_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # far below the 64x64 image
    _png(tmp_path / "src" / "a.png", size=(64, 64))
    m = _build(tmp_path / "src", tmp_path / "out")
    assert m["counts"]["records"] == 1, m["skipped"]
    _png(tmp_path / "src" / "b.png", size=(16, 16))
    m = build(str(tmp_path / "src"), str(tmp_path / "small"), BuildOptions(masks="none", max_pixels=1000, max_res=64),
              formats=("wds",), workers=1, log=_quiet)
    assert m["records"]["keys"] == ["b.png"]
    (skip,) = m["skipped"]
    assert skip["key"] == "a.png" and "too large" in skip["reason"] and "--max-pixels 1000" in skip["reason"]


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    """A real 95-megapixel JPEG (above PIL's default limit of ~89.5 MP), solid grey: ~1 MB."""
    path = tmp_path_factory.mktemp("huge") / "src" / "big.jpg"
    os.makedirs(path.parent)
    Image.new("L", (10000, 9500), 128).save(path, quality=50)
    return path


def test_a_90_megapixel_jpeg_under_max_pixels_is_built(huge_jpeg, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", int(1024 * 1024 * 1024 // 4 // 3))  # PIL's default
    m = _build(huge_jpeg.parent, tmp_path / "out")
    assert m["counts"]["records"] == 1, m["skipped"]
    assert "resized from 10000x9500" in m["conversions"]
