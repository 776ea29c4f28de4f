"""build_backbone(width=): torchvision's ResNet at 64, every stage scaled otherwise; checkpoints
carry the width and every loader honours it (none = 64, for checkpoints older than the option)."""

import pytest
import torch
import torchvision
from torch import nn

from objloader.checkpoint import (CHECKPOINT_FORMAT, CheckpointError, build_backbone, feature_dim,
                                    load_backbone, load_encoder)
from objloader.ssl.byol import BYOL
from objloader.ssl.moco import MoCo


def _shapes(net):
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_width_64_is_torchvision(arch):
    tv = getattr(torchvision.models, arch)(weights=None)
    tv.fc = nn.Identity()
    net = build_backbone(arch)
    assert _shapes(net) == _shapes(build_backbone(arch, width=64)) == _shapes(tv)
    assert str(net) == str(tv)
    if arch == "resnet18":
        assert sum(p.numel() for p in net.parameters()) == 11689512 - (512 * 1000 + 1000)  # torchvision's, less fc
    assert feature_dim(arch) == feature_dim(arch, 64) == {"resnet18": 512, "resnet50": 2048}[arch]


@pytest.mark.parametrize("small_stem", [False, True])
def test_width_32_resnet18(small_stem):
    net = build_backbone("resnet18", small_stem=small_stem, width=32)
    assert feature_dim("resnet18", 32) == 256
    assert net.conv1.out_channels == net.bn1.num_features == 32
    assert net.conv1.kernel_size == ((3, 3) if small_stem else (7, 7))
    assert [getattr(net, f"layer{i}")[-1].conv2.out_channels for i in range(1, 5)] == [32, 64, 128, 256]
    x = torch.randn(4, 3, 32, 32)
    assert net(x).shape == (4, 256)
    # torchvision's initialisation: kaiming-normal (fan-out) convs, BN weight 1 and bias 0
    w = net.layer3[0].conv1.weight.detach()
    assert abs(float(w.std()) - (2.0 / (w.shape[0] * 9)) ** 0.5) < 0.01
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
               for m in net.modules() if isinstance(m, nn.BatchNorm2d))


def test_width_resnet50_bottlenecks():
    net = build_backbone("resnet50", width=16)
    assert feature_dim("resnet50", 16) == 512
    assert [getattr(net, f"layer{i}")[-1].conv3.out_channels for i in range(1, 5)] == [64, 128, 256, 512]
    assert net.layer1[0].conv1.out_channels == 16
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, 512)


def test_width_must_be_positive():
    with pytest.raises(ValueError, match="width"):
        build_backbone("resnet18", width=0)


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_width_32_models_train_a_step(method):
    torch.manual_seed(0)
    model = (MoCo(width=32, queue_size=16) if method == "moco" else BYOL(width=32, hidden=64, dim=16)).train()
    assert model.backbone(torch.randn(4, 3, 32, 32)).shape == (4, 256)
    head = model.head if method == "moco" else model.projector
    assert head[0].in_features == 256
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model.backbone.conv1.weight.detach().clone()
    loss = model(torch.randn(4, 2, 3, 32, 32))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, model.backbone.conv1.weight)


def _checkpoint(path, method, width):
    torch.manual_seed(0)
    w = width or 64
    model = (MoCo(small_stem=True, width=w, queue_size=16) if method == "moco"
             else BYOL(small_stem=True, width=w, hidden=64, dim=16))
    ckpt = {"format": CHECKPOINT_FORMAT, "method": method, "arch": "resnet18", "small_stem": True, "image_size": 32,
            "backbone": model.backbone.state_dict(), "model": model.state_dict()}
    if width is not None:
        ckpt["width"] = width
    torch.save(ckpt, path)
    return model


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_width_32_checkpoint_loads_with_its_width(tmp_path, method):
    path = str(tmp_path / "c.pt")
    model = _checkpoint(path, method, 32)
    net, meta = load_backbone(path)
    assert meta["width"] == 32 and net.conv1.out_channels == 32
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert net(x).shape == (2, 256)
        torch.testing.assert_close(net(x), model.backbone.eval()(x))
    backbone, head, meta = load_encoder(path)
    assert meta["width"] == 32 and backbone.layer4[-1].conv2.out_channels == 256 and head[0].in_features == 256


def test_checkpoint_without_width_means_64(tmp_path):
    path = str(tmp_path / "old.pt")
    _checkpoint(path, "moco", None)
    net, meta = load_backbone(path)
    assert meta["width"] == 64 and net.conv1.out_channels == 64
    # and a checkpoint whose weights do not fit the width it claims is a clear error
    ckpt = torch.load(path, weights_only=True)
    ckpt["width"] = 32
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="width=32"):
        load_backbone(path)
