"""Streaming images and their token labels from the store, shard by shard.

The order is a pure function of (seed, epoch, rank, worker): shards are permuted per epoch and
dealt round-robin to every (DDP rank, DataLoader worker) pair, each of which walks its shards'
labeled images through a seeded shuffle buffer of image indices. Because the order is computed
from indices alone (the ``status`` array, no image or label I/O), a resumed run skips exactly the
samples its checkpoint says were consumed and goes on in the same order.

Labels, and the manifest rows the stream uses (paths, digests, byte sizes, dimensions, classes),
are read one whole shard at a time (one zarr read per array per shard), so a rank holds no
whole-dataset column but the usable mask (ImageNet-21k's paths alone are ~0.5 GB); images are
decoded in the DataLoader workers; zarr is opened lazily inside each worker (the dataset object
holds only a path).

Nothing is trained on unchecked. An image is read as labeling reads it
(:func:`open_registered`): only the file registered (its sha256 and byte size), a regular file
(a FIFO is refused, never waited on), inside the dataset's folder (a symlink out is refused),
within the pixel limit. Labels are used only where their shard's status says labeled and the
labels are all there (``LabelSet.damaged``), whatever the completion summary says: both are
checked per shard as it is read. A sample that fails either is skipped, counted by reason
(:data:`SKIP_REASONS`, :meth:`TokenLabelStream.skipped_images`), and the next sample of the same
stream takes its place in the batch: batches stay full and of one shape, the order of every other
sample is unchanged (its random draws are made whether it is skipped or not), and a stream that
loses samples this way may give fewer batches (the trainer stops an epoch where the first rank
runs out).
Augmentation that moves pixels (RandomResizedCrop, horizontal flip) is done here with an explicit
box, returned with the sample so the labels can be cropped by the very same box on the device
(``trainer.labels.roi_align_labels``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from torchvision.transforms.v2 import functional as TF

from storage import Dataset, ImageStatus, LabelBlock, LabelSet, PathColumn, Store, StoreError
from storage.images import DEFAULT_MAX_PIXELS, ImageRejected, open_rgb, read_image_bytes
from trainer.augment import (
    IDENTITY_THETA,
    RandAugmentConfig,
    augment_image,
    erase,
    sample_erase,
    sample_rand_augment,
)
from trainer.data.normalize import IMAGENET_MEAN, IMAGENET_STD
from trainer.labels import image_box_to_grid, sample_crop


class FingerprintMismatch(StoreError):
    """The label set was made for other images than the dataset now lists."""


# Why a sample is skipped: its image failed to read as registered (the ImageStatus it would get
# when labeling), or its labels are not there after all (status not labeled, labels damaged).
SKIP_REASONS = (*(status.name.lower() for status in ImageStatus if status > 0), "not_labeled",
                "labels_damaged")
NOT_LABELED, LABELS_DAMAGED = len(SKIP_REASONS) - 2, len(SKIP_REASONS) - 1


def by_reason(counts: torch.Tensor) -> dict[str, int]:
    """Skip counts ``[len(SKIP_REASONS)]`` by reason, the reasons that occurred only."""
    return {reason: count for reason, count in zip(SKIP_REASONS, counts.tolist(), strict=True)
            if count}


@dataclass
class StreamConfig:
    store: str
    dataset: str
    labelset: str
    image_size: int = 224
    split: str = "train"  # train | val
    val_permille: int = 20  # 2 % of images held out by path hash
    seed: int = 0
    shuffle_buffer: int = 2048
    augment: bool = True  # RandomResizedCrop + flip (train); whole image resized (val)
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    color_jitter: float = 0.4  # brightness, contrast, saturation in [1 - j, 1 + j]; 0 is off
    rand_augment: RandAugmentConfig | None = None  # geometric ops move the labels (theta)
    random_erase: float = 0.0  # probability of erasing a rectangle (pixels only)
    # The stream yields uint8; trainer.data.normalize.Normalize applies these on the device.
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped (decompression bombs)


@dataclass
class StreamPosition:
    """Where a run is in its stream: the epoch and samples consumed per (rank, worker) stream."""

    epoch: int = 0
    consumed: dict[int, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": {str(k): v for k, v in self.consumed.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> StreamPosition:
        return cls(d["epoch"], {int(k): int(v) for k, v in d["consumed"].items()})


def open_labelset(store: Store, dataset_name: str, labelset_id: str) -> LabelSet:
    dataset = store.dataset(dataset_name)
    labelset = dataset.labelset(labelset_id)
    if labelset.dataset_fingerprint != dataset.fingerprint:
        raise FingerprintMismatch(
            f"label set {labelset_id} was made for dataset fingerprint "
            f"{labelset.dataset_fingerprint[:12]}, but {dataset_name!r} now has "
            f"{dataset.fingerprint[:12]}: the labels belong to other images")
    return labelset


T = TypeVar("T")


class RecentShards(Generic[T]):
    """``read(shard)`` for the last ``keep`` shards read, kept: a stream's shuffle buffer spans
    a few shards at most, so each of its shards is read once a pass."""

    def __init__(self, read: Callable[[int], T], keep: int):
        self.read, self.keep = read, keep
        self._kept: dict[int, T] = {}

    def __getitem__(self, shard: int) -> T:
        if shard not in self._kept:
            if len(self._kept) >= self.keep:
                self._kept.pop(next(iter(self._kept)))  # the oldest
            self._kept[shard] = self.read(shard)
        return self._kept[shard]


@dataclass
class ShardRows:
    """The manifest rows of one shard that the stream uses."""

    start: int
    paths: PathColumn
    sha256: np.ndarray  # uint8 [n, 32]: the registered digests
    byte_sizes: np.ndarray | None  # int64 [n]; None for datasets registered without them
    sizes: np.ndarray  # int32 [n, 2]: width, height
    targets: np.ndarray  # int32 [n]

    @classmethod
    def read(cls, dataset: Dataset, start: int, stop: int) -> ShardRows:
        return cls(start, dataset.paths(start, stop), dataset.sha256(start, stop),
                   dataset.sizes(start, stop),
                   np.stack([dataset.column("width", start, stop),
                             dataset.column("height", start, stop)], axis=1),
                   dataset.column("class", start, stop))

    def open(self, index: int, root: Path, max_pixels: int) -> Image.Image:
        """Image ``index`` (a dataset row of these rows), as :func:`open_registered` reads it."""
        row = index - self.start
        size = None if self.byte_sizes is None else int(self.byte_sizes[row])
        return open_registered(root, self.paths[row], self.sha256[row], size, max_pixels)


def open_registered(root: Path, path: str, sha256: np.ndarray, byte_size: int | None,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Image ``path`` of the dataset registered from folder ``root``, decoded, oriented and RGB,
    if it is still what was registered: the same bytes (``sha256``, and ``byte_size`` when the
    manifest has it, checked before reading), a regular file inside ``root``, within
    ``max_pixels``; else :class:`~storage.images.ImageRejected` with the status labeling would
    give it."""
    data = read_image_bytes(root / path, sha256.tobytes(), root=root, expected_size=byte_size)
    return open_rgb(data, max_pixels, name=path)


