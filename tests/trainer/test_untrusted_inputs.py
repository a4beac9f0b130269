"""What the trainer is given by a careless or hostile hand: a checkpoint whose pickle would run
code, a FIFO or a directory for a checkpoint, a truncated ``last.pt``, images changed, deleted,
swapped for a FIFO or a symlink out of the folder after labeling, labels lost under a completion
summary, model options that are none, a batch larger than an epoch. Each is refused in one line
or skipped and counted; nothing hangs, nothing runs."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch.utils.data import DataLoader

from labeler_service.sample import make_sample_images
from storage import LabelSetConfig, Store, TeacherSpec
from tests.conftest import write_random_labels
from trainer.checkpoints import CheckpointError, read_checkpoint
from trainer.cli import main
from trainer.data.stream import StreamConfig, TokenLabelStream
from trainer.models import create_model

OFFICIAL = Path(__file__).resolve().parent.parent / "fixtures" / "lvvit_official_tiny.pth"
TINY = {"depth": 1, "embed_dim": 16, "num_heads": 2}


class RunsCode:
    """Unpickled, it would create ``marker``: what a hostile checkpoint does with os.system."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def toy(tmp_path) -> tuple[Path, str, Path]:
    """12 JPEGs of 3 classes in shards of 4, with complete labels written by hand (every field
    a teacher writes, so none reads as damaged) and the completion summary recorded: the store,
    the label set id and the image folder."""
    images = make_sample_images(tmp_path / "images", per_class=4)
    store = Store.open(tmp_path / "store")
    dataset, _ = store.add_dataset("toy", images)
    teacher = TeacherSpec(model="test_nfnet", checkpoint_sha256=None, num_classes=3,
                          input_size=64)
    labelset = dataset.create_labelset(LabelSetConfig(
        teacher=teacher, topk=2, grid=(2, 2), dataset_fingerprint=dataset.fingerprint,
        shard_size=4, chunk_size=2))
    write_random_labels(labelset)
    assert labelset.record_completion() is not None
    return tmp_path / "store", labelset.id, images


def image_path(toy, index: int) -> Path:
    store, _, images = toy
    return images / Store.open(store, mode="r").dataset("toy").paths()[index]


def stream_of(toy, **overrides) -> TokenLabelStream:
    store, labelset, _ = toy
    return TokenLabelStream(StreamConfig(**{
        "store": str(store), "dataset": "toy", "labelset": labelset, "image_size": 32,
        "val_permille": 0, "augment": False} | overrides))


def read_all(stream: TokenLabelStream, workers: int = 2) -> list[int]:
    """The indices the stream yields through a DataLoader of ``workers`` processes; a sample
    that takes over a minute fails the test (a FIFO waited on), rather than hanging it."""
    stream.track_skips(workers)
    loader = DataLoader(stream, batch_size=None, num_workers=workers,
                        timeout=60 if workers else 0)
    return sorted(int(item["index"]) for item in loader)


def one_line_error(result) -> str:
    assert result.exit_code == 1, (result.output, result.exception)
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def train_args(toy, out: Path, *more: str) -> list[str]:
    store, labelset, _ = toy
    return ["train", "--store", str(store), "--dataset", "toy", "--labels", labelset,
            "--model", "vit_tiny", "--input-size", "32", "--batch-size", "4", "--workers", "0",
            "--epochs", "1", "--max-steps-per-epoch", "1", "--val-permille", "0",
            "--no-progress", "--out", str(out), *more]


# -- A1: a checkpoint is data --------------------------------------------------------------

@pytest.mark.parametrize("command", ["convert", "eval", "eval-permille", "artifacts", "init",
                                     "resume", "legacy-pickle"])
