"""Labeling jobs: exact labels, resume, concurrent writers, a killed run, class-count checks."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from labeler_service.labeling import LabelingOptions, LabelSpaceMismatch, label_dataset
from labeler_service.sample import make_random_checkpoint, make_sample_images
from labeler_service.teacher import build_teacher
from storage import ARRAY_NAMES, ImageStatus, Store
from storage.images import decode_image

OPTIONS = LabelingOptions(batch_size=4, num_workers=0, progress=False, shard_size=4,
                          chunk_size=2)


def labels_of(store: Store, labelset_id: str) -> dict[str, np.ndarray]:
    labelset = store.labelset(labelset_id)
    block = labelset.read_block(0, labelset.num_images)
    return {name: getattr(block, name) for name in ARRAY_NAMES}


def assert_same_labels(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    for name in ARRAY_NAMES:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def label_args(checkpoint: Path, input_size: int, batch_size: int, shard_size: int,
               chunk_size: int) -> list[str]:
    return ["label", "toy", "--model", "test_nfnet", "--checkpoint", str(checkpoint),
            "--input-size", str(input_size), "--topk", "2", "--batch-size", str(batch_size),
            "--shard-size", str(shard_size), "--chunk-size", str(chunk_size), "--workers", "0",
            "--no-progress"]


def two_stores(tmp_path: Path, images: Path, *names: str) -> list[Path]:
    """Stores with dataset "toy" registered, one per name."""
    for name in names:
        Store.open(tmp_path / name).add_dataset("toy", images)
    return [tmp_path / name for name in names]


def labeler(*args: str, store: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "labeler_service", *args, "--store", str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_labels_equal_the_teacher_on_each_image(store: Store, images: Path, checkpoint: Path):
    store.add_dataset("toy", images)
    report = label_dataset(store, "toy", "test_nfnet", checkpoint, 96, 2, OPTIONS)
    assert (report.images_labeled, report.shards_written, report.shards_skipped) == (18, 5, 0)
    labels = labels_of(store, report.labelset_id)
    assert (labels["status"] == ImageStatus.LABELED).all()

    teacher, spec, _ = build_teacher("test_nfnet", checkpoint, 96)
    manifest = store.dataset("toy").manifest()
    pixels = np.stack([decode_image((images / p).read_bytes(), 96) for p in manifest.path])
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float()
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) * 255 for v in (spec.mean, spec.std))
    expected = teacher.summarise((x - mean) / std, topk=2)
    np.testing.assert_allclose(labels["logits"], expected.logits.numpy(), rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(labels["classes"], expected.classes.numpy())
    np.testing.assert_allclose(labels["lse"], expected.lse.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(labels["global_logits"], expected.global_logits.numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(labels["global_classes"], expected.global_classes.numpy())


def test_rerun_skips_finished_shards_and_rewrites_nothing(
        store: Store, images: Path, checkpoint: Path):
    store.add_dataset("toy", images)
    first = label_dataset(store, "toy", "test_nfnet", checkpoint, 64, 2, OPTIONS)
    files = {p: p.stat().st_mtime_ns for p in Path(store.location).rglob("*") if p.is_file()}
    again = label_dataset(store, "toy", "test_nfnet", checkpoint, 64, 2, OPTIONS)
    assert again.labelset_id == first.labelset_id
    assert (again.shards_written, again.shards_skipped, again.images_done) == (0, 5, 0)
    assert {p: p.stat().st_mtime_ns for p in files} == files


@pytest.mark.slow
def test_two_processes_on_disjoint_shards_lose_nothing(
        tmp_path: Path, images: Path, checkpoint: Path):
    clean, shared = two_stores(tmp_path, images, "clean", "shared")
    # Batches of 2 in shards of 3: shards take several batches, and batches never cross them.
    common = label_args(checkpoint, input_size=96, batch_size=2, shard_size=3, chunk_size=1)
    procs = [labeler(*common, "--part", f"{i}/2", store=shared) for i in range(2)]
    procs.append(labeler(*common, store=clean))
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        outputs.append(out)
    # 18 images in 6 shards: each part takes three.
    assert "9 images labeled, 0 failed, 3 shards written" in outputs[0]
    assert "9 images labeled, 0 failed, 3 shards written" in outputs[1]
    clean_store, shared_store = Store.open(clean), Store.open(shared)
    (labelset_id,) = shared_store.dataset("toy").labelset_ids()
    labelset = shared_store.labelset(labelset_id)
    assert labelset.is_complete()
    # Whichever part finished last recorded the completion summary, equal to the records'.
    assert labelset.completion() == labelset.completion_from_status() == {
        "images": 18, "shards": 6, "counts": {"0": 18}}
    assert_same_labels(labels_of(shared_store, labelset_id), labels_of(clean_store, labelset_id))


@pytest.mark.slow
def test_killed_run_resumed_equals_clean_run(tmp_path: Path, checkpoint: Path):
    images = make_sample_images(tmp_path / "images", per_class=12)
    (images / "circles" / "0000.jpg").unlink()  # 35 images: 18 shards, the last one short
    killed, clean = two_stores(tmp_path, images, "killed", "clean")
    args = label_args(checkpoint, input_size=256, batch_size=1, shard_size=2, chunk_size=2)

    proc = labeler(*args, store=killed)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        status_files = [p for p in killed.glob("datasets/toy/labels/*/status/c/*")
                        if p.name.isdigit()]  # not the writer's temporary files
        if len(status_files) >= 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    store = Store.open(killed)
    (labelset_id,) = store.dataset("toy").labelset_ids()
    assert 0 < len(store.labelset(labelset_id).pending_shards()) < 18
    assert store.labelset(labelset_id).completion() is None  # a killed writer records nothing

    for location in (killed, clean):
        proc = labeler(*args, store=location)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    resumed = Store.open(killed).labelset(labelset_id)
    assert resumed.is_complete() and resumed.completion() == resumed.completion_from_status()
    assert_same_labels(labels_of(store, labelset_id), labels_of(Store.open(clean), labelset_id))


def test_class_count_mismatch_is_refused(store: Store, images: Path, tmp_path: Path):
    five = make_random_checkpoint(tmp_path / "five.safetensors", num_classes=5)
    store.add_dataset("toy", images)
    with pytest.raises(LabelSpaceMismatch, match=r"has 3 classes .* teacher has 5 outputs"):
        label_dataset(store, "toy", "test_nfnet", five, 64, 2, OPTIONS)
    assert store.dataset("toy").labelset_ids() == []  # nothing was created
    report = label_dataset(store, "toy", "test_nfnet", five, 64, 2, OPTIONS,
                           ignore_dataset_classes=True)
    assert report.images_labeled == 18


def test_topk_larger_than_classes_is_refused(store: Store, images: Path, checkpoint: Path):
    store.add_dataset("toy", images)
    with pytest.raises(ValueError, match=r"topk must be in \[1, 3\]"):
        label_dataset(store, "toy", "test_nfnet", checkpoint, 64, 5, OPTIONS)


def test_should_stop_ends_between_shards(store: Store, images: Path, checkpoint: Path):
    from labeler_service.labeling import TeacherRunner, label_shards

    dataset, _ = store.add_dataset("toy", images)
    report = label_dataset(store, "toy", "test_nfnet", checkpoint, 64, 2, OPTIONS, part=(0, 5))
    labelset = dataset.labelset(report.labelset_id)
    assert labelset.pending_shards() == [1, 2, 3, 4]
    teacher, spec, _ = build_teacher("test_nfnet", checkpoint, 64)
    runner = TeacherRunner(teacher, spec.mean, spec.std, 2, torch.device("cpu"), "fp32")
    stopped = label_shards(labelset, dataset, runner, [1, 2, 3, 4], OPTIONS,
                           should_stop=lambda: True)
    assert stopped.stopped and stopped.shards_written == 1
    assert labelset.pending_shards() == [2, 3, 4]

    # Stopping between two batches of one shard drops that shard, unwritten: it stays pending.
    halves = dataclasses.replace(OPTIONS, batch_size=2)
    stopped = label_shards(labelset, dataset, runner, [2, 3, 4], halves, should_stop=lambda: True)
    assert stopped.stopped and (stopped.shards_written, stopped.images_done) == (0, 0)
    assert labelset.pending_shards() == [2, 3, 4]


def test_a_compiled_runner_pads_smaller_batches_and_splits_larger_ones(
        checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    """Compiled for batches of 4, a runner labels 2 images padded to 4 and 10 in pieces of 4
    (a runner a worker kept from a label set of smaller shards): each row's labels are the eager
    runner's, and the graph is only ever called with 4. Dynamo is switched off, so the "compiled"
    step is the eager one and what is tested is the runner's batching (inductor itself is
    tested in test_cli.py and the service round trip)."""
    from labeler_service.labeling import TeacherRunner

    monkeypatch.setattr(torch._dynamo.config, "disable", True)
    pixels = torch.randint(0, 256, (10, 64, 64, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    runners = []
    for _ in range(2):
        teacher, spec, _ = build_teacher("test_nfnet", checkpoint, 64)
        runners.append(TeacherRunner(teacher, spec.mean, spec.std, 2, torch.device("cpu"),
                                     "fp32"))
    eager, compiled = runners
    compiled.compile(4, 64)
    step, shapes = compiled.step, []
    compiled.step = lambda x: shapes.append(len(x)) or step(x)
    for n in (2, 10):
        expected, got = eager(pixels[:n]), compiled(pixels[:n])
        for name in expected:
            assert got[name].shape == expected[name].shape, name
            np.testing.assert_allclose(got[name].astype(np.float32),
                                       expected[name].astype(np.float32), rtol=1e-5, atol=1e-5,
                                       err_msg=name)
    assert shapes == [4, 4, 4, 4]
    compiled.compile(8, 64)  # compiled once: the graph it has is kept
    assert compiled.compiled_batch == 4


def test_shard_tasks_read_only_their_shards_rows(
        store: Store, images: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch):
    """A worker holds the paths of the shards it is given, not the whole manifest (ImageNet-21k's
    is ~1 GB of paths): each shard's rows are read when its batches are reached."""
    from labeler_service.labeling import TeacherRunner, label_shards
    from storage.dataset import Dataset

    dataset, _ = store.add_dataset("toy", images)
    report = label_dataset(store, "toy", "test_nfnet", checkpoint, 64, 2, OPTIONS, part=(0, 5))
    labelset = dataset.labelset(report.labelset_id)
    reads: list[tuple[str, int, int | None]] = []
    def recording(name: str):
        read = getattr(Dataset, name)

        def recorded(self, start=0, stop=None):
            reads.append((name, start, stop))
            return read(self, start, stop)
        return recorded

    for name in ("paths", "sha256", "manifest"):
        monkeypatch.setattr(Dataset, name, recording(name))
    teacher, spec, _ = build_teacher("test_nfnet", checkpoint, 64)
    runner = TeacherRunner(teacher, spec.mean, spec.std, 2, torch.device("cpu"), "fp32")
    label_shards(labelset, dataset, runner, [1, 3], dataclasses.replace(OPTIONS, batch_size=3),
                 should_stop=lambda: labelset.pending_shards() == [2, 4])
    # shards of 4: shard 1 is rows [4, 8), shard 3 rows [12, 16); nothing else was read
    assert sorted(reads) == [("paths", 4, 8), ("paths", 12, 16),
                             ("sha256", 4, 8), ("sha256", 12, 16)]
    assert labelset.pending_shards() == [2, 4]


