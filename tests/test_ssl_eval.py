"""Evaluation: linear probe (L-BFGS + wd sweep), frozen-feature extraction from built datasets,
and the Background-Challenge report on a tiny demo-like root with a random encoder."""

import importlib.util
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from objloader.checkpoint import CHECKPOINT_FORMAT, CheckpointError, build_backbone
from objloader.ssl.bgchallenge import bgchallenge_report
from objloader.ssl.features import extract_features
from objloader.ssl.linear import WD_GRID, linear_probe, stratified_split
from objloader.store import BuildOptions, build
from objloader.store.reader import DatasetError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("a", "b", "c")


def _blobs(n_per_class=60, d=16, classes=3, sep=4.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d)) * sep
    x = np.concatenate([centres[c] + rng.normal(size=(n_per_class, d)) for c in range(classes)])
    y = np.repeat(np.arange(classes), n_per_class)
    return x.astype(np.float32), y.astype(np.int64)


def test_probe_separable_features():
    x, y = _blobs(seed=0)
    xt, yt = _blobs(seed=0, n_per_class=30)  # same centres, fresh noise below
    rng = np.random.default_rng(1)
    xt = xt + rng.normal(size=xt.shape).astype(np.float32) * 0.1
    probe = linear_probe(x, y, xt, yt)
    assert probe.test_top1 >= 0.98
    assert probe.accuracy(x, y) >= 0.98
    assert probe.predict(xt).dtype == np.int64 and probe.predict(xt).shape == yt.shape


def test_probe_random_labels_is_chance():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 32)).astype(np.float32)
    y = rng.integers(0, 4, 400)
    xt = rng.normal(size=(400, 32)).astype(np.float32)
    yt = rng.integers(0, 4, 400)
    probe = linear_probe(x, y, xt, yt)
    assert abs(probe.test_top1 - 0.25) < 0.1


def test_wd_sweep_from_grid_and_deterministic():
    x, y = _blobs(n_per_class=40, d=64, sep=0.5, seed=3)
    a = linear_probe(x, y, x, y, seed=5)
    b = linear_probe(x, y, x, y, seed=5)
    assert a.wd in WD_GRID and set(a.val_acc) == set(WD_GRID)
    assert a.wd == b.wd and a.val_acc == b.val_acc
    np.testing.assert_array_equal(a.weight, b.weight)
    grid = (1e-4, 1e-2)
    c = linear_probe(x, y, wd_grid=grid)
    assert c.wd in grid and c.test_top1 is None


def test_stratified_split():
    y = np.repeat(np.arange(3), [10, 20, 5])
    tr, va = stratified_split(y, 0.2, seed=0)
    assert len(np.intersect1d(tr, va)) == 0 and len(tr) + len(va) == len(y)
    assert [int((y[va] == c).sum()) for c in range(3)] == [2, 4, 1]
    tr2, va2 = stratified_split(y, 0.2, seed=0)
    np.testing.assert_array_equal(va, va2)
    assert not np.array_equal(va, stratified_split(y, 0.2, seed=1)[1])


def test_probe_rejects_unlabelled():
    x, y = _blobs(n_per_class=10)
    y[3] = -1
    with pytest.raises(ValueError, match="negative"):
        linear_probe(x, y)


# ---- built datasets ---------------------------------------------------------------------------