def test_a_checkpoint_that_would_run_code_is_refused_by_every_command(toy, tmp_path, command):
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pt"
    if command == "legacy-pickle":  # torch.save's format before 1.6: a bare pickle
        evil.write_bytes(pickle.dumps({"state_dict": RunsCode(marker)}, protocol=2))
    else:
        torch.save({"state_dict": RunsCode(marker), "config": {}}, evil)
    store, labelset, _ = toy
    common = ["--store", str(store), "--dataset", "toy"]
    out = tmp_path / "run"
    args = {
        "convert": ["convert", str(evil), str(tmp_path / "out.pt")],
        "legacy-pickle": ["convert", str(evil), str(tmp_path / "out.pt")],
        "eval": ["eval", *common, "--labels", labelset, "--checkpoint", str(evil)],
        "eval-permille": ["eval", *common, "--labels", labelset, "--checkpoint", str(evil),
                          "--val-permille", "500"],
        "artifacts": ["artifacts", str(evil), *common],
        "init": train_args(toy, out, "--init", str(evil)),
        "resume": train_args(toy, out, "--resume"),
    }[command]
    if command == "resume":
        out.mkdir()
        shutil.copy(evil, out / "last.pt")
    line = one_line_error(CliRunner().invoke(main, args))
    assert not marker.exists()
    assert "refused" in line and "posix.system" in line and "could run code" in line


