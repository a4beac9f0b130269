"""The held-out split every part of the project agrees on: a stable hash of the image path.

``labeler teacher fit`` holds these images out of the teacher's training, ``trainer`` out of the
student's, and label quality is reported on them, so all three use this one function.
"""

from __future__ import annotations

import hashlib

import numpy as np


def held_out(paths: np.ndarray, permille: int) -> np.ndarray:
    """A stable split: image i is held out when sha256(path) mod 1000 < permille."""
    digests = [int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "big") for p in paths]
    return np.asarray(digests, dtype=np.uint64) % np.uint64(1000) < np.uint64(permille)
