"""``labeler teacher fit``: a teacher in the dataset's label space, that ``labeler label`` takes as
it is, with the agreement recorded; head-only fits that leave the backbone alone; refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from labeler_service.cli import main
from labeler_service.labeling import LabelingOptions, LabelSpaceMismatch, label_dataset
from labeler_service.sample import make_random_checkpoint, make_sample_images
from labeler_service.teacher import build_teacher, fitted_metadata
from labeler_service.teacher_fit import FitError, FitOptions, fit_teacher
from storage import Store
from storage.splits import held_out

OPTIONS = FitOptions(input_size=64, epochs=2, batch_size=8, val_permille=300, workers=0,
                     progress=False)
LABELING = LabelingOptions(batch_size=8, num_workers=0, shard_size=8, progress=False)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, Path]:
    """A store with dataset 'toy' (3 classes x 10 images) and a teacher fitted on it."""
    root = tmp_path_factory.mktemp("fit")
    store = Store.open(root / "store")
    store.add_dataset("toy", make_sample_images(root / "images", per_class=10))
    out = root / "teacher.safetensors"
    fit_teacher(store, "toy", "test_nfnet", out, OPTIONS)
    return store, out


def test_fit_writes_a_teacher_with_its_classes_split_and_accuracy(fitted):
    store, out = fitted
    meta = fitted_metadata(out)
    dataset = store.dataset("toy")
    assert meta["model"] == "test_nfnet" and meta["class_names"] == list(dataset.class_names)
    assert meta["num_classes"] == 3 and meta["dataset_fingerprint"] == dataset.fingerprint
    held = held_out(dataset.manifest().path, 300)
    assert meta["heldout_images"] == int(held.sum()) and meta["train_images"] == int((~held).sum())
    assert 0.0 <= meta["heldout_top1"] <= meta["heldout_top5"] <= 1.0
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["heldout_top1"] == meta["heldout_top1"] and len(report["history"]) == 2
    assert set(report["heldout_per_class_top1"]) == set(dataset.class_names)


def test_a_fitted_teacher_labels_in_the_dataset_label_space(fitted):
    store, out = fitted
    _, spec, _ = build_teacher("test_nfnet", out, 64)
    assert spec.class_names == store.dataset("toy").class_names  # from the checkpoint
    report = label_dataset(store, "toy", "test_nfnet", out, 64, 2, LABELING)
    labelset = store.labelset(report.labelset_id)
    # No --ignore-dataset-classes needed, and the agreement is measured and recorded.
    agreement = labelset.attrs["agreement"]
    assert agreement == report.agreement and agreement["images"] == 30 and agreement["k"] == 2
    top = labelset.array("global_classes")[:]
    truth = store.dataset("toy").manifest().label
    assert agreement["top1"] == pytest.approx(float((top[:, 0] == truth).mean()))
    assert agreement["top5"] == pytest.approx(float((top == truth[:, None]).any(1).mean()))
    assert labelset.attrs["teacher_fit"]["val_permille"] == 300


def test_cli_fit_then_label_shows_the_agreement(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    make_sample_images(tmp_path / "images", per_class=6)
    runner = CliRunner()

    def run(*args: str, code: int = 0) -> str:
        result = runner.invoke(main, list(args), catch_exceptions=False)
        assert result.exit_code == code, result.output
        return result.output

    run("datasets", "add", "toy", "images")
    out = run("teacher", "fit", "toy", "--model", "test_nfnet", "--input-size", "64", "--out",
              "t.safetensors", "--epochs", "1", "--workers", "0", "--val-permille", "300",
              "--no-progress")
    assert "test_nfnet (from scratch) on toy: 3 classes" in out and "held-out top-1" in out
    assert Path("t.json").is_file()
    out = run("label", "toy", "--model", "test_nfnet", "--checkpoint", "t.safetensors",
              "--input-size", "64", "--topk", "2", "--workers", "0", "--no-progress")
    assert "teacher agreement: top-1 " in out and "of 18 images contain the folder class" in out
    assert "agreement top-1 " in run("datasets", "list")
    # The checkpoint says which model it is.
    out = run("label", "toy", "--model", "dm_nfnet_f0", "--checkpoint", "t.safetensors",
              "--input-size", "64", "--no-progress", code=1)
    assert out.strip().splitlines() == [
        "Error: checkpoint t.safetensors was fitted for model 'test_nfnet', not 'dm_nfnet_f0': "
        "label with model 'test_nfnet'"]


def test_head_only_leaves_the_backbone_bit_identical(fitted, tmp_path: Path):
    store, _ = fitted
    backbone = make_random_checkpoint(tmp_path / "imagenet.safetensors", num_classes=1000)
    out = tmp_path / "head.safetensors"
    report = fit_teacher(store, "toy", "test_nfnet", out,
                         FitOptions(input_size=64, epochs=30, val_permille=300, workers=0,
                                    progress=False),
                         checkpoint=backbone, head_only=True)
    before, after = load_file(str(backbone)), load_file(str(out))
    assert set(before) == set(after)
    for key in before:
        if key.startswith("head.fc."):
            assert after[key].shape[0] == 3  # a new 3-class head
        else:
            assert torch.equal(before[key], after[key]), key
    assert after["head.fc.weight"].abs().sum() > 0 and report.feature_seconds is not None
    meta = fitted_metadata(out)
    assert meta["head_only"] is True and meta["backbone_sha256"] == report.backbone_sha256
    assert len(report.history) == 30 and report.history[-1]["loss"] < report.history[0]["loss"]


def test_fine_tuning_changes_the_backbone(fitted, tmp_path: Path):
    store, _ = fitted
    backbone = make_random_checkpoint(tmp_path / "imagenet.safetensors", num_classes=1000)
    out = tmp_path / "tuned.safetensors"
    fit_teacher(store, "toy", "test_nfnet", out, FitOptions(
        input_size=64, epochs=1, val_permille=300, workers=0, progress=False),
        checkpoint=backbone)
    before, after = load_file(str(backbone)), load_file(str(out))
    assert not torch.equal(before["stem.conv1.weight"], after["stem.conv1.weight"])


def test_refusals_are_one_line_reasons(tmp_path: Path):
    store = Store.open(tmp_path / "store")
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 48), (90, 30, 200)).save(flat / name)
    store.add_dataset("flat", flat)
    one = make_sample_images(tmp_path / "one", per_class=4, classes=("circles",))
    store.add_dataset("one", one)
    sparse = make_sample_images(tmp_path / "sparse", per_class=4)
    for f in (sparse / "squares").iterdir():
        f.write_bytes(b"")  # unreadable: the class has no usable image
    store.add_dataset("sparse", sparse)
    store.add_dataset("good", make_sample_images(tmp_path / "good", per_class=6))
    out = tmp_path / "t.safetensors"
    cases = [
        ("flat", "test_nfnet", out, {}, r"has no classes: its images are not in class folders"),
        ("one", "test_nfnet", out, {}, r"has one class \('circles'\): a classifier needs at "
                                       r"least two"),
        ("sparse", "test_nfnet", out, {}, r"class 'squares' of dataset 'sparse' has no readable "
                                          "images"),
        ("one", "test_nfnet", out, {"head_only": True}, r"--head-only needs --checkpoint"),
        ("one", "test_nfnet", tmp_path / "t.pth", {}, r"is written as \.safetensors"),
        ("good", "vit_tiny_patch16_224", out, {}, r"cannot run at input size 64"),
        ("good", "deit_tiny_patch16_224", out, {"input_size": 224},
         r"features are 3-D, not a \[B, C, H, W\] map"),
        ("good", "no_such_model", out, {}, r"unknown timm model"),
    ]
    for dataset, model, path, kwargs, message in cases:
        options = replace(OPTIONS, input_size=kwargs.pop("input_size", OPTIONS.input_size))
        with pytest.raises(ValueError, match=message) as error:
            fit_teacher(store, dataset, model, path, options, **kwargs)
        assert "\n" not in str(error.value)
    assert not out.exists()


def test_a_class_held_out_entirely_is_refused(tmp_path: Path):
    store = Store.open(tmp_path / "store")
    images = make_sample_images(tmp_path / "images", per_class=2)
    store.add_dataset("toy", images)
    held = held_out(store.dataset("toy").manifest().path, 999)
    assert held.all()  # 99.9 % held out: no class keeps a training image
    with pytest.raises(FitError, match=r"class 'circles' .* has no training images \(2 "
                                       r"readable, all held out\)"):
        fit_teacher(store, "toy", "test_nfnet", tmp_path / "t.safetensors",
                    FitOptions(input_size=64, val_permille=999, workers=0, progress=False))


def test_teacher_with_other_class_names_is_refused(fitted, tmp_path: Path):
    store, out = fitted
    images = make_sample_images(tmp_path / "images", per_class=2,
                                classes=("circles", "stripes", "triangles"))
    store.add_dataset("other", images)
    with pytest.raises(LabelSpaceMismatch, match=r"class 1 is 'stripes' in the dataset, "
                                                 r"'squares' for the teacher"):
        label_dataset(store, "other", "test_nfnet", out, 64, 2, LABELING)
    report = label_dataset(store, "other", "test_nfnet", out, 64, 2, LABELING,
                           ignore_dataset_classes=True)
    agreement = store.labelset(report.labelset_id).attrs["agreement"]
    assert agreement["top1"] is None and "not the dataset's label space" in agreement["reason"]


def test_unreadable_images_are_left_out_and_counted(tmp_path: Path):
    store = Store.open(tmp_path / "store")
    images = make_sample_images(tmp_path / "images", per_class=5)
    (images / "circles" / "0001.jpg").write_bytes(b"not a jpeg")  # no header: left out
    store.add_dataset("toy", images)
    truncated = images / "squares" / "0002.jpg"  # a header, then its data cut short
    store.dataset("toy")
    data = truncated.read_bytes()
    store.add_dataset("cut", images)
    truncated.write_bytes(data[:len(data) // 3])  # changed since registration: refused too
    report = fit_teacher(store, "cut", "test_nfnet", tmp_path / "t.safetensors",
                         FitOptions(input_size=64, epochs=2, val_permille=0, workers=0,
                                    progress=False))
    assert report.train_images == 13 and report.images_failed == 1
    assert report.failures[0][0] == "squares/0002.jpg" and report.heldout_top1 is None
