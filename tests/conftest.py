"""Shared fixtures: a small ImageFolder, a random-weight test_nfnet checkpoint, an empty store,
and filesystems of a test's own (a tiny tmpfs to fill, a read-only folder)."""

from __future__ import annotations

import os
import subprocess
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from labeler_service.sample import SAMPLE_CLASSES, make_random_checkpoint, make_sample_images
from storage import ImageStatus, Store

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


def write_random_labels(labelset, seed: int = 0, failed: frozenset[int] = frozenset()) -> None:
    """Every shard of ``labelset`` written with random labels, every field a teacher writes (so
    none reads as damaged); the images in ``failed`` with status 1 (unreadable) instead."""
    rng = np.random.default_rng(seed)
    for shard in range(labelset.num_shards):
        block = labelset.empty_block(shard)
        block.logits[:] = np.sort(rng.normal(size=block.logits.shape), axis=1)[:, ::-1]
        block.classes[:] = rng.integers(0, labelset.teacher.num_classes,
                                        size=block.classes.shape)
        block.lse[:] = 2.0
        block.global_logits[:] = block.logits[:, :, 0, 0]
        block.global_classes[:] = block.classes[:, :, 0, 0]
        block.status[:] = [ImageStatus.UNREADABLE if i in failed else ImageStatus.LABELED
                           for i in range(block.start, block.stop)]
        labelset.write_shard(shard, block)


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


@pytest.fixture
def tmpfs() -> Iterator[Callable[..., Path]]:
    """``tmpfs(path, size="8m", read_only=False)`` mounts a tmpfs of its own at ``path`` for the
    test (a disk that really fills, a folder that really refuses writes, even to root) and
    unmounts it afterwards. Where this user may not mount, the test is skipped, with a warning
    in the summary: it did not run."""
    mounted: list[Path] = []

    def mount(path: Path, size: str = "8m", read_only: bool = False) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size},mode=0777" + (",ro" if read_only else "")
        try:
            result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                    capture_output=True, text=True, check=False)
            error = result.stderr.strip() or f"mount exit status {result.returncode}"
        except OSError as e:  # no mount command at all
            result, error = None, str(e)
        if result is None or result.returncode:
            reason = (f"NOT RUN: this test needs a tmpfs of its own and cannot mount one here "
                      f"({error})")
            warnings.warn(reason, pytest.PytestWarning, stacklevel=2)
            pytest.skip(reason)
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", str(path)], check=False)


@pytest.fixture
def read_only_folder(tmp_path: Path, tmpfs: Callable[..., Path]) -> Path:
    """An empty folder no file can be created in: without write permission for an ordinary
    user, a read-only tmpfs for root (whom permissions do not stop)."""
    folder = tmp_path / "read-only"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    return tmpfs(folder, size="1m", read_only=True)
