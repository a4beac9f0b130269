"""The CUDA path (autocast, channels_last, pinned memory): runs only where a GPU is present.

CI has no GPU, so these are skipped there; run them on a GPU machine with
``pytest tests/test_cuda.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from labeler_service.labeling import LabelingOptions, label_dataset
from storage import Store

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cuda_labels_match_cpu(tmp_path: Path, images: Path, checkpoint: Path, precision: str):
    stores = {}
    for device in ("cpu", "cuda"):
        store = Store.open(tmp_path / device)
        store.add_dataset("toy", images)
        options = LabelingOptions(batch_size=8, num_workers=2, device=device, shard_size=4,
                                  chunk_size=2, progress=False, precision=precision)
        report = label_dataset(store, "toy", "test_nfnet", checkpoint, 128, 2, options)
        assert report.images_labeled == 18
        labelset = store.labelset(report.labelset_id)
        assert labelset.teacher.precision == (precision if device == "cuda" else "fp32")
        stores[device] = labelset.read_block(0, 18)
    cpu, cuda = stores["cpu"], stores["cuda"]
    assert cuda.logits.dtype == np.float16 and cuda.lse.dtype == np.float32
    tolerance = 1e-2 if precision == "fp32" else 0.25  # random weights: logits of order 1-10
    np.testing.assert_allclose(cuda.lse, cpu.lse, atol=tolerance, rtol=0.05)
    np.testing.assert_allclose(cuda.global_logits, cpu.global_logits, atol=tolerance, rtol=0.05)
    # top-1 classes agree wherever the CPU's top-2 are not near-ties
    margin = cpu.logits[:, 0].astype(np.float32) - cpu.logits[:, 1]
    clear = margin > 2 * tolerance
    assert (cuda.classes[:, 0][clear] == cpu.classes[:, 0][clear]).mean() > 0.99
