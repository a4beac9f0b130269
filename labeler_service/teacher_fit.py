"""Fitting a teacher to a dataset's own classes: ``labeler teacher fit``.

A dense teacher must be in the label space of the data it labels; a user with their own classes
needs a classifier trained on them. This trains a timm classifier whose head is global average
pool + linear (so ``labeler label`` can apply it densely) on a registered ImageFolder dataset:

* from scratch, or fine-tuning every weight of a local pretrained checkpoint: RandomResizedCrop +
  flip, AdamW with warm-up + cosine, bf16 autocast on CUDA;
* ``head_only``: a new linear head on the frozen features of a pretrained backbone. The features
  are computed once, in one pass over the data (the whole image resized as labeling resizes it,
  no augmentation), and the head is trained on them; the backbone is not touched.

Images with a known class whose file is readable are used; a stable hash of the path holds out
a split (``storage.splits.held_out``, as the trainer does) on which top-1/top-5 are measured. The
result is a ``.safetensors`` state dict that ``labeler label`` loads as it is, with the class
names, the held-out accuracy and the split in its metadata (``teacher.fitted_metadata``), and a
JSON report beside it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms import RandomResizedCrop
from tqdm import tqdm

from labeler_service.checkpoint_files import FITTED_FIELDS, FITTED_FORMAT, FITTED_FORMAT_VERSION
from labeler_service.labeling import AUTOCAST_DTYPES, ModelInput, default_workers
from labeler_service.teacher import (
    DenseTeacher,
    create_dense_model,
    file_sha256,
    load_state_dict,
    weights_mismatch,
)
from storage import PathColumn, Store
from storage.dataset import Dataset as StoreDataset
from storage.images import (
    DEFAULT_MAX_PIXELS,
    ImageRejected,
    decode_image,
    open_rgb,
    read_image_bytes,
)
from storage.store import code_version


class FitError(ValueError):
    """The dataset or the request cannot give a teacher (a one-line reason for the user)."""


@dataclass
class FitOptions:
    input_size: int
    epochs: int | None = None  # None: 10 (training the network), 100 (head only: nearly free)
    batch_size: int = 32
    # Peak AdamW learning rate; None: 3e-3 from scratch and for a head (from scratch: chosen on
    # the held-out split of the scenes, BENCHMARKS.md (e)), 2e-4 when fine-tuning a pretrained
    # network (a usual fine-tuning rate, not tuned here: no pretrained weights offline).
    lr: float | None = None
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    # RandomResizedCrop's area range. Smaller crops regularise more but learn slower: on the
    # scenes in a CPU budget 0.6 beat 0.35 (BENCHMARKS.md (e)).
    crop_scale: tuple[float, float] = (0.5, 1.0)
    # Zoom-out after the crop: with probability ``zoom_out_p`` the crop is shrunk by a factor
    # in [1, zoom_out] and placed at random on a canvas of its mean colour, so objects are also
    # seen smaller than whole images show them (a dense teacher meets every object size).
    zoom_out: float = 1.0
    zoom_out_p: float = 0.5
    label_smoothing: float = 0.1
    val_permille: int = 100
    # Dilate the last stages to this stride (timm's option), e.g. 16: a grid twice as dense at
    # the same input size; ``labeler label`` takes it from the checkpoint. None: the model's own.
    output_stride: int | None = None
    device: str = "cpu"
    precision: str = "bf16"  # autocast dtype on CUDA
    workers: int | None = None  # decoding processes; None: as labeling chooses
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    progress: bool = True


@dataclass
class FitReport:
    """What ``fit_teacher`` did and measured; written as JSON beside the checkpoint."""

    model: str
    dataset: str
    dataset_fingerprint: str
    class_names: list[str]
    input_size: int
    output_stride: int | None
    head_only: bool
    backbone: str | None  # the pretrained checkpoint's file name, if any
    backbone_sha256: str | None
    val_permille: int
    epochs: int
    lr: float
    train_images: int = 0
    heldout_images: int = 0
    images_failed: int = 0  # unreadable, changed or missing files (left out)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), first few
    heldout_top1: float | None = None
    heldout_top5: float | None = None
    heldout_per_class_top1: dict[str, float | None] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # per epoch: loss, lr, held-out top-1
    seconds: float = 0.0
    feature_seconds: float | None = None  # head only: the one pass over the data
    device: str = "cpu"
    checkpoint: str = ""
    created_at: str = ""
    code_version: str = ""

    def metadata(self) -> dict[str, str]:
        """The checkpoint's safetensors metadata: JSON values (``teacher.fitted_metadata``)."""
        meta = {k: json.dumps(len(self.class_names) if k == "num_classes" else getattr(self, k))
                for k in FITTED_FIELDS}
        meta["format_version"] = json.dumps(FITTED_FORMAT_VERSION)
        return {"format": FITTED_FORMAT, **meta}


