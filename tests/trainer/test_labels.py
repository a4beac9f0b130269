"""Token-labeling targets (trainer.labels) and the loss (trainer.loss)."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision.transforms as T
from torchvision.transforms.v2 import functional as TF

from trainer.labels import (
    CropBox,
    densify,
    image_box_to_grid,
    roi_align_labels,
    sample_crop,
)
from trainer.loss import (
    class_target,
    ground_truth_loss,
    soft_cross_entropy,
    token_labeling_loss,
)


def resized_crop_tensor(image: torch.Tensor, box, size: int, flip: bool = False) -> torch.Tensor:
    """The image side of a crop: ``image`` [..., H, W] cropped to the pixel box (x1, y1, x2, y2),
    resized to ``size`` x ``size`` (bilinear), maybe flipped; the labels' twin is
    ``roi_align_labels`` with the same box."""
    x1, y1, x2, y2 = (int(v) for v in box)
    out = TF.resized_crop(image, top=y1, left=x1, height=y2 - y1, width=x2 - x1,
                          size=[size, size], interpolation=TF.InterpolationMode.BILINEAR,
                          antialias=True)
    return TF.horizontal_flip(out) if flip else out


# ---------------------------------------------------------------------------------------------
# densify


def _stored_labels(b=2, c=7, k=3, h=2, w=3, seed=0):
    """Full teacher logits and what the store keeps of them: top-K fp16 logits, int16 classes,
    float32 logsumexp."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(b, c, h, w, generator=g) * 3
    top, idx = full.topk(k, dim=1)
    return full, top.half(), idx.to(torch.int16), torch.logsumexp(full, dim=1)


def _reference_cell(logits_k, classes_k, lse, c):
    """One cell, element by element with math: exact probabilities, or the scatter-softmax."""
    logits_k = [float(v) for v in logits_k]
    classes_k = [int(v) for v in classes_k]
    if math.isnan(lse):
        vec = [0.0] * c
        for z, cls in zip(logits_k, classes_k, strict=True):
            vec[cls] = z
        norm = sum(math.exp(v) for v in vec)
        return [math.exp(v) / norm for v in vec]
    p = [math.exp(z - lse) for z in logits_k]
    rest = max(0.0, 1.0 - sum(p)) / (c - len(p))
    out = [rest] * c
    for pk, cls in zip(p, classes_k, strict=True):
        out[cls] = pk
    s = sum(out)
    return [v / s for v in out]


def _check_against_reference(probs, logits, classes, lse, c):
    b, _, h, w = logits.shape
    for n in range(b):
        for i in range(h):
            for j in range(w):
                ref = _reference_cell(logits[n, :, i, j], classes[n, :, i, j],
                                      float(lse[n, i, j]), c)
                assert probs[n, :, i, j].tolist() == pytest.approx(ref, rel=1e-5, abs=1e-7)


def test_densify_exact_probabilities_and_even_leftover():
    c = 7
    full, logits, classes, lse = _stored_labels(c=c)
    probs = densify(logits, classes, lse, c)
    assert probs.shape == full.shape and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(1), torch.ones(2, 2, 3), atol=1e-6)
    # The K stored classes: exp(logit - lse), i.e. the teacher's own softmax up to fp16 rounding
    # (which can push their sum a hair above 1: then they are rescaled to sum to 1).
    got = probs.gather(1, classes.long())
    exact = torch.exp(logits.float() - lse[:, None])
    exact = exact / exact.sum(1, keepdim=True).clamp(min=1.0)
    assert torch.allclose(got, exact, rtol=1e-5, atol=1e-7)
    assert torch.allclose(got, full.softmax(1).gather(1, classes.long()), rtol=2e-2, atol=1e-4)
    # The other C - K classes share the leftover evenly.
    mask = torch.ones_like(probs, dtype=torch.bool).scatter_(1, classes.long(), False)
    leftover = (1 - got.sum(1, keepdim=True)) / (c - 3)
    assert torch.allclose(probs, torch.where(mask, leftover, probs), atol=1e-6)
    _check_against_reference(probs, logits, classes, lse, c)


