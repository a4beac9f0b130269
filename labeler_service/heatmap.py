"""Pictures of an image's dense labels, for a person.

* ``render_heatmap``: the top-1 class of every grid cell as a colour over the image, more opaque
  where the teacher is more confident, and a legend (the API's ``heatmap.png``).
* ``render_panel``: image | ground-truth mask | class or heat maps side by side, with the grid
  drawn where the label set's geometry puts it (``labeler demo``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from storage import LabelBlock, TeacherSpec
from storage.images import open_rgb, to_rgb

MAX_SIDE = 512
LEGEND_ROWS = 5
ROW_HEIGHT = 16


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A stable, well-spread colour per class (golden-ratio hue steps)."""
    hue = (class_id * 0.618033988749895) % 1.0
    rgb = Image.new("HSV", (1, 1), (int(hue * 255), 200, 255)).convert("RGB").getpixel((0, 0))
    return rgb


def render_heatmap(data: bytes, block: LabelBlock, class_names: Sequence[str],
                   max_pixels: int) -> bytes:
    """The heatmap PNG over the image file's bytes ``data``. A JPEG decodes at reduced scale
    (``draft``); other formats decode whole, so ``max_pixels`` bounds the memory one render
    takes. Raises ImageRejected for a source that is not a usable image or is too large."""
    picture = open_rgb(data, max_pixels, draft_size=MAX_SIDE)
    picture.thumbnail((MAX_SIDE, MAX_SIDE))
    width, height = picture.size

    top1 = block.classes[0, 0].astype(np.int64)  # [H, W]
    palette = {int(c): class_colour(int(c)) for c in np.unique(top1)}
    colours = np.array([palette[int(c)] for c in top1.ravel()], np.uint8)
    colour_map = Image.fromarray(colours.reshape(*top1.shape, 3)).resize(
        (width, height), Image.Resampling.NEAREST)
    alpha = Image.fromarray((block.top1_probability()[0] * 0.7 * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR)
    overlay = Image.composite(colour_map, picture, alpha)

    ids, counts = np.unique(top1, return_counts=True)
    shown = ids[np.argsort(-counts)][:LEGEND_ROWS]
    canvas = Image.new("RGB", (width, height + ROW_HEIGHT * len(shown) + 4), (255, 255, 255))
    canvas.paste(overlay, (0, 0))
    entries = [(palette[int(c)], f"{class_name(class_names, int(c))} "
                                 f"({100 * counts[ids == c][0] / top1.size:.0f}% of cells)")
               for c in shown]
    draw_legend(canvas, height + 2, entries)
    return png_bytes(canvas)


def class_name(class_names: Sequence[str], class_id: int) -> str:
    return class_names[class_id] if 0 <= class_id < len(class_names) else f"class {class_id}"


def draw_legend(canvas: Image.Image, top: int, entries: list[tuple[tuple, str]],
                columns: int = 1) -> None:
    """Colour swatches with their text, in rows of ``columns`` from ``top`` down."""
    draw = ImageDraw.Draw(canvas)
    column_width = canvas.width // columns
    for k, (colour, text) in enumerate(entries):
        x, y = 4 + (k % columns) * column_width, top + (k // columns) * ROW_HEIGHT
        draw.rectangle((x, y + 2, x + 12, y + ROW_HEIGHT - 2), fill=colour)
        draw.text((x + 18, y + 2), text, fill=(0, 0, 0))


def png_bytes(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


BACKGROUND_COLOUR = (40, 40, 40)
PANEL_HEIGHT = 256


def render_panel(image_path: str, mask: np.ndarray, teacher: TeacherSpec,
                 maps: Sequence[tuple[str, np.ndarray]], title: str = "") -> bytes:
    """``image | ground truth | map | map ...``: the mask and each class map (int ``[h, w]``)
    in the same class colours (background dark grey), each float map (e.g. attention,
    ``[h, w]``) as a heat overlay from its minimum (blue) to its maximum (red); the grid drawn
    over all, the geometry of ``teacher`` (``TeacherSpec.grid_box``) for every map, each tile's
    name above it, a legend of the classes present, and ``title`` above all."""
    with Image.open(image_path) as img:
        picture = to_rgb(ImageOps.exif_transpose(img))
    if picture.size != (mask.shape[1], mask.shape[0]):
        raise ValueError(f"{image_path}: the mask is {mask.shape[1]}x{mask.shape[0]}, the image "
                         f"{picture.width}x{picture.height}")
    scale = PANEL_HEIGHT / picture.height
    size = (max(1, round(picture.width * scale)), PANEL_HEIGHT)
    picture = picture.resize(size, Image.Resampling.BICUBIC)

    class_maps = [m.astype(np.int64) for _, m in maps if np.issubdtype(m.dtype, np.integer)]
    present = sorted(set(np.unique(mask[mask >= 0]).tolist()).union(
        *(np.unique(m).tolist() for m in class_maps)))
    palette = np.array([class_colour(c) for c in range(max(present, default=0) + 1)], np.uint8)
    truth = np.where(mask[..., None] >= 0, palette[np.maximum(mask, 0)], BACKGROUND_COLOUR)
    truth = Image.fromarray(truth.astype(np.uint8)).resize(size, Image.Resampling.NEAREST)

    x0, y0, span_x, span_y = teacher.grid_box(mask.shape[1], mask.shape[0])  # image pixels
    box = tuple(round(v * scale) for v in (x0, y0, x0 + span_x, y0 + span_y))
    grey = picture.convert("L").convert("RGB")  # under the colours, for context
    tiles, grids = [("image", picture), ("ground truth", truth)], [None, None]
    for name, values in maps:
        if np.issubdtype(values.dtype, np.integer):
            colours = palette[values.astype(np.int64)]
        else:
            low, high = float(values.min()), float(values.max())
            heat = (values - low) / max(high - low, 1e-12)
            colours = (np.stack([heat, 0.25 * heat, 1 - heat], -1) * 255).astype(np.uint8)
        cells = Image.fromarray(colours).resize((box[2] - box[0], box[3] - box[1]),
                                                Image.Resampling.NEAREST)
        tile = grey.copy()
        tile.paste(Image.blend(tile.crop(box), cells, 0.8), box[:2])
        tiles.append((name, tile))
        grids.append(values.shape)
    grid = next((g for g in grids if g is not None), None)

    gap = 6
    legend_rows = -(-len(present) // 3)
    top = (ROW_HEIGHT + 2 if title else 0) + ROW_HEIGHT
    canvas = Image.new("RGB", (len(tiles) * size[0] + (len(tiles) - 1) * gap,
                               top + PANEL_HEIGHT + 4 + legend_rows * ROW_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 2), title, fill=(0, 0, 0))
    for k, (name, tile) in enumerate(tiles):
        x = k * (size[0] + gap)
        draw.text((x + 2, top - ROW_HEIGHT + 1), name, fill=(0, 0, 0))
        canvas.paste(tile, (x, top))
        if grid is not None:
            grid_lines(draw, (x + box[0], top + box[1], x + box[2], top + box[3]), grid)
    draw_legend(canvas, top + PANEL_HEIGHT + 4,
                [(tuple(int(v) for v in palette[c]), class_name(teacher.class_names, c))
                 for c in present], columns=3)
    return png_bytes(canvas)


def grid_lines(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int],
               grid: tuple[int, int]) -> None:
    x1, y1, x2, y2 = box
    for i in range(grid[0] + 1):
        y = y1 + round(i * (y2 - y1) / grid[0])
        draw.line((x1, y, x2, y), fill=(255, 255, 255), width=1)
    for j in range(grid[1] + 1):
        x = x1 + round(j * (x2 - x1) / grid[1])
        draw.line((x, y1, x, y2), fill=(255, 255, 255), width=1)
