"""How good a label set is, as numbers: teacher agreement, and dense quality against masks.

* **Agreement** (every label set whose teacher shares the dataset's label space): the share of
  labeled images whose image-level top-1, and top-5, contain the image's folder class. A teacher
  in the wrong label space scores near chance, however confident its maps look.
* **Dense quality** (datasets with per-pixel ground truth, such as ``labeler sample scenes``):
  each grid cell gets the class covering most of its pixels, or background, through the label
  set's recorded geometry; the teacher's per-cell top-1 and top-5 are scored against it on
  main-object and distractor cells separately, with mIoU over classes and a reliability table.

Both are recorded in the label set's attrs (``agreement``, ``label_quality``: see
docs/store-format.md).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from labeler_service.scenes import MaskRejected, load_mask, mask_path
from labeler_service.teacher import label_space_problem
from storage import Dataset, ImageStatus, LabelSet, TeacherSpec

AGREEMENT_TOPK = 5
RELIABILITY_BINS = 10
MAX_MASK_FAILURES = 10  # refused masks named in the result (all are counted)
# How evaluate_labels counts each kind of refused mask (``MaskRejected.kind``) in its result.
MASK_COUNTS = {"other_size": "masks_of_other_size", "unreadable": "masks_unreadable",
               "unknown_class": "masks_with_unknown_classes"}


# -- agreement ---------------------------------------------------------------------------------

def teacher_agreement(dataset: Dataset, labelset: LabelSet) -> dict[str, Any]:
    """Image-level top-1 / top-K (K = min(5, top-K stored)) hit rates against the folder
    classes, over labeled images with a known class; or why it cannot be measured."""
    def unavailable(reason: str) -> dict[str, Any]:
        return {"images": 0, "top1": None, "top5": None, "k": None, "reason": reason}

    if not dataset.class_names:
        return unavailable("the dataset has no classes (not an ImageFolder tree)")
    problem = label_space_problem(dataset, labelset.teacher)
    if problem is not None:
        return unavailable(f"not the dataset's label space: {problem}")
    classes = dataset.column("class")
    status = labelset.status()
    used = (status == ImageStatus.LABELED) & (classes >= 0)
    k = min(AGREEMENT_TOPK, labelset.topk)
    top = np.asarray(labelset.array("global_classes")[:])[used, :k].astype(np.int64)
    if not used.any():
        return unavailable("no labeled image with a known class")
    if (top[:, 0] < 0).all():
        return unavailable("the labels have no image-level classes (imported)")
    truth = classes[used][:, None]
    return {"images": int(used.sum()), "top1": float((top[:, 0] == truth[:, 0]).mean()),
            "top5": float((top == truth).any(axis=1).mean()), "k": k, "reason": None}


def record_agreement(dataset: Dataset, labelset: LabelSet) -> dict[str, Any]:
    """Measure the agreement of a finished label set and record it in its attrs."""
    agreement = teacher_agreement(dataset, labelset)
    labelset.record_summary("agreement", agreement)
    return agreement


def record_summaries(dataset: Dataset, labelset: LabelSet) -> dict[str, Any]:
    """What whoever completes a label set records (``labeler label``, the worker that writes
    its last shard): the completion summary (read in O(1) by GET /v1/labelsets and
    POST /v1/jobs), then the teacher agreement, which it returns."""
    labelset.record_completion()
    return record_agreement(dataset, labelset)


def describe_agreement(agreement: dict[str, Any] | None) -> str:
    """One line for people: ``labeler label``, ``labeler datasets list``."""
    if agreement is None:
        return "teacher agreement: not measured"
    if agreement["top1"] is None:
        return f"teacher agreement: n/a ({agreement['reason']})"
    return (f"teacher agreement: top-1 {100 * agreement['top1']:.1f} %, top-{agreement['k']} "
            f"{100 * agreement['top5']:.1f} % of {agreement['images']} images contain the "
            "folder class")


# -- dense quality ------------------------------------------------------------------------------

def cell_ground_truth(mask: np.ndarray, grid: tuple[int, int], teacher: TeacherSpec) -> np.ndarray:
    """Per grid cell, the mask value covering most of the cell's pixels (-1: background).

    ``mask`` is int [H, W] in the original image's pixels. A pixel belongs to the cell its centre
    falls in, under the label set's geometry (``TeacherSpec.grid_box``: the whole image, or its
    central square, whose outside belongs to no cell). Ties go to the lower value, background
    first.
    """
    return (cell_value_counts(mask, grid, teacher).argmax(axis=1) - 1).reshape(grid)


def cell_object_fraction(mask: np.ndarray, grid: tuple[int, int],
                         teacher: TeacherSpec) -> np.ndarray:
    """Per grid cell, the share of its pixels that belong to an object (mask >= 0); float
    [H, W], 0 for a cell without pixels. Same geometry as :func:`cell_ground_truth`."""
    counts = cell_value_counts(mask, grid, teacher)
    total = counts.sum(axis=1)
    return np.where(total > 0, 1 - counts[:, 0] / np.maximum(total, 1), 0.0).reshape(grid)


def cell_value_counts(mask: np.ndarray, grid: tuple[int, int], teacher: TeacherSpec) -> np.ndarray:
    """int [cells, 1 + max value]: per grid cell (row-major), how many of its pixels carry each
    mask value + 1 (column 0: background)."""
    height, width = mask.shape
    grid_h, grid_w = grid
    x0, y0, span_x, span_y = teacher.grid_box(width, height)
    col = np.floor((np.arange(width) + 0.5 - x0) * grid_w / span_x).astype(np.int64)
    row = np.floor((np.arange(height) + 0.5 - y0) * grid_h / span_y).astype(np.int64)
    inside = ((row >= 0) & (row < grid_h))[:, None] & ((col >= 0) & (col < grid_w))[None, :]
    cell = row[:, None] * grid_w + col[None, :]
    values = mask.astype(np.int64) + 1  # background -1 -> 0
    depth = int(values.max(initial=0)) + 1
    return np.bincount(cell[inside] * depth + values[inside],
                       minlength=grid_h * grid_w * depth).reshape(grid_h * grid_w, depth)


def dense_quality(truth: np.ndarray, predicted: np.ndarray, confidence: np.ndarray,
                  image_class: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Scores of top-K class maps against per-cell ground truth.

    Args:
        truth: int [N, H, W], the class of each cell, -1 for background.
        predicted: int [N, K, H, W], the teacher's classes per cell, best first.
        confidence: float [N, H, W], the teacher's top-1 probability per cell.
        image_class: int [N], each image's (main object's) class, -1 when unknown.
        num_classes: C.

    Main-object cells carry the image's class, distractor cells another class. Background cells
    are counted (``background_share``) but not scored: the teacher has no background class.
    mIoU is over the classes present in the truth or the predictions, on object cells.
    """
    obj = truth >= 0
    known = (image_class >= 0)[:, None, None]
    main = obj & known & (truth == image_class[:, None, None])
    distractor = obj & known & ~main
    top1 = predicted[:, 0]
    hit1 = top1 == truth
    hit5 = (predicted[:, :AGREEMENT_TOPK] == truth[:, None]).any(axis=1)

    def share(hits: np.ndarray, where: np.ndarray) -> float | None:
        return float(hits[where].mean()) if where.any() else None

    ious = []
    for c in range(num_classes):
        union = ((top1 == c) | (truth == c)) & obj
        if union.any():
            ious.append(float(((top1 == c) & (truth == c)).sum() / union.sum()))
    return {
        "images": len(truth),
        "cells": int(truth.size),
        "main_cells": int(main.sum()),
        "distractor_cells": int(distractor.sum()),
        "background_share": float((~obj).mean()) if truth.size else None,
        "main_top1": share(hit1, main),
        "distractor_top1": share(hit1, distractor),
        "object_top1": share(hit1, obj),
        "main_top5": share(hit5, main),
        "distractor_top5": share(hit5, distractor),
        "object_top5": share(hit5, obj),
        "miou": float(np.mean(ious)) if ious else None,
        "reliability": reliability(confidence[obj], hit1[obj]),
    }


