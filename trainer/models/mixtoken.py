"""MixToken (LV-ViT): CutMix on patch tokens, with per-token outputs un-mixed afterwards.

One box per batch in token coordinates ``(x1, y1, x2, y2)`` (x = column, y = row, x2/y2
exclusive). The partner of sample ``b`` is sample ``B - 1 - b`` (the batch reversed,
``tokens.flip(0)``). Inside the box, sample ``b``'s patch embeddings are replaced by its partner's;
after the transformer, :func:`unmix_tokens` swaps the per-token outputs back so that token ``i`` of
sample ``b`` is scored against sample ``b``'s own token label. The class target is mixed by area:
``target = (1 - a) * y + a * y.flip(0)`` with ``a = box_area_fraction(box, grid)``.

Plain functions, so the data and label code can use them without a model.
"""

from __future__ import annotations

import math

import torch

Box = tuple[int, int, int, int]


def sample_mix_box(
    grid_h: int,
    grid_w: int,
    lam: float | None = None,
    generator: torch.Generator | None = None,
) -> Box:
    """A CutMix box of about ``(1 - lam)`` of the grid, centred uniformly and clipped to the grid.

    ``lam ~ Beta(1, 1)`` (uniform) when not given. Returns ``(x1, y1, x2, y2)`` in token
    coordinates with ``0 <= x1 <= x2 <= grid_w`` and ``0 <= y1 <= y2 <= grid_h``; the box may be
    empty (then nothing is mixed). Clipping at the border makes the area smaller than
    ``1 - lam``: use :func:`box_area_fraction` for the class target, not ``lam``.
    """
    if grid_h < 1 or grid_w < 1:
        raise ValueError(f"grid must be positive, got {(grid_h, grid_w)}")
    if lam is None:
        lam = float(torch.rand((), generator=generator, device="cpu"))
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = round(grid_h * cut), round(grid_w * cut)
    cy = int(torch.randint(grid_h, (), generator=generator, device="cpu"))
    cx = int(torch.randint(grid_w, (), generator=generator, device="cpu"))
    y1 = min(max(cy - cut_h // 2, 0), grid_h)
    y2 = min(max(cy - cut_h // 2 + cut_h, 0), grid_h)
    x1 = min(max(cx - cut_w // 2, 0), grid_w)
    x2 = min(max(cx - cut_w // 2 + cut_w, 0), grid_w)
    return x1, y1, x2, y2


def _check_box(box: Box, grid: tuple[int, int]) -> None:
    x1, y1, x2, y2 = box
    h, w = grid
    if not (0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h):
        raise ValueError(f"box {tuple(box)} does not fit the {h}x{w} token grid")


def box_mask(
    box: Box, grid: tuple[int, int], device: torch.device | str | None = None
) -> torch.Tensor:
    """Boolean ``[h * w]`` mask (row-major over the grid), True inside the box."""
    _check_box(box, grid)
    x1, y1, x2, y2 = box
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    mask[y1:y2, x1:x2] = True
    return mask.flatten()


def box_area_fraction(box: Box, grid: tuple[int, int]) -> float:
    """Share of the grid's tokens inside the box (the share replaced by the partner's)."""
    _check_box(box, grid)
    x1, y1, x2, y2 = box
    return (x2 - x1) * (y2 - y1) / (grid[0] * grid[1])


def _swap_in_box(tokens: torch.Tensor, grid: tuple[int, int], box: Box) -> torch.Tensor:
    if tokens.dim() < 2 or tokens.shape[1] != grid[0] * grid[1]:
        raise ValueError(
            f"expected [B, {grid[0] * grid[1]}, ...] tokens for grid {tuple(grid)}, "
            f"got {tuple(tokens.shape)}")
    mask = box_mask(box, grid, tokens.device)
    mask = mask.view(1, -1, *([1] * (tokens.dim() - 2)))
    return torch.where(mask, tokens.flip(0), tokens)


def mix_tokens(tokens: torch.Tensor, grid: tuple[int, int], box: Box) -> torch.Tensor:
    """Replace the tokens inside ``box`` by the partner's (the batch reversed).

    ``tokens``: ``[B, N, ...]`` patch tokens only (no class/register tokens), row-major over the
    ``(h, w)`` grid. Differentiable; the input is not modified.
    """
    return _swap_in_box(tokens, grid, box)


def unmix_tokens(token_outputs: torch.Tensor, grid: tuple[int, int], box: Box) -> torch.Tensor:
    """Inverse of :func:`mix_tokens`: row ``b`` of the result is about sample ``b``'s own image.

    Inside the box, mixed sample ``B - 1 - b`` carried image ``b``'s tokens, so its outputs are
    taken back (the swap is its own inverse).
    """
    return _swap_in_box(token_outputs, grid, box)
