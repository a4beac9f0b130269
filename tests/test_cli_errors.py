"""Every command's error a user can fix: one line on stderr, exit status 1, no traceback.
(Malformed arguments are click's usage errors: exit status 2 with the usage line.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from labeler_service.cli import main as labeler
from trainer.cli import main as trainer


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """An empty store, and a file that is not a checkpoint."""
    root = tmp_path_factory.mktemp("errors")
    (root / "junk.pt").write_bytes(b"not a checkpoint")
    (root / "empty").mkdir()
    return root


def cases(root: Path) -> list[tuple[object, list[str], str]]:
    s = ["--store", str(root / "store")]
    return [
        (labeler, ["store", "verify", "--store", str(root / "no-store")], "no-store"),
        (labeler, ["label", "nope", "--model", "test_nfnet", "--random-weights",
                   "--input-size", "64", *s], "nope"),
        (labeler, ["evaluate-labels", "no-such-labelset", *s], "no-such-labelset"),
        (labeler, ["teacher", "fit", "nope", "--model", "test_nfnet", "--input-size", "64",
                   "--out", str(root / "t.safetensors"), *s], "nope"),
        (labeler, ["import-tokenlabeling", "nope", str(root / "empty"), *s], "nope"),
        (trainer, ["train", "--dataset", "nope", "--labels", "x", "--out", str(root / "run"),
                   *s], "nope"),
        (trainer, ["eval", "--dataset", "nope", "--labels", "x", "--checkpoint",
                   str(root / "junk.pt"), *s], "junk.pt"),
        (trainer, ["convert", str(root / "junk.pt"), str(root / "out.pt")], "junk.pt"),
        (trainer, ["artifacts", str(root / "junk.pt"), "--dataset", "nope", *s], "junk.pt"),
    ]


@pytest.mark.parametrize("index", range(9))
def test_user_errors_are_one_line(store: Path, index: int):
    cli, args, mention = cases(store)[index]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1, (args, result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert mention in lines[0] and "Traceback" not in result.output


def test_a_teacher_that_cannot_compile_is_one_line(tmp_path: Path, images: Path,
                                                   checkpoint: Path):
    """``labeler label --compile`` where inductor has no C++ compiler (a machine without
    build tools): one line that says how to label anyway. A child process, so that inductor
    reads this environment, with its own cache, so that nothing compiled earlier is reused."""
    env = os.environ | {"CXX": str(tmp_path / "no-such-g++"),
                        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    labeler_cli = [sys.executable, "-m", "labeler_service"]
    store = ["--store", str(tmp_path / "store")]
    subprocess.run([*labeler_cli, "datasets", "add", "toy", str(images), *store], check=True,
                   capture_output=True)
    proc = subprocess.run([*labeler_cli, "label", "toy", "--model", "test_nfnet",
                           "--checkpoint", str(checkpoint), "--input-size", "64", "--topk", "2",
                           "--workers",
                           "0", "--no-progress", "--compile", *store],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("Error: torch.compile could not compile the teacher")
    assert "label without compiling" in lines[0]
