"""What every benchmark script does with its results: a table, then one JSON line."""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch


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


def add_scratch_args(p: argparse.ArgumentParser) -> None:
    """``--dir``, ``--keep`` and ``--json-out``, as every benchmark that writes files has them."""
    p.add_argument("--dir", type=Path, default=None,
                   help="parent directory for the scratch files (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")


def check_device(p: argparse.ArgumentParser, device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")


@contextlib.contextmanager
def scratch_dir(args: argparse.Namespace, prefix: str) -> Iterator[Path]:
    """A fresh directory under ``--dir`` for a run's files, removed after it (``--keep``: kept)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=args.dir))
    try:
        yield base
    finally:
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def peak_gpu_memory(device: torch.device) -> Iterator[dict]:
    """``{"gib": ...}``, filled on exit with the peak memory torch allocated on ``device``
    inside the block (0 off CUDA)."""
    peak = {"gib": 0.0}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield peak
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak["gib"] = torch.cuda.max_memory_allocated(device) / 2**30
