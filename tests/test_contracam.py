"""ContraCAM (objloader/cam/contracam.py) and the dense-CRF refinement (objloader/cam/crf.py)."""

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from objloader.cam.contracam import ContraCAM, ContraCAMConfig, resnet_trunk
from objloader.cam.crf import crf_refine, crf_refine_batch
from objloader.ssl.backbone import build_backbone


def _tiny(seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=1), nn.ReLU())
    head = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 5))
    return trunk, head


def _naive_cam(trunk, head, x, tau, relu):
    """Per-image autograd: d s_i / d A_i with the full graph (nothing detached)."""
    out = []
    for i in range(len(x)):
        a = trunk(x).detach().requires_grad_(True)
        z = F.normalize(head(a.mean(dim=(2, 3))), dim=1)
        logits = z[i] @ z.t() / tau
        s_i = logits[i] - torch.logsumexp(logits, dim=0)
        (g,) = torch.autograd.grad(s_i, a)
        w = g[i].mean(dim=(1, 2), keepdim=True)
        w = w.clamp(min=0) if relu else w
        cam = (w * a[i].detach()).sum(0).clamp(min=0)
        out.append((cam - cam.min()) / (cam.max() - cam.min()).clamp(min=1e-12))
    return torch.stack(out)


@pytest.mark.parametrize("relu", [True, False])
def test_batched_channel_weights_equal_per_image_autograd(relu):
    trunk, head = _tiny()
    x = torch.randn(5, 3, 16, 16)
    cam = ContraCAM(trunk, head, ContraCAMConfig(temperature=0.2, relu_weights=relu)).cam(x)[0]
    assert torch.allclose(cam, _naive_cam(trunk, head, x, 0.2, relu), atol=1e-5)
    if not relu:  # the ablation really differs: negative weights are kept
        assert not torch.allclose(cam, _naive_cam(trunk, head, x, 0.2, True), atol=1e-3)


def test_iterative_masks_grow_monotonically_and_stay_in_unit_range():
    trunk, head = _tiny(1)
    x = torch.randn(4, 3, 16, 16)
    masks = [ContraCAM(trunk, head, ContraCAMConfig(iterations=t, mask_size=12))(x) for t in (1, 2, 3)]
    for m in masks:
        assert m.shape == (4, 12, 12) and m.min() >= 0 and m.max() <= 1
    assert torch.all(masks[1] >= masks[0]) and torch.all(masks[2] >= masks[1])
    assert not torch.equal(masks[2], masks[0])  # later iterations find more


def test_batch_order_only_permutes_the_masks():
    trunk, head = _tiny(2)
    x = torch.randn(6, 3, 16, 16)
    cc = ContraCAM(trunk, head, ContraCAMConfig(iterations=2, mask_size=8))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.allclose(cc(x[perm]), cc(x)[perm], atol=1e-5)
    assert torch.equal(cc(x), cc(x))  # deterministic


def test_stride_expansion_doubles_the_map():
    net = build_backbone("resnet18")
    x = torch.randn(2, 3, 64, 64)
    assert resnet_trunk(net)(x).shape[-1] == 2 and resnet_trunk(net, stride_expansion=True)(x).shape[-1] == 4
    head = nn.Linear(512, 32)
    masks = ContraCAM(resnet_trunk(net, True), head, ContraCAMConfig(mask_size=16))(x)
    assert masks.shape == (2, 16, 16) and torch.isfinite(masks).all()


def _square_scene(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
    truth = np.zeros((64, 64), bool)
    truth[16:44, 20:50] = True
    image[truth] = rng.integers(190, 255, (int(truth.sum()), 3), dtype=np.uint8)
    blurred = cv2.GaussianBlur(truth.astype(np.float32), (0, 0), 6) * 0.8 + 0.1
    return image, truth, blurred


def _iou(a, b):
    return (a & b).sum() / (a | b).sum()


def test_crf_sharpens_a_blurred_mask():
    image, truth, blurred = _square_scene()
    refined = crf_refine(image, cv2.resize(blurred, (16, 16), interpolation=cv2.INTER_AREA))
    assert refined.shape == (64, 64) and refined.min() >= 0 and refined.max() <= 1
    assert _iou(refined > 0.5, truth) > max(_iou(blurred > 0.5, truth), 0.9)
    assert np.abs(refined - 0.5).mean() > np.abs(blurred - 0.5).mean() + 0.1  # more decided


def test_crf_batch_in_a_process_pool_equals_serial():
    scenes = [_square_scene(s) for s in range(3)]
    images, masks = [s[0] for s in scenes], [s[2] for s in scenes]
    serial = crf_refine_batch(images, masks)
    pooled = crf_refine_batch(images, masks, workers=2)
    assert all(np.array_equal(a, b) for a, b in zip(serial, pooled))
    with pytest.raises(ValueError, match="RGB uint8"):
        crf_refine(images[0].astype(np.float32), masks[0])
