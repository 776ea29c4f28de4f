"""Checkpoints that travel: each foreign format is written here in its own layout (random ResNet-18
weights, re-keyed the way that codebase saves them; the key names are what matters), detected,
mapped onto our backbone exactly, and refused in one line when it is something else; objloader-
export writes a torchvision state_dict that loads with strict=True and reads back; --init starts a
trainer from any of them."""

import argparse
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torchvision

import objloader
from objloader.checkpoint import CHECKPOINT_FORMAT, CheckpointError, build_backbone, load_backbone, load_encoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_IMPORTED = os.path.dirname(os.path.dirname(objloader.__file__))  # the copy of objloader under test


def _random_state(net: torch.nn.Module, seed: int = 0) -> dict:
    """Every float tensor (BN running stats included) random, so a key mapped to the wrong place
    shows as a wrong value, not as two equal initialisations."""
    g = torch.Generator().manual_seed(seed)
    state = {k: (torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
             for k, v in net.state_dict().items()}
    for k in state:
        if k.endswith("running_var"):  # a variance: positive, or every activation is NaN
            state[k] = state[k].abs() + 0.5
    return state


@pytest.fixture(scope="module")
def tv():
    """A torchvision resnet18 state_dict (with its fc classifier)."""
    return _random_state(torchvision.models.resnet18())


def _body(sd):  # the backbone part: everything but the classifier
    return {k: v for k, v in sd.items() if not k.startswith("fc.")}


def _mlp(prefix, sizes, bn=False, seed=1):
    """A projection MLP's state under ``prefix``: Linear-ReLU-Linear, or Linear-BN-ReLU-Linear."""
    g = torch.Generator().manual_seed(seed)
    (d_in, hidden, d_out) = sizes
    out = {f"{prefix}0.weight": torch.randn(hidden, d_in, generator=g), f"{prefix}0.bias": torch.randn(hidden, generator=g)}
    last = 2
    if bn:
        out.update({f"{prefix}1.weight": torch.rand(hidden, generator=g) + 0.5, f"{prefix}1.bias": torch.randn(hidden, generator=g),
                    f"{prefix}1.running_mean": torch.randn(hidden, generator=g),
                    f"{prefix}1.running_var": torch.rand(hidden, generator=g) + 0.5,
                    f"{prefix}1.num_batches_tracked": torch.tensor(7)})
        last = 3
    out.update({f"{prefix}{last}.weight": torch.randn(d_out, hidden, generator=g),
                f"{prefix}{last}.bias": torch.randn(d_out, generator=g)})
    return out


# Each writer saves ``tv`` the way that codebase does; returns (object to torch.save, head state or None).
def _moco_official(tv):
    """facebookresearch/moco main_moco.py (--mlp, v2): DDP prefix, query and key encoders, queue."""
    head = _mlp("", (512, 512, 128))
    sd = {f"module.encoder_q.{k}": v for k, v in _body(tv).items()}
    sd.update({f"module.encoder_q.fc.{k}": v for k, v in head.items()})
    sd.update({f"module.encoder_k.{k}": v + 1 for k, v in _body(tv).items()})  # the momentum copy: not used
    sd.update({"module.queue": torch.randn(128, 64), "module.queue_ptr": torch.zeros(1, dtype=torch.long)})
    return {"epoch": 200, "arch": "resnet18", "state_dict": sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.03, "momentum": 0.9, "params": [0, 1]}]}}, head


def _torchvision(tv):
    return dict(tv), None


def _timm(tv):
    """timm's train script: {"epoch", "arch", "state_dict", ...}; timm's ResNet keys are torchvision's."""
    return {"epoch": 100, "arch": "resnet18", "state_dict": dict(tv), "version": 2}, None


def _solo_learn(tv):
    """solo-learn (Lightning): backbone.*, momentum_backbone.*, projector.* (BYOL: Linear-BN-ReLU-Linear), classifier."""
    head = _mlp("", (512, 1024, 256), bn=True)
    sd = {f"backbone.{k}": v for k, v in _body(tv).items()}
    sd.update({f"momentum_backbone.{k}": v - 1 for k, v in _body(tv).items()})
    sd.update({f"projector.{k}": v for k, v in head.items()})
    sd.update({"classifier.weight": torch.randn(10, 512), "classifier.bias": torch.randn(10)})
    return {"epoch": 9, "global_step": 900, "pytorch-lightning_version": "2.1.0", "state_dict": sd}, head


