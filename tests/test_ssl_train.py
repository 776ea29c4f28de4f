"""MoCo v2 / BYOL trainers: one step on every engine, exact resume, 2-process DDP under torchrun,
checkpoint errors. A tiny built dataset (16 records, 32 px views, batch 4, ResNet-18) keeps it fast."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import cv2
import numpy as np
import pytest
import torch

from objloader.checkpoint import CheckpointError, load_backbone, load_encoder
from objloader.ssl.moco import MoCo, queue_size_for
from objloader.ssl.trainer import TrainConfig, _build_model, train
from objloader.store import BuildOptions, build

N_RECORDS = 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """16 scenes (a rectangle object on a flat background, exact masks) in two classes, built."""
    src = tmp_path_factory.mktemp("ssl_src")
    rng = np.random.default_rng(3)
    for i in range(N_RECORDS):
        d = src / ("a" if i % 2 else "b")
        d.mkdir(exist_ok=True)
        h, w = int(rng.integers(64, 96)), int(rng.integers(64, 96))
        img = np.empty((h, w, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3)
        mask = np.zeros((h, w), np.uint8)
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        img[y0:y0 + h // 3, x0:x0 + w // 3] = rng.integers(0, 256, 3)
        mask[y0:y0 + h // 3, x0:x0 + w // 3] = 255
        cv2.imwrite(str(d / f"{i:02d}.png"), img)
        cv2.imwrite(str(d / f"{i:02d}.mask.png"), mask)
    out = tmp_path_factory.mktemp("ssl_built") / "ds"
    build(str(src), str(out), BuildOptions(masks="gt", max_res=96, mask_res=32, shard_size=5),
          workers=1, log=lambda *a: None)
    return str(out)


def _cfg(data, out, **kw):
    args = dict(method="moco", loader="torch", data=data, image_size=32, batch_size=4, epochs=1, workers=0,
                out=str(out), progress=False, save_every=0, log_every=1, device="cpu", oa_crop=True, bg_mixup=0.4)
    args.update(kw)
    return TrainConfig(**args)


def _initial_state(cfg):
    torch.manual_seed(cfg.seed)  # the trainer seeds the same way before building its model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the queue scaling warning
        return {k: v.clone() for k, v in _build_model(cfg, N_RECORDS).state_dict().items()}


@pytest.mark.filterwarnings("ignore:MoCo queue")
@pytest.mark.parametrize("engine", ["torch", "ffcv", "dali"])
@pytest.mark.parametrize("method", ["moco", "byol"])
def test_one_step_changes_parameters(tiny, tmp_path, method, engine):
    cfg = _cfg(tiny, tmp_path, method=method, loader=engine, max_steps=1, workers=0 if engine == "torch" else 1)
    before = _initial_state(cfg)
    res = train(cfg)
    assert res["step"] == 1 and np.isfinite(res["loss"])
    after = res["model"].state_dict()
    trainable = {n for n, p in res["model"].named_parameters() if p.requires_grad}
    assert all(not torch.equal(before[n], after[n]) for n in trainable if n.endswith("weight")), "some weights did not move"
    # the checkpoint follows the backbone contract and loads with weights_only=True
    net, meta = load_backbone(res["checkpoint"])
    assert meta["method"] == method and meta["arch"] == "resnet18" and meta["step"] == 1
    assert all(torch.equal(v, after["backbone." + k]) for k, v in net.state_dict().items())
    lines = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert lines[-1]["step"] == 1 and set(lines[-1]) >= {"step", "epoch", "loss", "lr", "img_per_s", "data_wait"}
    assert (tmp_path / "loss.png").stat().st_size > 0


@pytest.mark.filterwarnings("ignore:MoCo queue")
@pytest.mark.parametrize("method", ["moco", "byol"])
def test_resume_matches_uninterrupted_run(tiny, tmp_path, method):
    """4 steps in one go == 2 steps, checkpoint, resume for 2 more (queue, momentum net, optimizer, RNG)."""
    full = train(_cfg(tiny, tmp_path / "full", method=method))
    assert full["step"] == 4
    half = train(_cfg(tiny, tmp_path / "split", method=method, max_steps=2))
    assert half["step"] == 2
    resumed = train(_cfg(tiny, tmp_path / "split", method=method, resume=""))
    assert resumed["step"] == 4
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"differ after resume: {diff[:5]}"
    steps = [json.loads(ln)["step"] for ln in open(tmp_path / "split" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


@pytest.mark.filterwarnings("ignore:MoCo queue")
def test_tensorboard_events_are_readable(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(tiny, tmp_path, channels_last=True))  # 4 steps, a scalar each (log_every 1)
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"train/loss", "train/lr", "train/img_per_s", "train/data_wait"}
    loss = events.Scalars("train/loss")
    lines = [json.loads(ln) for ln in open(tmp_path / "metrics.jsonl")]
    assert [e.step for e in loss] == [ln["step"] for ln in lines] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([ln["loss"] for ln in lines], rel=1e-6)


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tiny, tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="corrupt or unreadable") as e:
        train(_cfg(tiny, tmp_path, method="byol", resume=""))
    assert str(path) in str(e.value)
    # a MoCo checkpoint given to BYOL: named, with the mismatch spelled out
    other = tmp_path / "moco.pt"
    from objloader.checkpoint import CHECKPOINT_FORMAT

    torch.save({"format": CHECKPOINT_FORMAT, "method": "moco", "arch": "resnet18", "small_stem": False,
                "image_size": 32, "backbone": {}, "model": {}, "optimizer": {}, "step": 0, "epoch": 0,
                "config": {}, "rng": {}}, other)
    with pytest.raises(CheckpointError, match="method='moco'") as e:
        train(_cfg(tiny, tmp_path, method="byol", resume=str(other)))
    assert str(other) in str(e.value)


@pytest.mark.filterwarnings("ignore:MoCo queue")
@pytest.mark.parametrize("method", ["moco", "byol"])
def test_width_is_trained_saved_and_checked_on_resume(tiny, tmp_path, method):
    """--width 32: a step trains, the checkpoint carries the width, every loader rebuilds it, and
    resuming with another width is refused."""
    res = train(_cfg(tiny, tmp_path, method=method, width=32, max_steps=1))
    assert res["step"] == 1 and np.isfinite(res["loss"])
    assert torch.load(res["checkpoint"], weights_only=True)["width"] == 32
    net, meta = load_backbone(res["checkpoint"])
    assert meta["width"] == 32 and net.conv1.out_channels == 32
    assert all(torch.equal(v, res["model"].state_dict()["backbone." + k]) for k, v in net.state_dict().items())
    assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    backbone, head, meta = load_encoder(res["checkpoint"])
    assert meta["width"] == 32 and head[0].in_features == 256
    with pytest.raises(CheckpointError, match="width=32"):
        train(_cfg(tiny, tmp_path, method=method, resume=""))  # width 64
    with pytest.raises(ValueError, match="width must be >= 1"):
        _cfg(tiny, tmp_path, width=0)


def test_cli_flags_map_onto_the_config():
    from objloader.cli.train import build_parser

    moco = build_parser("moco")
    assert vars(moco.parse_args([]))["shuffle_bn"] is True and vars(moco.parse_args([]))["width"] == 64
    args = vars(moco.parse_args(["--no-shuffle-bn", "--width", "32"]))
    assert args["shuffle_bn"] is False and args["width"] == 32
    cfg = TrainConfig(method="moco", **{k: v for k, v in args.items() if k != "no_progress"})
    assert cfg.shuffle_bn is False and cfg.width == 32
    byol = build_parser("byol")
    assert "shuffle_bn" not in vars(byol.parse_args([])) and vars(byol.parse_args(["--width", "16"]))["width"] == 16
    with pytest.raises(SystemExit):
        byol.parse_args(["--no-shuffle-bn"])


def test_queue_scales_down_for_small_datasets():
    with pytest.warns(UserWarning, match="queue of 4096"):
        assert queue_size_for(9000, 65536) == 4096
    assert queue_size_for(100_000, 65536) == 65536
    m = MoCo(queue_size=8)
    keys = torch.nn.functional.normalize(torch.randn(10, 128), dim=1)
    m._enqueue(keys[:5])
    m._enqueue(keys[5:])  # wraps around: rows 5, 6, 7, 0, 1
    assert int(m.queue_ptr) == 2
    assert torch.equal(m.queue[[5, 6, 7, 0, 1]], keys[5:]) and torch.equal(m.queue[2:5], keys[2:5])


_DDP_SCRIPT = """
import json, os, sys, torch
from objloader.ssl.trainer import TrainConfig, train

