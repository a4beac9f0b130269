"""The timm model names, for checking requests in the API without importing torch there.

Importing timm imports torch: ~4 s and ~700 MB in an API process that never runs a model. The
names are listed once per process, in a short-lived child process, and kept.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading

LIST_MODELS = "import json, timm; print(json.dumps(timm.list_models()))"

_lock = threading.Lock()
_names: frozenset[str] | None = None


def timm_model_names() -> frozenset[str]:
    """Every name ``timm.create_model`` knows (one child process, the first time)."""
    global _names
    with _lock:  # concurrent first callers wait for one listing, not start one each
        if _names is None:
            out = subprocess.run([sys.executable, "-c", LIST_MODELS], capture_output=True,
                                 text=True, check=True, timeout=300).stdout
            _names = frozenset(json.loads(out))
        return _names


def warm() -> None:
    """List them ahead of the first request; a failure here is retried by that request."""
    with contextlib.suppress(Exception):
        timm_model_names()
