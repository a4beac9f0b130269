"""The held-out split every part of the project agrees on: a stable hash of the image path.

``labeler teacher fit`` holds these images out of the teacher's training, ``trainer`` out of the
student's, and label quality is reported on them, so all three use this one function.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def held_out(paths: Iterable[str], permille: int) -> np.ndarray:
    """A stable split: image i is held out when its :func:`split_bucket` is below permille."""
    return split_bucket(paths) < permille


def split_bucket(paths: Iterable[str]) -> np.ndarray:
    """Each path's bucket, 0..999: sha256(path) mod 1000 (int16, as stored). Buckets below p
    are the held-out split at p per mille; a band of buckets above it is a validation split
    that a run holding out the band's top never trains on. Memory: 2 bytes a path, no Python
    int per path."""
    return np.fromiter((int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") % 1000
                        for p in paths), dtype=np.int16)
