"""The errors objloader raises on purpose, all under one base.

A command-line tool catches :class:`ObjloaderError` alone and prints its message: it describes a
problem with the user's input, data, settings or environment. Anything else is a bug and keeps
its traceback. Each subclass also derives from the built-in type it used to be (ValueError,
RuntimeError, ImportError), so code that caught those keeps working.

This module imports nothing, so every stage of the data flow can use it.
"""
from __future__ import annotations

__all__ = ["ObjloaderError", "ConfigError", "ProbeError", "RunError", "DivergedError"]


class ObjloaderError(Exception):
    """Base of every error objloader raises deliberately (bad input, data, settings, environment)."""


class ConfigError(ObjloaderError, ValueError):
    """An argument or setting that is out of range or inconsistent with another."""


class ProbeError(ObjloaderError, ValueError):
    """Features or labels a linear probe cannot be fitted or scored on."""


class RunError(ObjloaderError, RuntimeError):
    """A run that had to stop: a worker process died, a rank stopped answering."""


class DivergedError(RunError, FloatingPointError):
    """Training produced a non-finite loss or model state; the last good checkpoint is kept."""
