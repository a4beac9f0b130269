"""A small synthetic image folder and a random-weight teacher checkpoint, made locally.

Used by ``labeler demo`` (the quickstart), the tests and the benchmarks: nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

SAMPLE_CLASSES = ("circles", "squares", "stripes")


def draw_sample(kind: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    img = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(4, max(5, min(width, height) // 3)))
        if kind == "circles":
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
        elif kind == "squares":
            draw.rectangle((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
        else:
            step = max(2, r // 2)
            for x in range(0, width, 2 * step):
                draw.rectangle((x, 0, x + step, height), fill=colour)
    return img


def make_sample_images(root: Path, per_class: int = 8, seed: int = 0,
                       classes: tuple[str, ...] = SAMPLE_CLASSES) -> Path:
    """An ImageFolder tree root/<class>/<i>.jpg of small images with varied sizes."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(48, 200, 2))
            draw_sample(kind, w, h, rng).save(root / kind / f"{i:04d}.jpg", quality=90)
    return root


def make_random_checkpoint(path: Path, model: str = "test_nfnet", num_classes: int = 1000,
                           seed: int = 0) -> Path:
    """A timm state dict with random weights, saved as safetensors (or .pth by suffix)."""
    torch.manual_seed(seed)
    state = timm.create_model(model, pretrained=False, num_classes=num_classes).state_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path
