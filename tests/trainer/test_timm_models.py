"""Token labeling for timm models: ViT (with registers) and VOLO get token outputs and MixToken,
train end to end from the store, resume and evaluate; other models are refused clearly."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from trainer.cli import main
from trainer.models import create_model
from trainer.models.mixtoken import box_mask
from trainer.train import param_groups

from .test_train import labeled  # noqa: F401  (the module fixture: a tiny labeled store)

pytestmark = pytest.mark.slow
VIT = "timm:vit_tiny_patch16_224"


def test_a_timm_vit_gets_token_outputs_and_mixtoken():
    torch.manual_seed(0)
    model = create_model(VIT, num_classes=5, img_size=32, registers=2, depth=2)
    assert model.grid == (2, 2) and model.num_prefix_tokens == 3
    x = torch.randn(2, 3, 32, 32)
    model.train()
    box = (0, 0, 1, 2)
    cls_logits, tokens, got = model.forward_train(x, mix_box=box)
    assert got == box and cls_logits.shape == (2, 5) and tokens.shape == (2, 4, 5)
    # A box over the whole grid gives each image all of its partner's patches: un-mixed, the
    # token outputs are each image's own again (mixing is on the patches, before the class and
    # register tokens and the position embedding).
    model.eval()
    with torch.no_grad():
        plain = model.forward_head(model.forward_features(x))[1]
        swapped = model.forward_train(x, mix_box=(0, 0, 2, 2))[1]
        torch.testing.assert_close(swapped, plain)
        assert box_mask(box, model.grid).sum() == 2 and model(x).shape == (2, 5)
    spared = {n for n, p in model.named_parameters()
              if any(p is q for q in param_groups(model, 0.05)[1]["params"])}
    assert {"vit.cls_token", "vit.reg_token", "vit.pos_embed"} <= spared


def test_volo_reports_its_box_in_our_convention():
    torch.manual_seed(0)
    model = create_model("timm:volo_d1_224", num_classes=3, img_size=64).train()
    cls_logits, tokens, box = model.forward_train(torch.randn(2, 3, 64, 64))
    assert cls_logits.shape == (2, 3) and tokens.shape == (2, 16, 3) and model.grid == (4, 4)
    assert box is None or (0 <= box[0] < box[2] <= 4 and 0 <= box[1] < box[3] <= 4)


@pytest.mark.parametrize("name, reason", [("timm:resnet18", "is not one"),
                                          ("timm:deit_tiny_distilled_patch16_224",
                                           "VisionTransformerDistilled"),
                                          ("timm:no_such_model", "not a timm model")])
def test_other_models_are_refused(name, reason):
    with pytest.raises(ValueError, match=reason):
        create_model(name, num_classes=3, img_size=32)


def test_a_tiny_timm_vit_trains_resumes_and_evaluates(labeled, tmp_path):  # noqa: F811
    store, labels = labeled
    common = ["--store", str(store), "--dataset", "toy", "--labels", labels]
    args = ["train", *common, "--model", VIT, "--out", str(tmp_path), "--input-size", "32",
            "--batch-size", "8", "--workers", "0", "--registers", "1", "--val-permille", "300",
            "--model-kwargs", json.dumps({"depth": 2, "embed_dim": 48, "num_heads": 2}),
            "--no-progress"]
    runner = CliRunner()
    result = runner.invoke(main, [*args, "--epochs", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, [*args, "--epochs", "2", "--resume"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").open()]
    assert steps == list(range(1, len(steps) + 1))
    result = runner.invoke(main, ["eval", *common, "--checkpoint", str(tmp_path / "last.pt"),
                                  "--val-permille", "300"], catch_exceptions=False)
    scores = json.loads(result.output)
    assert scores["images"] > 0 and 0 <= scores["top1"] <= scores["top5"] <= 1
    result = runner.invoke(main, ["train", *common, "--model", "timm:resnet18", "--out",
                                  str(tmp_path / "r"), "--input-size", "32", "--batch-size", "8",
                                  "--workers", "0"])
    assert result.exit_code == 1 and "token labeling supports" in result.output
