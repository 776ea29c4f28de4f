"""MoCo v2 pre-training on an object-aware loader: `python train/moco.py --help`.

Thin script over objloader.cli.train (installed as `objloader-train-moco`); multi-process:
`torchrun --nproc_per_node N train/moco.py ...`.
"""
import sys

from objloader.cli.train import main

if __name__ == "__main__":  # required: the torch engine starts its workers from a forkserver
    sys.exit(main("moco"))
