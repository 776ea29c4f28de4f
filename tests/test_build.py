"""objloader-build: round trip through FFCV and DALI, bad inputs, interrupted builds."""
import io
import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from objloader.cam.geometry import bg_rect, mask_to_boxes, pad_boxes
from objloader.store import BuildError, BuildOptions, DatasetError, build, open_dataset, read_manifest
from objloader.store import builder as build_module
from objloader.store.reader import read_index
from objloader.store.verify import verify_dali, verify_ffcv


def _scene(rng, h, w):
    img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    mask[y0:y0 + h // 3, x0:x0 + w // 3] = 255
    if rng.random() < 0.5:  # a second object
        mask[h - h // 5:, w - w // 5:] = 255
    return img, mask


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    rng = np.random.default_rng(1)
    for c in ("a", "b", "c"):
        os.makedirs(root / c)
        for i in range(7):
            img, mask = _scene(rng, int(rng.integers(40, 120)), int(rng.integers(40, 120)))
            cv2.imwrite(str(root / c / f"{i}.png"), img)
            cv2.imwrite(str(root / c / f"{i}.mask.png"), mask)
    return root


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "ds"
    build(str(folder), str(out), BuildOptions(masks="gt", max_res=96, mask_res=32, shard_size=8),
          workers=2, log=lambda *a: None)
    return out


def test_every_field_round_trips_through_ffcv_and_dali(built):
    m = read_manifest(str(built))
    assert m["counts"]["records"] == 21 and len(m["shards"]) == 3  # 8 + 8 + 5
    assert verify_ffcv(str(built), m) == 21
    assert verify_dali(str(built), m) == 21


def test_records_match_their_sources(folder, built):
    """open_dataset returns, for each key, the geometry of exactly that image's mask."""
    ds = open_dataset(str(built))
    assert len(ds) == 21 and ds.classes == ["a", "b", "c"]
    for i in range(len(ds)):
        r = ds[i]
        src_mask = cv2.imread(str(folder / r["key"].replace(".png", ".mask.png")), cv2.IMREAD_GRAYSCALE)
        h, w = src_mask.shape
        s = 96 / max(h, w)
        if s < 1:
            src_mask = cv2.resize(src_mask, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
        assert r["label"] == "abc".index(r["key"][0])
        assert r["image"].shape[:2] == src_mask.shape
        np.testing.assert_array_equal(r["mask"], cv2.resize(src_mask, (32, 32), interpolation=cv2.INTER_AREA))
        boxes, n = pad_boxes(mask_to_boxes(src_mask), 8)
        assert r["n_boxes"] == n >= 1
        np.testing.assert_array_equal(r["boxes"], boxes)
        np.testing.assert_array_equal(r["bg_rect"], bg_rect(src_mask))
        np.testing.assert_array_equal(r["gt_mask"], r["mask"])


def test_verify_detects_corruption(built, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    m = read_manifest(str(bad))
    # One float of record 3's boxes in the tar: DALI must notice.
    entry = read_index(str(bad / "shards" / "shard-00000.idx"))[3]
    off, size, _ = entry["boxes.npy"]
    with open(bad / "shards" / "shard-00000.tar", "r+b") as f:
        f.seek(off + size - 4)
        f.write(np.float32(0.123).tobytes())
    with pytest.raises(DatasetError, match="record 3"):
        verify_dali(str(bad), m)
    # One mask byte of record 5 in the beton: FFCV must notice.
    from ffcv.reader import Reader

    r = Reader(str(bad / "data.beton"))
    slot = r.metadata.dtype.names[r.field_names.index("mask")]
    ptr = int(r.metadata[slot][5])  # an NDArrayField slot is the data pointer itself
    with open(bad / "data.beton", "r+b") as f:
        f.seek(ptr)
        old = f.read(1)
        f.seek(ptr)
        f.write(bytes([255 - old[0]]))
    with pytest.raises(DatasetError, match="record 5"):
        verify_ffcv(str(bad), m)


def _jpeg(img, **kw):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_bad_inputs_are_converted_or_skipped_with_reasons(tmp_path):
    src = tmp_path / "src" / "x"
    os.makedirs(src)
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))
    good = _jpeg(rgb)
    (src / "good.jpg").write_bytes(good)
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 255, 500, dtype=np.uint8)))
    (src / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (src / "empty.jpg").write_bytes(b"")
    (src / "cmyk.jpg").write_bytes(_jpeg(rgb.convert("CMYK")))
    rgb.convert("L").save(src / "gray.png")
    Image.fromarray((rng.integers(0, 65535, (40, 40))).astype(np.uint16)).save(src / "gray16.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must come out as the grey fill, not black or garbage
    rgba.save(src / "alpha.png")
    Image.new("RGB", (1, 1)).save(src / "one.png")
    Image.fromarray(rng.integers(0, 255, (1500, 2100, 3), dtype=np.uint8)).save(src / "large.jpg", quality=80)
    out = tmp_path / "out"
    m = build(str(tmp_path / "src"), str(out), BuildOptions(masks="none", max_res=64), workers=1,
              log=lambda *a: None)
    skipped = {s["key"]: s["reason"] for s in m["skipped"]}
    assert set(skipped) == {"x/corrupt.jpg", "x/truncated.jpg", "x/empty.jpg", "x/one.png"}
    assert "truncated" in skipped["x/truncated.jpg"]
    assert "too small: 1x1" in skipped["x/one.png"]
    assert m["counts"] == {"inputs": 10, "records": 6, "skipped": 4, "records_without_boxes": 6,
                           "records_without_background": 6, "boxes_dropped": 0,
                           "records_with_boxes_dropped": 0, "gt_boxes_dropped": 0}
    assert m["conversions"]["CMYK converted to RGB"] == 1
    assert m["conversions"]["grayscale converted to RGB"] == 2
    assert m["conversions"]["alpha composited on grey"] == 1
    ds = open_dataset(str(out))
    recs = {ds[i]["key"]: ds[i] for i in range(len(ds))}
    assert max(recs["x/large.jpg"]["image"].shape[:2]) == 64
    assert abs(int(np.median(recs["x/alpha.png"]["image"])) - 128) <= 2
    g = recs["x/gray.png"]["image"].astype(int)
    assert np.abs(g[..., 0] - g[..., 1]).max() <= 2  # grey stays grey
    assert (recs["x/good.jpg"]["mask"] == 255).all()  # --masks none: full masks
    with pytest.raises(BuildError, match="corrupt.jpg"):
        build(str(tmp_path / "src"), str(tmp_path / "out2"), BuildOptions(masks="none"), workers=1,
              on_error="fail", log=lambda *a: None)
    assert not (tmp_path / "out2").exists()


def test_too_many_pixels_is_skipped(tmp_path):
    os.makedirs(tmp_path / "src")
    Image.new("RGB", (300, 200)).save(tmp_path / "src" / "big.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "src" / "ok.png")
    m = build(str(tmp_path / "src"), str(tmp_path / "out"), BuildOptions(masks="none", max_pixels=10_000),
              workers=1, log=lambda *a: None)
    assert [s["key"] for s in m["skipped"]] == ["big.png"] and "too large" in m["skipped"][0]["reason"]


def test_gt_mask_of_wrong_size_is_never_paired(tmp_path):
    os.makedirs(tmp_path / "src" / "a")
    cv2.imwrite(str(tmp_path / "src" / "a" / "1.png"), np.zeros((40, 50, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "src" / "a" / "1.mask.png"), np.zeros((50, 40), np.uint8))
    cv2.imwrite(str(tmp_path / "src" / "a" / "2.png"), np.zeros((40, 50, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "src" / "a" / "2.mask.png"), np.full((40, 50), 255, np.uint8))
    m = build(str(tmp_path / "src"), str(tmp_path / "out"), BuildOptions(masks="gt"), workers=1, log=lambda *a: None)
    assert len(m["skipped"]) == 1 and "refusing to pair" in m["skipped"][0]["reason"]
    r = open_dataset(str(tmp_path / "out"))[0]
    assert r["key"] == "a/2.png" and (r["mask"] == 255).all()
    assert r["n_boxes"] == 1 and r["bg_rect"].tolist() == [0, 0, 0, 0]  # full mask: no background


def test_interrupted_build_leaves_nothing_complete_and_resumes(folder, built, tmp_path, monkeypatch):
    out = tmp_path / "ds"
    opts = BuildOptions(masks="gt", max_res=96, mask_res=32, shard_size=8)
    from objloader.store import wds_writer

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(wds_writer, "write_shards", boom)
    with pytest.raises(KeyboardInterrupt):
        build(str(folder), str(out), opts, workers=1, log=lambda *a: None)
    assert not out.exists() and (tmp_path / "ds.partial").exists()
    assert not (tmp_path / "ds.partial" / "manifest.json").exists()
    with pytest.raises(DatasetError, match="interrupted build"):
        open_dataset(str(out))
    monkeypatch.undo()

    calls = []
    real = build_module.build_record
    monkeypatch.setattr(build_module, "build_record", lambda *a, **k: calls.append(1) or real(*a, **k))
    logs = []
    build(str(folder), str(out), opts, workers=1, log=logs.append)
    assert any("resuming" in line for line in logs)
    assert calls == []  # every record came from the staged chunks
    assert not (tmp_path / "ds.partial").exists()
    assert read_manifest(str(out))["records"] == read_manifest(str(built))["records"]
    # Different options: the stale partial output is discarded, not mixed in.
    os.makedirs(tmp_path / "ds2.partial")
    (tmp_path / "ds2.partial" / "build-state.json").write_text(json.dumps({"fingerprint": "other"}))
    build(str(folder), str(tmp_path / "ds2"), opts, workers=1, log=logs.append)
    assert any("starting over" in line for line in logs)


def test_existing_output_needs_overwrite(built, folder):
    with pytest.raises(BuildError, match="--overwrite"):
        build(str(folder), str(built), BuildOptions(), log=lambda *a: None)
