"""The ``labeler`` command line: the user's path through register, label and verify."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from labeler_service.cli import main
from storage import Store
from tests.conftest import assert_compiled_labels_match


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(*args: str, code: int = 0) -> str:
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output
    return invoke


def label_args(checkpoint: Path) -> list[str]:
    return ["label", "toy", "--model", "test_nfnet", "--checkpoint", str(checkpoint),
            "--input-size", "64", "--topk", "2", "--shard-size", "4", "--chunk-size", "2",
            "--workers", "0", "--no-progress"]


def test_register_label_verify(run, images: Path, checkpoint: Path, tmp_path: Path):
    assert "registered: 18 images, 3 classes" in run("datasets", "add", "toy", str(images))
    assert "already registered (unchanged)" in run("datasets", "add", "toy", str(images))
    out = run(*label_args(checkpoint))
    assert "18 images labeled, 0 failed, 5 shards written, 0 already done" in out
    assert "results: store/datasets/toy/labels/test_nfnet-64px-top2-" in out
    assert "0 shards written, 5 already done" in run(*label_args(checkpoint))
    assert "5/5 shards" in run("datasets", "list")
    assert "store is consistent" in run("store", "verify")
    assert (tmp_path / "store" / "zarr.json").is_file()  # ./store is the default


def test_store_from_environment(run, images: Path, tmp_path: Path,
                                monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LABELER_STORE", str(tmp_path / "elsewhere"))
    run("datasets", "add", "toy", str(images))
    assert Store.open(tmp_path / "elsewhere").dataset_names() == ["toy"]


def test_verify_finds_missing_shards_and_fingerprint_mismatch(run, images: Path,
                                                              checkpoint: Path, tmp_path: Path):
    run("datasets", "add", "toy", str(images))
    run(*label_args(checkpoint))
    store = Store.open("store")
    (labelset_id,) = store.dataset("toy").labelset_ids()
    labels = tmp_path / "store" / "datasets" / "toy" / "labels" / labelset_id
    (labels / "status" / "c" / "2").unlink()  # shard 2's completion record
    out = run("store", "verify", code=1)
    assert "1 of 5 shards missing (2)" in out

    run(*label_args(checkpoint))  # the rerun redoes just that shard
    assert "store is consistent" in run("store", "verify")
    store.labelset(labelset_id).group.attrs["dataset_fingerprint"] = "f" * 64
    assert "made for dataset fingerprint ffffffffffff" in run("store", "verify", code=1)


def test_verify_reports_failed_images_without_failing(run, images: Path, checkpoint: Path):
    (images / "circles" / "0002.jpg").write_bytes(b"")
    (images / "squares" / "0003.jpg").write_bytes(b"<html>not an image</html>")
    run("datasets", "add", "toy", str(images))
    out = run(*label_args(checkpoint))
    assert "16 images labeled, 2 failed" in out
    assert "1 x empty file" in out and "squares/0003.jpg" in out
    out = run("store", "verify")
    assert "1 images failed: empty file" in out and "store is consistent" in out


def test_user_errors_are_one_line_messages(run, images: Path, checkpoint: Path, tmp_path: Path):
    assert "no dataset 'toy'" in run(*label_args(checkpoint), code=1)
    run("datasets", "add", "toy", str(images))
    shutil.copy(images / "circles" / "0000.jpg", images / "circles" / "new.jpg")
    out = run("datasets", "add", "toy", str(images), code=1)
    assert "has changed since (1 added, 0 removed, 0 modified)" in out
    assert "exactly one of" in run("label", "toy", "--model", "test_nfnet", "--input-size", "64",
                                   code=2)
    out = run("label", "toy", "--model", "nope", "--random-weights", "--input-size", "64", code=1)
    assert "unknown timm model 'nope'" in out
    assert "--part must look like i/n" in run(*label_args(checkpoint), "--part", "x", code=1)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", '
                                                 '"attributes": {"format": "other"}}')
    assert "not a tokenlabel store" in run("datasets", "list", "--store", "junk", code=1)


@pytest.mark.slow
def test_demo_runs_the_quickstart(run, tmp_path: Path):
    out = run("demo", "--images", "60", "--teacher-epochs", "1", "--student-epochs", "1",
              "--no-progress")
    assert "scenes: registered: 60 images, 10 classes" in out
    assert "60 images labeled, 0 failed" in out and "store is consistent" in out
    for shown in ("teacher held-out top-1 ", "teacher agreement: top-1 ",
                  "dense labels (held-out, ", "panels (image | ground truth | teacher top-1)",
                  "student held-out top-1 ", "$ trainer train --store store --dataset scenes"):
        assert shown in out
    figures = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert 0 <= figures["label_quality"]["held_out"]["main_top1"] <= 1
    panels = sorted((tmp_path / "demo" / "panels").glob("*.png"))
    assert 1 <= len(panels) <= 6 and Image.open(panels[0]).width >= 3 * 128


@pytest.mark.slow
def test_compiled_teacher_gives_the_same_labels(run, images: Path, checkpoint: Path,
                                                caplog: pytest.LogCaptureFixture):
    """``--compile`` (inductor on this CPU): ``--batch-size 8`` in shards of 4 compiles for
    batches of 4, the most a shard holds, and the last shard's 2 images are padded to it; the
    labels are the eager run's to rounding. A rerun with nothing to label compiles nothing."""
    caplog.set_level(logging.INFO, logger="labeler_service.labeling")
    for where in ("store", "compiled"):
        run("datasets", "add", "toy", str(images), "--store", where)
    eager_args = [*label_args(checkpoint), "--batch-size", "8"]
    run(*eager_args)
    out = run(*eager_args, "--store", "compiled", "--compile")
    assert "18 images labeled, 0 failed, 5 shards written" in out
    assert caplog.text.count("teacher compiled for batches of 4 at 64 px") == 1
    assert "0 images labeled" in run(*eager_args, "--store", "compiled", "--compile")
    assert caplog.text.count("teacher compiled") == 1
    read = {}
    for where in ("store", "compiled"):
        dataset = Store.open(where).dataset("toy")
        (labelset_id,) = dataset.labelset_ids()
        read[where] = dataset.labelset(labelset_id).read_block(0, 18)
    assert_compiled_labels_match(read["compiled"], read["store"])