def test_official_checkpoints_load_with_their_args_and_nothing_global_changes(tmp_path):
    """timm's training script (the official LV-ViT code's) saves its command line as an
    argparse.Namespace: allowed while reading a checkpoint, and only then."""
    official = torch.load(OFFICIAL, weights_only=True)
    saved = {"epoch": 3, "arch": "lvvit", "state_dict": official["state_dict"],
             "optimizer": {"state": {}, "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999)}]},
             "version": 2, "args": argparse.Namespace(model="lvvit_t", lr=1e-3, drop=0.0),
             "metric": 80.5, "config": official["config"]}
    torch.save(saved, tmp_path / "model_best.pth.tar")
    assert read_checkpoint(tmp_path / "model_best.pth.tar").source == "official"
    with pytest.raises(pickle.UnpicklingError):  # torch's own allow-list is as it was
        torch.load(tmp_path / "model_best.pth.tar", weights_only=True)


# -- A6: a checkpoint that is not a file ---------------------------------------------------

def test_a_fifo_checkpoint_is_refused_without_waiting(toy, tmp_path):
    store, labelset, _ = toy
    fifo = tmp_path / "fifo.pt"
    os.mkfifo(fifo)
    proc = subprocess.run(
        [sys.executable, "-m", "trainer", "eval", "--store", str(store), "--dataset", "toy",
         "--labels", labelset, "--checkpoint", str(fifo)],
        capture_output=True, text=True, timeout=120)  # the old code waited for a writer
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a regular file" in lines[0] and "fifo.pt" in lines[0]


def test_a_directory_checkpoint_is_refused(toy, tmp_path):
    store, labelset, _ = toy
    line = one_line_error(CliRunner().invoke(main, [
        "eval", "--store", str(store), "--dataset", "toy", "--labels", labelset,
        "--checkpoint", str(tmp_path)]))
    assert "not a regular file" in line
    with pytest.raises(CheckpointError, match="not a regular file"):
        read_checkpoint(Path("/dev/zero"))


# -- A51: images read as registered ----------------------------------------------------------

def replace_with_other_picture(path: Path, other: Path, same_size: bool) -> None:
    """``path``'s file becomes ``other``'s picture; with ``same_size``, padded to the byte size
    registered for ``path`` (JPEG decoders ignore trailing bytes), so only the digest tells."""
    data = other.read_bytes()
    if same_size:
        size = path.stat().st_size
        assert len(data) <= size
        data += bytes(size - len(data))
    path.write_bytes(data)
    assert Image.open(path).size == Image.open(other).size  # a picture still, another one


@pytest.mark.parametrize("change, reason", [
    ("replaced, same size", "changed_file"), ("replaced", "changed_file"),
    ("fifo", "not_a_file"), ("deleted", "missing_file"), ("symlink out", "outside_root")])
def test_an_image_changed_after_labeling_is_skipped_and_counted(toy, tmp_path, change, reason):
    sizes = [image_path(toy, i).stat().st_size for i in range(12)]
    changed = int(np.argmax(sizes))  # so that any other picture fits in its byte size
    target = image_path(toy, changed)
    if change.startswith("replaced"):
        replace_with_other_picture(target, image_path(toy, int(np.argmin(sizes))),
                                   same_size=change.endswith("same size"))
    elif change == "fifo":
        target.unlink()
        os.mkfifo(target)
    elif change == "deleted":
        target.unlink()
    else:  # the very same bytes, outside the folder: only confinement refuses it
        outside = tmp_path / "outside.jpg"
        shutil.move(target, outside)
        target.symlink_to(outside)
    stream = stream_of(toy)
    assert read_all(stream) == [i for i in range(12) if i != changed]
    assert stream.skipped_images() == {reason: 1}


def test_an_image_over_the_pixel_limit_is_skipped(toy):
    store = Store.open(toy[0], mode="r").dataset("toy")
    pixels = store.column("width") * store.column("height")
    limit = int(np.median(pixels))
    stream = stream_of(toy, max_pixels=limit)
    assert read_all(stream, workers=0) == np.flatnonzero(pixels <= limit).tolist()
    assert stream.skipped_images() == {"too_many_pixels": int((pixels > limit).sum())}


def test_labels_the_status_records_refuse_are_never_trained_on(toy):
    """A lost status object and a lost logits object under a completion summary that still
    says every image is labeled: the summary orders the stream, the shards' own records decide
    what is trained on."""
    store, labelset_id, _ = toy
    labelset = Store.open(store, mode="r").labelset(labelset_id)
    root = store / "datasets" / "toy" / "labels" / labelset_id
    (root / "status" / "c" / "1").unlink()  # shard 1's images read "not yet labeled"
    shutil.rmtree(root / "logits" / "c" / "0")  # shard 0's labels are gone (NaN)
    assert labelset.labeled().all()  # what the old stream went by
    stream = stream_of(toy)
    assert read_all(stream) == list(range(8, 12))
    assert stream.skipped_images() == {"not_labeled": 4, "labels_damaged": 4}


@pytest.mark.slow
def test_training_skips_what_fails_finishes_and_reports_it(toy, tmp_path):
    """A picture replaced, a FIFO and a deleted file, one in each shard of 4: ``trainer
    train`` finishes (a child process with a time limit: the old code waited on the FIFO for
    good) and says what it skipped. Of the 3 batches planned, 1 is made: the loader worker
    holding 2 shards has 6 images left (1 batch of 4), the one holding 1 shard 3 (none)."""
    replace_with_other_picture(image_path(toy, 0), image_path(toy, 1), same_size=False)
    image_path(toy, 4).unlink()
    os.mkfifo(image_path(toy, 4))
    image_path(toy, 8).unlink()
    args = train_args(toy, tmp_path / "run", "--model-kwargs", json.dumps(TINY),
                      "--max-steps-per-epoch", "3", "--workers", "2")
    proc = subprocess.run([sys.executable, "-m", "trainer", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == 1
    assert summary["skipped_images"] == {"changed_file": 1, "not_a_file": 1, "missing_file": 1}
    assert "epoch 0: 3 samples skipped, not trained on (1 changed_file, 1 missing_file, " \
           "1 not_a_file)" in proc.stderr
    assert (tmp_path / "run" / "epoch0000.pt").is_file()


# -- A52: model options ----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, says", [
    ("[1, 2]", "must be a JSON object"), ("null", "must be a JSON object"),
    ("{nope", "not JSON"), ('{"num_classes": 3}', "set by the trainer (the label set"),
    ('{"img_size": 64}', "--input-size"), ('{"registers": 2}', "with --registers"),
    ('{"no_such_option": 1}', "no option 'no_such_option'; its options are: depth, "),
    ('{"depth": "2"}', "'depth' takes int, not '2'"), ('{"depth": null}', "takes int"),
])
def test_model_options_that_are_none_are_refused_in_one_line(toy, tmp_path, kwargs, says):
    line = one_line_error(CliRunner().invoke(
        main, train_args(toy, tmp_path / "run", "--model-kwargs", kwargs)))
    assert says in line


@pytest.mark.slow
def test_a_timm_model_option_timm_does_not_take_is_named(toy, tmp_path):
    line = one_line_error(CliRunner().invoke(main, [
        *train_args(toy, tmp_path / "run"), "--model", "timm:vit_tiny_patch16_224",
        "--model-kwargs", '{"no_such_option": 1}']))
    assert "has no option 'no_such_option'" in line


def test_model_options_of_the_right_kinds_pass():
    from trainer.models import check_options

    check_options("lvvit_t", {"depth": 2, "mlp_ratio": 2, "anf_layers": [0], "sta_tau": None,
                              "drop_path": 0.1})
    with pytest.raises(ValueError, match="'anf_norm' takes bool"):
        check_options("lvvit_t", {"anf_norm": 1})


# -- A54: an epoch with no step --------------------------------------------------------------

@pytest.mark.parametrize("batch, workers", [(13, 0), (5, 3)])
def test_an_epoch_with_no_step_is_refused_before_training(toy, tmp_path, batch, workers):
    """13 > 12 images; or 3 loader workers holding a shard of 4 each, none of which fills a
    batch of 5 although the epoch has 12 images."""
    line = one_line_error(CliRunner().invoke(main, [
        *train_args(toy, tmp_path / "run"), "--batch-size", str(batch), "--workers",
        str(workers)]))
    assert "no step: 12 training images" in line and f"--batch-size {batch}" in line
    assert not (tmp_path / "run" / "last.pt").exists()


def test_full_batches_are_counted_per_rank_and_worker(toy):
    # 3 shards of 4: one rank of 3 workers holds 1 shard each; 2 ranks of 1 worker, 2 and 1
    assert stream_of(toy).full_batches(4, 3) == 3
    assert stream_of(toy).full_batches(5, 3) == 0
    assert stream_of(toy).full_batches(5, 0) == 2
    assert min(TokenLabelStream(stream_of(toy).config, rank=r, world_size=2).full_batches(4, 1)
               for r in range(2)) == 1  # the rank with one shard sets the pace


# -- A56 and the metrics file: resuming ------------------------------------------------------

@pytest.mark.slow
def test_a_truncated_last_checkpoint_offers_the_last_good_epoch(toy, tmp_path):
    out = tmp_path / "run"
    args = [*train_args(toy, out, "--model-kwargs", json.dumps(TINY)), "--epochs", "2"]
    runner = CliRunner()
    assert runner.invoke(main, args, catch_exceptions=False).exit_code == 0
    assert torch.load(out / "last.pt", weights_only=True)["step"] == 2  # no unsafe type
    for name in ("last.pt", "epoch0001.pt"):
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[:len(data) // 2])
    line = one_line_error(runner.invoke(main, [*args, "--epochs", "3", "--resume"]))
    assert "last.pt: not a torch checkpoint, or a damaged one" in line
    assert f"{out / 'epoch0000.pt'} is the run's last good epoch checkpoint" in line

    # as offered: from the end of epoch 0 (step 1); metrics.jsonl keeps steps up to it only
    shutil.copy(out / "epoch0000.pt", out / "last.pt")
    result = runner.invoke(main, [*args, "--epochs", "3", "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
    assert steps == [1, 2, 3]

    # a fresh run in the same folder starts the metrics anew
    (out / "metrics.jsonl").open("a").write('{"step": 99, "loss": 1.0}\n{"step": 10')
    assert runner.invoke(main, args, catch_exceptions=False).exit_code == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").open()]
    assert steps == [1, 2]


def test_a_last_checkpoint_that_is_not_a_run_state_says_so(toy, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    torch.save({"state_dict": create_model("vit_tiny", **TINY).state_dict()}, out / "last.pt")
    line = one_line_error(CliRunner().invoke(main, train_args(toy, out, "--resume")))
    assert "not a run state that --resume can go on from" in line
    assert "no good epoch checkpoint: start again without --resume" in line


# -- --beta ------------------------------------------------------------------------------------

@pytest.mark.parametrize("beta", ["-0.5", "nan", "inf"])
def test_beta_is_a_finite_non_negative_weight(toy, tmp_path, beta):
    result = CliRunner().invoke(main, train_args(toy, tmp_path / "run", "--beta", beta))
    assert result.exit_code == 2 and "--beta" in result.output, result.output
