"""The student diagnostics: each equals a hand-computed value on a tiny case, and each artifact
metric detects artifacts planted in a real model's residual stream (positive controls: a small
model rarely shows artifacts, and "none found" must not come from a blind metric)."""

from __future__ import annotations

import pytest
import torch

from trainer.evaluate import (
    attention_entropy,
    foreground_precision,
    outlier_token_share,
    position_share,
)
from trainer.models import create_model


def test_outlier_token_share_counts_tokens_over_three_medians():
    patches = torch.zeros(2, 4, 3)
    patches[:, :, 0] = torch.tensor([[1.0, 1.0, 1.0, 10.0], [1.0, 2.0, 2.0, 2.0]])
    assert outlier_token_share(patches) == pytest.approx(1 / 8)
    assert outlier_token_share(patches, factor=1.5) == pytest.approx(1 / 8)


def test_attention_entropy_is_one_for_uniform_and_zero_for_one_token():
    rows = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 5.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    assert attention_entropy(rows).tolist() == pytest.approx([1.0, 0.0, 0.5])


def test_foreground_precision_of_the_top_attention_mass():
    attention = torch.tensor([[0.6, 0.2, 0.1, 0.1]])
    on_object = torch.tensor([[1.0, 0.0, 0.5, 0.0]])
    # top half of the mass: token 0 alone (all object); top 70 %: tokens 0 and 1
    assert foreground_precision(attention, on_object).item() == pytest.approx(1.0)
    assert foreground_precision(attention, on_object, top_mass=0.7).item() == pytest.approx(0.75)
    assert foreground_precision(attention, 1 - on_object).item() == pytest.approx(0.0)


def test_position_share_is_one_for_position_locked_tokens_and_small_for_noise():
    position = torch.randn(1, 16, 8).expand(64, 16, 8)
    assert position_share(position) == pytest.approx(1.0)
    noise = torch.randn(64, 16, 8, generator=torch.Generator().manual_seed(0))
    assert position_share(noise) < 0.05  # ~1 / images by chance


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = create_model("lvvit_nano", num_classes=10).eval()
    images = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, images


def planted(model, images, offset: torch.Tensor) -> torch.Tensor:
    """Pre-norm patch tokens with ``offset`` ``[N, D]`` added to the last block's output."""
    prefix = model.num_prefix_tokens

    def plant(module, args, output):
        output = output.clone()
        output[:, prefix:] += offset
        return output

    handle = model.blocks[-1].register_forward_hook(plant)
    try:
        with torch.no_grad():
            return model.forward_features(images, pre_norm=True)[:, prefix:]
    finally:
        handle.remove()


def test_high_norm_tokens_planted_in_the_residual_stream_are_found(model_and_images):
    model, images = model_and_images
    clean = planted(model, images, torch.zeros(64, 128))
    norm = clean.norm(dim=-1).median()
    offset = torch.zeros(64, 128)
    offset[[5, 40], 0] = 20 * norm  # two artifact tokens per image, as registers-paper ViTs show
    assert outlier_token_share(clean) < 0.01
    assert outlier_token_share(planted(model, images, offset)) == pytest.approx(2 / 64)


def test_position_locked_tokens_planted_in_the_residual_stream_are_found(model_and_images):
    model, images = model_and_images
    clean = planted(model, images, torch.zeros(64, 128))
    scale = clean.std()
    locked = planted(model, images, 5 * scale * torch.randn(64, 128))
    assert position_share(locked) > position_share(clean) + 0.5
