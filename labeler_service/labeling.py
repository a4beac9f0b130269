"""Labeling a dataset: decode images in parallel workers, run the teacher in batches, write shards.

Batches never cross a shard boundary and are the same for every run, so a shard's labels do not
depend on which other shards a run happens to process (a resumed run equals a clean one), and a
shard is written as soon as its last batch is done, by a background thread, while the teacher
goes on with the next batches.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

from labeler_service.quality import record_summaries
from labeler_service.teacher import (
    DenseTeacher,
    TeacherError,
    build_teacher,
    fit_summary,
    fold_weight_standardization,
    label_space_problem,
)
from storage import (
    LABEL_ARRAYS,
    ImageStatus,
    LabelBlock,
    LabelSet,
    LabelSetConfig,
    Store,
    StoreError,
    TeacherSpec,
)
from storage import Dataset as StoreDataset
from storage.images import (
    DEFAULT_MAX_PIXELS,
    DecodingProcessDied,
    ImageRejected,
    decode_image,
    read_image_bytes,
)
from storage.labelset import DEFAULT_SHARD_SIZE, array_specs

log = logging.getLogger(__name__)

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}




class LabelSpaceMismatch(ValueError):
    """The teacher's classes and the dataset's classes are not the same label space."""


class StoreDiskFull(StoreError):
    """The store's disk, or the user's quota on it, is full. What was written is consistent:
    whole shards only, so the same command resumes once there is space."""


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def disk_full_is_said(store: Store, work: str = "labeling") -> Iterator[None]:
    """An out-of-space OSError from writing ``store`` becomes StoreDiskFull, one line saying
    so (zarr raises the filesystem's own OSError, from any of its writer threads)."""
    try:
        yield
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise StoreDiskFull(f"the store's disk is full ({os.strerror(e.errno)}: {store.location})."
                            f" Free some space and run the same command again: the shards "
                            f"written so far are kept, and {work} resumes with the rest") from None


@dataclass
class LabelingOptions:
    batch_size: int = 32
    num_workers: int | None = None  # decoding processes; None: default_workers(device)
    device: str = "cpu"
    precision: str = "bf16"  # autocast dtype on CUDA: bf16, fp16 or fp32 (none); CPU: fp32
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard_size: int = DEFAULT_SHARD_SIZE
    chunk_size: int | None = None  # None: the store's default for the shard size
    progress: bool = True
    compile: bool = False  # torch.compile the teacher for batches of batch_size (TeacherRunner)


@dataclass
class LabelingReport:
    labelset_id: str
    shards_total: int
    shards_written: int = 0
    shards_skipped: int = 0
    images_labeled: int = 0
    images_failed: Counter = field(default_factory=Counter)  # ImageStatus -> count
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), first few
    seconds: float = 0.0
    stopped: bool = False
    agreement: dict | None = None  # once the label set is complete: see quality.py

    @property
    def images_done(self) -> int:
        return self.images_labeled + sum(self.images_failed.values())

    def count_shard(self, status: np.ndarray) -> None:
        self.shards_written += 1
        self.images_labeled += int((status == ImageStatus.LABELED).sum())
        codes, counts = np.unique(status[status > 0], return_counts=True)
        for code, count in zip(codes, counts, strict=True):
            self.images_failed[ImageStatus(int(code))] += int(count)


# (manifest index, relative path, registered raw sha256, registered byte size or None)
ImageItem = tuple[int, str, bytes, int | None]


class ImageFileDataset(Dataset):
    """Decodes an :data:`ImageItem` into uint8 [S, S, 3]; failures come back as a status and
    reason.

    Holds no manifest: each batch carries its images' paths, hashes and sizes, read shard by
    shard (``shard_batches``), so neither a worker nor its decoding processes hold the paths of
    shards they are not given (~1 GB for ImageNet-21k's). Files are read confined to ``root``
    (a symlink out of it is OUTSIDE_ROOT) and never past their registered size.
    """

    def __init__(self, root: Path, size: int, interpolation: str, max_pixels: int):
        self.root = Path(root)
        self.size, self.interpolation, self.max_pixels = size, interpolation, max_pixels

    def __getitem__(self, item: ImageItem) -> tuple[int, str, np.ndarray, int, str]:
        index, name, sha256, size = item
        try:
            data = read_image_bytes(self.root / name, sha256, root=self.root, expected_size=size)
            pixels = decode_image(data, self.size, self.interpolation, self.max_pixels, name=name)
            return index, name, pixels, int(ImageStatus.LABELED), ""
        except ImageRejected as e:
            return (index, name, np.zeros((self.size, self.size, 3), np.uint8), int(e.status),
                    e.reason)