def shard_object(tmp_path: Path, array: str, shard: int) -> Path:
    (labels,) = (p for p in (tmp_path / "store" / "datasets" / "toy" / "labels").iterdir()
                 if p.is_dir())
    folder = labels / array / "c" / str(shard)
    while folder.is_dir():  # the chunk key has one part per dimension: c/<shard>/0/0/...
        folder = folder / "0"
    return folder


def test_verify_finds_shards_marked_done_without_labels(run, images: Path, checkpoint: Path,
                                                        tmp_path: Path):
    run("datasets", "add", "toy", str(images))
    run(*label_args(checkpoint))
    shard_object(tmp_path, "logits", 1).unlink()
    assert "shard 1: 4 images marked labeled have no labels" in run("store", "verify", code=1)


@pytest.mark.parametrize("array,damage,found", [
    ("lse", b"", "4 images marked labeled have no labels, or not all of them"),  # 0 B: fill
    ("lse", b"\x07" * 40, "the 'lse' array is unreadable"),
    ("global_logits", b"\x07" * 40, "the 'global_logits' array is unreadable"),
    ("global_classes", b"garbage", "the 'global_classes' array is unreadable"),
    ("logits", b"x", "the 'logits' array is unreadable")])
def test_verify_decodes_every_array_and_repair_marks_the_shard(run, images: Path,
                                                                checkpoint: Path,
                                                                tmp_path: Path, array, damage,
                                                                found):
    """Items 11 and 12: a 0-byte lse shard or corrupt image-level arrays are found (they were
    served as labeled with lse null), and --repair marks the shard so labeling rewrites it."""
    run("datasets", "add", "toy", str(images))
    run(*label_args(checkpoint))
    clean = shard_object(tmp_path, array, 2).read_bytes()
    shard_object(tmp_path, array, 2).write_bytes(damage)
    out = run("store", "verify", code=1)
    assert f"shard 2: {found}" in out and "--repair" in out
    assert "marked for labeling again" in run("store", "verify", "--repair")
    assert "1 shards written, 4 already done" in run(*label_args(checkpoint))
    assert "store is consistent" in run("store", "verify")
    assert shard_object(tmp_path, array, 2).read_bytes() == clean


