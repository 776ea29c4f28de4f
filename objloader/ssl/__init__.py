"""Self-supervised training and evaluation: MoCo v2, BYOL, the trainer, the linear probe, the
Background Challenge, localisation of ContraCAM masks, the object-crop probe.

Commands: objloader-train-moco / objloader-train-byol (objloader.ssl.trainer) and objloader-linear
(objloader.ssl.bgchallenge), also as train/moco.py, train/byol.py, train/linear.py.
"""

from ..checkpoint import CheckpointError, build_backbone, load_backbone
from .linear import linear_probe

__all__ = ["build_backbone", "load_backbone", "CheckpointError", "linear_probe"]