@dataclass
class DecodedBatch:
    indices: np.ndarray  # int64 [B] manifest indices
    paths: list[str]  # their relative paths
    pixels: torch.Tensor  # uint8 [B, S, S, 3]
    status: np.ndarray  # int8 [B]
    reasons: list[str]

    def pin_memory(self) -> DecodedBatch:
        self.pixels = self.pixels.pin_memory()
        return self


def collate(items: list[tuple[int, str, np.ndarray, int, str]]) -> DecodedBatch:
    indices, paths, pixels, status, reasons = zip(*items, strict=True)
    return DecodedBatch(np.asarray(indices, np.int64), list(paths),
                        torch.from_numpy(np.stack(pixels)), np.asarray(status, np.int8),
                        list(reasons))


def default_workers(device: torch.device) -> int:
    """Decoding processes: on CUDA, enough to feed the GPU; on CPU, few, because the teacher
    itself uses every core (on 2 cores, 1 worker ran 1.05x the bare forward, 2 ran 0.90x)."""
    cores = os.cpu_count() or 1
    return min(8, max(1, cores - 1)) if device.type == "cuda" else max(1, cores // 4)


def shard_batches(labelset: LabelSet, dataset: StoreDataset, shards: Sequence[int],
                  batch_size: int) -> Iterator[list[ImageItem]]:
    """Batches of at most ``batch_size`` images, each inside one shard, in shard order. Each
    shard's paths, hashes and sizes are read from the store (one read per column) when the
    batches reach it, so only the shards in flight are held. Sizes are None for a dataset
    registered before they were recorded."""
    for shard in shards:
        start, stop = labelset.shard_range(shard)
        paths, sha256 = dataset.paths(start, stop), dataset.sha256(start, stop)
        sizes = dataset.sizes(start, stop)
        for i in range(0, stop - start, batch_size):
            rows = range(i, min(i + batch_size, stop - start))
            yield [(start + r, paths[r], sha256[r].tobytes(),
                    None if sizes is None else int(sizes[r])) for r in rows]


class ModelInput:
    """uint8 ``[B, H, W, 3]`` on the host -> ``(x - mean) / std`` as float ``[B, 3, H, W]`` on
    ``device`` (channels last on CUDA). The copy moves uint8, a quarter of the float bytes, and
    the arithmetic runs on the device. (The trainer's ``Normalize`` is the same for its
    ``[B, 3, H, W]`` batches; the two packages share no code but the store.)"""

    def __init__(self, mean: Sequence[float], std: Sequence[float], device: torch.device):
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        self.memory_format = (torch.channels_last if device.type == "cuda"
                              else torch.contiguous_format)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)


def prepare_for_inference(teacher: DenseTeacher, device: torch.device,
                          fold_standardization: bool = True) -> None:
    """What labeling does to a teacher before its first batch, in place: fold NFNet's weight
    standardisation into plain convs (``fold_weight_standardization``: the same outputs, without
    re-standardising every weight every batch) and, on CUDA, make the model channels last and
    let cuDNN pick its fastest kernels for the one input shape labeling uses."""
    if fold_standardization:
        fold_weight_standardization(teacher.model)
    if device.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True  # every batch has the same input shape


