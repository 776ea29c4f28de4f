"""ContraCAM (objloader/cam/contracam.py) and the dense-CRF refinement (objloader/cam/crf.py)."""

import copy

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from objloader.cam.contracam import ContraCAM, resnet_trunk
from objloader.cam.settings import CamSettings
from objloader.cam.crf import crf_refine, crf_refine_batch
from objloader.checkpoint import build_backbone


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
    cam = ContraCAM(trunk, head, CamSettings(temperature=0.2, relu_weights=relu)).cam(x)[0]
    assert torch.allclose(cam, _naive_cam(trunk, head, x, 0.2, relu), atol=1e-5)
    if not relu:  # the ablation really differs: negative weights are kept
        assert not torch.allclose(cam, _naive_cam(trunk, head, x, 0.2, True), atol=1e-3)


def test_iterative_masks_grow_monotonically_and_stay_in_unit_range():
    trunk, head = _tiny(1)
    x = torch.randn(4, 3, 16, 16)
    masks = [ContraCAM(trunk, head, CamSettings(iterations=t, mask_res=12))(x) for t in (1, 2, 3)]
    for m in masks:
        assert m.shape == (4, 12, 12) and m.min() >= 0 and m.max() <= 1
    assert torch.all(masks[1] >= masks[0]) and torch.all(masks[2] >= masks[1])
    assert not torch.equal(masks[2], masks[0])  # later iterations find more


def test_batch_order_only_permutes_the_masks():
    trunk, head = _tiny(2)
    x = torch.randn(6, 3, 16, 16)
    cc = ContraCAM(trunk, head, CamSettings(iterations=2, mask_res=8))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    assert torch.allclose(cc(x[perm]), cc(x)[perm], atol=1e-5)
    assert torch.equal(cc(x), cc(x))  # deterministic


def test_stride_expansion_doubles_the_map():
    net = build_backbone("resnet18")
    x = torch.randn(2, 3, 64, 64)
    assert resnet_trunk(net)(x).shape[-1] == 2 and resnet_trunk(net, stride_expansion=True)(x).shape[-1] == 4
    head = nn.Linear(512, 32)
    masks = ContraCAM(resnet_trunk(net, True), head, CamSettings(iterations=1, mask_res=16))(x)
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


def _literal_contracam(trunk, head, x, tau, relu, iterations, size):
    """Eq. 1-3 written out per image in float64, with autograd on the image's own activations.

    s_con(x^t; x, U_{l<=t} (B^l minus x^l)) = log exp(sim(z(x^t), z(x))/tau)
        / [exp(sim(z(x^t), z(x))/tau) + sum_{l<=t} sum_{j != i} exp(sim(z(x^t), z(x_j^l))/tau)]
    with x^1 = x, x^t = (1 - M^{t-1}) * x and M^t = max(M^{t-1}, CAM^t).
    """
    trunk, head, x = trunk.double(), head.double(), x.double()

    def z_of(a):
        return F.normalize(head(a.mean(dim=(2, 3))), dim=1)

    masks = torch.zeros(len(x), 1, size, size, dtype=torch.float64)
    batches = []  # z of every step's masked batch B^l
    for t in range(iterations):
        x_t = x * (1 - F.interpolate(masks, size=x.shape[-2:], mode="bilinear", align_corners=False))
        with torch.no_grad():
            batches.append(z_of(trunk(x_t)))
        cams = []
        for i in range(len(x)):
            a = trunk(x_t[i:i + 1]).detach().requires_grad_(True)
            z = z_of(a)[0]
            if t == 0:
                positive = z @ z  # x^1 = x: the image is its own positive, gradient on both sides
            else:
                positive = z @ batches[0][i]  # the ORIGINAL image x, not x^t
            others = torch.cat([b[[j for j in range(len(x)) if j != i]] for b in batches])
            logits = torch.cat([positive[None], others @ z]) / tau
            s = logits[0] - torch.logsumexp(logits, dim=0)
            (g,) = torch.autograd.grad(s, a)
            w = g[0].mean(dim=(1, 2), keepdim=True)
            w = w.clamp(min=0) if relu else w
            cam = (w * a[0].detach()).sum(0).clamp(min=0)
            cams.append((cam - cam.min()) / (cam.max() - cam.min()).clamp(min=1e-12))
        up = F.interpolate(torch.stack(cams)[:, None], size=(size, size), mode="bilinear", align_corners=False)
        masks = torch.maximum(masks, up.clamp(0, 1))
    return masks[:, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_contracam_equals_eq_1_to_3_written_per_image(seed, relu, iterations):
    trunk, head = _tiny(seed)
    torch.manual_seed(100 + seed)
    x = torch.randn(5, 3, 16, 16)
    expected = _literal_contracam(copy.deepcopy(trunk), copy.deepcopy(head), x, 0.2, relu, iterations, 12)
    cc = ContraCAM(trunk.double(), head.double(),
                   CamSettings(temperature=0.2, relu_weights=relu, iterations=iterations, mask_res=12))
    got = cc(x.double())
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert expected.std() > 0.05  # the masks carry structure, not a constant both sides agree on
