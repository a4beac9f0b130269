"""Cheap checks that a file can be a checkpoint, without torch (the API runs them per request).

They catch what is plainly not a checkpoint (an empty or text file, a truncated or garbage
safetensors file, anything that is neither a torch zip archive nor a pickle) before a job is
queued. A file that passes may still fail when a worker loads it (a pickle of the wrong thing, a
state dict for another model): the job then fails with the reason.
"""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

SAFETENSORS_MAX_HEADER = 100 * 2**20  # the safetensors library's own limit
PICKLE_PROTOCOL = 0x80  # the first byte of a pickle of protocol 2 or later (legacy torch.save)


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a checkpoint, or None if it may be one."""
    try:
        size = path.stat().st_size
        if size == 0:
            return "the file is empty"
        with open(path, "rb") as f:
            head = f.read(8)
            if path.suffix == ".safetensors":
                return safetensors_problem(f, head, size)
    except OSError as e:
        return f"the file cannot be read ({e.strerror})"
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


def safetensors_problem(f, head: bytes, size: int) -> str | None:
    if len(head) < 8:
        return "not a safetensors file: shorter than its header length"
    (length,) = struct.unpack("<Q", head)
    if length > min(SAFETENSORS_MAX_HEADER, size - 8):
        return "not a safetensors file: its header length is beyond the file"
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "not a safetensors file: its header is not JSON"
    if not isinstance(header, dict):
        return "not a safetensors file: its header is not a table of tensors"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= entry.keys()):
            return f"not a safetensors file: entry {name[:60]!r} is not a tensor"
        end = max(end, int(entry["data_offsets"][1]))
    if 8 + length + end > size:
        return "a truncated safetensors file: its tensors end beyond the file"
    return None
