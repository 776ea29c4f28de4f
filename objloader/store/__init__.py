"""objloader-build: the record schema, FFCV and WebDataset writers, manifest, readers."""
from .builder import BuildError, build
from .reader import BuiltDataset, DatasetError, check_integrity, dataset_dirs, open_dataset, read_manifest
from .schema import SCHEMA_VERSION, BuildOptions, MaskProvider, Record

__all__ = ["BuildError", "BuildOptions", "MaskProvider", "BuiltDataset", "DatasetError", "Record", "SCHEMA_VERSION",
           "build", "check_integrity", "dataset_dirs", "open_dataset", "read_manifest"]
