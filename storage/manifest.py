"""Image manifests: the list of images a dataset is made of, one row per image.

A manifest is built by walking a directory. Its fingerprint (sha256 over a canonical encoding of
every row and the class names) identifies the dataset's contents: label sets record it, so labels
can never be silently matched with a different set of images.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import multiprocessing
import multiprocessing.connection
import os
import stat
import sys
import threading
import warnings
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, overload

import numpy as np
from PIL import Image, TiffImagePlugin

from storage.errors import FolderChangedDuringScan

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
FINGERPRINT_ROWS = 65536  # rows whose text is made at once when computing a fingerprint
_ITER_ROWS = 65536  # paths decoded at once when iterating a PathColumn


class PathColumn:
    """Relative paths held compactly: their UTF-8 bytes end to end (``data``) and where each one
    ends (``ends``, int64). About len + 8 bytes a path, where a numpy unicode array takes 4 bytes
    a character of the longest path and a Python str ~80 bytes: 14.2M ImageNet-21k paths fit in
    ~0.5 GB. Indexing with an int gives a str; with a slice, an index array or a mask, another
    column (gathered without a Python loop)."""

    __slots__ = ("data", "ends")

    def __init__(self, data: np.ndarray, ends: np.ndarray):
        self.data = np.asarray(data, dtype=np.uint8)
        self.ends = np.asarray(ends, dtype=np.int64)

    @classmethod
    def from_strings(cls, paths: Iterable[str]) -> PathColumn:
        """Streams ``paths`` in: never holds them all as Python objects."""
        data, ends, total = bytearray(), array("q"), 0
        for path in paths:
            encoded = path.encode()
            data += encoded
            total += len(encoded)
            ends.append(total)
        # frombuffer shares the buffers: no copy of the largest part of a manifest
        return cls(np.frombuffer(data, np.uint8), np.frombuffer(ends, np.int64))

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.ends.nbytes

    def starts(self) -> np.ndarray:
        return np.concatenate([np.zeros(min(1, len(self)), np.int64), self.ends[:-1]])

    @overload
    def __getitem__(self, key: int | np.integer) -> str: ...

    @overload
    def __getitem__(self, key: slice | np.ndarray | Sequence[int]) -> PathColumn: ...

    def __getitem__(self, key: int | np.integer | slice | np.ndarray | Sequence[int]
                    ) -> str | PathColumn:
        if isinstance(key, int | np.integer):
            i = int(key) + (len(self) if key < 0 else 0)
            if not 0 <= i < len(self):
                raise IndexError(f"path {int(key)} outside [0, {len(self)})")
            start = int(self.ends[i - 1]) if i else 0
            return self.data[start:int(self.ends[i])].tobytes().decode()
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step != 1:
                return self.take(np.arange(start, stop, step))
            stop = max(start, stop)
            low = int(self.ends[start - 1]) if start else 0
            high = int(self.ends[stop - 1]) if stop > start else low
            ends = self.ends[start:stop]
            # a view from the first row: the scan slices its whole listing (0.1 GB of ends at
            # 14.2M) to hand it to the hashing pool
            return PathColumn(self.data[low:high], ends - low if low else ends)
        return self.take(np.asarray(key))

    def take(self, rows: np.ndarray) -> PathColumn:
        """The paths at ``rows`` (indices, or a boolean mask), in that order."""
        rows = np.flatnonzero(rows) if rows.dtype == bool else rows.astype(np.int64)
        starts = self.starts()[rows]
        lengths = self.ends[rows] - starts
        ends = np.cumsum(lengths)
        gather = np.repeat(starts - (ends - lengths), lengths) + np.arange(
            int(ends[-1]) if len(ends) else 0)
        return PathColumn(self.data[gather], ends)

    def __iter__(self) -> Iterator[str]:
        for low in range(0, len(self), _ITER_ROWS):  # a chunk of Python objects at a time
            part = self[low:low + _ITER_ROWS]
            data, start = part.data.tobytes(), 0
            for end in part.ends.tolist():
                yield data[start:end].decode()
                start = end

    def tolist(self) -> list[str]:
        return list(self)

    def __repr__(self) -> str:
        return f"PathColumn({len(self)} paths, {self.nbytes} bytes)"


@dataclass(frozen=True)
class Manifest:
    """Columns of a dataset's manifest. ``label`` is the class index (stored as ``class``)."""

    path: PathColumn  # relative to the dataset's source root, '/'-separated
    sha256: np.ndarray  # uint8 [N, 32], the raw digest of the file's bytes
    width: np.ndarray  # int32, after EXIF orientation; -1 when unreadable
    height: np.ndarray  # int32, after EXIF orientation; -1 when unreadable
    label: np.ndarray  # int32 class index; -1 when unknown
    class_names: tuple[str, ...] = ()
    size: np.ndarray | None = None  # int64 file size in bytes; None: not recorded (older stores)
    skipped: SkippedNames | None = None  # names the scan could not list (never in a fingerprint)

    def __len__(self) -> int:
        return len(self.path)

    def rows(self, start: int, stop: int) -> Manifest:
        return Manifest(self.path[start:stop], self.sha256[start:stop], self.width[start:stop],
                        self.height[start:stop], self.label[start:stop], self.class_names,
                        None if self.size is None else self.size[start:stop])

    def sha256_hex(self, index: int) -> str:
        return self.sha256[index].tobytes().hex()

    def chunks(self, rows: int = FINGERPRINT_ROWS) -> Iterator[Manifest]:
        """Consecutive row chunks of at most ``rows`` rows (views, not copies of the columns)."""
        for start in range(0, len(self), rows):
            yield self.rows(start, start + rows)

    def fingerprint(self) -> str:
        # In chunks: the text of 14.2M rows at once would take ~5 GB.
        return manifest_fingerprint(self.class_names, self.chunks())

    def diff(self, other: Manifest) -> str:
        """A one-line account of how ``other`` differs from this manifest."""
        def by_path(m: Manifest) -> dict[str, bytes]:
            return dict(zip(m.path, (row.tobytes() for row in m.sha256), strict=True))

        mine, theirs = by_path(self), by_path(other)
        added = len(theirs.keys() - mine.keys())
        removed = len(mine.keys() - theirs.keys())
        modified = sum(1 for p in mine.keys() & theirs.keys() if mine[p] != theirs[p])
        parts = [f"{added} added", f"{removed} removed", f"{modified} modified"]
        if self.class_names != other.class_names:
            parts.append("class list changed")
        return ", ".join(parts)


