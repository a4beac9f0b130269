"""Token-labeling targets: stored top-K label maps -> dense class distributions -> crop targets.

The pipeline for one training batch (see docs/store-format.md for the stored arrays and their
geometry):

1. :func:`densify` turns the stored top-K ``logits``/``classes``/``lse`` of each grid cell into a
   full distribution over all classes, ``[B, C, H, W]``.
2. :func:`sample_crop` draws a RandomResizedCrop box in image pixels, ``(x1, y1, x2, y2)``;
   :func:`image_box_to_grid` expresses the same box in label-grid coordinates.
3. :func:`roi_align_labels` crops the dense maps to those boxes with RoIAlign, at 14x14 for the
   patch tokens and 1x1 for the class token, and mirrors the maps of horizontally flipped samples.
   The image goes through the same box in the data code (``TokenLabelStream.load_image``).

Coordinates. Image pixel ``(col, row)`` covers the continuous square ``[col, col + 1) x
[row, row + 1)``, so a crop box ``(x1, y1, x2, y2)`` takes columns ``x1 .. x2 - 1``. With
``resize = "squash"`` label-grid cell ``(i, j)`` covers ``x in [j W / grid_w, (j + 1) W / grid_w)``,
``y in [i H / grid_h, (i + 1) H / grid_h)``, i.e. the continuous grid coordinate of image point
``(x, y)`` is ``(x grid_w / W, y grid_h / H)`` and cell ``(i, j)`` is ``[j, j + 1) x [i, i + 1)``.
That is exactly RoIAlign's convention with ``aligned=True`` (cell centres at ``j + 0.5``).

Box order. ``torchvision.ops.roi_align`` takes ``(x1, y1, x2, y2)``. Both public token-labeling
implementations pass ``(top, left, bottom, right)``, which mirrors the label region across the
diagonal; ``tests/trainer/test_labels.py`` puts a one-hot spot through image and labels to prove
the order used here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align

__all__ = [
    "CropBox",
    "densify",
    "image_box_to_grid",
    "roi_align_labels",
    "sample_crop",
]


def densify(logits: torch.Tensor, classes: torch.Tensor, lse: torch.Tensor,
            num_classes: int) -> torch.Tensor:
    """Full class distributions from stored top-K labels, on the tensors' device.

    Args:
        logits: ``[B, K, H, W]`` top-K logits of each cell (any float dtype, usually float16).
        classes: ``[B, K, H, W]`` their class indices (int16/int32/int64), all in
            ``[0, num_classes)``. Images whose status is not 0 (fill values: NaN logits,
            class -1) must be dropped before: they have no labels.
        lse: ``[B, H, W]`` logsumexp over all ``num_classes`` logits of each cell; NaN where it is
            unknown (labels imported from the public TokenLabeling files), per cell or per image.
        num_classes: C.

    Returns:
        ``[B, C, H, W]`` float32 probabilities; every cell sums to 1.

    With a known ``lse`` the K stored classes get their exact teacher probabilities
    ``p_k = exp(logit_k - lse)`` and the leftover mass ``max(0, 1 - sum_k p_k)`` is spread evenly
    over the other ``C - K`` classes (their individual logits were not kept).

    Where ``lse`` is NaN the fallback of the public code applies: the top-K logits are scattered
    into a C-vector with logit 0 elsewhere and softmaxed. That softmax has the same shape as the
    exact case (K probabilities plus ``C - K`` equal ones) with the normaliser
    ``log(sum_k exp(logit_k) + (C - K))``, so it is computed as the exact case with that value put
    in place of the missing ``lse``: one code path, no second ``[B, C, H, W]`` tensor.
    """
    if logits.shape != classes.shape or logits.dim() != 4:
        raise ValueError(f"logits {tuple(logits.shape)} and classes {tuple(classes.shape)} "
                         "must both be [B, K, H, W]")
    b, k, h, w = logits.shape
    if lse.shape != (b, h, w):
        raise ValueError(f"lse must be [B, H, W] = {(b, h, w)}, got {tuple(lse.shape)}")
    if k > num_classes:
        raise ValueError(f"top-K ({k}) exceeds num_classes ({num_classes})")

    z = logits.float()
    lse = lse.to(device=z.device, dtype=torch.float32)
    others = num_classes - k
    # Normaliser of the fallback "softmax of the scattered vector": logit 0 for the C - K others.
    fallback_lse = torch.logaddexp(
        torch.logsumexp(z, dim=1), torch.tensor(math.log(others) if others else -math.inf,
                                                device=z.device))
    lse = torch.where(torch.isnan(lse), fallback_lse, lse)

    p = torch.exp(z - lse[:, None])  # [B, K, H, W]
    rest = (1.0 - p.sum(dim=1, keepdim=True)).clamp_(min=0.0) / max(others, 1)
    out = rest.expand(b, num_classes, h, w).contiguous()
    out.scatter_(1, classes.to(device=z.device, dtype=torch.long), p)
    # fp16 logits can make sum_k p_k a hair above 1 (then rest = 0): renormalise every cell.
    return out / out.sum(dim=1, keepdim=True)


class CropBox(NamedTuple):
    """A box ``(x1, y1, x2, y2)``: columns ``x1 .. x2 - 1`` and rows ``y1 .. y2 - 1`` in pixels."""

    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def width(self) -> float:
        return self.x2 - self.x1

    @property
    def height(self) -> float:
        return self.y2 - self.y1


def sample_crop(width: int, height: int, scale: tuple[float, float] = (0.08, 1.0),
                ratio: tuple[float, float] = (3 / 4, 4 / 3),
                generator: torch.Generator | None = None) -> CropBox:
    """A RandomResizedCrop box for a ``width x height`` image: integer pixels ``(x1, y1, x2, y2)``.

    torchvision's rule (``RandomResizedCrop.get_params``), with its random draws in the same order,
    so with ``generator=None`` and the same global seed it returns torchvision's box: up to 10
    tries of an area fraction ~ U(scale) and a log-uniform aspect ratio in ``ratio``, placed
    uniformly where it fits; else a central crop of the whole image clamped to ``ratio``.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1],
                                                     generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1],
                                                   generator=generator)).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return CropBox(left, top, left + w, top + h)
    # Fallback: central crop, the whole image clamped to the aspect-ratio range.
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return CropBox(left, top, left + w, top + h)


