"""RandAugment whose geometric ops move the token labels with the image, and random erasing.

The published LV-ViT recipe trains with timm's ``rand-m9-mstd0.5-inc1``: per image, 2 ops drawn
with replacement from 15, each applied with probability 0.5 at a magnitude drawn from N(9, 0.5)
on a 0-10 scale, the "increasing" variants (a larger magnitude is always a stronger change).
Rotate, ShearX/Y and TranslateX/Y move pixels, so the token labels must move with them: here all
geometric ops of an image compose into one affine map ``theta`` (output -> input, in
``affine_grid``'s normalised coordinates of the crop), which warps the image once (after its
colour ops) and, on the device, the patch-token targets with the same ``theta``
(:func:`warp_maps`): the labels cannot drift from the pixels, whatever the op. Outside the
image (the grey fill) the labels are those of the nearest token, as for crops outside the label
grid. The class-token target stays the crop's (the ops keep most of the crop).

Differences from timm's implementation, by choice: geometric ops pivot on the image centre (timm
shears and translates about the top-left corner, which differs only by a translation) and the
image is resampled once, bilinearly, for all of them. Every random draw comes from the stream's
generator, so a resumed run replays the same augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

COLOUR_OPS = ("AutoContrast", "Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd",
              "Color", "Contrast", "Brightness", "Sharpness")
GEOMETRIC_OPS = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
OPS = COLOUR_OPS + GEOMETRIC_OPS
IDENTITY_THETA = torch.eye(3)[:2]  # no geometric op: [2, 3], output -> input


@dataclass(frozen=True)
class RandAugmentConfig:
    """``rand-m9-mstd0.5-inc1`` by default."""

    num_ops: int = 2
    magnitude: float = 9.0  # of 10
    magnitude_std: float = 0.5
    prob: float = 0.5  # each drawn op is applied with this probability
    fill: tuple[int, int, int] = (124, 116, 104)  # the ImageNet mean, as timm fills


@dataclass
class Augmentation:
    """One image's draws: the colour ops ``(name, level in [-1, 1])`` in order, and the affine
    map of its geometric ops."""

    colour: list[tuple[str, float]]
    theta: torch.Tensor  # [2, 3] float32, output -> input, normalised coordinates


def sample_rand_augment(config: RandAugmentConfig, generator: torch.Generator) -> Augmentation:
    """Draw one image's ops (a fixed number of draws whatever is chosen, for resumable order)."""
    colour: list[tuple[str, float]] = []
    theta = torch.eye(3, dtype=torch.float64)
    for _ in range(config.num_ops):
        op = OPS[int(torch.randint(len(OPS), (), generator=generator))]
        apply, sign = torch.rand(2, generator=generator).tolist()
        magnitude = config.magnitude + config.magnitude_std * float(
            torch.randn((), generator=generator))
        level = min(max(magnitude, 0.0), 10.0) / 10 * (1 if sign < 0.5 else -1)
        if apply >= config.prob:
            continue
        if op in GEOMETRIC_OPS:
            theta = theta @ geometric_map(op, level)
        else:
            colour.append((op, level))
    return Augmentation(colour, theta[:2].float())


