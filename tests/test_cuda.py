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


def test_cuda_compiled_labels_match_eager(checkpoint: Path):
    """``labeler label --compile`` on CUDA: the compiled runner (bf16, a padded last batch)
    against the eager one on the same pixels."""
    from labeler_service.labeling import TeacherRunner
    from labeler_service.teacher import build_teacher

    device = torch.device("cuda")
    pixels = torch.randint(0, 256, (6, 64, 64, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    out = {}
    for name in ("eager", "compiled"):
        teacher, spec, _ = build_teacher("test_nfnet", checkpoint, 64, device, precision="bf16")
        runner = TeacherRunner(teacher, spec.mean, spec.std, 2, device, "bf16")
        if name == "compiled":
            runner.compile(4, 64)
        batches = [runner(pixels[:4]), runner(pixels[4:])]  # 4, then 2 padded to 4
        out[name] = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    eager, compiled = out["eager"], out["compiled"]
    # bf16 kernels fused differently round differently: the bf16 tolerance above
    np.testing.assert_allclose(compiled["lse"], eager["lse"], atol=0.25, rtol=0.05)
    np.testing.assert_allclose(compiled["global_logits"], eager["global_logits"], atol=0.25,
                               rtol=0.05)
    margin = eager["logits"][:, 0].astype(np.float32) - eager["logits"][:, 1]
    clear = margin > 0.5
    assert (compiled["classes"][:, 0][clear] == eager["classes"][:, 0][clear]).mean() > 0.99


def test_cuda_train_step_matches_cpu():
    """Two TrainSteps (bf16 autocast, channels_last, pinned batch) against the CPU's fp32 steps
    from the same weights on the same batch."""
    from trainer.models import create_model
    from trainer.train import ForwardTrain, TrainConfig, TrainStep, build_optimizer

    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 256, (8, 3, 64, 64), generator=g, dtype=torch.uint8),
             "logits": torch.randn(8, 2, 4, 4, generator=g).sort(1, descending=True).values,
             "classes": torch.stack([torch.randperm(10, generator=g)[:2] for _ in range(8)])
             [:, :, None, None].expand(8, 2, 4, 4).contiguous(),
             "lse": torch.full((8, 4, 4), 3.0), "box": torch.tensor([[0.0, 0.0, 4.0, 4.0]] * 8),
             "flip": torch.zeros(8, dtype=torch.bool), "target": torch.arange(8) % 10}
    config = TrainConfig(store="", dataset="", labels="", out="", model="lvvit_t",
                         input_size=64, batch_size=8, mix_token=False,
                         model_kwargs={"depth": 2, "embed_dim": 64, "num_heads": 2})
    metrics = {}
    for name in ("cpu", "cuda"):
        device = torch.device(name)
        torch.manual_seed(0)
        model = create_model("lvvit_t", num_classes=10, img_size=64, mix_token=False,
                             **config.model_kwargs).to(device)
        if name == "cuda":
            model = model.to(memory_format=torch.channels_last)
        step = TrainStep(ForwardTrain(model), model, build_optimizer(model, config), config, 10,
                         device)
        on_host = {k: v.pin_memory() for k, v in batch.items()} if name == "cuda" else batch
        first = step(on_host, lr=1e-3)
        metrics[name] = (first["loss"], first["grad_norm"], step(on_host, lr=1e-3)["loss"])
    # bf16 against fp32: the loss, the gradient's norm, and the loss after one AdamW update
    for cuda, cpu in zip(metrics["cuda"], metrics["cpu"], strict=True):
        assert cuda == pytest.approx(cpu, rel=0.05)
    assert metrics["cpu"][2] != metrics["cpu"][0]  # the update changed the model


def test_cuda_training_runs_end_to_end(tmp_path: Path, images: Path, checkpoint: Path):
    """train() on the GPU (decoding workers, pinned memory, bf16) and eval of its checkpoint."""
    from trainer.evaluate import evaluate
    from trainer.train import TrainConfig, train

    store = Store.open(tmp_path / "store")
    store.add_dataset("toy", images)
    report = label_dataset(store, "toy", "test_nfnet", checkpoint, 64, 2,
                           LabelingOptions(batch_size=8, num_workers=0, device="cuda",
                                           shard_size=8, progress=False))
    last = train(TrainConfig(
        store=str(tmp_path / "store"), dataset="toy", labels=report.labelset_id,
        out=str(tmp_path / "run"), model="lvvit_t", input_size=32, epochs=2, batch_size=4,
        workers=2, val_permille=300, progress=False, ema=0.9,
        model_kwargs={"depth": 2, "embed_dim": 48, "num_heads": 2, "stem_channels": 16}))
    assert np.isfinite(last["loss"]) and np.isfinite(last["grad_norm"])
    scores = evaluate(tmp_path / "run" / "last.pt", str(tmp_path / "store"), "toy",
                      report.labelset_id, batch_size=4, workers=0, val_permille=300)
    assert scores["images"] > 0 and 0 <= scores["top1"] <= 1
