"""Label quality: cell ground truth through the recorded geometry, the dense scores against
hand-computed values, and positive controls (a perfect teacher scores 1, a transposed or
permuted one does not)."""

from __future__ import annotations

import os
import shutil
import threading
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from labeler_service.cli import main
from labeler_service.quality import (
    cell_ground_truth,
    cell_object_fraction,
    dense_quality,
    evaluate_labels,
    reliability,
    teacher_agreement,
)
from labeler_service.scenes import SCENE_CLASSES, load_mask, make_scenes, mask_bytes, mask_path
from storage import ImageStatus, LabelSetConfig, Store, TeacherSpec

SQUASH = TeacherSpec(model="oracle", checkpoint_sha256=None, num_classes=10, input_size=256)
CROP = TeacherSpec(model="oracle", checkpoint_sha256=None, num_classes=10, input_size=256,
                   resize="center_crop")


def test_cell_ground_truth_is_the_majority_of_each_cell():
    # 4 x 6 pixels, a 2 x 3 grid: each cell is 2 x 2 pixels.
    mask = np.array([[0, 0, 1, -1, 2, 2],
                     [0, -1, 1, -1, 2, -1],
                     [-1, -1, 3, 3, -1, -1],
                     [-1, 4, 3, -1, -1, 5]], np.int8)
    # cell (0,1) holds 1, -1, 1, -1: a tie, which goes to background.
    expected = [[0, -1, 2], [-1, 3, -1]]
    assert cell_ground_truth(mask, (2, 3), SQUASH).tolist() == expected
    fraction = [[0.75, 0.5, 0.75], [0.25, 0.75, 0.25]]
    assert cell_object_fraction(mask, (2, 3), SQUASH).tolist() == fraction


def test_cell_ground_truth_center_crop_covers_the_central_square():
    mask = np.full((4, 10), -1, np.int8)
    mask[:, :3] = 7  # outside the central 4 x 4 square (x in [3, 7)): belongs to no cell
    mask[:2, 3:5] = 1
    mask[2:, 5:7] = 2
    assert cell_ground_truth(mask, (2, 2), CROP).tolist() == [[1, -1], [-1, 2]]
    assert cell_ground_truth(mask, (2, 2), SQUASH).tolist() == [[7, -1], [7, -1]]


def test_dense_quality_equals_hand_computed_values():
    truth = np.array([[[0, 1], [-1, 2]]])  # image class 0: 1 main, 2 distractor cells
    predicted = np.array([[[[0, 2], [1, 2]],   # top-1
                           [[1, 1], [0, 0]]]])  # top-2
    confidence = np.array([[[0.95, 0.85], [0.5, 0.35]]])
    q = dense_quality(truth, predicted, confidence, np.array([0]), num_classes=4)
    assert (q["main_cells"], q["distractor_cells"], q["cells"]) == (1, 2, 4)
    assert q["main_top1"] == 1.0 and q["distractor_top1"] == 0.5
    assert q["object_top1"] == pytest.approx(2 / 3) and q["background_share"] == 0.25
    assert q["distractor_top5"] == 1.0  # cell (0,1): class 1 is its second guess
    # IoU on object cells: class 0 1/1, class 1 0/1 (its prediction is on a background cell),
    # class 2 1/2, class 3 never present.
    assert q["miou"] == pytest.approx((1 + 0 + 0.5) / 3)
    bins = {round(b["low"], 1): b for b in q["reliability"]["bins"]}  # object cells only
    assert sorted(bins) == [0.3, 0.8, 0.9] and bins[0.9]["cells"] == 1
    assert bins[0.9]["accuracy"] == 1.0 and bins[0.9]["confidence"] == 0.95
    assert bins[0.8]["accuracy"] == 0.0 and bins[0.3]["accuracy"] == 1.0
    assert q["reliability"]["ece"] == pytest.approx((0.05 + 0.85 + 0.65) / 3)


def test_unknown_image_class_counts_cells_as_objects_only():
    q = dense_quality(np.array([[[1, 1]]]), np.array([[[[1, 0]]]]), np.ones((1, 1, 2)),
                      np.array([-1]), num_classes=2)
    assert q["main_cells"] == q["distractor_cells"] == 0 and q["object_top1"] == 0.5
    assert q["main_top1"] is None


def test_reliability_of_a_calibrated_predictor_is_near_zero():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(size=200_000)
    correct = rng.uniform(size=confidence.size) < confidence
    assert reliability(confidence, correct)["ece"] < 0.01
    assert reliability(np.full(1000, 0.95), np.zeros(1000, bool))["ece"] == pytest.approx(0.95)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> tuple[Store, Path]:
    root = tmp_path_factory.mktemp("scenes")
    images = make_scenes(root / "scenes", images=40, seed=1)
    store = Store.open(root / "store")
    store.add_dataset("scenes", images)
    return store, images