_CHILD = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


def _lightly(tv):
    """lightly's tutorials: backbone = nn.Sequential(*list(resnet18.children())[:-1]) (positions,
    not names) and a MoCoProjectionHead under projection_head.layers."""
    head = _mlp("", (512, 512, 128))
    sd = {f"backbone.{_CHILD[k.split('.', 1)[0]]}.{k.split('.', 1)[1]}": v for k, v in _body(tv).items()}
    sd.update({f"projection_head.layers.{k}": v for k, v in head.items()})
    return {"epoch": 3, "state_dict": sd}, head


FORMATS = {"moco": _moco_official, "torchvision": _torchvision, "timm": _timm, "solo-learn": _solo_learn,
           "lightly": _lightly}
DETECTED = {"moco": "moco", "torchvision": "torchvision", "timm": "torchvision", "solo-learn": "solo-learn",
            "lightly": "lightly"}


def _write(tmp_path, name, obj):
    path = str(tmp_path / f"{name}.pth")
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_format_is_detected_and_mapped_onto_the_original_weights(tmp_path, tv, fmt):
    obj, head_state = FORMATS[fmt](tv)
    path = _write(tmp_path, fmt, obj)
    net, meta = load_backbone(path)
    assert meta["source_format"] == DETECTED[fmt]
    assert (meta["arch"], meta["small_stem"], meta["width"]) == ("resnet18", False, 64)
    got = net.state_dict()
    assert set(got) == set(_body(tv))
    assert all(torch.equal(got[k], v) for k, v in _body(tv).items())

    backbone, head, meta = load_encoder(path)
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in _body(tv).items())
    if head_state is None:  # a classifier's fc is not a projection: z is the pooled features
        assert head is None and meta["projection"] == "pooled backbone features"
    else:
        assert meta["projection"] == "head"
        assert set(head.state_dict()) == set(head_state)
        assert all(torch.equal(head.state_dict()[k], v) for k, v in head_state.items())
        x = torch.randn(3, 512)
        ref = torch.nn.functional.linear(x, head_state["0.weight"], head_state["0.bias"])
        if "1.running_mean" in head_state:  # BatchNorm1d in eval mode, then ReLU
            ref = (ref - head_state["1.running_mean"]) / torch.sqrt(head_state["1.running_var"] + 1e-5)
            ref = ref * head_state["1.weight"] + head_state["1.bias"]
        last = max(int(k.split(".")[0]) for k in head_state)
        ref = torch.nn.functional.linear(ref.relu(), head_state[f"{last}.weight"], head_state[f"{last}.bias"])
        torch.testing.assert_close(head.eval()(x), ref, rtol=1e-4, atol=1e-3)  # sums of ~1000 large terms


def test_moco_v1_linear_head_and_resnet50_are_detected(tmp_path):
    sd = _random_state(torchvision.models.resnet50(), seed=2)
    obj = {"state_dict": {f"module.encoder_q.{k}": v for k, v in sd.items() if not k.startswith("fc.")}}
    obj["state_dict"].update({"module.encoder_q.fc.weight": torch.randn(128, 2048), "module.encoder_q.fc.bias": torch.randn(128)})
    backbone, head, meta = load_encoder(_write(tmp_path, "v1", obj))
    assert (meta["source_format"], meta["arch"], meta["width"]) == ("moco", "resnet50", 64)
    assert isinstance(head, torch.nn.Sequential) and len(head) == 1 and head[0].in_features == 2048
    assert torch.equal(backbone.state_dict()["layer4.2.conv3.weight"], sd["layer4.2.conv3.weight"])


