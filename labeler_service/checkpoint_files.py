"""Cheap checks that a file can be a checkpoint, and the metadata of a fitted teacher, read
without torch (the API runs them per request).

They catch what is plainly not a checkpoint (an empty or text file, a truncated or garbage
safetensors file, a malformed safetensors header, anything that is neither a torch zip archive nor
a pickle) and malformed teacher metadata before a job is queued. A file that passes may still
fail when a worker loads it (a pickle of the wrong thing, a state dict for another model): the job
then fails with the reason.

Reasons are worded for every caller alike: they name the file's fault, never a CLI option or a
REST field (the caller knows how its user spells the fix).
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labeler_service.settings import INPUT_SIZE_MAX, INPUT_SIZE_MIN

SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit
PICKLE_PROTOCOL = 0x80  # the first byte of a pickle of protocol 2 or later (legacy torch.save)

# The metadata ``labeler teacher fit`` writes into its .safetensors checkpoints.
FITTED_FORMAT = "tokenlabel-teacher"
FITTED_FORMAT_VERSION = 1
OUTPUT_STRIDES = (8, 16, 32)  # the strides a teacher may be dilated to (timm's output_stride)


class TeacherError(ValueError):
    """The model or checkpoint cannot serve as a dense teacher (defined here, without torch, so
    that the checks below are teacher errors too)."""


class CheckpointFileError(TeacherError):
    """A file that cannot be a checkpoint, or whose teacher metadata is malformed. ``reason``
    says why without naming the file; the message names it."""

    def __init__(self, path: Path | str, reason: str):
        super().__init__(f"checkpoint {path}: {reason}")
        self.reason = reason


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint, or None if it may be one."""
    try:
        if path.stat().st_size == 0:
            return "the file is empty"
        if path.suffix == ".safetensors":
            fitted_metadata(path)  # reads and checks the header, and the metadata if fitted
            return None
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as e:
        return f"the file cannot be read ({e.strerror})"
    except CheckpointFileError as e:
        return e.reason
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                if not any(name.endswith("data.pkl") for name in archive.namelist()):
                    return "a zip archive, but not one torch.save wrote (no data.pkl)"
        except (zipfile.BadZipFile, OSError) as e:
            return f"a damaged zip archive ({e})"
        return None
    if head[:1] == bytes([PICKLE_PROTOCOL]):
        return None  # a legacy torch.save pickle: only loading it can tell more
    return "neither a torch checkpoint (zip archive or pickle) nor safetensors"


# -- safetensors ------------------------------------------------------------------------------

def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a .safetensors file, checked as far as it can be without reading the
    tensors: a table of tensor entries (dtype, shape, [begin, end] byte offsets) whose data lies
    inside the file, and string metadata. Raises CheckpointFileError (OSError if unreadable)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointFileError(path, "not a safetensors file: shorter than its header "
                                            "length")
        (length,) = struct.unpack("<Q", head)
        if length > min(SAFETENSORS_MAX_HEADER, size - 8):
            raise CheckpointFileError(path, "not a safetensors file: its header length is "
                                            "beyond the file")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise CheckpointFileError(path, "not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointFileError(path, "not a safetensors file: its header is not a table of "
                                        "tensors")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict)
            and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointFileError(path, "not a safetensors file: its __metadata__ is not a "
                                        "table of strings")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        problem = tensor_entry_problem(entry)
        if problem:
            raise CheckpointFileError(path, f"not a safetensors file: tensor {name[:60]!r} "
                                            f"{problem}")
        end = max(end, entry["data_offsets"][1])
    if 8 + length + end > size:
        raise CheckpointFileError(path, "a truncated safetensors file: its tensors end beyond "
                                        "the file")
    return header


def tensor_entry_problem(entry: Any) -> str | None:
    """What is wrong with one tensor's entry of a safetensors header, or None."""
    if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()):
        return "is not a tensor entry (dtype, shape, data_offsets)"
    if not isinstance(entry["dtype"], str):
        return f"has dtype {short(entry['dtype'])}, not a type name"
    shape = entry["shape"]
    if not (isinstance(shape, list) and all(is_count(v) for v in shape)):
        return f"has shape {short(shape)}, not a list of sizes"
    offsets = entry["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))
            and offsets[0] <= offsets[1]):
        return f"has data_offsets {short(offsets)}, not [begin, end] byte offsets"
    return None


