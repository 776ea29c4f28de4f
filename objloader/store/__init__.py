"""objloader-build: the record schema, FFCV and WebDataset writers, manifest, readers."""
from .builder import BuildError, build
from .reader import BuiltDataset, DatasetError, dataset_dirs, open_dataset, read_manifest
from .schema import SCHEMA_VERSION, BuildOptions, Record

__all__ = ["BuildError", "BuildOptions", "BuiltDataset", "DatasetError", "Record", "SCHEMA_VERSION",
           "build", "dataset_dirs", "open_dataset", "read_manifest"]