rank = int(os.environ["RANK"])
out = sys.argv[1]
seen = []
engine = sys.argv[4] if len(sys.argv) > 4 else "torch"
cfg = TrainConfig(method=sys.argv[3], loader=engine, data=sys.argv[2], image_size=32,
                  batch_size=int(sys.argv[5]) if len(sys.argv) > 5 else 4, epochs=1, workers=0 if engine == "torch" else 1,
                  out=os.path.join(out, "run"), progress=False, save_every=0, device="cpu", oa_crop=True, bg_mixup=0.4,
                  knn_every=1 if os.environ.get("KNN_VAL") else 0, knn_val=os.environ.get("KNN_VAL"), knn_bank=8,
                  bg_negatives=bool(os.environ.get("BG_NEG")),
                  dist_timeout=90)  # a rank stuck in a collective ends the run with its line, inside the test's timeout
res = train(cfg, on_batch=lambda step, b: seen.extend(b.index.tolist()))
torch.save(res["model"].state_dict(), os.path.join(out, f"state{rank}.pt"))
with open(os.path.join(out, f"seen{rank}.json"), "w") as f:
    json.dump({"seen": seen, "step": res["step"]}, f)
"""


@pytest.mark.filterwarnings("ignore:MoCo queue")
@pytest.mark.parametrize("method", ["moco", "byol"])
def test_ddp_two_processes_gloo(tiny, tmp_path, method):
    """torchrun --nproc_per_node 2 on CPU: disjoint, complete shards; identical parameters after steps."""
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    # the kNN monitor and (MoCo) background negatives under DDP too
    env = dict(os.environ, OMP_NUM_THREADS="1", KNN_VAL=tiny, BG_NEG="1" if method == "moco" else "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path), tiny, method]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = [json.load(open(tmp_path / f"seen{r}.json")) for r in (0, 1)]
    assert seen[0]["step"] == seen[1]["step"] == N_RECORDS // (2 * 4)
    s0, s1 = set(seen[0]["seen"]), set(seen[1]["seen"])
    assert len(seen[0]["seen"]) == len(s0) == N_RECORDS // 2 and not (s0 & s1), "shards overlap"
    assert s0 | s1 == set(range(N_RECORDS)), "shards do not cover the dataset"
    a, b = (torch.load(tmp_path / f"state{r}.pt", weights_only=True) for r in (0, 1))
    params = [k for k in a if "running_" not in k and "num_batches" not in k]  # BN stats are per rank
    diff = [k for k in params if not torch.equal(a[k], b[k])]
    assert not diff, f"ranks differ: {diff[:5]}"
    assert os.path.isfile(tmp_path / "run" / "checkpoint.pt")
    # the monitor's figure from sharded extraction + gathered features = one process's on rank 0's encoder
    from objloader.ssl.knn import KnnMonitor

    knn = [r for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if "knn_top1" in r]
    backbone, _ = load_backbone(str(tmp_path / "run" / "checkpoint.pt"))
    assert len(knn) == 1 and knn[0]["knn_top1"] == pytest.approx(KnnMonitor(tiny, tiny, 32, bank_size=8)(backbone))


@pytest.mark.filterwarnings("ignore:MoCo queue")
@pytest.mark.parametrize("engine", ["dali", "ffcv"])
def test_ddp_three_processes_with_uneven_records_end(tiny, tmp_path, engine):
    """torchrun --nproc_per_node 3 with 16 records (16 % 3 = 1), batch 2: every rank takes
    ceil(16 / 3) = 6 records, so 3 steps each, and the run ends (a rank with one step more than
    the others would wait forever in its all-reduce)."""
    script = tmp_path / "ddp_train.py"
    script.write_text(textwrap.dedent(_DDP_SCRIPT))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
           str(script), str(tmp_path), tiny, "moco", engine, "2"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    seen = [json.load(open(tmp_path / f"seen{r}.json")) for r in range(3)]
    assert [s["step"] for s in seen] == [3, 3, 3]
    assert set().union(*(s["seen"] for s in seen)) == set(range(N_RECORDS))  # padding repeats, never drops


@pytest.mark.filterwarnings("ignore:MoCo queue")
def test_knn_monitor_logs_each_epoch_when_a_labelled_val_split_is_beside_the_data(tiny, tmp_path):
    """`train` and `val` side by side (the layout objloader-build gives a demo or split source):
    the monitor is on by default (every --knn-every epochs), logs a kNN top-1 after those epochs to metrics.jsonl and
    TensorBoard, and equals the protocol on the final backbone's features; --knn-every 0 is off."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from objloader.ssl.knn import KnnMonitor

    root = tmp_path / "built"
    shutil.copytree(tiny, root / "train")
    shutil.copytree(tiny, root / "val")
    res = train(_cfg(str(root / "train"), tmp_path / "on", epochs=2, knn_bank=8, knn_every=1))
    lines = [json.loads(ln) for ln in open(tmp_path / "on" / "metrics.jsonl")]
    knn = [ln for ln in lines if "knn_top1" in ln]
    assert [ln["epoch"] for ln in knn] == [1, 2] and all(0.0 <= ln["knn_top1"] <= 1.0 for ln in knn)
    again = KnnMonitor(str(root / "train"), str(root / "val"), 32, bank_size=8)(res["model"].backbone)
    assert knn[-1]["knn_top1"] == pytest.approx(again)
    events = EventAccumulator(str(tmp_path / "on" / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("eval/knn_top1")] == [ln["step"] for ln in knn]
    train(_cfg(str(root / "train"), tmp_path / "off", epochs=2, knn_every=0))
    assert not any("knn_top1" in json.loads(ln) for ln in open(tmp_path / "off" / "metrics.jsonl"))
