"""Label quality: cell ground truth through the recorded geometry, the dense scores against
hand-computed values, and positive controls (a perfect teacher scores 1, a transposed or
permuted one does not)."""

from __future__ import annotations

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
from labeler_service.scenes import SCENE_CLASSES, load_mask, make_scenes
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
