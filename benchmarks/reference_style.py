"""A reference-style object-aware MoCo v2 input pipeline: the baseline of benchmarks/throughput.py.

Written the way the public code of the paper (alinlab/object-aware-contrastive) builds its
inputs, on the same built records the engines read, so the benchmark compares pipeline designs
rather than data:

* a torch ``Dataset`` whose ``__getitem__`` decodes the JPEG with PIL, carries the soft mask as
  a 4th (alpha) channel, does OA-Crop with PIL (one box per sample, then torchvision's
  RandomResizedCrop parameters inside it, crop + resize + flip of the RGBA image), and runs the
  MoCo v2 colour chain with torchvision transforms on each view's PIL image, then ToTensor +
  Normalize; it also cuts the record's background rectangle (``bg_rect``) as a normalised patch;
* a ``DataLoader`` with worker processes;
* in the main process, BG-Mixup as a per-sample, per-view Python loop (paper eq. 4): with
  probability p_mix pick a partner with a background, tile its patch over the view and blend
  with the view's soft mask; a small queue of recent patches serves when no partner has one.

As in the reference code, randomness comes from Python's ``random`` and torch's global
generator (seeded per worker by the DataLoader), not from objloader's keyed sampler, and the
mixup runs after colour and normalisation (the patch is normalised the same way). Nothing here
is shared with objloader's engines except the record reader.
"""

from __future__ import annotations

import collections
import io
import math
import random

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from objloader.augment.reference import IMAGENET_MEAN, IMAGENET_STD
from objloader.store.reader import open_dataset
from objloader.store.schema import MEMBER

__all__ = ["ReferenceStyleDataset", "ReferenceStyleLoader", "bg_mixup_loop"]

_MEMBERS = (MEMBER.image, MEMBER.label, MEMBER.mask, MEMBER.boxes, MEMBER.bg_rect)
_QUEUE_LEN = 50  # recent background patches kept for batches without a partner (reference: 50)


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _pixel_box(box: np.ndarray, width: int, height: int) -> tuple[int, int, int, int]:
    """A normalised (x0, y0, x1, y1) box as a PIL crop box of at least one pixel."""
    x0 = min(max(int(math.floor(box[0] * width)), 0), width - 1)
    y0 = min(max(int(math.floor(box[1] * height)), 0), height - 1)
    x1 = max(min(int(math.ceil(box[2] * width)), width), x0 + 1)
    y1 = max(min(int(math.ceil(box[3] * height)), height), y0 + 1)
    return x0, y0, x1, y1


