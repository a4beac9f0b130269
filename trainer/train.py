"""Training a ViT on images and token labels from the store: one loop, top to bottom.

Per step: a batch of cropped, flipped images with their crop boxes; the stored top-K label maps
densified on the device, cropped by the same boxes with RoIAlign (to the token grid for the
patch tokens, to 1x1 for the class token) and flipped like the images; the model's class and
token outputs (MixToken mixes patch embeddings, un-mixes the token outputs, and the class target
is mixed by area); the token-labeling loss; AdamW with warm-up + cosine, AMP (bf16 on CUDA),
gradient clipping, optional EMA. A checkpoint each epoch holds the model, optimizer, scheduler,
EMA and the stream position, so ``--resume`` goes on mid-epoch in the same order.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from trainer.augment import IDENTITY_THETA, RandAugmentConfig, warp_maps
from trainer.checkpoints import CheckpointError, load_file, load_weights, read_checkpoint
from trainer.data.normalize import IMAGENET_MEAN, IMAGENET_STD, Normalize
from trainer.data.stream import StreamConfig, StreamPosition, TokenLabelStream, by_reason
from trainer.labels import densify, roi_align_labels, scatter_logits
from trainer.loss import class_target, ground_truth_loss, token_labeling_loss
from trainer.models import check_options, create_model
from trainer.models.mixtoken import box_area_fraction

log = logging.getLogger(__name__)

@dataclass
class TrainConfig:
    store: str
    dataset: str
    labels: str
    out: str
    model: str = "lvvit_t"
    input_size: int = 224
    epochs: int = 300
    batch_size: int = 64
    lr: float = 1.6e-3  # per 1024 images, scaled by the global batch size
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    min_lr: float = 1e-5
    clip_grad: float = 1.0  # 0: no clipping
    beta: float = 0.5  # weight of the token loss
    gt_weight: float = 0.0  # class target: (1 - w) teacher's crop label + w ground truth
    label_smoothing: float = 0.0
    token_label: bool = True  # False: the ground-truth class only (the baseline)
    target_mode: str = "exact"  # exact | official: how crop targets are built (train.targets)
    mix_token: bool = True
    ema: float = 0.0  # EMA decay; 0 is off
    workers: int = 4
    seed: int = 0
    val_permille: int = 20  # held out by path hash, for `trainer eval`
    augment: bool = True  # RandomResizedCrop + flip
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    rand_augment: bool = False  # rand-m9-mstd0.5-inc1, labels moved with the pixels
    color_jitter: float = 0.4  # brightness, contrast, saturation (timm: off with RandAugment)
    random_erase: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN  # pixel normalisation (data config)
    std: tuple[float, float, float] = IMAGENET_STD
    model_kwargs: dict = field(default_factory=dict)  # registers, sta, anf, ...
    init: str | None = None  # fine-tune from these weights (any trainer.checkpoints kind)
    max_steps_per_epoch: int | None = None  # for smoke tests
    save_every: int = 500  # steps between mid-epoch checkpoints (last.pt)
    progress: bool = True


# The published LV-ViT training recipe (docs/trainer.md lists what still differs). Drop-path by
# variant: S 0.1 and M 0.2 as the official commands; T 0.1 and L 0.3 not confirmed here.
RECIPES: dict[str, dict] = {
    "lvvit": {"rand_augment": True, "color_jitter": 0.0, "random_erase": 0.25, "ema": 0.99992,
              "clip_grad": 0.0, "beta": 1.0, "label_smoothing": 0.1, "target_mode": "official",
              "lr": 1.6e-3, "weight_decay": 0.05, "warmup_epochs": 5.0, "crop_scale": (0.08, 1.0)},
}
RECIPE_DROP_PATH = {"lvvit_t": 0.1, "lvvit_s": 0.1, "lvvit_m": 0.2, "lvvit_l": 0.3}


def recipe_settings(name: str, model: str) -> dict:
    """TrainConfig fields of recipe ``name`` for ``model`` (drop-path goes in model_kwargs)."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(sorted(RECIPES))}")
    settings = dict(RECIPES[name])
    if model in RECIPE_DROP_PATH:
        settings["drop_path"] = RECIPE_DROP_PATH[model]
    return settings


