"""The Background Challenge as Xiao et al. 2021 publish it (<root>/<variant>/val/<class>/*.JPEG,
IN-9L training data in <root>/original/train/<class>/): objloader-build makes one dataset per split
and variant, with the same class ids everywhere, and objloader-linear reports it like the demo."""

import json
import os

import cv2
import numpy as np
import pytest
import torch

from objloader.checkpoint import CHECKPOINT_FORMAT, build_backbone
from objloader.cli import build as build_cli
from objloader.cli import linear as linear_cli
from objloader.sources import SourceError, open_source
from objloader.sources.bgchallenge import VARIANTS
from objloader.ssl.bgchallenge import bgchallenge_report, find_eval_datasets
from objloader.store.reader import open_dataset

# Class folders as the release names them (one with a space, as "02_wheeled vehicle" is).
CLASSES = ["00_dog", "01_bird", "02_wheeled vehicle"]
PER_VAL, PER_TRAIN = 4, 6


def _write_images(folder, n, cls, rng):
    """Tiny JPEGs whose colour depends on the class, so a random encoder separates classes."""
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        img = rng.integers(0, 80, (24, 32, 3)).astype(np.uint8)
        img[..., cls] += 150
        # Same file names in every variant, as the release has: a key's label can be compared.
        assert cv2.imwrite(os.path.join(folder, f"n{cls:02d}_{i:04d}.JPEG"), img)


def _bg_root(root, variants=VARIANTS, train=True, seed=0):
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        for v in variants:
            _write_images(os.path.join(root, v, "val", name), PER_VAL, c, rng)
        if train:
            _write_images(os.path.join(root, "original", "train", name), PER_TRAIN, c, rng)
        # The release's foreground masks (.npy) sit beside the variants; they are not a variant.
        os.makedirs(os.path.join(root, "fg_mask", "val", name), exist_ok=True)
        np.save(os.path.join(root, "fg_mask", "val", name, f"n{c:02d}_0000.npy"), np.ones((24, 32), bool))
    return str(root)


EXPECTED = ["train", "val"] + [f"bgchallenge/{v}" for v in VARIANTS]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    src = _bg_root(tmp_path_factory.mktemp("bg") / "bg_challenge")
    out = str(tmp_path_factory.mktemp("built") / "out")
    rc = build_cli.main([src, out, "--masks", "none", "--formats", "wds", "--workers", "1", "--max-res", "32"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    backbone = build_backbone("resnet18", small_stem=False)
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "method": "moco", "arch": "resnet18", "small_stem": False,
                "image_size": 32, "backbone": backbone.state_dict()}, path)
    return str(path)


def test_variant_names_match_the_demo():
    # The demo's bgchallenge/<variant> folders and the release's must carry the same names, or
    # reports of the two would not line up.
    from objloader.sources.demo import BGCHALLENGE_VARIANTS

    assert tuple(VARIANTS) == tuple(BGCHALLENGE_VARIANTS)


def test_layout_is_read_as_one_dataset_per_split_and_variant(tmp_path):
    specs = open_source(_bg_root(tmp_path / "bg"))
    assert [s.name for s in specs] == EXPECTED
    by_name = {s.name: s for s in specs}
    assert by_name["train"].path.endswith(os.path.join("original", "train"))
    assert by_name["bgchallenge/mixed_rand"].path.endswith(os.path.join("mixed_rand", "val"))
    for s in specs:
        assert s.classes == CLASSES, s.name
        assert len(s.samples) == len(CLASSES) * (PER_TRAIN if s.name == "train" else PER_VAL)
        # fg_mask/*.npy is neither an image nor a variant; no image has a mask.
        assert not any(x.has_gt_mask for x in s.samples)


def test_train_is_optional(tmp_path):
    specs = open_source(_bg_root(tmp_path / "bg", train=False))
    assert [s.name for s in specs] == EXPECTED[1:]