def test_one_decoder_serves_many_calls_with_the_same_processes(
        store: Store, images: Path, checkpoint: Path, tmp_path: Path):
    """A worker keeps one decoder across its shard tasks: its processes outlive each call,
    a call stopped mid-pass leaves nothing behind for the next, and the labels equal a run's
    that started its own decoding processes."""
    import multiprocessing

    from labeler_service.labeling import ImageDecoder, TeacherRunner, label_shards
    from storage.images import DecodingProcessDied

    options = dataclasses.replace(OPTIONS, num_workers=2, batch_size=2)
    dataset, _ = store.add_dataset("toy", images)
    clean = label_dataset(store, "toy", "test_nfnet", checkpoint, 64, 2, options)

    other = Store.open(tmp_path / "other")
    dataset, _ = other.add_dataset("toy", images)
    report = label_dataset(other, "toy", "test_nfnet", checkpoint, 64, 2, options, part=(0, 5))
    labelset = dataset.labelset(report.labelset_id)
    teacher, spec, _ = build_teacher("test_nfnet", checkpoint, 64)
    runner = TeacherRunner(teacher, spec.mean, spec.std, 2, torch.device("cpu"), "fp32")
    before = {p.pid for p in multiprocessing.active_children()}
    decoder = ImageDecoder.for_labelset(dataset, labelset, options, runner.device)

    def decoding_pids() -> set[int]:
        return {p.pid for p in multiprocessing.active_children()} - before

    # Stopped after its first batch, with later batches already queued to the processes.
    stopped = label_shards(labelset, dataset, runner, [1, 2], options, should_stop=lambda: True,
                           decoder=decoder)
    assert stopped.stopped and stopped.images_done == 0
    pids = decoding_pids()
    assert len(pids) == 2
    for shard in labelset.pending_shards():  # one call per shard, as the worker's tasks do
        label_shards(labelset, dataset, runner, [shard], options, decoder=decoder)
        assert decoding_pids() == pids
    assert labelset.pending_shards() == []
    assert_same_labels(labels_of(other, report.labelset_id), labels_of(store, clean.labelset_id))

    # A decoding process killed (the OOM killer, say): that pass fails with an error the worker
    # retries, and the next pass starts new processes and labels as before.
    third = Store.open(tmp_path / "third")
    dataset, _ = third.add_dataset("toy", images)  # the same images: the decoder serves it
    report = label_dataset(third, "toy", "test_nfnet", checkpoint, 64, 2, options, part=(0, 5))
    labelset = dataset.labelset(report.labelset_id)
    os.kill(min(pids), signal.SIGKILL)
    # torch's SIGCHLD handler may raise here, in whatever code runs when the process dies.
    with contextlib.suppress(RuntimeError):
        time.sleep(1)
    with pytest.raises(DecodingProcessDied):
        label_shards(labelset, dataset, runner, [1], options, decoder=decoder)
    label_shards(labelset, dataset, runner, [1, 2, 3, 4], options, decoder=decoder)
    assert labelset.pending_shards() == []
    assert len(decoding_pids()) == 2 and not decoding_pids() & pids
    assert_same_labels(labels_of(third, report.labelset_id), labels_of(store, clean.labelset_id))

    # close() ends them at once (a failed shard task closes its decoder: no ~600 MB
    # processes left until a later garbage collection), and the next pass starts new ones.
    alive = decoding_pids()
    decoder.close()
    assert not decoding_pids() & alive
    label_shards(labelset, dataset, runner, [0], options, decoder=decoder)  # nothing to do
    del decoder
    deadline = time.monotonic() + 10
    while decoding_pids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not decoding_pids()

    # A decoder made for other images is refused.
    wrong = dataclasses.replace(options, max_pixels=options.max_pixels // 2)
    decoder = ImageDecoder.for_labelset(dataset, labelset, wrong, runner.device)
    with pytest.raises(ValueError, match="other images"):
        label_shards(labelset, dataset, runner, [0], options, decoder=decoder)


@pytest.mark.slow
def test_a_symlink_out_of_the_folder_and_a_grown_file_are_not_read(store: Store, images: Path,
                                                                   tmp_path: Path,
                                                                   checkpoint: Path):
    """A32: an image replaced by a symlink to a large file outside the dataset's folder is
    OUTSIDE_ROOT (status 9, as the README says) and not read; one replaced in place by a large
    file is CHANGED_FILE from its registered size, before a byte is read."""
    store.add_dataset("toy", images)
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(256 * 2**20)  # sparse: 256 MiB to read, nothing on disk
    linked, grown = images / "circles" / "0001.jpg", images / "squares" / "0002.jpg"
    linked.unlink()
    linked.symlink_to(big)
    os.truncate(grown, 256 * 2**20)
    tracemalloc.start()
    try:
        report = label_dataset(store, "toy", "test_nfnet", checkpoint, 64, 2, OPTIONS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB allocated"
    status = store.labelset(report.labelset_id).status()
    paths = list(store.dataset("toy").paths())
    assert status[paths.index("circles/0001.jpg")] == ImageStatus.OUTSIDE_ROOT
    assert status[paths.index("squares/0002.jpg")] == ImageStatus.CHANGED_FILE
    assert report.images_labeled == 16
