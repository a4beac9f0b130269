"""Compact manifests (store format 2, issue 15): the path column, the sorted streaming listing,
row-range reads, and version-1 stores made by the previous code still opening and reading."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from storage import FORMAT, FORMAT_VERSION, DatasetUnfinished, PathColumn, Store, StoreError
from storage import dataset as dataset_module
from storage.manifest import list_image_files, scan_image_folder
from storage.verify import verify_store

FIXTURE = Path(__file__).parent / "fixtures" / "store_v1"  # provenance: fixtures/PROVENANCE.md
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())


@pytest.fixture
def v1_store(tmp_path: Path) -> Path:
    shutil.copytree(FIXTURE / "store", tmp_path / "store")
    return tmp_path / "store"


def test_path_column_indexes_like_a_list():
    values = ["a/b.jpg", "café/ü.png", "", "z" * 300, "x/y/z.jpg"]
    column = PathColumn.from_strings(values)
    assert len(column) == 5 and column.tolist() == values and list(column) == values
    assert [column[i] for i in range(-5, 5)] == values + values
    assert column[np.int64(1)] == "café/ü.png"
    for key in (slice(1, 4), slice(None, None, 2), slice(3, 1), slice(4, 99), slice(-2, None)):
        assert column[key].tolist() == values[key], key
    assert column[np.array([4, 0, 4])].tolist() == [values[4], values[0], values[4]]
    assert column[np.array([True, False, True, False, True])].tolist() == values[::2]
    assert column[np.array([], np.int64)].tolist() == []
    assert pickle.loads(pickle.dumps(column)).tolist() == values  # sent to DataLoader workers
    with pytest.raises(IndexError):
        column[5]
    assert column.nbytes == len("".join(values).encode()) + 8 * len(values)
    assert PathColumn.from_strings([]).tolist() == []


def test_the_streaming_listing_is_sorted_as_the_paths_are(tmp_path: Path):
    """The walk emits paths in sorted order without holding them as strings: a directory ``d``
    sorts as ``d/`` beside files and directories named ``d.x``, ``d-x``, ``d0``."""
    names = ["a.jpg", "a/x.jpg", "a/b/y.jpg", "a.b/c.jpg", "a-b/c.jpg", "a0/c.jpg", "ab/c.jpg",
             "a/b.jpg", "a/b.c/d.jpg", "b/Z.jpg", "b/a.jpg", "é/1.jpg", "e/1.jpg"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"not an image")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "h.jpg").write_bytes(b"")
    (tmp_path / "a" / "notes.txt").write_text("")
    os.symlink(tmp_path / "a", tmp_path / "linked")  # a symlinked directory is not walked
    listing = list_image_files(tmp_path)
    assert listing.paths.tolist() == sorted(names)
    class_names, labels = listing.classes()  # a file beside the class folders: no classes
    assert class_names == () and (labels == -1).all()

    del_root = [n for n in names if "/" in n]
    (tmp_path / "a.jpg").unlink()
    listing = list_image_files(tmp_path)
    assert listing.paths.tolist() == sorted(del_root)
    class_names, labels = listing.classes()
    assert class_names == tuple(sorted({n.split("/")[0] for n in del_root}))
    assert [class_names[c] for c in labels] == [p.split("/")[0] for p in sorted(del_root)]


def test_a_new_store_writes_the_compact_layout(tmp_path: Path, images: Path):
    store = Store.open(tmp_path / "store")
    dataset, _ = store.add_dataset("toy", images)
    assert store.root.attrs["format_version"] == FORMAT_VERSION == 2
    assert dataset.manifest_version == 2
    columns = store.root["datasets/toy/manifest"]
    assert "path" not in columns.array_keys()
    assert columns["sha256"].dtype == np.uint8 and columns["sha256"].shape == (18, 32)
    assert columns["path_end"].shape == (18,) and columns["path_utf8"].ndim == 1
    manifest = scan_image_folder(images)
    assert dataset.paths().tolist() == manifest.path.tolist()
    np.testing.assert_array_equal(dataset.sha256(), manifest.sha256)
    assert dataset.computed_fingerprint() == dataset.fingerprint == manifest.fingerprint()


def test_row_ranges_read_across_chunk_boundaries(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(dataset_module, "MANIFEST_CHUNK", 4)
    monkeypatch.setattr(dataset_module, "PATH_BYTES_CHUNK", 7)  # a path spans chunks
    root = tmp_path / "images"
    for i in range(23):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"class{i % 2}" / f"{'é' * (i % 4)}{i:03d}.png").write_bytes(bytes([i]) * 5)
    store = Store.open(tmp_path / "store")
    _dataset, _ = store.add_dataset("toy", root)
    assert store.root["datasets/toy/manifest/path_utf8"].chunks == (7,)
    assert store.root["datasets/toy/manifest/sha256"].chunks == (4, 32)
    whole = scan_image_folder(root)
    reopened = Store.open(tmp_path / "store", mode="r").dataset("toy")
    for start, stop in [(0, 23), (0, 1), (22, 23), (3, 9), (4, 8), (5, 5), (0, 0), (23, 23)]:
        part = reopened.manifest(start, stop)
        assert part.path.tolist() == whole.path[start:stop].tolist(), (start, stop)
        np.testing.assert_array_equal(part.sha256, whole.sha256[start:stop])
        np.testing.assert_array_equal(part.label, whole.label[start:stop])
    assert [reopened.image_path(i) for i in range(23)] == whole.path.tolist()
    assert reopened.image_sha256(9) == whole.sha256[9].tobytes()
    chunks = list(reopened.manifest_chunks(rows=5))
    assert [len(c) for c in chunks] == [5, 5, 5, 5, 3]
    assert reopened.computed_fingerprint() == whole.fingerprint()
    with pytest.raises(IndexError):
        reopened.paths(3, 24)
    with pytest.raises(KeyError, match="number columns"):
        reopened.column("sha256")


def test_a_version_1_store_opens_and_reads_as_it_did(v1_store: Path):
    store = Store.open(v1_store, mode="r")
    assert store.format_version == 1
    dataset = store.dataset(EXPECTED["dataset"])
    assert dataset.manifest_version == 1
    manifest = dataset.manifest()
    assert manifest.path.tolist() == EXPECTED["path"]  # with a non-ASCII path
    assert [row.tobytes().hex() for row in manifest.sha256] == EXPECTED["sha256"]
    for stored, attr in (("width", "width"), ("height", "height"), ("class", "label")):
        assert getattr(manifest, attr).tolist() == EXPECTED[stored]
    assert dataset.paths(10, 12).tolist() == EXPECTED["path"][10:12]
    assert dataset.image_sha256(3).hex() == EXPECTED["sha256"][3]
    assert dataset.split_buckets().tolist() == EXPECTED["bucket"]
    assert dataset.computed_fingerprint() == EXPECTED["fingerprint"] == dataset.fingerprint
    labelset = dataset.labelset(EXPECTED["labelset"])
    block = labelset.read_block(0, labelset.num_images)
    assert block.status.tolist() == EXPECTED["status"]
    np.testing.assert_allclose(block.logits[0].astype(float), EXPECTED["logits_image0"],
                               atol=1e-3)
    assert block.classes[0].tolist() == EXPECTED["classes_image0"]
    assert labelset.completion() == EXPECTED["completion"]
    assert verify_store(Store.open(v1_store)).ok


def test_a_version_1_store_takes_new_datasets_and_then_says_version_2(v1_store: Path,
                                                                         tmp_path: Path):
    images = tmp_path / "imgs"
    shutil.copytree(FIXTURE / "imgs", images)
    store = Store.open(v1_store)
    _again, created = store.add_dataset(EXPECTED["dataset"], images)
    assert not created  # the same images: the fingerprint does not depend on the layout
    assert Store.open(v1_store, mode="r").format_version == 1
    added, created = store.add_dataset("added", images)
    assert created and added.manifest_version == 2 and added.fingerprint == EXPECTED["fingerprint"]
    reopened = Store.open(v1_store, mode="r")
    assert reopened.format_version == 2  # a version-1 reader now refuses the store
    assert reopened.dataset(EXPECTED["dataset"]).paths().tolist() == EXPECTED["path"]
    assert reopened.dataset("added").paths().tolist() == EXPECTED["path"]
    assert verify_store(reopened).ok


def test_unknown_versions_are_refused(tmp_path: Path, images: Path):
    root = zarr.open_group(tmp_path / "newer", mode="w")
    root.update_attributes({"format": FORMAT, "format_version": FORMAT_VERSION + 1})
    with pytest.raises(StoreError, match="reads versions 1, 2"):
        Store.open(tmp_path / "newer")
    store = Store.open(tmp_path / "store")
    store.add_dataset("toy", images)
    store.root["datasets/toy"].update_attributes({"manifest_version": 3})
    with pytest.raises(StoreError, match="manifest version 3"):
        Store.open(tmp_path / "store").dataset("toy")


def test_verify_finds_a_manifest_that_no_longer_matches_its_fingerprint(tmp_path: Path,
                                                                        images: Path):
    """Positive control for verify's chunked fingerprint: one changed byte of one hash."""
    store = Store.open(tmp_path / "store")
    store.add_dataset("toy", images)
    assert verify_store(store).ok
    sha = store.root["datasets/toy/manifest/sha256"]
    row = np.asarray(sha[7])
    row[0] ^= 1
    sha[7] = row
    report = verify_store(Store.open(tmp_path / "store"))
    assert any("fingerprint does not match" in p for p in report.problems), report.problems


