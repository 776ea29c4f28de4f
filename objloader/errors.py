"""The errors objloader raises on purpose, all under one base.

A command-line tool catches :class:`ObjloaderError` alone and prints its message: it describes a
problem with the user's input, data, settings or environment. Anything else is a bug and keeps
its traceback. Each subclass also derives from the built-in type it used to be (ValueError,
RuntimeError, ImportError), so code that caught those keeps working.

This module imports nothing, so every stage of the data flow can use it.
"""
from __future__ import annotations

__all__ = ["ObjloaderError", "ConfigError", "ProbeError", "RunError", "DivergedError", "FileWriteError",
           "CheckpointError", "SourceError", "DemoError", "CamError", "StageError", "MaskPairingError",
           "DatasetError", "BuildError"]


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


class FileWriteError(ObjloaderError, OSError):
    """A file that could not be written (a full disk, a read-only filesystem); the message names it."""


class CheckpointError(ObjloaderError, ValueError):
    """A checkpoint that is missing, corrupt, or not what the caller needs."""


# --- by stage of the data flow (DESIGN.md, "Data flow") ------------------------------------

class SourceError(ObjloaderError, ValueError):
    """A source path or file that cannot be read; the message names the path."""


class DemoError(ObjloaderError, RuntimeError):
    """The demo cannot be written (bad option, output exists, ...)."""


class CamError(ObjloaderError, RuntimeError):
    """A mask run or mask store that cannot be used; the message says what to do."""


class StageError(ObjloaderError, ValueError):
    """A staged chunk that cannot be read back as the build wrote it."""


class MaskPairingError(ObjloaderError, RuntimeError):
    """A ContraCAM mask that cannot be paired with its image: never skipped, always an error."""


class DatasetError(ObjloaderError, ValueError):
    """A path that is not a built dataset, or a dataset that fails its own checks."""


class BuildError(ObjloaderError, RuntimeError):
    """A build that cannot go on; the message says what to do."""
