"""The store: a Zarr v3 group at a local path or an fsspec URL. See docs/store-format.md."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from storage.dataset import Dataset, write_column
from storage.errors import DatasetChangedError, StoreError
from storage.labelset import LabelSet
from storage.manifest import Manifest, PartialScan, Progress, ScanPaused, scan_image_folder

FORMAT = "tokenlabel-store"
FORMAT_VERSION = 2  # docs/store-format.md; 2: compact manifests (dataset manifest_version 2)
SCAN_GROUP = "scan"  # datasets/<name>/scan/: a paused registration's rows (store-format.md)
PARTIAL_SCAN_COLUMNS = ("sha256", "width", "height", "size")  # PartialScan's, as stored
READABLE_VERSIONS = (1, 2)  # a version-1 store's datasets keep their layout and stay readable
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def code_version() -> str:
    try:
        return version("tokenlabel")
    except PackageNotFoundError:
        return "unknown"


def check_name(name: str, what: str = "dataset") -> str:
    if not _NAME.match(name):
        raise ValueError(f"invalid {what} name {name!r}: use letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit, at most 128 characters")
    if name.lower().endswith(".json"):  # zarr.json, and other metadata documents' names
        raise ValueError(f"invalid {what} name {name!r}: names ending in .json are reserved by "
                         "the store's layout")
    return name


def _open_root(location: str, mode: str) -> zarr.Group:
    if "://" in location:
        options = {"auto_mkdir": True} if location.startswith("file://") else {}
        if mode == "r":
            options = {}
        return zarr.open_group(location, mode=mode, zarr_format=3, storage_options=options)
    return zarr.open_group(location, mode=mode, zarr_format=3)


class Store:
    """A tokenlabel store; ``Store.open(location)`` creates it when missing (not in mode "r")."""

    def __init__(self, root: zarr.Group, location: str):
        self.root = root
        self.location = location
        self.code_version = code_version()

    @classmethod
    def open(cls, location: str | Path, mode: str = "a") -> Store:
        location = str(location)
        try:
            root = _open_root(location, mode)
        except FileNotFoundError:
            raise StoreError(f"no store at {location}") from None
        attrs = root.attrs.asdict()
        if not attrs and mode != "r" and not list(root.keys()):
            root.update_attributes({"format": FORMAT, "format_version": FORMAT_VERSION})
            root.require_group("datasets")
        elif attrs.get("format") != FORMAT:
            raise StoreError(f"{location} is not a tokenlabel store (root attrs: {attrs})")
        elif attrs.get("format_version") not in READABLE_VERSIONS:
            raise StoreError(f"{location} has store format version {attrs.get('format_version')}; "
                             f"this code reads versions "
                             f"{', '.join(map(str, READABLE_VERSIONS))}")
        return cls(root, location)

    @property
    def format_version(self) -> int:
        return int(self.root.attrs["format_version"])

    def check_writable(self) -> None:
        """Write and delete a small probe object; StoreError saying so if the store refuses
        (a read-only mount, a full disk, no permission)."""
        key = f"probe-{os.getpid()}-{secrets.token_hex(4)}"
        store = self.root.store_path.store
        try:
            sync(store.set(key, default_buffer_prototype().buffer.from_bytes(b"probe")))
            sync(store.delete(key))
        except Exception as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
            raise StoreError(f"the store cannot be written ({reason})") from None

    # -- datasets ---------------------------------------------------------------------------

    def dataset_names(self) -> list[str]:
        """Every dataset's name: one listing of ``datasets/`` and a look for each entry's group
        document (group_keys reads and parses each dataset's metadata: most of a dataset
        listing's cost at hundreds of datasets). A folder without one (left by a crash before
        its group was written) is no dataset."""
        datasets = self.root["datasets"]
        store, prefix = datasets.store_path.store, datasets.store_path.path

        async def names() -> list[str]:
            listed = [name async for name in store.list_dir(prefix) if _NAME.match(name)
                      and not name.lower().endswith(".json")]
            found = await asyncio.gather(*(store.exists(f"{prefix}/{name}/zarr.json")
                                           for name in listed))
            return [name for name, exists in zip(listed, found, strict=True) if exists]

        return sorted(sync(names()))

    def dataset(self, name: str) -> Dataset:
        # One read of the group's metadata: listing every dataset first was most of the cost of
        # the API's requests (several lookups each).
        group = None
        if _NAME.match(name):
            with contextlib.suppress(KeyError):
                group = self.root[f"datasets/{name}"]
        if not isinstance(group, zarr.Group):
            raise KeyError(f"no dataset {name!r} in store {self.location}")
        return Dataset(group, self.code_version)

    def add_dataset(self, name: str, directory: str | Path, manifest: Manifest | None = None,
                    confine_to: str | Path | None = None, progress: Progress | None = None,
                    resume_key: str | None = None) -> tuple[Dataset, bool]:
        """Register the images under ``directory`` as dataset ``name``: scan, then write.

        The one registration path: ``labeler datasets add`` calls it in-process, the service's
        ``labeler.register_dataset`` task on a worker (with ``confine_to`` its data root and a
        ``progress`` callback, both passed to ``scan_image_folder``).

        Returns (dataset, created). Registering an unchanged directory again is a no-op; a
        directory whose contents changed is refused, so labels never mix two sets of images.
        Running it again after it was interrupted (a worker killed mid-write) rewrites the
        unfinished dataset: the attrs are written last and mark it complete.

        ``resume_key``: a scan that ``progress`` pauses (raising ``ScanPaused``: a task nearing
        its time limit) keeps the rows hashed so far in the unfinished dataset
        (``datasets/<name>/scan/``), and the next call with the same key goes on from them (the
        service's key is the registration attempt: a new attempt hashes every file again).
        """
        check_name(name)
        directory = Path(directory).resolve()
        if manifest is None:
            resume = self.partial_scan(name, resume_key) if resume_key else None
            try:
                manifest = scan_image_folder(directory, confine_to=confine_to,
                                             progress=progress, resume=resume)
            except ScanPaused as paused:
                if resume_key and paused.partial is not None and \
                        len(paused.partial) > len(resume or ()):
                    self._keep_partial_scan(name, paused.partial, resume_key)
                raise
        datasets = self.root["datasets"]
        if name in datasets.group_keys():
            group = datasets[name]
            if "fingerprint" in group.attrs:
                existing = Dataset(group, self.code_version)
                if existing.fingerprint == manifest.fingerprint():
                    return existing, False
                raise DatasetChangedError(
                    f"dataset {name!r} is already registered and {directory} has changed since "
                    f"({existing.manifest().diff(manifest)}); labels would no longer match the "
                    f"images. Register the new contents under another name."
                )
        if self.format_version < FORMAT_VERSION:
            # Before the first version-2 dataset is written: a reader of version 1 then refuses
            # the store instead of misreading that dataset.
            self.root.update_attributes({"format_version": FORMAT_VERSION})
        group = datasets.require_group(name)
        if SCAN_GROUP in group.group_keys():
            del group[SCAN_GROUP]  # before the attrs: a complete dataset has no partial scan
        return Dataset.write(group, name, manifest, str(directory), self.code_version), True

    def partial_scan(self, name: str, key: str) -> PartialScan | None:
        """The rows a paused registration of ``name`` kept under ``key``, if any."""
        try:
            group = self.root[f"datasets/{name}"]
            if "fingerprint" in group.attrs or SCAN_GROUP not in group.group_keys():
                return None
            scan = group[SCAN_GROUP]
            rows, listing = scan.attrs.get("rows"), scan.attrs.get("listing")
            if scan.attrs.get("key") != key or not isinstance(rows, int) or \
                    not isinstance(listing, str):
                return None  # a pause that did not finish writing: start over
            # a pause kept before sizes were recorded has no size column: start over
            columns = {column: scan[column][:rows] for column in PARTIAL_SCAN_COLUMNS}
        except (KeyError, ValueError, OSError):
            return None
        if any(len(column) != rows for column in columns.values()):
            return None
        return PartialScan(listing, np.asarray(columns["sha256"], np.uint8),
                           np.asarray(columns["width"], np.int32),
                           np.asarray(columns["height"], np.int32),
                           np.asarray(columns["size"], np.int64))

    def _keep_partial_scan(self, name: str, partial: PartialScan, key: str) -> None:
        group = self.root["datasets"].require_group(name)  # no attrs: an unfinished dataset
        if "fingerprint" in group.attrs:
            return
        scan = group.require_group(SCAN_GROUP)
        scan.update_attributes({"rows": None, "listing": None, "key": None})  # until rewritten
        for column in PARTIAL_SCAN_COLUMNS:
            write_column(scan, column, getattr(partial, column))
        scan.update_attributes({"rows": len(partial), "listing": partial.listing, "key": key})

    # -- label sets -------------------------------------------------------------------------

    def labelset(self, labelset_id: str) -> LabelSet:
        """Find a label set by id (ids are unique in a store): through the index
        (``index/labelsets/<id>``, docs/store-format.md) in one read, else by looking in every
        dataset once, which then records it in the index."""
        try:
            dataset = self.root[f"index/labelsets/{labelset_id}"].attrs["dataset"]
            return LabelSet(self.root[f"datasets/{dataset}/labels/{labelset_id}"])
        except KeyError:
            pass  # not indexed yet (or the index is stale): look, then record
        for name in self.dataset_names():
            group = self.root["datasets"][name]
            if "labels" not in group.group_keys():  # a dataset still being written
                continue
            labels = group["labels"]
            if labelset_id in labels.group_keys():
                with contextlib.suppress(Exception):  # a read-only store: no index, still found
                    self.root.require_group("index").require_group("labelsets").require_group(
                        labelset_id, overwrite=False).update_attributes({"dataset": name})
                return LabelSet(labels[labelset_id])
        raise KeyError(f"no label set {labelset_id!r} in store {self.location}")
