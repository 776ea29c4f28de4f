"""objloader-train-moco / objloader-train-byol: the trainers of train/moco.py and train/byol.py as
console commands, so an installed package trains without a checkout. Multi-process:
``torchrun --nproc_per_node N $(which objloader-train-moco) ...``."""
from __future__ import annotations


def moco(argv=None) -> int:
    from objloader.ssl.trainer import main

    return main("moco", argv)


def byol(argv=None) -> int:
    from objloader.ssl.trainer import main

    return main("byol", argv)
