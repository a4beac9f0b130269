"""Bad input: each way a file can fail is a status with a reason; each odd valid image is labeled.

All test images are made here with Pillow/numpy (a few PNGs byte by byte, where Pillow cannot write
them); nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import time
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from labeler_service.labeling import LabelingOptions, label_dataset
from storage import ImageStatus, Store, scan_image_folder
from storage.images import (
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    decode_image,
    read_image_bytes,
    to_rgb,
)

SIZE = 16  # decode size for the unit tests
RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


# -- making test files -------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, idat: bytes) -> bytes:
    """A PNG from its parts, for what Pillow cannot write (16-bit RGB, lying headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
            + png_chunk(b"IEND", b""))


def header_bomb_png(side: int = 100_000) -> bytes:
    """A 100-byte PNG whose header claims side x side pixels and whose data is nearly nothing.

    Decoding it would fail as truncated (UNREADABLE), so TOO_MANY_PIXELS proves the size was
    refused from the header alone, before any pixel was decoded.
    """
    return raw_png(side, side, 8, 0, zlib.compress(b"\0" * 10))


def rgb16_png(rgb: tuple[int, int, int], width: int = 8, height: int = 6) -> bytes:
    """16-bit-per-channel RGB PNG of one colour (Pillow can read but not write these)."""
    row = b"\0" + struct.pack(">HHH", *rgb) * width  # filter byte 0, big-endian samples
    return raw_png(width, height, 16, 2, zlib.compress(row * height))


def noise_rgb(width: int = 64, height: int = 48) -> Image.Image:
    """Incompressible content, so cutting a file in half really cuts into the pixel data."""
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8))


