"""objloader: object-aware contrastive learning (Mo et al., NeurIPS 2021) as a data-loading toolkit.

The entry point for training code is :func:`make_loader`; datasets come from ``objloader-build``.
Importing the package imports nothing heavy: ``make_loader`` and ``Batch`` are loaded (with
torch, numba and the engines' modules) on first use.
"""

__all__ = ["make_loader", "Batch"]


def __getattr__(name):
    if name in __all__:
        from . import loaders

        return getattr(loaders, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