def _refusal(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_backbone(path)
    msg = str(e.value)
    assert "\n" not in msg and path in msg
    return msg


def test_unknown_formats_are_refused_in_one_line_naming_what_was_found(tmp_path, tv):
    vit = {"cls_token": torch.zeros(1, 1, 8), "pos_embed": torch.zeros(1, 5, 8),
           "patch_embed.proj.weight": torch.zeros(8, 3, 16, 16), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}
    assert "a ViT" in _refusal(_write(tmp_path, "vit", vit))
    tv_vit = {"class_token": torch.zeros(1, 1, 8), "conv_proj.weight": torch.zeros(8, 3, 16, 16),
              "encoder.pos_embedding": torch.zeros(1, 5, 8)}
    assert "a ViT" in _refusal(_write(tmp_path, "tv_vit", tv_vit))
    dense = {"features.0.weight": torch.zeros(8, 3, 3, 3), "classifier.1.weight": torch.zeros(10, 8)}
    assert "unknown keys like 'classifier.1.weight', 'features.0.weight'" in _refusal(_write(tmp_path, "dense", dense))
    r34 = _random_state(torchvision.models.resnet34())
    assert "resnet34" in _refusal(_write(tmp_path, "r34", r34))
    broken = dict(tv)
    del broken["layer3.1.bn2.running_var"]
    assert "missing 'layer3.1.bn2.running_var'" in _refusal(_write(tmp_path, "broken", broken))
    assert "a list" in _refusal(_write(tmp_path, "list", [torch.zeros(3)]))


def test_pickled_objects_are_never_unpickled(tmp_path, tv):
    """timm's train script also saves its argparse Namespace: weights_only refuses it, and the
    message says how to keep only the tensors."""
    path = _write(tmp_path, "ns", {"state_dict": dict(tv), "args": argparse.Namespace(lr=0.1)})
    msg = _refusal(path)
    assert "pickled Python objects" in msg and "state_dict" in msg


def test_package_reads_every_torch_file_with_weights_only():
    """The rule, for every module: torch.load only with weights_only=True."""
    bad = []
    for root in (os.path.join(REPO, "objloader"), os.path.join(REPO, "kernels")):
        for dirpath, _, files in os.walk(root):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                    for chunk in text.split("torch.load(")[1:]:
                        call = chunk.split(")")[0]
                        if "weights_only=True" not in call:
                            bad.append(f"{f}: torch.load({call})")
    assert not bad, bad


# ---------------------------------------------------------------------------------------------
# export


def _native(path, net, width=64, small_stem=False):
    torch.save({"format": CHECKPOINT_FORMAT, "method": "moco", "arch": "resnet18", "small_stem": small_stem,
                "width": width, "image_size": 32, "backbone": net.state_dict()}, path)


def test_export_loads_strictly_into_torchvision_and_reads_back(tmp_path):
    from objloader.cli.export import main

    net = build_backbone("resnet18")
    net.load_state_dict(_random_state(net, seed=3))
    ckpt, out = str(tmp_path / "checkpoint.pt"), str(tmp_path / "r18.pth")
    _native(ckpt, net)
    assert main([ckpt, out]) == 0
    state = torch.load(out, weights_only=True)
    tvnet = torchvision.models.resnet18()
    tvnet.load_state_dict(state, strict=True)
    assert torch.count_nonzero(tvnet.fc.weight) == 0 and torch.count_nonzero(tvnet.fc.bias) == 0
    assert all(torch.equal(tvnet.state_dict()[k], v) for k, v in net.state_dict().items())
    back, meta = load_backbone(out)  # and objloader imports it again
    assert meta["source_format"] == "torchvision"
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())


def test_export_command_runs_as_a_module(tmp_path, tv):
    """python -m objloader.cli.export (the objloader-export console script's code) converts a foreign format too."""
    obj, _ = _solo_learn(tv)
    src, out = _write(tmp_path, "solo", obj), str(tmp_path / "out.pth")
    r = subprocess.run([sys.executable, "-m", "objloader.cli.export", src, out], capture_output=True, text=True,
                       timeout=120, cwd=str(tmp_path), env=dict(os.environ, PYTHONPATH=_IMPORTED))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "torchvision resnet18" in r.stdout and "solo-learn" in r.stdout
    tvnet = torchvision.models.resnet18()
    tvnet.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert all(torch.equal(tvnet.state_dict()[k], v) for k, v in _body(tv).items())


