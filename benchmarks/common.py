"""What every benchmark script does with its results: a table, then one JSON line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def main(parse_args: Callable, run: Callable[..., dict],
         print_table: Callable[[dict], None]) -> None:
    """A benchmark script's entry point: parse, run, print the table and the JSON line."""
    args = parse_args()
    emit(run(args), print_table, args.json_out)


def emit(out: dict, print_table: Callable[[dict], None], json_out: Path | None) -> None:
    print_table(out)
    line = json.dumps(out)
    print(line)
    if json_out:
        json_out.write_text(line + "\n")
