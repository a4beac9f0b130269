"""Shared fixtures: a small ImageFolder, a random-weight test_nfnet checkpoint, an empty store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from labeler_service.sample import SAMPLE_CLASSES, make_random_checkpoint, make_sample_images
from storage import Store

NUM_CLASSES = len(SAMPLE_CLASSES)


def assert_compiled_labels_match(compiled, eager) -> None:
    """Two LabelBlocks of the same images, a torch.compile'd fp32 teacher's and the eager one's:
    equal to rounding, and the same top-1 class wherever the eager top-2 are not a near-tie."""
    np.testing.assert_array_equal(compiled.status, eager.status)
    np.testing.assert_allclose(compiled.lse, eager.lse, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(compiled.logits, eager.logits, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(compiled.global_logits, eager.global_logits, rtol=1e-4,
                               atol=1e-4)
    clear = eager.logits[:, 0].astype(np.float32) - eager.logits[:, 1] > 1e-2
    assert clear.mean() > 0.5
    assert (compiled.classes[:, 0][clear] == eager.classes[:, 0][clear]).all()


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
