"""What a hostile or careless folder, or a damaged store, can do to the store, and what it cannot
(issue 23): names that forge fingerprints or are not text, folders too deep to recurse, files
that vanish or grow, damaged manifest columns, tampered summaries, emptied label objects, and
hashing processes orphaned by a killed registration."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zarr
from PIL import Image

from storage import (
    DatasetUnfinished,
    FolderChangedDuringScan,
    ImageStatus,
    LabelSetConfig,
    ManifestDamaged,
    Store,
    TeacherSpec,
)
from storage.images import ImageRejected, read_image_bytes
from storage.manifest import ScanPaused, list_image_files, probe_image, scan_image_folder
from storage.verify import verify_store
from tests.test_manifest import EXPECTED, FIXTURE  # the version-1 store fixture
from tests.test_store import TEACHER, random_block


def png(path: Path, colour: int = 0, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (colour, 0, 0)).save(path)
    return path


# -- names ------------------------------------------------------------------------------------

def test_a_name_built_to_forge_another_folders_fingerprint_is_skipped(tmp_path: Path):
    """A35: the fingerprint joins fields with \\x1f and rows with \\x1e. Folder B's one file is
    named so that its row reads as folder A's two rows; it must not be listed (and is counted),
    so B cannot take A's fingerprint and with it A's labels."""
    a = tmp_path / "a"
    png(a / "a.png", 10)
    png(a / "b.png", 20)
    manifest_a = scan_image_folder(a, processes=0)
    digest = manifest_a.sha256_hex(0)
    forged = f"a.png\x1f{digest}\x1f8\x1f6\x1f-1\x1eb.png"
    b = tmp_path / "b"
    b.mkdir()
    shutil.copy(a / "b.png", b / forged)

    manifest_b = scan_image_folder(b, processes=0)
    assert len(manifest_b) == 0
    assert manifest_b.skipped.count == 1 and "\\x1f" in manifest_b.skipped.examples[0]
    assert manifest_b.fingerprint() != manifest_a.fingerprint()
    store = Store.open(tmp_path / "store")
    dataset, _ = store.add_dataset("b", b)
    assert dataset.attrs["skipped_names"]["count"] == 1


def test_a_name_that_is_not_utf8_is_skipped_and_named_not_a_crash(tmp_path: Path):
    """A29: a Latin-1 file name (and a folder named so) failed the whole registration with a
    UnicodeEncodeError. Now both are left out, counted, and shown escaped."""
    root = tmp_path / "imgs"
    png(root / "ok" / "fine.png")
    png(root / "ok" / "second.png")
    os.rename(root / "ok" / "second.png", os.fsencode(root / "ok") + b"/caf\xe9.png")
    os.makedirs(os.fsencode(root) + b"/na\xefve")
    png(Path(os.fsdecode(os.fsencode(root) + b"/na\xefve/inside.png")))

    store = Store.open(tmp_path / "store")
    dataset, _ = store.add_dataset("latin1", root)
    assert dataset.paths().tolist() == ["ok/fine.png"]
    skipped = dataset.attrs["skipped_names"]
    assert skipped["count"] == 2
    assert sorted(skipped["examples"]) == ["na\\udcefve", "ok/caf\\udce9.png"]
    assert dataset.class_names == ("ok",)


def test_a_folder_nested_1500_levels_deep_is_listed(tmp_path: Path):
    """A30: the walk recursed once per level and hit Python's recursion limit."""
    deep = tmp_path / "root"
    deep.mkdir()
    for _ in range(1500):  # one level at a time: pathlib's mkdir(parents=True) recurses too
        deep = deep / "d"
        deep.mkdir()
    png(deep / "bottom.png")
    png(tmp_path / "root" / "top.png")
    try:
        listing = list_image_files(tmp_path / "root")
        assert listing.paths.tolist() == ["d/" * 1500 + "bottom.png", "top.png"]
    finally:  # pytest's own clean-up (shutil.rmtree) recurses, and would fail on this tree
        (deep / "bottom.png").unlink()
        while deep != tmp_path / "root":
            deep.rmdir()
            deep = deep.parent


# -- files that change under the scan ---------------------------------------------------------