def test_densify_fallback_is_softmax_of_scattered_logits():
    c = 7
    _, logits, classes, lse = _stored_labels(c=c, seed=1)
    nan = torch.full_like(lse, float("nan"))
    probs = densify(logits, classes, nan, c)
    scattered = torch.zeros(2, c, 2, 3).scatter_(1, classes.long(), logits.float())
    assert torch.allclose(probs, scattered.softmax(1), atol=1e-6)
    assert torch.allclose(probs.sum(1), torch.ones(2, 2, 3), atol=1e-6)
    _check_against_reference(probs, logits, classes, nan, c)


def test_densify_mixed_nan_cells_and_images():
    c = 7
    _, logits, classes, lse = _stored_labels(c=c, seed=2)
    lse = lse.clone()
    lse[0, 0, 1] = float("nan")  # one cell of image 0
    lse[1] = float("nan")  # the whole of image 1 (an imported image)
    probs = densify(logits, classes, lse, c)
    assert torch.allclose(probs.sum(1), torch.ones(2, 2, 3), atol=1e-6)
    assert torch.isfinite(probs).all()
    _check_against_reference(probs, logits, classes, lse, c)


def test_densify_rows_sum_to_one_when_fp16_overshoots():
    # A peaked cell: the fp16-rounded top logit can give p_1 slightly above 1.
    logits = torch.tensor([[[[20.01]], [[0.0]]]]).half()
    classes = torch.tensor([[[[2]], [[0]]]], dtype=torch.int16)
    lse = torch.tensor([[[20.0]]])
    probs = densify(logits, classes, lse, 4)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (probs >= 0).all()


