"""Train step time with token labels on vs off, ANF and STA on vs off, and the loader's rate.

1. Step timings, on pre-built synthetic batches (no loader, no disk: it cannot interfere). A pool
   of ``--distinct-batches`` batches in the exact format ``TokenLabelStream`` + ``DataLoader``
   yield: ``image`` uint8 [B, 3, S, S] (random pixels), ``logits`` float32 [B, K, h, w] (top-K of
   a random 1000-class teacher map with one dominant class per image, rounded through float16
   as stored, sorted descending), ``classes`` int64, ``lse`` float32 [B, h, w] (the full
   logsumexp), ``box`` float32 [B, 4] in label-grid coordinates (``sample_crop`` on a 300-500 x
   280-420 px image, ~400x350 like ImageNet, mapped with ``image_box_to_grid``, as the stream
   does), ``flip`` bool [B], ``target`` int64 [B]. Default label geometry: K = 5, 1000 classes,
   a 14x14 grid (a stride-32 teacher at 448 px); ``--label-grid 18`` for an NFNet-F6 at 576 px.

   One step is ``trainer.train.TrainStep``, the object ``train``'s loop calls, built as
   ``train`` builds it (``create_model`` with the same seed for every variant,
   ``build_optimizer``, ``build_ema``): ``lr_at``, the uint8 batch to the device and
   normalised (``Normalize``), ``ForwardTrain(model)`` (``forward_train``: MixToken on by
   default, as in training), then with token labels ``trainer.train.targets`` (densify +
   RoIAlign to the token grid and to 1x1 + flip) and ``token_labeling_loss``, without them
   (``--no-token-label``) ``F.one_hot(target)`` and ``ground_truth_loss``; the MixToken area
   mix of the class target, ``zero_grad``, ``backward``, ``clip_grad_norm_``, AdamW ``step``,
   the EMA update when the config has one, ``loss.item()`` and ``float(grad_norm)`` (the
   metrics line). On CUDA as ``train`` runs it: channels_last, bf16 autocast, pinned batches,
   plus ``torch.cuda.synchronize()`` before every clock read.

   Variants: ``ce`` (``--no-token-label``), ``token label``, ``token label + ANF``, ``token
   label + ANF`` with a rank-D/4 gate (``anf_gate_rank``), ``token label + STA``, and ``token
   label --recipe lvvit`` (``with_recipe``: drop-path, the official target build, label
   smoothing, beta 1, EMA, no clipping, and each sample's RandAugment ``theta`` drawn as the
   stream draws it, so that the token targets are warped on the device). ``--variants``
   picks a subset. Each gets
   ``--warmup`` untimed steps, then ``--steps`` timed steps, the variants
   interleaved step by step (in a rotating order) so that drift of the machine hits them all
   alike; the global RNG is re-seeded per step so that every variant draws the same MixToken
   boxes. Reported: the median per-step time, its spread (interquartile range / median), img/s
   = batch / median, the ratio of medians to the variant's baseline (the verdict) and, as
   cross-checks, the median of the per-step ratios (``paired``: step s of both variants ran
   back to back on the same batch) and the ratio of the fastest steps (``min``). Targets:
   token label / ce <= 1.03, ANF / token label <= 1.05 (both gates); STA / token label is
   reported without a target.

   A breakdown of the token-label extras, each alone on the same batches (median of
   ``--parts-reps``): ``densify``, ``roi_align_labels`` to the token grid and to 1x1,
   ``targets()`` as a whole, and ``token_labeling_loss`` forward + backward on leaf logits
   against ``ground_truth_loss`` forward + backward. What the step difference leaves over is
   mostly the aux head's backward (its logits get a gradient only with token labels), reported
   as "rest of the step difference" (step difference - targets() - (token loss - ce loss)).

   ANF alone: one ANF module of each ANF variant (its own dims and init), forward + backward
   on a [B, tokens, D] input, median of ``--parts-reps``, times the model's number of modules,
   as a share of the token-label step: steadier than a difference of whole steps on a noisy
   machine.

2. Loader (``--loader-images`` > 0): an ImageFolder of ImageNet-like JPEGs
   (``bench_label.make_imagenet_like``: 300-500 x 280-420 px, ~90 KB), labeled by
   ``label_dataset`` with a random-weight ``test_nfnet`` (1000 classes, top-5) at
   ``--label-size`` px (448: a 14x14 grid), shards of ``--loader-shard-size`` images (so every
   worker gets shards). Then ``TokenLabelStream`` (RandomResizedCrop + flip, val_permille 0)
   through the ``DataLoader`` that ``train`` builds (batch ``--batch-size``, drop_last), for each
   ``--loader-workers`` count, ``--loader-epochs`` epochs, no model. Reported: images/s over the
   whole epoch (worker start-up, which ``train`` pays once per epoch, included) and steady-state
   images/s (the clock starts when every worker has delivered its first batch; only the
   batches after that count), against the model's consumption rate (img/s of the token-label
   train step; with ``--recipe lvvit`` the stream has the recipe's augmentation, RandAugment
   with its label transform and random erasing, and the rate is the recipe step's); the target
   is >= 1.5x. On a CPU machine the loader would share the cores with the model in a real run;
   here each is measured alone. The first real batch's keys, dtypes and shapes are compared with
   the synthetic batches'.

Defaults: ``lvvit_t`` at 224 px (5.3 GFLOPs/image forward), batch 32, 20 timed steps after 3
warm-up steps per variant, 256 loader images labeled at 448 px. On 2 idle CPU cores (Xeon,
torch 2.14) a batch-32 step takes ~3.1 s, so the step part takes ~7 minutes (6 variants x 23
steps), the labeling ~15 s and the loader a few seconds: ~7.5 minutes in all. Single steps
vary by ~5 % there (outliers of 2-3x when anything else runs): keep the machine otherwise idle.
``--steps 3 --warmup 1 --batch-size 8 --loader-images 64 --loader-shard-size 16`` checks the
script in about a minute.

Prints tables, then one JSON line with every number (also to ``--json-out``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import common
import torch
import torch.nn.functional as F
from bench_label import make_imagenet_like
from torch.utils.data import DataLoader

from labeler_service.labeling import LabelingOptions, label_dataset
from labeler_service.sample import make_random_checkpoint
from storage import Store
from trainer.augment import IDENTITY_THETA, RandAugmentConfig, sample_rand_augment
from trainer.data.stream import TokenLabelStream
from trainer.labels import densify, image_box_to_grid, roi_align_labels, sample_crop
from trainer.loss import ground_truth_loss, token_labeling_loss
from trainer.models import create_model
from trainer.train import (
    ForwardTrain,
    TrainConfig,
    TrainStep,
    base_lr,
    build_ema,
    build_optimizer,
    lr_at,
    stream_config,
    targets,
    with_recipe,
)

DATASET = "bench"
VARIANT_KEYS = ("ce", "token", "anf", "anf-rank", "sta", "recipe")
RECIPE_VARIANT = "token label --recipe lvvit"
LOADER_TARGET = 1.5  # loader img/s over the model's: the loader must not be the bottleneck
IMAGENET_TRAIN_IMAGES = 1_281_167  # only for lr_at's schedule position


# -- synthetic batches --------------------------------------------------------------------------

def synthetic_batch(batch_size: int, image_size: int, topk: int, num_classes: int,
                    grid: int, generator: torch.Generator) -> dict:
    """One batch as the stream + default collate yield it (see the module docstring)."""
    g = generator
    boxes, flips = [], []
    for _ in range(batch_size):
        width = int(torch.randint(300, 501, (), generator=g))
        height = int(torch.randint(280, 421, (), generator=g))
        box = sample_crop(width, height, generator=g)
        boxes.append(list(image_box_to_grid(box, (width, height), (grid, grid))))
        flips.append(bool(torch.rand((), generator=g) < 0.5))
    target = torch.randint(num_classes, (batch_size,), generator=g)
    rand_augment = RandAugmentConfig()
    rand_theta = torch.stack([sample_rand_augment(rand_augment, g).theta
                              for _ in range(batch_size)])
    teacher = torch.randn(batch_size, num_classes, grid, grid, generator=g) * 2.0
    teacher[torch.arange(batch_size), target] += 8.0  # one dominant class per image
    logits, classes = teacher.topk(topk, dim=1)  # sorted, descending
    return {
        "image": torch.randint(0, 256, (batch_size, 3, image_size, image_size),
                               generator=g, dtype=torch.uint8),
        "logits": logits.half().float(),  # stored as float16, read back as float32
        "classes": classes.long(),
        "lse": torch.logsumexp(teacher, dim=1),
        "box": torch.tensor(boxes, dtype=torch.float32),
        "flip": torch.tensor(flips, dtype=torch.bool),
        "target": target.long(),
        "theta": IDENTITY_THETA.expand(batch_size, 2, 3).clone(),
        # what the lvvit recipe's stream yields in "theta" (its variant swaps it in)
        "rand_augment_theta": rand_theta,
    }


def signature(batch: dict, keys) -> dict:
    return {k: [str(batch[k].dtype).removeprefix("torch."), list(batch[k].shape)] for k in keys}


# -- the train step -----------------------------------------------------------------------------

@dataclass
class Variant:
    name: str
    token_label: bool
    model_kwargs: dict
    baseline: str | None = None
    target: float | None = None
    recipe: str | None = None  # trainer.train.RECIPES: its TrainConfig, RandAugment's theta
    times: list[float] = field(default_factory=list)


class Trainer:
    """One variant's model, optimizer and step: ``train``'s setup and its ``TrainStep``."""

    def __init__(self, args, variant: Variant, num_classes: int, device: torch.device):
        config = TrainConfig(
            store="", dataset="", labels="", out="", model=args.model,
            input_size=args.input_size, batch_size=args.batch_size,
            token_label=variant.token_label, mix_token=args.mix_token,
            model_kwargs=dict(variant.model_kwargs), seed=args.seed)
        self.config = config = with_recipe(config, variant.recipe) if variant.recipe else config
        self.recipe = variant.recipe
        torch.manual_seed(config.seed)  # the same initial weights for every variant
        model = create_model(config.model, num_classes=num_classes, img_size=config.input_size,
                             mix_token=config.mix_token, **config.model_kwargs).to(device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.train_step = TrainStep(ForwardTrain(model), model, build_optimizer(model, config),
                                    config, num_classes, device, build_ema(model, config.ema))
        self.peak_lr = base_lr(config)
        self.steps_per_epoch = max(1, IMAGENET_TRAIN_IMAGES // config.batch_size)
        self.params = sum(p.numel() for p in model.parameters())
        self.step_count = 0
        model.train()

    def step(self, batch: dict) -> float:
        if self.recipe:  # RandAugment's geometric ops: the token targets are warped too
            batch = {**batch, "theta": batch["rand_augment_theta"]}
        metrics = self.train_step(batch, lr_at(self.step_count, self.config,
                                               self.steps_per_epoch, self.peak_lr))
        self.step_count += 1
        return metrics["loss"]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_steps(args, variants: list[Variant], pool: list[dict], num_classes: int,
               device: torch.device) -> dict:
    trainers = [Trainer(args, v, num_classes, device) for v in variants]
    losses: dict[str, list[float]] = {v.name: [] for v in variants}
    for w in range(args.warmup):
        for v, t in zip(variants, trainers, strict=True):
            torch.manual_seed(args.seed + 1_000 + w)
            losses[v.name].append(t.step(pool[w % len(pool)]))
    for s in range(args.steps):
        batch = pool[(args.warmup + s) % len(pool)]
        order = [(s + i) % len(variants) for i in range(len(variants))]  # rotate
        for i in order:
            v, t = variants[i], trainers[i]
            torch.manual_seed(args.seed + 2_000 + s)  # the same MixToken box for every variant
            synchronize(device)
            start = time.perf_counter()
            loss = t.step(batch)
            synchronize(device)
            v.times.append(time.perf_counter() - start)
            losses[v.name].append(loss)
        print(f"  step {s + 1}/{args.steps}: "
              + ", ".join(f"{v.name} {v.times[-1] * 1e3:.0f} ms" for v in variants),
              file=sys.stderr, flush=True)
    return {"params": {v.name: t.params for v, t in zip(variants, trainers, strict=True)},
            "losses": losses}


# -- the token-label extras alone ---------------------------------------------------------------

def time_parts(args, pool: list[dict], grid: tuple[int, int], num_classes: int,
               device: torch.device) -> dict:
    """Median seconds of each token-label extra, alone, over ``--parts-reps`` repetitions."""
    n_tokens = grid[0] * grid[1]
    b = args.batch_size
    gen = torch.Generator().manual_seed(args.seed)
    cls_leaf = torch.randn(b, num_classes, generator=gen).to(device).requires_grad_()
    tok_leaf = torch.randn(b, n_tokens, num_classes, generator=gen).to(device).requires_grad_()

    def on_device(batch):
        return {k: batch[k].to(device) for k in ("logits", "classes", "lse", "box", "flip")}

    def dense_of(d):
        return densify(d["logits"], d["classes"], d["lse"], num_classes)

    def tl_loss(batch):
        cls_t, tok_t = targets(batch, grid, num_classes, device)
        loss, _ = token_labeling_loss(cls_leaf, tok_leaf, cls_t, tok_t, beta=0.5)
        loss.backward()
        cls_leaf.grad = tok_leaf.grad = None

    def ce_loss(batch):
        target = F.one_hot(batch["target"].to(device), num_classes).float()
        loss, _ = ground_truth_loss(cls_leaf, target)
        loss.backward()
        cls_leaf.grad = None

    cases = {
        "densify": lambda d, batch: dense_of(d),
        "roi_align tokens": lambda d, batch: roi_align_labels(d["dense"], d["box"], grid,
                                                              d["flip"]),
        "roi_align 1x1": lambda d, batch: roi_align_labels(d["dense"], d["box"], (1, 1),
                                                           d["flip"]),
        "targets()": lambda d, batch: targets(batch, grid, num_classes, device),
        "targets + token loss f+b": lambda d, batch: tl_loss(batch),
        "ce loss f+b": lambda d, batch: ce_loss(batch),
    }
    prepared = []
    for batch in pool:
        d = on_device(batch)
        d["dense"] = dense_of(d)
        prepared.append((d, batch))
    out = {}
    for name, fn in cases.items():
        fn(*prepared[0])  # warm-up
        times = []
        for r in range(args.parts_reps):
            d, batch = prepared[r % len(prepared)]
            times.append(timed(lambda fn=fn, d=d, batch=batch: fn(d, batch), device))
        out[name] = statistics.median(times)
    out["token loss f+b"] = out["targets + token loss f+b"] - out["targets()"]
    return out


def time_anf(args, variants: list[Variant], device: torch.device) -> dict:
    """Median seconds of one step's ANF modules alone, forward + backward, per ANF variant: one
    module (the model's own, same dims and init) on a [B, prefix + h*w, D] input, x the
    number of modules the model has. Steadier than the difference of two whole steps."""
    out = {}
    gen = torch.Generator().manual_seed(args.seed)
    for v in variants:
        if not v.model_kwargs.get("anf"):
            continue
        model = create_model(args.model, num_classes=args.num_classes, img_size=args.input_size,
                             **v.model_kwargs)
        anf = next(iter(model.anf.values())).to(device)
        x = torch.randn(args.batch_size, model.num_prefix_tokens + model.grid[0] * model.grid[1],
                        model.embed_dim, generator=gen).to(device)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                    else contextlib.nullcontext())

        def f_b(anf=anf, x=x, grid=model.grid, prefix=model.num_prefix_tokens,
                autocast=autocast):
            leaf = x.detach().requires_grad_()
            with autocast:
                y = anf(leaf, grid, prefix)
            y.float().sum().backward()

        f_b()  # warm-up
        times = [timed(f_b, device) for _ in range(args.parts_reps)]
        out[v.name] = {"modules": len(model.anf), "ms_per_module": statistics.median(times) * 1e3,
                       "ms_per_step": statistics.median(times) * 1e3 * len(model.anf)}
    return out


# -- the loader ---------------------------------------------------------------------------------

def time_loader(args, base: Path, device: torch.device, synthetic: dict) -> dict:
    t0 = time.perf_counter()
    images = base / "images"
    mean_bytes = make_imagenet_like(images, args.loader_images, args.seed, 32.0, 90)
    checkpoint = make_random_checkpoint(base / "test_nfnet.safetensors", model="test_nfnet",
                                        num_classes=1000, seed=args.seed)
    store = Store.open(base / "store")
    store.add_dataset(DATASET, images)
    t1 = time.perf_counter()
    report = label_dataset(store, DATASET, "test_nfnet", checkpoint, args.label_size, args.topk,
                           LabelingOptions(batch_size=32, shard_size=args.loader_shard_size,
                                           progress=False),
                           ignore_dataset_classes=True)
    label_s = time.perf_counter() - t1
    if report.images_labeled != args.loader_images:
        raise RuntimeError(f"labeled {report.images_labeled} of {args.loader_images} images: "
                           f"{report.failures[:3]}")
    config = TrainConfig(store=str(base / "store"), dataset=DATASET, labels=report.labelset_id,
                         out="", model=args.model, input_size=args.input_size, seed=args.seed,
                         val_permille=0)
    stream = TokenLabelStream(stream_config(with_recipe(config, args.recipe) if args.recipe
                                            else config))
    out = {"images": len(stream), "mean_jpeg_bytes": mean_bytes, "grid": list(stream.grid),
           "label_size": args.label_size, "shard_size": args.loader_shard_size,
           "setup_s": t1 - t0, "label_s": label_s, "runs": []}
    for workers in args.loader_workers:
        epoch_s, steady_s, epoch_images, steady_images, startup_s = 0.0, 0.0, 0, 0, []
        for epoch in range(args.loader_epochs):
            stream.set_epoch(epoch)
            loader = DataLoader(stream, batch_size=args.batch_size, num_workers=workers,
                                pin_memory=device.type == "cuda", drop_last=True,
                                generator=torch.Generator().manual_seed(args.seed + epoch))
            arrivals, sizes = [], []
            start = time.perf_counter()
            for batch in loader:
                arrivals.append(time.perf_counter())
                sizes.append(len(batch["image"]))
                if "format" not in out:
                    keys = [k for k in synthetic if k != "rand_augment_theta"]
                    out["format"] = {"stream": signature(batch, keys),
                                     "synthetic": signature(synthetic, keys)}
            if not arrivals:
                raise RuntimeError("the loader yielded no batch: too few images per worker")
            warm = min(max(1, workers), len(arrivals) - 1)  # one batch per worker, then steady
            epoch_s += arrivals[-1] - start
            epoch_images += sum(sizes)
            startup_s.append(arrivals[0] - start)
            if warm >= 1 and len(arrivals) > warm:
                steady_s += arrivals[-1] - arrivals[warm - 1]
                steady_images += sum(sizes[warm:])
        out["runs"].append({
            "workers": workers, "epochs": args.loader_epochs,
            "img_s": epoch_images / epoch_s,
            "steady_img_s": steady_images / steady_s if steady_s else None,
            "first_batch_s": statistics.median(startup_s),
            "images": epoch_images, "steady_images": steady_images})
    return out


# -- driver -------------------------------------------------------------------------------------

def run(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    grid_hw = (args.label_grid, args.label_grid)
    gen = torch.Generator().manual_seed(args.seed)
    pool = [synthetic_batch(args.batch_size, args.input_size, args.topk, args.num_classes,
                            args.label_grid, gen) for _ in range(args.distinct_batches)]
    if device.type == "cuda":
        pool = [{k: v.pin_memory() for k, v in b.items()} for b in pool]

    probe = create_model(args.model, num_classes=args.num_classes, img_size=args.input_size)
    model_grid, rank = probe.grid, probe.embed_dim // 4
    del probe
    variants = [v for key, v in {
        "ce": Variant("ce (--no-token-label)", False, {}),
        "token": Variant("token label", True, {}, "ce (--no-token-label)", 1.03),
        "anf": Variant("token label + ANF", True, {"anf": True}, "token label", 1.05),
        "anf-rank": Variant("token label + ANF rank D/4", True,
                            {"anf": True, "anf_gate_rank": rank}, "token label", 1.05),
        "sta": Variant("token label + STA", True, {"sta": True}, "token label", None),
        "recipe": Variant(RECIPE_VARIANT, True, {}, "token label", None, recipe="lvvit"),
    }.items() if key in args.variants]

    loader = None
    with common.scratch_dir(args, "bench_train-") as base:
        if args.loader_images:
            print("loader: making and labeling the images ...", file=sys.stderr, flush=True)
            loader = time_loader(args, base, device, pool[0])

    print("step timings ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    extra = time_steps(args, variants, pool, args.num_classes, device)
    steps_s = time.perf_counter() - t0
    parts = time_parts(args, pool, model_grid, args.num_classes, device)
    anf_alone = time_anf(args, variants, device)

    by_name = {v.name: v for v in variants}
    steps = {}
    for v in variants:
        ms = statistics.median(v.times) * 1e3
        q1, _, q3 = (statistics.quantiles(v.times, n=4) if len(v.times) > 1
                     else (v.times[0],) * 3)
        row = {"ms": ms, "img_s": args.batch_size / ms * 1e3,
               "ms_all": [t * 1e3 for t in v.times], "ms_min": min(v.times) * 1e3,
               "iqr_rel": (q3 - q1) * 1e3 / ms,
               "model_kwargs": v.model_kwargs, "token_label": v.token_label,
               "params": extra["params"][v.name], "baseline": v.baseline, "target": v.target}
        if v.baseline:
            row["ratio"] = ms / (statistics.median(by_name[v.baseline].times) * 1e3)
            row["ratio_min"] = min(v.times) / min(by_name[v.baseline].times)
            # steps are interleaved on the same batches: the median of the per-step ratios
            row["ratio_paired"] = statistics.median(
                a / b for a, b in zip(v.times, by_name[v.baseline].times, strict=True))
            row["pass"] = None if v.target is None else row["ratio"] <= v.target
        steps[v.name] = row
    parts_ms = {k: v * 1e3 for k, v in parts.items()}
    # What the token-label step costs beyond its label and loss extras: mostly the aux head's
    # backward (only the token loss sends a gradient through the [B, N, C] token logits).
    parts_ms["rest of the step difference"] = (
        steps["token label"]["ms"] - steps["ce (--no-token-label)"]["ms"]
        - parts_ms["targets()"] - (parts_ms["token loss f+b"] - parts_ms["ce loss f+b"]))
    for row in anf_alone.values():
        row["of_token_label_step"] = row["ms_per_step"] / steps["token label"]["ms"]
    # The loader feeds the step it would feed: the recipe's when it runs with the recipe's
    # augmentation.
    consumer = (RECIPE_VARIANT if args.recipe and RECIPE_VARIANT in steps else "token label")
    consumption = steps[consumer]["img_s"]
    if loader:
        loader["consumer"] = consumer
        for r in loader["runs"]:
            r["vs_model"] = r["img_s"] / consumption
            r["steady_vs_model"] = (r["steady_img_s"] / consumption
                                    if r["steady_img_s"] else None)
            r["pass"] = r["vs_model"] >= LOADER_TARGET
        fmt = loader["format"]
        loader["format_dtypes_match"] = all(fmt["stream"][k][0] == fmt["synthetic"][k][0]
                                            for k in fmt["stream"])
        loader["format_shapes_match"] = fmt["stream"] == fmt["synthetic"]
    return {
        "bench": "train",
        "config": {
            "model": args.model, "input_size": args.input_size, "token_grid": list(model_grid),
            "batch_size": args.batch_size, "steps": args.steps, "warmup": args.warmup,
            "distinct_batches": args.distinct_batches, "mix_token": args.mix_token,
            "topk": args.topk, "num_classes": args.num_classes,
            "label_grid": list(grid_hw), "device": args.device,
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else f"cpu x{os.cpu_count()}"),
            "autocast": "bf16" if device.type == "cuda" else "none (fp32)",
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "step_phase_s": steps_s, "seed": args.seed,
        },
        "steps": steps,
        "losses": extra["losses"],
        "token_label_parts_ms": parts_ms,
        "anf_alone": anf_alone,
        "model_img_s": consumption,
        "loader": loader,
    }


def print_table(out: dict) -> None:
    c = out["config"]
    print(f"{c['model']} @ {c['input_size']} px (tokens {c['token_grid'][0]}x"
          f"{c['token_grid'][1]}), batch {c['batch_size']}, labels top-{c['topk']} of "
          f"{c['num_classes']} classes on a {c['label_grid'][0]}x{c['label_grid'][1]} grid, "
          f"MixToken {'on' if c['mix_token'] else 'off'}, {c['device_name']}, "
          f"{c['torch_threads']} torch threads, autocast {c['autocast']}, median of "
          f"{c['steps']} interleaved steps after {c['warmup']} warm-up")
    header = (f"{'variant':<26} {'ms/step':>9} {'IQR':>6} {'img/s':>7} {'vs':<22} "
              f"{'ratio':>6} {'paired':>6} {'(min)':>6} {'target':<13}")
    print(header)
    print("-" * len(header))
    for name, r in out["steps"].items():
        line = f"{name:<26} {r['ms']:>9.0f} {r['iqr_rel']:>6.1%} {r['img_s']:>7.2f}"
        if r["baseline"]:
            verdict = ("report only" if r["target"] is None
                       else f"<= {r['target']:.2f} {'PASS' if r['pass'] else 'FAIL'}")
            line += (f" {r['baseline']:<22} {r['ratio']:>6.3f} {r['ratio_paired']:>6.3f} "
                     f"{r['ratio_min']:>6.3f} {verdict:<13}")
        print(line)
    parts = out["token_label_parts_ms"]
    tl, ce = out["steps"]["token label"]["ms"], out["steps"]["ce (--no-token-label)"]["ms"]
    print(f"token-label extras alone, ms per batch (step difference: {tl - ce:+.0f} ms):")
    for name in ("densify", "roi_align tokens", "roi_align 1x1", "targets()", "token loss f+b",
                 "ce loss f+b", "rest of the step difference"):
        print(f"  {name:<28} {parts[name]:>8.1f}")
    print("ANF modules alone, forward + backward, per step (vs the token-label step):")
    for name, r in out["anf_alone"].items():
        print(f"  {name:<28} {r['modules']} x {r['ms_per_module']:.1f} ms = "
              f"{r['ms_per_step']:.0f} ms ({r['of_token_label_step']:.1%})")
    loader = out["loader"]
    if not loader:
        return
    print(f"loader: {loader['images']} images (~{loader['mean_jpeg_bytes'] / 1e3:.0f} KB JPEGs), "
          f"labels from test_nfnet @ {loader['label_size']} px (grid {loader['grid'][0]}x"
          f"{loader['grid'][1]}), shards of {loader['shard_size']}, labeling took "
          f"{loader['label_s']:.0f} s; the model ({loader['consumer']}) consumes "
          f"{out['model_img_s']:.2f} img/s")
    header = (f"{'workers':>7} {'img/s':>8} {'steady':>8} {'1st batch s':>11} "
              f"{'x model':>8} {'steady x':>8} {f'>= {LOADER_TARGET}x model':<15}")
    print(header)
    print("-" * len(header))
    for r in loader["runs"]:
        steady = r["steady_img_s"] or float("nan")
        steady_x = r["steady_vs_model"] or float("nan")
        print(f"{r['workers']:>7} {r['img_s']:>8.1f} {steady:>8.1f} {r['first_batch_s']:>11.2f} "
              f"{r['vs_model']:>8.1f} {steady_x:>8.1f} {'PASS' if r['pass'] else 'FAIL':<15}")
    print(f"stream batch format vs synthetic: dtypes "
          f"{'match' if loader['format_dtypes_match'] else 'DIFFER'}, shapes "
          f"{'match' if loader['format_shapes_match'] else 'differ'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="lvvit_t", help="a trainer.models name")
    p.add_argument("--recipe", choices=["lvvit"], default=None,
                   help="the loader with this recipe's augmentation (RandAugment moving the "
                        "labels, random erasing, no colour jitter)")
    p.add_argument("--variants", default=",".join(VARIANT_KEYS),
                   help="step variants to time, comma-separated, of " + ", ".join(VARIANT_KEYS)
                        + " (ce and token always run: they are the baselines)")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch.set_num_threads")
    p.add_argument("--mix-token", action=argparse.BooleanOptionalAction, default=True,
                   help="MixToken in forward_train (train's default: on)")
    p.add_argument("--label-grid", type=int, default=14,
                   help="side of the synthetic label grid (14: stride 32 at 448 px; 18: 576 px)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--distinct-batches", type=int, default=4,
                   help="pre-built synthetic batches, used in turn")
    p.add_argument("--parts-reps", type=int, default=10,
                   help="repetitions of each token-label extra timed alone")
    p.add_argument("--loader-images", type=int, default=256, help="0: skip the loader part")
    p.add_argument("--loader-workers", default=str(os.cpu_count() or 1),
                   help="DataLoader worker counts, comma-separated (e.g. 0,1,2)")
    p.add_argument("--loader-epochs", type=int, default=3)
    p.add_argument("--loader-shard-size", type=int, default=64,
                   help="label shard size (small, so that every worker gets shards)")
    p.add_argument("--label-size", type=int, default=448,
                   help="test_nfnet input px for the loader's labels (448: a 14x14 grid)")
    p.add_argument("--seed", type=int, default=0)
    common.add_scratch_args(p)
    args = p.parse_args(argv)
    args.loader_workers = [int(w) for w in args.loader_workers.split(",") if w.strip()]
    args.variants = {"ce", "token"} | {v.strip() for v in args.variants.split(",") if v.strip()}
    if args.variants - set(VARIANT_KEYS):
        p.error(f"unknown --variants {sorted(args.variants - set(VARIANT_KEYS))}; "
                f"known: {', '.join(VARIANT_KEYS)}")
    if min(args.batch_size, args.steps, args.distinct_batches, args.parts_reps,
           args.loader_epochs, args.threads) < 1 or args.warmup < 0:
        p.error("--batch-size, --steps, --distinct-batches, --parts-reps, --loader-epochs and "
                "--threads must be >= 1, --warmup >= 0")
    if args.loader_images < 0 or any(w < 0 for w in args.loader_workers):
        p.error("--loader-images and --loader-workers must be >= 0")
    common.check_device(p, args.device)
    return args


def main() -> None:
    common.main(parse_args, run, print_table)


if __name__ == "__main__":
    main()
