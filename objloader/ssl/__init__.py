"""Self-supervised training and evaluation: MoCo v2, BYOL, the linear probe, the Background Challenge.

Scripts: train/moco.py, train/byol.py (objloader.ssl.trainer), train/linear.py (bgchallenge).
"""

from ..checkpoint import CheckpointError, build_backbone, load_backbone
from .linear import linear_probe

__all__ = ["build_backbone", "load_backbone", "CheckpointError", "linear_probe"]
