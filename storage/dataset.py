"""Datasets: a registered image folder (its manifest) and the label sets made from it."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from storage.errors import StoreError
from storage.labelset import LabelSet, LabelSetConfig
from storage.manifest import Manifest
from storage.splits import split_bucket

MANIFEST_CHUNK = 65536  # rows per manifest chunk: paths compress well and are read whole
# Stored column name -> Manifest attribute ("class" is a Python keyword).
MANIFEST_COLUMNS = {"path": "path", "sha256": "sha256", "width": "width", "height": "height",
                    "class": "label"}


class Dataset:
    """``datasets/<name>/``: attrs, the ``manifest/`` columns and ``labels/<id>/`` label sets."""

    def __init__(self, group: zarr.Group, code_version: str):
        self.group = group
        self.attrs: dict[str, Any] = group.attrs.asdict()
        if "fingerprint" not in self.attrs:
            raise StoreError(f"dataset at {group.path} is incomplete (its registration did not "
                             "finish); register it again")
        self.name: str = self.attrs["name"]
        self.num_images: int = self.attrs["num_images"]
        self.fingerprint: str = self.attrs["fingerprint"]
        self.class_names: tuple[str, ...] = tuple(self.attrs["class_names"])
        self.source_root: str = self.attrs["source_root"]
        self.code_version = code_version
        self._manifest: Manifest | None = None

    @classmethod
    def write(cls, group: zarr.Group, name: str, manifest: Manifest, source_root: str,
              code_version: str) -> Dataset:
        """Write the manifest columns, then the attrs; attrs present means registration finished."""
        n = len(manifest)
        columns = group.require_group("manifest")
        for stored, attr in MANIFEST_COLUMNS.items():
            values = getattr(manifest, attr)
            dtype = str if values.dtype.kind in "UTO" else values.dtype
            arr = columns.create_array(stored, shape=(n,), dtype=dtype,
                                       chunks=(max(1, min(n, MANIFEST_CHUNK)),),
                                       compressors=(ZstdCodec(level=5),), overwrite=True)
            if n:
                arr[:] = values
        write_split_buckets(columns, manifest.path)
        group.require_group("labels")
        group.update_attributes({  # one write: MutableMapping.update would write per key
            "kind": "dataset",
            "name": name,
            "num_images": n,
            "fingerprint": manifest.fingerprint(),
            "class_names": list(manifest.class_names),
            "source_root": source_root,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "code_version": code_version,
        })
        return cls(group, code_version)

    def manifest(self) -> Manifest:
        if self._manifest is None:
            columns = self.group["manifest"]
            values = {attr: np.asarray(columns[stored][:]) for stored, attr
                      in MANIFEST_COLUMNS.items()}
            for attr in ("path", "sha256"):
                values[attr] = np.array(values[attr].tolist(), dtype=str)
            self._manifest = Manifest(**values, class_names=self.class_names)
        return self._manifest

    def split_buckets(self) -> np.ndarray:
        """Every image's held-out bucket (``storage.splits.split_bucket``, 0..999), int16:
        stored at registration (``manifest/bucket``), so no reader hashes millions of paths at
        start; computed (and stored, where the store is writable) for datasets registered
        before it was."""
        columns = self.group["manifest"]
        if "bucket" in columns.array_keys():
            return np.asarray(columns["bucket"][:], dtype=np.int64)
        buckets = split_bucket(self.manifest().path)
        with contextlib.suppress(Exception):  # a read-only store: computed every time
            write_split_buckets(zarr.open_group(store=columns.store, path=columns.path,
                                                mode="r+"), self.manifest().path, buckets)
        return buckets

    def held_out(self, permille: int) -> np.ndarray:
        """The held-out split at ``permille`` (``storage.splits.held_out``), from the buckets."""
        return self.split_buckets() < permille

    def image_path(self, index: int) -> str:
        """One image's relative path, read alone (the API's single-image routes): the whole
        manifest is tens of MB at ImageNet scale."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} outside [0, {self.num_images})")
        if self._manifest is not None:
            return str(self._manifest.path[index])
        return str(self.group["manifest"]["path"][index])

    def image_sha256(self, index: int) -> str:
        """One image's registered sha256, read alone (as :meth:`image_path`)."""
        if not 0 <= index < self.num_images:
            raise IndexError(f"image {index} outside [0, {self.num_images})")
        if self._manifest is not None:
            return str(self._manifest.sha256[index])
        return str(self.group["manifest"]["sha256"][index])

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


def write_split_buckets(columns: zarr.Group, paths: np.ndarray,
                        buckets: np.ndarray | None = None) -> None:
    """The ``manifest/bucket`` column: each path's held-out bucket (0..999) as int16."""
    buckets = split_bucket(paths) if buckets is None else buckets
    n = len(paths)
    arr = columns.create_array("bucket", shape=(n,), dtype=np.int16,
                               chunks=(max(1, min(n, MANIFEST_CHUNK)),),
                               compressors=(ZstdCodec(level=5),), overwrite=True)
    if n:
        arr[:] = buckets.astype(np.int16)