def test_torn_shard_objects_are_reported_and_relabeled(run, images: Path, checkpoint: Path,
                                                       tmp_path: Path):
    run("datasets", "add", "toy", str(images))
    run(*label_args(checkpoint))
    clean = {p.relative_to(tmp_path): p.read_bytes()
             for p in (tmp_path / "store").rglob("c/*") if p.is_file()}
    for array in ("status", "logits"):  # as a crash mid-write on a non-atomic store leaves them
        torn = shard_object(tmp_path, array, 3)
        torn.write_bytes(torn.read_bytes()[:7])
    out = run("store", "verify", code=1)
    assert "shard 3: status object unreadable (a torn write)" in out

    assert "1 shards written, 4 already done" in run(*label_args(checkpoint))
    assert "store is consistent" in run("store", "verify")
    relabeled = {p.relative_to(tmp_path): p.read_bytes()
                 for p in (tmp_path / "store").rglob("c/*") if p.is_file()}
    assert relabeled == clean  # the same labels, byte for byte


def test_a_job_where_nothing_can_be_labeled_fails(run, images: Path, checkpoint: Path,
                                                  tmp_path: Path):
    run("datasets", "add", "toy", str(images))
    for image in images.rglob("*.jpg"):
        image.write_bytes(b"")
    out = run(*label_args(checkpoint), code=1)
    assert "18 x empty file" in out and "no image could be labeled" in out


def test_unreachable_images_are_refused_before_labeling(run, images: Path, checkpoint: Path,
                                                        tmp_path: Path):
    run("datasets", "add", "toy", str(images))
    images.rename(tmp_path / "moved")
    assert "are not reachable (unmounted or moved?)" in run(*label_args(checkpoint), code=1)
    assert Store.open("store").dataset("toy").labelset_ids() == []


def test_retry_failed_relabels_fixed_images(run, images: Path, checkpoint: Path, tmp_path: Path):
    broken = images / "squares" / "0001.jpg"
    original = broken.read_bytes()
    run("datasets", "add", "toy", str(images))
    broken.write_bytes(original[:100])  # truncated after registration: changed, and unreadable
    assert "17 images labeled, 1 failed" in run(*label_args(checkpoint))
    assert "0 shards written, 5 already done" in run(*label_args(checkpoint))
    broken.write_bytes(original)
    out = run(*label_args(checkpoint), "--retry-failed")
    assert "4 images labeled, 0 failed, 1 shards written, 4 already done" in out
    status = Store.open("store").labelset(
        Store.open("store").dataset("toy").labelset_ids()[0]).status()
    assert (status == 0).all()


def test_worker_consumes_the_labeling_and_registration_queues(run, monkeypatch):
    """`labeler worker`, as docker-compose.yml, deploy/k8s and the service tests start it, takes
    shard tasks and dataset scans (POST /v1/datasets) alike."""
    from labeler_service.tasks import app

    argv: list[str] = []
    monkeypatch.setattr(app, "worker_main", argv.extend)
    run("worker", "--name", "w@test")
    queues = argv[argv.index("-Q") + 1].split(",")
    assert sorted(queues) == ["labeling", "registration"]
    argv.clear()
    run("worker", "--queues", "registration")
    assert argv[argv.index("-Q") + 1] == "registration"
    argv.clear()
    assert "queues must be among" in run("worker", "--queues", "labeling,gpu", code=2)
    assert argv == []


def test_the_completion_summary_is_checked_dropped_and_rebuilt(run, images: Path,
                                                               checkpoint: Path, tmp_path: Path):
    """Issue 15: the per-shard records stay the truth. A summary that disagrees with them is a
    verify problem and --repair rebuilds it; marking a shard pending drops it."""
    run("datasets", "add", "toy", str(images))
    run(*label_args(checkpoint))
    store = Store.open("store")
    (labelset_id,) = store.dataset("toy").labelset_ids()
    labelset = store.labelset(labelset_id)
    truth = labelset.completion_from_status()
    assert labelset.completion() == truth and truth["counts"] == {"0": 18}
    labelset.record_summary("completion", {**truth, "counts": {"0": 17, "1": 1}})  # a lie
    assert "completion summary disagrees" in run("store", "verify", code=1)
    assert "rebuilt" in run("store", "verify", "--repair")
    labelset = Store.open("store").labelset(labelset_id)
    assert labelset.completion() == truth
    labelset.mark_pending(2)
    labelset = Store.open("store").labelset(labelset_id)
    assert labelset.completion() is None and not labelset.is_complete()
    assert "1 shards written" in run(*label_args(checkpoint))
    assert Store.open("store").labelset(labelset_id).completion() == truth


# -- issue 23 ---------------------------------------------------------------------------------

def scene_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