def with_recipe(config: TrainConfig, name: str, keep: Collection[str] = ()) -> TrainConfig:
    """``config`` with recipe ``name``'s settings, except the fields named in ``keep`` (those a
    user set); drop-path is set in ``model_kwargs`` unless it is there already."""
    changes, model_kwargs = {}, dict(config.model_kwargs)
    for field_name, value in recipe_settings(name, config.model).items():
        if field_name == "drop_path":
            model_kwargs.setdefault("drop_path", value)
        elif field_name not in keep:
            changes[field_name] = value
    return replace(config, model_kwargs=model_kwargs, **changes)


class ForwardTrain(torch.nn.Module):
    """``model.forward_train`` as a module's forward, so DistributedDataParallel sees the call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.forward_train(x)


def distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) under torchrun, or (0, 1, the best local device)."""
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        if torch.cuda.is_available():
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return rank, world, torch.device("cuda", local)
        return rank, world, torch.device("cpu")
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def targets(batch: dict, grid: tuple[int, int], num_classes: int, device: torch.device,
            mode: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """Class-token target [B, C] and patch-token targets [B, N, C] for the crops in ``batch``.

    ``mode="exact"``: the teacher's per-cell probabilities (``densify``) are RoIAligned.
    ``"official"``: as the public code builds them, the top-K logits scattered into all classes
    with 0 elsewhere, RoIAligned as logits, then softmaxed (an implicit, confidence-dependent
    smoothing; the two disagree where a crop mixes confident and unconfident cells).
    """
    boxes, flip = batch["box"], batch["flip"].to(device)  # boxes: roi_align_labels moves them
    if mode == "exact":
        dense = densify(batch["logits"].to(device), batch["classes"].to(device),
                        batch["lse"].to(device), num_classes)
        tokens = roi_align_labels(dense, boxes, grid, flip)  # [B, C, h, w]
        cls = roi_align_labels(dense, boxes, (1, 1), flip)[:, :, 0, 0]
    elif mode == "official":
        logits = scatter_logits(batch["logits"].to(device), batch["classes"].to(device),
                                num_classes)
        tokens = roi_align_labels(logits, boxes, grid, flip, distributions=False).softmax(1)
        cls = roi_align_labels(logits, boxes, (1, 1), flip,
                               distributions=False)[:, :, 0, 0].softmax(1)
    else:
        raise ValueError(f"target mode must be exact or official, got {mode!r}")
    theta = batch.get("theta")
    if theta is not None and not torch.equal(theta, IDENTITY_THETA.expand_as(theta)):
        tokens = warp_maps(tokens, theta)  # RandAugment's geometric ops, as the pixels moved
    return cls, tokens.flatten(2).transpose(1, 2)


def batch_loss(net: torch.nn.Module, grid: tuple[int, int], batch: dict, x: torch.Tensor,
               config: TrainConfig, num_classes: int,
               autocast) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One batch's loss: the model's class and token outputs against the crops' targets."""
    with autocast:
        cls_logits, token_logits, mix_box = net(x)
    cls_logits, token_logits = cls_logits.float(), token_logits.float()
    if config.token_label:
        cls_target, token_target = targets(batch, grid, num_classes, x.device,
                                           config.target_mode)
        cls_target = class_target(cls_target, batch["target"], config.gt_weight)
    else:
        cls_target = F.one_hot(batch["target"].to(x.device), num_classes).float()
    if mix_box is not None:  # the class token saw two images: mix its target by area
        area = box_area_fraction(mix_box, grid)
        cls_target = (1 - area) * cls_target + area * cls_target.flip(0)
    if config.token_label:
        return token_labeling_loss(cls_logits, token_logits, cls_target, token_target,
                                   beta=config.beta, label_smoothing=config.label_smoothing)
    return ground_truth_loss(cls_logits, cls_target, label_smoothing=config.label_smoothing)


def tensorboard_writer(out: Path):
    """A TensorBoard writer when the tensorboard package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay as timm applies it: none on the model's ``no_weight_decay()`` parameters
    (position embedding, class and register tokens), biases and norm weights (every parameter
    with fewer than 2 dimensions)."""
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: float, config: TrainConfig, steps_per_epoch: int, peak_lr: float) -> float:
    """Linear warm-up to ``peak_lr`` over ``config.warmup_epochs``, then cosine to min_lr."""
    warmup = config.warmup_epochs * steps_per_epoch
    total = config.epochs * steps_per_epoch
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.min_lr + 0.5 * (peak_lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def stream_config(config: TrainConfig) -> StreamConfig:
    """The training split's stream for ``config``: its images, labels and augmentation."""
    return StreamConfig(store=config.store, dataset=config.dataset, labelset=config.labels,
                        image_size=config.input_size, seed=config.seed,
                        val_permille=config.val_permille, augment=config.augment,
                        crop_scale=tuple(config.crop_scale),
                        rand_augment=RandAugmentConfig() if config.rand_augment else None,
                        random_erase=config.random_erase, color_jitter=config.color_jitter,
                        mean=tuple(config.mean), std=tuple(config.std))


def base_lr(config: TrainConfig, world: int = 1) -> float:
    """``config.lr`` is per 1024 images: scaled linearly by the global batch size."""
    return config.lr * config.batch_size * world / 1024


def build_optimizer(model: torch.nn.Module, config: TrainConfig,
                    world: int = 1) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; the schedule (:func:`lr_at`) sets the lr every step."""
    return torch.optim.AdamW(param_groups(model, config.weight_decay), lr=base_lr(config, world))


def build_ema(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel | None:
    """An exponential moving average of ``model``'s weights, or None when ``decay`` is 0."""
    if not decay:
        return None
    return torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(decay))