class TeacherRunner:
    """Normalises uint8 batches on the device and runs the teacher under autocast.

    The runner owns the teacher it is given (``prepare_for_inference`` changes it in place).
    ``compile`` makes the whole step one ``torch.compile``d graph; until then it runs eagerly.
    """

    def __init__(self, teacher: DenseTeacher, mean: Sequence[float], std: Sequence[float],
                 topk: int, device: torch.device, precision: str = "bf16"):
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be one of {sorted(AUTOCAST_DTYPES)}")
        self.teacher, self.topk, self.device = teacher, topk, device
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        prepare_for_inference(teacher, device)
        self.model_input = ModelInput(mean, std, device)
        specs = array_specs(topk, (1, 1), teacher.num_classes)
        self.dtypes = {name: getattr(torch, specs[name].dtype.name) for name in LABEL_ARRAYS}
        self.compiled_batch: int | None = None  # set by compile: every step gets this many
        self.step: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] = self.label_batch

    def compile(self, batch_size: int, input_size: int) -> None:
        """Make the whole step (normalisation, teacher, top-K, narrowing to the store's dtypes)
        one ``torch.compile``d graph for batches of ``batch_size``, compiled now on a batch of
        zeros, so that the first labeled batch does not pay for it. A smaller batch (a shard's
        last) is padded to it rather than compiled again, and a larger one is labeled in pieces
        of it. A runner compiles once: later calls keep the graph it has (minutes of compiling
        for NFNet-F6)."""
        if self.compiled_batch is not None:
            return
        self.compiled_batch, self.step = batch_size, torch.compile(self.label_batch,
                                                                   dynamic=False)
        started = time.perf_counter()
        try:
            self(torch.zeros(batch_size, input_size, input_size, 3, dtype=torch.uint8))
        except Exception as e:
            self.compiled_batch, self.step = None, self.label_batch  # eager again, as before
            if isinstance(e, torch.OutOfMemoryError):
                raise  # the batch does not fit, compiled or not: not the compiler's fault
            # inductor: no C/C++ compiler, no Triton, an op it can't lower
            reason = (str(e).strip().splitlines() or [""])[0][:300]
            raise TeacherError(f"torch.compile could not compile the teacher "
                               f"({type(e).__name__}: {reason}); label without compiling "
                               "(no --compile / LABELER_COMPILE_TEACHER=false)") from e
        log.info("teacher compiled for batches of %d at %d px in %.1f s", batch_size, input_size,
                 time.perf_counter() - started)

    def label_batch(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """uint8 [B, S, S, 3] on the device -> ``LABEL_ARRAYS`` on the device, in the store's
        dtypes (narrowed on the device, so that each array's copy to the host is small)."""
        x = self.model_input(pixels)
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype)
                    if self.autocast_dtype else contextlib.nullcontext())
        with autocast:
            out = self.teacher.summarise(x, self.topk)
        return tuple(getattr(out, name).to(self.dtypes[name]) for name in LABEL_ARRAYS)

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        """The label arrays of ``pixels`` (``LABEL_ARRAYS``), in the store's dtypes."""
        n = len(pixels)
        if self.compiled_batch is not None and n > self.compiled_batch:
            # Compiled for fewer (a runner kept from a label set of smaller shards): in pieces of
            # the compiled size, as a new size would compile a new graph, for minutes.
            parts = [self(pixels[i:i + self.compiled_batch])
                     for i in range(0, n, self.compiled_batch)]
            return {name: np.concatenate([part[name] for part in parts]) for name in LABEL_ARRAYS}
        pixels = pixels.to(self.device, non_blocking=True)
        if self.compiled_batch is not None and n < self.compiled_batch:
            pad = pixels.new_zeros((self.compiled_batch - n, *pixels.shape[1:]))
            pixels = torch.cat([pixels, pad])
        outputs = self.step(pixels)
        return {name: values[:n].cpu().numpy()
                for name, values in zip(LABEL_ARRAYS, outputs, strict=True)}


def largest_batch(labelset: LabelSet, batch_size: int) -> int:
    """The most images a batch of ``label_shards`` holds: batches never span shards."""
    return max(1, min(batch_size, labelset.shard_size, labelset.num_images))


def decoded_source(dataset: StoreDataset, labelset: LabelSet, options: LabelingOptions) -> tuple:
    """What a decoder for this label set must decode: which images, to which input."""
    return (str(dataset.source_root), dataset.fingerprint, labelset.teacher.input_size,
            labelset.teacher.interpolation, options.max_pixels)


class BatchList(Sampler[list[ImageItem]]):
    """A batch sampler whose batches are replaced before each pass over a DataLoader; the
    loader draws them lazily, a few batches ahead of the teacher."""

    def __init__(self) -> None:
        self.batches: Iterable[list[ImageItem]] = ()

    def __iter__(self) -> Iterator[list[ImageItem]]:
        return iter(self.batches)