def image_box_to_grid(box: Sequence[float] | torch.Tensor,
                      image_size: Sequence[float] | torch.Tensor,
                      grid: Sequence[int], resize: str = "squash"):
    """Express an image-pixel box ``(x1, y1, x2, y2)`` in label-grid coordinates.

    Args:
        box: one box (a 4-sequence, returns a :class:`CropBox` of floats) or a ``[B, 4]`` tensor
            (returns a float32 ``[B, 4]`` tensor).
        image_size: ``(W, H)`` of the full image (the manifest's width and height), or a
            ``[B, 2]`` tensor of them for a batch of boxes.
        grid: ``(grid_h, grid_w)``, the label set's ``grid`` attribute (note: H first).
        resize: the label set's ``teacher.resize``. ``"squash"``: the grid covers the whole image,
            x scales by ``grid_w / W`` and y by ``grid_h / H``. ``"center_crop"`` (imported
            TokenLabeling labels): the grid covers only the central ``S x S`` square,
            ``S = min(W, H)``; parts of the box outside it fall outside the grid.
    """
    gh, gw = grid
    size = torch.as_tensor(image_size, dtype=torch.float64)
    wi, hi = size[..., 0], size[..., 1]
    if resize == "squash":
        ox, oy, sw, sh = torch.zeros_like(wi), torch.zeros_like(hi), wi, hi
    elif resize == "center_crop":
        side = torch.minimum(wi, hi)
        ox, oy, sw, sh = (wi - side) / 2, (hi - side) / 2, side, side
    else:
        raise ValueError(f"unknown resize mode {resize!r}")
    offset = torch.stack([ox, oy, ox, oy], dim=-1)
    scale = torch.stack([gw / sw, gh / sh, gw / sw, gh / sh], dim=-1)
    if isinstance(box, torch.Tensor):
        return ((box.double() - offset.to(box.device)) * scale.to(box.device)).float()
    out = (torch.as_tensor(box, dtype=torch.float64) - offset) * scale
    return CropBox(*(float(v) for v in out.tolist()))


