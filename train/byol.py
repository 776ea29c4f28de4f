"""BYOL pre-training on an object-aware loader: `python train/byol.py --help`.

Thin script over objloader.cli.train (installed as `objloader-train-byol`); multi-process:
`torchrun --nproc_per_node N train/byol.py ...`.
"""
import sys

from objloader.cli.train import main

if __name__ == "__main__":  # required: the torch engine starts its workers from a forkserver
    sys.exit(main("byol"))
