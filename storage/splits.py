"""The held-out split every part of the project agrees on: a stable hash of the image path.

``labeler teacher fit`` holds these images out of the teacher's training, ``trainer`` out of the
student's, and label quality is reported on them, so all three use this one function.
"""

from __future__ import annotations

import hashlib

import numpy as np


def held_out(paths: np.ndarray, permille: int) -> np.ndarray:
    """A stable split: image i is held out when its :func:`split_bucket` is below permille."""
    return split_bucket(paths) < permille


def split_bucket(paths: np.ndarray) -> np.ndarray:
    """Each path's bucket, 0..999: sha256(path) mod 1000 (int64). Buckets below p are the
    held-out split at p per mille; a band of buckets above it is a validation split that a
    run holding out the band's top never trains on."""
    digests = [int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") for p in paths]
    return (np.asarray(digests, dtype=np.uint64) % np.uint64(1000)).astype(np.int64)
