"""RandAugment's geometric ops move the token labels with the pixels (a one-hot spot through the
real targets path), colour ops and erasing move nothing, draws are reproducible, and the
``--recipe lvvit`` preset sets what the published recipe does."""

from __future__ import annotations

import pytest
import torch

from trainer.augment import (
    GEOMETRIC_OPS,
    IDENTITY_THETA,
    Augmentation,
    RandAugmentConfig,
    augment_image,
    erase,
    geometric_map,
    sample_erase,
    sample_rand_augment,
)
from trainer.train import TrainConfig, recipe_settings, targets, with_recipe

SIZE, GRID, BLOCK = 64, (16, 16), 4
SPOT = (3, 12)  # row, col of the 4 x 4 px block that is white in the image and class 1 in labels


def spot_image() -> torch.Tensor:
    image = torch.zeros(3, SIZE, SIZE, dtype=torch.uint8)
    r, c = SPOT
    image[:, BLOCK * r:BLOCK * (r + 1), BLOCK * c:BLOCK * (c + 1)] = 255
    return image


def spot_batch(theta: torch.Tensor) -> dict:
    """Labels on the crop's own 16 x 16 grid: class 1 at the spot, class 0 elsewhere."""
    classes = torch.zeros(1, 2, *GRID, dtype=torch.int64)
    classes[0, 1] = 2
    classes[0, 0, SPOT[0], SPOT[1]] = 1
    logits = torch.stack([torch.full((1, *GRID), 20.0), torch.zeros(1, *GRID)], dim=1)
    return {"logits": logits, "classes": classes, "lse": torch.full((1, *GRID), float("nan")),
            "box": torch.tensor([[0.0, 0.0, 16.0, 16.0]]), "flip": torch.tensor([False]),
            "theta": theta[None]}


@pytest.mark.parametrize("ops", [[("Rotate", 0.8)], [("ShearX", -1.0)], [("ShearY", 1.0)],
                                 [("TranslateX", -0.5)], [("TranslateY", 0.4)],
                                 [("Rotate", -0.6), ("TranslateX", -0.3), ("ShearY", 0.5)]])
def test_geometric_ops_move_the_labels_with_the_pixels(ops):
    # (moves that keep the spot inside the image: outside, the pixels get the fill and the
    # labels their nearest token)
    theta = torch.eye(3, dtype=torch.float64)
    for op, level in ops:
        theta = theta @ geometric_map(op, level)
    augmentation = Augmentation([], theta[:2].float())
    image = augment_image(spot_image(), augmentation, RandAugmentConfig(fill=(0, 0, 0)))
    brightness = image[0].float().reshape(16, BLOCK, 16, BLOCK).mean(dim=(1, 3))  # per block
    _, tokens = targets(spot_batch(augmentation.theta), GRID, 3, torch.device("cpu"))
    spot = tokens[0, :, 1].reshape(GRID)
    assert int(spot.argmax()) == int(brightness.argmax()) != SPOT[0] * 16 + SPOT[1]
    # where the pixels went, the labels went: their maps correlate strongly
    a, b = spot.flatten(), brightness.flatten()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9


def test_without_a_geometric_op_nothing_moves():
    augmentation = Augmentation([("Solarize", 0.5), ("Contrast", -0.3)], IDENTITY_THETA)
    image = augment_image(spot_image(), augmentation, RandAugmentConfig())
    assert not torch.equal(image, spot_image())  # the colours changed
    _, tokens = targets(spot_batch(IDENTITY_THETA), GRID, 3, torch.device("cpu"))
    assert int(tokens[0, :, 1].argmax()) == SPOT[0] * 16 + SPOT[1]


def test_draws_are_reproducible_and_span_every_op():
    config = RandAugmentConfig(prob=1.0)
    first = sample_rand_augment(config, torch.Generator().manual_seed(7))
    again = sample_rand_augment(config, torch.Generator().manual_seed(7))
    assert first.colour == again.colour and torch.equal(first.theta, again.theta)
    generator = torch.Generator().manual_seed(0)
    seen_geometric = seen_colour = 0
    for _ in range(200):
        a = sample_rand_augment(config, generator)
        seen_colour += len(a.colour)
        seen_geometric += not torch.equal(a.theta, IDENTITY_THETA)
        assert all(abs(level) <= 1 for _, level in a.colour)
    # 2 ops of 15, 5 geometric: P(no geometric op) = (10/15)^2
    assert 0.45 < seen_geometric / 200 < 0.65 and seen_colour > 150
    assert len(GEOMETRIC_OPS) == 5


def test_random_erasing_fills_a_rectangle_with_noise():
    generator = torch.Generator().manual_seed(3)
    boxes = [sample_erase(SIZE, 0.25, generator) for _ in range(400)]
    erased = [b for b in boxes if b is not None]
    assert 0.18 < len(erased) / 400 < 0.32
    box = erased[0]
    out = erase(torch.zeros(3, SIZE, SIZE, dtype=torch.uint8), box)
    inside = out[:, box.top:box.top + box.height, box.left:box.left + box.width]
    assert inside.float().mean() > 100 and out.sum() == inside.sum()


def test_the_lvvit_recipe():
    settings = recipe_settings("lvvit", "lvvit_s")
    assert settings["rand_augment"] and settings["random_erase"] == 0.25
    assert settings["drop_path"] == 0.1 and settings["ema"] == 0.99992
    assert settings["beta"] == 1.0 and settings["target_mode"] == "official"
    assert settings["clip_grad"] == 0.0 and settings["lr"] == 1.6e-3
    assert recipe_settings("lvvit", "lvvit_m")["drop_path"] == 0.2
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_settings("deit", "lvvit_s")


def test_with_recipe_keeps_what_the_user_set():
    base = TrainConfig(store="s", dataset="d", labels="l", out="o", model="lvvit_s", beta=0.5,
                       model_kwargs={"drop_path": 0.3})
    config = with_recipe(base, "lvvit", keep={"beta"})
    assert config.beta == 0.5 and config.model_kwargs["drop_path"] == 0.3  # the user's
    assert config.ema == 0.99992 and config.target_mode == "official" and config.rand_augment
    assert with_recipe(TrainConfig("s", "d", "l", "o", model="lvvit_m"), "lvvit").model_kwargs \
        == {"drop_path": 0.2}
    assert base.ema == 0.0  # a copy: the config given is unchanged
