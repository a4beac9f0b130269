"""Checkpoints from the official LV-ViT code, this project and plain state dicts: loaded strictly,
reproducing the official outputs; wrappers, prefixes, resampled position embeddings, new heads,
conversion, and clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from trainer.checkpoints import (
    CheckpointError,
    build_model,
    load_weights,
    read_checkpoint,
    save_project_checkpoint,
)
from trainer.cli import main
from trainer.models import create_model
from trainer.train import param_groups

OFFICIAL = Path(__file__).resolve().parent.parent / "fixtures" / "lvvit_official_tiny.pth"


@pytest.fixture(scope="module")
def official() -> dict:
    return torch.load(OFFICIAL, weights_only=True)


def outputs(model: torch.nn.Module, x: torch.Tensor):
    with torch.no_grad():
        cls_logits, aux_logits = model.forward_head(model.forward_features(x))
        return cls_logits, aux_logits, model(x)


def assert_reproduces(model: torch.nn.Module, official: dict) -> None:
    cls_logits, aux_logits, score = outputs(model.eval(), official["input"])
    torch.testing.assert_close(cls_logits, official["cls_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(aux_logits, official["aux_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(score, official["score"], atol=1e-5, rtol=0)


def test_the_official_checkpoint_loads_strictly_and_reproduces_its_outputs(official):
    checkpoint = read_checkpoint(OFFICIAL)
    assert checkpoint.source == "official"
    assert checkpoint.overrides["stem_channels"] == 64 and checkpoint.overrides["img_size"] == 64
    assert_reproduces(build_model(checkpoint), official)


def test_the_published_layernorm_eps():
    # The official code's LayerNorm eps is 1e-5; timm's ViT (and DeiT) 1e-6.
    for name in ("lvvit_t", "lvvit_s", "lvvit_m", "lvvit_l", "lvvit_nano"):
        with torch.device("meta"):
            model = create_model(name)
        eps = {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)}
        assert eps == {1e-5}, name
    with torch.device("meta"):
        assert create_model("vit_tiny").norm.eps == 1e-6


@pytest.mark.parametrize("wrap", ["state_dict", "state_dict_ema", "bare", "module"])
def test_wrapped_official_weights_load(official, tmp_path, wrap):
    weights = {f"module.{k}": v for k, v in official["state_dict"].items()}
    if wrap == "bare":
        obj = dict(official["state_dict"])
    elif wrap == "module":
        obj = weights
    elif wrap == "state_dict_ema":  # timm's train script: both, the EMA preferred
        noise = {k: v + 1 for k, v in weights.items()}
        obj = {"state_dict": noise, "state_dict_ema": weights, "epoch": 3, "arch": "lvvit_t"}
    else:
        obj = {"state_dict": weights, "epoch": 3, "optimizer": {}}
    path = tmp_path / "lvvit.pth.tar"
    torch.save(obj, path)
    # Without the official config the shapes tell everything but the heads and the residual
    # scale, which a registered variant of that depth and width would give: none here.
    with pytest.raises(CheckpointError, match="match no registered variant"):
        read_checkpoint(path)
    checkpoint = read_checkpoint(path, model="lvvit_t")
    model = create_model("lvvit_t", **checkpoint.overrides, num_heads=2, skip_lam=2.0)
    load_weights(model, checkpoint.weights)
    assert_reproduces(model, official)


def test_a_checkpoint_of_a_registered_variant_needs_no_config(tmp_path):
    model = create_model("lvvit_nano", num_classes=7).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "nano.pth.tar")
    checkpoint = read_checkpoint(tmp_path / "nano.pth.tar")
    assert checkpoint.model == "lvvit_nano" and checkpoint.overrides["num_classes"] == 7
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(outputs(build_model(checkpoint).eval(), x), outputs(model, x))


def test_convert_writes_a_project_checkpoint_that_eval_reads(official, tmp_path):
    out = tmp_path / "converted.pt"
    result = CliRunner().invoke(main, ["convert", str(OFFICIAL), str(out)])
    assert result.exit_code == 0, result.output
    assert "official checkpoint" in result.output and "10 classes" in result.output
    converted = read_checkpoint(out)
    assert converted.source == "project"
    assert_reproduces(build_model(converted), official)
    save_project_checkpoint(converted, tmp_path / "again.pt")  # ours in, ours out
    assert_reproduces(build_model(read_checkpoint(tmp_path / "again.pt")), official)


def test_a_new_input_size_resamples_the_position_embedding(official):
    model = build_model(read_checkpoint(OFFICIAL), img_size=96)
    assert model.grid == (6, 6) and model.pos_embed.shape == (1, 37, 48)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 10)


def test_fine_tuning_gets_new_heads_when_the_class_count_differs(official):
    checkpoint = read_checkpoint(OFFICIAL)
    model = create_model(checkpoint.model, **(checkpoint.overrides | {"num_classes": 3}))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_weights(model, checkpoint.weights)
    skipped = load_weights(model, checkpoint.weights, new_heads=True)
    assert sorted(skipped) == ["aux_head.bias", "aux_head.weight", "head.bias", "head.weight"]
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight,
                               official["state_dict"]["blocks.1.mlp.fc2.weight"])


@pytest.mark.parametrize("content", [b"", b"not a checkpoint", "list", "tensor-free"])
def test_what_is_not_a_checkpoint_is_refused_in_one_line(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content == "list":
        torch.save([1, 2], path)
    elif content == "tensor-free":
        torch.save({"state_dict": {"blocks.0.attn.qkv.weight": "text"}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    result = CliRunner().invoke(main, ["convert", str(path), str(tmp_path / "out.pt")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_weight_decay_spares_tokens_biases_and_norms():
    model = create_model("lvvit_nano", num_classes=10, registers=2)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    spared = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "reg_token", "pos_embed", "norm.weight", "head.bias",
            "blocks.0.norm1.weight", "blocks.0.attn.proj.bias"} <= spared
    assert all(names[id(p)].endswith("weight") for p in decay["params"])
    assert "blocks.0.attn.qkv.weight" in {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
