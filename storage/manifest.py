"""Image manifests: the list of images a dataset is made of, one row per image.

A manifest is built by walking a directory. Its fingerprint (sha256 over a canonical encoding of
every row and the class names) identifies the dataset's contents: label sets record it, so labels
can never be silently matched with a different set of images.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import stat
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, TiffImagePlugin

# Lower-cased suffixes that are listed as images. Files with these suffixes that turn out not to be
# images are still listed: they get a failure status when labeled rather than vanishing silently.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
     ".ppm", ".pgm", ".pbm", ".pnm"}
)
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # EXIF orientations that swap width and height
_TIFF_WIDTH, _TIFF_HEIGHT = 256, 257  # ImageWidth, ImageLength tags
# progress(files_scanned, files_total): total None while the tree is still being listed.
Progress = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Manifest:
    """Columns of a dataset's manifest. ``label`` is the class index (stored as ``class``)."""

    path: np.ndarray  # str, relative to the dataset's source root, '/'-separated
    sha256: np.ndarray  # str, hex digest of the file's bytes
    width: np.ndarray  # int32, after EXIF orientation; -1 when unreadable
    height: np.ndarray  # int32, after EXIF orientation; -1 when unreadable
    label: np.ndarray  # int32 class index; -1 when unknown
    class_names: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.path)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        digest.update(("\x1f".join(self.class_names) + "\x1e").encode())
        for row in zip(self.path, self.sha256, self.width, self.height, self.label, strict=True):
            digest.update(("\x1f".join(str(v) for v in row) + "\x1e").encode())
        return digest.hexdigest()

    def diff(self, other: Manifest) -> str:
        """A one-line account of how ``other`` differs from this manifest."""
        mine = dict(zip(self.path, self.sha256, strict=True))
        theirs = dict(zip(other.path, other.sha256, strict=True))
        added = len(theirs.keys() - mine.keys())
        removed = len(mine.keys() - theirs.keys())
        modified = sum(1 for p in mine.keys() & theirs.keys() if mine[p] != theirs[p])
        parts = [f"{added} added", f"{removed} removed", f"{modified} modified"]
        if self.class_names != other.class_names:
            parts.append("class list changed")
        return ", ".join(parts)


