"""A picture of an image's dense labels, for a person: the top-1 class of every grid cell as a
colour over the image, more opaque where the teacher is more confident, and a legend."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from labeler_service.images import to_rgb
from storage import LabelBlock

MAX_SIDE = 512
LEGEND_ROWS = 5
ROW_HEIGHT = 16


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per class (golden-ratio hue steps)."""
    hue = (class_id * 0.618033988749895) % 1.0
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), 200, 255)).convert("RGB").getpixel((0, 0))
    return rgb


def top1_confidence(block: LabelBlock) -> np.ndarray:
    """p(top-1) per cell: exact from the logsumexp, or the top-K softmax when it is unknown."""
    logits = block.logits[0].astype(np.float32)
    lse = block.lse[0]
    if np.isfinite(lse).all():
        return np.exp(logits[0] - lse)
    shifted = np.exp(logits - logits.max(axis=0))
    return shifted[0] / shifted.sum(axis=0)


def render_heatmap(image_path: str, block: LabelBlock, class_names: Sequence[str]) -> bytes:
    with Image.open(image_path) as img:
        img.draft("RGB", (MAX_SIDE, MAX_SIDE))
        picture = to_rgb(ImageOps.exif_transpose(img))
    picture.thumbnail((MAX_SIDE, MAX_SIDE))
    width, height = picture.size

    top1 = block.classes[0, 0].astype(np.int64)  # [H, W]
    palette = {int(c): class_colour(int(c)) for c in np.unique(top1)}
    colours = np.array([palette[int(c)] for c in top1.ravel()], np.uint8)
    colour_map = Image.fromarray(colours.reshape(*top1.shape, 3)).resize(
        (width, height), Image.Resampling.NEAREST)
    alpha = Image.fromarray((top1_confidence(block) * 0.7 * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR)
    overlay = Image.composite(colour_map, picture, alpha)

    ids, counts = np.unique(top1, return_counts=True)
    shown = ids[np.argsort(-counts)][:LEGEND_ROWS]
    canvas = Image.new("RGB", (width, height + ROW_HEIGHT * len(shown) + 4), (255, 255, 255))
    canvas.paste(overlay, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, class_id in enumerate(shown):
        y = height + 2 + row * ROW_HEIGHT
        draw.rectangle((4, y + 2, 16, y + ROW_HEIGHT - 2), fill=palette[int(class_id)])
        name = class_names[class_id] if class_id < len(class_names) else f"class {class_id}"
        share = 100 * counts[ids == class_id][0] / top1.size
        draw.text((22, y + 2), f"{name} ({share:.0f}% of cells)", fill=(0, 0, 0))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()