# -- data ---------------------------------------------------------------------------------------

class FitImages(TorchDataset):
    """Image i as uint8 [S, S, 3] with its class, or a failure; cheap to send to workers.

    ``augment``: RandomResizedCrop + horizontal flip (drawn from the worker's torch RNG, which
    the DataLoader seeds from its generator). Otherwise the whole image is resized to S x S, as
    ``labeler label`` gives it to the teacher.
    """

    def __init__(self, root: Path, paths: PathColumn, sha256: np.ndarray,
                 file_sizes: np.ndarray | None, labels: Sequence[int], size: int,
                 interpolation: str, augment: bool, crop_scale: tuple[float, float],
                 max_pixels: int, zoom_out: float = 1.0, zoom_out_p: float = 0.0):
        self.root, self.paths, self.sha256, self.labels = Path(root), paths, sha256, labels
        self.file_sizes = file_sizes  # registered byte sizes; None for older datasets
        self.size, self.interpolation, self.augment = size, interpolation, augment
        self.max_pixels = max_pixels
        self.crop_scale, self.crop_ratio = crop_scale, (3 / 4, 4 / 3)
        self.zoom_out, self.zoom_out_p = zoom_out, zoom_out_p
        # Decode JPEGs at a reduced scale only down to what the smallest crop still needs.
        self.draft_size = math.ceil(size / math.sqrt(crop_scale[0]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray, int, str]:
        name = self.paths[i]
        try:
            data = read_image_bytes(
                self.root / name, self.sha256[i].tobytes(), root=self.root,
                expected_size=None if self.file_sizes is None else int(self.file_sizes[i]))
            if not self.augment:
                pixels = decode_image(data, self.size, self.interpolation, self.max_pixels, name)
                return i, pixels, int(self.labels[i]), ""
            img = open_rgb(data, self.max_pixels, name, draft_size=self.draft_size)
        except ImageRejected as e:
            return i, np.zeros((self.size, self.size, 3), np.uint8), -1, e.reason
        top, left, height, width = RandomResizedCrop.get_params(img, self.crop_scale,
                                                                self.crop_ratio)
        img = img.resize((self.size, self.size), Image.Resampling.BICUBIC,
                         box=(left, top, left + width, top + height))
        if torch.rand(()) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(img, dtype=np.uint8)
        if self.zoom_out > 1 and torch.rand(()) < self.zoom_out_p:
            pixels = zoom_out(pixels, float(1 + (self.zoom_out - 1) * torch.rand(())))
        return i, pixels, int(self.labels[i]), ""


def zoom_out(pixels: np.ndarray, factor: float) -> np.ndarray:
    """``pixels`` [S, S, 3] shrunk by ``factor`` and placed at a random spot of an S x S canvas
    filled with their mean colour."""
    size = pixels.shape[0]
    side = max(1, round(size / factor))
    small = np.asarray(Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC))
    canvas = np.empty_like(pixels)
    canvas[:] = pixels.reshape(-1, 3).mean(axis=0).astype(np.uint8)
    top, left = (int(torch.randint(0, size - side + 1, ())) for _ in range(2))
    canvas[top:top + side, left:left + side] = small
    return canvas


def collate(items: list[tuple[int, np.ndarray, int, str]]):
    index, pixels, labels, reasons = zip(*items, strict=True)
    return (torch.as_tensor(index), torch.from_numpy(np.stack(pixels)), torch.as_tensor(labels),
            list(reasons))


# -- the fit -----------------------------------------------------------------------------------

@dataclass
class Split:
    """The usable images of a dataset: manifest rows, classes, and which are held out."""

    rows: np.ndarray  # manifest indices
    labels: np.ndarray
    held: np.ndarray  # bool, per row