class TrainStep:
    """One optimisation step on one batch, exactly as :func:`train` runs it (and as
    ``benchmarks/bench_train.py`` times it): normalise on the device, forward under autocast,
    the loss, backward, clip, AdamW, EMA. Returns the metrics line's numbers (which syncs)."""

    def __init__(self, net: torch.nn.Module, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, config: TrainConfig, num_classes: int,
                 device: torch.device, ema: torch.optim.swa_utils.AveragedModel | None = None):
        self.net, self.model, self.optimizer, self.ema = net, model, optimizer, ema
        self.config, self.num_classes = config, num_classes
        self.normalize = Normalize(config.mean, config.std, device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                         else contextlib.nullcontext())
        # inf: the norm is measured for the metrics line, nothing is clipped
        self.clip = config.clip_grad if config.clip_grad > 0 else math.inf

    def __call__(self, batch: dict, lr: float) -> dict[str, float]:
        for lr_group in self.optimizer.param_groups:
            lr_group["lr"] = lr
        x = self.normalize(batch["image"])
        loss, parts = batch_loss(self.net, self.model.grid, batch, x, self.config,
                                 self.num_classes, self.autocast)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return {"loss": loss.item(), **{k: float(v) for k, v in parts.items()}, "lr": lr,
                "grad_norm": float(grad_norm)}


# Model options the trainer sets itself, and from what (not --model-kwargs)
TRAINER_OPTIONS = {"num_classes": "the label set's class count", "img_size": "--input-size",
                   "mix_token": "--no-mix-token"}
def epoch_steps(stream: TokenLabelStream, config: TrainConfig) -> int:
    """Steps of the stream's epoch: every rank's full batches (the least over the ranks, so
    that no rank waits for a batch another never gets), at most ``max_steps_per_epoch``."""
    steps = stream.full_batches(config.batch_size, config.workers)
    return min(steps, config.max_steps_per_epoch or steps)


def every_rank_has(batch: dict | None, world: int, device: torch.device) -> bool:
    """Whether every rank has a batch for this step (one collective when distributed): a rank
    whose stream skipped samples may run out first, and the others must stop with it, not
    wait for it in the gradient all-reduce."""
    if world == 1:
        return batch is not None
    have = torch.tensor([batch is not None], dtype=torch.int32, device=device)
    dist.all_reduce(have, op=dist.ReduceOp.MIN)
    return bool(have.item())


def epoch_skips(stream: TokenLabelStream, world: int,
                device: torch.device) -> collections.Counter[str]:
    """The samples the stream skipped this epoch, by reason, summed over the ranks."""
    if world == 1:
        return collections.Counter(stream.skipped_images())
    counts = stream.skip_counts.sum(0).to(device)
    dist.all_reduce(counts)
    return collections.Counter(by_reason(counts.cpu()))


