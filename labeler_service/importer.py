"""Import labels in the public TokenLabeling layout into a label set.

That layout is one ``.pt`` file per image, mirroring the image tree with ``.pt`` in place of the
image suffix, holding a float16 tensor [2, K, H, W]: the top-K logits, then the class ids stored
as float16. Those files carry no logsumexp and no image-level labels, so the imported label set has
``lse`` and ``global_logits`` NaN and ``global_classes`` -1 (documented in docs/store-format.md).
The public generator centre-cropped the image, which the label set records as ``resize``.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from tqdm import tqdm

from labeler_service.labeling import check_class_space
from labeler_service.teacher import imagenet_class_names
from storage import ImageStatus, LabelSetConfig, Store, TeacherSpec
from storage.labelset import DEFAULT_SHARD_SIZE

FP16_EXACT_INTEGERS = 2048  # float16 holds every integer up to 2048, and not all above


@dataclass
class ImportReport:
    labelset_id: str
    images_imported: int = 0
    images_failed: Counter = field(default_factory=Counter)
    shards_written: int = 0
    shards_skipped: int = 0


def label_file_for(image_path: str) -> str:
    return str(PurePosixPath(image_path).with_suffix(".pt"))


def read_label_file(path: Path, topk: int, grid: tuple[int, int], num_classes: int):
    """(logits [K,H,W] f16, classes [K,H,W] int) or an ImageStatus saying why not."""
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return ImageStatus.LABEL_FILE_MISSING
    except Exception:
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


def probe_layout(label_dir: Path, paths: np.ndarray) -> tuple[int, tuple[int, int]]:
    """Top-K and grid from the first label file present."""
    for p in paths:
        f = label_dir / label_file_for(p)
        if f.is_file():
            try:
                tensor = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:
                raise ValueError(f"{f} is not a TokenLabeling label file: {e}") from None
            if not isinstance(tensor, torch.Tensor) or tensor.ndim != 4 or tensor.shape[0] != 2:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor)
                raise ValueError(f"{f}: {shape}, expected a tensor of shape [2, K, H, W]")
            return int(tensor.shape[1]), (int(tensor.shape[2]), int(tensor.shape[3]))
    raise FileNotFoundError(f"no label file under {label_dir} matches an image of the dataset "
                            "(expected <image path without suffix>.pt)")


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
    topk, grid = probe_layout(label_dir, manifest.path)
    labelset = dataset.create_labelset(LabelSetConfig(
        teacher=teacher, topk=topk, grid=grid, dataset_fingerprint=dataset.fingerprint,
        shard_size=shard_size, chunk_size=chunk_size,
        extra={"source": "tokenlabeling-import", "import_dir": str(label_dir.resolve())}))
    todo = labelset.pending_shards()
    report = ImportReport(labelset.id, shards_skipped=labelset.num_shards - len(todo))

    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            total=sum(e - s for s, e in map(labelset.shard_range, todo)), unit="img",
            disable=not progress) as bar:
        for shard in todo:
            block = labelset.empty_block(shard)
            files = [label_dir / label_file_for(p) for p in manifest.path[block.start:block.stop]]
            results = pool.map(lambda f: read_label_file(f, topk, grid, num_classes), files)
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
    return report
