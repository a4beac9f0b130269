"""The training stream: every labeled image once per epoch across ranks and workers, a resume
mid-epoch in the same order, failed and held-out images skipped, stale labels refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from labeler_service.sample import make_sample_images
from storage import LabelSetConfig, Store, TeacherSpec
from storage.splits import held_out
from tests.conftest import write_random_labels
from trainer.data.stream import (
    FingerprintMismatch,
    StreamConfig,
    StreamPosition,
    TokenLabelStream,
)

FAILED = {3, 10}


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> tuple[Path, str]:
    """40 images in shards of 4, random labels, two of them failed."""
    root = tmp_path_factory.mktemp("stream")
    images = make_sample_images(root / "images", per_class=14)
    for extra in sorted(images.rglob("*.jpg"))[40:]:
        extra.unlink()
    store = Store.open(root / "store")
    dataset, _ = store.add_dataset("toy", images)
    teacher = TeacherSpec(model="test_nfnet", checkpoint_sha256=None, num_classes=3,
                          input_size=64)
    labelset = dataset.create_labelset(LabelSetConfig(
        teacher=teacher, topk=2, grid=(2, 2), dataset_fingerprint=dataset.fingerprint,
        shard_size=4, chunk_size=2))
    write_random_labels(labelset, failed=frozenset(FAILED))
    return root / "store", labelset.id


def config(labeled, **overrides) -> StreamConfig:
    store, labelset = labeled
    return StreamConfig(store=str(store), dataset="toy", labelset=labelset, image_size=32,
                        val_permille=200, shuffle_buffer=6, **overrides)


def run(stream: TokenLabelStream, workers: int = 2) -> list[dict]:
    loader = DataLoader(stream, batch_size=None, num_workers=workers)
    return [{k: item[k] for k in ("index", "stream", "seq")} for item in loader]


def test_every_labeled_image_once_per_epoch_across_ranks_and_workers(labeled):
    streams = [TokenLabelStream(config(labeled), rank=r, world_size=2) for r in range(2)]
    items = [item for s in streams for item in run(s)]
    indices = sorted(i["index"] for i in items)
    assert len(indices) == len(set(indices))  # no image twice
    expected = np.flatnonzero(streams[0].usable).tolist()
    assert indices == expected  # and none missing
    assert not FAILED & set(indices)
    assert sorted({i["stream"] for i in items}) == [0, 1, 2, 3]  # 2 ranks x 2 workers

    val = TokenLabelStream(config(labeled, split="val"))
    val_indices = {i["index"] for i in run(val)}
    assert val_indices and not val_indices & set(indices)
    assert streams[0].skipped + val.skipped == len(FAILED)  # failed images: skipped, counted
    assert len(indices) + len(val_indices) + len(FAILED) == 40


def test_epochs_differ_and_repeat(labeled):
    stream = TokenLabelStream(config(labeled))
    first = [i["index"] for i in run(stream, workers=0)]
    again = [i["index"] for i in run(TokenLabelStream(config(labeled)), workers=0)]
    stream.set_epoch(1)
    second = [i["index"] for i in run(stream, workers=0)]
    assert first == again and sorted(first) == sorted(second) and first != second


def test_resume_mid_epoch_in_the_same_order(labeled):
    full = run(TokenLabelStream(config(labeled)))
    consumed = full[:11]
    position = StreamPosition(epoch=0)
    for item in consumed:
        position.consumed[item["stream"]] = item["seq"] + 1
    resumed = run(TokenLabelStream(config(labeled),
                                   position=StreamPosition.from_dict(position.to_dict())))
    for stream in (0, 1):
        assert [i["index"] for i in resumed if i["stream"] == stream] == \
               [i["index"] for i in full[11:] if i["stream"] == stream]


def test_samples_carry_image_labels_and_box(labeled):
    stream = TokenLabelStream(config(labeled))
    item = next(iter(stream))
    assert item["image"].shape == (3, 32, 32) and item["logits"].shape == (2, 2, 2)
    x1, y1, x2, y2 = item["box"].tolist()
    assert 0 <= x1 < x2 <= 2 and 0 <= y1 < y2 <= 2  # inside the 2x2 label grid
    whole = TokenLabelStream(config(labeled, augment=False))
    assert whole.to_grid(0, whole.sample_box(0, torch.Generator())[0]) == (0, 0, 2, 2)


def test_held_out_split_is_stable():
    paths = np.array([f"n{i:04d}/img{i}.JPEG" for i in range(2000)])
    split = held_out(paths, 20)
    assert 20 <= split.sum() <= 60 and (held_out(paths, 20) == split).all()


def test_stale_labels_are_refused(labeled, tmp_path):
    store_path, labelset_id = labeled
    store = Store.open(store_path)
    labelset = store.labelset(labelset_id)
    original = labelset.group.attrs["dataset_fingerprint"]
    labelset.group.attrs["dataset_fingerprint"] = "0" * 64
    try:
        with pytest.raises(FingerprintMismatch, match="belong to other images"):
            TokenLabelStream(config(labeled))
    finally:
        labelset.group.attrs["dataset_fingerprint"] = original


def test_colour_jitter_moves_no_pixels(labeled):
    plain = TokenLabelStream(config(labeled, color_jitter=0.0))
    jittered = TokenLabelStream(config(labeled, color_jitter=0.4))
    a, b = next(iter(plain)), next(iter(jittered))
    assert a["index"] == b["index"] and torch.equal(a["box"], b["box"]) and a["flip"] == b["flip"]
    assert not torch.equal(a["image"], b["image"])  # other colours
    # ...at the same places: where the plain crop has an edge, the jittered one has it too
    edges = (a["image"].float().diff(dim=-1).abs().sum(0) > 30)
    moved = (b["image"].float().diff(dim=-1).abs().sum(0) > 5)
    assert (moved[edges]).float().mean() > 0.9


def test_centre_cropped_labels_map_boxes_through_their_square(labeled):
    """Labels recorded as ``center_crop`` (imported TokenLabeling files) cover the central
    square: the whole of a non-square image reaches beyond the grid on its long side."""
    store_path, _ = labeled
    dataset = Store.open(store_path).dataset("toy")
    teacher = TeacherSpec(model="imported", checkpoint_sha256=None, num_classes=3,
                          input_size=64, resize="center_crop")
    labelset = dataset.create_labelset(LabelSetConfig(
        teacher=teacher, topk=2, grid=(2, 2), dataset_fingerprint=dataset.fingerprint,
        shard_size=4, chunk_size=2))
    stream = TokenLabelStream(StreamConfig(store=str(store_path), dataset="toy",
                                           labelset=labelset.id, image_size=32, augment=False))
    width, height = stream.image_size(0)
    assert width != height  # the sample images are not square
    side = min(width, height)
    x1, y1, x2, y2 = stream.to_grid(0, (0, 0, width, height))
    reach_x, reach_y = (width - side) / side, (height - side) / side  # grid cells, both sides
    assert (x1, y1, x2, y2) == pytest.approx((-reach_x, -reach_y, 2 + reach_x, 2 + reach_y))


def test_rand_augment_draws_replay_with_the_seed(labeled):
    from trainer.augment import IDENTITY_THETA, RandAugmentConfig

    augmented = config(labeled, rand_augment=RandAugmentConfig(prob=1.0), random_erase=0.5)
    first = [(s["index"], s["theta"], s["image"]) for s in TokenLabelStream(augmented)]
    again = [(s["index"], s["theta"], s["image"]) for s in TokenLabelStream(augmented)]
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
               for a, b in zip(first, again, strict=True))
    assert sum(not torch.equal(t, IDENTITY_THETA) for _, t, _ in first) > len(first) // 3
