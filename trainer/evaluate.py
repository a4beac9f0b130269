"""Evaluation: top-1/top-5 on the held-out split, and feature-map artifact metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from labeler_service.images import ImageRejected, decode_image
from storage import Store
from trainer.data.stream import StreamConfig, TokenLabelStream
from trainer.models import create_model
from trainer.train import IMAGENET_MEAN, IMAGENET_STD


def load_checkpoint(path: Path, device: torch.device, use_ema: bool = True) -> torch.nn.Module:
    state = torch.load(path, map_location=device, weights_only=False)
    config = state["config"]
    model = create_model(config["model"], num_classes=state["num_classes"],
                         img_size=config["input_size"], **config["model_kwargs"])
    weights = state["ema"] if use_ema and state.get("ema") else state["model"]
    if weights is state.get("ema"):  # AveragedModel: "module." prefix and a step counter
        weights = {k.removeprefix("module."): v for k, v in weights.items()
                   if k.startswith("module.")}
    model.load_state_dict(weights)
    return model.to(device).eval()


def normalise(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    return (images.to(device).float() - mean) / std


@torch.no_grad()
def evaluate(checkpoint: Path, store: str, dataset: str, labels: str, batch_size: int = 64,
             workers: int = 2, val_permille: int = 20) -> dict:
    """Top-1/top-5 of the model's inference score against the dataset's classes, held-out split."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(checkpoint, device)
    size = model.config.img_size if hasattr(model, "config") else 224
    stream = TokenLabelStream(StreamConfig(store=store, dataset=dataset, labelset=labels,
                                           image_size=size, split="val", augment=False,
                                           val_permille=val_permille))
    correct1 = correct5 = total = 0
    for batch in DataLoader(stream, batch_size=batch_size, num_workers=workers):
        known = batch["target"] >= 0
        if not known.any():
            continue
        scores = model(normalise(batch["image"][known], device))
        target = batch["target"][known].to(device)
        top = scores.topk(min(5, scores.shape[1]), dim=1).indices
        correct1 += int((top[:, 0] == target).sum())
        correct5 += int((top == target[:, None]).any(dim=1).sum())
        total += int(known.sum())
    if total == 0:
        raise ValueError("the held-out split has no image with a known class")
    return {"top1": correct1 / total, "top5": correct5 / total, "images": total}


@torch.no_grad()
def artifact_metrics(checkpoint: Path, store: str, dataset: str, images: int = 64,
                     batch_size: int = 16) -> dict:
    """The share of patch tokens whose norm exceeds 3x the median patch-token norm (residual
    stream before the final LayerNorm), and the class token's attention entropy in the last block
    (H / log N over patch tokens, heads averaged), over the first ``images`` images."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_checkpoint(checkpoint, device)
    ds = Store.open(store, mode="r").dataset(dataset)
    root, paths = Path(ds.source_root), ds.manifest().path
    size = model.config.img_size
    pixels = []
    for p in paths:
        if len(pixels) == images:
            break
        try:
            pixels.append(decode_image((root / p).read_bytes(), size))
        except (ImageRejected, OSError):
            continue
    x_all = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2)
    prefix = model.num_prefix_tokens
    outliers = tokens = 0
    entropy: list[float] = []
    for start in range(0, len(x_all), batch_size):
        x = normalise(x_all[start:start + batch_size], device)
        patches = model.forward_features(x, pre_norm=True)[:, prefix:]
        norms = patches.norm(dim=-1)
        median = norms.median(dim=1, keepdim=True).values
        outliers += int((norms > 3 * median).sum())
        tokens += norms.numel()
        attention = model.attention_maps(x)[-1][:, :, 0, prefix:]  # [B, heads, N]
        attention = attention / attention.sum(-1, keepdim=True)
        h = -(attention * attention.clamp_min(1e-12).log()).sum(-1).mean(1)
        entropy += (h / math.log(attention.shape[-1])).tolist()
    return {"outlier_token_share": outliers / tokens, "cls_attention_entropy":
            float(np.mean(entropy)), "images": len(x_all)}
