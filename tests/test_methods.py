"""One recipe per SSL method (objloader/ssl/methods.py): the trainer, its command line and the
checkpoint's projection head all read it, so a third method is one more recipe; and ContraCAM
has one configuration (CamSettings)."""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from objloader.errors import ConfigError
import torch
import torch.nn.functional as F
from torch import nn

from objloader.checkpoint import build_backbone, feature_dim, load_encoder
from objloader.cli.train import build_parser
from objloader.ssl import methods, trainer
from objloader.ssl.methods import RECIPES, Recipe
from objloader.ssl.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from objloader.store import BuildOptions, build

    src = tmp_path_factory.mktemp("methods_src")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(src / c)
        for i in range(4):
            cv2.imwrite(str(src / c / f"{i}.png"), rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    out = tmp_path_factory.mktemp("methods_built") / "ds"
    build(str(src), str(out), BuildOptions(masks="none", max_res=48), formats=("wds",), workers=1,
          log=lambda *a, **k: None)
    return str(out)


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_the_command_and_the_model_take_the_recipe(method):
    r = RECIPES[method]
    args = build_parser(method).parse_args([])
    assert (args.lr, args.ema) == (r.base_lr, r.ema)
    assert TrainConfig(method=method).base_lr == r.base_lr
    cfg = TrainConfig(method=method, width=8)
    model = trainer._build_model(cfg, 1 << 16)
    assert any(k.startswith(r.head_prefix) for k in model.state_dict())
    assert model.momentum == r.ema


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_the_loader_takes_the_recipes_colour_and_crop_scale(method, monkeypatch, tmp_path):
    seen = {}

    class Stop(Exception):
        pass

    def capture(path, engine, **kw):
        seen.update(kw)
        raise Stop
    monkeypatch.setattr(trainer, "make_loader", capture)
    with pytest.raises(Stop):
        train(TrainConfig(method=method, loader="torch", data=str(tmp_path), device="cpu", progress=False,
                          out=str(tmp_path / "run")))
    r = RECIPES[method]
    assert (seen["color"], tuple(seen["crop_scale"])) == (r.colour, tuple(r.crop_scale))
    # each method's published recipe: MoCo v2's aug_plus (0.2, 1), BYOL's (0.08, 1)
    assert tuple(r.crop_scale) == {"moco": (0.2, 1.0), "byol": (0.08, 1.0)}[method]
    # --crop-scale overrides it, and the config (so every checkpoint) records what was used
    seen.clear()
    with pytest.raises(Stop):
        train(TrainConfig(method=method, loader="torch", data=str(tmp_path), device="cpu", progress=False,
                          out=str(tmp_path / "run2"), crop_scale=(0.5, 0.9)))
    assert tuple(seen["crop_scale"]) == (0.5, 0.9)
    assert TrainConfig(method=method).crop_scale == tuple(r.crop_scale)


@pytest.mark.parametrize("bad", [(0.0, 1.0), (0.5, 1.5), (0.9, 0.2), (0.5,), "big"])
def test_a_crop_scale_outside_area_fractions_is_refused(bad):
    with pytest.raises(ConfigError, match="crop_scale"):
        TrainConfig(method="moco", crop_scale=bad)


class _Toy(nn.Module):
    """A third method: one network, cosine loss between the two views' projections."""

    def __init__(self, cfg):
        super().__init__()
        self.backbone = build_backbone(cfg.arch, cfg.small_stem, cfg.width)
        self.proj = nn.Sequential(nn.Linear(feature_dim(cfg.arch, cfg.width), 16), nn.BatchNorm1d(16), nn.ReLU(),
                                  nn.Linear(16, 8))

    def momentum_update(self, progress: float) -> None:
        pass

    def forward(self, views):
        b = views.shape[0]
        z = F.normalize(self.proj(self.backbone(views.flatten(0, 1))), dim=1).view(b, 2, -1)
        return (2 - 2 * (z[:, 0] * z[:, 1]).sum(1)).mean()


def test_a_third_method_is_one_recipe(data, tmp_path, monkeypatch):
    toy = Recipe(name="toy", description="a toy method", colour="byol", crop_scale=(0.2, 1.0), base_lr=0.1,
                 ema=0.5, ema_help="unused", head_prefix="proj.", build=lambda cfg, n, world=1: _Toy(cfg))
    monkeypatch.setitem(RECIPES, "toy", toy)
    args = build_parser("toy").parse_args(["--data", data])
    assert (args.lr, args.ema) == (0.1, 0.5)
    out = train(TrainConfig(method="toy", loader="torch", data=data, width=8, image_size=32, batch_size=4,
                            epochs=1, max_steps=1, workers=0, device="cpu", out=str(tmp_path / "run"),
                            progress=False))
    assert out["step"] == 1
    # ContraCAM finds the toy's projection head through the prefix its checkpoint carries
    backbone, head, meta = load_encoder(out["checkpoint"])
    assert meta["method"] == "toy" and meta["head_prefix"] == "proj."
    expected = {k[len("proj."):]: v for k, v in out["model"].state_dict().items() if k.startswith("proj.")}
    assert head.state_dict().keys() == expected.keys()
    assert all(torch.equal(head.state_dict()[k], v.cpu()) for k, v in expected.items())


def test_contracam_has_one_config():
    from objloader.cam.contracam import ContraCAM, resnet_trunk
    from objloader.cam.settings import CamSettings

    torch.manual_seed(0)
    net = build_backbone("resnet18", width=8)
    model = ContraCAM(resnet_trunk(net), nn.Linear(64, 16), CamSettings(iterations=3, mask_res=8))
    steps = model(torch.randn(3, 3, 32, 32), return_steps=True)
    assert len(steps) == 3 and steps[-1].shape == (3, 8, 8)
    # the model's default is the run's default, the one README.md states
    assert ContraCAM(resnet_trunk(net), nn.Linear(64, 16)).cfg.iterations == CamSettings().iterations == 10
