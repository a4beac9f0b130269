"""The store format: every array and attr round-trips, registration rules, shard writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from storage import (
    ARRAY_NAMES,
    FORMAT,
    FORMAT_VERSION,
    LABEL_ARRAYS,
    DatasetChangedError,
    DatasetUnfinished,
    ImageStatus,
    LabelBlock,
    LabelSetConfig,
    LabelSetMismatchError,
    Store,
    StoreError,
    TeacherSpec,
)

TEACHER = TeacherSpec(model="test_nfnet", checkpoint_sha256="0" * 64, num_classes=3,
                      input_size=96, class_names=("circles", "squares", "stripes"))


def random_block(labelset, shard: int, rng: np.random.Generator):
    block = labelset.empty_block(shard)
    n, k, h, w = block.logits.shape
    logits = np.sort(rng.normal(size=(n, k, h, w)), axis=1)[:, ::-1]
    block.logits[:] = logits
    block.classes[:] = rng.integers(0, labelset.teacher.num_classes, size=block.classes.shape)
    block.lse[:] = logits[:, 0] + 1.0
    block.global_logits[:] = rng.normal(size=block.global_logits.shape)
    block.global_classes[:] = rng.integers(0, labelset.teacher.num_classes, size=(n, k))
    block.status[:] = rng.choice([0, 0, 0, 1, 3], size=n)
    return block


def test_one_table_of_arrays():
    """array_specs is the table; LabelBlock, the names and the REST image schema follow it."""
    from dataclasses import fields

    from labeler_service.api.schemas import ImageLabels

    assert [f.name for f in fields(LabelBlock)] == ["start", *ARRAY_NAMES]
    assert ARRAY_NAMES[-1] == "status" and ARRAY_NAMES[:-1] == LABEL_ARRAYS
    assert set(LABEL_ARRAYS) <= set(ImageLabels.model_fields)


@pytest.mark.parametrize("url", [False, True], ids=["path", "file-url"])
def test_round_trip_every_array_and_attr(tmp_path: Path, images: Path, url: bool):
    location = f"file://{tmp_path}/store" if url else str(tmp_path / "store")
    store = Store.open(location)
    dataset, created = store.add_dataset("toy", images)
    assert created
    config = LabelSetConfig(teacher=TEACHER, topk=2, grid=(3, 3),
                            dataset_fingerprint=dataset.fingerprint, shard_size=4, chunk_size=2)
    labelset = dataset.create_labelset(config)
    rng = np.random.default_rng(0)
    written = [random_block(labelset, s, rng) for s in range(labelset.num_shards)]
    for shard, block in enumerate(written):
        labelset.write_shard(shard, block)

    reopened = Store.open(location, mode="r")
    assert reopened.root.attrs.asdict() == {"format": FORMAT, "format_version": FORMAT_VERSION}
    ds = reopened.dataset("toy")
    manifest, original = ds.manifest(), dataset.manifest()
    for column in ("path", "sha256", "width", "height", "label"):
        np.testing.assert_array_equal(getattr(manifest, column), getattr(original, column))
    assert manifest.class_names == ("circles", "squares", "stripes")
    assert ds.image_path(5) == manifest.path[5] and ds.image_path(17) == manifest.path[17]
    with pytest.raises(IndexError):
        ds.image_path(18)
    assert ds.attrs["num_images"] == 18 and ds.attrs["source_root"] == str(images.resolve())
    assert ds.attrs["fingerprint"] == manifest.fingerprint()
    assert {"created_at", "code_version", "class_names", "name"} <= ds.attrs.keys()

    stored = reopened.labelset(labelset.id)  # found by id alone
    attrs = stored.attrs
    assert attrs["teacher"] == json.loads(json.dumps(TEACHER.to_attrs()))
    assert stored.teacher == TEACHER
    assert (attrs["topk"], attrs["grid"], attrs["num_images"], attrs["shard_size"]) == (
        2, [3, 3], 18, 4)
    assert attrs["dataset_fingerprint"] == dataset.fingerprint
    assert {"created_at", "code_version"} <= attrs.keys()

    whole = stored.read_block(0, 18)
    for name in ("logits", "classes", "lse", "global_logits", "global_classes", "status"):
        expected = np.concatenate([getattr(b, name) for b in written])
        np.testing.assert_array_equal(getattr(whole, name), expected, err_msg=name)
    assert whole.logits.dtype == np.float16 and whole.classes.dtype == np.int16
    assert whole.status.dtype == np.int8
    single = stored.read_image(5)
    np.testing.assert_array_equal(single.logits[0], whole.logits[5])
    np.testing.assert_array_equal(stored.read_shard(4).classes, written[4].classes)
    assert stored.is_complete()


def test_unwritten_shards_read_as_not_labeled(store: Store, images: Path):
    dataset, _ = store.add_dataset("toy", images)
    labelset = dataset.create_labelset(LabelSetConfig(
        teacher=TEACHER, topk=2, grid=(3, 3), dataset_fingerprint=dataset.fingerprint,
        shard_size=4, chunk_size=4))
    labelset.write_shard(1, random_block(labelset, 1, np.random.default_rng(1)))
    assert labelset.pending_shards() == [0, 2, 3, 4]
    block = labelset.read_shard(0)
    assert (block.status == ImageStatus.PENDING).all()
    assert np.isnan(block.logits).all() and (block.classes == -1).all()


def test_many_classes_use_int32(store: Store, images: Path):
    dataset, _ = store.add_dataset("toy", images)
    teacher = TeacherSpec(model="m", checkpoint_sha256=None, num_classes=40_000, input_size=64)
    labelset = dataset.create_labelset(LabelSetConfig(
        teacher=teacher, topk=2, grid=(2, 2), dataset_fingerprint=dataset.fingerprint))
    block = labelset.empty_block(0)
    block.classes[:] = 39_999
    block.status[:] = 0
    labelset.write_shard(0, block)
    assert labelset.read_image(3).classes.dtype == np.int32
    assert (labelset.read_image(3).classes == 39_999).all()


def test_create_labelset_is_idempotent_and_ids_are_distinct(store: Store, images: Path):
    dataset, _ = store.add_dataset("toy", images)
    config = LabelSetConfig(teacher=TEACHER, topk=2, grid=(3, 3),
                            dataset_fingerprint=dataset.fingerprint, shard_size=4, chunk_size=2)
    first = dataset.create_labelset(config)
    first.write_shard(0, random_block(first, 0, np.random.default_rng(2)))
    again = dataset.create_labelset(config)
    assert again.id == first.id and again.pending_shards() == [1, 2, 3, 4]  # nothing wiped
    other = dataset.create_labelset(LabelSetConfig(
        teacher=TEACHER, topk=3, grid=(3, 3), dataset_fingerprint=dataset.fingerprint))
    assert other.id != first.id
    assert dataset.labelset_ids() == sorted([first.id, other.id])


def test_write_shard_refuses_wrong_blocks(store: Store, images: Path):
    dataset, _ = store.add_dataset("toy", images)
    labelset = dataset.create_labelset(LabelSetConfig(
        teacher=TEACHER, topk=2, grid=(3, 3), dataset_fingerprint=dataset.fingerprint,
        shard_size=4, chunk_size=2))
    block = random_block(labelset, 0, np.random.default_rng(3))
    with pytest.raises(LabelSetMismatchError, match="shard 1"):
        labelset.write_shard(1, block)
    block.status[2] = ImageStatus.PENDING
    with pytest.raises(LabelSetMismatchError, match="status -1"):
        labelset.write_shard(0, block)
    assert labelset.pending_shards() == [0, 1, 2, 3, 4]


def test_register_unchanged_is_noop_and_changed_is_refused(store: Store, images: Path):
    dataset, created = store.add_dataset("toy", images)
    assert created
    again, created = store.add_dataset("toy", images)
    assert not created and again.fingerprint == dataset.fingerprint

    squares = images / "squares"
    (images / "circles" / "0000.jpg").write_bytes((squares / "0000.jpg").read_bytes())
    (squares / "extra.JPEG").write_bytes((squares / "0001.jpg").read_bytes())
    (images / "stripes" / "0005.jpg").unlink()
    with pytest.raises(DatasetChangedError, match=r"1 added, 1 removed, 1 modified"):
        store.add_dataset("toy", images)
    assert store.dataset("toy").fingerprint == dataset.fingerprint  # the old one is intact
    renamed, created = store.add_dataset("toy-v2", images)
    assert created and renamed.num_images == 18


def test_interrupted_registration_can_be_redone(store: Store, images: Path):
    store.root["datasets"].require_group("toy")  # as left by a crash before the attrs
    with pytest.raises(DatasetUnfinished, match="unfinished"):
        store.dataset("toy")
    dataset, created = store.add_dataset("toy", images)
    assert created and dataset.num_images == 18


def test_a_labelset_is_found_while_another_dataset_is_being_written(store: Store,
                                                                      images: Path):
    dataset, _ = store.add_dataset("toy", images)
    labelset = dataset.create_labelset(LabelSetConfig(
        teacher=TEACHER, topk=2, grid=(3, 3), dataset_fingerprint=dataset.fingerprint))
    store.root["datasets"].require_group("aaa")  # a registration writing its manifest columns
    assert store.labelset(labelset.id).id == labelset.id
    with pytest.raises(KeyError):
        store.labelset("missing")


def test_registration_reports_progress_and_can_be_abandoned(store: Store, images: Path):
    seen: list[tuple[int, int | None]] = []
    store.add_dataset("toy", images, progress=lambda done, total: seen.append((done, total)))
    listing = [done for done, total in seen if total is None]
    assert listing == [0] * 4  # once per directory: the root and 3 classes
    assert seen[len(listing):] == [(done, 18) for done in range(19)]  # then once per file

    class Stop(Exception):
        pass

    def stop_at_5(done: int, total: int | None) -> None:
        if done == 5:
            raise Stop

    with pytest.raises(Stop):
        store.add_dataset("toy2", images, progress=stop_at_5)
    assert store.dataset_names() == ["toy"]  # nothing written


def test_an_unlistable_directory_is_an_error_not_a_smaller_dataset(store: Store, images: Path,
                                                                  monkeypatch):
    import os

    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("squares"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(PermissionError, match="squares"):
        store.add_dataset("toy", images)
    assert store.dataset_names() == []


def test_a_file_that_cannot_be_looked_at_is_an_error_not_a_smaller_dataset(
        store: Store, images: Path, monkeypatch):
    """os.path.isfile says False for any error (EACCES on a path component, EIO, ESTALE on NFS):
    the file would silently drop out. Only a dangling symlink is skipped."""
    import os

    real_stat = os.stat
    victim = sorted((images / "squares").iterdir())[0]

    def stat(path, *args, **kwargs):
        if str(path) == str(victim):
            raise OSError(5, "Input/output error", str(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(OSError, match="Input/output error"):
        store.add_dataset("toy", images)
    assert store.dataset_names() == []


def test_refuses_foreign_and_newer_stores(tmp_path: Path):
    import zarr

    zarr.open_group(tmp_path / "other", mode="w").attrs["format"] = "something-else"
    with pytest.raises(StoreError, match="not a tokenlabel store"):
        Store.open(tmp_path / "other")
    root = zarr.open_group(tmp_path / "newer", mode="w")
    root.attrs.update({"format": FORMAT, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(StoreError, match="format version"):
        Store.open(tmp_path / "newer")
    with pytest.raises(ValueError, match="invalid dataset name"):
        Store.open(tmp_path / "s").add_dataset("../escape", tmp_path)


def test_a_dataset_is_never_seen_with_part_of_its_attrs(tmp_path: Path, images: Path,
                                                        monkeypatch):
    """A concurrent reader (the API polling a registration) must never find the completion
    mark (``fingerprint``) without the rest: zarr's ``attrs.update`` writes the document once per
    key; the store writes it once (the flaky 500 on GET /v1/datasets/{name})."""
    from zarr.storage import LocalStore

    written: list[dict] = []
    real_set = LocalStore.set

    async def recording_set(self, key, value):
        if key == "datasets/toy/zarr.json":
            written.append(json.loads(value.to_bytes())["attributes"])
        return await real_set(self, key, value)

    monkeypatch.setattr(LocalStore, "set", recording_set)
    Store.open(tmp_path / "store").add_dataset("toy", images)
    complete = [a for a in written if "fingerprint" in a]
    assert complete and all({"name", "num_images", "class_names", "source_root", "created_at",
                             "code_version"} <= a.keys() for a in complete), written


def test_a_scan_keeps_a_bounded_window_of_files_in_flight(tmp_path: Path, monkeypatch):
    """Registration memory stays flat as the folder grows: files probed but not yet consumed
    never exceed the window, counted over 3000 files (issue 15; counting, not timing)."""
    from storage import manifest as manifest_module

    root = tmp_path / "many"
    for i in range(3000):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 3}" / f"{i:05d}.png").write_bytes(b"\x89PNG not really")
    started, consumed, ahead = [0], [0], []
    real_probe = manifest_module.probe_image

    def counting_probe(path):
        started[0] += 1
        ahead.append(started[0] - consumed[0])
        return real_probe(path)

    def progress(scanned, total):
        if total is not None:
            consumed[0] = scanned

    monkeypatch.setattr(manifest_module, "probe_image", counting_probe)
    result = manifest_module.scan_image_folder(root, max_workers=4, progress=progress,
                                                processes=0)
    assert len(result) == 3000 and started[0] == 3000
    window = manifest_module.SCAN_WINDOW_PER_WORKER * 4
    assert max(ahead) <= window + 1, max(ahead)  # +1: a result being handed over


def test_hashing_processes_give_the_threads_manifest(images: Path, monkeypatch):
    """Large folders are hashed by processes (threads alone use about one core): the same rows,
    and a paused scan's rows are a prefix of them from which a scan goes on."""
    from storage import manifest as manifest_module
    from storage.manifest import ScanPaused, scan_image_folder

    threads = scan_image_folder(images, processes=0)
    monkeypatch.setattr(manifest_module, "SCAN_BATCH", 4)  # 18 images: five batches
    processes = scan_image_folder(images, processes=2)
    assert processes.fingerprint() == threads.fingerprint()
    np.testing.assert_array_equal(processes.sha256, threads.sha256)

    def pause(scanned: int, total: int | None) -> None:
        if total is not None and scanned >= 5:
            raise ScanPaused()

    with pytest.raises(ScanPaused) as paused:
        scan_image_folder(images, processes=2, progress=pause)
    partial = paused.value.partial
    assert len(partial) == 8  # whole batches: the second one reached 5
    np.testing.assert_array_equal(partial.sha256, threads.sha256[:8])
    np.testing.assert_array_equal(partial.width, threads.width[:8])
    resumed = scan_image_folder(images, processes=2, resume=partial)
    assert resumed.fingerprint() == threads.fingerprint()


