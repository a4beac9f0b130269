"""Shared fixtures: a small ImageFolder, a random-weight test_nfnet checkpoint, an empty store."""

from __future__ import annotations

from pathlib import Path

import pytest

from labeler_service.sample import SAMPLE_CLASSES, make_random_checkpoint, make_sample_images
from storage import Store

NUM_CLASSES = len(SAMPLE_CLASSES)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_nfnet with random weights and one output per sample class, as safetensors."""
    return make_random_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "test_nfnet.safetensors", num_classes=NUM_CLASSES)


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """3 classes x 6 JPEGs of varied sizes (18 images)."""
    return make_sample_images(tmp_path / "images", per_class=6)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.open(tmp_path / "store")