def geometric_map(op: str, level: float) -> torch.Tensor:
    """3x3 output -> input map of one op in normalised coordinates (x, y in [-1, 1]); ``level``
    in [-1, 1]: 30 degrees of rotation, a shear of 0.3, a translation of 45 % of the side at 1."""
    m = torch.eye(3, dtype=torch.float64)
    if op == "Rotate":
        a = math.radians(30 * level)
        m[:2, :2] = torch.tensor([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    elif op == "ShearX":
        m[0, 1] = 0.3 * level
    elif op == "ShearY":
        m[1, 0] = 0.3 * level
    elif op == "TranslateX":
        m[0, 2] = -2 * 0.45 * level  # the content moves by +45 % of the width at level 1
    elif op == "TranslateY":
        m[1, 2] = -2 * 0.45 * level
    else:
        raise ValueError(f"not a geometric op: {op!r}")
    return m


def apply_colour(pixels: torch.Tensor, op: str, level: float) -> torch.Tensor:
    """One colour op on uint8 ``[3, H, W]`` (torchvision's implementations; the magnitudes of
    timm's increasing variants)."""
    strength = abs(level)
    if op == "AutoContrast":
        return TF.autocontrast(pixels)
    if op == "Equalize":
        return TF.equalize(pixels)
    if op == "Invert":
        return TF.invert(pixels)
    if op == "Posterize":
        return TF.posterize(pixels, max(1, 4 - int(strength * 4)))
    if op == "Solarize":
        return TF.solarize(pixels, 256 - int(strength * 256))
    if op == "SolarizeAdd":
        added = (pixels.int() + int(strength * 110)).clamp(0, 255).to(torch.uint8)
        return torch.where(pixels < 128, added, pixels)
    factor = 1 + 0.9 * level  # Color, Contrast, Brightness, Sharpness
    if op == "Color":
        return TF.adjust_saturation(pixels, factor)
    if op == "Contrast":
        return TF.adjust_contrast(pixels, factor)
    if op == "Brightness":
        return TF.adjust_brightness(pixels, factor)
    if op == "Sharpness":
        return TF.adjust_sharpness(pixels, factor)
    raise ValueError(f"unknown op {op!r}")


def warp_maps(maps: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor | None = None
              ) -> torch.Tensor:
    """Warp ``[B, C, H, W]`` (float) by ``theta`` ``[B, 2, 3]`` (output -> input, normalised,
    ``align_corners=False``), bilinearly. Outside the input: ``fill`` ``[C]`` when given (the
    image's grey), else the nearest border value (the labels' rule)."""
    grid = F.affine_grid(theta.to(maps.device, maps.dtype), list(maps.shape),
                         align_corners=False)
    if fill is None:
        return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)
    fill = fill.to(maps.device, maps.dtype).view(1, -1, 1, 1)
    return F.grid_sample(maps - fill, grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False) + fill


def augment_image(pixels: torch.Tensor, augmentation: Augmentation,
                  config: RandAugmentConfig) -> torch.Tensor:
    """uint8 ``[3, H, W]``: the colour ops in order, then one warp by the geometric map."""
    for op, level in augmentation.colour:
        pixels = apply_colour(pixels, op, level)
    if torch.equal(augmentation.theta, IDENTITY_THETA):
        return pixels
    warped = warp_maps(pixels[None].float(), augmentation.theta[None],
                       torch.tensor(config.fill, dtype=torch.float32))[0]
    return warped.round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class EraseBox:
    top: int
    left: int
    height: int
    width: int
    seed: int  # of the noise that fills it


def sample_erase(size: int, prob: float, generator: torch.Generator,
                 scale: tuple[float, float] = (0.02, 1 / 3),
                 ratio: tuple[float, float] = (0.3, 3.3), attempts: int = 10) -> EraseBox | None:
    """Random erasing's rectangle (timm's defaults: 2-33 % of the area, aspect 0.3-3.3, up to
    10 attempts), or None; always the same number of draws."""
    draws = torch.rand(1 + 4 * attempts, generator=generator).tolist()
    seed = int(torch.randint(2**31 - 1, (), generator=generator))
    if draws[0] >= prob:
        return None
    for k in range(attempts):
        a, r, y, x = draws[1 + 4 * k: 5 + 4 * k]
        area = size * size * (scale[0] + a * (scale[1] - scale[0]))
        aspect = math.exp(math.log(ratio[0]) + r * (math.log(ratio[1]) - math.log(ratio[0])))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < h < size and 0 < w < size:
            return EraseBox(int(y * (size - h)), int(x * (size - w)), h, w, seed)
    return None


def erase(pixels: torch.Tensor, box: EraseBox) -> torch.Tensor:
    """Fill ``box`` of uint8 ``[3, H, W]`` with per-pixel noise (timm's ``mode="pixel"``: the
    labels keep what the erased pixels showed, as in the published recipe)."""
    noise = torch.randint(0, 256, (3, box.height, box.width), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(box.seed))
    out = pixels.clone()
    out[:, box.top:box.top + box.height, box.left:box.left + box.width] = noise
    return out