def scatter_logits(logits: torch.Tensor, classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The official target build's first step: the top-K logits ``[B, K, H, W]`` scattered into
    ``[B, C, H, W]`` float32 logits, 0 for every class that was not kept."""
    b, _, h, w = logits.shape
    out = torch.zeros(b, num_classes, h, w, device=logits.device, dtype=torch.float32)
    return out.scatter_(1, classes.to(device=logits.device, dtype=torch.long), logits.float())


def roi_align_labels(dense: torch.Tensor, boxes: torch.Tensor | Sequence[Sequence[float]],
                     output_size: tuple[int, int], flip: torch.Tensor | None = None,
                     sampling_ratio: int = -1, distributions: bool = True) -> torch.Tensor:
    """Crop dense label maps to boxes with RoIAlign, then mirror the flipped samples.

    Args:
        dense: ``[B, C, H, W]`` class distributions (from :func:`densify`).
        boxes: ``[B, 4]`` boxes ``(x1, y1, x2, y2)`` in label-grid coordinates
            (:func:`image_box_to_grid`), one per sample, in x-then-y order.
        output_size: ``(h, w)``: ``(1, 1)`` for the class-token target, ``(14, 14)`` for the
            patch-token targets of a 224 px / patch 16 model.
        flip: ``[B]`` bool, samples whose image was flipped horizontally after cropping.
        distributions: ``dense`` holds distributions, and every output cell is renormalised to
            sum to 1 (below); False for logits (the official target build), returned as
            RoIAlign gives them.
        sampling_ratio: RoIAlign samples per bin and axis. The default -1 (adaptive) takes
            ``ceil(bin size in cells)``: a 1x1 class-token bin over a crop spanning n cells takes
            about n samples per axis, one per cell, so the crop-level target is the average over
            the whole crop (exactly the cell mean for a box on cell boundaries), where a fixed 2
            would take only 4 bilinear samples for the whole crop. Token bins are usually smaller
            than a cell, and then one bilinear sample at the bin centre is exact for a map that
            is bilinear between cell centres.

    Returns:
        ``[B, C, h, w]`` in ``dense``'s dtype; every cell sums to 1.

    Where a box reaches outside the grid (centre-cropped labels of a non-square image: the crop
    may take pixels beside the labelled square), the labels there are those of the **nearest
    cell**: the maps are padded with copies of their border cells as far as the boxes reach
    (padding only when some box does). Each output cell is then a mean of bilinear
    interpolations of the input distributions, a convex combination that sums to 1; it is
    renormalised all the same against rounding.
    """
    if dense.dim() != 4:
        raise ValueError(f"dense must be [B, C, H, W], got {tuple(dense.shape)}")
    b, c = dense.shape[:2]
    boxes = torch.as_tensor(boxes).to(dense.dtype)
    if boxes.shape != (b, 4):
        raise ValueError(f"boxes must be [B, 4] = {(b, 4)}, got {tuple(boxes.shape)}")
    pad = outside_reach(boxes, dense.shape[-2:])  # before the copy: boxes from a loader are
    # on the host, so this reads no device memory
    boxes = boxes.to(dense.device)
    if pad:
        dense = F.pad(dense, (pad, pad, pad, pad), mode="replicate")
        boxes = boxes + pad
    index = torch.arange(b, device=dense.device, dtype=dense.dtype)[:, None]
    rois = torch.cat([index, boxes], dim=1)  # [B, 5]: (batch index, x1, y1, x2, y2)
    maps = roi_align(dense, rois, output_size=tuple(output_size), spatial_scale=1.0,
                     sampling_ratio=sampling_ratio, aligned=True)
    # Both steps touch [B, C, h, w] with C ~ 1000, on every training step: as few full passes as
    # possible (flip only the flipped samples; renormalise and fill empty cells in one addcmul).
    if flip is not None:
        flip = torch.as_tensor(flip, device=dense.device, dtype=torch.bool)
        maps[flip] = maps[flip].flip(-1)
    if not distributions:
        return maps
    total = maps.sum(dim=1, keepdim=True)
    return torch.addcmul((total <= 0).to(maps.dtype) / c, maps, 1.0 / total.clamp(min=1e-12))


def outside_reach(boxes: torch.Tensor, grid: Sequence[int]) -> int:
    """How many cells (rounded up, plus RoIAlign's one-cell border) the ``[B, 4]`` grid-coordinate
    boxes reach beyond a ``grid`` = ``(h, w)`` map; 0 when all lie inside."""
    h, w = grid
    over = torch.stack([-boxes[:, 0], -boxes[:, 1], boxes[:, 2] - w, boxes[:, 3] - h]).max()
    over = float(over)
    return 0 if over <= 0 else math.ceil(over) + 1
