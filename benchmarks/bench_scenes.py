"""``make_scenes`` images/s on one core, and the bytes it writes per image.

Runs ``make_scenes(dir, --images, --seed)`` ``--repeats`` times, each into a fresh directory
(files are created, not overwritten), and reports the best and median run as images/s of wall
time and of this process's CPU time (``time.process_time``: on a shared machine the wall time
also counts time the core spent on other processes). Pin it to one core with ``taskset -c 0``
or ``--cpu 0``. Also times the in-memory renderer alone (``render_scene``) on the same images,
and gives the mean file sizes: JPEG, mask ``.npz``, and ``scenes.json`` per image.

    taskset -c 0 python benchmarks/bench_scenes.py --images 2000

Prints a table, then one JSON line with every number (also to ``--json-out``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common

from labeler_service.scenes import MASK_SUFFIX, make_scenes, render_scene


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def run(args: argparse.Namespace) -> dict:
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    n = args.images
    render_scene(0, args.seed)  # warm caches (noise tables) outside the timings
    out: dict = {"images": n, "seed": args.seed, "repeats": args.repeats,
                 "cpus": sorted(os.sched_getaffinity(0))}
    with common.scratch_dir(args, "bench_scenes-") as base:
        runs = [_timed(lambda r=r: make_scenes(base / f"run{r}", n, args.seed))
                for r in range(args.repeats)]
        renders = [_timed(lambda: [render_scene(i, args.seed) for i in range(n)])
                   for _ in range(args.repeats)]
        root = base / "run0"
        jpg = [p.stat().st_size for p in root.rglob("*.jpg")]
        npz = [p.stat().st_size for p in root.rglob(f"*{MASK_SUFFIX}")]
        out["bytes_per_image"] = {
            "jpeg": round(statistics.mean(jpg)),
            "mask": round(statistics.mean(npz)),
            "json": round((root / "scenes.json").stat().st_size / n),
        }
    for name, timings in (("make_scenes", runs), ("render_scene", renders)):
        walls = [w for w, _ in timings]
        cpus = [c for _, c in timings]
        out[name] = {
            "wall_img_s_best": round(n / min(walls), 1),
            "wall_img_s_median": round(n / statistics.median(walls), 1),
            "cpu_img_s_best": round(n / min(cpus), 1),
            "cpu_img_s_median": round(n / statistics.median(cpus), 1),
        }
    return out


def print_table(out: dict) -> None:
    print(f"{out['images']} images, seed {out['seed']}, best / median of {out['repeats']}, "
          f"cpus {out['cpus']}")
    print(f"{'':14s} {'wall img/s':>20s} {'cpu img/s':>20s}")
    for name in ("make_scenes", "render_scene"):
        r = out[name]
        print(f"{name:14s} {r['wall_img_s_best']:>9.0f} / {r['wall_img_s_median']:<8.0f} "
              f"{r['cpu_img_s_best']:>9.0f} / {r['cpu_img_s_median']:<8.0f}")
    b = out["bytes_per_image"]
    print(f"bytes per image: jpeg {b['jpeg']}, mask {b['mask']}, scenes.json {b['json']}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu", type=int, default=None, help="pin the process to this CPU")
    common.add_scratch_args(p)
    return p.parse_args()


if __name__ == "__main__":
    common.main(parse_args, run, print_table)
