"""What labeling shard by shard costs, as a service worker does it, against one pass.

A service worker runs one ``label_shard`` task per shard, each a ``label_shards`` call over one
shard. Each call that starts its own decoding processes pays, per shard, for forking them (and
for their first batch, during which the teacher waits); ``labeler label`` pays that once per run.
This measures the difference on real ImageNet-like JPEGs with a real teacher:

- ``one pass``: one ``label_shards`` call over every shard (``labeler label``);
- ``per shard, fresh``: one call per shard, each starting its own decoding processes (what a
  worker did before ``ImageDecoder`` was kept across tasks);
- ``per shard, kept``: one call per shard, one ``ImageDecoder`` made once (its start timed too)
  and passed to every call (what a worker does: ``tasks.decoder_for``).

Each pass labels a fresh label set in a fresh store (the manifest scan is not timed); the passes
alternate over ``--rounds`` and medians are reported, with the per-shard overhead against the one
pass in milliseconds. What the overhead costs in a real run depends on how long a shard takes
there: ``overhead / (shard_size / images_per_second)``. The labels of every pass are compared.

Default: ``test_nfnet`` at 160 px (a cheap teacher, so that decoding and the pipeline, not the
teacher, set the pace, as on a GPU), 1024 images in 8 shards of 128, batch 32, 2 decoding
processes, torch on 1 thread. About 4 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import common
import numpy as np
import torch
from bench_label import make_imagenet_like

from labeler_service.labeling import (
    ImageDecoder,
    LabelingOptions,
    TeacherRunner,
    label_shards,
)
from labeler_service.sample import make_random_checkpoint
from labeler_service.teacher import build_teacher
from storage import ARRAY_NAMES, LabelSetConfig, Store

DATASET = "bench"
PASSES = ("one pass", "per shard, fresh", "per shard, kept")


def fresh_labelset(store_dir: Path, images: Path, spec, grid, args):
    store = Store.open(store_dir)
    dataset, _ = store.add_dataset(DATASET, images)
    labelset = dataset.create_labelset(LabelSetConfig(
        teacher=spec, topk=args.topk, grid=grid, dataset_fingerprint=dataset.fingerprint,
        shard_size=args.shard_size, chunk_size=min(256, args.shard_size)))
    return dataset, labelset


def run_pass(name: str, dataset, labelset, runner: TeacherRunner,
             options: LabelingOptions) -> float:
    shards = list(range(labelset.num_shards))
    start = time.perf_counter()
    if name == "one pass":
        label_shards(labelset, dataset, runner, shards, options)
    elif name == "per shard, fresh":
        for shard in shards:
            label_shards(labelset, dataset, runner, [shard], options)
    else:
        decoder = ImageDecoder.for_labelset(dataset, labelset, options, runner.device)
        for shard in shards:
            label_shards(labelset, dataset, runner, [shard], options, decoder=decoder)
        del decoder  # its processes end: part of the pass's cost, as for the others
    seconds = time.perf_counter() - start
    if labelset.pending_shards():
        raise RuntimeError(f"{name}: shards left pending: {labelset.pending_shards()}")
    return seconds


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    options = LabelingOptions(batch_size=args.batch_size, num_workers=args.workers,
                              device=args.device, shard_size=args.shard_size, progress=False)
    seconds: dict[str, list[float]] = {name: [] for name in PASSES}
    labels: dict[str, dict[str, np.ndarray]] = {}
    with common.scratch_dir(args, "bench_shard_tasks-") as base:
        images = base / "images"
        mean_bytes = make_imagenet_like(images, args.images, args.seed, 32.0, 90)
        checkpoint = make_random_checkpoint(base / f"{args.model}.safetensors", model=args.model,
                                            num_classes=1000, seed=args.seed)
        teacher, spec, grid = build_teacher(args.model, checkpoint, args.input_size, device,
                                           precision=args.precision)
        precision = args.precision if device.type == "cuda" else "fp32"
        runner = TeacherRunner(teacher, spec.mean, spec.std, args.topk, device, precision)
        for r in range(args.rounds):
            order = PASSES[r % len(PASSES):] + PASSES[:r % len(PASSES)]
            for name in order:
                store_dir = base / f"store-{r}-{PASSES.index(name)}"
                dataset, labelset = fresh_labelset(store_dir, images, spec, grid, args)
                seconds[name].append(run_pass(name, dataset, labelset, runner, options))
                print(f"  round {r + 1}/{args.rounds}: {name} {seconds[name][-1]:.2f} s",
                      file=sys.stderr, flush=True)
                if name not in labels:
                    block = labelset.read_block(0, labelset.num_images)
                    labels[name] = {a: getattr(block, a) for a in ARRAY_NAMES}
                shutil.rmtree(store_dir, ignore_errors=True)

    same = all(np.array_equal(labels[name][a], labels[PASSES[0]][a])
               for name in PASSES[1:] for a in ARRAY_NAMES)
    num_shards = -(-args.images // args.shard_size)
    one = statistics.median(seconds["one pass"])
    passes = {}
    for name in PASSES:
        s = statistics.median(seconds[name])
        passes[name] = {"seconds": s, "all_seconds": seconds[name], "img_s": args.images / s,
                        "overhead_ms_per_shard": (s - one) / num_shards * 1e3}
    return {
        "bench": "shard_tasks",
        "config": {"model": args.model, "input_size": args.input_size, "grid": list(grid),
                   "images": args.images, "shard_size": args.shard_size,
                   "shards": num_shards, "batch_size": args.batch_size,
                   "workers": args.workers, "device": args.device,
                   "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                   else f"cpu x{os.cpu_count()}"),
                   "torch_threads": torch.get_num_threads(), "rounds": args.rounds,
                   "mean_jpeg_bytes": mean_bytes, "torch": torch.__version__},
        "passes": passes,
        "labels_equal": same,
    }


def print_table(out: dict) -> None:
    c = out["config"]
    print(f"{c['model']} @ {c['input_size']} px, {c['images']} images "
          f"(~{c['mean_jpeg_bytes'] / 1e3:.0f} KB JPEGs) in {c['shards']} shards of "
          f"{c['shard_size']}, batch {c['batch_size']}, {c['workers']} decoding processes, "
          f"{c['device_name']}, {c['torch_threads']} torch thread(s), median of {c['rounds']}")
    header = f"{'pass':<20} {'seconds':>8} {'img/s':>8} {'overhead ms/shard':>18}"
    print(header)
    print("-" * len(header))
    for name, p in out["passes"].items():
        print(f"{name:<20} {p['seconds']:>8.2f} {p['img_s']:>8.1f} "
              f"{p['overhead_ms_per_shard']:>18.0f}")
    print(f"labels equal across passes: {out['labels_equal']}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="test_nfnet")
    p.add_argument("--input-size", type=int, default=160)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--shard-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="autocast dtype on CUDA (CPU: fp32)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    common.add_scratch_args(p)
    args = p.parse_args(argv)
    if min(args.images, args.batch_size, args.shard_size, args.rounds, args.threads) < 1:
        p.error("--images, --batch-size, --shard-size, --rounds and --threads must be >= 1")
    common.check_device(p, args.device)
    return args


def main() -> None:
    common.main(parse_args, run, print_table)


if __name__ == "__main__":
    main()