def test_a_file_that_vanishes_during_the_scan_is_named(tmp_path: Path):
    """A25: a file listed, then deleted before it was hashed, was reported as "cannot read the
    folder". It is now the folder changing during the scan, with the file's name."""
    root = tmp_path / "imgs"
    for i in range(4):
        png(root / f"{i}.png", i)

    def delete_once_listed(scanned: int, total: int | None) -> None:
        if total is not None and (root / "3.png").exists():
            (root / "3.png").unlink()

    with pytest.raises(FolderChangedDuringScan, match=r"3\.png.*changed while it was scanned"):
        scan_image_folder(root, processes=0, progress=delete_once_listed)


def test_hashing_reads_in_blocks_and_records_the_size(tmp_path: Path):
    """A31: two 2 GB files named .png pushed a registration worker to 4.7 GB: the probe read
    each file whole. It hashes in blocks now (a 64 MB file, sparse on disk, costs no 64 MB)."""
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(64 << 20)
    tracemalloc.start()
    try:
        digest, width, height, size = probe_image(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, f"probing a 64 MB file held {peak >> 20} MB"
    assert size == 64 << 20 and (width, height) == (-1, -1)
    assert digest == hashlib.sha256(bytes(64 << 20)).digest()


def test_reads_are_capped_at_the_registered_size(tmp_path: Path):
    """A32: a file replaced by a multi-GB one was read whole before its digest was compared.
    With the registered size, a file of another size is refused unread."""
    root = tmp_path / "imgs"
    image = png(root / "0.png")
    store = Store.open(tmp_path / "store")
    dataset, _ = store.add_dataset("sized", root)
    size, digest = int(dataset.sizes()[0]), dataset.image_sha256(0)
    assert size == image.stat().st_size
    assert read_image_bytes(image, digest, root=root, expected_size=size) == image.read_bytes()

    with open(image, "wb") as f:
        f.truncate(256 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(ImageRejected) as rejected:
            read_image_bytes(image, digest, root=root, expected_size=size)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert rejected.value.status == ImageStatus.CHANGED_FILE
    assert peak < 1 << 20


# -- damaged manifests ------------------------------------------------------------------------

@pytest.fixture
def registered(tmp_path: Path, images: Path) -> Store:
    store = Store.open(tmp_path / "store")
    store.add_dataset("toy", images)
    return store


def manifest_columns(store: Store, name: str = "toy") -> zarr.Group:
    return zarr.open_group(store.root.store, path=f"datasets/{name}/manifest", mode="r+")


def test_damaged_path_offsets_are_refused_not_served_as_paths(registered: Store):
    """A20: non-monotonic offsets gave paths like 'c1/1.pngc2/0.png' for labeled images."""
    columns = manifest_columns(registered)
    ends = columns["path_end"][:]
    ends[3], ends[4] = ends[4], ends[3]
    columns["path_end"][:] = ends
    dataset = Store.open(registered.location).dataset("toy")
    assert dataset.paths(0, 3).tolist()  # rows before the damage still read
    for start, stop in ((0, None), (3, 5), (3, 4), (4, 5), (2, 4)):
        with pytest.raises(ManifestDamaged, match=r"'toy'.*labeler store verify"):
            dataset.paths(start, stop)
    report = verify_store(Store.open(registered.location))
    assert any("damaged" in p for p in report.problems)


def test_a_sha256_column_of_the_wrong_shape_is_a_damaged_manifest(registered: Store):
    """A19: a v2 sha256 column of the wrong shape gave "zip() argument 2 is shorter", and a
    repair job blamed the files."""
    columns = manifest_columns(registered)
    digests = columns["sha256"][:]
    columns.create_array("sha256", shape=(len(digests) - 2, 32), dtype="uint8", overwrite=True)
    dataset = Store.open(registered.location).dataset("toy")
    with pytest.raises(ManifestDamaged, match="sha256"):
        dataset.sha256()
    with pytest.raises(ManifestDamaged):
        dataset.image_sha256(17)
    assert not verify_store(Store.open(registered.location)).ok


def test_a_version_1_digest_cut_short_is_a_damaged_manifest(tmp_path: Path):
    """A18: a v1 sha256 string cut short stopped verify at that dataset ("cannot reshape")."""
    shutil.copytree(FIXTURE / "store", tmp_path / "store")
    store = Store.open(tmp_path / "store")
    columns = manifest_columns(store, EXPECTED["dataset"])
    digests = columns["sha256"][:]
    digests[5] = digests[5][:40]
    columns["sha256"][:] = digests
    dataset = Store.open(tmp_path / "store").dataset(EXPECTED["dataset"])
    assert dataset.sha256(0, 5).shape == (5, 32)
    with pytest.raises(ManifestDamaged, match="64 hex digits"):
        dataset.sha256()
    report = verify_store(Store.open(tmp_path / "store"))
    assert any("damaged" in p for p in report.problems)


def test_an_unfinished_registration_is_a_note_not_a_problem(registered: Store, images: Path):
    """A28: verify called an in-progress registration a problem (exit 1 during any large
    registration)."""
    def pause(scanned: int, total: int | None) -> None:
        if total is not None and scanned >= 5:
            raise ScanPaused()

    with pytest.raises(ScanPaused):
        registered.add_dataset("growing", images, progress=pause, resume_key="attempt")
    with pytest.raises(DatasetUnfinished, match="'growing' is unfinished"):
        registered.dataset("growing")
    report = verify_store(registered)
    assert report.ok, report.problems
    assert any("'growing' is unfinished" in note for note in report.notes)


# -- label sets -------------------------------------------------------------------------------

@pytest.fixture
def labelset(registered: Store):
    dataset = registered.dataset("toy")
    config = LabelSetConfig(teacher=TEACHER, topk=2, grid=(3, 3),
                            dataset_fingerprint=dataset.fingerprint, shard_size=4, chunk_size=2)
    labelset = dataset.create_labelset(config)
    rng = np.random.default_rng(0)
    for shard in range(labelset.num_shards):
        block = random_block(labelset, shard, rng)
        block.status[:] = ImageStatus.LABELED
        labelset.write_shard(shard, block)
    labelset.record_completion()
    return labelset


@pytest.mark.parametrize("summary", [
    {"images": 18, "shards": 5, "counts": {"0": 99}},  # more images than there are
    {"images": 18, "shards": 5, "counts": {"-1": 18}},  # pending, in a completion summary
    {"images": 18, "shards": 5, "counts": {"0": 17.5, "1": 0.5}},
    {"images": 18, "shards": 4, "counts": {"0": 18}},
    {"images": 18, "shards": 5, "counts": "all"},
    ["not", "a", "summary"],
])
def test_a_malformed_completion_summary_is_not_believed(labelset, registered: Store, summary):
    """A21: a tampered summary was served as it was. One this label set could not have is now
    ignored (readers go to the status records) and verify reports it."""
    labelset.group.update_attributes({"completion": summary})
    reopened = registered.labelset(labelset.id)
    assert reopened.completion() is None
    assert reopened.is_complete()  # from the status records
    report = verify_store(registered)
    assert any("completion summary is malformed" in p for p in report.problems)
    repaired = verify_store(registered, repair=True)
    assert repaired.repaired and registered.labelset(labelset.id).completion() == {
        "images": 18, "shards": 5, "counts": {"0": 18}}


def test_a_false_but_well_formed_summary_is_found_by_verify(labelset, registered: Store):
    """A21, the forgery the summary's form cannot show: {"0": 15} over 12 labeled and 3 failed.
    Readers may trust it for "complete?"; verify (and a repair job) compare it with the
    records, and the trainer reads each shard's status with its labels."""
    block = labelset.read_shard(0)
    block.status[:3] = ImageStatus.UNREADABLE
    labelset.write_shard(0, block)
    labelset.group.update_attributes({"completion": {"images": 18, "shards": 5,
                                                     "counts": {"0": 18}}})
    report = verify_store(registered)
    assert any("disagrees with the status records" in p for p in report.problems)


def test_dropping_the_summary_sees_one_recorded_after_this_label_set_was_opened(
        labelset, registered: Store):
    """A23: drop_completion read the attrs cached when the label set was opened, so a writer
    that opened it before the summary existed never removed it and left a summary claiming a
    shard that was being rewritten."""
    registered.labelset(labelset.id).group.attrs.pop("completion")
    early = registered.labelset(labelset.id)  # opened before the summary exists
    assert early.completion() is None
    registered.labelset(labelset.id).record_completion()  # another writer records it
    early.mark_pending(2)
    assert registered.labelset(labelset.id).completion() is None
    assert registered.labelset(labelset.id).pending_shards() == [2]


def test_an_emptied_label_object_makes_its_images_damaged(labelset, registered: Store):
    """R21: an `lse` shard object deleted (or emptied) under a status record that survived
    was served as labeled with lse null. ``damaged`` says which images, for serving, training
    and verify alike."""
    lse = labelset.array("lse")
    key = lse.metadata.encode_chunk_key((1, 0, 0))
    (Path(registered.location) / lse.store_path.path / key).unlink()
    reopened = registered.labelset(labelset.id)
    block = reopened.read_block(0, reopened.num_images)
    assert (block.status == ImageStatus.LABELED).all()
    assert reopened.damaged(block).tolist() == [4 <= i < 8 for i in range(18)]
    report = verify_store(registered)
    assert any("shard 1: 4 images marked labeled have no labels" in p for p in report.problems)


def test_imported_labels_without_lse_are_not_damaged(registered: Store):
    dataset = registered.dataset("toy")
    config = LabelSetConfig(teacher=TeacherSpec(model="imported", checkpoint_sha256=None,
                                                num_classes=3, input_size=96),
                            topk=2, grid=(3, 3), dataset_fingerprint=dataset.fingerprint,
                            shard_size=18, extra={"source": "tokenlabeling-import"})
    labelset = dataset.create_labelset(config)
    block = random_block(labelset, 0, np.random.default_rng(1))
    block.lse[:] = np.nan
    block.global_logits[:] = np.nan
    block.global_classes[:] = -1
    block.status[:] = ImageStatus.LABELED
    assert labelset.imported and not labelset.damaged(block).any()
    block.classes[2, 0, 1, 1] = 3  # a class the teacher does not have
    assert labelset.damaged(block).tolist() == [i == 2 for i in range(18)]


# -- processes --------------------------------------------------------------------------------

def running(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (an exited orphan not yet reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


ORPHAN_SCRIPT = """
import multiprocessing, sys, time
from pathlib import Path
from storage.manifest import scan_image_folder

def hold(scanned, total):
    if total is not None and scanned > 0:
        print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        time.sleep(600)

if __name__ == "__main__":
    scan_image_folder(Path(sys.argv[1]), processes=2, progress=hold)
"""


@pytest.mark.slow
def test_hashing_processes_exit_when_the_scan_is_killed(tmp_path: Path, images: Path):
    """A27: a registration killed at its hard time limit (SIGKILL: nothing is cleaned up) left
    its hashing processes waiting on their queue for good (34-40 minutes, until stopped by
    hand). They watch the process that started them, and exit with it."""
    script = tmp_path / "scan.py"
    script.write_text(ORPHAN_SCRIPT)
    scan = subprocess.Popen([sys.executable, str(script), str(images)], stdout=subprocess.PIPE,
                            text=True, cwd=Path(__file__).parent.parent)
    try:
        children = [int(pid) for pid in scan.stdout.readline().split()]
    finally:
        scan.send_signal(signal.SIGKILL)
        scan.wait()
    assert children  # one per batch started, up to processes
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(running(pid) for pid in children):
        time.sleep(0.1)
    alive = [pid for pid in children if running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive, "hashing processes outlived the scan that started them"


def test_datasets_are_listed_by_name_and_a_stray_folder_is_none(registered: Store):
    """Names come from one listing of datasets/ (reading every dataset's metadata was most of a
    dataset listing's cost, R17); a folder a crash left without its group document is no
    dataset, and lookups over all datasets do not trip on it."""
    (Path(registered.location) / "datasets" / "stray").mkdir()
    (Path(registered.location) / "datasets" / "stray" / "junk").write_bytes(b"x")
    assert registered.dataset_names() == ["toy"]
    with pytest.raises(KeyError):
        registered.labelset("no-such-labelset")
    assert verify_store(registered).ok
