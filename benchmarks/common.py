"""What every benchmark script does with its results: a table, then one JSON line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def emit(out: dict, print_table: Callable[[dict], None], json_out: Path | None) -> None:
    print_table(out)
    line = json.dumps(out)
    print(line)
    if json_out:
        json_out.write_text(line + "\n")
