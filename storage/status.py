"""Per-image status codes stored in ``labels/<id>/status`` (int8). Part of the format contract."""

from enum import IntEnum


class ImageStatus(IntEnum):
    """0 is labeled, -1 is not yet written (the fill value), positive values are failures."""

    PENDING = -1
    LABELED = 0
    UNREADABLE = 1  # not an image, corrupt or truncated data
    EMPTY_FILE = 2  # zero bytes
    TOO_MANY_PIXELS = 3  # over the pixel limit (decompression bomb guard)
    MISSING_FILE = 4  # listed in the manifest, gone from disk
    CHANGED_FILE = 5  # sha256 differs from the manifest
    LABEL_FILE_MISSING = 6  # import: no label file for this image
    LABEL_FILE_INVALID = 7  # import: label file unreadable or of the wrong shape
    NOT_A_FILE = 8  # a directory, FIFO, socket or device where the image was
    OUTSIDE_ROOT = 9  # resolves outside the dataset's folder (a symlink out)
    SHARD_GAVE_UP = 10  # its shard's task died or timed out on every delivery

    @property
    def description(self) -> str:
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    ImageStatus.PENDING: "not yet labeled",
    ImageStatus.LABELED: "labeled",
    ImageStatus.UNREADABLE: "unreadable image (not an image, corrupt or truncated)",
    ImageStatus.EMPTY_FILE: "empty file",
    ImageStatus.TOO_MANY_PIXELS: "too many pixels (over the decompression-bomb limit)",
    ImageStatus.MISSING_FILE: "file missing",
    ImageStatus.CHANGED_FILE: "file changed since the dataset was registered",
    ImageStatus.LABEL_FILE_MISSING: "no label file to import",
    ImageStatus.LABEL_FILE_INVALID: "label file unreadable or of the wrong shape",
    ImageStatus.NOT_A_FILE: "not a regular file (a directory, FIFO, socket or device)",
    ImageStatus.OUTSIDE_ROOT: "the path resolves outside the dataset folder",
    ImageStatus.SHARD_GAVE_UP: "its shard's labeling crashed or timed out on every delivery",
}
