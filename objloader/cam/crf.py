"""Dense-CRF refinement of soft object masks (pydensecrf), with the parameters of ContraCAM's
public code: Gaussian sxy 3 compat 3, bilateral sxy 80 srgb 13 compat 10, 5 mean-field steps.

The unary is the soft mask as a two-label probability (background 1 - m, object m); the result is
the CRF's object marginal, so masks stay soft. A process pool refines a batch in parallel.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Optional

import cv2
import numpy as np

from ..optional import require

__all__ = ["CRFConfig", "crf_pool", "crf_refine", "crf_refine_batch"]


@dataclass(frozen=True)
class CRFConfig:
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 80.0
    bilateral_srgb: float = 13.0
    bilateral_compat: float = 10.0
    iterations: int = 5


def crf_refine(image: np.ndarray, mask: np.ndarray, cfg: CRFConfig = CRFConfig()) -> np.ndarray:
    """Refine a soft mask (float [m, m] in [0, 1], any resolution) with an RGB uint8 image [H, W, 3].

    Returns the object marginal as float32 [H, W] in [0, 1] at the image's resolution.
    """
    dcrf = require("pydensecrf.densecrf", "the dense-CRF refinement (turn it off with --no-crf)")
    unary_from_softmax = require("pydensecrf.utils", "the dense-CRF refinement").unary_from_softmax

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"crf_refine wants an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    m = cv2.resize(np.asarray(mask, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    m = np.clip(m, 1e-5, 1 - 1e-5)
    crf = dcrf.DenseCRF2D(w, h, 2)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(np.stack([1 - m, m]))))
    crf.addPairwiseGaussian(sxy=cfg.gaussian_sxy, compat=cfg.gaussian_compat)
    crf.addPairwiseBilateral(sxy=cfg.bilateral_sxy, srgb=cfg.bilateral_srgb, rgbim=np.ascontiguousarray(image),
                             compat=cfg.bilateral_compat)
    marginals = np.asarray(crf.inference(cfg.iterations), np.float32).reshape(2, h, w)
    return marginals[1]


def crf_pool(workers: int) -> Optional[ProcessPoolExecutor]:
    """A process pool for :func:`crf_refine_batch` to reuse across batches (None for one worker)."""
    if workers <= 1:
        return None
    # forkserver: forking a process that runs OpenMP / numba / torch threads can deadlock the child.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))


def _refine_one(job):
    image, mask, cfg, out_size = job
    m = crf_refine(image, mask, cfg)
    return m if out_size is None else cv2.resize(m, (out_size, out_size), interpolation=cv2.INTER_AREA)


def crf_refine_batch(images, masks, cfg: CRFConfig = CRFConfig(), workers: int = 1,
                     pool: Optional[ProcessPoolExecutor] = None, out_size: Optional[int] = None) -> list:
    """:func:`crf_refine` over pairs (image, mask), each result resized to [out_size, out_size] when
    given. Runs in ``pool`` (see :func:`crf_pool`) when given, else in a pool of ``workers`` > 1
    made for this call, else serially."""
    jobs = [(img, m, cfg, out_size) for img, m in zip(images, masks)]
    if pool is not None:
        return list(pool.map(_refine_one, jobs))
    if workers <= 1 or len(jobs) < 2:
        return [_refine_one(j) for j in jobs]
    with crf_pool(workers) as own:
        return list(own.map(_refine_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))))
