"""ContraCAM (Mo et al. 2021, Sec. 2.2): object masks from a contrastively trained encoder.

For a batch of images, each image's *contrastive score* is its log-probability of picking itself
among the batch (eq. 1-2):

    s_i = z_i . z_i / tau - log sum_j exp(z_i . z_j / tau),   z = normalize(head(pool(A)))

where A are the last convolutional stage's activations. As in Grad-CAM, the channel weights
are the spatially averaged gradients of s_i with respect to A_i, passed through a ReLU
("negative-signal removal"; ``relu_weights=False`` is the ablation), and the CAM is the min-max
normalised ReLU(sum_k alpha_k A_i^k), upsampled to the mask resolution.

Batched, with one backward pass: the other images' embeddings enter s_i detached, so the
gradient of sum_i s_i with respect to A_i is exactly ds_i/dA_i (A_i reaches s_j, j != i, only
through z_i as a negative, which is detached there).

Iterative refinement (eq. 3): step t >= 2 explains the masked input x^t = (1 - M^{t-1}) * x
(the aggregated mask, upsampled bilinearly to the image, softly removes what was found). Its
score is s_con(x^t; x, U_{l<=t} (B^l minus x^l)): the positive is the projection of the ORIGINAL
image x ("the original image x as the positive, to highlight the undetected objects"), the
negatives are the OTHER images' masked inputs of every step so far, never the image's own. Masks
are aggregated by max, M^t = max(M^{t-1}, CAM^t), so they grow monotonically within [0, 1].
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .settings import CamSettings

__all__ = ["ContraCAM", "resnet_trunk"]


def resnet_trunk(backbone: nn.Module, stride_expansion: bool = False) -> nn.Module:
    """A torchvision ResNet up to its last convolutional stage (images -> A [B, K, h, w]).

    ``stride_expansion`` runs the last stage at stride 1 (paper: finer masks): the same weights,
    a feature map twice as large on each side.
    """
    layers = [backbone.conv1, backbone.bn1, backbone.relu, backbone.maxpool,
              backbone.layer1, backbone.layer2, backbone.layer3, backbone.layer4]
    trunk = nn.Sequential(*[copy.deepcopy(m) for m in layers])
    if stride_expansion:
        for module in trunk[-1].modules():
            if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
                module.stride = (1, 1)
    return trunk


class ContraCAM(nn.Module):
    """``forward(images [B, 3, H, W]) -> masks [B, M, M]`` in [0, 1] (float32).

    ``trunk`` maps images to the last stage's activations; ``head`` maps pooled features to the
    projection the encoder was trained with (MoCo v2 head / BYOL projector). Of ``cfg`` (the
    run's one settings object) the model reads temperature, iterations, relu_weights and
    mask_res (M); the rest says how its input is prepared.
    """

    def __init__(self, trunk: nn.Module, head: nn.Module, cfg: CamSettings = CamSettings()):
        super().__init__()
        self.trunk, self.head, self.cfg = trunk, head, cfg

    def embed(self, activations: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(activations.mean(dim=(2, 3))), dim=1)

    def cam(self, images: torch.Tensor, positives: torch.Tensor | None = None,
            earlier: list[torch.Tensor] = ()):
        """One ContraCAM step: ([B, h, w] maps in [0, 1] at the activations' resolution,
        the images' embeddings [B, D], detached).

        ``positives`` [B, D]: the projections each score treats as the positive (eq. 3: the
        original images'); None = the images' own (eq. 1-2, step 1). ``earlier``: the [B, D]
        projections of earlier steps' masked batches; row j of each is a negative of every image
        but j.
        """
        activations = self.trunk(images).detach().requires_grad_(True)
        z = self.embed(activations)
        if positives is None:
            positives = z.detach()  # z.z = 1 for unit vectors: no gradient is lost by detaching
        positive = (z * positives).sum(1, keepdim=True)
        own = torch.eye(len(z), dtype=torch.bool, device=z.device)
        # Other images' projections, this step's and every earlier step's (B^l minus x^l).
        negatives = [(z @ block.t()).masked_fill(own, float("-inf")) for block in (z.detach(), *earlier)]
        logits = torch.cat([positive, *negatives], dim=1) / self.cfg.temperature
        score = logits[:, 0] - torch.logsumexp(logits, dim=1)  # eq. 2/3, one score per image
        # Other images' projections enter every score detached, so d(sum_i s_i)/dA_i = ds_i/dA_i.
        (grad,) = torch.autograd.grad(score.sum(), activations)
        weights = grad.mean(dim=(2, 3), keepdim=True)  # alpha_k: spatially averaged gradient
        if self.cfg.relu_weights:
            weights = weights.clamp(min=0)
        cam = (weights * activations.detach()).sum(1).clamp(min=0)  # ReLU(sum_k alpha_k A^k)
        lo = cam.amin(dim=(1, 2), keepdim=True)
        hi = cam.amax(dim=(1, 2), keepdim=True)
        return (cam - lo) / (hi - lo).clamp(min=1e-12), z.detach()

    def forward(self, images: torch.Tensor, return_steps: bool = False):
        """Masks [B, M, M] after ``cfg.iterations`` steps; with ``return_steps``, the list of the
        aggregated masks after each step (the first is single-step ContraCAM)."""
        size = self.cfg.mask_res
        aggregated = torch.zeros(images.shape[0], 1, size, size, device=images.device, dtype=images.dtype)
        original = None  # projections of the unmasked images: the positives of steps >= 2
        earlier = []  # projections of every earlier step's masked batch: negatives of later steps
        steps = []
        for _ in range(self.cfg.iterations):
            keep = 1 - F.interpolate(aggregated, size=images.shape[-2:], mode="bilinear", align_corners=False)
            cam, z = self.cam(images * keep, original, earlier)  # x^t = (1 - M^{t-1}) * x
            if original is None:
                original = z  # step 1 sees the unmasked images
            cam = F.interpolate(cam.unsqueeze(1), size=(size, size), mode="bilinear", align_corners=False)
            aggregated = torch.maximum(aggregated, cam.clamp(0, 1))
            earlier.append(z)
            steps.append(aggregated[:, 0])
        return steps if return_steps else steps[-1]