def moco_v2_colour(image_size: int) -> T.Compose:
    """MoCo v2 colour on a PIL view: jitter p 0.8, grey p 0.2, blur p 0.5, then tensor + normalise.

    Blur kernel: odd int(0.1 * image_size), the reference code's choice.
    """
    k = max(int(0.1 * image_size), 3) | 1
    return T.Compose([
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class ReferenceStyleDataset(Dataset):
    """Record i -> (views [V, 3, S, S] float, masks [V, 1, S, S] float in [0, 1], patch [3, P, P],
    has_bg, label). Masks and patch are empty tensors when ``with_mask`` is false (no BG-Mixup)."""

    def __init__(self, path: str, *, image_size: int, views: int = 2, oa_crop: bool = True,
                 with_mask: bool = True, patch_size: int | None = None):
        self.path, self.image_size, self.views = path, image_size, views
        self.oa_crop, self.with_mask = oa_crop, with_mask
        self.patch_size = patch_size or max(image_size // 2, 1)
        ds = open_dataset(path)
        self.n = len(ds)
        self.n_boxes = np.asarray(ds.manifest["records"]["n_boxes"], np.int64)
        ds.close()
        self.ds = None  # opened in each worker: file descriptors do not cross fork well
        self.colour = moco_v2_colour(image_size)
        self.normalise = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if self.ds is None:
            self.ds = open_dataset(self.path)
        raw = self.ds.raw(int(i), _MEMBERS)
        image = Image.open(io.BytesIO(raw[MEMBER.image])).convert("RGB")
        width, height = image.size
        source = image
        if self.with_mask:  # the mask rides along as the alpha channel through every crop
            mask = Image.open(io.BytesIO(raw[MEMBER.mask])).convert("L").resize((width, height), Image.BILINEAR)
            source = image.copy()
            source.putalpha(mask)
        n_boxes = int(self.n_boxes[i])
        if self.oa_crop and n_boxes > 0:  # OA-Crop: one box per sample, shared by its views
            box = random.choice(list(_npy(raw[MEMBER.boxes])[:n_boxes]))
            source = source.crop(_pixel_box(box, width, height))
        s = self.image_size
        views, masks = [], []
        for _ in range(self.views):
            top, left, h, w = T.RandomResizedCrop.get_params(source, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
            view = TF.resized_crop(source, top, left, h, w, [s, s], interpolation=T.InterpolationMode.BILINEAR)
            if random.random() < 0.5:
                view = TF.hflip(view)
            if self.with_mask:
                masks.append(TF.to_tensor(view.getchannel("A")))
                view = view.convert("RGB")
            views.append(self.colour(view))
        empty = torch.zeros(0)
        patch, has_bg = empty, False
        if self.with_mask:
            bg = _npy(raw[MEMBER.bg_rect])
            has_bg = bool(bg[2] > bg[0] and bg[3] > bg[1])
            p = self.patch_size
            if has_bg:
                cut = image.crop(_pixel_box(bg, width, height)).resize((p, p), Image.BILINEAR)
                patch = self.normalise(cut)
            else:
                patch = torch.zeros(3, p, p)
        return (torch.stack(views), torch.stack(masks) if masks else empty, patch, has_bg,
                int(raw[MEMBER.label]))


def bg_mixup_loop(views: torch.Tensor, masks: torch.Tensor, patches: torch.Tensor, has_bg, p_mix: float,
                  queue: collections.deque) -> torch.Tensor:
    """Soft BG-Mixup (eq. 4) as the reference code writes it: a Python loop over samples and views.

    x = m * x + (1 - m) * tile(patch_j), with j a random other batch member that has a background,
    else a random patch of ``queue``; the view stays as it is when neither exists.
    """
    b, v, _, s, _ = views.shape
    with_bg = [j for j in range(b) if bool(has_bg[j])]
    out = views.clone()
    for i in range(b):
        for k in range(v):
            if random.random() >= p_mix:
                continue
            others = [j for j in with_bg if j != i]
            if others:
                patch = patches[random.choice(others)]
            elif queue:
                patch = random.choice(queue)
            else:
                continue
            reps = (1, -(-s // patch.shape[-2]), -(-s // patch.shape[-1]))
            background = torch.tile(patch, reps)[:, :s, :s]
            m = masks[i, k]
            out[i, k] = m * views[i, k] + (1 - m) * background
    for j in with_bg:
        queue.append(patches[j].clone())
    return out


class ReferenceStyleLoader:
    """DataLoader over :class:`ReferenceStyleDataset` + the main-process BG-Mixup loop.

    Iterating yields (views [B, V, 3, S, S] float32, labels [B]); ``set_epoch(e)`` reseeds the
    shuffle, like the engines' loaders.
    """

    def __init__(self, path: str, *, batch_size: int, image_size: int, views: int = 2, oa_crop: bool = True,
                 bg_mixup: float = 0.4, num_workers: int = 2, seed: int = 0):
        self.bg_mixup, self.seed = float(bg_mixup), seed
        self.dataset = ReferenceStyleDataset(path, image_size=image_size, views=views, oa_crop=oa_crop,
                                             with_mask=self.bg_mixup > 0)
        self.generator = torch.Generator()
        self.loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                 num_workers=num_workers, generator=self.generator,
                                 persistent_workers=num_workers > 0)
        self.queue: collections.deque = collections.deque(maxlen=_QUEUE_LEN)
        self._epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def __iter__(self):
        self.generator.manual_seed(self.seed * 1_000_003 + self._epoch)
        self._epoch += 1
        for views, masks, patches, has_bg, labels in self.loader:
            if self.bg_mixup > 0:
                views = bg_mixup_loop(views, masks, patches, has_bg, self.bg_mixup, self.queue)
            yield views, labels