def test_built_collection(built):
    with open(os.path.join(built, "manifest.json")) as f:
        top = json.load(f)
    assert top["kind"] == "collection"
    assert list(top["datasets"]) == EXPECTED
    for name, d in top["datasets"].items():
        assert d["skipped"] == 0
        assert d["records"] == len(CLASSES) * (PER_TRAIN if name == "train" else PER_VAL), name
    # Every variant's records carry the class id of their folder, the same id in every variant.
    labels_by_key = None
    for name in EXPECTED[1:]:
        with open(os.path.join(built, name, "manifest.json")) as f:
            m = json.load(f)
        assert m["classes"] == CLASSES and m["masks"].startswith("none")
        keys, labels = m["records"]["keys"], m["records"]["labels"]
        assert labels == [CLASSES.index(k.split("/")[0]) for k in keys], name
        if labels_by_key is None:
            labels_by_key = dict(zip(keys, labels))
        assert dict(zip(keys, labels)) == labels_by_key, name
    # The stored records agree with the manifest (read through the shards).
    ds = open_dataset(os.path.join(built, "bgchallenge", "mixed_next"))
    assert sorted(int(ds[i]["label"]) for i in range(len(ds))) == sorted(labels_by_key.values())


def test_find_eval_datasets_and_report(built, checkpoint, tmp_path):
    found = find_eval_datasets(built)
    assert found == {n: os.path.join(built, n) for n in EXPECTED}
    report = bgchallenge_report(checkpoint, built, str(tmp_path), batch_size=16, workers=0, log=lambda m: None)
    acc = report["accuracy"]
    assert set(acc) == {"val", *VARIANTS}
    assert all(a["records"] == len(CLASSES) * PER_VAL for a in acc.values())
    assert report["train_records"] == len(CLASSES) * PER_TRAIN and report["classes"] == CLASSES
    assert report["bg_gap"] == pytest.approx(acc["mixed_same"]["top1"] - acc["mixed_rand"]["top1"])
    # val and bgchallenge/original are the same images: one probe must score them the same.
    assert acc["val"]["top1"] == acc["original"]["top1"]
    # The class colour survives a random encoder: above chance (1/3) on the originals.
    assert acc["val"]["top1"] > 0.6
    assert "fg_probe_mixed_rand" in report["diagnostic"]


def test_linear_cli_on_built_root(built, checkpoint, tmp_path, capsys):
    rc = linear_cli.main(["--checkpoint", checkpoint, "--data", built, "--out", str(tmp_path), "--workers", "0",
                          "--device", "cpu", "--batch-size", "16"])
    assert rc == 0
    out = capsys.readouterr().out
    for v in VARIANTS:
        assert f"| {v} |" in out
    assert "BG-gap = acc(mixed_same) - acc(mixed_rand) = " in out and "n/a" not in out
    assert json.loads((tmp_path / "report.json").read_text())["data"] == os.path.abspath(built)


def test_variant_with_other_classes_is_refused(tmp_path):
    root = _bg_root(tmp_path / "bg")
    os.rename(os.path.join(root, "only_fg", "val", "01_bird"), os.path.join(root, "only_fg", "val", "01_birds"))
    with pytest.raises(SourceError, match=r"only_fg.*classes differ.*missing \['01_bird'\].*extra \['01_birds'\]"):
        open_source(root)
    out = str(tmp_path / "out")
    assert build_cli.main([root, out, "--masks", "none", "--formats", "wds", "--workers", "1"]) == 2
    assert not os.path.exists(out)


def test_train_with_other_classes_is_refused(tmp_path):
    root = _bg_root(tmp_path / "bg")
    _write_images(os.path.join(root, "original", "train", "03_reptile"), 2, 0, np.random.default_rng(1))
    with pytest.raises(SourceError, match=r"original/train.*extra \['03_reptile'\]"):
        open_source(root)


def test_image_outside_class_folders_is_refused(tmp_path):
    root = _bg_root(tmp_path / "bg", variants=("original", "mixed_rand"), train=False)
    _write_images(os.path.join(root, "mixed_rand", "val"), 1, 0, np.random.default_rng(1))
    with pytest.raises(SourceError, match="outside the class folders"):
        open_source(root)


def test_variant_without_val_is_refused(tmp_path):
    root = _bg_root(tmp_path / "bg", variants=("original", "mixed_same", "mixed_rand"), train=False)
    os.rename(os.path.join(root, "mixed_same", "val"), os.path.join(root, "mixed_same", "test"))
    with pytest.raises(SourceError, match=r"mixed_same'? has no val/ folder"):
        open_source(root)


def test_root_with_only_original_stays_an_imagefolder(tmp_path):
    # IN-9L alone (original/train, original/val) is no challenge root: read as an ImageFolder,
    # as before, with one class "original".
    root = str(tmp_path / "in9l")
    _write_images(os.path.join(root, "original", "val", CLASSES[0]), 2, 0, np.random.default_rng(0))
    (spec,) = open_source(root)
    assert spec.name == "" and spec.classes == ["original"]
