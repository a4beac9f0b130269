"""Importing labels in the public TokenLabeling layout: per-image [2, K, H, W] fp16 .pt files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from labeler_service.importer import import_tokenlabeling
from storage import ImageStatus, Store


def write_tokenlabeling_files(images: Path, out: Path, rng: np.random.Generator,
                              num_classes: int = 3, topk: int = 2, grid=(4, 3)):
    """Files as the public generator writes them; returns {relative image path: tensor}."""
    written = {}
    for image in sorted(images.rglob("*.jpg")):
        rel = image.relative_to(images)
        logits = np.sort(rng.normal(size=(topk, *grid)), axis=0)[::-1]
        classes = np.stack([rng.permutation(num_classes)[:topk] for _ in range(grid[0] * grid[1])],
                           axis=1).reshape(topk, *grid)
        tensor = torch.from_numpy(np.stack([logits, classes]).astype(np.float16))
        target = out / rel.with_suffix(".pt")
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.save(tensor, target)
        written[str(rel)] = tensor
    return written


def test_import_round_trip_with_missing_and_broken_files(store: Store, images: Path,
                                                         tmp_path: Path):
    dataset, _ = store.add_dataset("toy", images)
    labels = tmp_path / "labels"
    written = write_tokenlabeling_files(images, labels, np.random.default_rng(0))
    (labels / "circles" / "0001.pt").unlink()
    torch.save(torch.zeros(2, 2, 5, 5, dtype=torch.float16), labels / "squares" / "0002.pt")
    (labels / "stripes" / "0003.pt").write_bytes(b"not a tensor")
    bad_class = written["stripes/0004.jpg"].clone()
    bad_class[1, 0, 0, 0] = 7  # a class id outside [0, 3)
    torch.save(bad_class, labels / "stripes" / "0004.pt")

    report = import_tokenlabeling(store, "toy", labels, num_classes=3, shard_size=4,
                                  chunk_size=2, progress=False)
    assert report.images_imported == 14
    assert report.images_failed == {ImageStatus.LABEL_FILE_MISSING: 1,
                                    ImageStatus.LABEL_FILE_INVALID: 3}

    labelset = store.labelset(report.labelset_id)
    assert labelset.is_complete() and labelset.grid == (4, 3) and labelset.topk == 2
    assert labelset.teacher.resize == "center_crop" and labelset.teacher.input_size == 576
    assert labelset.attrs["source"] == "tokenlabeling-import"
    block = labelset.read_block(0, labelset.num_images)
    for i, path in enumerate(dataset.manifest().path):
        if path in ("circles/0001.jpg", "squares/0002.jpg", "stripes/0003.jpg",
                    "stripes/0004.jpg"):
            assert block.status[i] > 0 and np.isnan(block.logits[i]).all()
            continue
        assert block.status[i] == ImageStatus.LABELED
        np.testing.assert_array_equal(block.logits[i], written[path][0].numpy())
        np.testing.assert_array_equal(block.classes[i], written[path][1].numpy().astype(int))
    assert np.isnan(block.lse).all()  # unknown in this layout, documented
    assert np.isnan(block.global_logits).all() and (block.global_classes == -1).all()

    again = import_tokenlabeling(store, "toy", labels, num_classes=3, shard_size=4,
                                 chunk_size=2, progress=False)
    assert again.labelset_id == report.labelset_id
    assert (again.shards_written, again.shards_skipped) == (0, 5)


def test_import_refuses_what_fp16_cannot_hold_and_class_mismatch(
        store: Store, images: Path, tmp_path: Path):
    store.add_dataset("toy", images)
    labels = tmp_path / "labels"
    write_tokenlabeling_files(images, labels, np.random.default_rng(1))
    with pytest.raises(ValueError, match="above 2048"):
        import_tokenlabeling(store, "toy", labels, num_classes=5000, progress=False)
    with pytest.raises(ValueError, match=r"has 3 classes .* teacher has 1000 outputs"):
        import_tokenlabeling(store, "toy", labels, num_classes=1000, progress=False)
    with pytest.raises(FileNotFoundError, match="no label file"):
        import_tokenlabeling(store, "toy", tmp_path / "empty", num_classes=3, progress=False)


def test_import_refuses_non_finite_values(store: Store, images: Path, tmp_path: Path):
    store.add_dataset("toy", images)
    labels = tmp_path / "labels"
    written = write_tokenlabeling_files(images, labels, np.random.default_rng(2))
    nan_class = written["circles/0000.jpg"].clone()
    nan_class[1, 1, 2, 0] = float("nan")  # NaN passes every range comparison
    torch.save(nan_class, labels / "circles" / "0000.pt")
    inf_logit = written["circles/0001.jpg"].clone()
    inf_logit[0, 0, 0, 0] = float("inf")
    torch.save(inf_logit, labels / "circles" / "0001.pt")
    report = import_tokenlabeling(store, "toy", labels, num_classes=3, shard_size=100,
                                  progress=False)
    assert report.images_failed == {ImageStatus.LABEL_FILE_INVALID: 2}
    labelset = store.labelset(report.labelset_id)
    assert labelset.attrs["chunk_size"] == 4  # a chunk size that divides the shard size
    assert (labelset.status()[:2] == ImageStatus.LABEL_FILE_INVALID).all()


def test_official_file_rule_a_dataset_one_level_above_the_classes(store: Store, images: Path,
                                                                   tmp_path: Path):
    """Registered as ``train/<class>/<name>``, with dotted names: the official loader's rule
    (``<class>/<name up to its first dot>.pt``) finds the files; the counts are reported."""
    import shutil

    tree = tmp_path / "tree"
    for image in sorted(images.rglob("*.jpg")):
        target = tree / "train" / image.parent.name / image.name.replace(".jpg", ".v2.jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target)
    store.add_dataset("nested", tree)
    labels = tmp_path / "labels"
    written = write_tokenlabeling_files(images, labels, np.random.default_rng(1))
    torch.save(written["circles/0001.jpg"], labels / "circles" / "orphan.pt")
    (labels / "squares" / "0002.pt").unlink()

    # one class folder ("train") as far as the dataset knows: the class check would refuse
    report = import_tokenlabeling(store, "nested", labels, num_classes=3, shard_size=4,
                                  ignore_dataset_classes=True, progress=False)
    assert (report.matched_full_path, report.matched_official) == (0, 17)
    assert (report.images_without_file, report.files_unmatched) == (1, 1)
    assert report.images_imported == 17
    assert report.images_failed == {ImageStatus.LABEL_FILE_MISSING: 1}
    labelset = store.labelset(report.labelset_id)
    paths = list(store.dataset("nested").manifest().path)
    row = paths.index("train/stripes/0004.v2.jpg")
    np.testing.assert_array_equal(labelset.read_image(row).logits[0],
                                  written["stripes/0004.jpg"][0].numpy())


def test_a_file_two_images_would_share_is_refused(store: Store, images: Path, tmp_path: Path):
    import shutil

    tree = tmp_path / "tree"
    for split in ("a", "b"):  # a/circles/0000.jpg and b/circles/0000.jpg -> circles/0000.pt
        for image in sorted(images.rglob("*.jpg")):
            target = tree / split / image.parent.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, target)
    store.add_dataset("twice", tree)
    labels = tmp_path / "labels"
    write_tokenlabeling_files(images, labels, np.random.default_rng(2))
    with pytest.raises(ValueError, match="ambiguous label files"):
        import_tokenlabeling(store, "twice", labels, num_classes=3, ignore_dataset_classes=True,
                             progress=False)


def test_bad_first_label_files_get_their_status_like_later_ones(store: Store, images: Path,
                                                                 tmp_path: Path):
    """A57: the layout comes from the first readable file; bad files before it are counted as
    the import goes, as a bad later file is, instead of aborting the import."""
    store.add_dataset("toy", images)
    labels = tmp_path / "labels"
    write_tokenlabeling_files(images, labels, np.random.default_rng(3))
    (labels / "circles" / "0000.pt").write_bytes(b"not a tensor")  # the first file matched
    torch.save({"not": "a tensor"}, labels / "circles" / "0001.pt")
    torch.save(torch.zeros(3, 2, 4, 3), labels / "circles" / "0002.pt")  # not [2, K, H, W]
    (labels / "circles" / "0003.pt").unlink()
    os.mkfifo(labels / "circles" / "0003.pt")  # refused, not waited on
    report = import_tokenlabeling(store, "toy", labels, num_classes=3, shard_size=4,
                                  progress=False)
    assert report.images_imported == 14
    assert report.images_failed == {ImageStatus.LABEL_FILE_INVALID: 4}
    labelset = store.labelset(report.labelset_id)
    assert (labelset.topk, labelset.grid) == (2, (4, 3))


def test_no_readable_label_file_is_one_reason(store: Store, images: Path, tmp_path: Path):
    store.add_dataset("toy", images)
    labels = tmp_path / "labels"
    write_tokenlabeling_files(images, labels, np.random.default_rng(4))
    for f in labels.rglob("*.pt"):
        f.write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"none of the first 100 label files matched is a "
                                         r"TokenLabeling label file \(e\.g\. .*circles/0000\.pt"):
        import_tokenlabeling(store, "toy", labels, num_classes=3, progress=False)
