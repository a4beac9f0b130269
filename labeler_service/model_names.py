"""The timm model names, for checking requests in the API without importing torch there.

Importing timm imports torch: ~4 s and ~700 MB in an API process that never runs a model. The
names are listed once, in a short-lived child process, and kept.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache

LIST_MODELS = "import json, timm; print(json.dumps(timm.list_models()))"


@lru_cache(maxsize=1)
def timm_model_names() -> frozenset[str]:
    out = subprocess.run([sys.executable, "-c", LIST_MODELS], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return frozenset(json.loads(out))
