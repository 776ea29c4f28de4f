"""The optional heavy dependencies (FFCV, DALI, pydensecrf): each is imported only where it is
used, so ``import objloader``, the torch engine, the device stage, the trainers and ContraCAM
work on a machine that has torch alone (a GPU box without a package registry, say). Asking for a
feature whose library is missing raises :class:`MissingDependency`, naming the feature and the
pip package that provides it."""
from __future__ import annotations

import importlib

from .errors import ObjloaderError

__all__ = ["MissingDependency", "require", "PIP_PACKAGES"]

# Import name -> the pip requirement objloader is tested with (constraints.txt).
PIP_PACKAGES = {
    "ffcv": "ffcv==1.0.2",
    "nvidia.dali": "nvidia-dali-cuda130==2.4.0",
    "pydensecrf": "pydensecrf2==1.1",
}


class MissingDependency(ObjloaderError, ImportError):
    """An optional library that a requested feature needs is not importable."""


def require(module: str, feature: str):
    """Import ``module`` (a key of PIP_PACKAGES or a submodule of one) for ``feature``."""
    top = next((name for name in PIP_PACKAGES if module == name or module.startswith(name + ".")), None)
    if top is None:
        raise ValueError(f"{module!r} is not one of objloader's optional dependencies")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{feature} needs {top!r}, which cannot be imported here ({e}); "
                                f"install it with: pip install {PIP_PACKAGES[top]}") from e