def test_densify_k_equals_c():
    full, logits, classes, lse = _stored_labels(c=3, k=3, seed=3)
    for given in (lse, torch.full_like(lse, float("nan"))):
        probs = densify(logits, classes, given, 3)
        assert torch.allclose(probs, full.softmax(1), atol=1e-2)
        assert torch.allclose(probs.sum(1), torch.ones_like(lse), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# crop boxes


@pytest.mark.parametrize("size", [(640, 480), (300, 500), (97, 61)])
def test_sample_crop_inside_image_and_in_scale_range(size):
    width, height = size
    scale, ratio = (0.25, 0.5), (3 / 4, 4 / 3)
    g = torch.Generator().manual_seed(123)
    for _ in range(200):
        box = sample_crop(width, height, scale=scale, ratio=ratio, generator=g)
        assert isinstance(box, CropBox)
        assert all(isinstance(v, int) for v in box)
        assert 0 <= box.x1 < box.x2 <= width and 0 <= box.y1 < box.y2 <= height
        # w and h are rounded to whole pixels: allow half a pixel on each side.
        lo = (box.width - 0.5) * (box.height - 0.5) / (width * height)
        hi = (box.width + 0.5) * (box.height + 0.5) / (width * height)
        assert lo <= scale[1] and hi >= scale[0]
        assert ratio[0] * 0.9 <= box.width / box.height <= ratio[1] * 1.1


def test_sample_crop_is_torchvisions_rule():
    for seed in range(20):
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(torch.zeros(3, 333, 517),
                                                        [0.08, 1.0], [3 / 4, 4 / 3])
        torch.manual_seed(seed)
        assert sample_crop(517, 333) == (left, top, left + w, top + h)


def test_sample_crop_seeded_generator_is_reproducible():
    a = [sample_crop(400, 300, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert a[0] == a[1]


def test_sample_crop_central_fallback():
    # A 1000x10 strip: no crop of 90-100 % of its area has an aspect ratio in [3/4, 4/3].
    box = sample_crop(1000, 10, scale=(0.9, 1.0), generator=torch.Generator().manual_seed(0))
    assert box == ((1000 - 13) // 2, 0, (1000 - 13) // 2 + 13, 10)


def test_image_box_to_grid():
    # 480 x 200 image, grid 8 (rows) x 12 (columns): cells are 40 px wide and 25 px high.
    assert image_box_to_grid((120, 25, 360, 150), (480, 200), (8, 12)) == (3.0, 1.0, 9.0, 6.0)
    boxes = torch.tensor([[120, 25, 360, 150], [0, 0, 480, 200]])
    sizes = torch.tensor([[480, 200], [960, 400]])
    got = image_box_to_grid(boxes, sizes, (8, 12))
    assert torch.allclose(got, torch.tensor([[3.0, 1.0, 9.0, 6.0], [0.0, 0.0, 6.0, 4.0]]))
    # Imported labels: the grid covers only the central 200 x 200 square (x from 140 to 340).
    assert image_box_to_grid((140, 0, 340, 200), (480, 200), (8, 8),
                             resize="center_crop") == (0.0, 0.0, 8.0, 8.0)


# ---------------------------------------------------------------------------------------------
# RoIAlign of label maps


def _random_dense(b, c, h, w, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed)).softmax(1)


def test_roi_align_class_token_is_the_crop_mean():
    # Adaptive sampling: a 1x1 bin over a box on cell boundaries samples every cell centre once,
    # so the class-token target is exactly the mean over the crop's cells.
    dense = _random_dense(2, 5, 8, 12)
    boxes = torch.tensor([[0.0, 0.0, 12.0, 8.0], [3.0, 1.0, 9.0, 6.0]])
    out = roi_align_labels(dense, boxes, (1, 1))
    assert out.shape == (2, 5, 1, 1)
    assert torch.allclose(out[0, :, 0, 0], dense[0].mean((1, 2)), atol=1e-6)
    assert torch.allclose(out[1, :, 0, 0], dense[1, :, 1:6, 3:9].mean((1, 2)), atol=1e-6)


def test_roi_align_cells_sum_to_one_and_flip_mirrors():
    dense = _random_dense(3, 6, 8, 12, seed=1)
    boxes = torch.tensor([[0.3, 0.7, 11.2, 7.9], [2.0, 1.0, 5.5, 7.0], [-3.0, -2.0, 14.0, 11.0]])
    flip = torch.tensor([False, True, False])
    out = roi_align_labels(dense, boxes, (14, 14), flip)
    assert out.shape == (3, 6, 14, 14)
    # Inside boxes: a convex combination already; the third box reaches outside the grid.
    assert torch.allclose(out.sum(1), torch.ones(3, 14, 14), atol=1e-5)
    assert (out >= 0).all()
    plain = roi_align_labels(dense, boxes, (14, 14))
    assert torch.allclose(out[1], plain[1].flip(-1), atol=1e-7)
    assert not torch.allclose(out[1], plain[1], atol=1e-3)
    assert torch.equal(out[0], plain[0])


# The one-hot spot. Image 480 x 200 (W != H), label grid 8 x 12 (non-square cells, 40 x 25 px).
# Every cell is class 0 except cell (row 4, column 4), class 1 with probability 1; the image is
# black except a white block exactly covering that cell, x in [160, 200), y in [100, 125).
W, H, GRID, SPOT = 480, 200, (8, 12), (4, 4)
CROP, TOKENS = 112, 7  # resized crop 112 x 112 -> 7 x 7 tokens of 16 px


def _spot_image_and_labels():
    gh, gw = GRID
    cw, ch = W // gw, H // gh
    r, c = SPOT
    image = torch.zeros(3, H, W)
    image[:, r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = 1.0
    dense = torch.zeros(1, 3, gh, gw)
    dense[0, 0] = 1.0
    dense[0, 0, r, c] = 0.0
    dense[0, 1, r, c] = 1.0
    return image, dense


def _white_block_token(crop):
    """Token cell (row, col) holding the centroid of the white block in a cropped image."""
    m = crop[0]
    centre = torch.arange(CROP) + 0.5
    cy = float((m.sum(1) * centre).sum() / m.sum()) * TOKENS / CROP
    cx = float((m.sum(0) * centre).sum() / m.sum()) * TOKENS / CROP
    # The test's own sanity: the centroid is well inside a token, not on a border.
    assert min(abs(cy - round(cy)), abs(cx - round(cx))) > 0.25
    return int(cy), int(cx)


def _peak(label_map):
    return divmod(int(label_map.argmax()), label_map.shape[-1])


@pytest.mark.parametrize("box", [(100, 45, 470, 150), (70, 45, 210, 180)])
def test_one_hot_spot_lands_where_the_image_spot_lands(box):
    image, dense = _spot_image_and_labels()
    grid_box = image_box_to_grid(box, (W, H), GRID)
    flips = torch.tensor([False, True])
    maps = roi_align_labels(dense.expand(2, -1, -1, -1), torch.tensor([grid_box, grid_box]),
                            (TOKENS, TOKENS), flips)
    for n, flip in enumerate(flips.tolist()):
        token = _white_block_token(resized_crop_tensor(image, box, CROP, flip=flip))
        assert _peak(maps[n, 1]) == token
        assert maps[n, 1][token] > 0.5

    # The public code's (top, left, bottom, right) order mirrors the labels across the diagonal:
    # for this non-square case the spot lands in another token.
    x1, y1, x2, y2 = grid_box
    swapped = torch.tensor([[y1, x1, y2, x2]] * 2)
    wrong = roi_align_labels(dense.expand(2, -1, -1, -1), swapped, (TOKENS, TOKENS), flips)
    for n, flip in enumerate(flips.tolist()):
        token = _white_block_token(resized_crop_tensor(image, box, CROP, flip=flip))
        assert _peak(wrong[n, 1]) != token
        assert wrong[n, 1][token] < 0.1


def test_one_hot_spot_class_token():
    _, dense = _spot_image_and_labels()
    box = (100, 45, 470, 150)
    cls = roi_align_labels(dense, torch.tensor([image_box_to_grid(box, (W, H), GRID)]), (1, 1))
    # The class-token target holds the spot in proportion to its area in the crop (adaptive
    # sampling: about one sample per cell), here 40 x 25 of 370 x 105 pixels.
    share = 40 * 25 / (370 * 105)
    assert cls[0, 1, 0, 0].item() == pytest.approx(share, rel=0.1)
    assert cls[0, :, 0, 0].sum().item() == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# loss

# B = 1, C = 3, N = 2, worked out by hand (for a target t summing to 1: CE = lse(z) - sum t z).
CLS_LOGITS = [1.0, 2.0, 0.0]
CLS_TARGET = [0.2, 0.5, 0.3]
TOKEN_LOGITS = [[0.0, 0.0, 0.0], [2.0, 0.0, -1.0]]
TOKEN_TARGET = [[1.0, 0.0, 0.0], [0.25, 0.25, 0.5]]
LSE_CLS = math.log(math.e + math.e**2 + 1.0)
LSE_TOK1 = math.log(math.e**2 + 1.0 + math.exp(-1.0))
# cls: sum t z = 0.2 + 1.0 + 0 = 1.2. token 0: uniform logits, CE = log 3. token 1: sum t z =
# 0.5 + 0 - 0.5 = 0.
CE_CLS = LSE_CLS - 1.2
CE_TOK = (math.log(3.0) + LSE_TOK1) / 2
# eps = 0.1: t -> 0.9 t + 1/30. cls: sum t z = 0.9 * 1.2 + 3/30 = 1.18. token 0 stays log 3.
# token 1: sum t z = 0.9 * 0 + (2 + 0 - 1)/30 = 1/30.
CE_CLS_LS = LSE_CLS - 1.18
CE_TOK_LS = (math.log(3.0) + LSE_TOK1 - 1 / 30) / 2


def _loss_inputs():
    return (torch.tensor([CLS_LOGITS], requires_grad=True),
            torch.tensor([TOKEN_LOGITS], requires_grad=True),
            torch.tensor([CLS_TARGET]), torch.tensor([TOKEN_TARGET]))


@pytest.mark.parametrize(("beta", "eps"), [(0.5, 0.0), (1.0, 0.0), (0.5, 0.1), (0.0, 0.1)])
def test_token_labeling_loss_by_hand(beta, eps):
    cls_l, tok_l, cls_t, tok_t = _loss_inputs()
    total, parts = token_labeling_loss(cls_l, tok_l, cls_t, tok_t, beta=beta, label_smoothing=eps)
    ce_cls, ce_tok = (CE_CLS_LS, CE_TOK_LS) if eps else (CE_CLS, CE_TOK)
    assert parts["cls"].item() == pytest.approx(ce_cls, rel=1e-6)
    assert parts["token"].item() == pytest.approx(ce_tok, rel=1e-6)
    assert total.item() == pytest.approx(ce_cls + beta * ce_tok, rel=1e-6)
    assert parts["total"].item() == pytest.approx(total.item())


def test_token_labeling_loss_gradients():
    cls_l, tok_l, cls_t, tok_t = _loss_inputs()
    total, _ = token_labeling_loss(cls_l, tok_l, cls_t, tok_t, beta=0.5)
    total.backward()
    # d CE / d z = softmax(z) - t; the token term is averaged over N = 2 and weighted by beta.
    soft = [math.exp(z - LSE_CLS) for z in CLS_LOGITS]
    assert cls_l.grad[0].tolist() == pytest.approx(
        [s - t for s, t in zip(soft, CLS_TARGET, strict=True)], abs=1e-6)
    soft1 = [math.exp(z - LSE_TOK1) for z in TOKEN_LOGITS[1]]
    expected = [[0.25 * (1 / 3 - t) for t in TOKEN_TARGET[0]],
                [0.25 * (s - t) for s, t in zip(soft1, TOKEN_TARGET[1], strict=True)]]
    for got, want in zip(tok_l.grad[0].tolist(), expected, strict=True):
        assert got == pytest.approx(want, abs=1e-6)


def test_soft_cross_entropy_matches_hard_cross_entropy():
    logits = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 1, 4])
    one_hot = torch.nn.functional.one_hot(labels, 5).float()
    assert torch.allclose(soft_cross_entropy(logits, one_hot),
                          torch.nn.functional.cross_entropy(logits, labels))
    per_row = soft_cross_entropy(logits.T, one_hot.T, dim=0, reduction="none")
    assert per_row.shape == (4,)


def test_class_target_blends_ground_truth():
    teacher = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert torch.equal(class_target(teacher, None, num_classes=3), teacher)
    gt = torch.tensor([1, -1])  # the second image has no known class: teacher only
    got = class_target(teacher, gt, gt_weight=0.25, num_classes=3)
    assert torch.allclose(got, torch.tensor([[0.525, 0.4, 0.075], [0.1, 0.1, 0.8]]))
    assert torch.allclose(got.sum(1), torch.ones(2))
    with pytest.raises(ValueError):
        class_target(teacher, gt, gt_weight=0.5, num_classes=4)


def test_ground_truth_loss_is_smoothed_cross_entropy():
    logits = torch.tensor([CLS_LOGITS], requires_grad=True)
    total, parts = ground_truth_loss(logits, torch.tensor([1]), label_smoothing=0.1)
    # t = (1/30, 0.9 + 1/30, 1/30): sum t z = 1/30 + 2 * 0.9333... = 1.9
    assert total.item() == pytest.approx(LSE_CLS - 1.9, rel=1e-6)
    assert parts["token"].item() == 0.0
    soft, _ = ground_truth_loss(logits, torch.tensor([[0.0, 1.0, 0.0]]), label_smoothing=0.1)
    assert soft.item() == pytest.approx(total.item(), rel=1e-6)
    total.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_official_targets_softmax_the_roi_aligned_scattered_logits():
    """A 1 x 3 grid, C = 3, top-2: cell 0 says class 0 at logit 20, cells 1 and 2 class 1 at 5.
    Over the whole image the official build averages logits, then softmaxes (class 0 wins);
    the exact build averages probabilities (class 1 holds two thirds of the mass and wins)."""
    from trainer.train import targets

    logits = torch.tensor([[[[20.0, 5.0, 5.0]], [[0.0, 0.0, 0.0]]]])  # [1, K=2, 1, 3]
    classes = torch.tensor([[[[0, 1, 1]], [[1, 2, 2]]]])
    batch = {"logits": logits, "classes": classes, "lse": torch.full((1, 1, 3), float("nan")),
             "box": torch.tensor([[0.0, 0.0, 3.0, 1.0]]), "flip": torch.tensor([False])}
    cls_official, tokens_official = targets(batch, (1, 3), 3, torch.device("cpu"), "official")
    mean_logits = torch.tensor([20.0, 10.0, 0.0]) / 3  # class 2's kept logit 0 equals the fill
    torch.testing.assert_close(cls_official[0], mean_logits.softmax(0))
    cls_exact, _ = targets(batch, (1, 3), 3, torch.device("cpu"), "exact")
    assert int(cls_official[0].argmax()) == 0 and int(cls_exact[0].argmax()) == 1
    # per token (one cell each) both are the softmax of that cell's scattered logits
    torch.testing.assert_close(tokens_official[0, 1], torch.tensor([0.0, 5.0, 0.0]).softmax(0))
