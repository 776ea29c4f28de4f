"""Keyword names the API spelled differently before it chose one spelling (torchvision's:
``normalize``, ``color``, ``grayscale``), still accepted for a while with a DeprecationWarning."""

from __future__ import annotations

import functools
import warnings

__all__ = ["renamed_keywords"]


def renamed_keywords(**new_by_old: str):
    """Decorator: a call passing an old keyword (``normalise=True``) runs as if it had passed the
    new one (``normalize=True``), with a DeprecationWarning naming both; passing both is an error."""

    def wrap(fn):
        @functools.wraps(fn)
        def call(*args, **kwargs):
            for old, new in new_by_old.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__qualname__}() got both {old}= and {new}=; pass only {new}=")
                    warnings.warn(f"{fn.__qualname__}({old}=) is deprecated; pass {new}=", DeprecationWarning,
                                  stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call

    return wrap