def test_a_scan_paused_before_any_file_resumes_from_nothing(images: Path):
    """Paused at its first progress call with the total known (no file hashed yet), a scan
    hands back an empty PartialScan, and resuming from it scans every file."""
    from storage.manifest import ScanPaused

    def pause_at_once(scanned: int, total: int | None) -> None:
        if total is not None:
            raise ScanPaused("at once")

    with pytest.raises(ScanPaused) as paused:
        scan_image_folder(images, progress=pause_at_once, processes=0)
    assert paused.value.partial is not None and len(paused.value.partial) == 0
    resumed = scan_image_folder(images, processes=0, resume=paused.value.partial)
    whole = scan_image_folder(images, processes=0)
    assert resumed.sha256.shape == whole.sha256.shape and len(whole.sha256) > 0
    np.testing.assert_array_equal(resumed.sha256, whole.sha256)


def test_a_paused_scan_goes_on_from_its_kept_rows(tmp_path: Path, images: Path, monkeypatch):
    """A registration task near its time limit pauses the scan (its progress callback raises
    ScanPaused); the rows hashed so far are kept in the store, and the next call with the same
    key hashes only the rest, to the same dataset an uninterrupted scan writes."""
    from storage import manifest as manifest_module
    from storage.manifest import ScanPaused

    probed: list[str] = []
    probe = manifest_module.probe_image

    def counted(path: Path):
        probed.append(path.name)
        return probe(path)

    monkeypatch.setattr(manifest_module, "probe_image", counted)

    def pause_at(count: int):
        def progress(scanned: int, total: int | None) -> None:
            if total is not None and scanned >= count:
                raise ScanPaused(f"{scanned} of {total}")
        return progress

    clean, _ = Store.open(tmp_path / "clean").add_dataset("toy", images)
    store = Store.open(tmp_path / "store")
    total = clean.num_images
    for reached in (5, 11):
        probed.clear()
        with pytest.raises(ScanPaused):
            store.add_dataset("toy", images, progress=pause_at(reached), resume_key="attempt-1")
        assert len(store.partial_scan("toy", "attempt-1")) == reached
        with pytest.raises(DatasetUnfinished, match="unfinished"):
            store.dataset("toy")  # an unfinished registration, as before
    assert store.partial_scan("toy", "another attempt") is None

    probed.clear()
    dataset, created = store.add_dataset("toy", images, resume_key="attempt-1")
    assert created and len(probed) == total - 11
    assert dataset.fingerprint == clean.fingerprint
    np.testing.assert_array_equal(dataset.sha256(), clean.sha256())
    assert "scan" not in dataset.group.group_keys() and verify_store(store).ok

    # Another key, or a folder that lists other files since, hashes everything again.
    other = Store.open(tmp_path / "other")
    with pytest.raises(ScanPaused):
        other.add_dataset("toy", images, progress=pause_at(5), resume_key="a")
    probed.clear()
    other.add_dataset("toy", images, resume_key="b")
    assert len(probed) == total
    third = Store.open(tmp_path / "third")
    with pytest.raises(ScanPaused):
        third.add_dataset("toy", images, progress=pause_at(5), resume_key="a")
    (images / "squares" / "extra.png").write_bytes((images / "squares" / "0000.jpg").read_bytes())
    probed.clear()
    grown, _ = third.add_dataset("toy", images, resume_key="a")
    assert len(probed) == total + 1 == grown.num_images