def test_export_of_another_width_is_refused_unless_asked(tmp_path, capsys):
    from objloader.cli.export import main

    net = build_backbone("resnet18", width=32)
    ckpt, out = str(tmp_path / "w32.pt"), str(tmp_path / "w32.pth")
    _native(ckpt, net, width=32)
    assert main([ckpt, out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "width 32" in err and "--any-shape" in err and not os.path.exists(out)
    assert main([ckpt, out, "--any-shape"]) == 0
    back, meta = load_backbone(out)  # torchvision's names, width-32 shapes: read back with its width
    assert (meta["width"], meta["source_format"]) == (32, "torchvision")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in net.state_dict().items())


# ---------------------------------------------------------------------------------------------
# ContraCAM and --init


def test_contracam_without_a_head_explains_pooled_features(tmp_path):
    from objloader.cam.masks import CamSettings, explain_batch, load_contracam

    torch.manual_seed(0)  # torchvision's initialisation: fully random weights give empty CAMs
    path = _write(tmp_path, "tv", torchvision.models.resnet18().state_dict())
    model, size, meta = load_contracam(path, CamSettings(image_size=64, iterations=1, crf=False, mask_res=16))
    assert size == 64 and isinstance(model.head, torch.nn.Identity) and meta["projection"] == "pooled backbone features"
    a = torch.randn(2, 512, 4, 4)
    torch.testing.assert_close(model.embed(a), torch.nn.functional.normalize(a.mean(dim=(2, 3)), dim=1))
    rgb = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    steps = explain_batch(model, rgb)
    assert steps[0].shape == (3, 16, 16) and np.isfinite(steps[0]).all()
    # a checkpoint that records no training size: ContraCAM's default input is 224 (2 x 112)
    _, size, _ = load_contracam(path, CamSettings(iterations=1, crf=False))
    assert size == 224


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    from objloader.store import BuildOptions, build

    src = tmp_path_factory.mktemp("init_src")
    rng = np.random.default_rng(5)
    for i in range(8):
        d = src / ("a" if i % 2 else "b")
        d.mkdir(exist_ok=True)
        cv2.imwrite(str(d / f"{i}.png"), rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))
    out = tmp_path_factory.mktemp("init_built") / "ds"
    build(str(src), str(out), BuildOptions(masks="none", max_res=48), formats=["wds"], workers=1, log=lambda *a: None)
    return str(out)


@pytest.mark.filterwarnings("ignore:MoCo queue")
@pytest.mark.parametrize("method", ["moco", "byol"])
def test_init_starts_the_trainer_from_a_foreign_backbone(tmp_path, tv, small_dataset, method):
    from objloader.cli.train import build_parser
    from objloader.ssl.trainer import TrainConfig, train

    obj, _ = _moco_official(tv)
    init = _write(tmp_path, "moco_v2", obj)
    assert build_parser(method).parse_args(["--init", init]).init == init
    # lr ~ 0: after one step the weights are still the ones --init loaded (a fresh init is far off)
    cfg = TrainConfig(method=method, loader="torch", data=small_dataset, image_size=32, batch_size=4, epochs=1,
                      workers=0, out=str(tmp_path / "run"), progress=False, save_every=0, log_every=1, device="cpu",
                      lr=1e-9, weight_decay=0.0, init=init, max_steps=1)
    model = train(cfg)["model"]
    twin = model.key_backbone if method == "moco" else model.target_backbone
    for net in (model.backbone, twin):
        params = dict(net.named_parameters())
        for k, v in _body(tv).items():
            if k in params:
                torch.testing.assert_close(params[k].detach(), v, atol=1e-4, rtol=0)
    with pytest.raises(CheckpointError, match="width=64.*--width"):
        train(TrainConfig(**{**cfg.__dict__, "width": 32, "out": str(tmp_path / "w32")}))


def test_build_with_contracam_masks_of_a_foreign_checkpoint(tmp_path, capsys):
    """objloader-build --masks contracam --checkpoint: a lightly checkpoint (backbone + MoCo head)
    of torchvision's initialisation, straight from the command line."""
    from objloader.cli.build import main
    from objloader.store import read_manifest

    torch.manual_seed(0)
    obj, _ = _lightly(torchvision.models.resnet18().state_dict())
    ckpt = _write(tmp_path, "lightly", obj)
    src = tmp_path / "src"
    rng = np.random.default_rng(7)
    for i in range(4):
        (src / "a").mkdir(parents=True, exist_ok=True)
        img = np.full((64, 64, 3), rng.integers(0, 255, 3), np.uint8)
        img[16:40, 20:48] = rng.integers(0, 255, 3)
        cv2.imwrite(str(src / "a" / f"{i}.png"), img)
    out = str(tmp_path / "built")
    rc = main([str(src), out, "--masks", "contracam", "--checkpoint", ckpt, "--cam-image-size", "64",
               "--cam-iterations", "1", "--cam-no-crf", "--mask-res", "16", "--formats", "wds", "--workers", "1"])
    log = capsys.readouterr()
    assert rc == 0, log.err[-2000:]
    m = read_manifest(out)
    assert m["masks"] == "contracam" and m["counts"]["records"] == 4
    assert "lightly resnet18 checkpoint; ContraCAM's z = its projection head" in log.out + log.err