def usable_split(dataset: StoreDataset, val_permille: int) -> Split:
    """Images with a known class and a readable header, split by path hash; refuses datasets
    that cannot train a classifier, with the reason."""
    classes = dataset.class_names
    if not classes:
        raise FitError(f"dataset {dataset.name!r} has no classes: its images are not in class "
                       "folders (<root>/<class>/<image>, the ImageFolder layout)")
    if len(classes) == 1:
        raise FitError(f"dataset {dataset.name!r} has one class ({classes[0]!r}): a classifier "
                       "needs at least two")
    classes_of, widths = dataset.column("class"), dataset.column("width")
    rows = np.flatnonzero((classes_of >= 0) & (widths > 0))
    labels = classes_of[rows]
    held = dataset.held_out(val_permille)[rows]
    per_class = np.bincount(labels[~held], minlength=len(classes))
    if (per_class == 0).any():
        name = classes[int(np.flatnonzero(per_class == 0)[0])]
        total = int((labels == classes.index(name)).sum())
        raise FitError(f"class {name!r} of dataset {dataset.name!r} has no training images "
                       f"({total} readable, all held out)" if total else
                       f"class {name!r} of dataset {dataset.name!r} has no readable images")
    return Split(rows, labels, held)


def create_classifier(model_name: str, num_classes: int, checkpoint: Path | None,
                      input_size: int, output_stride: int | None = None,
                      ) -> tuple[nn.Module, str | None]:
    """The timm model with a new ``num_classes`` head; a checkpoint gives every other weight.
    Refuses models whose head is not global average pool + linear (they cannot label densely)."""
    if model_name not in timm.list_models():
        raise FitError(f"unknown timm model {model_name!r}")
    model = create_dense_model(model_name, num_classes, output_stride)
    sha256 = None
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        head = f"{model.pretrained_cfg.get('classifier') or 'head.fc'}."
        state = {k: v for k, v in state.items() if not k.startswith(head)}
        mismatch = weights_mismatch(model, state, skip=head)
        if mismatch:
            raise FitError(f"checkpoint {checkpoint} does not fit {model_name} ({mismatch}): is "
                           "it a checkpoint of another model?")
        model.load_state_dict(state, strict=False)  # all but the new head, checked above
        sha256 = file_sha256(checkpoint)
    stride = model.feature_info[-1]["reduction"] if getattr(model, "feature_info", None) else 1
    if input_size % stride:
        raise FitError(f"--input-size {input_size} is not a multiple of {model_name}'s stride "
                       f"{stride}")
    DenseTeacher(model.eval()).check_dense_invariant(input_size)  # before minutes of training
    return model, sha256


def fit_teacher(store: Store, dataset_name: str, model_name: str, out: Path,
                options: FitOptions, checkpoint: Path | None = None,
                head_only: bool = False) -> FitReport:
    """Train the teacher, measure it on the held-out split, write ``out`` and its JSON report."""
    began = time.perf_counter()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise FitError(f"--out {out}: the teacher is written as .safetensors")
    if head_only and checkpoint is None:
        raise FitError("--head-only needs --checkpoint: a pretrained backbone to keep frozen")
    check_writable(out)  # now, not after minutes of training
    dataset = store.dataset(dataset_name)
    if not Path(dataset.source_root).is_dir():
        raise FileNotFoundError(f"dataset {dataset_name!r}: its images at "
                                f"{dataset.source_root} are not reachable")
    split = usable_split(dataset, options.val_permille)
    device = torch.device(options.device)
    torch.manual_seed(options.seed)
    model, backbone_sha = create_classifier(model_name, len(dataset.class_names), checkpoint,
                                            options.input_size, options.output_stride)
    epochs = options.epochs or (100 if head_only else 10)
    lr = options.lr or (2e-4 if checkpoint is not None and not head_only else 3e-3)
    report = FitReport(
        model=model_name, dataset=dataset_name, dataset_fingerprint=dataset.fingerprint,
        class_names=list(dataset.class_names), input_size=options.input_size,
        output_stride=options.output_stride, head_only=head_only,
        backbone=checkpoint.name if checkpoint else None,
        backbone_sha256=backbone_sha, val_permille=options.val_permille, epochs=epochs, lr=lr,
        device=str(device), checkpoint=str(out), code_version=code_version())

    data_cfg = timm.data.resolve_data_config({}, model=model)
    manifest = dataset.manifest()

    def images(rows: np.ndarray, augment: bool) -> FitImages:
        sizes = None if manifest.size is None else manifest.size[rows]
        return FitImages(Path(dataset.source_root), manifest.path[rows], manifest.sha256[rows],
                         sizes, manifest.label[rows], options.input_size,
                         data_cfg.get("interpolation", "bicubic"), augment, options.crop_scale,
                         options.max_pixels, options.zoom_out, options.zoom_out_p)

    workers = default_workers(device) if options.workers is None else options.workers
    model_input = ModelInput(data_cfg["mean"], data_cfg["std"], device)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    autocast = (torch.autocast("cuda", dtype=AUTOCAST_DTYPES[options.precision])
                if device.type == "cuda" and AUTOCAST_DTYPES[options.precision]
                else contextlib.nullcontext())
    run = _Run(model, model_input, device, autocast, options, workers, report)

    train_rows, held_rows = split.rows[~split.held], split.rows[split.held]
    if head_only:
        run.fit_head(images(split.rows, augment=False), split.held, epochs, lr)
    else:
        run.fit_network(images(train_rows, augment=True), images(held_rows, augment=False),
                        epochs, lr)
    if report.train_images == 0:
        raise FitError(f"no image of dataset {dataset_name!r} could be decoded for training")

    report.created_at = datetime.now(UTC).isoformat(timespec="seconds")
    report.seconds = time.perf_counter() - began
    save_teacher(model, out, report)
    return report


