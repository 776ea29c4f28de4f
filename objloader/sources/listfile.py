"""Plain list files: one image per line, `PATH [LABEL [MASK_PATH]]`.

Fields are separated by tabs when the line has one (so paths may contain spaces), otherwise by
whitespace. Relative paths are relative to the list file's folder. Blank lines and lines
starting with '#' are ignored. A path whose bytes are not valid UTF-8 is skipped with a reason
naming it (bytes written as \\xNN), as in an ImageFolder; the other lines are built.

Each line is a reference to a file and stays inside the list file's folder: a path (image or
mask) that leads outside it (`../`, an absolute path, a link) is a counted skip naming the line
unless `follow_links` (objloader-build --follow-links). Lines naming one file, however spelled
(`./x/a.jpg`, `x//a.jpg`, a link to it), make one record (sources/survey.py): the first line
keeps it and each later one is a counted skip naming both; lines that give that file different
labels or masks are all skipped.
"""
from __future__ import annotations

import os
from typing import List

from ..errors import SourceError
from .base import Sample, file_sample
from .survey import inside, one_record_per_file, outside_reason


def read_listfile(list_path: str, follow_links: bool = False) -> List[Sample]:
    if not os.path.isfile(list_path):
        raise SourceError(f"list file {list_path!r} does not exist")
    base = os.path.dirname(os.path.abspath(list_path))
    real_base = os.path.realpath(base)
    samples: List[Sample] = []
    with open(list_path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            # Decoded as file names are, so one undecodable path skips its line, not the whole list.
            line = raw.decode("utf-8", "surrogateescape").strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split("\t") if "\t" in line else line.split()
            if len(fields) > 3:
                raise SourceError(f"{list_path}:{lineno}: expected 'PATH [LABEL [MASK]]', got {line!r}")
            rel = fields[0]
            try:
                label = int(fields[1]) if len(fields) > 1 else -1
            except ValueError:
                raise SourceError(f"{list_path}:{lineno}: label {fields[1]!r} is not an integer") from None
            path = rel if os.path.isabs(rel) else os.path.join(base, rel)
            mask = None
            if len(fields) > 2:
                mask = fields[2] if os.path.isabs(fields[2]) else os.path.join(base, fields[2])
                if not os.path.isfile(mask):
                    raise SourceError(f"{list_path}:{lineno}: mask {mask!r} does not exist")
            s = file_sample(rel, path, label=label, gt_mask_path=mask, origin=f"{list_path}:{lineno}")
            if not follow_links and s.invalid is None:
                out = [(w, p) for w, p in (("image", path), ("mask", mask)) if p is not None and not inside(p, real_base)]
                if out:
                    s.invalid = f"{list_path}:{lineno}: " + outside_reason(out[0][0], out[0][1], base)
            samples.append(s)
    if not samples:
        raise SourceError(f"list file {list_path!r} lists no images")
    return one_record_per_file(samples)