@dataclass
class LabelShard:
    """One shard's labels, and per image why they cannot be trained on (an index into
    :data:`SKIP_REASONS`, -1 where they can)."""

    block: LabelBlock
    refused: np.ndarray  # int [n]

    @classmethod
    def read(cls, labelset: LabelSet, shard: int) -> LabelShard:
        """The shard's block, checked as a whole: its status records, not the completion
        summary the order was computed from, and its labels' presence."""
        block = labelset.read_shard(shard)
        refused = np.where(block.status != ImageStatus.LABELED, NOT_LABELED, -1)
        refused[labelset.damaged(block)] = LABELS_DAMAGED
        return cls(block, refused)


class TokenLabelStream(IterableDataset):
    """Yields dicts: ``image`` uint8 [3, S, S], the image's label maps (``logits``, ``classes``,
    ``lse``), ``box`` (x1, y1, x2, y2) in label-grid coordinates, ``flip``, ``target`` (the
    dataset class, -1 if unknown), ``index``, and ``stream``/``seq`` for resuming."""

    def __init__(self, config: StreamConfig, rank: int = 0, world_size: int = 1,
                 position: StreamPosition | None = None):
        super().__init__()
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.position = position or StreamPosition()
        # What a worker needs to compute its order, read once in the parent: a byte an image.
        store = Store.open(config.store, mode="r")
        labelset = open_labelset(store, config.dataset, config.labelset)
        dataset = store.dataset(config.dataset)
        labeled = labelset.labeled()  # from the completion summary when every image is
        in_split = dataset.held_out(config.val_permille)  # stored buckets: no hashing here
        if config.split == "train":
            in_split = ~in_split
        self.usable = in_split & labeled
        self.skipped = int((in_split & ~labeled).sum())
        self.num_images = labelset.num_images
        self.source_root = Path(dataset.source_root)
        self.shard_size, self.num_shards = labelset.shard_size, labelset.num_shards
        self.grid = labelset.grid
        self.resize = labelset.teacher.resize  # what the grid covers: docs/store-format.md
        self.num_classes = labelset.teacher.num_classes
        self._labelset: LabelSet | None = None  # opened lazily in each worker
        self._dataset: Dataset | None = None
        self._rows: RecentShards[ShardRows] | None = None
        self.track_skips(0)

    def __getstate__(self) -> dict:
        # Sent to DataLoader workers without open arrays or cached rows: each opens its own.
        return {**self.__dict__, "_labelset": None, "_dataset": None, "_rows": None}

    def __len__(self) -> int:
        return int(self.usable.sum())

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.position.epoch:
            self.position = StreamPosition(epoch)

    # -- skipped samples ----------------------------------------------------------------------

    def track_skips(self, num_workers: int) -> None:
        """Count skipped samples anew, where this process can read them back
        (:meth:`skipped_images`) from ``num_workers`` DataLoader workers: a row per worker, in
        shared memory (each worker writes only its own row). Call it before making the loader."""
        self.skip_counts = torch.zeros(max(1, num_workers), len(SKIP_REASONS), dtype=torch.int64)
        if num_workers:
            self.skip_counts.share_memory_()

    def skipped_images(self) -> dict[str, int]:
        """Samples skipped since :meth:`track_skips`, by reason (only reasons that occurred)."""
        return by_reason(self.skip_counts.sum(0))

    def full_batches(self, batch_size: int, num_workers: int) -> int:
        """Full batches of ``batch_size`` each rank's DataLoader gives this epoch, if every
        image reads: the least over the ranks. Each (rank, worker) stream batches its own
        shards' images and drops its last partial batch."""
        per_shard = np.bincount(np.flatnonzero(self.usable) // self.shard_size,
                                minlength=self.num_shards)
        streams = self.streams(num_workers)
        batches = [per_shard[self.shards_of(stream, streams)].sum() // batch_size
                   for stream in range(streams)]
        return int(np.reshape(batches, (self.world_size, -1)).sum(1).min())

    # -- order ----------------------------------------------------------------------------

    def streams(self, num_workers: int) -> int:
        return self.world_size * max(1, num_workers)

    def shards_of(self, stream: int, streams: int) -> list[int]:
        order = np.random.default_rng([self.config.seed, self.position.epoch]).permutation(
            self.num_shards) if self.config.split == "train" else np.arange(self.num_shards)
        return order[stream::streams].tolist()

    def order(self, stream: int, streams: int) -> Iterator[int]:
        """Image indices of one stream, in the order it yields them."""
        shards = self.shards_of(stream, streams)
        if self.config.split != "train":
            for shard in shards:
                start = shard * self.shard_size
                yield from (start + np.flatnonzero(self.usable[start:start + self.shard_size]))
            return
        rng = np.random.default_rng([self.config.seed, self.position.epoch, stream])
        buffer: list[int] = []
        for shard in shards:
            start = shard * self.shard_size
            for index in start + np.flatnonzero(self.usable[start:start + self.shard_size]):
                buffer.append(int(index))
                if len(buffer) >= self.config.shuffle_buffer:
                    yield buffer.pop(int(rng.integers(len(buffer))))
        rng.shuffle(buffer)
        yield from buffer

    # -- samples --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        streams = self.streams(num_workers)
        stream = self.rank * max(1, num_workers) + worker
        if self._labelset is None:
            store = Store.open(self.config.store, mode="r")
            self._labelset = store.dataset(self.config.dataset).labelset(self.config.labelset)
        consumed = self.position.consumed.get(stream, 0)
        generator = torch.Generator().manual_seed(
            (self.config.seed * 1_000_003 + self.position.epoch) * 65_537 + stream)
        labelset = self._labelset
        labels = RecentShards(lambda shard: LabelShard.read(labelset, shard), keep=5)
        # a worker's own row (track_skips); a stream set up for fewer workers counts locally
        if worker >= len(self.skip_counts):
            self.skip_counts = torch.zeros(num_workers, len(SKIP_REASONS), dtype=torch.int64)
        skips = self.skip_counts[worker]
        for seq, index in enumerate(self.order(stream, streams)):
            # drawn for skipped samples too, so a resumed stream draws the same boxes after them
            box, flip = self.sample_box(index, generator)
            colour = self.sample_colour(generator)
            augmentation, erase_box = self.sample_recipe(generator)
            if seq < consumed:
                continue
            shard = labels[index // self.shard_size]
            block, row = shard.block, index - shard.block.start
            if shard.refused[row] >= 0:
                skips[int(shard.refused[row])] += 1
                continue
            try:
                image = self.load_image(index, box, flip, colour)
            except ImageRejected as e:
                skips[SKIP_REASONS.index(e.status.name.lower())] += 1
                continue
            if augmentation is not None:
                image = augment_image(image, augmentation, self.config.rand_augment)
            if erase_box is not None:
                image = erase(image, erase_box)
            yield {
                "image": image,
                "theta": IDENTITY_THETA if augmentation is None else augmentation.theta,
                "logits": torch.from_numpy(block.logits[row].astype(np.float32)),
                "classes": torch.from_numpy(block.classes[row].astype(np.int64)),
                "lse": torch.from_numpy(block.lse[row]),
                "box": torch.tensor(self.to_grid(index, box), dtype=torch.float32),
                "flip": flip,
                "target": self.target(index),
                "index": int(index),
                "stream": stream,
                "seq": seq,
            }

    # -- manifest rows, a shard at a time ----------------------------------------------------

    def shard_rows(self, shard: int) -> ShardRows:
        """The shard's paths, sizes and classes: read when the stream reaches the shard, and
        kept for the few shards a shuffle buffer spans."""
        if self._rows is None:
            self._rows = RecentShards(self.read_shard_rows, keep=8)
        return self._rows[shard]

    def read_shard_rows(self, shard: int) -> ShardRows:
        if self._dataset is None:
            self._dataset = Store.open(self.config.store, mode="r").dataset(self.config.dataset)
        start = shard * self.shard_size
        return ShardRows.read(self._dataset, start, min(start + self.shard_size, self.num_images))

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of image ``index`` after EXIF orientation, from the manifest."""
        rows = self.shard_rows(index // self.shard_size)
        width, height = rows.sizes[index - rows.start].tolist()
        return width, height

    def target(self, index: int) -> int:
        """Image ``index``'s dataset class, -1 if unknown."""
        rows = self.shard_rows(index // self.shard_size)
        return int(rows.targets[index - rows.start])

    # -- sampling -----------------------------------------------------------------------------

    def sample_box(self, index: int, generator: torch.Generator) -> tuple[tuple, bool]:
        """RandomResizedCrop's box (x1, y1, x2, y2) in image pixels, and a flip, for training;
        the whole image, unflipped, otherwise."""
        width, height = self.image_size(index)
        if not (self.config.augment and self.config.split == "train"):
            return (0, 0, width, height), False
        box = sample_crop(width, height, self.config.crop_scale, self.config.crop_ratio,
                          generator=generator)
        return tuple(box), bool(torch.rand((), generator=generator) < 0.5)

    def sample_colour(self, generator: torch.Generator) -> tuple[float, float, float] | None:
        """Brightness, contrast and saturation factors: colour changes that move no pixel, so
        the labels need no change."""
        jitter = self.config.color_jitter
        if not (jitter and self.config.augment and self.config.split == "train"):
            return None
        factors = 1 - jitter + 2 * jitter * torch.rand(3, generator=generator)
        return tuple(factors.tolist())

    def sample_recipe(self, generator: torch.Generator):
        """RandAugment's draws and random erasing's rectangle, for training (else None, None)."""
        if not (self.config.augment and self.config.split == "train"):
            return None, None
        augmentation = (sample_rand_augment(self.config.rand_augment, generator)
                        if self.config.rand_augment else None)
        erase_box = (sample_erase(self.config.image_size, self.config.random_erase, generator)
                     if self.config.random_erase else None)
        return augmentation, erase_box

    def to_grid(self, index: int, box: tuple) -> tuple[float, ...]:
        """A box in image pixels to label-grid coordinates, through the label set's recorded
        geometry (the whole image, or its central square for centre-cropped labels)."""
        return tuple(image_box_to_grid(box, self.image_size(index), self.grid, self.resize))

    def load_image(self, index: int, box: tuple, flip: bool,
                   colour: tuple[float, float, float] | None = None) -> torch.Tensor:
        """Read as registered (:func:`open_registered`; ImageRejected if it is not), decode (full
        resolution: a small crop needs every pixel), orient, crop by ``box`` and resize in one
        resampling, then flip and adjust colours."""
        size = self.config.image_size
        rows = self.shard_rows(index // self.shard_size)
        picture = rows.open(index, self.source_root, self.config.max_pixels)
        crop = picture.resize((size, size), Image.Resampling.BICUBIC, box=box)
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.uint8).copy()).permute(2, 0, 1)
        if colour is not None:
            brightness, contrast, saturation = colour
            pixels = TF.adjust_brightness(pixels, brightness)
            pixels = TF.adjust_contrast(pixels, contrast)
            pixels = TF.adjust_saturation(pixels, saturation)
        return pixels