def manifest_fingerprint(class_names: Sequence[str], chunks: Iterable[Manifest]) -> str:
    """The dataset fingerprint (docs/store-format.md) over a manifest given in consecutive row
    chunks, so a reader never holds more than one chunk's text."""
    digest = hashlib.sha256()
    digest.update(("\x1f".join(class_names) + "\x1e").encode())
    for chunk in chunks:
        hexes = chunk.sha256.tobytes().hex()
        rows = zip(chunk.path, range(0, len(hexes), 64), chunk.width.tolist(),
                   chunk.height.tolist(), chunk.label.tolist(), strict=True)
        digest.update("".join(f"{p}\x1f{hexes[i:i + 64]}\x1f{w}\x1f{h}\x1f{c}\x1e"
                              for p, i, w, h, c in rows).encode())
    return digest.hexdigest()


def is_image_path(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


# C0 controls and DEL. The fingerprint joins fields with \x1f and rows with \x1e: with these
# out of every path and class name its encoding is unambiguous (two folders, one fingerprint,
# otherwise), and a name holding a newline or an escape breaks every log and listing it is in.
_CONTROL = frozenset(chr(c) for c in (*range(0x20), 0x7F))


def is_listable_name(name: str) -> bool:
    """Whether a file or directory name can be a manifest path's part: UTF-8 text (the OS gave
    no undecodable bytes, which Python keeps as surrogates) without control characters."""
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return _CONTROL.isdisjoint(name)


@dataclass
class SkippedNames:
    """Files and directories a scan left out because their names cannot be manifest paths
    (:func:`is_listable_name`): how many, and the first few (escaped, so they print safely)."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    MAX_EXAMPLES = 5

    def add(self, relative: str) -> None:
        self.count += 1
        if len(self.examples) < self.MAX_EXAMPLES:
            self.examples.append(ascii(relative)[1:-1])

    def describe(self) -> str:
        return (f"skipped {self.count} file(s) or folder(s) whose names are not UTF-8 text or "
                f"hold control characters: {', '.join(self.examples)}"
                f"{', ...' if self.count > len(self.examples) else ''}")


class FileOutsideRoot(ValueError):
    """A file in the folder is a symlink to somewhere outside the permitted root."""


def _is_regular_file(path: str) -> bool:
    """Whether ``path`` (following symlinks) is a regular file. Unlike ``os.path.isfile``, an
    error other than the file not being there raises: a file that cannot be looked at (EACCES,
    EIO, ESTALE) must not silently drop out of a dataset."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return False  # a dangling symlink, or a file deleted since its directory was listed


@dataclass(frozen=True)
class ImageListing:
    """The image files under a folder, sorted, with each one's first-level directory."""

    paths: PathColumn
    top_dir: np.ndarray  # int32 index into top_dirs; -1 for a file directly in the folder
    top_dirs: tuple[str, ...]  # first-level directories holding images, in listing order
    skipped: SkippedNames = field(default_factory=SkippedNames)

    def classes(self) -> tuple[tuple[str, ...], np.ndarray]:
        """(class names, each image's class): the sorted first-level directory names when every
        image sits below one (the torchvision ImageFolder layout), else ((), all -1)."""
        if not len(self.paths) or (self.top_dir < 0).any():
            return (), np.full(len(self.paths), -1, np.int32)
        names = tuple(sorted(self.top_dirs))
        rank = np.argsort(np.argsort(np.array(self.top_dirs, dtype=object)))  # listing -> sorted
        return names, rank.astype(np.int32)[self.top_dir]

    def digest(self) -> str:
        """sha256 over the listed paths: two listings of one folder are the same files in the
        same order exactly when their digests are equal."""
        # Hashed in place: copies of the columns would be ~0.6 GB at ImageNet-21k.
        h = hashlib.sha256(np.ascontiguousarray(self.paths.data).data)
        h.update(np.ascontiguousarray(self.paths.ends, dtype="<i8").data)
        return h.hexdigest()


@dataclass
class PartialScan:
    """The first rows of an unfinished scan (sha256, width, height, size of rows [0, k)) and the
    listing they belong to (:meth:`ImageListing.digest`). A scan given one goes on from row k
    when the folder lists the same files, and starts over otherwise."""

    listing: str
    sha256: np.ndarray  # uint8 [k, 32]
    width: np.ndarray  # int32 [k]
    height: np.ndarray  # int32 [k]
    size: np.ndarray  # int64 [k]

    def __len__(self) -> int:
        return len(self.width)


class ScanPaused(Exception):
    """Raised by a scan's ``progress`` callback to stop a scan that is to go on later (a task
    nearing its time limit); the scan raises it on with ``partial``, the rows hashed so far."""

    def __init__(self, message: str = "scan paused"):
        super().__init__(message)
        self.partial: PartialScan | None = None


def list_image_files(root: Path, confine_to: str | Path | None = None,
                     progress: Progress | None = None) -> ImageListing:
    """Every file under ``root`` with an image suffix, sorted by '/'-separated relative path.

    The tree is walked in that order (within a directory, a subdirectory ``d`` sorts as
    ``d/``), so the listing streams into a compact :class:`PathColumn` and is never held as
    millions of Python strings. The walk keeps its own stack, so a folder nested thousands of
    levels deep is listed like any other. Hidden files and directories are skipped, and so are
    symlinks to directories (never followed) and dangling symlinks; names that cannot be a
    manifest path (:func:`is_listable_name`) are skipped and counted in the listing's
    ``skipped``; a file that cannot be looked at raises. With ``confine_to``, a file that
    resolves (through a symlink) outside that directory is refused: the service reads only its
    data root. A directory that cannot be listed (permissions, I/O error) raises its
    ``OSError``: skipping it would register a dataset silently missing its images.
    ``progress(0, None)`` is called once per directory listed.
    """
    limit = Path(confine_to).resolve() if confine_to is not None else None
    top_dirs: list[str] = []
    top_dir = array("i")
    skipped = SkippedNames()

    def entries(directory: str, rel: str) -> Iterator[tuple[str, os.DirEntry]]:
        """The directory's visible entries in walk order, as (sort key, entry)."""
        if progress is not None:
            progress(0, None)
        listed = []
        with os.scandir(directory) as listing:
            for entry in listing:
                if entry.name.startswith("."):
                    continue
                if not is_listable_name(entry.name):
                    skipped.add(rel + entry.name)
                    continue
                listed.append((entry.name + "/" if _is_walked_dir(entry) else entry.name,
                               entry))
        return iter(sorted(listed, key=lambda pair: pair[0]))

    def walk() -> Iterator[str]:
        # (entries left, relative prefix, first-level directory index) per open directory
        stack = [(entries(os.fspath(root), ""), "", -1)]
        while stack:
            remaining, rel, top = stack[-1]
            item = next(remaining, None)
            if item is None:
                stack.pop()
                continue
            key, entry = item
            name = f"{rel}{entry.name}"
            if key.endswith("/"):
                if top < 0 and not rel:
                    top_dirs.append(entry.name)
                    top = len(top_dirs) - 1
                stack.append((entries(entry.path, f"{name}/"), f"{name}/", top))
            elif is_image_path(entry.name) and _is_regular_file(entry.path):
                if limit is not None and not Path(os.path.realpath(entry.path)).is_relative_to(
                        limit):
                    raise FileOutsideRoot(f"{name}: a symlink to a file outside the data root")
                top_dir.append(top)
                yield name

    paths = PathColumn.from_strings(walk())
    used = sorted(set(top_dir))  # first-level directories without images are no classes
    renumber = np.full(len(top_dirs) + 1, -1, np.int32)
    renumber[[t for t in used if t >= 0]] = np.arange(sum(t >= 0 for t in used))
    return ImageListing(paths, renumber[np.frombuffer(top_dir, np.int32)],
                        tuple(top_dirs[t] for t in used if t >= 0), skipped)


def _is_walked_dir(entry: os.DirEntry) -> bool:
    """A directory the walk descends into: not a symlink to one (as ``os.walk``)."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def probe_image(path: Path) -> tuple[bytes, int, int, int]:
    """Raw sha256 digest of the file, its (width, height) after EXIF orientation (-1: unread)
    and its size in bytes.

    Hashes in blocks (a multi-GB file named .png costs a block of memory, not its size) and
    reads headers only, never pixels: a few-kB PNG can claim hundreds of megapixels. Callers
    that want Pillow's bomb and EXIF warnings silenced do so around the call
    (``scan_image_folder``). A file gone since it was listed raises
    :class:`FolderChangedDuringScan`.
    """
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the header is parsed
    except FileNotFoundError:
        raise FolderChangedDuringScan(
            f"{path}: was listed, then gone before it was hashed; the folder changed while it "
            "was scanned: register it again once it stops changing") from None
    with f:
        digest = hashlib.file_digest(f, "sha256").digest()
        size = f.tell()
        f.seek(0)
        try:
            with Image.open(f) as img:
                width, height = img.size
                if isinstance(img, TiffImagePlugin.TiffImageFile):
                    # Recent Pillow reports a TIFF's size already oriented (it orients the pixels
                    # on load), so swapping below would undo it; the stored dimensions are
                    # unoriented on every Pillow version.
                    width = img.tag_v2.get(_TIFF_WIDTH, width)
                    height = img.tag_v2.get(_TIFF_HEIGHT, height)
                # Image.getexif, not img.getexif: PngImageFile.getexif decodes every pixel to look
                # for an eXIf chunk after the image data. The base method reads what the header
                # parsing found (eXIf before IDAT, where encoders put it): probing costs no decode.
                if Image.Image.getexif(img).get(_EXIF_ORIENTATION) in _TRANSPOSED_ORIENTATIONS:
                    width, height = height, width
        except Exception:
            width = height = -1
    return digest, width, height, size


T = TypeVar("T")
R = TypeVar("R")
SCAN_WINDOW_PER_WORKER = 4  # files in flight per hashing thread: keeps them busy, bounds memory
# Probing holds the GIL for much of each file (Pillow's header parsing, Python's own work): threads
# alone use about one core (bench_scale: 20 CPU s in 22 s at 100k files on 2 cores). Large folders
# are hashed by processes, each with a few threads to overlap its reads.
SCAN_PROCESS_MIN_FILES = 4096  # smaller folders: threads only (starting processes costs ~1 s)
SCAN_BATCH = 256  # files per task sent to a hashing process
SCAN_THREADS_PER_PROCESS = 4

_process_pool: ThreadPoolExecutor | None = None  # in a hashing process: its threads


def _start_hashing_process(threads: int) -> None:
    global _process_pool
    warnings.simplefilter("ignore")  # this process's own filters: bomb and EXIF warnings
    _process_pool = ThreadPoolExecutor(max_workers=threads)
    # A hashing process lives only as long as the process that started it. A Celery task killed
    # at its hard time limit (SIGKILL) never shuts its pool down, and its hashing processes
    # would hash on, orphaned, for as long as the folder takes.
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True,
                         name="exit-with-parent").start()


def _exit_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # readable once the parent is gone
    os._exit(1)


def probe_batch(root: Path, paths: list[str]) -> tuple[bytes, bytes, bytes, bytes]:
    """``probe_image`` over a batch, in a hashing process: (digests, widths, heights, sizes) as
    the bytes of the scan's columns, so results cross the process boundary as four buffers."""
    assert _process_pool is not None, "probe_batch runs in a hashing process"
    digests, widths, heights, sizes = bytearray(), array("i"), array("i"), array("q")
    for digest, width, height, size in _process_pool.map(lambda p: probe_image(root / p),
                                                         paths):
        digests += digest
        widths.append(width)
        heights.append(height)
        sizes.append(size)
    return bytes(digests), widths.tobytes(), heights.tobytes(), sizes.tobytes()


def _batches(paths: Iterable[str], size: int) -> Iterator[list[str]]:
    items = iter(paths)
    while batch := list(itertools.islice(items, size)):
        yield batch


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
                      progress: Progress | None = None,
                      resume: PartialScan | None = None,
                      processes: int | None = None) -> Manifest:
    """Build the manifest of every image under ``root`` (``list_image_files``), in memory
    bounded by the result's compact columns (~70 bytes an image) plus a window of files in
    flight.

    When every image sits below a first-level directory (the torchvision ImageFolder layout), the
    sorted first-level directory names are the class names and give each image its class.

    ``progress(files_scanned, files_total)``, if given, is called from this thread: with a total
    of None while the tree is being listed (once per directory), then once per file hashed. It
    may raise to abandon the scan (files being read finish, the rest are not started); raising
    :class:`ScanPaused` hands the rows hashed so far back on the exception, and a later scan
    given them as ``resume`` hashes only the rest (a folder listing other files starts over).

    ``processes``: hashing processes (each with ``SCAN_THREADS_PER_PROCESS`` threads), 0 for
    ``max_workers`` threads in this process; by default one per CPU for folders of at least
    ``SCAN_PROCESS_MIN_FILES`` files, else threads.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    listing = list_image_files(root, confine_to, progress)
    total = len(listing.paths)
    digests, widths, heights, sizes = bytearray(), array("i"), array("i"), array("q")
    # The listing's digest, once: a sha256 over every path (~1 GB of them at ImageNet-21k).
    listing_digest = listing.digest() if resume is not None else None
    if resume is not None and len(resume) <= total and resume.listing == listing_digest:
        # Appended from the arrays' own buffers: copies of them would be ~0.5 GB at 14.2M. The
        # digests flattened first: a memoryview of shape [0, 32] cannot be cast to bytes.
        digests += np.ascontiguousarray(resume.sha256, np.uint8).reshape(-1).data
        widths.frombytes(np.ascontiguousarray(resume.width, np.int32).data.cast("B"))
        heights.frombytes(np.ascontiguousarray(resume.height, np.int32).data.cast("B"))
        sizes.frombytes(np.ascontiguousarray(resume.size, np.int64).data.cast("B"))
    resumed = len(widths)
    # Hashing and header parsing are I/O bound: threads overlap them (hashlib releases the GIL).
    # Warnings are silenced here, once, in this thread: catch_warnings swaps a process-global
    # filter list, so entering it in each pool thread interleaves and can leave "ignore all
    # warnings" installed for the rest of the process.
    if processes is None:
        processes = (os.cpu_count() or 1) if total - resumed >= SCAN_PROCESS_MIN_FILES else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bomb and EXIF warnings: sizes come from the header
        pool: Executor
        if processes:
            # spawn: a registration runs inside a Celery worker with threads of its own, which
            # fork would copy mid-state.
            pool = ProcessPoolExecutor(
                max_workers=processes, mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_hashing_process, initargs=(SCAN_THREADS_PER_PROCESS,))
            results = ordered_map(pool, functools.partial(probe_batch, root),
                                  _batches(listing.paths[resumed:], SCAN_BATCH),
                                  window=2 * processes)
        else:
            pool = ThreadPoolExecutor(max_workers=max_workers)
            results = ((digest, width.to_bytes(4, sys.byteorder, signed=True),
                        height.to_bytes(4, sys.byteorder, signed=True),
                        size.to_bytes(8, sys.byteorder, signed=True))
                       for digest, width, height, size in ordered_map(
                           pool, lambda p: probe_image(root / p), listing.paths[resumed:],
                           window=SCAN_WINDOW_PER_WORKER * max_workers))
        try:
            if progress is not None:
                progress(resumed, total)
            for digest, width, height, size in results:  # one file, or a process's batch
                digests += digest
                widths.frombytes(width)
                heights.frombytes(height)
                sizes.frombytes(size)
                if progress is not None:
                    progress(len(widths), total)
        except ScanPaused as paused:
            # Views of the columns (nothing is appended to them after this), not copies.
            paused.partial = PartialScan(
                listing_digest or listing.digest(),
                np.frombuffer(digests, np.uint8).reshape(-1, 32),
                np.frombuffer(widths, np.int32), np.frombuffer(heights, np.int32),
                np.frombuffer(sizes, np.int64))
            raise
        finally:
            # On an error (an unreadable file, progress raising) drop the files not started yet
            # rather than hashing the rest of the tree before the error surfaces.
            pool.shutdown(wait=True, cancel_futures=True)

    class_names, labels = listing.classes()
    return Manifest(
        path=listing.paths,
        sha256=np.frombuffer(digests, np.uint8).reshape(total, 32),  # shared, not copied
        width=np.frombuffer(widths, np.int32),
        height=np.frombuffer(heights, np.int32),
        label=labels,
        class_names=class_names,
        size=np.frombuffer(sizes, np.int64),
        skipped=listing.skipped,
    )
