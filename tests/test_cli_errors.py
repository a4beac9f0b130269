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


def one_line_error(result) -> str:
    """The one line of a command that failed as a user's error should (exit 1, no traceback)."""
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_a_checkpoint_of_another_model_is_one_line(tmp_path: Path, images: Path):
    """A9: labeling with, or fitting from, another model's checkpoint names the checkpoint and
    the model, instead of torch's key-by-key dump (labeling) or traceback (fitting)."""
    from labeler_service.sample import make_random_checkpoint

    other = make_random_checkpoint(tmp_path / "convnext.safetensors", model="test_convnext",
                                   num_classes=3)
    store = ["--store", str(tmp_path / "store")]
    runner = CliRunner()
    assert runner.invoke(labeler, ["datasets", "add", "toy", str(images), *store]).exit_code == 0
    common = ["toy", "--model", "test_nfnet", "--checkpoint", str(other), "--input-size", "64",
              "--workers", "0", "--no-progress", *store]
    for command in (["label"], ["teacher", "fit", "--out", str(tmp_path / "t.safetensors")]):
        line = one_line_error(runner.invoke(labeler, [*command, *common]))
        assert f"checkpoint {other} does not fit test_nfnet" in line, line
        assert "is it a checkpoint of another model?" in line and len(line) < 500, line


def test_fitting_into_an_unwritable_folder_is_refused_before_training(
        tmp_path: Path, images: Path, read_only_folder: Path):
    """A8: one line at once, not a traceback after the whole fit."""
    store = ["--store", str(tmp_path / "store")]
    runner = CliRunner()
    assert runner.invoke(labeler, ["datasets", "add", "toy", str(images), *store]).exit_code == 0
    out = read_only_folder / "teacher.safetensors"
    line = one_line_error(runner.invoke(labeler, [
        "teacher", "fit", "toy", "--model", "test_nfnet", "--input-size", "64", "--epochs", "1",
        "--workers", "0", "--no-progress", "--out", str(out), *store]))
    assert line.startswith(f"Error: --out {out}: cannot write there ("), line
    assert list(read_only_folder.iterdir()) == []
