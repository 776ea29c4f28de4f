"""The settings of a ContraCAM mask run, the one configuration of ContraCAM: the model
(objloader.cam.contracam.ContraCAM) and the mask run both read it (no torch here:
objloader-build parses them too)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Optional

from ..ranges import IMAGE_SIZE, MASK_RES, Range, check_ranges

__all__ = ["CamSettings", "MIN_CAM_CELLS"]

# A CAM needs a feature map of at least 4 x 4 cells: a 1 x 1 map is constant, so its min-max
# normalisation gives an all-empty mask, and 2 x 2 cannot place an object anywhere but a corner.
# The smallest input is therefore 4 x the trunk's total stride (ResNet: 32, 16 with stride
# expansion, 8 / 4 with the small stem); load_contracam checks it once the stride is known.
MIN_CAM_CELLS = 4


@dataclass(frozen=True)
class CamSettings:
    """Everything that changes the masks (CLI flags map onto it 1:1). ``iterations`` defaults to
    10 as README.md and objloader-cam say (the paper's refinement for several objects per image;
    the model's own config, merged into this one, had defaulted to 1)."""

    temperature: float = 0.2       # of the contrastive score (MoCo v2's InfoNCE temperature)
    iterations: int = 10           # T of the iterative refinement: 10 for boxes of several objects, 1 for one
    relu_weights: bool = True      # negative-signal removal on the channel weights
    stride_expansion: bool = True  # last ResNet stage at stride 1: twice the map resolution (better masks
                                   # on the demo: benchmarks/results/demo_loop/contracam_settings)
    image_size: Optional[int] = None  # side of the square input; None = 2x the checkpoint's view size
    mask_res: int = 64             # R: stored masks are uint8 [R, R] over the unit square
    crf: bool = True               # dense-CRF refinement of the final mask
    batch_size: int = 128          # images per ContraCAM batch (each other's negatives)

    # Every numeric field's range, shared by the flags of objloader-cam and objloader-build.
    RANGES: ClassVar[dict] = {
        "temperature": Range(float, 0, 10, lo_open=True),
        "iterations": Range(int, 1, 100),
        # the smallest trunk stride (small stem, stride expansion) is 4: see MIN_CAM_CELLS
        "image_size": Range(int, 4 * MIN_CAM_CELLS, IMAGE_SIZE.hi, why="4 cells of the finest trunk; 1024: memory"),
        "mask_res": MASK_RES,
        "batch_size": Range(int, 2, 4096, why="the rest of the batch are the negatives"),
    }

    def __post_init__(self):
        check_ranges(self, self.RANGES, "ContraCAM settings")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