def halves(width: int, height: int, left: tuple, right: tuple, mode: str = "RGB") -> Image.Image:
    img = Image.new(mode, (width, height), left)
    img.paste(right, (width // 2, 0, width, height))
    return img


def exif_rotated(fmt: str = "JPEG", width: int = 300, height: int = 100) -> bytes:
    """Stored landscape, left half red and right half blue; EXIF orientation 6 says "rotate 90°
    clockwise to display"."""
    exif = Image.Exif()
    exif[0x0112] = 6
    quality = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    return encode(halves(width, height, RED, BLUE), fmt, exif=exif.tobytes(), **quality)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (30, 20), c) for c in (RED, (0, 255, 0), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def palette_png(transparent: bool) -> bytes:
    img = Image.new("P", (20, 10), 0)
    img.putpalette([*RED, *BLUE] + [0] * (256 - 2) * 3)
    img.paste(1, (10, 0, 20, 10))  # left half index 0 (red), right half index 1 (blue)
    return encode(img, "PNG", **({"transparency": 0} if transparent else {}))


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


# -- unit level: failures ----------------------------------------------------------------------


def rejected(fn: Callable[[], object]) -> ImageRejected:
    with pytest.raises(ImageRejected) as info:
        fn()
    assert info.value.reason, "a rejection must say why"
    return info.value


@pytest.mark.parametrize(("name", "data"), [
    ("truncated.jpg", truncated(encode(noise_rgb(), "JPEG"))),
    ("truncated.png", truncated(encode(noise_rgb(), "PNG"))),
    ("text.jpg", b"this is a text file with an image suffix\n"),
    ("random.png", np.random.default_rng(1).integers(0, 256, 500, np.uint8).tobytes()),
    ("garbage-after-signature.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64),
    ("only-the-jpeg-header.jpg", encode(noise_rgb(), "JPEG")[:400]),
], ids=lambda v: v if isinstance(v, str) else "")
def test_unreadable_data_is_rejected(tmp_path: Path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    raw = read_image_bytes(path, hashlib.sha256(data).digest())  # the bytes themselves are fine
    error = rejected(lambda: decode_image(raw, SIZE, name=name))
    assert error.status == ImageStatus.UNREADABLE
    assert name in error.reason


def test_zero_bytes_is_empty_file(tmp_path: Path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    error = rejected(lambda: read_image_bytes(path))
    assert error.status == ImageStatus.EMPTY_FILE
    assert "empty.jpg" in error.reason
    # And if the bytes get to the decoder anyway, they are still refused.
    assert rejected(lambda: decode_image(b"", SIZE)).status == ImageStatus.UNREADABLE


def test_missing_and_changed_files(tmp_path: Path):
    missing = rejected(lambda: read_image_bytes(tmp_path / "gone.png"))
    assert missing.status == ImageStatus.MISSING_FILE
    assert "gone.png" in missing.reason

    path = tmp_path / "a.png"
    data = encode(noise_rgb(), "PNG")
    path.write_bytes(data)
    assert read_image_bytes(path, hashlib.sha256(data).digest()) == data
    assert read_image_bytes(path) == data  # no hash to check against
    changed = rejected(lambda: read_image_bytes(path, hashlib.sha256(b"other").digest()))
    assert changed.status == ImageStatus.CHANGED_FILE
    assert "a.png" in changed.reason

    directory = tmp_path / "dir.jpg"  # a directory with an image suffix: refused, not a crash
    directory.mkdir()
    assert rejected(lambda: read_image_bytes(directory)).status == ImageStatus.NOT_A_FILE


def test_a_fifo_in_place_of_an_image_is_refused_without_blocking(tmp_path: Path):
    """No writer will ever come: a plain open() would wait for ever (issue 13, item 7)."""
    fifo = tmp_path / "a.jpg"
    os.mkfifo(fifo)
    began = time.monotonic()
    error = rejected(lambda: read_image_bytes(fifo, bytes(32)))
    assert error.status == ImageStatus.NOT_A_FILE and time.monotonic() - began < 1


def test_a_symlink_out_of_the_root_is_refused_at_read_time(tmp_path: Path):
    """Placed after registration: the read, not only the scan, is confined (item 13)."""
    (tmp_path / "data").mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(encode(noise_rgb(), "PNG"))
    link = tmp_path / "data" / "x.png"
    link.symlink_to(secret)
    error = rejected(lambda: read_image_bytes(link, root=tmp_path / "data"))
    assert error.status == ImageStatus.OUTSIDE_ROOT
    assert read_image_bytes(link, root=tmp_path) == secret.read_bytes()  # inside this root
    inside = tmp_path / "data" / "y.png"
    inside.symlink_to(tmp_path / "data" / "x.png")  # a link within the root to a link out
    assert rejected(lambda: read_image_bytes(inside, root=tmp_path / "data")).status \
        == ImageStatus.OUTSIDE_ROOT


def test_pixel_limit():
    over = encode(noise_rgb(300, 300), "PNG")
    error = rejected(lambda: decode_image(over, SIZE, max_pixels=10_000, name="big.png"))
    assert error.status == ImageStatus.TOO_MANY_PIXELS
    assert "big.png" in error.reason and "300x300" in error.reason
    # The limit is inclusive: exactly max_pixels is allowed.
    at_limit = encode(noise_rgb(100, 100), "PNG")
    assert decode_image(at_limit, SIZE, max_pixels=10_000).shape == (SIZE, SIZE, 3)


@pytest.fixture
def load_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Records every pixel decode (ImageFile.load) as the image's size."""
    calls: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return calls


@pytest.mark.parametrize("max_pixels", [1_000_000, DEFAULT_MAX_PIXELS])
def test_header_bomb_is_refused_before_decoding(load_calls: list, max_pixels: int):
    bomb = header_bomb_png()
    assert len(bomb) < 200
    error = rejected(lambda: decode_image(bomb, SIZE, max_pixels=max_pixels, name="bomb.png"))
    assert error.status == ImageStatus.TOO_MANY_PIXELS
    assert "bomb.png" in error.reason
    assert load_calls == []


def test_compressed_bomb_is_refused_before_decoding(load_calls: list):
    # A real, valid PNG: 25 million zero pixels in about 25 kB.
    bomb = encode(Image.new("L", (5000, 5000), 0), "PNG")
    assert len(bomb) < 100_000
    error = rejected(lambda: decode_image(bomb, SIZE, max_pixels=1_000_000, name="zeros.png"))
    assert error.status == ImageStatus.TOO_MANY_PIXELS
    assert "5000x5000" in error.reason
    assert load_calls == []
    # The spy does see decodes: a small image goes through it.
    decode_image(encode(noise_rgb(), "PNG"), SIZE, max_pixels=1_000_000)
    assert load_calls and set(load_calls) == {(64, 48)}  # load() is re-entered, a no-op


# -- unit level: valid images ------------------------------------------------------------------


def decoded(data: bytes) -> np.ndarray:
    out = decode_image(data, SIZE)
    assert out.shape == (SIZE, SIZE, 3)
    assert out.dtype == np.uint8
    return out


def assert_colour(pixels: np.ndarray, colour: tuple[int, int, int], atol: int = 12):
    """Every pixel of ``pixels`` ([..., 3]) is ``colour``, up to JPEG/resampling error."""
    diff = np.abs(pixels.reshape(-1, 3).astype(int) - np.array(colour))
    worst = pixels.reshape(-1, 3)[diff.argmax() // 3]
    assert diff.max() <= atol, f"expected {colour}, got e.g. {worst}"


# Left and right quarters-plus, clear of the resampling blur at a middle edge.
LEFT, RIGHT = slice(0, SIZE // 2 - 2), slice(SIZE // 2 + 2, SIZE)


def test_grayscale_and_bilevel():
    gray = decoded(encode(Image.new("L", (40, 30), 77), "PNG"))
    assert_colour(gray, (77, 77, 77), atol=0)
    gray_jpeg = decoded(encode(Image.new("L", (40, 30), 77), "JPEG"))
    assert_colour(gray_jpeg, (77, 77, 77), atol=2)
    bilevel = Image.new("1", (40, 30), 0)
    bilevel.paste(1, (20, 0, 40, 30))
    out = decoded(encode(bilevel, "PNG"))
    assert_colour(out[:, LEFT], (0, 0, 0), atol=0)
    assert_colour(out[:, RIGHT], WHITE, atol=0)


def test_cmyk_jpeg():
    data = encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert_colour(decoded(data), RED)


def test_rgba_transparent_pixels_are_white():
    img = halves(40, 30, (255, 0, 0, 0), (0, 0, 255, 255), mode="RGBA")  # transparent red
    out = decoded(encode(img, "PNG"))
    assert_colour(out[:, LEFT], WHITE, atol=0)
    assert_colour(out[:, RIGHT], BLUE, atol=0)


def test_la_transparent_pixels_are_white():
    img = halves(40, 30, (10, 0), (10, 255), mode="LA")
    out = decoded(encode(img, "PNG"))
    assert_colour(out[:, LEFT], WHITE, atol=0)
    assert_colour(out[:, RIGHT], (10, 10, 10), atol=0)


@pytest.mark.parametrize("transparent", [False, True])
def test_palette(transparent: bool):
    data = palette_png(transparent)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "P"
        assert ("transparency" in img.info) == transparent
    out = decoded(data)
    assert_colour(out[:, LEFT], WHITE if transparent else RED, atol=0)
    assert_colour(out[:, RIGHT], BLUE, atol=0)


@pytest.mark.parametrize(("value", "expected"), [
    (0, 0), (200, 1), (32768, 128), (65535, 255),
])
def test_16bit_grayscale_is_scaled_not_clipped(value: int, expected: int):
    data = encode(Image.fromarray(np.full((12, 10), value, np.uint16)), "PNG")
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode.startswith("I")  # really 16-bit, not an 8-bit PNG
    assert_colour(decoded(data), (expected,) * 3, atol=1)


def test_16bit_grayscale_tiff():
    data = encode(Image.fromarray(np.full((12, 10), 32768, np.uint16)), "TIFF")
    assert_colour(decoded(data), (128, 128, 128), atol=1)


def test_16bit_rgb_png():
    data = rgb16_png((32768, 0, 65535))
    assert_colour(decoded(data), (128, 0, 255), atol=1)


def test_to_rgb_modes():
    for mode in ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I", "I;16", "F", "YCbCr"):
        out = to_rgb(Image.new(mode, (4, 3)))
        assert out.mode == "RGB" and out.size == (4, 3), mode
    mid = Image.fromarray(np.full((3, 4), 32768, np.uint16))
    assert mid.mode == "I;16"
    assert to_rgb(mid).getpixel((0, 0)) == (128, 128, 128)
    dark = Image.fromarray(np.full((3, 4), 200, np.uint16))  # dark, but still 16-bit
    assert to_rgb(dark).getpixel((0, 0)) == (1, 1, 1)


def test_animated_gif_uses_the_first_frame():
    data = animated_gif()
    with Image.open(io.BytesIO(data)) as img:
        assert img.n_frames == 3
    assert_colour(decoded(data), RED, atol=0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_exif_rotation_is_applied(fmt: str):
    # Without EXIF: red left, blue right.
    plain = decoded(encode(halves(300, 100, RED, BLUE), fmt))
    assert_colour(plain[:, LEFT], RED)
    assert_colour(plain[:, RIGHT], BLUE)
    # Orientation 6 (rotate 90° clockwise to display): the left half ends up on top, once.
    rotated = decoded(exif_rotated(fmt))
    assert_colour(rotated[LEFT, :], RED)
    assert_colour(rotated[RIGHT, :], BLUE)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("size", [(4000, 3), (3, 4000)], ids=["wide", "tall"])
def test_extreme_aspect_ratios(fmt: str, size: tuple[int, int]):
    assert_colour(decoded(encode(Image.new("RGB", size, (0, 200, 0)), fmt)), (0, 200, 0), atol=3)


# -- manifest level ----------------------------------------------------------------------------


def test_manifest_suffixes_and_sizes(tmp_path: Path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "upper.JPG").write_bytes(encode(Image.new("RGB", (40, 30)), "JPEG"))
    (root / "mixed.Png").write_bytes(encode(Image.new("L", (20, 10)), "PNG"))
    for fmt, suffix in (("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("TIFF", "tif")):
        (root / f"rotated.{suffix}").write_bytes(exif_rotated(fmt, 300, 100))
    (root / "text.jpg").write_bytes(b"not an image\n")
    (root / "empty.png").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(truncated(encode(noise_rgb(), "JPEG")))
    (root / "truncated.png").write_bytes(truncated(encode(noise_rgb(), "PNG")))
    (root / "header_bomb.png").write_bytes(header_bomb_png(12_000))
    (root / "notes.txt").write_text("skip me")
    (root / "image.JPG.bak").write_bytes(encode(Image.new("RGB", (4, 4)), "JPEG"))
    (root / "no_suffix").write_bytes(encode(Image.new("RGB", (4, 4)), "PNG"))
    (root / ".hidden.jpg").write_bytes(encode(Image.new("RGB", (4, 4)), "JPEG"))

    manifest = scan_image_folder(root)
    rows = {str(p): (int(w), int(h)) for p, w, h in
            zip(manifest.path, manifest.width, manifest.height, strict=True)}
    # text.jpg and empty.png are listed (to fail when labeled), never silently dropped; the
    # truncated files and the bomb have readable headers, so their sizes are known.
    assert rows == {
        "empty.png": (-1, -1), "text.jpg": (-1, -1),
        "mixed.Png": (20, 10), "upper.JPG": (40, 30),
        "rotated.jpg": (100, 300), "rotated.png": (100, 300), "rotated.webp": (100, 300),
        "rotated.tif": (100, 300),
        "truncated.jpg": (64, 48), "truncated.png": (64, 48), "header_bomb.png": (12_000, 12_000),
    }
    assert manifest.class_names == ()
    assert (manifest.label == -1).all()
    for path, digest in zip(manifest.path, manifest.sha256, strict=True):
        assert digest.tobytes() == hashlib.sha256((root / path).read_bytes()).digest()


def test_manifest_reads_headers_not_pixels(tmp_path: Path, load_calls: list):
    root = tmp_path / "images"
    root.mkdir()
    # 25 megapixels in about 25 kB: registering a folder must not decode it.
    (root / "zeros.png").write_bytes(encode(Image.new("L", (5000, 5000), 0), "PNG"))
    (root / "rotated.png").write_bytes(exif_rotated("PNG"))
    (root / "photo.jpg").write_bytes(encode(noise_rgb(), "JPEG"))
    (root / "anim.gif").write_bytes(animated_gif())
    (root / "photo.tif").write_bytes(exif_rotated("TIFF"))
    manifest = scan_image_folder(root)
    assert dict(zip(manifest.path, zip(manifest.width, manifest.height, strict=True),
                    strict=True)) == {"anim.gif": (30, 20), "photo.jpg": (64, 48),
                                      "photo.tif": (100, 300), "rotated.png": (100, 300),
                                      "zeros.png": (5000, 5000)}
    assert load_calls == []


def test_scan_leaves_warning_filters_alone(tmp_path: Path):
    """Probing threads once each entered catch_warnings, which swaps a process-global list:
    interleaved, they could leave "ignore every warning" installed after the scan."""
    root = tmp_path / "many"
    root.mkdir()
    tiny = encode(Image.new("RGB", (4, 4)), "JPEG")
    for i in range(200):
        (root / f"{i:03d}.jpg").write_bytes(tiny)
    before = list(warnings.filters)
    for _ in range(5):
        assert len(scan_image_folder(root)) == 200
        assert warnings.filters == before


# -- job level ---------------------------------------------------------------------------------

MAX_PIXELS = 1_000_000

BAD = {  # file -> the status it must get
    "bad_truncated.jpg": ImageStatus.UNREADABLE,
    "bad_truncated.png": ImageStatus.UNREADABLE,
    "bad_text.jpg": ImageStatus.UNREADABLE,
    "bad_empty.png": ImageStatus.EMPTY_FILE,
    "bad_header_bomb.png": ImageStatus.TOO_MANY_PIXELS,
    "bad_zeros_bomb.png": ImageStatus.TOO_MANY_PIXELS,
    "bad_missing.jpg": ImageStatus.MISSING_FILE,
    "bad_changed.jpg": ImageStatus.CHANGED_FILE,
}


def make_valid_files() -> dict[str, bytes]:
    bilevel = Image.new("1", (40, 30), 0)
    bilevel.paste(1, (20, 0, 40, 30))
    return {
        "ok_rgb.jpg": encode(noise_rgb(), "JPEG"),
        "ok_upper_suffix.JPG": encode(noise_rgb(50, 40), "JPEG"),
        "ok_gray.png": encode(noise_rgb().convert("L"), "PNG"),
        "ok_gray.jpg": encode(noise_rgb().convert("L"), "JPEG"),
        "ok_bilevel.png": encode(bilevel, "PNG"),
        "ok_cmyk.jpg": encode(noise_rgb().convert("CMYK"), "JPEG"),
        "ok_rgba.png": encode(halves(40, 30, (255, 0, 0, 0), (0, 0, 255, 255), "RGBA"), "PNG"),
        "ok_la.png": encode(halves(40, 30, (10, 0), (10, 255), "LA"), "PNG"),
        "ok_palette.png": palette_png(transparent=False),
        "ok_palette_transparent.png": palette_png(transparent=True),
        "ok_16bit.png": encode(Image.fromarray(np.full((30, 40), 32768, np.uint16)), "PNG"),
        "ok_16bit_rgb.png": rgb16_png((32768, 0, 65535)),
        "ok_animated.gif": animated_gif(),
        "ok_exif_rotated.jpg": exif_rotated("JPEG"),
        "ok_exif_rotated.png": exif_rotated("PNG"),
        "ok_wide.jpg": encode(Image.new("RGB", (4000, 3), (0, 200, 0)), "JPEG"),
        "ok_tall.png": encode(Image.new("RGB", (3, 4000), (0, 200, 0)), "PNG"),
    }


@pytest.mark.parametrize("num_workers", [0, 2], ids=["in-process", "2-workers"])
def test_job_labels_every_valid_image_and_fails_every_bad_one(
        tmp_path: Path, store: Store, checkpoint: Path, num_workers: int):
    root = tmp_path / "mixed"  # flat: no class folders, so the teacher's 3 classes are fine
    root.mkdir()
    valid = make_valid_files()
    for name, data in valid.items():
        (root / name).write_bytes(data)
    (root / "bad_truncated.jpg").write_bytes(truncated(encode(noise_rgb(), "JPEG")))
    (root / "bad_truncated.png").write_bytes(truncated(encode(noise_rgb(), "PNG")))
    (root / "bad_text.jpg").write_text("not an image, whatever the suffix says\n")
    (root / "bad_empty.png").write_bytes(b"")
    (root / "bad_header_bomb.png").write_bytes(header_bomb_png())
    (root / "bad_zeros_bomb.png").write_bytes(encode(Image.new("L", (2000, 1000), 0), "PNG"))
    (root / "bad_missing.jpg").write_bytes(encode(noise_rgb(), "JPEG"))
    (root / "bad_changed.jpg").write_bytes(encode(noise_rgb(), "JPEG"))
    (root / "README.txt").write_text("not listed")

    dataset, created = store.add_dataset("mixed", root)
    assert created and dataset.class_names == ()
    assert dataset.num_images == len(valid) + len(BAD)
    # After registration: one file disappears, one is rewritten.
    (root / "bad_missing.jpg").unlink()
    (root / "bad_changed.jpg").write_bytes(encode(noise_rgb(64, 49), "JPEG"))

    options = LabelingOptions(batch_size=4, num_workers=num_workers, progress=False,
                              shard_size=4, chunk_size=2, max_pixels=MAX_PIXELS)
    report = label_dataset(store, "mixed", "test_nfnet", checkpoint, 64, 3, options)

    labelset = store.dataset("mixed").labelset(report.labelset_id)
    assert labelset.is_complete()
    assert not report.stopped
    assert report.shards_written == labelset.num_shards == -(-dataset.num_images // 4)
    assert report.images_labeled == len(valid)
    assert dict(report.images_failed) == {
        ImageStatus.UNREADABLE: 3, ImageStatus.EMPTY_FILE: 1, ImageStatus.TOO_MANY_PIXELS: 2,
        ImageStatus.MISSING_FILE: 1, ImageStatus.CHANGED_FILE: 1}
    assert report.images_done == dataset.num_images

    paths = [str(p) for p in dataset.manifest().path]
    block = labelset.read_block(0, labelset.num_images)
    status = {path: int(s) for path, s in zip(paths, block.status, strict=True)}
    assert status == {**{name: int(s) for name, s in BAD.items()},
                      **{name: int(ImageStatus.LABELED) for name in valid}}

    for i, path in enumerate(paths):
        arrays = (block.logits[i], block.lse[i], block.global_logits[i])
        if path in valid:
            assert all(np.isfinite(a).all() for a in arrays), path
            assert (block.classes[i] >= 0).all() and (block.classes[i] < 3).all(), path
            assert (block.global_classes[i] >= 0).all(), path
        else:
            assert all(np.isnan(a).all() for a in arrays), path
            assert (block.classes[i] == -1).all() and (block.global_classes[i] == -1).all(), path

    reasons = dict(report.failures)
    assert set(reasons) == set(BAD)
    for name, reason in reasons.items():
        assert name in reason, (name, reason)
