"""Decoding images (for the teacher, the trainer and the pictures): any file a user may have, to
an RGB uint8 array, or a status. It lives with the store because both the labeling service and
the trainer read images, and neither imports the other.

Every way an image can fail maps to an ``ImageStatus`` with a reason, so one bad file costs one
image, never the job. Valid but unusual images (grayscale, CMYK, RGBA, 16-bit, palette, animated,
EXIF-rotated, extreme aspect ratios) all become RGB.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from storage.status import ImageStatus

DEFAULT_MAX_PIXELS = 178_956_970  # Pillow's own default bomb limit: about 13k x 13k
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
             "nearest": Image.Resampling.NEAREST, "lanczos": Image.Resampling.LANCZOS}
_ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels are shown on white, as browsers do


class DecodingProcessDied(RuntimeError):
    """A decoding process died mid-pass (the OOM killer, a crash in a native decoder). The
    decoder starts new processes at its next pass, so the work is worth trying again."""


class ImageRejected(Exception):
    def __init__(self, status: ImageStatus, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def open_regular(path: Path, root: Path | str | None = None) -> BinaryIO:
    """``path`` opened for reading in binary, if it is a regular file, or
    :class:`ImageRejected` saying why not.

    Opening never blocks: a FIFO, device or directory put where a file was is refused, not
    waited on, and the check is made on the opened file, so nothing can be swapped in after
    it. With ``root``, a path that resolves outside it (a symlink placed after registration) is
    refused: reads are confined when they happen, not only when the folder was scanned.
    """
    if root is not None:
        real, limit = os.path.realpath(path), os.path.realpath(root)
        if os.path.commonpath([real, limit]) != limit:
            raise ImageRejected(ImageStatus.OUTSIDE_ROOT, f"{path}: resolves outside {root}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageRejected(ImageStatus.MISSING_FILE, f"{path}: file not found") from None
    except OSError as e:
        raise ImageRejected(ImageStatus.UNREADABLE, f"{path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageRejected(ImageStatus.NOT_A_FILE, f"{path}: not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


def read_image_bytes(path: Path, expected_sha256: bytes | None = None,
                     root: Path | str | None = None, expected_size: int | None = None) -> bytes:
    """The bytes of image file ``path`` (opened by :func:`open_regular`, confined to ``root``),
    or :class:`ImageRejected` saying why not.

    ``expected_sha256`` is the raw digest the manifest holds, ``expected_size`` its byte size:
    a file of another size has changed and is refused before it is read, and no more than that
    is ever read (a file growing while read included), so a multi-GB file put where an image
    was costs nothing.
    """
    if isinstance(expected_sha256, str):  # a hex digest would never match: say so, loudly
        raise TypeError("expected_sha256 is the raw 32-byte digest, not its hex")
    with open_regular(path, root) as f:
        try:
            size = os.fstat(f.fileno()).st_size
            if size == 0:  # the most telling reason, registered size or not
                raise ImageRejected(ImageStatus.EMPTY_FILE, f"{path}: zero bytes")
            if expected_size is not None and size != expected_size:
                raise ImageRejected(ImageStatus.CHANGED_FILE,
                                    f"{path}: {size} bytes, registered as {expected_size}")
            data = f.read() if expected_size is None else f.read(expected_size + 1)
        except OSError as e:
            raise ImageRejected(ImageStatus.UNREADABLE, f"{path}: {e.strerror}") from None
    if not data:
        raise ImageRejected(ImageStatus.EMPTY_FILE, f"{path}: zero bytes")
    if expected_size is not None and len(data) != expected_size:
        raise ImageRejected(ImageStatus.CHANGED_FILE,
                            f"{path}: contents differ from the registered manifest")
    if expected_sha256 is not None and hashlib.sha256(data).digest() != expected_sha256:
        raise ImageRejected(ImageStatus.CHANGED_FILE,
                            f"{path}: contents differ from the registered manifest")
    return data


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB, scaling high bit depths rather than clipping them."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float32)  # float64 would double a 16-bit bomb's memory
        if img.mode.startswith("I;16"):
            # 16 bits by construction: guessing from the values would brighten a dark picture
            # (all values <= 255) by 257x.
            peak = 65535.0
        elif img.mode == "I" and arr.max(initial=0) > 255:
            peak = 65535.0  # 32-bit container (older Pillow opens 16-bit PNGs as "I"): guess
        else:
            peak = 255.0
        arr = np.clip(arr * (255.0 / peak), 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
            img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_ALPHA_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def open_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image",
             draft_size: int | None = None) -> Image.Image:
    """Decode, orient and convert to RGB. ``draft_size`` lets JPEG decode at 1/2, 1/4 or 1/8
    scale for free while keeping both sides >= it. Raises ImageRejected for anything that is not
    a usable image."""
    try:
        with warnings.catch_warnings():
            # We apply our own pixel limit below; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected(
                    ImageStatus.TOO_MANY_PIXELS,
                    f"{name}: {width}x{height} is over the {max_pixels} pixel limit")
            if draft_size is not None:
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return to_rgb(ImageOps.exif_transpose(img))
    except ImageRejected:
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected(ImageStatus.TOO_MANY_PIXELS, f"{name}: {e}") from None
    except Exception as e:
        raise ImageRejected(ImageStatus.UNREADABLE, f"{name}: {type(e).__name__}: {e}") from None


def decode_image(data: bytes, size: int, interpolation: str = "bicubic",
                 max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> np.ndarray:
    """Decode, orient, convert to RGB and resize the whole image to size x size (no crop).

    Returns uint8 [size, size, 3]. Raises ImageRejected for anything that is not a usable image.
    """
    img = open_rgb(data, max_pixels, name, draft_size=size)
    try:
        img = img.resize((size, size), resample=_RESAMPLE[interpolation])
    except Exception as e:
        raise ImageRejected(ImageStatus.UNREADABLE, f"{name}: {type(e).__name__}: {e}") from None
    return np.asarray(img, dtype=np.uint8)
