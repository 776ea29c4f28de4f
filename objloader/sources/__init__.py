"""Readers of user data (ImageFolder, COCO json, list files) and the built-in demo generator."""
from .base import Sample, SourceError
from .coco import read_coco, rle_to_mask, segments_to_mask
from .imagefolder import read_imagefolder
from .listfile import read_listfile
from .resolve import open_source, SourceSpec

__all__ = ["Sample", "SourceError", "read_coco", "read_imagefolder", "read_listfile", "rle_to_mask",
           "segments_to_mask", "open_source", "SourceSpec"]
