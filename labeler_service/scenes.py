"""Synthetic scenes with exact per-pixel ground truth: an ImageFolder plus one class mask per image.

Each image shows one large MAIN object of its folder's class and up to three smaller DISTRACTOR
objects of other classes, on a background split into flat and textured regions. A class is a
(shape, texture) pair; colours are random per object, so only shape and texture tell classes
apart. Beside every ``<index>.jpg`` lies ``<index>.mask.npz`` (key ``mask``, int8 [H, W]: the class
index of the object visible at each pixel, -1 for background), and ``scenes.json`` at the root
describes every image and object. The format is documented in ``docs/scenes-format.md``.

Rendering is vectorised numpy over each object's bounding box (analytic shape tests in the
object's rotated frame, built from half-planes, floors and polynomials: no trigonometric array
functions, which are slow). Each object is painted into the RGB pixels and into the mask
through the same boolean array, so the two agree exactly before JPEG compression. Image ``i``
depends only on ``(seed, i)``.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
from PIL import Image

from storage import ImageStatus, Store, StoreError
from storage.images import ImageRejected, open_regular

FORMAT = "tokenlabel-scenes"
FORMAT_VERSION = 1

# Sorted: an ImageFolder scan sorts directory names, and a class's index in the masks is its
# position here. Every class is a unique (shape, texture) pair.
SCENE_CLASSES: tuple[str, ...] = (
    "banded-frame",  # square frame: an outer and an inner band in the two colours
    "checker-square",  # square (or mild rectangle): checkerboard aligned with its sides
    "dotted-disc",  # disc (or mild ellipse): a square lattice of round dots
    "grid-hexagon",  # regular hexagon: a grid of lines
    "plain-cross",  # plus sign: one flat colour with an outline in the other
    "segmented-ring",  # thick annulus: alternating angular segments (a life buoy)
    "striped-triangle",  # equilateral triangle: straight stripes at a random angle
    "sunburst-star",  # five-pointed star: ten alternating wedges from the centre
    "wavy-heart",  # heart: wavy stripes at a random angle
    "zigzag-arrow",  # block arrow: zigzag (chevron) stripes at a random angle
)
assert list(SCENE_CLASSES) == sorted(SCENE_CLASSES)

JPEG_QUALITY = 90
MASK_KEY = "mask"
MASK_SUFFIX = ".mask.npz"
SIZE_RANGE = (96, 192)  # width and height, each, inclusive
MAIN_SIZE = (0.5, 0.75)  # main object's nominal extent, as a share of the short side
DISTRACTOR_SIZE = (0.3, 0.45)
DISTRACTOR_COUNT_P = (0.15, 0.3, 0.3, 0.25)  # P(0), P(1), P(2), P(3) distractors requested
MAX_MAIN_COVERED = 0.25  # distractors together hide at most this share of the main object
MAX_DISTRACTOR_OVERLAP = 0.1  # of the smaller one's pixels, between two distractors
MIN_LUMA_GAP = 40.0  # object colour vs the local background's luminance
MIN_TEXTURE_GAP = 50.0  # between an object's two colours
MIN_PERIOD = 8.0  # texture period bounds, pixels
MAX_PERIOD = 20.0

_NAME_RE = re.compile(r"^\d{5,}(\.jpg|\.mask\.npz)$")
_NOISE_SLACK = 64


class Scene(NamedTuple):
    """One rendered scene, before JPEG: ``image`` RGB, ``mask`` int8 [H, W], ``info`` its record
    in scenes.json (without ``path``); each object there lists its two ``colors``."""

    image: Image.Image
    mask: np.ndarray
    info: dict[str, Any]


# --- shapes and textures -------------------------------------------------------------------------


class _Frame(NamedTuple):
    """An object's pixel grid: offsets of the pixel centres from the object's centre, as a row
    ``dx`` [1, w] and a column ``dy`` [h, 1] (float32), its rotation and half extents. Any
    linear coordinate costs one array operation (``along``)."""

    dx: np.ndarray
    dy: np.ndarray
    theta: float
    hx: float  # half extents along the object's own axes, pixels
    hy: float

    def along(self, angle: float, scale: float, offset: float = 0.0) -> np.ndarray:
        """``scale`` x (the position along the axis at ``angle`` from the object's u axis)
        + ``offset``. The object's u axis is ``along(0, 1)``, its v axis ``along(pi / 2, 1)``."""
        a = self.theta + angle
        return ((self.dx * (math.cos(a) * scale) + offset)
                + self.dy * (math.sin(a) * scale))


_V = math.pi / 2  # the object's v axis (image y when unrotated)


def _frac(a: np.ndarray) -> np.ndarray:
    return a - np.floor(a)


def _sectors(f: _Frame, lines: int, phase: float) -> np.ndarray:
    """Alternating sectors of angle pi / lines around the centre, in the object's normalised
    frame (XOR of the sides of ``lines`` lines through the centre)."""
    odd = None
    for k in range(lines):
        a = phase + math.pi * k / lines  # the line's direction in normalised coordinates
        nx, ny = -math.sin(a) / f.hx, math.cos(a) / f.hy  # its normal, back in pixels
        side = f.along(math.atan2(ny, nx), math.hypot(nx, ny)) > 0
        odd = side if odd is None else odd ^ side
    return odd


def _star(x: np.ndarray, y: np.ndarray, inner: float) -> tuple[np.ndarray, np.ndarray]:
    """Inside a five-pointed star with tips at radius 1 (one pointing up, image y downwards)
    and inner vertices at radius ``inner``, and its ten alternating wedges.

    The star's five mirror lines (through the tips) fold every point into the wedge between a
    tip (90 degrees) and an inner vertex (54 degrees): mirror at 90, 18, 90, 54 degrees, each
    only where the point lies on the wrong side. There the star is the origin's side of one
    edge. Every mirror swaps the two colours of the wedges it separates, so a point's wedge
    colour is the parity of the mirrors applied to it.
    """
    odd = x < 0
    fx, fy = np.abs(x), -y  # mathematical orientation, tip on +y
    for angle in (18, 54):
        nx, ny = -math.sin(math.radians(angle)), math.cos(math.radians(angle))
        d = fx * nx + fy * ny
        flip = d < 0
        odd ^= flip
        d = np.minimum(d, 0) * 2
        fx, fy = fx - d * nx, fy - d * ny
        if angle == 18:
            odd ^= fx < 0
            fx = np.abs(fx)
    qx, qy = inner * math.cos(math.radians(54)), inner * math.sin(math.radians(54))
    # cross(Q - T, P - T) <= 0 with the tip T = (0, 1): the origin's side of the edge T-Q
    return fy * qx - fx * (qy - 1) <= qx, odd


def _silhouette(kind: str, f: _Frame, p: dict[str, float]) -> np.ndarray:
    """The class's silhouette over the frame's pixels. Every shape fits in the box
    [-hx, hx] x [-hy, hy] of the object's own axes; x, y below are normalised to [-1, 1]."""
    if kind == "banded-frame":
        au, av = np.abs(f.along(0, 1)), np.abs(f.along(_V, 1))
        inside = (au <= f.hx) & (av <= f.hy)
        hole = (au < f.hx - p["band"]) & (av < f.hy - p["band"])
        return inside & ~hole
    x, y = f.along(0, 1 / f.hx), f.along(_V, 1 / f.hy)
    if kind == "checker-square":
        return (np.abs(x) <= 1) & (np.abs(y) <= 1)
    if kind == "dotted-disc":
        return x * x + y * y <= 1
    if kind == "grid-hexagon":  # vertices at radius 1 on the x axis
        ax, ay = np.abs(x), np.abs(y)
        apothem = math.cos(math.pi / 6)
        return (ay <= apothem) & (ax * apothem + ay * 0.5 <= apothem)
    if kind == "plain-cross":
        w = p["arm"]
        ax, ay = np.abs(x), np.abs(y)
        return ((ax <= 1) & (ay <= w)) | ((ax <= w) & (ay <= 1))
    if kind == "segmented-ring":
        r2 = x * x + y * y
        return (r2 <= 1) & (r2 >= p["inner"] ** 2)
    if kind == "striped-triangle":
        # pointing up, width 2, height sqrt(3), centred on its box: the centroid lies 0.2887
        # below the box centre; base and slanted edges at the apothem 1 / sqrt(3)
        yc = y - 0.2887
        apothem = 1 / math.sqrt(3)
        return (yc <= apothem) & (np.abs(x) * math.cos(math.pi / 6)
                                  - yc * 0.5 <= apothem)
    if kind == "wavy-heart":
        # (x^2 + y^2 - 1)^3 <= x^2 y^3 (y up), scaled by 1.15 and centred on its box
        xs = x * 1.15
        ys = 0.12 - y * 1.15
        x2, y2 = xs * xs, ys * ys
        a = x2 + y2 - 1
        return a * a * a <= x2 * y2 * ys
    if kind == "zigzag-arrow":
        ay = np.abs(y)
        shaft = (x >= -1) & (x <= 0.05) & (ay <= p["shaft"])
        head = (x >= 0) & (ay <= 0.85 - x * 0.85)
        return shaft | head
    raise ValueError(f"unknown scene class {kind!r}")


def _shape(kind: str, f: _Frame, p: dict[str, float]) -> tuple[np.ndarray, np.ndarray | None]:
    """The silhouette, and the texture where it comes for free with it (the star's wedges)."""
    if kind == "sunburst-star":
        return _star(f.along(0, 1 / f.hx), f.along(_V, 1 / f.hy), p["inner"])
    return _silhouette(kind, f, p), None


def _texture(kind: str, f: _Frame, p: dict[str, float]) -> np.ndarray:
    """Where the object shows its second colour (only meaningful inside its shape; not the
    star's, which comes from ``_shape``)."""
    if kind == "banded-frame":  # the outer half of the band
        au, av = np.abs(f.along(0, 1)), np.abs(f.along(_V, 1))
        half = 0.5 * p["band"]
        return (au >= f.hx - half) | (av >= f.hy - half)
    if kind == "plain-cross":  # an outline: within ``outline`` pixels of the edge
        au, av = np.abs(f.along(0, 1)), np.abs(f.along(_V, 1))
        w, ax, ay = p["outline"], p["arm"] * f.hx, p["arm"] * f.hy
        core = (((au <= f.hx - w) & (av <= ay - w)) | ((au <= ax - w) & (av <= f.hy - w)))
        return ~core
    if kind == "segmented-ring":
        return _sectors(f, int(p["segments"]) // 2, p["phase_a"])
    inv = 1 / p["period"]
    angle = p.get("angle", 0.0)  # stripes and waves run at their own angle
    if kind == "striped-triangle":
        return _frac(f.along(angle + _V, inv, p["phase_v"])) < 0.5
    tu = f.along(angle, inv, p["phase_u"])  # in periods
    tv = f.along(angle + _V, inv, p["phase_v"])
    if kind == "checker-square":  # cells of half a period: odd(2 tu) xor odd(2 tv)
        return (_frac(tu) >= 0.5) ^ (_frac(tv) >= 0.5)
    if kind == "dotted-disc":
        du, dv = _frac(tu) - 0.5, _frac(tv) - 0.5
        return du * du + dv * dv <= (0.32**2)
    if kind == "grid-hexagon":
        w = max(2.0 * inv, 0.28)
        return (_frac(tu) < w) | (_frac(tv) < w)
    if kind == "wavy-heart":
        g = _frac(tu * (1 / 2.5)) * 2 - 1
        # a parabolic sine of wavelength 2.5 periods and amplitude 0.4 periods
        return _frac(tv + g * (1.6 - np.abs(g) * 1.6)) < 0.5
    if kind == "zigzag-arrow":  # a triangle wave of wavelength 1.6 periods, amplitude 0.45
        tri = np.abs(_frac(tu * (1 / 1.6)) - 0.5)
        return _frac(tv + tri * 1.8) < 0.5
    raise ValueError(f"unknown scene class {kind!r}")


def _params(kind: str, size: float, rng: np.random.Generator) -> dict[str, float]:
    """Per-object shape and texture parameters; ``size`` is the nominal extent in pixels."""
    d = rng.random(6).tolist()
    p = {
        "period": min(MAX_PERIOD, max(MIN_PERIOD, size / (5.0 + 2.0 * d[0]))),
        "phase_u": d[1],
        "phase_v": d[2],
    }
    if kind == "banded-frame":
        p["band"] = max(4.0, (0.22 + 0.08 * d[3]) * size)
    elif kind == "plain-cross":
        p["arm"] = 0.3 + 0.1 * d[3]
        p["outline"] = max(2.0, 0.07 * size)
    elif kind == "segmented-ring":
        p["inner"] = 0.5 + 0.1 * d[3]
        p["segments"] = float(6 + 2 * int(d[4] * 3))
        p["phase_a"] = d[5] * math.pi
    elif kind == "sunburst-star":
        p["inner"] = 0.45 + 0.07 * d[3]
    elif kind in ("striped-triangle", "wavy-heart", "zigzag-arrow"):
        p["angle"] = d[3] * 2 * math.pi
        if kind == "zigzag-arrow":
            p["shaft"] = 0.25 + 0.07 * d[4]
    return p


class _Geometry(NamedTuple):
    cx: float
    cy: float
    hx: float  # half extents, pixels
    hy: float
    theta: float
    size: float  # nominal extent, pixels


def _geometry(rng: np.random.Generator, width: int, height: int, size_range: tuple[float, float],
              margin: float) -> _Geometry:
    """Size (a share of the short side), aspect in 0.8..1.25, any rotation, and a centre that
    keeps at least ``margin`` of the rotated box's half extents inside the image (the object is
    shrunk where its box would not fit)."""
    d = rng.random(5).tolist()
    size = (size_range[0] + d[0] * (size_range[1] - size_range[0])) * min(width, height)
    aspect = math.sqrt(0.8 + d[1] * 0.45)
    hx, hy = 0.5 * size * aspect, 0.5 * size / aspect
    theta = d[2] * 2 * math.pi
    c, s = abs(math.cos(theta)), abs(math.sin(theta))
    bx, by = hx * c + hy * s, hx * s + hy * c
    fit = min(1.0, 0.5 * width / (margin * bx), 0.5 * height / (margin * by))
    hx, hy, bx, by, size = hx * fit, hy * fit, bx * fit, by * fit, size * fit
    cx = margin * bx + d[3] * (width - 2 * margin * bx)
    cy = margin * by + d[4] * (height - 2 * margin * by)
    return _Geometry(cx, cy, hx, hy, theta, size)


class _Placed(NamedTuple):
    """An object's pixels: the box ``[y0:y1, x0:x1]`` of the canvas, its shape there, and its
    frame (for the texture)."""

    y0: int
    y1: int
    x0: int
    x1: int
    shape: np.ndarray  # bool [y1 - y0, x1 - x0]
    pattern: np.ndarray | None  # the texture, where _shape made it already
    frame: _Frame


def _place(kind: str, g: _Geometry, p: dict[str, float], width: int, height: int
           ) -> _Placed | None:
    """Rasterise the shape over its rotated bounding box, clipped to the canvas; pixel (i, j)
    is inside when its centre (j + 0.5, i + 0.5) is."""
    c, s = abs(math.cos(g.theta)), abs(math.sin(g.theta))
    bx, by = g.hx * c + g.hy * s, g.hx * s + g.hy * c
    x0, x1 = max(0, math.floor(g.cx - bx)), min(width, math.ceil(g.cx + bx) + 1)
    y0, y1 = max(0, math.floor(g.cy - by)), min(height, math.ceil(g.cy + by) + 1)
    if x1 <= x0 or y1 <= y0:
        return None
    dx = (np.arange(x0, x1, dtype=np.float32) + (0.5 - g.cx))[None, :]
    dy = (np.arange(y0, y1, dtype=np.float32) + (0.5 - g.cy))[:, None]
    frame = _Frame(dx, dy, g.theta, g.hx, g.hy)
    return _Placed(y0, y1, x0, x1, *_shape(kind, frame, p), frame=frame)


def _bbox(placed: _Placed) -> list[int]:
    """x1, y1, x2, y2 of the shape's pixels on the canvas (x2, y2 exclusive)."""
    cols = placed.shape.any(axis=0)
    rows = placed.shape.any(axis=1)
    return [placed.x0 + int(cols.argmax()), placed.y0 + int(rows.argmax()),
            placed.x1 - int(cols[::-1].argmax()), placed.y1 - int(rows[::-1].argmax())]


# --- colours and background ----------------------------------------------------------------------


def _with_luma(rgb: list[float], luma: float) -> list[int]:
    """A colour of luminance ``luma`` (to rounding) and of the hue of ``rgb``: ``rgb`` scaled
    towards black, or blended towards white."""
    r, g, b = rgb
    have = 0.299 * r + 0.587 * g + 0.114 * b
    if have > luma:
        k = luma / have
        return [min(255, round(r * k)), min(255, round(g * k)), min(255, round(b * k))]
    k = (255 - luma) / max(255 - have, 1e-6)
    return [max(0, round(255 - (255 - c) * k)) for c in rgb]


def _pick_colours(rng: np.random.Generator, refs: list[float]) -> list[list[int]]:
    """Two random colours ``[[r, g, b], [r, g, b]]`` whose luminances are at least
    MIN_TEXTURE_GAP apart and at least MIN_LUMA_GAP from every reference luminance (that margin
    shrinks in steps of 10 where such luminances are hard to find). The luminances are drawn
    uniformly among the allowed ones (by rejection), then the hues at random."""
    d = rng.random(70)  # 6 for the hues, then 64 luminance candidates
    lumas = d[6:] * 255
    near = np.abs(lumas[:, None] - np.array(refs)).min(axis=1) if refs else None
    pair = 0.0, 255.0  # where not one pair of candidates qualifies
    for margin in (MIN_LUMA_GAP, 30.0, 20.0, 10.0, 0.0):
        allowed: list[float] = []
        for luma in (lumas if near is None else lumas[near >= margin]).tolist():
            partner = next((a for a in allowed if abs(a - luma) >= MIN_TEXTURE_GAP), None)
            if partner is not None:
                pair = partner, luma
                break
            allowed.append(luma)
        else:
            continue
        break
    d = d[:6].tolist()
    return [_with_luma([v * 256 for v in d[0:3]], pair[0]),
            _with_luma([v * 256 for v in d[3:6]], pair[1])]


@functools.cache
def _noise_table(sigma: int) -> np.ndarray:
    """A fixed table of grey noise for packed pixels: round(N(0, sigma^2) clipped to +-4 sigma)
    times 0x010101, int32. Images take random crops of it (fresh noise per pixel would cost
    more than the rest of a scene)."""
    side = SIZE_RANGE[1] + _NOISE_SLACK
    table = np.random.default_rng(0x5CE7E5).standard_normal((side, side), dtype=np.float32)
    return np.rint(np.clip(table, -4, 4) * sigma).astype(np.int32) * np.int32(_GREY)


@functools.cache
def _spread(scale: int) -> np.ndarray:
    """[192, 192 / scale + 2] Gaussian weights (sigma half a cell) from grid cells of ``scale``
    pixels to pixel centres; the first n rows and n / scale + 2 columns serve n pixels."""
    n = SIZE_RANGE[1]
    cells = math.ceil(n / scale) + 2
    d = (np.arange(n, dtype=np.float32) + 0.5) * (1 / scale)
    d = d[:, None] + 1.0 - np.arange(cells, dtype=np.float32)[None, :]
    return np.exp((-2.0) * d * d)


def _smooth_noise(rng: np.random.Generator, width: int, height: int, scale: int,
                  amplitude: int) -> np.ndarray:
    """Blotchy noise, int32 [H, W] from 0 to ``amplitude`` (min to max; a negative amplitude
    counts down): uniform values on a grid of ``scale`` pixels, spread by a separable Gaussian
    kernel (two small matrix products), then stretched to the range."""
    spread = _spread(scale)
    ay = spread[:height, :math.ceil(height / scale) + 2]
    ax = spread[:width, :math.ceil(width / scale) + 2]
    grid = rng.random((ay.shape[1], ax.shape[1]), dtype=np.float32)
    t = (ay @ grid) @ ax.T
    lo, hi = float(t.min()), float(t.max())
    t -= lo
    out = np.empty(t.shape, dtype=np.int32)
    np.multiply(t, (amplitude + (0.5 if amplitude > 0 else -0.5)) / max(hi - lo, 1e-6), out=out,
                casting="unsafe")
    return out


class _Background(NamedTuple):
    packed: np.ndarray  # '<u4' [H, W]: R | G << 8 | B << 16
    region_ids: np.ndarray  # uint8 [H, W]: which region each pixel is in
    inside: list[np.ndarray]  # bool [H, W]: inside[r - 1] holds the pixels of regions >= r
    records: list[dict[str, Any]]
    refs: list[list[float]]  # per region, the luminances object colours must stand out from


_GREY = 0x010101  # adds one to each of R, G, B in a packed pixel


def _luma3(rgb: list[float]) -> float:
    """ITU-R BT.601 luma of an RGB colour."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _background(rng: np.random.Generator, width: int, height: int) -> _Background:
    """The canvas cut by 0-2 straight lines into 1-3 regions, each flat (one colour, at most
    tiny noise), blotchy (one colour lightened or darkened by smooth noise) or grain (fine grey
    noise).

    Region r > 0 is the part of region r - 1 on one side of cut r, so the pixels of regions
    >= r form a chain (``inside[r - 1]``) and a pixel's region id is how many of those hold it.
    Works on packed pixels: grain and blotches add the same integer to R, G and B (the base
    colour is kept far enough from 0 and 255 that nothing clips).
    """
    d = rng.random(12).tolist()
    n = 1 if d[0] < 0.1 else 2 if d[0] < 0.6 else 3
    inside: list[np.ndarray] = []  # inside[r - 1]: the pixels of regions >= r, r = 1..n-1
    areas = [width * height]  # of regions >= r
    if n > 1:
        xs = np.arange(width, dtype=np.float32) + 0.5
        ys = np.arange(height, dtype=np.float32)[:, None] + 0.5
        for r in range(1, n):
            px, py = (0.25 + 0.5 * d[3 * r]) * width, (0.25 + 0.5 * d[3 * r + 1]) * height
            a = d[3 * r + 2] * 2 * math.pi
            side = (ys - py) * math.sin(a) + (xs - px) * math.cos(a) > 0
            if inside:
                side &= inside[-1]
            inside.append(side)
            areas.append(int(np.count_nonzero(side)))
    sizes = [areas[r] - (areas[r + 1] if r + 1 < n else 0) for r in range(n)]
    order = sorted(range(n), key=lambda r: -sizes[r])
    kinds = [""] * n
    # The largest region is flat in 90 % of images; the second largest is textured; a third is
    # any of the three.
    kinds[order[0]] = "flat" if d[9] < 0.9 else ("blotchy" if d[10] < 0.6 else "grain")
    if n > 1:
        kinds[order[1]] = "blotchy" if d[11] < 0.6 else "grain"
    if n > 2:
        e = float(rng.random())
        kinds[order[2]] = "flat" if e < 0.35 else "blotchy" if e < 0.75 else "grain"

    packed = np.empty((height, width), dtype="<u4")
    records: list[dict[str, Any]] = []
    refs: list[list[float]] = []
    prev = None
    for r in range(n):
        kind = kinds[r]
        f = rng.random(18).tolist()
        noise = 0  # sigma of the grey noise, 0..255 units
        shift = 0  # blotches: how much lighter (darker) they get, grey levels
        if kind == "flat" and f[0] < 0.4:
            noise = 1
        elif kind == "grain":
            noise = 8 + int(f[1] * 11)
        elif kind == "blotchy":
            shift = int(50 + 50 * f[3]) * (1 if f[0] < 0.5 else -1)
        # keep the base colour far enough from 0 and 255 that nothing clips (the noise table is
        # clipped to +-4 sigma)
        lo, hi = 4 * noise + max(0, -shift), 255 - 4 * noise - max(0, shift)
        for k in range(6, 18, 3):  # up to 4 tries for a colour unlike the previous region's
            base = [lo + math.floor(v * (hi - lo + 1)) for v in f[k:k + 3]]
            if prev is None or sum(abs(x - y) for x, y in zip(base, prev, strict=True)) >= 60:
                break
        prev = base
        value = base[0] | base[1] << 8 | base[2] << 16
        if kind == "blotchy":
            scale = 10 + int(f[2] * 17)  # correlation length, pixels
            steps = _smooth_noise(rng, width, height, scale, shift)
            steps *= _GREY
            value = steps + value
            records.append({"kind": kind, "scale": scale, "shift": shift})
            refs.append([_luma3(base), _luma3(base) + shift])
        else:
            if noise:
                oy, ox = int(f[2] * (_NOISE_SLACK + 1)), int(f[3] * (_NOISE_SLACK + 1))
                value = _noise_table(noise)[oy:oy + height, ox:ox + width] + value
            records.append({"kind": kind, "noise": noise})
            refs.append([_luma3(base)])
        if r == 0:
            packed[...] = value
        else:
            np.copyto(packed, value, where=inside[r - 1], casting="unsafe")
    if n == 1:
        region_ids = np.zeros((height, width), dtype=np.uint8)
    else:
        region_ids = inside[0].view(np.uint8)
        if n > 2:
            region_ids = region_ids + inside[1].view(np.uint8)
    return _Background(packed, region_ids, inside, records, refs)


# --- scenes --------------------------------------------------------------------------------------


class _Canvas:
    """A scene being painted: packed RGB pixels and the class mask, written from the same
    boolean arrays, plus the record of every object painted."""

    def __init__(self, rng: np.random.Generator, width: int, height: int) -> None:
        self.rng = rng
        self.width, self.height = width, height
        self.bg = _background(rng, width, height)
        self.packed = self.bg.packed  # objects are painted over the background
        # Objects have distinct classes: the mask also tells which object is on top.
        self.mask = np.full((height, width), -1, dtype=np.int8)
        self.objects: list[dict[str, Any]] = []
        self.areas: list[int] = []
        self.main_lumas: list[float] = []

    def attempt(self, cls: int, size_range: tuple[float, float], margin: float
                ) -> tuple[_Placed | None, dict[str, float]]:
        g = _geometry(self.rng, self.width, self.height, size_range, margin)
        p = _params(SCENE_CLASSES[cls], g.size, self.rng)
        return _place(SCENE_CLASSES[cls], g, p, self.width, self.height), p

    def fits(self, placed: _Placed, covered: int) -> list[int] | None:
        """How many pixels of each object painted so far a distractor would hide, or None if
        it would hide too many of the main object's (``covered`` are hidden already) or
        overlap another distractor too much."""
        own = int(np.count_nonzero(placed.shape))
        if own == 0:
            return None
        under = self.mask[placed.y0:placed.y1, placed.x0:placed.x1][placed.shape]
        hits = []
        for i, (obj, area) in enumerate(zip(self.objects, self.areas, strict=True)):
            n = int(np.count_nonzero(under == obj["label"]))
            limit = MAX_MAIN_COVERED * area - covered if i == 0 \
                else MAX_DISTRACTOR_OVERLAP * min(own, area)
            if n > limit:
                return None
            hits.append(n)
        return hits

    def paint(self, cls: int, role: str, placed: _Placed, p: dict[str, float],
              hits: list[int] | None = None) -> None:
        """Paint an object; ``hits``: the pixels it hides of each earlier object (``fits``)."""
        box = (slice(placed.y0, placed.y1), slice(placed.x0, placed.x1))
        shape = placed.shape
        bg = self.bg
        if len(bg.refs) == 1:
            refs = list(bg.refs[0])
        else:
            present = np.bincount(bg.region_ids[box][::3, ::3].ravel(), minlength=len(bg.refs))
            refs = [lum for n, lums in zip(present.tolist(), bg.refs, strict=True) if n
                    for lum in lums]
        if hits and hits[0]:
            refs += self.main_lumas  # a distractor over the main object stands out from it too
        colours = _pick_colours(self.rng, refs)
        if not self.objects:
            self.main_lumas = [0.299 * r + 0.587 * g + 0.114 * b for r, g, b in colours]
        kind = SCENE_CLASSES[cls]
        second = placed.pattern if placed.pattern is not None else _texture(kind, placed.frame, p)
        (r0, g0, b0), (r1, g1, b1) = rgb = colours
        colour = np.where(second, np.uint32(r1 | g1 << 8 | b1 << 16),
                          np.uint32(r0 | g0 << 8 | b0 << 16))
        np.copyto(self.packed[box], colour, where=shape)
        np.copyto(self.mask[box], np.int8(cls), where=shape)
        area = int(np.count_nonzero(shape))
        for obj, n in zip(self.objects, hits or (), strict=True):
            obj["visible"] -= n
        self.areas.append(area)
        self.objects.append({"class": kind, "label": cls, "role": role, "bbox": _bbox(placed),
                             "pixels": area, "visible": area, "colors": rgb})

    def finish(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The object records and the background records, completed."""
        for obj in self.objects:
            obj["colors"] = obj.pop("colors")  # last: readers mostly want the geometry
        off = self.mask < 0
        at_least = [int(np.count_nonzero(off))]  # background pixels in regions >= r
        at_least += [int(np.count_nonzero(m & off)) for m in self.bg.inside]
        at_least.append(0)
        for r, record in enumerate(self.bg.records):
            record["pixels"] = at_least[r] - at_least[r + 1]
        return self.objects, self.bg.records


def render_scene(index: int, seed: int = 0,
                 num_classes: int = len(SCENE_CLASSES)) -> Scene:
    """Render image ``index`` of the dataset made with ``seed``, in memory and before JPEG.

    Its class is ``index % num_classes`` (of the first ``num_classes`` of SCENE_CLASSES); it
    depends on nothing but ``(seed, index, num_classes)``.
    """
    packed, mask, info = _render(index, seed, num_classes)
    image = Image.frombytes("RGB", (info["width"], info["height"]), packed.tobytes(), "raw",
                            "RGBX")
    return Scene(image, mask, info)


def _render(index: int, seed: int, num_classes: int
            ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``render_scene`` with the pixels packed: '<u4' [H, W], R | G << 8 | B << 16."""
    if not 2 <= num_classes <= len(SCENE_CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(SCENE_CLASSES)}, got {num_classes}")
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.random(2) * (SIZE_RANGE[1] - SIZE_RANGE[0] + 1)
                     + SIZE_RANGE[0])
    label = index % num_classes
    canvas = _Canvas(rng, width, height)

    placed, p = canvas.attempt(label, MAIN_SIZE, margin=0.95)  # fully or mostly inside
    assert placed is not None
    canvas.paint(label, "main", placed, p)

    d = rng.random(2)
    count = int(np.searchsorted(np.cumsum(DISTRACTOR_COUNT_P), d[0] * 0.999999))
    others = [c for c in range(num_classes) if c != label]
    covered = 0
    for cls in rng.permutation(others)[:count].tolist():
        for _ in range(10):  # a few tries to place it; else it is left out
            placed, p = canvas.attempt(cls, DISTRACTOR_SIZE, margin=0.7)
            hits = None if placed is None else canvas.fits(placed, covered)
            if hits is not None:
                covered += hits[0]
                canvas.paint(cls, "distractor", placed, p, hits)
                break

    objects, background = canvas.finish()
    info = {
        "width": width, "height": height, "class": SCENE_CLASSES[label], "label": label,
        "objects": objects, "background": background,
    }
    return canvas.packed, canvas.mask, info


# --- files ---------------------------------------------------------------------------------------


def mask_path(image_path: Path) -> Path:
    """``<dir>/<index>.jpg`` -> ``<dir>/<index>.mask.npz``."""
    image_path = Path(image_path)
    return image_path.parent / (image_path.stem + MASK_SUFFIX)


class MaskRejected(ValueError):
    """A mask file that cannot be used. ``kind``: ``unreadable`` (not a regular file, outside
    its folder, not a mask archive, not int8 [H, W]), ``other_size`` (not the image's height and
    width) or ``unknown_class`` (a value that is neither -1 nor a class index)."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


def load_mask(image_path: Path, shape: tuple[int, int] | None = None,
              num_classes: int | None = None, root: Path | None = None) -> np.ndarray:
    """The int8 [H, W] class mask of an image (-1: background).

    The file is opened as images are (``storage.images.open_regular``: a regular file only,
    opened without blocking, and with ``root`` nowhere outside it), and read through the zip
    archive's index: its ``.npy`` header is checked before anything else is read: int8,
    two-dimensional and, with ``shape``, the image's (height, width), so a member claiming
    gigabytes, stored or deflated, costs nothing. With
    ``num_classes``, every value must be -1 or below it. Raises FileNotFoundError when there is
    no mask, MaskRejected when there is one that cannot be used.
    """
    path = mask_path(image_path)
    try:
        archive = open_regular(path, root)
    except ImageRejected as e:
        if e.status == ImageStatus.MISSING_FILE:
            raise FileNotFoundError(f"{path}: no mask") from None
        raise MaskRejected("unreadable", e.reason) from None
    with archive:
        mask = unpack_mask(archive, path, shape)
    if num_classes is not None and mask.size:
        low, high = int(mask.min()), int(mask.max())
        if low < -1 or high >= num_classes:
            raise MaskRejected("unknown_class", f"{path}: class value {low if low < -1 else high} "
                                                f"is outside -1..{num_classes - 1}")
    return mask


def unpack_mask(data: BinaryIO, path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """The mask in a ``.mask.npz`` (an open file): its ``mask.npy`` member's header first, then
    exactly the bytes that header promises (checked as :func:`load_mask` says)."""
    try:
        with zipfile.ZipFile(data) as archive, \
                archive.open(MASK_KEY + ".npy") as member:
            version = np.lib.format.read_magic(member)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f".npy format version {version}")
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            found, fortran_order, dtype = read_header(member)
            if dtype != np.int8 or len(found) != 2:
                raise MaskRejected("unreadable", f"{path}: a {dtype} array of shape "
                                                 f"{list(found)}, not an int8 [H, W] mask")
            if shape is not None and tuple(found) != tuple(shape):
                raise MaskRejected("other_size", f"{path}: {found[1]}x{found[0]}, not the "
                                                 f"image's {shape[1]}x{shape[0]}")
            body = member.read(found[0] * found[1])
    except MaskRejected:
        raise
    except Exception as e:  # zipfile, zlib and numpy raise many kinds for a damaged file
        raise MaskRejected("unreadable", f"{path}: not a mask archive ({type(e).__name__}: "
                                         f"{str(e)[:200]})") from None
    if len(body) != found[0] * found[1]:
        raise MaskRejected("unreadable", f"{path}: its mask is cut short")
    return np.frombuffer(body, np.int8).reshape(found, order="F" if fortran_order else "C")


@functools.lru_cache(maxsize=4096)
def _npy_header(shape: tuple[int, ...]) -> bytes:
    """The .npy (format 1.0) header of a C-ordered int8 array of ``shape``."""
    header = f"{{'descr': '|i1', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (-(len(header) + 11) % 64) + "\n"  # 10 magic+length bytes, then aligned
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()


def mask_bytes(mask: np.ndarray, level: int = 1) -> bytes:
    """The .npz bytes of a mask: a zip archive with one deflated member ``mask.npy``, what
    ``np.load(path)["mask"]`` reads. Written directly: with a fixed timestamp (np.savez_compressed
    stamps the current time, so rewriting would change the bytes) and zlib's run-length strategy
    at ``level`` (masks are long runs: ~5x faster than savez_compressed, files ~10 % larger)."""
    mask = np.asarray(mask)
    if mask.dtype != np.int8 or mask.ndim != 2:
        raise ValueError("a mask is an int8 [H, W] array")
    header = _npy_header(mask.shape)
    body = np.ascontiguousarray(mask).data
    packer = zlib.compressobj(level, zlib.DEFLATED, -15, 8, zlib.Z_RLE)  # raw deflate, as in zip
    data = packer.compress(header) + packer.compress(body) + packer.flush()
    crc = zlib.crc32(body, zlib.crc32(header))
    size = len(header) + mask.size
    name = (MASK_KEY + ".npy").encode()
    dos_time, dos_date = 0, (1980 - 1980) << 9 | 1 << 5 | 1  # 1980-01-01 00:00:00
    # version needed 2.0, flags 0, method 8 (deflate)
    common = struct.pack("<HHHHHIII", 20, 0, 8, dos_time, dos_date, crc, len(data), size)
    local = b"PK\x03\x04" + common + struct.pack("<HH", len(name), 0) + name
    central = (b"PK\x01\x02" + struct.pack("<H", 20) + common
               # name length, extra, comment, disk, internal and external attributes, offset
               + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, 0) + name)
    end = b"PK\x05\x06" + struct.pack("<HHHHIIH", 0, 0, 1, 1, len(central),
                                          len(local) + len(data), 0)
    return local + data + central + end


def check_scenes_folder(root: Path, wanted: dict[str, Any], store: Store | None,
                        replace: bool = False) -> None:
    """Refuse (ScenesFolderRefused) to make the scenes ``wanted`` (seed, num_images, classes)
    in ``root`` where that would write over files this module did not make, or delete or
    change earlier scenes: always where a dataset registered in ``store`` holds them, and
    unless ``replace`` otherwise (a store this command was not shown may hold one)."""
    if not root.is_dir() or not any(root.iterdir()):
        return  # new or empty: nothing to lose
    made = scenes_header(root)
    if made is None:
        raise ScenesFolderRefused(
            f"{root} is not empty and holds no scenes made by `labeler sample scenes` (no "
            f"{FORMAT} scenes.json): nothing there is written over; choose a new or empty folder")
    if all(made.get(k) == v for k, v in wanted.items()):
        return  # the very same scenes: rewritten byte for byte
    change = (f"{root} holds {made.get('num_images')} scenes (seed {made.get('seed')}, "
              f"{len(made.get('classes') or [])} classes): making {wanted['num_images']} scenes "
              f"with seed {wanted['seed']} and {len(wanted['classes'])} classes there would "
              "delete or change them")
    users = datasets_registered_from(store, root) if store is not None else []
    if users:
        raise ScenesFolderRefused(f"{change}, and dataset {users[0]!r} of store "
                                  f"{store.location} was registered from them; choose another "
                                  "folder")
    if not replace:
        raise ScenesFolderRefused(f"{change}, and a dataset registered from them (in a store "
                                  "not given here) would no longer match its images; choose "
                                  "another folder, or pass --replace to remake them")


def scenes_header(root: Path) -> dict[str, Any] | None:
    """The header of ``root/scenes.json`` (everything but the per-image records) when it
    describes scenes made here, else None."""
    try:
        header = json.loads((root / "scenes.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        return None
    return {k: v for k, v in header.items() if k != "images"}


def datasets_registered_from(store: Store, folder: Path) -> list[str]:
    """The datasets of ``store`` whose images are under ``folder``, or whose folder holds it.
    (A registration still in progress has no folder recorded yet: it cannot be seen.)"""
    here = Path(folder).resolve()
    found = []
    for name in store.dataset_names():
        try:
            source = Path(store.dataset(name).source_root)
        except StoreError:
            continue
        if here == source or here in source.parents or source in here.parents:
            found.append(name)
    return found


def _json_text(header: dict[str, Any], records: list[dict[str, Any]]) -> str:
    """scenes.json: the header fields, then ``images`` with one compact record per line."""
    head = json.dumps(header, indent=1)[:-2]  # drop the closing "\n}"
    lines = ",\n".join("  " + json.dumps(r, separators=(",", ":")) for r in records)
    return f'{head},\n "images": [\n{lines}\n ]\n}}\n'


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


class ScenesFolderRefused(ValueError):
    """``make_scenes`` would write over or delete what it must not: files it did not make, or
    the images of a registered dataset."""


def make_scenes(root: Path, images: int = 1000, seed: int = 0,
                num_classes: int = len(SCENE_CLASSES), store: Store | None = None,
                replace: bool = False) -> Path:
    """Write ``images`` scenes as an ImageFolder ``root/<class>/<index:05d>.jpg`` with masks
    beside them and ``root/scenes.json``; return ``root``.

    Image ``i`` has class ``i % num_classes`` and is ``render_scene(i, seed, num_classes)``.
    ``root`` must be new, empty, or hold scenes this function made (its ``scenes.json``): it
    never writes into a folder of other files. Writing over an earlier run gives identical
    bytes for identical arguments. Other scenes are made over earlier ones only with
    ``replace``, and never where a dataset of ``store`` was registered from the folder (or a
    folder around or inside it): they would delete or change its images (ScenesFolderRefused,
    saying why). Replacing removes the files of this naming pattern (``<digits>.jpg``,
    ``<digits>.mask.npz``) a larger earlier run left in the class directories (and class
    directories left empty), so the folder holds exactly this dataset.
    """
    if images < 0:
        raise ValueError("images must be >= 0")
    if not 2 <= num_classes <= len(SCENE_CLASSES):
        raise ValueError(f"num_classes must be in 2..{len(SCENE_CLASSES)}, got {num_classes}")
    root = Path(root)
    classes = SCENE_CLASSES[:num_classes]
    check_scenes_folder(root, {"seed": seed, "num_images": images, "classes": list(classes)},
                        store, replace)
    used = classes[:images]  # fewer images than classes: the first classes only
    root.mkdir(parents=True, exist_ok=True)
    for name in used:
        (root / name).mkdir(exist_ok=True)
    written: set[str] = set()
    records = []
    base = str(root)
    for i in range(images):
        packed, mask, info = _render(i, seed, num_classes)
        rel = f"{info['class']}/{i:05d}.jpg"
        # the same JPEG bytes as from render_scene's RGB image, without unpacking the pixels
        image = Image.frombuffer("RGBX", (info["width"], info["height"]), packed, "raw", "RGBX",
                                 0, 1)
        jpeg = io.BytesIO()
        image.save(jpeg, format="JPEG", quality=JPEG_QUALITY)  # 4:2:0
        _write(f"{base}/{rel}", jpeg.getvalue())
        _write(f"{base}/{rel[:-4]}{MASK_SUFFIX}", mask_bytes(mask))
        written.add(rel[:-4])
        records.append({"path": rel, **info})
    for name in SCENE_CLASSES:
        folder = root / name
        if not folder.is_dir():
            continue
        with os.scandir(folder) as entries:
            stale = [e.path for e in entries
                     if _NAME_RE.match(e.name) and e.is_file(follow_symlinks=False)
                     and f"{name}/{e.name.split('.', 1)[0]}" not in written]
        for path in stale:
            os.unlink(path)
        if name not in used and not any(folder.iterdir()):
            folder.rmdir()  # an ImageFolder reader may refuse an empty class directory
    header = {"format": FORMAT, "version": FORMAT_VERSION, "seed": seed, "num_images": images,
              "classes": list(classes)}
    (root / "scenes.json").write_text(_json_text(header, records))
    return root