def oracle_labelset(store: Store, images: Path, name: str, transform) -> str:
    """A label set whose top-1 is ``transform`` of the cell ground truth (background cells get
    class 0) and of the image class, with top-2 the next class."""
    dataset = store.dataset("scenes")
    spec = TeacherSpec(model=name, checkpoint_sha256=None, num_classes=10, input_size=256,
                       class_names=SCENE_CLASSES)
    labelset = dataset.create_labelset(LabelSetConfig(
        teacher=spec, topk=2, grid=(8, 8), dataset_fingerprint=dataset.fingerprint,
        shard_size=16))
    paths, classes = dataset.manifest().path, dataset.manifest().label
    for shard in range(labelset.num_shards):
        block = labelset.empty_block(shard)
        for row in range(len(block)):
            truth = cell_ground_truth(load_mask(images / paths[block.start + row]), (8, 8), spec)
            top1 = transform(np.maximum(truth, 0))
            block.classes[row] = np.stack([top1, (top1 + 1) % 10])
            block.logits[row] = np.stack([np.full((8, 8), 4.0), np.zeros((8, 8))])
            block.lse[row] = np.log(np.exp(4.0) + 9.0)
            image_class = int(transform(np.array([[classes[block.start + row]]]))[0, 0])
            block.global_classes[row] = [image_class, (image_class + 1) % 10]
            block.global_logits[row] = [4.0, 0.0]
        block.status[:] = ImageStatus.LABELED
        labelset.write_shard(shard, block)
    return labelset.id


def test_positive_controls(scenes):
    store, images = scenes
    dataset = store.dataset("scenes")
    perfect = evaluate_labels(dataset, store.labelset(
        oracle_labelset(store, images, "perfect", lambda t: t)), images, val_permille=500)
    assert perfect["all"]["main_top1"] == perfect["all"]["distractor_top1"] == 1.0
    assert perfect["all"]["miou"] == 1.0 and perfect["held_out"]["images"] < 40
    assert perfect["all"]["reliability"]["bins"][-1]["accuracy"] == 1.0
    # The public code's box-order bug mirrors maps across the diagonal: caught. (Not 0: a main
    # object near the centre overlaps its own mirror image, and so do some distractors.)
    transposed = evaluate_labels(dataset, store.labelset(
        oracle_labelset(store, images, "transposed", lambda t: t.T)), images)
    assert transposed["all"]["main_top1"] < 0.7 and transposed["all"]["distractor_top1"] < 0.45
    # A teacher in another label space (classes permuted) is wrong everywhere, and its
    # image-level agreement says so.
    shifted = store.labelset(oracle_labelset(store, images, "shifted", lambda t: (t + 3) % 10))
    assert evaluate_labels(dataset, shifted, images)["all"]["object_top1"] == 0.0
    assert teacher_agreement(dataset, shifted)["top1"] == 0.0


