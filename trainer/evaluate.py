"""Evaluation: top-1/top-5 on the held-out split, and feature-map artifact metrics."""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from storage import Dataset, Store
from storage.images import DEFAULT_MAX_PIXELS, ImageRejected
from trainer.checkpoints import build_model, read_checkpoint
from trainer.data.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
from trainer.data.stream import ShardRows, StreamConfig, TokenLabelStream

ROWS_PER_READ = 256  # manifest rows read at a time by artifact_metrics


def load_checkpoint(path: Path, device: torch.device,
                    use_ema: bool = True) -> tuple[torch.nn.Module, Normalize]:
    """Any checkpoint :func:`trainer.checkpoints.read_checkpoint` reads, in eval mode on
    ``device`` (a project checkpoint's EMA weights when it has them and ``use_ema``), and the
    pixel normalisation it was trained with (ImageNet's for checkpoints that do not say)."""
    checkpoint = read_checkpoint(path, use_ema=use_ema)
    normalize = Normalize(checkpoint.extra.get("mean", IMAGENET_MEAN),
                          checkpoint.extra.get("std", IMAGENET_STD), device)
    return build_model(checkpoint).to(device).eval(), normalize


@torch.no_grad()
def evaluate(checkpoint: Path, store: str, dataset: str, labels: str, batch_size: int = 64,
             workers: int = 2, val_permille: int = 20) -> dict:
    """Top-1/top-5 of the model's inference score against the dataset's classes, held-out split."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, normalize = load_checkpoint(checkpoint, device)
    size = model.img_size
    stream = TokenLabelStream(StreamConfig(store=store, dataset=dataset, labelset=labels,
                                           image_size=size, split="val", augment=False,
                                           val_permille=val_permille))
    correct1 = correct5 = total = 0
    stream.track_skips(workers)
    for batch in DataLoader(stream, batch_size=batch_size, num_workers=workers):
        known = batch["target"] >= 0
        if not known.any():
            continue
        scores = model(normalize(batch["image"][known]))
        target = batch["target"][known].to(device)
        top = scores.topk(min(5, scores.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == target).sum())
        correct5 += int((top == target[:, None]).any(dim=1).sum())
        total += int(known.sum())
    if total == 0:
        raise ValueError("the held-out split has no image with a known class"
                         + skipped_note(stream.skipped_images()))
    return {"top1": correct1 / total, "top5": correct5 / total, "images": total,
            "skipped_images": stream.skipped_images()}


def skipped_note(skipped: dict[str, int]) -> str:
    return f" (skipped, not read as registered: {skipped})" if skipped else ""


def outlier_token_share(patches: torch.Tensor, factor: float = 3.0) -> float:
    """The share of patch tokens ``[B, N, D]`` whose norm exceeds ``factor`` x the median
    patch-token norm of their own image (the high-norm "artifact" tokens of Darcet et al.)."""
    norms = patches.norm(dim=-1)
    median = norms.median(dim=1, keepdim=True).values
    return float((norms > factor * median).float().mean())


def attention_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Normalised entropy ``H / log N`` of attention rows ``[B, N]`` (any non-negative weights):
    1 is uniform over the N tokens, 0 all on one."""
    p = attention / attention.sum(-1, keepdim=True)
    return -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(p.shape[-1])


def foreground_precision(attention: torch.Tensor, object_fraction: torch.Tensor,
                         top_mass: float = 0.5) -> torch.Tensor:
    """Where the class token looks: of the smallest set of tokens holding ``top_mass`` of each
    row's attention ``[B, N]``, the share of that attention that falls on object pixels
    (``object_fraction`` ``[B, N]``: each token's cell's share of object pixels). ``[B]``."""
    p = attention / attention.sum(-1, keepdim=True)
    mass, order = p.sort(dim=-1, descending=True)
    # a token is in the top set when the mass before it is still short of top_mass
    in_top = (mass.cumsum(-1) - mass) < top_mass
    fraction = object_fraction.gather(-1, order)
    return (mass * fraction * in_top).sum(-1) / (mass * in_top).sum(-1)


def position_share(patches: torch.Tensor) -> float:
    """The share of patch-token variance ``[B, N, D]`` explained by position: the variance of
    the per-position means (over images) divided by the total variance, summed over dims. 0:
    tokens say nothing about where they are; 1: a token is its position embedding."""
    x = patches.double()
    centred = x - x.mean(dim=(0, 1))
    between = centred.mean(dim=0).pow(2).sum(-1).mean()
    total = centred.pow(2).sum(-1).mean()
    return float(between / total) if total > 0 else 0.0


@torch.no_grad()
def artifact_metrics(checkpoint: Path, store: str, dataset: str, images: int = 64,
                     batch_size: int = 16) -> dict:
    """:func:`outlier_token_share` (residual stream before the final LayerNorm) and the class
    token's :func:`attention_entropy` in the last block (over patch tokens, per head, averaged),
    over the first ``images`` readable images."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, normalize = load_checkpoint(checkpoint, device)
    size = model.img_size
    skipped: collections.Counter[str] = collections.Counter()
    readable = registered_images(Store.open(store, mode="r").dataset(dataset), skipped)
    pixels = [np.asarray(picture.resize((size, size), Image.Resampling.BICUBIC))
              for picture in itertools.islice(readable, images)]
    if not pixels:
        raise ValueError(f"dataset {dataset!r} has no readable image" + skipped_note(skipped))
    x_all = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    prefix = model.num_prefix_tokens
    patches, entropy = [], []
    for start in range(0, len(x_all), batch_size):
        x = normalize(x_all[start:start + batch_size])
        patches.append(model.forward_features(x, pre_norm=True)[:, prefix:])
        attention = model.attention_maps(x)[-1][:, :, 0, prefix:]  # [B, heads, N]
        entropy.append(attention_entropy(attention).mean(1))
    return {"outlier_token_share": outlier_token_share(torch.cat(patches)),
            "cls_attention_entropy": float(torch.cat(entropy).mean()), "images": len(x_all),
            "skipped_images": dict(skipped)}


def registered_images(dataset: Dataset, skipped: collections.Counter[str]
                      ) -> Iterator[Image.Image]:
    """The dataset's images in order, each read as the training stream reads it (as
    registered, confined to its folder, within the pixel limit); one that is not is counted in
    ``skipped`` by status and passed over."""
    root = Path(dataset.source_root)
    for start in range(0, dataset.num_images, ROWS_PER_READ):
        rows = ShardRows.read(dataset, start, min(start + ROWS_PER_READ, dataset.num_images))
        for index in range(start, start + len(rows.paths)):
            try:
                yield rows.open(index, root, DEFAULT_MAX_PIXELS)
            except ImageRejected as e:
                skipped[e.status.name.lower()] += 1