class ImageDecoder:
    """Decodes index batches of one dataset in ``num_workers`` processes that outlive a pass.

    A service worker labels shard after shard of a dataset, one task each: starting the decoding
    processes per task would cost a fork each, plus their imports, every shard. It keeps one
    decoder per label set instead (``tasks.decoder_for``); ``labeler label`` makes one per run. The
    processes end when the decoder is garbage-collected, or with this process.
    """

    def __init__(self, images: ImageFileDataset, num_workers: int, pin_memory: bool,
                 source: tuple = ()) -> None:
        self.images, self.num_workers, self.pin_memory = images, num_workers, pin_memory
        self.source = source  # what it decodes: see ``decoded_source``
        self._batches = BatchList()
        self._loader: DataLoader | None = None  # made (its processes started) at the first pass

    @classmethod
    def for_labelset(cls, dataset: StoreDataset, labelset: LabelSet, options: LabelingOptions,
                     device: torch.device) -> ImageDecoder:
        images = ImageFileDataset(Path(dataset.source_root), labelset.teacher.input_size,
                                  labelset.teacher.interpolation, options.max_pixels)
        workers = (default_workers(device) if options.num_workers is None
                   else options.num_workers)
        return cls(images, workers, pin_memory=device.type == "cuda",
                   source=decoded_source(dataset, labelset, options))

    def __call__(self, batches: Iterable[list[ImageItem]]) -> Iterator[DecodedBatch]:
        """The decoded batches, in order. A pass left unfinished is dropped by the next one."""
        batches = iter(batches)
        first = next(batches, None)
        if first is None:
            return iter(())
        self._batches.batches = itertools.chain([first], batches)
        if self._loader is None:
            self._loader = DataLoader(
                self.images, batch_sampler=self._batches, num_workers=self.num_workers,
                collate_fn=collate, pin_memory=self.pin_memory,
                prefetch_factor=2 if self.num_workers else None,
                # No DataLoader timeout: with one, a dead worker is noticed only when it ends.
                # A shard's deadline is the task's hard time limit (tasks.LabelerTask).
                persistent_workers=self.num_workers > 0)
        return self._pass(self._loader)

    def close(self) -> None:
        """End the decoding processes now, not at a later garbage collection (each holds
        hundreds of MB); the next pass starts new ones."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)  # a persistent loader's live workers
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def _pass(self, loader: DataLoader) -> Iterator[DecodedBatch]:
        try:
            yield from loader  # a persistent loader's iter() first drains an unfinished pass
        except Exception as e:
            # Whatever broke the pass may have broken the processes too: start new ones next.
            self.close()
            if isinstance(e, RuntimeError) and "DataLoader worker" in str(e):
                raise DecodingProcessDied(str(e)) from e
            raise


def label_shards(labelset: LabelSet, dataset: StoreDataset, runner: TeacherRunner,
                 shards: Sequence[int], options: LabelingOptions,
                 should_stop: Callable[[], bool] | None = None,
                 on_shard_done: Callable[[int, LabelBlock], None] | None = None,
                 report: LabelingReport | None = None,
                 decoder: ImageDecoder | None = None) -> LabelingReport:
    """Label the given shards of ``labelset`` and write each one whole.

    ``decoder`` (made for this dataset and the label set's teacher input) keeps its decoding
    processes between calls; without one, this call starts and ends its own.
    """
    report = report or LabelingReport(labelset.id, labelset.num_shards)
    if decoder is None:
        decoder = ImageDecoder.for_labelset(dataset, labelset, options, runner.device)
    elif decoder.source != decoded_source(dataset, labelset, options):
        raise ValueError(f"decoder was made for other images than {labelset.id}'s")
    batches = shard_batches(labelset, dataset, shards, options.batch_size)
    total = sum(stop - start for start, stop in map(labelset.shard_range, shards))
    started = time.perf_counter()

    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
    pending: list[Future] = []
    block: LabelBlock | None = None
    filled = 0

    def finish(shard: int, done: LabelBlock) -> None:
        labelset.write_shard(shard, done)
        if on_shard_done is not None:
            on_shard_done(shard, done)

    bar = tqdm(total=total, unit="img", disable=not options.progress, dynamic_ncols=True,
               desc=labelset.id)
    try:
        for batch in decoder(batches):
            shard = int(batch.indices[0]) // labelset.shard_size
            if block is None or block.start != labelset.shard_range(shard)[0]:
                block, filled = labelset.empty_block(shard), 0
            rows = batch.indices - block.start
            ok = batch.status == ImageStatus.LABELED
            if ok.any():
                outputs = runner(batch.pixels)
                for name, values in outputs.items():
                    getattr(block, name)[rows[ok]] = values[ok]
            block.status[rows] = batch.status
            filled += len(rows)
            for i in np.flatnonzero(~ok)[:max(0, 100 - len(report.failures))]:
                report.failures.append((batch.paths[i], batch.reasons[i]))
            bar.update(len(rows))

            if filled == len(block):
                for f in [f for f in pending if f.done()]:
                    pending.remove(f)
                    f.result()
                pending.append(writer.submit(finish, shard, block))
                report.count_shard(block.status)
                block = None
            if should_stop is not None and should_stop():
                report.stopped = True
                block = None  # an unfinished shard is dropped: it stays pending, nothing is lost
                break
        if block is not None:  # batches tile shards exactly; a leftover would be lost silently
            raise RuntimeError(f"shard of block {block.start} ended unfinished")
    finally:
        bar.close()
        writer.shutdown(wait=True)
    for f in pending:
        f.result()  # re-raise a failed write
    report.seconds += time.perf_counter() - started
    return report


def check_class_space(dataset: StoreDataset, teacher: TeacherSpec,
                      override: str = "--ignore-dataset-classes") -> None:
    """Refuse labels that would be in another label space than the dataset's classes.
    ``override`` names the way to ask anyway, as the caller's user spells it (a CLI flag, a
    REST field)."""
    problem = label_space_problem(dataset, teacher)
    if problem is not None:
        raise LabelSpaceMismatch(
            f"{problem}, so its labels would be in another label space than the dataset's "
            f"classes. Use a teacher trained on these classes (`labeler teacher fit`), or pass "
            f"{override} if the teacher's classes are what you want.")


def parse_part(part: str) -> tuple[int, int]:
    """'i/n' -> (i, n): this process takes shards s with s % n == i."""
    try:
        i, n = (int(v) for v in part.split("/"))
    except ValueError:
        raise ValueError(f"--part must look like i/n, got {part!r}") from None
    if not 0 <= i < n:
        raise ValueError(f"--part {part}: need 0 <= i < n")
    return i, n


def label_dataset(store: Store, dataset_name: str, model: str, checkpoint: Path | None,
                  input_size: int, topk: int, options: LabelingOptions,
                  part: tuple[int, int] = (0, 1), ignore_dataset_classes: bool = False,
                  class_names: tuple[str, ...] | None = None,
                  retry_failed: bool = False,
                  output_stride: int | None = None) -> LabelingReport:
    """The whole job in one process: create (or reopen) the label set and label what is missing."""
    dataset = store.dataset(dataset_name)
    if not Path(dataset.source_root).is_dir():
        # Otherwise every image would be recorded as missing and its shard as done.
        raise FileNotFoundError(f"dataset {dataset_name!r}: its images at {dataset.source_root} "
                                "are not reachable (unmounted or moved?)")
    device = torch.device(options.device)
    precision = options.precision if device.type == "cuda" else "fp32"
    teacher, spec, grid = build_teacher(model, checkpoint, input_size, device, class_names,
                                        precision, output_stride)
    if not ignore_dataset_classes:
        check_class_space(dataset, spec)
    with disk_full_is_said(store):
        labelset = dataset.create_labelset(labelset_config(
            dataset, spec, topk, grid, checkpoint, options.shard_size, options.chunk_size))
        index, count = part
        todo = [s for s in labelset.pending_shards(retry_failed=retry_failed)
                if s % count == index]
        mine = [s for s in range(labelset.num_shards) if s % count == index]
        report = LabelingReport(labelset.id, len(mine), shards_skipped=len(mine) - len(todo))
        runner = TeacherRunner(teacher, spec.mean, spec.std, topk, device, precision)
        if options.compile and todo:  # a rerun with nothing to label compiles nothing
            runner.compile(largest_batch(labelset, options.batch_size), input_size)
        report = label_shards(labelset, dataset, runner, todo, options, report=report)
        report.agreement = labelset.attrs.get("agreement")
        # Measured when this run completed the label set (a rerun with nothing to do writes
        # nothing).
        if (report.shards_written or report.agreement is None) and not report.stopped \
                and labelset.is_complete():
            report.agreement = record_summaries(dataset, labelset)
    return report


def labelset_config(dataset: StoreDataset, spec: TeacherSpec, topk: int, grid: tuple[int, int],
                    checkpoint: Path | None, shard_size: int,
                    chunk_size: int | None = None) -> LabelSetConfig:
    """The label set a teacher makes of a dataset; a fitted teacher's fit is recorded with it
    (``teacher_fit``), so its held-out split can be told from the images it trained on."""
    fit = fit_summary(checkpoint)
    return LabelSetConfig(teacher=spec, topk=topk, grid=grid,
                          dataset_fingerprint=dataset.fingerprint, shard_size=shard_size,
                          chunk_size=chunk_size, extra={"teacher_fit": fit} if fit else {})