def reliability(confidence: np.ndarray, correct: np.ndarray,
                bins: int = RELIABILITY_BINS) -> dict[str, Any]:
    """Mean top-1 probability against accuracy, in equal-width confidence bins, and the
    expected calibration error (the count-weighted mean gap)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    table, gap = [], 0.0
    for b in range(bins):
        here = which == b
        if not here.any():
            continue
        conf, acc = float(confidence[here].mean()), float(correct[here].mean())
        table.append({"low": float(edges[b]), "high": float(edges[b + 1]),
                      "cells": int(here.sum()), "confidence": conf, "accuracy": acc})
        gap += here.sum() * abs(conf - acc)
    return {"bins": table, "ece": float(gap / len(confidence)) if len(confidence) else None,
            "mean_confidence": float(confidence.mean()) if len(confidence) else None}


def evaluate_labels(dataset: Dataset, labelset: LabelSet, masks_root: Path,
                    val_permille: int | None = None, record: bool = True) -> dict[str, Any]:
    """Dense quality of ``labelset`` against the masks under ``masks_root`` (the scenes format:
    ``load_mask``), on all labeled images and, with ``val_permille``, on the held-out split.

    ``val_permille`` defaults to the split the teacher was fitted with, when ``labeler teacher
    fit`` fitted it on this dataset. Labels are read a shard at a time. Images without a mask,
    and masks that cannot be used (unreadable, of another size, or holding values that are no
    class of the dataset's), are counted and left out, the first few refused ones named.
    Recorded as the label set's ``label_quality`` attr.
    """
    if not dataset.class_names:
        raise ValueError(f"dataset {dataset.name!r} has no classes: masks hold class indices "
                         "of its ImageFolder classes")
    problem = label_space_problem(dataset, labelset.teacher)
    if problem is not None:
        raise ValueError(f"{problem}: the teacher's classes cannot be scored against masks of "
                         "the dataset's classes")
    fit = labelset.attrs.get("teacher_fit") or {}
    if val_permille is None and fit.get("dataset_fingerprint") == dataset.fingerprint:
        val_permille = fit.get("val_permille")
    manifest = dataset.manifest()
    status = labelset.status()
    masks_root = Path(masks_root)
    num_classes = len(dataset.class_names)  # the teacher's too (label_space_problem)

    rows, truths, predicted, confidence = [], [], [], []
    missing, rejected, failures = 0, Counter(), []
    for shard in range(labelset.num_shards):
        start, stop = labelset.shard_range(shard)
        labeled = start + np.flatnonzero(status[start:stop] == ImageStatus.LABELED)
        if not len(labeled):
            continue
        block = labelset.read_block(start, stop)
        top1 = block.top1_probability()
        for i in labeled:
            try:
                mask = load_mask(masks_root / manifest.path[i],
                                 (int(manifest.height[i]), int(manifest.width[i])), num_classes,
                                 root=masks_root)
            except FileNotFoundError:
                missing += 1
                continue
            except MaskRejected as e:  # one bad file costs its image, never the evaluation
                rejected[e.kind] += 1
                if len(failures) < MAX_MASK_FAILURES:
                    failures.append([manifest.path[i], str(e)])
                continue
            rows.append(i)
            truths.append(cell_ground_truth(mask, labelset.grid, labelset.teacher))
            predicted.append(block.classes[i - start])
            confidence.append(top1[i - start])
    if not rows and rejected:
        raise ValueError(f"no usable mask under {masks_root} for a labeled image of "
                         f"{dataset.name!r}: {sum(rejected.values())} refused, e.g. "
                         f"{failures[0][1]}")
    if not rows:
        example = mask_path(masks_root / manifest.path[0]) if len(manifest) else masks_root
        raise FileNotFoundError(f"no mask under {masks_root} for a labeled image of "
                                f"{dataset.name!r} (expected e.g. {example})")
    rows_arr = np.asarray(rows)
    arrays = (np.stack(truths), np.stack(predicted).astype(np.int64), np.stack(confidence),
              manifest.label[rows_arr])
    result: dict[str, Any] = {
        "masks": str(masks_root), "images_without_mask": missing,
        **{key: rejected[kind] for kind, key in MASK_COUNTS.items()},
        "mask_failures": failures, "val_permille": val_permille,
        "all": dense_quality(*arrays, num_classes)}
    if val_permille:
        held = dataset.held_out(val_permille)[rows_arr]
        result["held_out"] = dense_quality(*(a[held] for a in arrays), num_classes)
    if record:
        labelset.record_summary("label_quality", result)
    return result


def describe_left_out(result: dict[str, Any]) -> str | None:
    """One line for people on the labeled images that were not scored, or None if none."""
    counts = [(result["images_without_mask"], "without a mask"),
              (result["masks_unreadable"], "with an unreadable mask"),
              (result["masks_of_other_size"], "whose mask is of another size"),
              (result["masks_with_unknown_classes"], "whose mask holds no class of the dataset")]
    parts = [f"{count} {what}" for count, what in counts if count]
    if not parts:
        return None
    example = f" (e.g. {result['mask_failures'][0][1]})" if result["mask_failures"] else ""
    return f"labeled images left out: {', '.join(parts)}{example}"


def describe_quality(result: dict[str, Any], split: str = "held_out") -> str:
    """One line for people."""
    if split not in result:
        split = "all"
    part, name = result[split], {"all": "all", "held_out": "held-out"}[split]

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.1f} %"

    return (f"dense labels ({name}, {part['images']} images): top-1 = ground truth on "
            f"{pct(part['main_top1'])} of main-object cells, {pct(part['distractor_top1'])} of "
            f"distractor cells; top-5 {pct(part['object_top5'])}; mIoU {pct(part['miou'])}; "
            f"background {pct(part['background_share'])} of cells; calibration error "
            f"{pct(part['reliability']['ece'])}")
