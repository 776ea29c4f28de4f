"""What every command's parser shares: numeric flags typed by their declared
:class:`~objloader.ranges.Range`, the device flag, and errors in one line.

A numeric flag is added with ``type=ranged(R)``; a bare ``type=int`` or ``type=float`` is a flag
without a range, which tests/test_flag_ranges.py refuses.
"""
from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..ranges import Range, check_device

__all__ = ["Parser", "ranged", "device"]


class Parser(argparse.ArgumentParser):
    """argparse with its error as one line (the usage is one --help away), exit status 2, like
    the commands' own 'PROG: error: ...' lines."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Ranged:
    """argparse type: parse as the range's kind, then refuse a value outside it. Carries the Range
    (``.range``) so the flag's limits can be read back from the parser."""

    def __init__(self, r: Range):
        self.range = r
        self.__name__ = r.kind.__name__  # argparse names the type in 'invalid int value'

    def __call__(self, text: str):
        try:
            value = self.range.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {self.range.kind.__name__} value: {text!r}") from None
        if not self.range.contains(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range: {self.range.limits()}")
        return value

    def __repr__(self) -> str:
        return f"ranged({self.range})"


def ranged(r: Range) -> _Ranged:
    return _Ranged(r)


def device(text: str) -> str:
    """argparse type of --device: cpu, cuda or cuda:N that this machine has."""
    try:
        return check_device(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
