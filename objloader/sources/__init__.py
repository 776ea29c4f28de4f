"""Readers of user data (ImageFolder with masks beside or in a parallel tree, COCO json, list
files, the Background Challenge's published layout) and the built-in demo generator."""
from ..errors import SourceError
from .base import Sample, SourceSpec
from .coco import read_coco
from .imagefolder import read_imagefolder
from .listfile import read_listfile
from .rasterise import rle_to_mask, segments_to_mask
from .resolve import open_source

__all__ = ["Sample", "SourceError", "read_coco", "read_imagefolder", "read_listfile", "rle_to_mask",
           "segments_to_mask", "open_source", "SourceSpec"]
