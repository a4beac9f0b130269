"""The tokenlabel store: image manifests and dense token labels in Zarr v3 (format v2)."""

from storage.dataset import Dataset
from storage.errors import (
    DatasetChangedError,
    DatasetUnfinished,
    FolderChangedDuringScan,
    LabelSetMismatchError,
    ManifestDamaged,
    ShardUnreadable,
    StoreError,
)
from storage.labelset import (
    ARRAY_NAMES,
    LABEL_ARRAYS,
    LabelBlock,
    LabelSet,
    LabelSetConfig,
    TeacherSpec,
    class_dtype,
)
from storage.manifest import IMAGE_SUFFIXES, Manifest, PathColumn, scan_image_folder
from storage.status import ImageStatus
from storage.store import FORMAT, FORMAT_VERSION, Store

__all__ = [
    "ARRAY_NAMES",
    "FORMAT",
    "FORMAT_VERSION",
    "IMAGE_SUFFIXES",
    "LABEL_ARRAYS",
    "Dataset",
    "DatasetChangedError",
    "DatasetUnfinished",
    "FolderChangedDuringScan",
    "ImageStatus",
    "LabelBlock",
    "LabelSet",
    "LabelSetConfig",
    "LabelSetMismatchError",
    "Manifest",
    "ManifestDamaged",
    "PathColumn",
    "ShardUnreadable",
    "Store",
    "StoreError",
    "TeacherSpec",
    "class_dtype",
    "scan_image_folder",
]
