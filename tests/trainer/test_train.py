"""Training end to end on a store written by ``labeler label``: overfitting, an exact mid-epoch
resume, and the ``trainer`` CLI (train, --resume, eval, artifacts, models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from labeler_service.labeling import LabelingOptions, label_dataset
from labeler_service.sample import make_random_checkpoint, make_sample_images
from storage import Store
from trainer import train as train_module
from trainer.cli import main
from trainer.evaluate import load_checkpoint
from trainer.train import TrainConfig, train

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> tuple[Path, str]:
    """48 images in 3 classes, labeled by a random-weight test_nfnet (64 px, 2x2 grid)."""
    root = tmp_path_factory.mktemp("train")
    images = make_sample_images(root / "images", per_class=16)
    checkpoint = make_random_checkpoint(root / "teacher.safetensors", num_classes=3)
    store = Store.open(root / "store")
    store.add_dataset("toy", images)
    report = label_dataset(store, "toy", "test_nfnet", checkpoint, 64, 2,
                           LabelingOptions(batch_size=16, num_workers=0, shard_size=8,
                                           progress=False))
    return root / "store", report.labelset_id


def config(labeled, out: Path, **overrides) -> TrainConfig:
    store, labels = labeled
    values = {"store": str(store), "dataset": "toy", "labels": labels, "out": str(out),
              "model": "vit_tiny", "input_size": 32, "epochs": 1, "batch_size": 8,
              "workers": 0, "warmup_epochs": 0.2, "model_kwargs": dict(TINY),
              "val_permille": 0, "progress": False}
    return TrainConfig(**(values | overrides))


def test_a_tiny_model_overfits_a_tiny_store(labeled, tmp_path):
    # lr is per 1024 images: 1.0 is 7.8e-3 at batch 8 (0.5 left the last-5 mean at 0.21-0.27
    # of the first's, depending on small changes such as the class token's weight decay)
    cfg = config(labeled, tmp_path, epochs=40, lr=1.0, token_label=False, mix_token=False,
                 augment=False,
                 model_kwargs=TINY | {"patch_size": 8})
    train(cfg)
    losses = [json.loads(line)["cls"] for line in (tmp_path / "metrics.jsonl").open()]
    assert sum(losses[-5:]) / 5 < 0.25 * sum(losses[:5]) / 5, losses


def test_eval_normalises_as_the_run_did(labeled, tmp_path):
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    train(config(labeled, tmp_path, max_steps_per_epoch=1, mean=mean, std=std))
    model, normalize = load_checkpoint(tmp_path / "last.pt", torch.device("cpu"))
    x = normalize(torch.full((1, 3, 4, 4), 255, dtype=torch.uint8))
    assert torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25, not ImageNet's
    assert model.training is False


def test_token_label_training_lowers_its_loss(labeled, tmp_path):
    train(config(labeled, tmp_path, epochs=8, lr=0.5))
    losses = [json.loads(line)["token"] for line in (tmp_path / "metrics.jsonl").open()]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_resume_mid_epoch_equals_an_uninterrupted_run(labeled, tmp_path, monkeypatch):
    full = config(labeled, tmp_path / "full", save_every=1, ema=0.9)
    train(full)

    real_loss, calls = train_module.token_labeling_loss, {"n": 0}

    def crash_on_fourth(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # the run dies after step 3's checkpoint
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "token_labeling_loss", crash_on_fourth)
    cut = config(labeled, tmp_path / "cut", save_every=1, ema=0.9)
    with pytest.raises(KeyboardInterrupt):
        train(cut)
    monkeypatch.setattr(train_module, "token_labeling_loss", real_loss)
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert state["epoch_step"] == 3 and state["position"]["epoch"] == 0
    train(cut, resume=True)

    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6  # 48 images in batches of 8
    for name, value in a["model"].items():
        torch.testing.assert_close(b["model"][name], value, rtol=0, atol=0, msg=name)


def test_trainer_cli_train_resume_eval_artifacts(labeled, tmp_path):
    store, labels = labeled
    runner = CliRunner()
    common = ["--store", str(store), "--dataset", "toy", "--labels", labels]
    args = ["train", *common, "--model", "lvvit_t", "--out", str(tmp_path), "--input-size",
            "32", "--batch-size", "8", "--workers", "0", "--registers", "2", "--sta",
            "--anf", "--val-permille", "300", "--model-kwargs",
            json.dumps({"depth": 2, "embed_dim": 48, "num_heads": 2, "stem_channels": 16})]
    result = runner.invoke(main, [*args, "--epochs", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, [*args, "--epochs", "2", "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("epoch*.pt")) == ["epoch0000.pt",
                                                                   "epoch0001.pt"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert steps == list(range(1, len(steps) + 1))  # the resumed run went on, not over

    result = runner.invoke(main, ["eval", *common, "--checkpoint", str(tmp_path / "last.pt"),
                                  "--val-permille", "300"], catch_exceptions=False)
    scores = json.loads(result.output)
    assert scores["images"] > 0 and 0 <= scores["top1"] <= scores["top5"] <= 1
    # without --val-permille, eval scores what the run held out
    result = runner.invoke(main, ["eval", *common, "--checkpoint", str(tmp_path / "last.pt")],
                           catch_exceptions=False)
    assert json.loads(result.output) == scores
    # a held-out split with no image: one line, exit 1
    result = runner.invoke(main, ["eval", *common, "--checkpoint", str(tmp_path / "last.pt"),
                                  "--val-permille", "1"])
    assert result.exit_code == 1 and "held-out split has no image" in result.output
    assert len(result.output.strip().splitlines()) == 1

    result = runner.invoke(main, ["artifacts", str(tmp_path / "last.pt"), "--store", str(store),
                                  "--dataset", "toy", "--images", "8"], catch_exceptions=False)
    metrics = json.loads(result.output)
    assert 0 <= metrics["outlier_token_share"] <= 1
    assert 0 < metrics["cls_attention_entropy"] <= 1 and metrics["images"] == 8

    result = runner.invoke(main, ["models"], catch_exceptions=False)
    assert "lvvit_t\t8.53M" in result.output


def test_torchrun_two_processes_train_with_ddp(labeled, tmp_path):
    """Two ranks on CPU (gloo): each streams its own shards; rank 0 writes the checkpoints."""
    store, labels = labeled
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "trainer", "train", "--store", str(store),
         "--dataset", "toy", "--labels", labels, "--model", "vit_tiny", "--out", str(tmp_path),
         "--input-size", "32", "--epochs", "1", "--batch-size", "4", "--workers", "1",
         "--model-kwargs", json.dumps(TINY)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["step"] == 47 // (4 * 2)  # 47 training images over 2 ranks x batches of 4


def test_fine_tuning_from_the_official_checkpoint(labeled, tmp_path):
    """``--init`` with an official LV-ViT checkpoint of 10 classes at 64 px: training on the
    3-class store at 32 px starts from its blocks, with new heads and a resampled grid."""
    official = Path(__file__).resolve().parent.parent / "fixtures" / "lvvit_official_tiny.pth"
    store, labels = labeled
    kwargs = {"depth": 2, "embed_dim": 48, "num_heads": 2, "skip_lam": 2.0}
    result = CliRunner().invoke(main, [
        "train", "--store", str(store), "--dataset", "toy", "--labels", labels, "--model",
        "lvvit_t", "--model-kwargs", json.dumps(kwargs), "--input-size", "32", "--epochs", "1",
        "--batch-size", "8", "--workers", "0", "--lr", "1e-9", "--max-steps-per-epoch", "1",
        "--val-permille", "0", "--init", str(official), "--out", str(tmp_path), "--no-progress"],
        catch_exceptions=False)
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    start = torch.load(official, weights_only=True)["state_dict"]
    torch.testing.assert_close(state["blocks.1.mlp.fc2.weight"], start["blocks.1.mlp.fc2.weight"])
    assert state["head.weight"].shape == (3, 48) and state["pos_embed"].shape == (1, 5, 48)

    result = CliRunner().invoke(main, [
        "train", "--store", str(store), "--dataset", "toy", "--labels", labels, "--model",
        "lvvit_s", "--input-size", "32", "--batch-size", "8", "--workers", "0", "--init",
        str(official), "--out", str(tmp_path / "x")])
    assert result.exit_code == 1 and "do not fit" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_the_lvvit_recipe_trains_and_explicit_options_win(labeled, tmp_path):
    store, labels = labeled
    result = CliRunner().invoke(main, [
        "train", "--store", str(store), "--dataset", "toy", "--labels", labels, "--model",
        "lvvit_t", "--model-kwargs", json.dumps({"depth": 2, "embed_dim": 48, "num_heads": 2,
                                                 "stem_channels": 16}),
        "--input-size", "32", "--epochs", "1", "--batch-size", "8", "--workers", "0",
        "--max-steps-per-epoch", "3", "--val-permille", "0", "--recipe", "lvvit",
        "--beta", "0.5", "--out", str(tmp_path), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    config = torch.load(tmp_path / "last.pt", weights_only=True)["config"]
    assert config["rand_augment"] and config["random_erase"] == 0.25
    assert config["color_jitter"] == 0.0
    assert config["target_mode"] == "official" and config["ema"] == 0.99992
    assert config["clip_grad"] == 0.0 and config["label_smoothing"] == 0.1
    assert config["model_kwargs"]["drop_path"] == 0.1
    assert config["beta"] == 0.5  # given on the command line: the recipe does not override it
