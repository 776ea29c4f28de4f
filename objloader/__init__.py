"""objloader: object-aware contrastive learning (Mo et al., NeurIPS 2021) as a data-loading toolkit.

The entry point for training code is :func:`make_loader`; datasets come from ``objloader-build``.
"""

from .loaders import Batch, make_loader

__all__ = ["make_loader", "Batch"]