def test_sample_scenes_never_deletes_a_registered_dataset(run, tmp_path: Path):
    """A14: fewer scenes, or another seed, into a folder registered in the store is refused,
    saying which dataset; the same scenes again are fine."""
    run("sample", "scenes", "d", "--images", "30")
    run("datasets", "add", "s", "d")
    before = scene_files(tmp_path / "d")
    for other in (["--images", "5"], ["--images", "30", "--seed", "1"]):
        out = run("sample", "scenes", "d", *other, code=1)
        assert len(out.strip().splitlines()) == 1, out
        assert "would delete or change them, and dataset 's' of store store was registered" \
            in out
    assert scene_files(tmp_path / "d") == before
    run("sample", "scenes", "d", "--images", "30")  # the very same scenes: nothing changes
    assert scene_files(tmp_path / "d") == before
    assert "already registered (unchanged)" in run("datasets", "add", "s", "d")
    # Registered in a store the command is not shown (review): refused unless --replace.
    out = run("sample", "scenes", "d", "--images", "5", "--store", "other-store", code=1)
    assert "pass --replace to remake them" in out
    assert scene_files(tmp_path / "d") == before
    run("sample", "scenes", "d", "--images", "5", "--store", "other-store", "--replace")
    assert len(list((tmp_path / "d").rglob("*.jpg"))) == 5
    out = run("sample", "scenes", "d", "--images", "30", "--replace", code=1)  # this store's
    assert "dataset 's' of store store was registered" in out


def test_sample_scenes_writes_nothing_into_a_folder_of_other_files(run, tmp_path: Path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"mine")
    out = run("sample", "scenes", "photos", "--images", "10", code=1)
    assert "holds no scenes made by `labeler sample scenes`" in out
    assert scene_files(tmp_path / "photos") == {"holiday.jpg": b"mine"}


def test_demo_with_fewer_images_keeps_the_registered_scenes(run, tmp_path: Path):
    """A14: ``labeler demo --images 20`` after a 40-image demo in the same folder deleted 20
    registered scenes, then failed. Fewer scenes than registered are refused before anything
    is written."""
    from labeler_service.demo import DATASET
    from labeler_service.scenes import make_scenes

    make_scenes(tmp_path / "demo" / "scenes", images=60)  # the 60-image demo's first step
    Store.open(tmp_path / "store").add_dataset(DATASET, tmp_path / "demo" / "scenes")
    before = scene_files(tmp_path / "demo")
    out = run("demo", "--images", "50", "--no-progress", code=1)
    assert "dataset 'scenes' of store store was registered" in out.strip().splitlines()[-1]
    assert scene_files(tmp_path / "demo") == before


def test_an_unfinished_registration_does_not_hide_the_other_datasets(run, images: Path,
                                                                     tmp_path: Path):
    """A28: a paused scan is listed as unfinished; the datasets after it are still listed."""
    from storage.manifest import ScanPaused

    def pause(done: int, total: int | None) -> None:
        if total is not None and done >= 4:
            raise ScanPaused()

    store = Store.open(tmp_path / "store")
    store.add_dataset("a-first", images)
    with pytest.raises(ScanPaused):
        store.add_dataset("b-paused", images, progress=pause, resume_key="attempt-1")
    store.add_dataset("c-last", images)
    lines = run("datasets", "list").splitlines()
    assert lines[0].startswith("a-first\t18 images")
    assert "b-paused\tunfinished registration (in progress, paused or interrupted)" in lines
    assert any(line.startswith("c-last\t18 images") for line in lines)


def fill(folder: Path) -> Path:
    """Write zeros into ``folder/filler`` until its filesystem has no space left."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return filler


def test_a_full_store_disk_is_one_line_and_labeling_resumes(run, images: Path,
                                                            checkpoint: Path, tmp_path: Path,
                                                            tmpfs):
    """A37: the store on a disk that fills up mid-job (a real tmpfs, really full): one line
    saying so, exit 1; once there is space, the same command finishes the job."""
    disk = tmpfs(tmp_path / "disk", size="4m")
    store = ["--store", str(disk / "store")]
    run("datasets", "add", "toy", str(images), *store)
    run(*label_args(checkpoint), "--part", "0/2", *store)  # the label set, and 3 of 5 shards
    filler = fill(disk)
    out = run(*label_args(checkpoint), *store, code=1)
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out, out
    assert lines[0].startswith(f"Error: the store's disk is full (No space left on device: "
                               f"{disk / 'store'}).")
    assert "run the same command again" in lines[0] and "resumes" in lines[0]
    filler.unlink()
    assert "2 shards written, 3 already done" in run(*label_args(checkpoint), *store)
    assert "store is consistent" in run("store", "verify", *store)