def test_ordered_map_keeps_order_and_window():
    from concurrent.futures import ThreadPoolExecutor

    from storage.manifest import ordered_map

    submitted = []
    with ThreadPoolExecutor(4) as pool:
        out = []
        for x in ordered_map(pool, lambda v: submitted.append(v) or v * v, range(100), window=5):
            out.append(x)
            assert len(submitted) - len(out) <= 5
    assert out == [v * v for v in range(100)]


def test_split_buckets_are_stored_at_registration_and_made_for_older_datasets(
        tmp_path: Path, images: Path):
    """Issue 15: no reader hashes every path at start (15 s at 14.2M images)."""
    from storage.splits import held_out, split_bucket

    store = Store.open(tmp_path / "store")
    dataset, _ = store.add_dataset("toy", images)
    paths = dataset.manifest().path
    columns = store.root["datasets/toy/manifest"]
    assert "bucket" in columns.array_keys()
    np.testing.assert_array_equal(dataset.split_buckets(), split_bucket(paths))
    np.testing.assert_array_equal(dataset.held_out(300), held_out(paths, 300))

    del columns["bucket"]  # a dataset registered before the column existed
    older = Store.open(tmp_path / "store").dataset("toy")
    np.testing.assert_array_equal(older.split_buckets(), split_bucket(paths))
    assert "bucket" in Store.open(tmp_path / "store").root["datasets/toy/manifest"].array_keys()
    assert older.fingerprint == dataset.fingerprint  # the column is not part of the contents