def report_skips(epoch: int, counts: collections.Counter[str],
                 rank: int) -> collections.Counter[str]:
    """One log line for an epoch that skipped samples (rank 0); the counts, for the summary."""
    if counts and rank == 0:
        log.warning("epoch %d: %d samples skipped, not trained on (%s)", epoch,
                    counts.total(), ", ".join(f"{n} {why}" for why, n in sorted(counts.items())))
    return counts


RESUME_KEYS = ("model", "optimizer", "step", "epoch_step", "position", "rng")


def read_resume_state(path: Path, device: torch.device) -> dict:
    """The run state in ``path`` (``last.pt``), or :class:`CheckpointError` saying why it cannot
    be resumed from and which epoch checkpoint of the run can (:func:`last_good_epoch`)."""
    try:
        state = load_file(path, map_location=device)
        if not (isinstance(state, dict) and all(key in state for key in RESUME_KEYS)):
            raise CheckpointError(f"{path}: not a run state that --resume can go on from")
    except CheckpointError as e:
        good = last_good_epoch(path.parent, device)
        offer = (f"; {good} is the run's last good epoch checkpoint: copy it to {path} to "
                 "resume from the end of that epoch") if good else \
            "; the run has no good epoch checkpoint: start again without --resume"
        raise CheckpointError(f"{e}{offer}") from None
    return state


def restore_run(path: Path, device: torch.device, model: torch.nn.Module,
                optimizer: torch.optim.Optimizer,
                ema: torch.optim.swa_utils.AveragedModel | None) -> dict:
    """Model, optimizer and EMA as the run state in ``path`` left them; the state."""
    state = read_resume_state(path, device)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
    except (RuntimeError, ValueError) as e:  # another model's or run's checkpoint
        raise CheckpointError(f"{path} does not fit this run's model or options: "
                              f"{str(e).splitlines()[0]}") from None
    return state


def last_good_epoch(out: Path, device: torch.device) -> Path | None:
    """The newest ``epochNNNN.pt`` in ``out`` that loads as a run state (each is written at an
    epoch's end, positioned at the next epoch's start), or None."""
    for path in sorted(out.glob("epoch[0-9][0-9][0-9][0-9].pt"), reverse=True):
        try:
            state = load_file(path, map_location=device)
        except CheckpointError:
            continue
        if isinstance(state, dict) and all(key in state for key in RESUME_KEYS):
            return path
    return None


def open_metrics(path: Path, resumed_step: int | None):
    """``metrics.jsonl`` for appending: a fresh run starts it anew; a resumed run keeps the lines
    up to the step it resumed from (those after it were an interrupted run's, and are done
    again)."""
    kept = []
    if resumed_step is not None and path.is_file():
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= resumed_step:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by the interruption
    path.write_text("".join(kept))
    return open(path, "a")  # closed at the end of the run


