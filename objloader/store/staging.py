"""Staged records: the build's intermediate form, in chunk files written atomically.

Workers' records land here first; the FFCV and WebDataset writers then read them in order.
Chunks make an interrupted build resumable: a chunk file exists only when it is complete.
"""
from __future__ import annotations

import os
import pickle
from typing import Iterator, List

from .schema import Record

CHUNK = 512  # records per chunk file


def chunk_path(stage_dir: str, i: int) -> str:
    return os.path.join(stage_dir, f"chunk-{i:06d}.pkl")


def write_chunk(stage_dir: str, i: int, items: list) -> None:
    """items: per source sample, a Record or a skip reason (str), in source order."""
    path = chunk_path(stage_dir, i)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(items, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_chunk(stage_dir: str, i: int) -> list:
    with open(chunk_path(stage_dir, i), "rb") as f:
        return pickle.load(f)


class StagedRecords:
    """Random access to the staged Records (skips removed), for the format writers.

    Pickles cheaply (paths and the index only), so FFCV's writer processes can each open it.
    """

    def __init__(self, stage_dir: str, n_chunks: int, index: List[tuple]):
        """``index``: record i -> (chunk, position in chunk), from the caller that has just read
        every chunk itself (the builder's survey), so they are not read again here."""
        self.stage_dir = stage_dir
        self.n_chunks = n_chunks
        self.index: List[tuple] = index
        self._cached = (-1, None)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> Record:
        c, j = self.index[i]
        if self._cached[0] != c:  # records are read in order, so one cached chunk suffices
            self._cached = (c, read_chunk(self.stage_dir, c))
        return self._cached[1][j]

    def __iter__(self) -> Iterator[Record]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self):
        return {"stage_dir": self.stage_dir, "n_chunks": self.n_chunks, "index": self.index}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cached = (-1, None)
