"""A one-hot spot in a stored label map, through the training path (densify, RoIAlign crop, flip,
MixToken): it must land on the token that sees the spot's pixels, for the right sample."""

from __future__ import annotations

import torch

from trainer.labels import image_box_to_grid
from trainer.models.mixtoken import box_area_fraction, mix_tokens, unmix_tokens
from trainer.train import targets

IMAGE_W, IMAGE_H = 400, 300
LABEL_GRID = (6, 8)  # rows, cols over the whole image: cells of 50 x 50 px
TOKEN_GRID = (5, 5)
SPOT = (2, 5)  # row, col of the cell holding class 1 in sample 0; centre at x=275, y=125 px
CROP = (60, 40, 400, 300)  # x1, y1, x2, y2 in image pixels: 340 x 260, off-centre


def stored_batch() -> dict:
    """Sample 0: class 0 everywhere but the spot (class 1); sample 1: class 2 everywhere.
    Top-1 logit 20 against the rest near 0, so p(top-1) ~ 1."""
    h, w = LABEL_GRID
    classes = torch.zeros(2, 2, h, w, dtype=torch.int64)
    classes[0, 0] = 0
    classes[0, 0, SPOT[0], SPOT[1]] = 1
    classes[0, 1] = 2
    classes[0, 1, SPOT[0], SPOT[1]] = 0
    classes[1, 0], classes[1, 1] = 2, 0
    logits = torch.stack([torch.full((2, h, w), 20.0), torch.zeros(2, h, w)], dim=1)
    lse = torch.logsumexp(torch.stack([logits[:, 0], logits[:, 1], torch.zeros(2, h, w)]), 0)
    box = image_box_to_grid(CROP, (IMAGE_W, IMAGE_H), LABEL_GRID)
    return {"logits": logits, "classes": classes, "lse": lse,
            "box": torch.tensor([box, box], dtype=torch.float32),
            "flip": torch.tensor([True, False])}


def expected_token(flip: bool) -> int:
    """Where the spot's centre lands in the crop, on the token grid (away from token edges)."""
    x = (275 - CROP[0]) / (CROP[2] - CROP[0]) * TOKEN_GRID[1]  # 3.16: column 3
    y = (125 - CROP[1]) / (CROP[3] - CROP[1]) * TOKEN_GRID[0]  # 1.63: row 1
    col = TOKEN_GRID[1] - 1 - int(x) if flip else int(x)
    return int(y) * TOKEN_GRID[1] + col


def test_spot_lands_on_its_token_through_crop_flip_and_mixtoken():
    cls_target, token_target = targets(stored_batch(), TOKEN_GRID, 3, torch.device("cpu"))
    assert token_target.shape == (2, 25, 3)
    spot_token = expected_token(flip=True)  # sample 0 is flipped: row 1, column 1
    assert spot_token == 6
    assert int(token_target[0, :, 1].argmax()) == spot_token
    assert token_target[0, spot_token, 1] > 0.2  # the spot's share of that token's area
    assert token_target[1, :, 1].max() < 1e-6  # sample 1 has no class 1 anywhere
    # unflipped, the same crop puts it on the mirror column: the flip is applied, and once
    flipped = dict(stored_batch(), flip=torch.tensor([False, False]))
    _, unflipped = targets(flipped, TOKEN_GRID, 3, torch.device("cpu"))
    assert int(unflipped[0, :, 1].argmax()) == expected_token(flip=False) == 8

    # MixToken: sample 1's image gets sample 0's tokens inside the box, which holds the spot.
    box = (0, 0, 3, 3)  # x1, y1, x2, y2 in tokens: token 6 (row 1, col 1) is inside
    mixed = mix_tokens(token_target, TOKEN_GRID, box)
    assert int(mixed[1, :, 1].argmax()) == spot_token  # the spot is now in sample 1's input
    # the model's token outputs are un-mixed with the same box: token 6 of row 0 is about
    # sample 0's image again, so it is scored against sample 0's own label
    torch.testing.assert_close(unmix_tokens(mixed, TOKEN_GRID, box), token_target)
    # and the class target is mixed by the area the partner took
    area = box_area_fraction(box, TOKEN_GRID)
    mixed_cls = (1 - area) * cls_target + area * cls_target.flip(0)
    assert area == 9 / 25
    torch.testing.assert_close(mixed_cls[0, 2], area * cls_target[1, 2] + (1 - area) *
                               cls_target[0, 2])
    assert mixed_cls[0, 2] > 0.3  # a third of sample 0's class target is now sample 1's class


def centre_crop_batch(box: tuple[float, float, float, float]) -> dict:
    """One sample of centre-cropped labels (imported TokenLabeling files) on the 400 x 300
    image: a 6 x 6 grid over the central 300 x 300 square (x in [50, 350)), cells of 50 px.
    Class 1 at the spot, cell (2, 4): pixels x in [250, 300), y in [100, 150); class 3 in the
    square's leftmost column; class 0 elsewhere."""
    classes = torch.zeros(1, 2, 6, 6, dtype=torch.int64)
    classes[0, 0, :, 0] = 3
    classes[0, 0, 2, 4] = 1
    classes[0, 1] = 2
    logits = torch.stack([torch.full((1, 6, 6), 20.0), torch.zeros(1, 6, 6)], dim=1)
    lse = torch.logsumexp(torch.stack([logits[:, 0], logits[:, 1], torch.zeros(1, 6, 6)]), 0)
    grid_box = image_box_to_grid(box, (IMAGE_W, IMAGE_H), (6, 6), "center_crop")
    return {"logits": logits, "classes": classes, "lse": lse,
            "box": torch.tensor([grid_box], dtype=torch.float32), "flip": torch.tensor([False])}


def test_centre_cropped_labels_land_where_the_square_puts_them():
    crop = (200, 40, 340, 300)  # the spot's centre (275, 125) is at token x 2.68, y 1.63
    _, tokens = targets(centre_crop_batch(crop), TOKEN_GRID, 4, torch.device("cpu"))
    assert int(tokens[0, :, 1].argmax()) == 1 * TOKEN_GRID[1] + 2
    # Mapping the box as if the grid covered the whole image (the bug this guards against)
    # moves the spot to pixels x in [267, 333), centre 300: token x 3.57.
    wrong = dict(centre_crop_batch(crop), box=torch.tensor(
        [image_box_to_grid(crop, (IMAGE_W, IMAGE_H), (6, 6))], dtype=torch.float32))
    _, shifted = targets(wrong, TOKEN_GRID, 4, torch.device("cpu"))
    assert int(shifted[0, :, 1].argmax()) == 1 * TOKEN_GRID[1] + 3


def test_outside_the_labelled_square_the_nearest_cell_labels_the_tokens():
    # A crop of the image's left 75 px: x in [0, 50) lies left of the square, where the
    # nearest cells are the square's leftmost column (class 3); x in [50, 75) is that column,
    # up to its centre (bilinear beyond it would blend in the next column).
    _, tokens = targets(centre_crop_batch((0, 0, 75, 300)), TOKEN_GRID, 4,
                        torch.device("cpu"))
    top = tokens[0].argmax(-1).reshape(TOKEN_GRID)
    assert (top == 3).all(), top
    assert tokens[0, :, 3].min() > 0.99  # not a uniform fallback
