"""objloader-build: the record schema, FFCV and WebDataset writers, manifest, readers."""
from ..errors import BuildError, DatasetError
from .builder import build
from .integrity import check_integrity, dataset_dirs, read_manifest
from .reader import BuiltDataset, open_dataset
from .schema import SCHEMA_VERSION, BuildOptions, MaskProvider, Record

__all__ = ["BuildError", "BuildOptions", "MaskProvider", "BuiltDataset", "DatasetError", "Record", "SCHEMA_VERSION",
           "build", "check_integrity", "dataset_dirs", "open_dataset", "read_manifest"]
