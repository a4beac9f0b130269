"""Token-labeling loss (LV-ViT): CE on the class token plus beta x the mean soft CE of the tokens.

``total = CE(cls_logits, y_cls) + beta * mean_{batch, patch tokens} CE(token_logits_i, y_i)``
with soft targets: ``y_cls`` is the teacher's crop-level label (:func:`class_target`), ``y_i`` the
RoIAlign-cropped label map of token i (:mod:`trainer.labels`). Label smoothing replaces a target
``y`` by ``(1 - eps) y + eps / C``. Paper beta = 0.5 (VOLO's default; the LV-ViT repository
defaults to 1.0).

:func:`ground_truth_loss` is the ``--no-token-label`` path: plain cross-entropy on the dataset's
labels with label smoothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "class_target",
    "ground_truth_loss",
    "smooth_targets",
    "soft_cross_entropy",
    "token_labeling_loss",
]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, dim: int = -1,
                       reduction: str = "mean") -> torch.Tensor:
    """``-sum_c target_c log_softmax(logits)_c`` along ``dim``.

    ``reduction``: ``"none"`` keeps every other axis, ``"mean"`` (default) or ``"sum"`` reduce
    them all. Computed in float32 at least, whatever the logits' dtype (autocast-safe).
    """
    logp = F.log_softmax(logits.float(), dim=dim)
    loss = -(target.to(logp.dtype) * logp).sum(dim=dim)
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"unknown reduction {reduction!r}")


def smooth_targets(target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``(1 - eps) y + eps / C`` along the last axis (C = its size)."""
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if label_smoothing == 0.0:
        return target
    return target * (1.0 - label_smoothing) + label_smoothing / target.shape[-1]


def token_labeling_loss(cls_logits: torch.Tensor, token_logits: torch.Tensor,
                        cls_target: torch.Tensor, token_target: torch.Tensor,
                        beta: float = 0.5, label_smoothing: float = 0.0,
                        ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The token-labeling objective.

    Args:
        cls_logits: ``[B, C]`` class-token logits.
        token_logits: ``[B, N, C]`` auxiliary-head logits of the N patch tokens.
        cls_target: ``[B, C]`` soft class target (rows sum to 1).
        token_target: ``[B, N, C]`` soft token targets, token i of sample b in the same order as
            ``token_logits`` (a ``[B, C, h, w]`` map from :func:`trainer.labels.roi_align_labels`
            becomes this with ``.flatten(2).transpose(1, 2)``).
        beta: weight of the token term.
        label_smoothing: eps, applied to both targets.

    Returns:
        ``(total, parts)``: the scalar loss to backpropagate, and detached ``cls``, ``token`` and
        ``total`` scalars for logging.
    """
    if token_logits.shape != token_target.shape or token_logits.dim() != 3:
        raise ValueError(f"token logits {tuple(token_logits.shape)} and targets "
                         f"{tuple(token_target.shape)} must both be [B, N, C]")
    if cls_logits.shape != cls_target.shape:
        raise ValueError(f"class logits {tuple(cls_logits.shape)} and target "
                         f"{tuple(cls_target.shape)} differ")
    cls_loss = soft_cross_entropy(cls_logits, smooth_targets(cls_target, label_smoothing))
    token_loss = soft_cross_entropy(token_logits, smooth_targets(token_target, label_smoothing))
    total = cls_loss + beta * token_loss
    parts = {"cls": cls_loss.detach(), "token": token_loss.detach(), "total": total.detach()}
    return total, parts


def class_target(teacher_cls: torch.Tensor, ground_truth: torch.Tensor | None = None,
                 gt_weight: float = 0.0, num_classes: int | None = None) -> torch.Tensor:
    """The class-token target: the teacher's crop-level label, optionally blended with the truth.

    Args:
        teacher_cls: ``[B, C]`` the teacher's distribution for the crop (the 1x1 RoIAlign of the
            dense map, ``[B, C, 1, 1]`` is accepted too).
        ground_truth: ``[B]`` dataset class indices, -1 where unknown (those rows keep the
            teacher's label), or None.
        gt_weight: w in ``(1 - w) teacher + w one_hot(ground_truth)``; 0 = teacher only.
        num_classes: C, checked against ``teacher_cls`` when given.
    """
    if teacher_cls.dim() == 4:
        teacher_cls = teacher_cls.flatten(1)
    c = teacher_cls.shape[-1]
    if num_classes is not None and num_classes != c:
        raise ValueError(f"teacher has {c} classes, expected {num_classes}")
    if not 0.0 <= gt_weight <= 1.0:
        raise ValueError(f"gt_weight must be in [0, 1], got {gt_weight}")
    if ground_truth is None or gt_weight == 0.0:
        return teacher_cls
    gt = ground_truth.to(device=teacher_cls.device, dtype=torch.long)
    known = gt >= 0
    one_hot = F.one_hot(gt.clamp(min=0), c).to(teacher_cls.dtype)
    w = (gt_weight * known.to(teacher_cls.dtype))[:, None]
    return (1.0 - w) * teacher_cls + w * one_hot


def ground_truth_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0,
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``--no-token-label``: cross-entropy of the class logits ``[B, C]`` on the dataset labels.

    ``target`` is ``[B]`` class indices or ``[B, C]`` soft targets (after mixing); label smoothing
    is ``(1 - eps) y + eps / C`` as in :func:`token_labeling_loss`. Returns ``(total, parts)``
    with the same keys (``token`` is 0).
    """
    if target.dim() == 1:
        loss = F.cross_entropy(logits.float(), target.long(), label_smoothing=label_smoothing)
    else:
        loss = soft_cross_entropy(logits, smooth_targets(target, label_smoothing))
    zero = loss.detach().new_zeros(())
    return loss, {"cls": loss.detach(), "token": zero, "total": loss.detach()}