def train(config: TrainConfig, resume: bool = False) -> dict:
    check_options(config.model, config.model_kwargs, TRAINER_OPTIONS)
    rank, world, device = distributed()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed + rank)

    # -- data -------------------------------------------------------------------------------
    stream = TokenLabelStream(stream_config(config), rank=rank, world_size=world)
    num_classes = stream.num_classes
    steps_per_epoch = epoch_steps(stream, config)  # epoch 0's: the schedule's unit
    if steps_per_epoch == 0:
        raise ValueError(
            f"an epoch would make no step: {len(stream)} training images, dealt by shards of "
            f"{stream.shard_size} to {world} process(es) x {max(1, config.workers)} loader "
            f"stream(s), fill no batch of --batch-size {config.batch_size} (each stream batches "
            "its own images): lower --batch-size or --workers")

    # -- model, optimizer -------------------------------------------------------------------
    model = create_model(config.model, num_classes=num_classes, img_size=config.input_size,
                         mix_token=config.mix_token, **config.model_kwargs)
    checkpoint_path = out / "last.pt"
    # exists(), not is_file(): a directory or FIFO there is refused, not trained over
    resumed = resume and checkpoint_path.exists()
    if config.init and not resumed:
        # New heads when the class count differs; the position embedding follows the grid.
        load_weights(model, read_checkpoint(Path(config.init)).weights, new_heads=True)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    net = ForwardTrain(model)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net)
    optimizer = build_optimizer(model, config, world)
    ema = build_ema(model, config.ema)
    train_step = TrainStep(net, model, optimizer, config, num_classes, device, ema)
    peak_lr = base_lr(config, world)

    # -- resume -----------------------------------------------------------------------------
    step, start_epoch, epoch_step = 0, 0, 0
    if resumed:
        state = restore_run(checkpoint_path, device, model, optimizer, ema)
        step, epoch_step = state["step"], state["epoch_step"]
        torch.set_rng_state(state["rng"])  # MixToken boxes and drop-path draw from it
        stream.position = StreamPosition.from_dict(state["position"])
        start_epoch = stream.position.epoch

    def save(name: str, position: StreamPosition, epoch_step: int) -> None:
        if rank != 0:
            return
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "ema": ema.state_dict() if ema is not None else None, "step": step,
                 "epoch_step": epoch_step, "position": position.to_dict(),
                 "rng": torch.get_rng_state(),
                 "config": asdict(config), "num_classes": num_classes}
        torch.save(state, out / f"{name}.tmp")
        os.replace(out / f"{name}.tmp", out / name)  # a crash mid-save keeps the old file

    metrics_file = open_metrics(out / "metrics.jsonl", step if resumed else None) \
        if rank == 0 else None
    board = tensorboard_writer(out) if rank == 0 else None
    last: dict = {}
    skipped: collections.Counter[str] = collections.Counter()

    for epoch in range(start_epoch, config.epochs):
        stream.set_epoch(epoch)  # keeps a resumed position within its epoch
        position = stream.position
        stream.track_skips(config.workers)
        # Its own generator: creating the loader then draws nothing from the global RNG, so a
        # resumed run's RNG stays where the checkpoint left it.
        loader = DataLoader(stream, batch_size=config.batch_size, num_workers=config.workers,
                            pin_memory=device.type == "cuda", drop_last=True,
                            generator=torch.Generator().manual_seed(config.seed + epoch))
        model.train()
        this_epoch = epoch_steps(stream, config)
        bar = tqdm(total=this_epoch, initial=epoch_step,
                   disable=rank != 0 or not config.progress, desc=f"epoch {epoch}", unit="step")
        batches = iter(loader)
        began, seen = time.perf_counter(), 0
        while epoch_step < this_epoch:
            batch = next(batches, None)
            if not every_rank_has(batch, world, device):  # samples skipped: a batch fewer
                break
            metrics = train_step(batch, lr_at(step, config, steps_per_epoch, peak_lr))
            step += 1
            epoch_step += 1
            seen += len(batch["image"])
            for stream_id, seq in zip(batch["stream"].tolist(), batch["seq"].tolist(),
                                      strict=True):
                position.consumed[stream_id] = max(position.consumed.get(stream_id, 0), seq + 1)
            last = {"epoch": epoch, "step": step, **metrics}
            bar.update()
            bar.set_postfix(loss=f"{last['loss']:.3f}")
            if metrics_file:
                metrics_file.write(json.dumps(last) + "\n")
                metrics_file.flush()
            if board is not None:
                for key in ("loss", "cls", "token", "lr", "grad_norm"):
                    if key in last:
                        board.add_scalar(f"train/{key}", last[key], step)
            if config.save_every and step % config.save_every == 0:
                save("last.pt", position, epoch_step)  # mid-epoch: resumes in the same order
        bar.close()
        del batches  # its workers stop now, so the skip counts read next are final
        counts = epoch_skips(stream, world, device)
        if epoch_step == 0:
            raise ValueError(f"epoch {epoch} made no step: too few samples were left to fill "
                             f"a batch of {config.batch_size} (skipped: {dict(counts)})")
        skipped += report_skips(epoch, counts, rank)
        last["images_per_s"] = seen * world / max(1e-9, time.perf_counter() - began)
        last["skipped_images"] = dict(skipped)
        epoch_step = 0
        save(f"epoch{epoch:04d}.pt", StreamPosition(epoch + 1), 0)
        save("last.pt", StreamPosition(epoch + 1), 0)
    if metrics_file:
        metrics_file.close()
    if board is not None:
        board.close()
    return last
