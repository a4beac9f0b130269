"""Datasets: a registered image folder (its manifest) and the label sets made from it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.errors import DatasetUnfinished, ManifestDamaged, StoreError
from storage.labelset import LabelSet, LabelSetConfig
from storage.manifest import Manifest, PathColumn, SkippedNames, manifest_fingerprint
from storage.splits import split_bucket

MANIFEST_CHUNK = 65536  # rows per manifest chunk: paths compress well and are read whole
PATH_BYTES_CHUNK = 1 << 22  # bytes per chunk of manifest/path_utf8
# Manifest layouts (dataset attr ``manifest_version``, absent = 1): docs/store-format.md.
# 1: path and sha256 as Zarr strings; 2: path as UTF-8 bytes + end offsets, sha256 as 32 bytes.
MANIFEST_VERSION = 2
NUMBER_COLUMNS = {"width": "width", "height": "height", "class": "label"}  # stored -> attribute


class Dataset:
    """``datasets/<name>/``: attrs, the ``manifest/`` columns and ``labels/<id>/`` label sets.

    Readers take the columns they need (``paths``, ``sha256``, ``column``), for the rows they
    need: a labeling worker reads its shards' rows, the trainer no hashes."""

    def __init__(self, group: zarr.Group, code_version: str):
        self.group = group
        self.attrs: dict[str, Any] = group.attrs.asdict()
        if "fingerprint" not in self.attrs:
            raise DatasetUnfinished(f"dataset {group.basename!r} is unfinished: its registration "
                                    "is in progress, paused, or was interrupted (registering it "
                                    "again finishes or replaces it)")
        self.name: str = self.attrs["name"]
        self.num_images: int = self.attrs["num_images"]
        self.fingerprint: str = self.attrs["fingerprint"]
        self.class_names: tuple[str, ...] = tuple(self.attrs["class_names"])
        self.source_root: str = self.attrs["source_root"]
        self.manifest_version: int = self.attrs.get("manifest_version", 1)
        if self.manifest_version not in (1, MANIFEST_VERSION):
            raise StoreError(f"dataset {self.name!r} has manifest version "
                             f"{self.manifest_version}; this code reads 1 and {MANIFEST_VERSION}")
        self.code_version = code_version

    @classmethod
    def write(cls, group: zarr.Group, name: str, manifest: Manifest, source_root: str,
              code_version: str) -> Dataset:
        """Write the manifest columns, then the attrs; attrs present means registration finished."""
        columns = group.require_group("manifest")
        n = len(manifest)
        write_column(columns, "path_utf8", manifest.path.data, chunk=PATH_BYTES_CHUNK)
        write_column(columns, "path_end", manifest.path.ends)
        write_column(columns, "sha256", manifest.sha256)
        for stored, attr in NUMBER_COLUMNS.items():
            write_column(columns, stored, getattr(manifest, attr))
        if manifest.size is not None:
            write_column(columns, "size", manifest.size)
        write_column(columns, "bucket", split_bucket(manifest.path))
        group.require_group("labels")
        attrs = {
            "kind": "dataset",
            "name": name,
            "num_images": n,
            "fingerprint": manifest.fingerprint(),
            "class_names": list(manifest.class_names),
            "source_root": source_root,
            "manifest_version": MANIFEST_VERSION,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "code_version": code_version,
        }
        if manifest.skipped is not None and manifest.skipped.count:
            attrs["skipped_names"] = {"count": manifest.skipped.count,
                                      "examples": manifest.skipped.examples}
        group.update_attributes(attrs)  # one write: MutableMapping.update would write per key
        return cls(group, code_version)

    @property
    def skipped_names(self) -> SkippedNames | None:
        """What the registration left out for its names (``storage.manifest.is_listable_name``),
        if anything."""
        recorded = self.attrs.get("skipped_names")
        if not isinstance(recorded, dict):
            return None
        return SkippedNames(int(recorded.get("count", 0)), list(recorded.get("examples", [])))

    @property
    def _columns(self) -> zarr.Group:
        return self.group["manifest"]

    def _rows(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.num_images if stop is None else stop
        if not 0 <= start <= stop <= self.num_images:
            raise IndexError(f"rows [{start}, {stop}) outside [0, {self.num_images})")
        return start, stop

    def paths(self, start: int = 0, stop: int | None = None) -> PathColumn:
        """The relative paths of rows [start, stop): two reads (offsets, then their bytes)."""
        start, stop = self._rows(start, stop)
        columns = self._columns
        if self.manifest_version == 1:
            return PathColumn.from_strings(columns["path"][start:stop].tolist())
        if start == stop:
            return PathColumn(np.zeros(0, np.uint8), np.zeros(0, np.int64))
        # The offsets before and after the rows too: each row's path is checked against both
        # of its neighbours, so two swapped offsets are caught from either row.
        around = np.asarray(columns["path_end"][max(0, start - 1):stop + 1], dtype=np.int64)
        low = int(around[0]) if start else 0
        ends = around[1 if start else 0:][:stop - start]
        following = around[len(ends) + (1 if start else 0):]
        data = np.asarray(columns["path_utf8"][low:int(ends[-1])], dtype=np.uint8)
        # Offsets out of order or past the bytes would give paths glued together or cut short,
        # for images said to be labeled: refuse them (O(rows read), nothing more).
        if low < 0 or len(ends) != stop - start or len(data) != int(ends[-1]) - low or \
                (np.diff(ends, prepend=low) <= 0).any() or \
                (len(following) and following[0] <= ends[-1]):
            raise ManifestDamaged(self.name, f"path offsets of rows [{start}, {stop}) are out "
                                             "of order or past the path bytes")
        return PathColumn(data, ends - low if low else ends)  # no copy of a whole column

    def sha256(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The registered raw sha256 digests of rows [start, stop): uint8 [n, 32]."""
        start, stop = self._rows(start, stop)
        values = self._columns["sha256"][start:stop]
        if self.manifest_version == 1:
            hexes = values.tolist()
            if any(len(h) != 64 for h in hexes):
                raise ManifestDamaged(self.name, "a sha256 string is not 64 hex digits")
            try:
                return np.frombuffer(bytes.fromhex("".join(hexes)), np.uint8).reshape(-1, 32)
            except ValueError:
                raise ManifestDamaged(self.name, "a sha256 string is not hex") from None
        if values.shape != (stop - start, 32):
            raise ManifestDamaged(self.name, f"the sha256 column has shape "
                                             f"{self._columns['sha256'].shape}, not "
                                             f"({self.num_images}, 32)")
        return np.asarray(values, dtype=np.uint8)

    def sizes(self, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """The registered byte sizes of rows [start, stop), int64; None for a dataset
        registered before sizes were recorded (readers then cap nothing by size)."""
        start, stop = self._rows(start, stop)
        try:  # one metadata read: listing the group's arrays would read every column's
            column = self._columns["size"]
        except KeyError:
            return None
        values = np.asarray(column[start:stop], dtype=np.int64)
        if values.shape != (stop - start,):
            raise ManifestDamaged(self.name, f"the size column has shape {column.shape}, not "
                                             f"({self.num_images},)")
        return values

    def column(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """A number column (``width``, ``height``, ``class``) of rows [start, stop), int32."""
        if name not in NUMBER_COLUMNS:
            raise KeyError(f"no manifest column {name!r}; number columns: "
                           f"{', '.join(NUMBER_COLUMNS)}")
        start, stop = self._rows(start, stop)
        return np.asarray(self._columns[name][start:stop], dtype=np.int32)

    def manifest(self, start: int = 0, stop: int | None = None) -> Manifest:
        """Every column of rows [start, stop) (default: the whole manifest)."""
        return Manifest(self.paths(start, stop), self.sha256(start, stop),
                        width=self.column("width", start, stop),
                        height=self.column("height", start, stop),
                        label=self.column("class", start, stop), class_names=self.class_names,
                        size=self.sizes(start, stop))

    def manifest_chunks(self, rows: int = MANIFEST_CHUNK * 16) -> Iterator[Manifest]:
        """The whole manifest as consecutive chunks of ``rows`` rows: bounded memory."""
        for start in range(0, self.num_images, rows):
            yield self.manifest(start, min(start + rows, self.num_images))

    def computed_fingerprint(self) -> str:
        """The fingerprint of the stored manifest, computed chunk by chunk (``verify``)."""
        return manifest_fingerprint(self.class_names, (
            part for chunk in self.manifest_chunks() for part in chunk.chunks()))

    def split_buckets(self) -> np.ndarray:
        """Every image's held-out bucket (``storage.splits.split_bucket``, 0..999), int16:
        stored at registration (``manifest/bucket``), so no reader hashes millions of paths at
        start; computed (and stored, where the store is writable) for datasets registered
        before it was."""
        columns = self._columns
        if "bucket" in columns.array_keys():
            return np.asarray(columns["bucket"][:], dtype=np.int16)
        buckets = split_bucket(self.paths())
        with contextlib.suppress(Exception):  # a read-only store: computed every time
            write_column(zarr.open_group(store=columns.store, path=columns.path, mode="r+"),
                         "bucket", buckets)
        return buckets

    def held_out(self, permille: int) -> np.ndarray:
        """The held-out split at ``permille`` (``storage.splits.held_out``), from the buckets."""
        return self.split_buckets() < permille

    def image_path(self, index: int) -> str:
        """One image's relative path, read alone (the API's single-image routes)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} outside [0, {self.num_images})")
        return self.paths(index, index + 1)[0]

    def image_sha256(self, index: int) -> bytes:
        """One image's registered raw sha256, read alone (as :meth:`image_path`)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} outside [0, {self.num_images})")
        return self.sha256(index, index + 1)[0].tobytes()

    # -- label sets -------------------------------------------------------------------------

    def labelset_ids(self) -> list[str]:
        return sorted(self.group["labels"].group_keys())

    def labelset(self, labelset_id: str) -> LabelSet:
        labels = self.group["labels"]
        if labelset_id not in labels.group_keys():
            raise KeyError(f"dataset {self.name!r} has no label set {labelset_id!r}")
        return LabelSet(labels[labelset_id])

    def create_labelset(self, config: LabelSetConfig) -> LabelSet:
        """Create (or open, if it exists with the same configuration) a label set."""
        if config.dataset_fingerprint != self.fingerprint:
            raise StoreError(f"label set is for dataset fingerprint {config.dataset_fingerprint}, "
                             f"but {self.name!r} has {self.fingerprint}")
        return LabelSet.create(self.group["labels"], self.name, self.num_images, config,
                               self.code_version)


def write_column(columns: zarr.Group, name: str, values: np.ndarray,
                 chunk: int | None = None) -> zarr.Array:
    """One manifest column, chunked along its first axis (``MANIFEST_CHUNK`` rows unless
    given) and zstd-compressed, replacing any."""
    n, chunk = len(values), MANIFEST_CHUNK if chunk is None else chunk
    arr = columns.create_array(name, shape=values.shape, dtype=values.dtype,
                               chunks=(max(1, min(n, chunk)), *values.shape[1:]),
                               compressors=(ZstdCodec(level=5),), overwrite=True)
    if n:
        arr[:] = values
    return arr
