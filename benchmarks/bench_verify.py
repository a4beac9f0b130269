"""What checking completed shards costs (``labeler store verify``, a job's ``repair``), against
what planning a job reads anyway (the ``status`` array).

A label set of ``--images`` images with ImageNet's geometry (18x18 grid, top-5, 1000 classes),
shards of 1024, written through ``write_shard`` with random labels (every image labeled). Then,
median of ``--repeats`` passes with the page cache warm:

- ``status``: ``labelset.read_status()`` + ``pending_shards`` (what a plan reads);
- ``repair check``: ``storage.verify.completed_shard_problem`` for every shard (every array
  decoded, shapes and labels checked: what ``repair`` adds to a plan).

Reported: seconds and images/s of each, and both scaled to ImageNet-1k (1,281,167 images) and
-21k (14,197,122) at the measured rate. A cold page cache (the first read after a reboot) is
slower: the store's bytes per image are in BENCHMARKS.md (a).
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
import numpy as np
from bench_store import imagenet_labelset

from storage import ImageStatus
from storage.verify import completed_shard_problem

SCALES = {"imagenet_1k": 1_281_167, "imagenet_21k": 14_197_122}


def run(args) -> dict:
    rng = np.random.default_rng(args.seed)
    with common.scratch_dir(args, "bench_verify-") as base:
        labelset = imagenet_labelset(base, args.images, args.seed)
        t0 = time.perf_counter()
        for shard in range(labelset.num_shards):
            block = labelset.empty_block(shard)
            n = len(block)
            block.logits[:] = -np.sort(-rng.normal(size=block.logits.shape), axis=1)
            block.classes[:] = rng.integers(0, 1000, size=block.classes.shape)
            block.lse[:] = block.logits[:, 0] + 1
            block.global_logits[:] = rng.normal(size=(n, 5))
            block.global_classes[:] = rng.integers(0, 1000, size=(n, 5))
            block.status[:] = ImageStatus.LABELED
            labelset.write_shard(shard, block)
        write_s = time.perf_counter() - t0

        def status() -> None:
            labelset.pending_shards(labelset.read_status()[0])

        def repair_check() -> None:
            problems = [completed_shard_problem(labelset, s) for s in range(labelset.num_shards)]
            assert not any(problems), problems

        out = {"bench": "verify", "config": {"images": args.images, "shards":
               labelset.num_shards, "grid": [18, 18], "topk": 5, "shard_size": 1024,
               "repeats": args.repeats}, "write_s": write_s}
        for name, fn in (("status", status), ("repair check", repair_check)):
            fn()  # warm
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            seconds = statistics.median(times)
            rate = args.images / seconds
            out[name] = {"seconds": seconds, "all_seconds": times, "img_s": rate,
                         **{f"{scale}_s": count / rate for scale, count in SCALES.items()}}
    return out


def print_table(out: dict) -> None:
    c = out["config"]
    print(f"{c['images']} images in {c['shards']} shards of {c['shard_size']}, grid 18x18, "
          f"top-5; median of {c['repeats']}")
    print(f"{'pass':<14} {'seconds':>9} {'img/s':>10} {'ImageNet-1k s':>14} {'-21k s':>9}")
    for name in ("status", "repair check"):
        r = out[name]
        print(f"{name:<14} {r['seconds']:>9.3f} {r['img_s']:>10.0f} {r['imagenet_1k_s']:>14.1f} "
              f"{r['imagenet_21k_s']:>9.1f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    common.add_scratch_args(p)
    return p.parse_args(argv)


def main() -> None:
    common.main(parse_args, run, print_table)


if __name__ == "__main__":
    main()
