"""Import labels in the public TokenLabeling layout into a label set.

That layout is one ``.pt`` file per image holding a float16 tensor [2, K, H, W]: the top-K
logits, then the class ids stored as float16. A file is found for an image by either of two rules
(:func:`match_label_files`): the image's relative path with ``.pt`` in place of its suffix, or
the official loader's, the last two path components with everything after the first dot of the
file name dropped (``train/n01440764/x.JPEG`` -> ``n01440764/x.pt``). Those files carry no
logsumexp and no image-level labels, so the imported label set has ``lse`` and
``global_logits`` NaN and ``global_classes`` -1 (documented in docs/store-format.md).
The public generator centre-cropped the image, which the label set records as ``resize``.
"""

from __future__ import annotations

import io
import itertools
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tqdm import tqdm

from labeler_service.labeling import check_class_space, disk_full_is_said
from labeler_service.teacher import imagenet_class_names
from storage import ImageStatus, LabelSet, LabelSetConfig, PathColumn, Store, TeacherSpec
from storage.images import ImageRejected, read_image_bytes
from storage.labelset import DEFAULT_SHARD_SIZE

FP16_EXACT_INTEGERS = 2048  # float16 holds every integer up to 2048, and not all above
PROBE_LIMIT = 100  # label files tried for the layout before the import is refused


@dataclass
class ImportReport:
    labelset_id: str
    images_imported: int = 0
    images_failed: Counter = field(default_factory=Counter)
    shards_written: int = 0
    shards_skipped: int = 0
    matched_full_path: int = 0  # images whose file was found by its relative path
    matched_official: int = 0  # ... by the official loader's rule
    images_without_file: int = 0
    files_unmatched: int = 0  # .pt files under the directory that belong to no image


@dataclass
class LabelFileMatch:
    files: list[str | None]  # per image: its label file, relative to the label directory
    full_path: int
    official: int
    unmatched_files: int


def label_file_for(image_path: str) -> str:
    """The image's relative path with ``.pt`` in place of its suffix."""
    return str(PurePosixPath(image_path).with_suffix(".pt"))


def official_label_file_for(image_path: str) -> str:
    """The official loader's rule: ``<parent folder>/<name up to its first dot>.pt``."""
    path = PurePosixPath(image_path)
    name = path.name.split(".")[0] + ".pt"
    return f"{path.parent.name}/{name}" if path.parent.name else name


def match_label_files(label_dir: Path, paths: np.ndarray) -> LabelFileMatch:
    """Each image's label file among the ``.pt`` files under ``label_dir``: by its full relative
    path first, else by the official rule. Refuses (ValueError) a file that the official rule
    gives to more than one image: the labels of one would be read for the others."""
    present = {p.relative_to(label_dir).as_posix() for p in label_dir.rglob("*.pt")}
    files: list[str | None] = []
    claimed: dict[str, str] = {}
    full = official = 0
    for image in paths:
        by_path = label_file_for(image)
        if by_path in present:
            files.append(by_path)
            full += 1
            continue
        by_rule = official_label_file_for(image)
        if by_rule in present:
            if by_rule in claimed:
                raise ValueError(
                    f"ambiguous label files: {label_dir / by_rule} matches both "
                    f"{claimed[by_rule]!r} and {image!r} by the official rule (last two path "
                    "components, the name up to its first dot); give each image its own file, "
                    "mirroring the image tree")
            claimed[by_rule] = str(image)
            files.append(by_rule)
            official += 1
        else:
            files.append(None)
    used = {f for f in files if f is not None}
    return LabelFileMatch(files, full, official, len(present - used))


def load_label_file(path: Path) -> object:
    """What a label file holds, read as images are read (``storage.images.read_image_bytes``:
    a regular file only, opened without blocking, so a FIFO is refused, not waited on), then
    unpickled with tensors only (``weights_only``). Raises FileNotFoundError if it is missing,
    ValueError saying why it cannot be read."""
    try:
        data = read_image_bytes(path)
    except ImageRejected as e:
        if e.status == ImageStatus.MISSING_FILE:
            raise FileNotFoundError(e.reason) from None
        raise ValueError(e.reason) from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file that is no checkpoint
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{path}: {type(e).__name__}: {reason}") from None


def read_label_file(path: Path, topk: int, grid: tuple[int, int], num_classes: int):
    """(logits [K,H,W] f16, classes [K,H,W] int) or an ImageStatus saying why not."""
    try:
        tensor = load_label_file(path)
    except FileNotFoundError:
        return ImageStatus.LABEL_FILE_MISSING
    except ValueError:
        return ImageStatus.LABEL_FILE_INVALID
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (2, topk, *grid):
        return ImageStatus.LABEL_FILE_INVALID
    logits = tensor[0].to(torch.float16).numpy()
    classes = tensor[1].float().numpy()
    # NaN fails every comparison, so finiteness is checked first, explicitly.
    valid = (np.isfinite(logits).all() and np.isfinite(classes).all()
             and (classes == np.rint(classes)).all()
             and (classes >= 0).all() and (classes < num_classes).all())
    if not valid:
        return ImageStatus.LABEL_FILE_INVALID
    return logits, classes.astype(np.int64)


