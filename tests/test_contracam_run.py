"""objloader-cam end to end: checkpoint -> ContraCAM + CRF -> mask store (resumable, keyed by
image hash) -> objloader-build --masks contracam, and the localisation evaluation."""

import json
import os

import cv2
import numpy as np
import pytest
import torch

from objloader.cam import masks as cam_masks
from objloader.ssl.localisation import (centre_prior, evaluate_localisation, mask_miou_sweep, max_box_acc,
                                   object_recall)
from objloader.cam.masks import CamError, MaskArchive, compute_masks, load_contracam
from objloader.cam.settings import CamSettings
from objloader.cli.cam import main as cam_main
from objloader.sources import open_source
from objloader.checkpoint import CHECKPOINT_FORMAT, load_encoder
from objloader.ssl.byol import BYOL
from objloader.ssl.moco import MoCo
from objloader.cam.masks import ContraCAMMasks
from objloader.store import BuildError, BuildOptions, build, open_dataset, read_manifest

N_IMAGES = 11  # + one corrupt file
SETTINGS = CamSettings(iterations=2, image_size=32, mask_res=16, batch_size=4, crf=True)


def _checkpoint(path, method="moco", seed=0):
    torch.manual_seed(seed)
    model = MoCo("resnet18", True, queue_size=16) if method == "moco" else BYOL("resnet18", True, hidden=64, dim=32)
    model.eval()
    torch.save({"format": CHECKPOINT_FORMAT, "method": method, "arch": "resnet18", "small_stem": True,
                "image_size": 16, "backbone": model.backbone.state_dict(), "model": model.state_dict()}, path)
    return model


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """An ImageFolder of object scenes with ground-truth masks, one corrupt image, a checkpoint."""
    root = tmp_path_factory.mktemp("cam")
    src = root / "src"
    rng = np.random.default_rng(3)
    for i in range(N_IMAGES):
        d = src / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        img = np.full((48, 56, 3), rng.integers(0, 255, 3), np.uint8)
        mask = np.zeros((48, 56), np.uint8)
        y, x = int(rng.integers(0, 24)), int(rng.integers(0, 28))
        img[y:y + 20, x:x + 24] = rng.integers(0, 255, 3)
        mask[y:y + 20, x:x + 24] = 255
        cv2.imwrite(str(d / f"{i:02d}.png"), img)
        cv2.imwrite(str(d / f"{i:02d}.mask.png"), mask)
    (src / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    ckpt = str(root / "checkpoint.pt")
    _checkpoint(ckpt)
    store = str(root / "masks")
    info = compute_masks(open_source(str(src)), store, ckpt, SETTINGS, workers=2, progress=False, log=lambda *a: None)
    return {"root": root, "src": str(src), "ckpt": ckpt, "store": store, "info": info}


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_load_encoder_rebuilds_the_projection_head(tmp_path, method):
    model = _checkpoint(str(tmp_path / "c.pt"), method)
    backbone, head, meta = load_encoder(str(tmp_path / "c.pt"))
    head.eval()
    x = torch.randn(3, 3, 16, 16)
    expected = (model.head if method == "moco" else model.projector)(model.backbone(x))
    assert meta["method"] == method
    assert torch.allclose(head(backbone.eval()(x)), expected, atol=1e-5)


def test_store_holds_every_image_and_reports_the_corrupt_one(world):
    store = MaskArchive(world["store"])
    entries = store.entries("")
    assert len(entries) == N_IMAGES + 1
    sha1, mask, reason = entries["a/broken.jpg"]
    assert mask is None and "decode" in reason
    good = [e for k, e in entries.items() if k != "a/broken.jpg"]
    assert all(m is not None and m.shape == (16, 16) and m.dtype == np.uint8 and r == "" for _, m, r in good)
    assert all(len(s) == 40 for s, _, _ in good)
    assert world["info"]["datasets"][""]["masked"] == N_IMAGES
    assert world["info"]["datasets"][""]["skipped"][0]["key"] == "a/broken.jpg"
    # Chunks are whole batches; the last absorbs the remainder (12 images / 4 = 3 chunks).
    assert world["info"]["datasets"][""]["chunks"] == 3


def test_store_masks_are_crf_refined_contracam_of_the_batch(world):
    """The stored mask of a chunk equals ContraCAM + CRF recomputed on that chunk's images."""
    store = MaskArchive(world["store"]).entries("")
    samples = open_source(world["src"])[0].samples[:4]  # chunk 0
    model, size, _ = load_contracam(world["ckpt"], SETTINGS)
    rgb = np.stack([cam_masks.prepare_rgb(cv2.imread(s.path)[:, :, ::-1], size) for s in samples])
    soft = cam_masks.refine_batch(rgb, cam_masks.explain_batch(model, rgb)[-1])
    expected = cam_masks.to_uint8(soft)
    got = np.stack([store[s.key][1] for s in samples])
    assert np.abs(got.astype(int) - expected).max() <= 1


def test_resume_after_interruption_equals_an_uninterrupted_run(world, monkeypatch, tmp_path):
    out = str(tmp_path / "masks")
    real_write = cam_masks._write_chunk
    calls = []

    def write_then_die(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the first chunk landed
        real_write(*args)

    monkeypatch.setattr(cam_masks, "_write_chunk", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        compute_masks(open_source(world["src"]), out, world["ckpt"], SETTINGS, workers=1, progress=False)
    monkeypatch.setattr(cam_masks, "_write_chunk", real_write)
    assert not os.path.exists(os.path.join(out, "masks.json"))
    with pytest.raises(CamError, match="interrupted"):
        MaskArchive(out)
    assert cam_main([world["src"], "--checkpoint", world["ckpt"], "--out", out, "--iterations", "2",
                     "--image-size", "32", "--mask-res", "16", "--batch-size", "4", "--workers", "1",
                     "--no-progress"]) == 0
    a, b = MaskArchive(world["store"]).entries(""), MaskArchive(out).entries("")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0] and a[k][2] == b[k][2]
        assert (a[k][1] is None and b[k][1] is None) or np.array_equal(a[k][1], b[k][1])


def test_a_different_run_is_refused_unless_overwrite(world, tmp_path):
    out = str(tmp_path / "m")
    compute_masks(open_source(world["src"]), out, world["ckpt"], SETTINGS, workers=1, progress=False)
    other = CamSettings(iterations=1, image_size=32, mask_res=16, batch_size=4, crf=False)
    with pytest.raises(CamError, match="different run"):
        compute_masks(open_source(world["src"]), out, world["ckpt"], other, workers=1, progress=False)
    info = compute_masks(open_source(world["src"]), out, world["ckpt"], other, workers=1, progress=False, overwrite=True)
    assert info["settings"]["crf"] is False


def test_build_with_contracam_masks_from_a_store_and_inline(world, tmp_path):
    opts = BuildOptions(masks="contracam", mask_res=16, max_res=64)
    out = str(tmp_path / "ds")
    build(world["src"], out, opts, workers=1, contracam=ContraCAMMasks(store=world["store"]), log=lambda *a: None)
    m = read_manifest(out)
    assert m["masks"] == "contracam" and m["contracam"]["checkpoint_sha256"] == world["info"]["checkpoint_sha256"]
    assert m["counts"]["records"] == N_IMAGES and m["skipped"][0]["key"] == "a/broken.jpg"
    assert "ContraCAM" in m["skipped"][0]["reason"] or "decode" in m["skipped"][0]["reason"]
    store = MaskArchive(world["store"]).entries("")
    ds = open_dataset(out)
    for i in range(len(ds)):
        rec = ds[i]
        assert rec["sha1"] == store[rec["key"]][0]
        # Stored mask: the store's mask resized to the image (where boxes and bg_rect are found)
        # and back to M.
        h, w = rec["image"].shape[:2]
        at_image = cv2.resize(store[rec["key"]][1], (w, h), interpolation=cv2.INTER_LINEAR)
        assert np.array_equal(rec["mask"], cv2.resize(at_image, (16, 16), interpolation=cv2.INTER_AREA))
        assert "gt_mask" in rec  # ground truth still rides along, for evaluation
    # Inline: the same masks computed during the build.
    out2 = str(tmp_path / "ds2")
    build(world["src"], out2, opts, workers=1, log=lambda *a: None,
          contracam=ContraCAMMasks(checkpoint=world["ckpt"], settings=SETTINGS))
    assert read_manifest(out2)["records"]["digests"] == m["records"]["digests"]
    assert not os.path.exists(os.path.join(out2, ".contracam"))


def test_build_refuses_a_mask_of_another_image(world, tmp_path):
    src = tmp_path / "src"
    import shutil

    shutil.copytree(world["src"], src)
    store = str(tmp_path / "masks")
    compute_masks(open_source(str(src)), store, world["ckpt"], SETTINGS, workers=1, progress=False)
    # The image changes after ContraCAM ran: same key, other content.
    img = cv2.imread(str(src / "b" / "00.png"))
    cv2.imwrite(str(src / "b" / "00.png"), 255 - img)
    opts = BuildOptions(masks="contracam", mask_res=16, max_res=64)
    with pytest.raises(BuildError, match="not the one ContraCAM explained"):
        build(str(src), str(tmp_path / "ds"), opts, workers=1, contracam=ContraCAMMasks(store=store),
              log=lambda *a: None)
    # A new image the store has never seen.
    shutil.copy(src / "b" / "02.png", src / "b" / "99.png")
    cv2.imwrite(str(src / "b" / "00.png"), img)
    with pytest.raises(BuildError, match="no mask for this key"):
        build(str(src), str(tmp_path / "ds"), opts, workers=1, contracam=ContraCAMMasks(store=store),
              log=lambda *a: None, overwrite=True)
    with pytest.raises(BuildError, match="needs either --checkpoint"):
        build(str(src), str(tmp_path / "ds"), opts, workers=1, log=lambda *a: None, overwrite=True)


def test_metrics_on_known_masks():
    gt = np.zeros((2, 20, 20), bool)
    gt[0, 5:15, 5:15] = True
    gt[1, 0:10, 0:20] = True
    perfect = gt.astype(np.float32)
    assert np.allclose(mask_miou_sweep(perfect, gt), 1.0)
    half = perfect.copy()
    half[0, 5:15, 10:15] = 0.3  # half the first object is weak: lost at thresholds above 0.3
    sweep = mask_miou_sweep(half, gt, thresholds=[0.2, 0.5])
    assert np.allclose(sweep, [1.0, 0.75])
    boxes = [np.array([[0.25, 0.25, 0.75, 0.75]]), np.array([[0, 0, 1, 0.5]])]
    assert np.allclose(max_box_acc(perfect, boxes), 1.0)
    acc = max_box_acc(half, boxes, thresholds=[0.5], levels=[0.3, 0.7])
    assert np.allclose(acc, [[1.0, 0.5]])  # IoU 0.5 of the halved box: a hit at 0.3, not at 0.7
    prior = centre_prior(1, 20)[0]
    assert prior.argmax() in (9 * 20 + 9, 9 * 20 + 10, 10 * 20 + 9, 10 * 20 + 10) and prior.max() <= 1


def test_object_recall_counts_instances_not_images():
    # One scene, two objects (left and right quarter); the mask finds the left one strongly and the
    # right one weakly (0.4): at tau 0.3 both are found, at tau 0.5 one of the two.
    pred = np.zeros((1, 20, 20), np.float32)
    pred[0, 5:15, 0:5] = 0.9
    pred[0, 5:15, 15:20] = 0.4
    gt = [np.array([[0.0, 0.25, 0.25, 0.75], [0.75, 0.25, 1.0, 0.75]])]
    assert np.allclose(object_recall(pred, gt, thresholds=[0.3, 0.5]), [1.0, 0.5])
    # MaxBoxAcc sees one hit per image either way: it cannot tell the two apart
    assert np.allclose(max_box_acc(pred, gt, thresholds=[0.3, 0.5], levels=[0.5]), [[1.0], [1.0]])
    # a box that covers both objects matches neither at IoU 0.5
    both = np.zeros((1, 20, 20), np.float32)
    both[0, 5:15, :] = 0.9
    assert np.allclose(object_recall(both, gt, thresholds=[0.5]), [0.0])


def test_eval_writes_the_table_and_grid(world, tmp_path):
    built = str(tmp_path / "gt")
    build(world["src"], built, BuildOptions(masks="gt", mask_res=16, max_res=64), workers=1, log=lambda *a: None)
    out = str(tmp_path / "eval")
    report = evaluate_localisation(world["ckpt"], built, out, SETTINGS, workers=1, progress=False,
                                   log=lambda *a: None)
    (name, res), = report["sets"].items()
    assert res["records"] == N_IMAGES
    for v in ("centre prior", "no ReLU", "single-step", "iterative", "iterative + CRF"):
        assert 0 <= res[v]["miou"] <= 1 and 0 <= res[v]["maxboxaccv2"] <= 1 and 0 <= res[v]["object_recall"] <= 1
        assert len(res[v]["miou_sweep"]) == 19
    md = open(os.path.join(out, "contracam_eval.md")).read()
    assert "iterative + CRF" in md and "MaxBoxAccV2" in md
    assert json.load(open(os.path.join(out, "contracam_eval.json")))["sets"][name]["records"] == N_IMAGES
    assert os.path.getsize(os.path.join(out, "contracam_eval.png")) > 1000


def test_two_ranks_under_torchrun_write_the_same_store(world, tmp_path):
    import subprocess
    import sys

    out = str(tmp_path / "masks2")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29613",
           "-m", "objloader.cli.cam", world["src"], "--checkpoint", world["ckpt"], "--out", out,
           "--iterations", "2", "--image-size", "32", "--mask-res", "16", "--batch-size", "4", "--workers", "1",
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.load(open(os.path.join(out, "masks.json")))
    assert info["ranks"] == 2
    a, b = MaskArchive(world["store"]).entries(""), MaskArchive(out).entries("")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == b[k][0] and ((a[k][1] is None and b[k][1] is None) or np.array_equal(a[k][1], b[k][1]))


def _damaged(world, tmp_path, how):
    ckpt = torch.load(world["ckpt"], map_location="cpu", weights_only=True)
    if how == "nan":  # one flipped exponent is enough to make a weight NaN
        ckpt["backbone"]["layer2.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    else:  # zero weights everywhere: finite, but no channel can have a positive weight
        for part in ("backbone", "model"):
            ckpt[part] = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in ckpt[part].items()}
    path = str(tmp_path / f"{how}.pt")
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("how, message", [("nan", "damaged: .* NaN or inf"), ("zeros", "every ContraCAM mask")])
def test_damaged_checkpoint_stops_the_run_instead_of_writing_empty_masks(world, tmp_path, how, message):
    ckpt = _damaged(world, tmp_path, how)
    with pytest.raises(CamError, match=message):
        compute_masks(open_source(world["src"]), str(tmp_path / "masks"), ckpt, SETTINGS, workers=1, progress=False,
                      log=lambda *a: None)
    assert not os.path.exists(tmp_path / "masks" / "masks.json")  # nothing that looks complete
    # and objloader-build --masks contracam reports it in one line (rc 2), building nothing
    from objloader.cli.build import main as build_main

    assert build_main([world["src"], str(tmp_path / "ds"), "--masks", "contracam", "--checkpoint", ckpt,
                       "--cam-iterations", "2", "--cam-image-size", "32", "--mask-res", "16",
                       "--cam-batch-size", "4", "--workers", "1"]) == 2
    assert not os.path.exists(tmp_path / "ds" / "manifest.json")