def _imagefolder(root, n_per_class, seed, classes=CLASSES):
    """Random images whose mean colour depends on the class, so even a random encoder separates them."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name))
        for i in range(n_per_class):
            h, w = int(rng.integers(40, 64)), int(rng.integers(40, 64))
            img = rng.integers(0, 80, (h, w, 3)).astype(np.uint8)
            img[..., c] += 150
            cv2.imwrite(os.path.join(root, name, f"{i:03d}.png"), img)
    return str(root)


def _build(src, out):
    build(src, out, BuildOptions(masks="none", max_res=64), formats=("wds",), workers=1, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    src = _imagefolder(tmp_path_factory.mktemp("tiny_src") / "src", 5, seed=0)
    return _build(src, str(tmp_path_factory.mktemp("tiny") / "ds"))


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone("resnet18", small_stem=False)


def test_extract_features_shapes_and_determinism(tiny, backbone):
    f1, y1 = extract_features(backbone, tiny, 32, batch_size=4, workers=0, progress=False)
    assert f1.shape == (15, 512) and f1.dtype == np.float32
    assert y1.dtype == np.int64 and sorted(np.bincount(y1).tolist()) == [5, 5, 5]
    f2, y2 = extract_features(backbone, tiny, 32, batch_size=7, workers=0, progress=False)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(f1, f2, rtol=1e-4, atol=1e-5)  # batch size must not matter
    f3, y3 = extract_features(backbone, tiny, 32, batch_size=4, workers=2, progress=False)
    np.testing.assert_array_equal(y1, y3)
    np.testing.assert_allclose(f1, f3, rtol=1e-4, atol=1e-5)


def test_extract_features_rejects_unlabelled(tmp_path, backbone):
    src = tmp_path / "flat"
    os.makedirs(src)
    for i in range(3):
        cv2.imwrite(str(src / f"{i}.png"), np.full((32, 32, 3), 60 * i, np.uint8))
    out = _build(str(src), str(tmp_path / "ds"))
    with pytest.raises(DatasetError, match="unlabelled"):
        extract_features(backbone, out, 32, workers=0, progress=False)
    f, y = extract_features(backbone, out, 32, workers=0, progress=False, allow_unlabelled=True)
    assert f.shape == (3, 512) and (y == -1).all()


# ---- Background-Challenge report --------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    src = tmp_path_factory.mktemp("demo_src")
    root = tmp_path_factory.mktemp("demo_built")
    for seed, (name, n) in enumerate([("train", 8), ("val", 4), ("bgchallenge/mixed_same", 4),
                                      ("bgchallenge/mixed_rand", 4), ("bgchallenge/only_fg", 3)]):
        folder = _imagefolder(src / name, n, seed=10 + seed)
        _build(folder, str(root / name))
    return str(root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, backbone):
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "method": "moco", "arch": "resnet18", "small_stem": False,
                "image_size": 32, "backbone": backbone.state_dict()}, path)
    return str(path)


def test_bgchallenge_report(demo_root, checkpoint, tmp_path):
    report = bgchallenge_report(checkpoint, demo_root, str(tmp_path), batch_size=16, workers=0, log=lambda m: None)
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert set(on_disk["accuracy"]) == {"val", "mixed_same", "mixed_rand", "only_fg"}
    acc = on_disk["accuracy"]
    assert on_disk["bg_gap"] == pytest.approx(acc["mixed_same"]["top1"] - acc["mixed_rand"]["top1"])
    assert acc["mixed_same"]["records"] == 12 and on_disk["train_records"] == 24
    assert on_disk["probe"]["wd"] in WD_GRID
    assert on_disk["checkpoint_meta"]["method"] == "moco" and on_disk["image_size"] == 32
    assert report["accuracy"] == acc
    # The diagnostic probe is fitted on half of mixed_rand and scored on the other half.
    assert 0.0 <= on_disk["diagnostic"]["fg_probe_mixed_rand"] <= 1.0
    md = (tmp_path / "report.md").read_text()
    for name in ("val", "mixed_same", "mixed_rand", "only_fg", "BG-gap", "Diagnostic"):
        assert name in md
    # The class colour survives a random encoder: the probe must do better than chance (1/3).
    assert acc["val"]["top1"] > 0.6


def test_cli_writes_report_next_to_checkpoint(demo_root, checkpoint, tmp_path):
    import shutil
    ckpt = tmp_path / "ckpt.pt"
    shutil.copy(checkpoint, ckpt)
    r = subprocess.run([sys.executable, os.path.join(REPO, "train", "linear.py"), "--checkpoint", str(ckpt),
                        "--data", demo_root, "--workers", "0", "--device", "cpu"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| mixed_rand |" in r.stdout and "BG-gap" in r.stdout
    assert (tmp_path / "report.json").is_file() and (tmp_path / "report.md").is_file()


def _cli_main():
    spec = importlib.util.spec_from_file_location("train_linear", os.path.join(REPO, "train", "linear.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.mark.parametrize("problem", ["missing", "corrupt", "no_data"])
def test_cli_clear_errors(problem, demo_root, checkpoint, tmp_path, capsys):
    ckpt, data = checkpoint, demo_root
    if problem == "missing":
        ckpt = str(tmp_path / "nope.pt")
    elif problem == "corrupt":
        ckpt = str(tmp_path / "bad.pt")
        with open(ckpt, "wb") as f:
            f.write(b"not a checkpoint")
    else:
        data = str(tmp_path / "nodata")
    rc = _cli_main()(["--checkpoint", ckpt, "--data", data, "--out", str(tmp_path), "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error:") and (ckpt if problem != "no_data" else data) in err
    assert not (tmp_path / "report.json").exists()


def test_report_errors_in_library(demo_root, tmp_path, checkpoint):
    with pytest.raises(CheckpointError):
        bgchallenge_report(str(tmp_path / "x.pt"), demo_root, str(tmp_path), workers=0)
    with pytest.raises(DatasetError, match="val"):
        os.makedirs(tmp_path / "only_train")
        os.symlink(os.path.join(demo_root, "train"), tmp_path / "only_train" / "train")
        bgchallenge_report(checkpoint, str(tmp_path / "only_train"), str(tmp_path), workers=0)


def test_find_datasets_in_collection(demo_root, tmp_path):
    """A built demo folder lists its datasets in a collection manifest; `multi` is not evaluated."""
    from objloader.ssl.bgchallenge import find_eval_datasets
    names = ["train", "val", "multi", "bgchallenge/mixed_rand"]
    os.makedirs(tmp_path / "bgchallenge")
    for n in ("train", "val", "bgchallenge/mixed_rand"):
        os.symlink(os.path.join(demo_root, n), tmp_path / n)
    (tmp_path / "manifest.json").write_text(json.dumps({"kind": "collection", "datasets": {n: {} for n in names}}))
    found = find_eval_datasets(str(tmp_path))
    assert list(found) == ["train", "val", "bgchallenge/mixed_rand"]