def probe_layout(label_dir: Path, match: LabelFileMatch) -> tuple[int, tuple[int, int]]:
    """Top-K and grid from the first readable label file matched. Files that are not label
    files are passed over (the import gives each its status); only when none of the first
    ``PROBE_LIMIT`` is one is the import refused."""
    first_problem = None
    matched = (rel for rel in match.files if rel is not None)
    for rel in itertools.islice(matched, PROBE_LIMIT):
        f = label_dir / rel
        try:
            tensor = load_label_file(f)
        except (FileNotFoundError, ValueError) as e:
            first_problem = first_problem or str(e)
            continue
        if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4 or tensor.shape[0] != 2:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
            first_problem = first_problem or f"{f}: {shape}, not a tensor of shape [2, K, H, W]"
            continue
        return int(tensor.shape[1]), (int(tensor.shape[2]), int(tensor.shape[3]))
    if first_problem is not None:
        raise ValueError(f"none of the first {PROBE_LIMIT} label files matched is a TokenLabeling "
                         f"label file (e.g. {first_problem})")
    raise FileNotFoundError(
        f"no label file under {label_dir} matches an image of the dataset (expected <image path "
        "without suffix>.pt, or <class folder>/<name up to its first dot>.pt)")


def import_tokenlabeling(store: Store, dataset_name: str, label_dir: Path, num_classes: int = 1000,
                         model: str = "dm_nfnet_f6", input_size: int = 576,
                         shard_size: int = DEFAULT_SHARD_SIZE,
                         chunk_size: int | None = None, workers: int = 8,
                         progress: bool = True,
                         ignore_dataset_classes: bool = False) -> ImportReport:
    if num_classes > FP16_EXACT_INTEGERS:
        raise ValueError(
            f"TokenLabeling files store class ids as float16, which cannot tell apart ids above "
            f"{FP16_EXACT_INTEGERS}; with {num_classes} classes the imported classes would be "
            "wrong. Regenerate these labels with `labeler label` instead.")
    dataset = store.dataset(dataset_name)
    teacher = TeacherSpec(model=model, checkpoint_sha256=None, num_classes=num_classes,
                          input_size=input_size, class_names=imagenet_class_names(num_classes),
                          resize="center_crop")
    if not ignore_dataset_classes:
        check_class_space(dataset, teacher)
    manifest = dataset.manifest()
    label_dir = Path(label_dir)
    match = match_label_files(label_dir, manifest.path)
    topk, grid = probe_layout(label_dir, match)
    with disk_full_is_said(store, "the import"):
        labelset = dataset.create_labelset(LabelSetConfig(
            teacher=teacher, topk=topk, grid=grid, dataset_fingerprint=dataset.fingerprint,
            shard_size=shard_size, chunk_size=chunk_size,
            extra={"source": "tokenlabeling-import", "import_dir": str(label_dir.resolve())}))
        todo = labelset.pending_shards()
        report = ImportReport(labelset.id, shards_skipped=labelset.num_shards - len(todo),
                              matched_full_path=match.full_path, matched_official=match.official,
                              images_without_file=match.files.count(None),
                              files_unmatched=match.unmatched_files)
        import_shards(labelset, todo, label_dir, match, manifest.path, num_classes, workers,
                      progress, report)
        labelset.record_completion()
    return report


def import_shards(labelset: LabelSet, todo: list[int], label_dir: Path, match: LabelFileMatch,
                  paths: PathColumn, num_classes: int, workers: int, progress: bool,
                  report: ImportReport) -> None:
    """Read the label files of shards ``todo`` (``workers`` threads) and write each shard."""
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            total=sum(e - s for s, e in map(labelset.shard_range, todo)), unit="img",
            disable=not progress) as bar:
        for shard in todo:
            block = labelset.empty_block(shard)
            # an image without a file reads a path that does not exist: LABEL_FILE_MISSING
            files = [label_dir / (rel or label_file_for(p)) for rel, p in
                     zip(match.files[block.start:block.stop], paths[block.start:block.stop],
                         strict=True)]
            results = pool.map(lambda f: read_label_file(f, labelset.topk, labelset.grid,
                                                         num_classes), files)
            for row, result in enumerate(results):
                if isinstance(result, ImageStatus):
                    block.status[row] = result
                    report.images_failed[result] += 1
                else:
                    block.logits[row], block.classes[row] = result
                    block.status[row] = ImageStatus.LABELED
                    report.images_imported += 1
            labelset.write_shard(shard, block)
            report.shards_written += 1
            bar.update(len(block))
