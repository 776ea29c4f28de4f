"""Linear probe + Background-Challenge report: `python train/linear.py --help`.

Thin script over objloader.cli.linear (installed as the `objloader-linear` command).
"""
import sys

from objloader.cli.linear import main

if __name__ == "__main__":  # required: feature extraction starts its workers from a forkserver
    sys.exit(main())
