"""The optional heavy dependencies (FFCV, DALI, pydensecrf): each is imported only where it is
used, so ``import objloader``, the torch engine, the device stage, the trainers and ContraCAM
work with the core install (``pip install objloader``: torch alone, on a GPU box without a
package registry, say). Each library is an extra of the package (``setup.py``); asking for a
feature whose library is missing raises :class:`MissingDependency`, naming the feature and the
extra to install."""
from __future__ import annotations

import importlib

from .errors import ObjloaderError

__all__ = ["MissingDependency", "require", "EXTRAS"]

# Import name -> the extras of setup.py that provide it, the first the one to suggest, each with
# what it is for. tests/test_optional_deps.py checks these names against setup.py's extras_require.
EXTRAS = {
    "ffcv": (("ffcv", ""),),
    # DALI's wheels are per CUDA major version: both are named, the user knows which they have
    "nvidia.dali": (("dali", "CUDA 13"), ("dali-cuda12", "CUDA 12")),
    "pydensecrf": (("crf", ""),),
}


class MissingDependency(ObjloaderError, ImportError):
    """An optional library that a requested feature needs is not importable."""


def _install_hint(top: str) -> str:
    """``pip install 'objloader[EXTRA]'`` for the library ``top`` (a key of EXTRAS)."""
    return " or ".join(f"pip install 'objloader[{extra}]'" + (f" ({what})" if what else "")
                       for extra, what in EXTRAS[top])


def require(module: str, feature: str):
    """Import ``module`` (a key of EXTRAS or a submodule of one) for ``feature``."""
    top = next((name for name in EXTRAS if module == name or module.startswith(name + ".")), None)
    if top is None:
        raise ValueError(f"{module!r} is not one of objloader's optional dependencies")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(f"{feature} needs {top!r}, which cannot be imported here ({e}); "
                                f"install it with: {_install_hint(top)}") from e