def test_result_is_recorded_and_shown(scenes, monkeypatch):
    store, images = scenes
    labelset_id = oracle_labelset(store, images, "perfect", lambda t: t)
    monkeypatch.chdir(store.location.rsplit("/", 1)[0])
    out = CliRunner().invoke(main, ["evaluate-labels", labelset_id, "--store", store.location,
                                    "--val-permille", "500"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    lines = out.output.strip().splitlines()
    assert lines[0].startswith("dense labels (all, 40 images): top-1 = ground truth on 100.0 % "
                               "of main-object cells, 100.0 % of distractor cells")
    assert lines[1].startswith("dense labels (held-out, ")
    quality = Store.open(store.location).labelset(labelset_id).attrs["label_quality"]
    assert quality["all"]["main_top1"] == 1.0 and quality["val_permille"] == 500


def test_missing_masks_are_a_clear_error(scenes, tmp_path: Path):
    store, images = scenes
    labelset = store.labelset(oracle_labelset(store, images, "perfect", lambda t: t))
    with pytest.raises(FileNotFoundError, match=r"no mask under .* for a labeled image"):
        evaluate_labels(store.dataset("scenes"), labelset, tmp_path)


# -- issue 23: masks that cannot be used cost their image, never the evaluation ------------------

def mask_copy(images: Path, folder: Path) -> Path:
    """The scenes' masks alone, mirrored under ``folder`` (a ``--masks`` folder)."""
    for mask in images.rglob("*.mask.npz"):
        target = folder / mask.relative_to(images)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(mask, target)
    return folder


def perfect_labels(store: Store, images: Path):
    return store.labelset(oracle_labelset(store, images, "perfect", lambda t: t))


def test_a_bad_mask_is_counted_and_named_and_the_rest_scored(scenes, tmp_path: Path):
    """A10: a damaged mask (and one symlinked out of the mask folder) cost their images."""
    store, images = scenes
    masks = mask_copy(images, tmp_path / "masks")
    (masks / SCENE_CLASSES[1] / "00001.mask.npz").write_bytes(b"PK\x03\x04 not a zip archive")
    outside = shutil.copyfile(masks / SCENE_CLASSES[2] / "00002.mask.npz",
                              tmp_path / "outside.mask.npz")
    (masks / SCENE_CLASSES[2] / "00002.mask.npz").unlink()
    os.symlink(outside, masks / SCENE_CLASSES[2] / "00002.mask.npz")
    result = evaluate_labels(store.dataset("scenes"), perfect_labels(store, images), masks)
    assert result["masks_unreadable"] == 2 and result["all"]["images"] == 38
    assert result["all"]["main_top1"] == 1.0
    named = dict(result["mask_failures"])
    assert "not a mask archive" in named[f"{SCENE_CLASSES[1]}/00001.jpg"]
    assert "resolves outside" in named[f"{SCENE_CLASSES[2]}/00002.jpg"]


def test_the_cli_names_the_masks_it_left_out(scenes, tmp_path: Path):
    store, images = scenes
    masks = mask_copy(images, tmp_path / "masks")
    (masks / SCENE_CLASSES[1] / "00001.mask.npz").write_bytes(b"garbage")
    out = CliRunner().invoke(main, ["evaluate-labels", perfect_labels(store, images).id,
                                    "--masks", str(masks), "--store", store.location],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    last = out.output.strip().splitlines()[-1]
    assert last.startswith("labeled images left out: 1 with an unreadable mask (e.g. ")
    assert f"{SCENE_CLASSES[1]}/00001.mask.npz" in last


def test_a_mask_with_values_outside_the_classes_is_counted_not_scored(scenes, tmp_path: Path):
    """A11: a value that is no class of the dataset (here 10 classes: 12) is not ground truth."""
    store, images = scenes
    masks = mask_copy(images, tmp_path / "masks")
    rel = f"{SCENE_CLASSES[3]}/00003.jpg"
    mask = load_mask(images / rel).copy()
    mask[0, 0] = 12
    mask_path(masks / rel).write_bytes(mask_bytes(mask))
    result = evaluate_labels(store.dataset("scenes"), perfect_labels(store, images), masks)
    assert result["masks_with_unknown_classes"] == 1 and result["all"]["images"] == 39
    assert "class value 12 is outside -1..9" in dict(result["mask_failures"])[rel]


def test_a_fifo_in_place_of_a_mask_does_not_hang(scenes, tmp_path: Path):
    """A12: masks are opened as images are, without blocking: a FIFO is not a mask."""
    store, images = scenes
    masks = mask_copy(images, tmp_path / "masks")
    fifo = masks / SCENE_CLASSES[4] / "00004.mask.npz"
    fifo.unlink()
    os.mkfifo(fifo)
    outcome: dict = {}
    labelset = perfect_labels(store, images)
    worker = threading.Thread(target=lambda: outcome.update(
        result=evaluate_labels(store.dataset("scenes"), labelset, masks)), daemon=True)
    worker.start()
    worker.join(60)
    if worker.is_alive():  # release the blocked open (a writer's end), so the test can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail("evaluate_labels blocked on a FIFO in place of a mask")
    result = outcome["result"]
    assert result["masks_unreadable"] == 1 and result["all"]["images"] == 39
    assert "not a regular file" in dict(result["mask_failures"])[f"{SCENE_CLASSES[4]}/00004.jpg"]


def write_mask_bomb(path: Path, shape: tuple[int, int],
                    compression: int = zipfile.ZIP_DEFLATED) -> None:
    """A valid .npz whose mask is ``shape`` of zeros: deflated, a few hundred kB, ``shape``
    bytes unpacked; stored (as ``np.savez`` writes), ``shape`` bytes on disk too."""
    with zipfile.ZipFile(path, "w", compression) as archive, \
            archive.open("mask.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, {"descr": "|i1", "fortran_order": False,
                                                      "shape": shape})
        row = bytes(shape[1])
        for _ in range(shape[0]):
            member.write(row)


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED],
                         ids=["deflated", "stored"])
def test_a_mask_is_checked_from_its_header_before_it_is_unpacked(scenes, tmp_path: Path,
                                                                  compression: int):
    """A13: a mask of 100 MB unpacked, not of its image's size, is refused from its .npy
    header; nothing near its size is ever allocated, whether the archive is deflated or stored
    (np.savez's default: 100 MB on disk, once read whole before its header was looked at)."""
    store, images = scenes
    masks = mask_copy(images, tmp_path / "masks")
    rel = f"{SCENE_CLASSES[5]}/00005.jpg"
    write_mask_bomb(mask_path(masks / rel), (10_000, 10_000), compression)
    labelset = perfect_labels(store, images)
    tracemalloc.start()
    try:
        result = evaluate_labels(store.dataset("scenes"), labelset, masks)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20 * 2**20, f"{peak / 2**20:.0f} MiB allocated"
    assert result["masks_of_other_size"] == 1 and result["all"]["images"] == 39
    assert "10000x10000, not the image's" in dict(result["mask_failures"])[rel]