def is_image_path(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


class FileOutsideRoot(ValueError):
    """A file in the folder is a symlink to somewhere outside the permitted root."""


def _is_regular_file(path: str) -> bool:
    """Whether ``path`` (following symlinks) is a regular file. Unlike ``os.path.isfile``, an
    error other than a dangling symlink raises: a file that cannot be looked at (EACCES, EIO,
    ESTALE) must not silently drop out of a dataset."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        if os.path.islink(path):
            return False  # dangling symlink
        raise


def list_image_files(root: Path, confine_to: str | Path | None = None,
                     progress: Progress | None = None) -> list[str]:
    """Every file under ``root`` with an image suffix, as sorted '/'-separated relative paths.

    Dangling symlinks are not files and are skipped; a file that cannot be looked at raises.
    With ``confine_to``, a file that resolves (through a symlink) outside that directory is
    refused: the service reads only its data root.
    A directory that cannot be listed (permissions, I/O error) raises its ``OSError``: skipping
    it would register a dataset silently missing its images. ``progress(0, None)`` is called
    once per directory listed.
    """
    found = []
    limit = Path(confine_to).resolve() if confine_to is not None else None

    def unreadable(error: OSError) -> None:
        raise error

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable, followlinks=False):
        if progress is not None:
            progress(0, None)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if not is_image_path(name) or name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            if not _is_regular_file(full):  # a dangling symlink, a socket, ...
                continue
            rel = (name if rel_dir == "." else f"{rel_dir}/{name}").replace(os.sep, "/")
            if limit is not None and not Path(os.path.realpath(full)).is_relative_to(limit):
                raise FileOutsideRoot(f"{rel}: a symlink to a file outside the data root")
            found.append(rel)
    return sorted(found)


def probe_image(path: Path) -> tuple[str, int, int]:
    """sha256 of the file and its (width, height) after EXIF orientation; -1 sizes if unreadable.

    Reads headers only, never pixels: a few-kB PNG can claim hundreds of megapixels. Callers that
    want Pillow's bomb and EXIF warnings silenced do so around the call (``scan_image_folder``).
    """
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(path) as img:
            width, height = img.size
            if isinstance(img, TiffImagePlugin.TiffImageFile):
                # Recent Pillow reports a TIFF's size already oriented (it orients the pixels on
                # load), so swapping below would undo it; the stored dimensions are unoriented
                # on every Pillow version.
                width = img.tag_v2.get(_TIFF_WIDTH, width)
                height = img.tag_v2.get(_TIFF_HEIGHT, height)
            # Image.getexif, not img.getexif: PngImageFile.getexif decodes every pixel to look for
            # an eXIf chunk after the image data. The base method reads what the header parsing
            # found (eXIf before IDAT, where encoders put it), so probing costs no decode.
            if Image.Image.getexif(img).get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
                width, height = height, width
    except Exception:
        width = height = -1
    return digest, width, height


T = TypeVar("T")
R = TypeVar("R")
SCAN_WINDOW_PER_WORKER = 4  # files in flight per hashing thread: keeps them busy, bounds memory


def ordered_map(pool: Executor, fn: Callable[[T], R], items: Iterable[T],
                window: int) -> Iterator[R]:
    """``pool.map(fn, items)`` with at most ``window`` calls submitted and not yet consumed:
    memory stays O(window) (``Executor.map`` submits every item up front, ~1.7 KB a future:
    GBs at ImageNet-21k). Results come in order; the caller's pace paces the submissions."""
    items = iter(items)
    pending: deque[Future[R]] = deque(pool.submit(fn, item)
                                      for item in itertools.islice(items, window))
    while pending:
        result = pending.popleft().result()
        for item in itertools.islice(items, 1):
            pending.append(pool.submit(fn, item))
        yield result


def scan_image_folder(root: Path, max_workers: int = 8, confine_to: str | Path | None = None,
                      progress: Progress | None = None) -> Manifest:
    """Build the manifest of every image under ``root``.

    When every image sits below a first-level directory (the torchvision ImageFolder layout), the
    sorted first-level directory names are the class names and give each image its class.

    ``progress(files_scanned, files_total)``, if given, is called from this thread: with a total
    of None while the tree is being listed (once per directory), then once per file hashed. It
    may raise to abandon the scan (files being read finish, the rest are not started).
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    paths = list_image_files(root, confine_to, progress)
    if progress is not None:
        progress(0, len(paths))
    # Hashing and header parsing are I/O bound: threads overlap them (hashlib releases the GIL).
    # Warnings are silenced here, once, in this thread: catch_warnings swaps a process-global
    # filter list, so entering it in each pool thread interleaves and can leave "ignore all
    # warnings" installed for the rest of the process.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bomb and EXIF warnings: sizes come from the header
        pool = ThreadPoolExecutor(max_workers=max_workers)
        probes = []
        try:
            for probe in ordered_map(pool, lambda p: probe_image(root / p), paths,
                                     window=SCAN_WINDOW_PER_WORKER * max_workers):
                probes.append(probe)
                if progress is not None:
                    progress(len(probes), len(paths))
        finally:
            # On an error (an unreadable file, progress raising) drop the files not started yet
            # rather than hashing the rest of the tree before the error surfaces.
            pool.shutdown(wait=True, cancel_futures=True)

    if paths and all("/" in p for p in paths):
        top_dirs = [p.split("/", 1)[0] for p in paths]
        class_names: tuple[str, ...] = tuple(sorted(set(top_dirs)))
        index = {name: i for i, name in enumerate(class_names)}
        labels = [index[d] for d in top_dirs]
    else:
        class_names = ()
        labels = [-1] * len(paths)

    return Manifest(
        path=np.array(paths, dtype=str) if paths else np.array([], dtype=str),
        sha256=np.array([p[0] for p in probes], dtype=str) if paths else np.array([], dtype=str),
        width=np.array([p[1] for p in probes], dtype=np.int32),
        height=np.array([p[2] for p in probes], dtype=np.int32),
        label=np.array(labels, dtype=np.int32),
        class_names=class_names,
    )
