"""Label sets: dense top-K teacher labels for every image of one dataset.

Every array has the image axis first and is split into shards of ``shard_size`` images along it;
each shard of each array is one object in the store. A shard has exactly one writer at a time
(whoever holds that shard's task), writes it whole in one call per array, and writes ``status``
last: a shard whose status still reads -1 is not done, whatever else is on disk. So a crashed,
repeated or concurrent writer can leave stale data behind but never a shard that looks finished
and is not.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.sync import sync
from zarr.errors import ContainsArrayError, ContainsGroupError

from storage.errors import LabelSetMismatchError, ShardUnreadable, StoreError
from storage.status import ImageStatus

# fp16 logits compress best with bit shuffling; small integers compress best without shuffling.
_FLOAT_CODECS = (BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"),)
_INT_CODECS = (ZstdCodec(level=5),)
DEFAULT_SHARD_SIZE = 1024
DEFAULT_CHUNK_SIZE = 256  # images per inner chunk: see BENCHMARKS.md (store, chunk-size sweep)


@dataclass(frozen=True)
class TeacherSpec:
    """Everything about the teacher and its input geometry that determines the labels."""

    model: str
    checkpoint_sha256: str | None
    num_classes: int
    input_size: int
    class_names: tuple[str, ...] = ()
    # How the whole image becomes the teacher's input: "squash" resizes the full image to
    # input_size x input_size (no crop), so grid cell (i, j) covers the same fraction of the image
    # whatever its aspect ratio. Imported TokenLabeling labels are "center_crop".
    resize: str = "squash"
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # The backbone's autocast dtype (bf16, fp16 or fp32); the head is always float32.
    precision: str = "fp32"
    # A dilated teacher (timm's ``output_stride``): a denser grid from the same input. None is
    # the model's own stride; left out of the attrs then, so ids made before it stay the same.
    output_stride: int | None = None

    def grid_box(self, width: float, height: float) -> tuple[float, float, float, float]:
        """The rectangle ``(x0, y0, span_x, span_y)`` of an image of ``width x height`` pixels
        that the label grid covers: the whole image (``squash``) or its central square
        (``center_crop``). Cell (i, j) of an ``h x w`` grid covers ``x in [x0 + j span_x / w,
        x0 + (j + 1) span_x / w)`` and likewise in y."""
        if self.resize == "squash":
            return 0.0, 0.0, float(width), float(height)
        if self.resize == "center_crop":
            side = float(min(width, height))
            return (width - side) / 2, (height - side) / 2, side, side
        raise ValueError(f"unknown label geometry resize={self.resize!r}")

    def to_attrs(self) -> dict[str, Any]:
        d = asdict(self)
        if d["output_stride"] is None:
            del d["output_stride"]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> TeacherSpec:
        names = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in attrs.items() if k in names}
        return cls(**values)


def class_dtype(num_classes: int) -> np.dtype:
    """int16 class ids where they fit (half the bytes of int32), else int32."""
    return np.dtype(np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32)


@dataclass
class LabelBlock:
    """Labels of images ``start .. start + len(status)``, as numpy arrays (leading axis = image)."""

    start: int
    logits: np.ndarray  # float16 [n, K, H, W], descending along K
    classes: np.ndarray  # int16/int32 [n, K, H, W]
    lse: np.ndarray  # float32 [n, H, W], logsumexp over all classes
    global_logits: np.ndarray  # float32 [n, K]
    global_classes: np.ndarray  # int16/int32 [n, K]
    status: np.ndarray  # int8 [n], see ImageStatus

    def __len__(self) -> int:
        return len(self.status)

    @property
    def stop(self) -> int:
        return self.start + len(self)

    def top1_probability(self) -> np.ndarray:
        """p(top-1) per cell, float32 [n, H, W]: ``exp(logit - lse)``, exact, where the logsumexp
        is known; the softmax over the stored top-K where it is not (imported labels)."""
        logits = self.logits.astype(np.float32)
        with np.errstate(invalid="ignore", over="ignore"):
            exact = np.exp(logits[:, 0] - self.lse)
            shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
            fallback = shifted[:, 0] / shifted.sum(axis=1)
        return np.where(np.isfinite(self.lse), exact, fallback)


# Attrs added after labeling, by ``LabelSet.record_summary`` (see docs/store-format.md).
SUMMARY_ATTRS = ("agreement", "label_quality", "completion")
IMPORTED_SOURCE = "tokenlabeling-import"  # the ``source`` attr of imported label sets


@dataclass(frozen=True)
class ArraySpec:
    """One label array: its per-image shape, dtype, "not written" fill value and codecs."""

    shape: tuple[int, ...]
    dtype: np.dtype
    fill: float
    codecs: tuple


def array_specs(topk: int, grid: tuple[int, int], num_classes: int) -> dict[str, ArraySpec]:
    """The arrays of a label set: the one table of them. ``ARRAY_NAMES`` (and so the store's
    reads and writes, verify, the importer's blocks, the labeler's outputs and the REST image
    route) follow its order, status last. ``LabelBlock`` has one field per array, in order."""
    (h, w), cdt = grid, class_dtype(num_classes)
    f16, f32, i8 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.int8)
    return {
        "logits": ArraySpec((topk, h, w), f16, np.nan, _FLOAT_CODECS),
        "classes": ArraySpec((topk, h, w), cdt, -1, _INT_CODECS),
        "lse": ArraySpec((h, w), f32, np.nan, _FLOAT_CODECS),
        "global_logits": ArraySpec((topk,), f32, np.nan, _FLOAT_CODECS),
        "global_classes": ArraySpec((topk,), cdt, -1, _INT_CODECS),
        "status": ArraySpec((), i8, int(ImageStatus.PENDING), _INT_CODECS),
    }


ARRAY_NAMES = tuple(array_specs(1, (1, 1), 2))
LABEL_ARRAYS = ARRAY_NAMES[:-1]  # what a teacher writes; ``status`` records each image's outcome


@dataclass(frozen=True)
class LabelSetConfig:
    """What a label set is: the teacher, top-K and the label grid, for one dataset."""

    teacher: TeacherSpec
    topk: int
    grid: tuple[int, int]
    dataset_fingerprint: str
    shard_size: int = DEFAULT_SHARD_SIZE
    chunk_size: int | None = None  # None: the largest divisor of shard_size <= the default
    extra: dict[str, Any] = field(default_factory=dict)

    def labelset_id(self, dataset_name: str) -> str:
        """Deterministic id: the same dataset, teacher and top-K always map to the same label set.

        Storage layout (shard and chunk sizes) is deliberately left out: it changes no label.
        """
        key = json.dumps(
            {"dataset": dataset_name, "fingerprint": self.dataset_fingerprint,
             "teacher": self.teacher.to_attrs(), "topk": self.topk, "grid": list(self.grid)},
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        model = self.teacher.model.replace("/", "_")
        return f"{model}-{self.teacher.input_size}px-top{self.topk}-{digest}"


class LabelSet:
    """One label set in a store: ``datasets/<dataset>/labels/<id>/``."""

    def __init__(self, group: zarr.Group):
        self.group = group
        attrs = group.attrs.asdict()
        if attrs.get("kind") != "labelset":
            raise StoreError(f"{group.path} is not a tokenlabel label set")
        self.attrs = attrs
        self.id: str = attrs["id"]
        self.dataset: str = attrs["dataset"]
        self.teacher = TeacherSpec.from_attrs(attrs["teacher"])
        self.topk: int = attrs["topk"]
        self.grid: tuple[int, int] = tuple(attrs["grid"])
        self.num_images: int = attrs["num_images"]
        self.shard_size: int = attrs["shard_size"]
        self.dataset_fingerprint: str = attrs["dataset_fingerprint"]
        self.specs = array_specs(self.topk, self.grid, self.teacher.num_classes)
        self._arrays: dict[str, zarr.Array] = {}

    # -- creation ---------------------------------------------------------------------------

    @classmethod
    def create(cls, parent: zarr.Group, dataset_name: str, num_images: int,
               config: LabelSetConfig, code_version: str) -> LabelSet:
        """Create the label set, or open it when one with the same configuration exists.

        Safe to call from many processes at once: they all compute the same id, attrs and arrays,
        and an existing array is never overwritten, only checked.
        """
        chunk_size = config.chunk_size or math.gcd(config.shard_size, DEFAULT_CHUNK_SIZE)
        if config.shard_size % chunk_size:
            raise ValueError(f"shard_size {config.shard_size} must be a multiple of "
                             f"chunk_size {chunk_size}")
        if not 1 <= config.topk <= config.teacher.num_classes:
            raise ValueError(
                f"topk must be in [1, {config.teacher.num_classes}], got {config.topk}")
        labelset_id = config.labelset_id(dataset_name)
        attrs = {
            "kind": "labelset",
            "id": labelset_id,
            "dataset": dataset_name,
            "teacher": config.teacher.to_attrs(),
            "topk": config.topk,
            "grid": list(config.grid),
            "num_images": num_images,
            "shard_size": config.shard_size,
            "chunk_size": chunk_size,
            "dataset_fingerprint": config.dataset_fingerprint,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "code_version": code_version,
            **config.extra,
        }
        # Group metadata and attributes go in one write, so a label set group always has attrs.
        try:
            group = parent.create_group(labelset_id, attributes=attrs)
        except ContainsGroupError:
            group = parent[labelset_id]
        labelset = cls(group)
        labelset.check_config(config)

        shard, chunk = labelset.shard_size, labelset.attrs["chunk_size"]
        for name, spec in labelset.specs.items():
            dense = len(spec.shape) > 1
            # Dense maps are sharded: one object per shard, inner chunks for block reads. The
            # small per-image arrays need no inner chunks: one plain chunk per shard.
            chunks = (chunk if dense else shard, *spec.shape)
            shards = (shard, *spec.shape) if dense else None
            try:
                group.create_array(name, shape=(num_images, *spec.shape), dtype=spec.dtype,
                                   fill_value=spec.fill, compressors=spec.codecs,
                                   chunks=chunks, shards=shards)
            except ContainsArrayError:
                existing = group[name]
                found = (existing.shape, existing.dtype, existing.chunks, existing.shards)
                expected = ((num_images, *spec.shape), spec.dtype, chunks, shards)
                if found != expected:
                    raise LabelSetMismatchError(
                        f"label set {labelset_id}: array {name} exists as (shape, dtype, chunks, "
                        f"shards) {found}, expected {expected}") from None
        return labelset

    def check_config(self, config: LabelSetConfig) -> None:
        if (self.teacher != config.teacher or self.topk != config.topk
                or self.grid != tuple(config.grid)
                or self.dataset_fingerprint != config.dataset_fingerprint):
            raise LabelSetMismatchError(
                f"label set {self.id} exists with a different configuration; refusing to mix labels"
            )

    # -- summaries --------------------------------------------------------------------------

    def record_summary(self, name: str, value: dict[str, Any]) -> None:
        """Add or replace a summary attr (``agreement``, ``label_quality``): figures computed
        from finished labels, the only attrs written after creation. They describe the labels
        and never change them, so they stay out of the id and the configuration check."""
        if name not in SUMMARY_ATTRS:
            raise ValueError(f"unknown label set summary {name!r}; known: {SUMMARY_ATTRS}")
        # Re-read the attrs just before writing: another process may have added a summary since
        # this label set was opened, and an update writes the whole attribute document.
        fresh = zarr.open_group(store=self.group.store, path=self.group.path, mode="r+")
        fresh.update_attributes({name: value})
        self.attrs[name] = value

    # -- geometry ---------------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_range(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} out of range [0, {self.num_shards})")
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num_images)

    def array(self, name: str) -> zarr.Array:
        if name not in self._arrays:
            self._arrays[name] = self.group[name]
        return self._arrays[name]

    # -- status -----------------------------------------------------------------------------

    def read_status(self) -> tuple[np.ndarray, list[int]]:
        """Per-image status, and the shards whose status object could not be decoded.

        A torn status object (a crash mid-write on a store without atomic writes) reads as
        pending, so the shard is labeled again rather than blocking the whole label set.
        """
        arr = self.array("status")
        try:
            return arr[:], []
        except Exception:
            status = np.full(self.num_images, ImageStatus.PENDING, np.int8)
            torn = []
            for index in range(self.num_shards):
                start, stop = self.shard_range(index)
                try:
                    status[start:stop] = arr[start:stop]
                except Exception:
                    torn.append(index)
            return status, torn

    def status(self) -> np.ndarray:
        return self.read_status()[0]

    def labeled(self) -> np.ndarray:
        """Which images are labeled, bool [N]: from the completion summary when it says every
        image is (no status read: 13,868 objects for ImageNet-21k), else from ``status``."""
        summary = self.completion()
        if summary is not None and summary["counts"] == {
                str(int(ImageStatus.LABELED)): self.num_images}:
            return np.ones(self.num_images, bool)
        return self.status() == ImageStatus.LABELED

    def shard_status(self, index: int) -> np.ndarray:
        """One shard's per-image status; a torn status object reads as pending (as in
        :meth:`read_status`), so labeling rewrites the shard rather than failing on it."""
        start, stop = self.shard_range(index)
        try:
            return self.array("status")[start:stop]
        except Exception:
            return np.full(stop - start, ImageStatus.PENDING, np.int8)

    def pending_shards(self, status: np.ndarray | None = None,
                       retry_failed: bool = False) -> list[int]:
        """Shards not yet written (any image at -1); ``retry_failed`` adds shards with failures."""
        status = self.status() if status is None else status
        padded = np.full(self.num_shards * self.shard_size, ImageStatus.LABELED, np.int8)
        padded[:len(status)] = status
        per_shard = padded.reshape(self.num_shards, self.shard_size)
        todo = (per_shard == ImageStatus.PENDING).any(axis=1)
        if retry_failed:
            todo |= (per_shard > 0).any(axis=1)
        return np.flatnonzero(todo).tolist()

    def is_complete(self) -> bool:
        """Every shard written: from the completion summary in one read when it is recorded,
        else from the status array."""
        if self.completion() is not None:
            return True
        return not self.pending_shards()

    # -- what the labels hold -----------------------------------------------------------------

    @property
    def imported(self) -> bool:
        """Labels imported from the public TokenLabeling files: no logsumexp, no image-level
        labels (their arrays hold fill values)."""
        return self.attrs.get("source") == IMPORTED_SOURCE

    def damaged(self, block: LabelBlock) -> np.ndarray:
        """Images of ``block`` whose status says labeled but whose labels are not all there,
        bool [n]: top-K logits not finite, or classes outside [0, num_classes); and for labels
        this project made (imported ones have neither) a missing logsumexp or image-level
        top-K. What ``labeler store verify`` checks, and what serving and training refuse: a
        shard object lost or emptied under a status record that survived."""
        classes_ok = ((block.classes >= 0) & (block.classes < self.teacher.num_classes)).all(
            axis=(1, 2, 3))
        whole = np.isfinite(block.logits).all(axis=(1, 2, 3)) & classes_ok
        if not self.imported:
            whole &= (np.isfinite(block.lse).all(axis=(1, 2))
                      & np.isfinite(block.global_logits).all(axis=1)
                      & (block.global_classes >= 0).all(axis=1))
        return (block.status == ImageStatus.LABELED) & ~whole

    # -- the completion summary ---------------------------------------------------------------

    def completion(self) -> dict[str, Any] | None:
        """The recorded completion summary of a complete label set: ``{"images", "shards",
        "counts": {status code: images}}``, or None (not complete, or not recorded yet).

        The per-shard status records stay the truth: the summary is written from them once the
        label set is complete (:meth:`record_completion`), removed when a shard is marked
        pending again, and checked against them by ``labeler store verify``. A label set only
        ever goes from incomplete to complete by writers finishing shards, so concurrent writers
        can only each write the same summary."""
        summary = self.attrs.get("completion")
        return summary if self._is_consistent_completion(summary) else None

    def _is_consistent_completion(self, summary: Any) -> bool:
        """Whether a completion summary is one this label set could have: its image and shard
        counts, and per-status counts (non-pending codes, non-negative) that add up to every
        image. Anything else (hand-edited, written by broken code) is ignored, as if absent:
        readers then go to the status records. A summary that is well formed but false can only
        be told from the records: ``labeler store verify`` compares them, and a repair job or
        ``verify --repair`` rebuilds it."""
        if not isinstance(summary, dict) or summary.get("images") != self.num_images or \
                summary.get("shards") != self.num_shards:
            return False
        counts = summary.get("counts")
        if not isinstance(counts, dict):
            return False
        total = 0
        for code, count in counts.items():
            if not (isinstance(code, str) and code.isdigit() and type(count) is int
                    and count >= 0 and int(code) <= np.iinfo(np.int8).max):
                return False
            total += count
        return total == self.num_images

    def images_failed(self) -> int:
        """Images with a failure status: from the completion summary when recorded, else from
        the status records."""
        summary = self.completion()
        if summary is None:
            return int((self.status() > 0).sum())
        return sum(n for code, n in summary["counts"].items() if int(code) > 0)

    def completion_from_status(self, status: np.ndarray | None = None) -> dict[str, Any] | None:
        """The summary as the status records give it (None while any shard is pending)."""
        status = self.status() if status is None else status
        if self.pending_shards(status):
            return None
        codes, counts = np.unique(status, return_counts=True)
        return {"images": self.num_images, "shards": self.num_shards,
                "counts": {str(int(c)): int(n) for c, n in zip(codes, counts, strict=True)}}

    def rebuild_completion(self) -> dict[str, Any] | None:
        """The summary from the status records: written if complete, removed if not."""
        summary = self.record_completion()
        if summary is None:
            self.drop_completion()
        return summary

    def drop_completion(self) -> None:
        """Remove the completion summary (before any shard is written again). Read afresh, not
        from the attrs this label set was opened with: another writer may have recorded it
        since, and a rewrite must never leave a summary that claims the old counts."""
        fresh = zarr.open_group(store=self.group.store, path=self.group.path, mode="r+")
        if "completion" in fresh.attrs.asdict():
            fresh.attrs.pop("completion", None)  # one write: the document without it
        self.attrs.pop("completion", None)

    def record_completion(self) -> dict[str, Any] | None:
        """Write the completion summary if the label set is complete (read from the status
        records); returns it, or None if shards are still pending."""
        summary = self.completion_from_status()
        if summary is not None and summary != self.completion():
            self.record_summary("completion", summary)
        return summary

    # -- writing ----------------------------------------------------------------------------

    def empty_block(self, index: int) -> LabelBlock:
        """A block covering shard ``index``, filled with the "not labeled" fill values."""
        return self.empty_range(*self.shard_range(index))

    def empty_range(self, start: int, stop: int) -> LabelBlock:
        return LabelBlock(start=start, **{
            name: np.full((stop - start, *spec.shape), spec.fill, spec.dtype)
            for name, spec in self.specs.items()})

    def write_shard(self, index: int, block: LabelBlock) -> None:
        """Write one whole shard; its status goes last, marking it done."""
        start, stop = self.shard_range(index)
        if (block.start, block.stop) != (start, stop):
            raise LabelSetMismatchError(
                f"block covers images [{block.start}, {block.stop}) but shard {index} is "
                f"[{start}, {stop})"
            )
        if (block.status == ImageStatus.PENDING).any():
            raise LabelSetMismatchError(f"shard {index} still has images with status -1")
        # A rewrite (retry_failed, repair) may change the counts, or crash half-way: the summary
        # goes until a complete label set records it again.
        self.drop_completion()
        for name in ARRAY_NAMES:  # status is last in ARRAY_NAMES
            arr, data = self.array(name), getattr(block, name)
            if data.shape != (stop - start, *arr.shape[1:]):
                raise LabelSetMismatchError(
                    f"{name}: expected shape {(stop - start, *arr.shape[1:])}, got {data.shape}")
            if not np.can_cast(data.dtype, arr.dtype, casting="same_kind"):
                raise LabelSetMismatchError(f"{name}: cannot store {data.dtype} as {arr.dtype}")
            # zarr-python 3.1 writes into a sharded array by reading, merging and rewriting the
            # existing shard object, even when every inner chunk is replaced. Deleting it first
            # skips that read and lets a torn object from a crashed writer be replaced.
            self._delete_shard_object(arr, index)
            arr[start:stop] = data.astype(arr.dtype, copy=False)

    def mark_pending(self, index: int) -> None:
        """Shard ``index`` reads as not written (its status object deleted: the fill value, -1,
        is pending), so labeling writes it whole again. Its other objects stay until then. The
        completion summary goes first: it must never claim a pending shard."""
        self.drop_completion()
        self._delete_shard_object(self.array("status"), index)

    @staticmethod
    def _delete_shard_object(arr: zarr.Array, index: int) -> None:
        key = arr.metadata.encode_chunk_key((index,) + (0,) * (arr.ndim - 1))
        sync(arr.store_path.store.delete(f"{arr.store_path.path}/{key}"))

    # -- reading ----------------------------------------------------------------------------

    def read_block(self, start: int, stop: int) -> LabelBlock:
        """Labels of images [start, stop) (use whole shards for streaming).

        The arrays are read concurrently: zarr-python's fixed cost per call, not decoding,
        dominates a shard read, and overlapping the calls hides most of it. A torn ``status``
        object reads as pending, with fill values in every array (as :meth:`read_status`); any
        other array that cannot be decoded raises :class:`ShardUnreadable` naming it.
        """
        if not 0 <= start <= stop <= self.num_images:
            raise IndexError(f"[{start}, {stop}) is outside [0, {self.num_images})")

        arrays = [self.array(name).async_array for name in ARRAY_NAMES]  # opened outside the loop

        async def read_all() -> list[np.ndarray | BaseException]:
            return await asyncio.gather(*(a.getitem(slice(start, stop)) for a in arrays),
                                        return_exceptions=True)

        values = dict(zip(ARRAY_NAMES, sync(read_all()), strict=True))
        if isinstance(values["status"], BaseException):  # torn: nothing here counts as written
            return self.empty_range(start, stop)
        for name, value in values.items():
            if isinstance(value, BaseException):
                raise ShardUnreadable(self.id, name, start // self.shard_size, value)
        return LabelBlock(start, **values)

    def read_array(self, name: str, start: int, stop: int) -> np.ndarray:
        """One array over images [start, stop): what a reader needing one array pays (a torn
        ``status`` reads as pending; another undecodable array raises ShardUnreadable)."""
        if not 0 <= start <= stop <= self.num_images:
            raise IndexError(f"[{start}, {stop}) is outside [0, {self.num_images})")
        try:
            return self.array(name)[start:stop]
        except Exception as e:
            if name == "status":
                return np.full(stop - start, ImageStatus.PENDING, np.int8)
            raise ShardUnreadable(self.id, name, start // self.shard_size, e) from e

    def read_shard(self, index: int) -> LabelBlock:
        return self.read_block(*self.shard_range(index))

    def read_image(self, index: int) -> LabelBlock:
        return self.read_block(index, index + 1)