def is_count(value: Any) -> bool:
    """A JSON integer >= 0 (not a bool, not a float such as 1e400 or NaN)."""
    return type(value) is int and value >= 0


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


# -- a fitted teacher's metadata ----------------------------------------------------------------

def _text(value: Any) -> bool:
    return isinstance(value, str)


def _share(value: Any) -> bool:
    return (value is None or (type(value) in (int, float) and math.isfinite(value)
                              and 0 <= value <= 1))


# Every field ``labeler teacher fit`` records (``FitReport.metadata`` writes these): what its
# value must be, and how to say so. ``model`` and ``class_names`` are required; the others may
# be absent.
FITTED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, str) and v != "", "a model name"),
    "class_names": (lambda v: isinstance(v, list) and v != [] and all(map(_text, v)),
                    "a non-empty list of class names"),
    "num_classes": (lambda v: is_count(v) and v > 0, "a class count"),
    "input_size": (lambda v: is_count(v) and INPUT_SIZE_MIN <= v <= INPUT_SIZE_MAX,
                   f"an input size in {INPUT_SIZE_MIN}..{INPUT_SIZE_MAX}"),
    "output_stride": (lambda v: v is None or (is_count(v) and v in OUTPUT_STRIDES),
                      f"null or one of {', '.join(map(str, OUTPUT_STRIDES))}"),
    "head_only": (lambda v: isinstance(v, bool), "true or false"),
    "dataset": (_text, "a dataset name"),
    "dataset_fingerprint": (_text, "a fingerprint"),
    "backbone_sha256": (lambda v: v is None or _text(v), "null or a digest"),
    "val_permille": (lambda v: is_count(v) and v <= 999, "a per mille in 0..999"),
    "epochs": (is_count, "an epoch count"),
    "train_images": (is_count, "an image count"),
    "heldout_images": (is_count, "an image count"),
    "heldout_top1": (_share, "null or a share in [0, 1]"),
    "heldout_top5": (_share, "null or a share in [0, 1]"),
    "created_at": (_text, "a time"),
    "code_version": (_text, "a version"),
}
REQUIRED_FITTED_FIELDS = ("model", "class_names")


def fitted_metadata(path: Path) -> dict[str, Any] | None:
    """What ``labeler teacher fit`` recorded in a checkpoint (model, class names, output stride,
    held-out accuracy, the dataset and split it was fitted on), every field checked; None for
    any other checkpoint. Raises CheckpointFileError for a malformed file or metadata.

    safetensors metadata is a flat str -> str map: values are stored as JSON and decoded here.
    """
    if Path(path).suffix != ".safetensors":
        return None
    raw = safetensors_header(path).get("__metadata__", {})
    if raw.get("format") != FITTED_FORMAT:
        return None
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k != "format"}
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointFileError(path, f"unreadable teacher metadata ({e})") from None
    if meta.get("format_version") != FITTED_FORMAT_VERSION:
        raise CheckpointFileError(path, f"teacher metadata version "
                                        f"{short(meta.get('format_version'))}; this code reads "
                                        f"version {FITTED_FORMAT_VERSION}")
    problem = fitted_fields_problem(meta)
    if problem:
        raise CheckpointFileError(path, f"malformed teacher metadata: {problem}")
    return meta


def fitted_fields_problem(meta: dict[str, Any]) -> str | None:
    """The first field of a fitted teacher's decoded metadata that is missing or malformed."""
    for name in REQUIRED_FITTED_FIELDS:
        if name not in meta:
            return f"no {name!r}"
    for name, (valid, expected) in FITTED_FIELDS.items():
        if name in meta and not valid(meta[name]):
            return f"{name!r} is {short(meta[name])}, not {expected}"
    if meta.get("num_classes", len(meta["class_names"])) != len(meta["class_names"]):
        return (f"'num_classes' is {meta['num_classes']} but there are "
                f"{len(meta['class_names'])} class names")
    return None