def check_writable(out: Path) -> None:
    """Refuse an ``out`` that cannot be written, by doing what ``save_teacher`` does there: make
    its folder and a temporary file in it (removed again)."""
    tmp = temporary_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb"):
            pass
        os.unlink(tmp)
    except OSError as e:
        raise FitError(f"--out {out}: cannot write there ({e.strerror or e})") from None


def temporary_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp")


def save_teacher(model: nn.Module, out: Path, report: FitReport) -> None:
    """The state dict as .safetensors with the fit's metadata, and the report as JSON, each
    written to a temporary file and renamed (a crash never leaves a half-written teacher)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", memory_format=torch.contiguous_format).contiguous()
             for k, v in model.state_dict().items()}
    tmp = temporary_path(out)
    save_file(state, str(tmp), metadata=report.metadata())
    os.replace(tmp, out)
    report_path = report_path_for(out)
    tmp = temporary_path(report_path)
    tmp.write_text(json.dumps(asdict(report), indent=2) + "\n")
    os.replace(tmp, report_path)


def report_path_for(checkpoint: Path) -> Path:
    return Path(checkpoint).with_suffix(".json")


@dataclass
class _Run:
    """The pieces both ways of fitting share: input normalisation, passes, held-out scoring."""

    model: nn.Module
    model_input: ModelInput
    device: torch.device
    autocast: contextlib.AbstractContextManager
    options: FitOptions
    workers: int
    report: FitReport
    failed: Counter = field(default_factory=Counter)

    def loader(self, images: FitImages, shuffle: bool) -> DataLoader:
        """Decoding processes that live for the whole fit (each epoch reuses them): the
        sampler's order and the workers' augmentation RNGs follow from the seed."""
        return DataLoader(images, batch_size=self.options.batch_size, shuffle=shuffle,
                          num_workers=self.workers, collate_fn=collate,
                          pin_memory=self.device.type == "cuda",
                          generator=torch.Generator().manual_seed(self.options.seed),
                          persistent_workers=self.workers > 0)

    def batches(self, loader: DataLoader) -> Iterator[tuple]:
        """Decoded batches on the device: (positions in the dataset, input, labels); failed
        images are left out and recorded once."""
        for index, pixels, labels, reasons in loader:
            ok = labels >= 0
            for i in np.flatnonzero(~ok.numpy()):
                path = loader.dataset.paths[int(index[i])]
                if path not in self.failed:
                    self.failed[path] += 1
                    self.report.images_failed += 1
                    if len(self.report.failures) < 20:
                        self.report.failures.append((str(path), reasons[i]))
            if ok.any():
                x = self.model_input(pixels[ok])
                yield index[ok], x, labels[ok].to(self.device, non_blocking=True)

    def schedule(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int, epochs: int):
        warmup = max(1, round(self.options.warmup_epochs * steps_per_epoch))
        total = max(warmup + 1, epochs * steps_per_epoch)
        return torch.optim.lr_scheduler.SequentialLR(optimizer, [
            torch.optim.lr_scheduler.LinearLR(optimizer, 1e-3, 1.0, total_iters=warmup),
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total - warmup)],
            milestones=[warmup])

    def score(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Held-out top-1/top-5, overall and per class, into the report."""
        report = self.report
        report.heldout_images = len(labels)
        if not len(labels):
            return
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit1 = (top[:, 0] == labels).double()
        report.heldout_top1 = hit1.mean().item()
        report.heldout_top5 = (top == labels[:, None]).any(dim=1).double().mean().item()
        for c, name in enumerate(report.class_names):
            mine = labels == c
            report.heldout_per_class_top1[name] = hit1[mine].mean().item() if mine.any() else None

    # -- the whole network --------------------------------------------------------------------

    def fit_network(self, train: FitImages, heldout: FitImages, epochs: int, lr: float) -> None:
        model, options = self.model, self.options
        decay = [p for p in model.parameters() if p.ndim > 1]  # no decay on biases and gains
        rest = [p for p in model.parameters() if p.ndim <= 1]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": options.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}], lr=lr)
        steps_per_epoch = math.ceil(len(train) / options.batch_size)
        scheduler = self.schedule(optimizer, steps_per_epoch, epochs)
        bar = tqdm(total=epochs * steps_per_epoch, unit="step", disable=not options.progress,
                   dynamic_ncols=True, desc="teacher fit")
        seen: set[int] = set()
        train_loader = self.loader(train, shuffle=True)
        heldout_loader = self.loader(heldout, shuffle=False) if len(heldout) else None
        try:
            for epoch in range(epochs):
                model.train()
                losses = []
                for index, x, labels in self.batches(train_loader):
                    with self.autocast:
                        logits = model(x)
                    loss = F.cross_entropy(logits.float(), labels,
                                           label_smoothing=options.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    optimizer.step()
                    scheduler.step()
                    losses.append(loss.item())
                    seen.update(index.tolist())
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
                self.report.train_images = len(seen)
                if heldout_loader is not None:
                    self.evaluate(heldout_loader)
                self.report.history.append({
                    "epoch": epoch, "loss": float(np.mean(losses)) if losses else None,
                    "lr": scheduler.get_last_lr()[0], "heldout_top1": self.report.heldout_top1})
        finally:
            bar.close()
        model.eval()

    @torch.no_grad()
    def evaluate(self, heldout: DataLoader) -> None:
        self.model.eval()
        logits, labels = [], []
        for _, x, y in self.batches(heldout):
            with self.autocast:
                logits.append(self.model(x).float())
            labels.append(y)
        if logits:
            self.score(torch.cat(logits), torch.cat(labels))

    # -- a new head on frozen features ----------------------------------------------------------

    @torch.no_grad()
    def features(self, images: FitImages) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
        """One pass over the images: pooled features [N, F] (float32) and labels, for the
        images that decoded (their positions in ``images``)."""
        self.model.eval()
        positions, feats, labels = [], [], []
        bar = tqdm(total=len(images), unit="img", disable=not self.options.progress,
                   dynamic_ncols=True, desc="features")
        for index, x, y in self.batches(self.loader(images, shuffle=False)):
            with self.autocast:
                f = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
            positions.append(index.numpy())
            feats.append(f.float())
            labels.append(y)
            bar.update(len(index))
        bar.close()
        if not feats:
            return np.zeros(0, np.int64), torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return np.concatenate(positions), torch.cat(feats), torch.cat(labels)

    def fit_head(self, images: FitImages, held: np.ndarray, epochs: int, lr: float) -> None:
        """Train only the classifier, on features computed once; the backbone never changes
        (no gradient, eval mode: not even normalisation statistics move)."""
        model, options = self.model, self.options
        for p in model.parameters():
            p.requires_grad_(False)
        started = time.perf_counter()
        positions, feats, labels = self.features(images)
        self.report.feature_seconds = time.perf_counter() - started
        is_held = torch.from_numpy(held[positions]).to(self.device)
        train_x, train_y = feats[~is_held], labels[~is_held]
        self.report.train_images = len(train_y)
        if not len(train_y):
            return
        head = model.get_classifier()
        for p in head.parameters():
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(head.parameters(), lr=lr,
                                      weight_decay=options.weight_decay)
        batch = max(options.batch_size, 256)  # a linear layer: big batches cost nothing
        steps_per_epoch = math.ceil(len(train_y) / batch)
        scheduler = self.schedule(optimizer, steps_per_epoch, epochs)
        generator = torch.Generator(device="cpu").manual_seed(options.seed)
        with torch.enable_grad():
            for epoch in range(epochs):
                order = torch.randperm(len(train_y), generator=generator).to(self.device)
                losses = []
                for start in range(0, len(order), batch):
                    rows = order[start:start + batch]
                    loss = F.cross_entropy(head(train_x[rows]), train_y[rows],
                                           label_smoothing=options.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    scheduler.step()
                    losses.append(loss.item())
                self.report.history.append({"epoch": epoch, "loss": float(np.mean(losses)),
                                            "lr": scheduler.get_last_lr()[0]})
        for p in head.parameters():
            p.requires_grad_(False)
        with torch.no_grad():
            self.score(head(feats[is_held]), labels[is_held])
