"""The settings of a ContraCAM mask run (no torch here: objloader-build parses them too)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError

__all__ = ["CamSettings"]


@dataclass(frozen=True)
class CamSettings:
    """Everything that changes the masks (CLI flags map onto it 1:1)."""

    temperature: float = 0.2       # of the contrastive score (MoCo v2's InfoNCE temperature)
    iterations: int = 10           # T of the iterative refinement: 10 for boxes of several objects, 1 for one
    relu_weights: bool = True      # negative-signal removal on the channel weights
    stride_expansion: bool = True  # last ResNet stage at stride 1: twice the map resolution (better masks
                                   # on the demo: benchmarks/results/demo_loop/contracam_settings)
    image_size: Optional[int] = None  # side of the square input; None = 2x the checkpoint's view size
    mask_res: int = 64             # R: stored masks are uint8 [R, R] over the unit square
    crf: bool = True               # dense-CRF refinement of the final mask
    batch_size: int = 128          # images per ContraCAM batch (each other's negatives)

    def __post_init__(self):
        for name in ("iterations", "mask_res", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be >= 2: the rest of the batch are the negatives")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
