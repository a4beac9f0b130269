"""Label bytes per image and read speed: the tokenlabel store vs the TokenLabeling ``.pt`` layout.

The same synthetic labels are written two ways and measured in one run:

* **store**: through the real API (``Store.open`` -> ``add_dataset`` with a manifest ->
  ``create_labelset`` -> ``empty_block`` + fill + ``write_shard`` for every shard). The label set
  holds top-K fp16 logits, int16 class ids, fp32 logsumexp, the image-level top-K and a status
  byte per image, i.e. more than the ``.pt`` files carry.
* **pt**: the public TokenLabeling layout, one ``torch.save`` file per image holding a float16
  tensor [2, K, H, W] (top-K logits, then the class ids as float16), mirroring the image tree as
  ``<class_dir>/<stem>.pt``. Each file gets its own tensor storage (saving a slice of a larger
  tensor would silently save the whole storage).

Measured per layout: files, bytes on disk per image as allocated blocks (``st_blocks * 512``) and
as apparent size (``st_size``), summed over every file of the layout (for the store: the label
set's directory, metadata included; the whole store with its manifest is reported too);
sequential read images/s with the page cache warm (nothing is dropped; one untimed pass first,
then the median of ``--repeats`` timed passes): the store with ``labelset.read_shard(i)`` for every
shard (whole-shard block reads of all six arrays, as the trainer reads), the ``.pt`` files with
``torch.load(f, weights_only=True)`` for every file in manifest order; and single random image
reads/s (``labelset.read_image(i)`` vs one ``torch.load``) for ``--random-reads`` random images.
``--chunk-sizes`` repeats the store part for several inner chunk sizes (images per inner chunk).

Label data (``--data``, both by default):

* ``random``: i.i.d. N(0, 2^2) logits for every class at every grid cell, then top-K: uniformly
  random class ids and unstructured values, the worst case for compression.
* ``smooth``: spatially smooth maps as a CNN teacher produces them. Per image, over all classes:
  a constant per-class offset b ~ N(0, 1) (the long tail); 5-20 "related" classes (what the image
  plausibly is) get +2..+6 everywhere; a low-resolution random field (``--smooth-res`` squared
  cells, N(0, ``--smooth-field``^2) per class and cell) upsampled bilinearly to the grid; 1-3
  "present" classes (objects) each added as a Gaussian blob over the grid (random centre, radius
  15-45 % of the image, amplitude 4-10); plus i.i.d. N(0, 0.1^2) noise. Then top-K and the
  logsumexp over all classes, exactly as the labeler computes them. With the defaults the rank-1
  class changes between ~15 % of adjacent cells, rank 5 between ~55 %, ~20 distinct class ids per
  image: large regions with the same leading classes, lower ranks that reshuffle more, like a real
  dense map. These statistics are printed (``label_stats``) so the assumption is visible; this is
  a model of a teacher, not a measured one.

Both layouts get identical labels; the image-level top-K is the top-K of the spatially averaged
map. Print: a table, then one JSON line with every number (also to ``--json-out``).

Example (the full run)::

    .venv/bin/python benchmarks/bench_store.py --images 4096 --chunk-sizes 16,64,256
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import common
import numpy as np
import torch
import torch.nn.functional as F
import zarr

from storage import ImageStatus, LabelSetConfig, Manifest, PathColumn, Store, TeacherSpec
from storage.labelset import ARRAY_NAMES, DEFAULT_CHUNK_SIZE, DEFAULT_SHARD_SIZE, LabelSet

DATASET = "bench"
GEN_BATCH = 32  # images per generation step: [32, 1000, 18, 18] float32 is ~41 MB


# -- synthetic labels ---------------------------------------------------------------------------

def _dense_random(n: int, c: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=gen) * 2.0


def _dense_smooth(n: int, c: int, h: int, w: int, res: int, field: float,
                  gen: torch.Generator) -> torch.Tensor:
    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen)

    dense = torch.randn(n, c, 1, 1, generator=gen)  # per-class offset: the long tail
    low = torch.randn(n, c, res, res, generator=gen) * field
    dense = dense + F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    ys = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    for i in range(n):
        related = int(torch.randint(5, 21, (1,), generator=gen))
        present = int(torch.randint(1, 4, (1,), generator=gen))
        classes = torch.randperm(c, generator=gen)[:related + present]
        dense[i, classes[:related]] += (2.0 + 4.0 * rand(related))[:, None, None]
        for cls in classes[related:].tolist():
            cy, cx = rand(2).tolist()
            radius = 0.15 + 0.30 * float(rand(1))
            amplitude = 4.0 + 6.0 * float(rand(1))
            blob = torch.exp(-((ys[:, None] - cy) ** 2 + (xs[None, :] - cx) ** 2)
                             / (2 * radius ** 2))
            dense[i, cls] += amplitude * blob
    return dense + 0.1 * torch.randn(n, c, h, w, generator=gen)


def label_stats(labels: dict[str, np.ndarray], limit: int = 256) -> dict:
    """How smooth the class maps are: per rank, the fraction of adjacent cells that differ."""
    classes = labels["classes"][:limit]
    horizontal = classes[..., 1:] != classes[..., :-1]
    vertical = classes[..., 1:, :] != classes[..., :-1, :]
    change = (horizontal.sum(axis=(0, 2, 3)) + vertical.sum(axis=(0, 2, 3))) / (
        horizontal[:, 0].size + vertical[:, 0].size)
    return {
        "class_change_rate_by_rank": [round(float(v), 3) for v in change],
        "distinct_classes_per_image": float(np.mean([len(np.unique(c)) for c in classes])),
        "top1_logit_mean": float(labels["logits"][:limit, 0].astype(np.float32).mean()),
        "lse_minus_top1_mean": float((labels["lse"][:limit]
                                      - labels["logits"][:limit, 0].astype(np.float32)).mean()),
    }


def make_labels(kind: str, n: int, topk: int, grid: tuple[int, int], num_classes: int,
                smooth_res: int, smooth_field: float, seed: int) -> dict[str, np.ndarray]:
    """Top-K labels of ``n`` synthetic dense maps, as the labeler would store them."""
    h, w = grid
    gen = torch.Generator().manual_seed(seed)
    out = {
        "logits": np.empty((n, topk, h, w), np.float16),
        "classes": np.empty((n, topk, h, w), np.int64),
        "lse": np.empty((n, h, w), np.float32),
        "global_logits": np.empty((n, topk), np.float32),
        "global_classes": np.empty((n, topk), np.int64),
    }
    for start in range(0, n, GEN_BATCH):
        stop = min(start + GEN_BATCH, n)
        if kind == "random":
            dense = _dense_random(stop - start, num_classes, h, w, gen)
        else:
            dense = _dense_smooth(stop - start, num_classes, h, w, smooth_res, smooth_field,
                                  gen)
        logits, classes = dense.topk(topk, dim=1)
        glogits, gclasses = dense.mean(dim=(2, 3)).topk(topk, dim=1)
        out["logits"][start:stop] = logits.to(torch.float16).numpy()
        out["classes"][start:stop] = classes.numpy()
        out["lse"][start:stop] = dense.logsumexp(dim=1).numpy()
        out["global_logits"][start:stop] = glogits.numpy()
        out["global_classes"][start:stop] = gclasses.numpy()
    return out


# -- layout helpers -----------------------------------------------------------------------------

def image_paths(n: int, per_class: int, num_classes: int) -> list[tuple[int, str]]:
    """(class, stem path without suffix), ImageNet-like: ``n{class:04d}/img{i:06d}``."""
    return [((i // per_class) % num_classes, f"n{(i // per_class) % num_classes:04d}/img{i:06d}")
            for i in range(n)]


def make_manifest(paths: list[tuple[int, str]], seed: int) -> Manifest:
    rng = np.random.default_rng(seed)
    n = len(paths)
    names = [f"{stem}.JPEG" for _, stem in paths]
    used = sorted({cls for cls, _ in paths})
    index = {cls: j for j, cls in enumerate(used)}
    return Manifest(
        path=PathColumn.from_strings(names),
        sha256=np.frombuffer(b"".join(hashlib.sha256(p.encode()).digest() for p in names),
                             np.uint8).reshape(n, 32),
        width=rng.integers(300, 501, n).astype(np.int32),
        height=rng.integers(250, 451, n).astype(np.int32),
        label=np.array([index[cls] for cls, _ in paths], dtype=np.int32),
        class_names=tuple(f"n{cls:04d}" for cls in used),
    )


def imagenet_labelset(base: Path, images: int, seed: int = 0) -> LabelSet:
    """An empty label set with ImageNet's geometry (1000 classes, 18x18, top-5, shards of
    1024) over a registered dataset of ``images`` made-up paths: the scale benchmarks' subject
    (bench_verify, bench_completion)."""
    store = Store.open(base / "store")
    manifest = make_manifest([(i % 1000, f"n{i % 1000:04d}/{i}") for i in range(images)], seed)
    dataset, _ = store.add_dataset("bench", base, manifest=manifest)
    teacher = TeacherSpec(model="dm_nfnet_f6", checkpoint_sha256=None, num_classes=1000,
                          input_size=576, class_names=tuple(dataset.class_names))
    return dataset.create_labelset(LabelSetConfig(
        teacher=teacher, topk=5, grid=(18, 18), dataset_fingerprint=dataset.fingerprint,
        shard_size=1024))


def disk_usage(root: Path) -> dict[str, int]:
    files = allocated = apparent = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name))
            files += 1
            allocated += st.st_blocks * 512
            apparent += st.st_size
    return {"files": files, "allocated": allocated, "apparent": apparent}


def timed_passes(fn, repeats: int) -> list[float]:
    fn()  # untimed: opens metadata, warms the page cache and allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


# -- the .pt layout -----------------------------------------------------------------------------

def bench_pt(root: Path, labels: dict[str, np.ndarray], paths: list[tuple[int, str]],
             repeats: int, random_ids: np.ndarray) -> dict:
    n = len(paths)
    files = [root / f"{stem}.pt" for _, stem in paths]
    t0 = time.perf_counter()
    for d in sorted({f.parent for f in files}):
        d.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(files):
        # A fresh [2, K, H, W] float16 tensor per image, as the public generator saves it.
        tensor = torch.from_numpy(np.stack([labels["logits"][i],
                                            labels["classes"][i].astype(np.float16)]))
        torch.save(tensor, f)
    write_s = time.perf_counter() - t0

    check = torch.load(files[-1], weights_only=True)
    assert check.dtype == torch.float16 and tuple(check.shape) == (2, *labels["logits"].shape[1:])
    assert np.array_equal(check[1].numpy().astype(np.int64), labels["classes"][-1])

    def read_all() -> None:
        for f in files:
            torch.load(f, weights_only=True)

    times = timed_passes(read_all, repeats)
    t0 = time.perf_counter()
    for i in random_ids:
        torch.load(files[i], weights_only=True)
    random_s = time.perf_counter() - t0
    usage = disk_usage(root)
    seq_s = statistics.median(times)
    return {
        "layout": "pt", "files": usage["files"],
        "bytes_allocated": usage["allocated"], "bytes_apparent": usage["apparent"],
        "bytes_per_image_allocated": usage["allocated"] / n,
        "bytes_per_image_apparent": usage["apparent"] / n,
        "write_img_s": n / write_s,
        "seq_read_img_s": n / seq_s, "seq_read_s": times,
        "random_read_img_s": len(random_ids) / random_s,
    }


# -- the store ----------------------------------------------------------------------------------

def bench_store(root: Path, labels: dict[str, np.ndarray], manifest: Manifest, args,
                chunk_size: int, random_ids: np.ndarray) -> dict:
    n = len(manifest)
    store = Store.open(root)
    images = root.parent / "images"  # the manifest's paths are fake; only the root must exist
    images.mkdir(parents=True, exist_ok=True)
    dataset, _ = store.add_dataset(DATASET, images, manifest=manifest)
    teacher = TeacherSpec(model="dm_nfnet_f6", checkpoint_sha256=None,
                          num_classes=args.num_classes, input_size=32 * args.grid[0])
    labelset = dataset.create_labelset(LabelSetConfig(
        teacher=teacher, topk=args.topk, grid=args.grid, dataset_fingerprint=dataset.fingerprint,
        shard_size=args.shard_size, chunk_size=chunk_size))
    if labelset.attrs["chunk_size"] != chunk_size:
        raise RuntimeError(f"label set reopened with chunk size {labelset.attrs['chunk_size']}")

    t0 = time.perf_counter()
    for shard in range(labelset.num_shards):
        block = labelset.empty_block(shard)
        rows = slice(block.start, block.stop)
        for name in ("logits", "classes", "lse", "global_logits", "global_classes"):
            getattr(block, name)[:] = labels[name][rows]
        block.status[:] = ImageStatus.LABELED
        labelset.write_shard(shard, block)
    write_s = time.perf_counter() - t0

    reader = Store.open(root, mode="r").labelset(labelset.id)
    last = reader.read_shard(reader.num_shards - 1)
    rows = slice(last.start, last.stop)
    assert np.array_equal(last.logits, labels["logits"][rows])
    assert np.array_equal(last.classes, labels["classes"][rows])
    assert (last.status == ImageStatus.LABELED).all()

    def read_all(ls: LabelSet = reader) -> None:
        for shard in range(ls.num_shards):
            ls.read_shard(shard)

    def read_all_one_array_at_a_time(ls: LabelSet = reader) -> None:
        # What read_shard did before it read the six arrays concurrently, for comparison.
        for shard in range(ls.num_shards):
            start, stop = ls.shard_range(shard)
            for name in ARRAY_NAMES:
                ls.array(name)[start:stop]

    times = timed_passes(read_all, args.repeats)
    serial_times = timed_passes(read_all_one_array_at_a_time, args.repeats)
    t0 = time.perf_counter()
    for i in random_ids:
        reader.read_image(int(i))
    random_s = time.perf_counter() - t0

    labelset_dir = root / "datasets" / DATASET / "labels" / labelset.id
    usage = disk_usage(labelset_dir)
    whole = disk_usage(root)
    per_array = {name: disk_usage(labelset_dir / name)["allocated"] / n for name in ARRAY_NAMES}
    seq_s = statistics.median(times)
    return {
        "layout": "store", "chunk_size": chunk_size, "shard_size": args.shard_size,
        "files": usage["files"],
        "bytes_allocated": usage["allocated"], "bytes_apparent": usage["apparent"],
        "bytes_per_image_allocated": usage["allocated"] / n,
        "bytes_per_image_apparent": usage["apparent"] / n,
        "bytes_per_image_allocated_by_array": per_array,
        "store_files_with_manifest": whole["files"],
        "store_bytes_per_image_allocated_with_manifest": whole["allocated"] / n,
        "write_img_s": n / write_s,
        "seq_read_img_s": n / seq_s, "seq_read_s": times,
        "seq_read_serial_arrays_img_s": n / statistics.median(serial_times),
        "random_read_img_s": len(random_ids) / random_s,
    }


# -- driver -------------------------------------------------------------------------------------

def run(args) -> dict:
    paths = image_paths(args.images, args.images_per_class, args.num_classes)
    manifest = make_manifest(paths, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    random_ids = rng.integers(0, args.images, min(args.random_reads, args.images))
    results = []
    with common.scratch_dir(args, "bench_store-") as base:
        for kind in args.data:
            t0 = time.perf_counter()
            labels = make_labels(kind, args.images, args.topk, args.grid, args.num_classes,
                                 args.smooth_res, args.smooth_field, args.seed)
            gen_s = time.perf_counter() - t0
            work = base / kind
            pt = bench_pt(work / "pt", labels, paths, args.repeats, random_ids)
            stores = []
            for chunk in args.chunk_sizes:
                result = bench_store(work / f"store-c{chunk}", labels, manifest, args, chunk,
                                     random_ids)
                result["bytes_ratio_allocated"] = (result["bytes_per_image_allocated"]
                                                   / pt["bytes_per_image_allocated"])
                result["bytes_ratio_apparent"] = (result["bytes_per_image_apparent"]
                                                  / pt["bytes_per_image_apparent"])
                result["seq_read_ratio"] = result["seq_read_img_s"] / pt["seq_read_img_s"]
                result["random_read_ratio"] = result["random_read_img_s"] / pt["random_read_img_s"]
                stores.append(result)
                shutil.rmtree(work / f"store-c{chunk}", ignore_errors=True)
            results.append({"data": kind, "generate_s": gen_s, "label_stats": label_stats(labels),
                            "pt": pt, "store": stores})
            shutil.rmtree(work, ignore_errors=True)
    return {
        "bench": "store",
        "config": {"images": args.images, "topk": args.topk, "grid": list(args.grid),
                   "num_classes": args.num_classes, "shard_size": args.shard_size,
                   "chunk_sizes": args.chunk_sizes, "images_per_class": args.images_per_class,
                   "repeats": args.repeats, "random_reads": len(random_ids),
                   "smooth_res": args.smooth_res,
                   "smooth_field": args.smooth_field, "seed": args.seed,
                   "dir": str(args.dir or tempfile.gettempdir()),
                   "torch": torch.__version__, "zarr": zarr.__version__,
                   "cpus": os.cpu_count()},
        "targets": {"bytes_ratio_max": 0.5, "seq_read_ratio_min": 10.0},
        "results": results,
    }


def print_table(out: dict) -> None:
    header = (f"{'data':<7} {'layout':<12} {'files':>7} {'B/img alloc':>11} {'B/img app':>10} "
              f"{'write img/s':>11} {'seq img/s':>10} {'rand img/s':>10} "
              f"{'bytes x pt':>10} {'seq x pt':>9} {'rand x pt':>9}")
    print(header)
    print("-" * len(header))
    for res in out["results"]:
        pt = res["pt"]
        print(f"{res['data']:<7} {'pt':<12} {pt['files']:>7} "
              f"{pt['bytes_per_image_allocated']:>11.0f} {pt['bytes_per_image_apparent']:>10.0f} "
              f"{pt['write_img_s']:>11.0f} {pt['seq_read_img_s']:>10.0f} "
              f"{pt['random_read_img_s']:>10.0f} {'1.00':>10} {'1.0':>9} {'1.0':>9}")
        for st in res["store"]:
            name = f"store c={st['chunk_size']}"
            print(f"{res['data']:<7} {name:<12} {st['files']:>7} "
                  f"{st['bytes_per_image_allocated']:>11.0f} "
                  f"{st['bytes_per_image_apparent']:>10.0f} {st['write_img_s']:>11.0f} "
                  f"{st['seq_read_img_s']:>10.0f} {st['random_read_img_s']:>10.0f} "
                  f"{st['bytes_ratio_allocated']:>10.2f} {st['seq_read_ratio']:>9.1f} "
                  f"{st['random_read_ratio']:>9.2f}")
    print()
    print("store sequential reads, arrays read concurrently (read_shard) vs one after another:")
    for res in out["results"]:
        for st in res["store"]:
            print(f"  {res['data']:<7} c={st['chunk_size']:<5} {st['seq_read_img_s']:>9.0f} vs "
                  f"{st['seq_read_serial_arrays_img_s']:>9.0f} img/s")
    print("store bytes/image (allocated) by array:")
    for res in out["results"]:
        for st in res["store"]:
            parts = "  ".join(f"{k}={v:.0f}"
                              for k, v in st["bytes_per_image_allocated_by_array"].items())
            print(f"  {res['data']:<7} c={st['chunk_size']:<5} {parts}")
    print("label maps (first 256 images):")
    for res in out["results"]:
        st = res["label_stats"]
        print(f"  {res['data']:<7} class change rate between adjacent cells by rank "
              f"{st['class_change_rate_by_rank']}, "
              f"{st['distinct_classes_per_image']:.1f} distinct classes/image")
    t = out["targets"]
    print(f"targets: store bytes / pt bytes <= {t['bytes_ratio_max']}, "
          f"store seq read / pt seq read >= {t['seq_read_ratio_min']}")
    for res in out["results"]:
        for st in res["store"]:
            ok_b = st["bytes_ratio_allocated"] <= t["bytes_ratio_max"]
            ok_r = st["seq_read_ratio"] >= t["seq_read_ratio_min"]
            print(f"  {res['data']:<7} c={st['chunk_size']:<5} bytes "
                  f"{'PASS' if ok_b else 'FAIL'} ({st['bytes_ratio_allocated']:.2f}), "
                  f"read {'PASS' if ok_r else 'FAIL'} ({st['seq_read_ratio']:.1f}x), "
                  f"files {st['files']} vs {res['pt']['files']}")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def grid_arg(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1]))
    except ValueError:
        raise argparse.ArgumentTypeError(f"grid must look like 18 or 18x18, got {text!r}") from None
    return h, w


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=4096, help="images (label maps) to write")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--grid", type=grid_arg, default=(18, 18), help="label grid, HxW or H")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--data", choices=("smooth", "random", "both"), default="both",
                   help="synthetic label kind (see the module docstring)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard")
    p.add_argument("--chunk-sizes", type=int_list, default=[DEFAULT_CHUNK_SIZE],
                   help="comma-separated images per inner chunk; each one is a separate store")
    p.add_argument("--images-per-class", type=int, default=1300,
                   help="images per class directory (ImageNet train: up to 1300)")
    p.add_argument("--repeats", type=int, default=5, help="timed sequential passes (median)")
    p.add_argument("--random-reads", type=int, default=200, help="single random image reads")
    p.add_argument("--smooth-res", type=int, default=4,
                   help="side of the low-resolution random field of --data smooth")
    p.add_argument("--smooth-field", type=float, default=1.0,
                   help="std of the low-resolution field of --data smooth (larger: less smooth)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", type=Path, default=None,
                   help="parent directory for the scratch files (default: the system temp dir); "
                        "put it on the file system you care about")
    p.add_argument("--keep", action="store_true", help="keep the scratch directory")
    p.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    args.data = ["smooth", "random"] if args.data == "both" else [args.data]
    for chunk in args.chunk_sizes:
        if args.shard_size % chunk:
            p.error(f"--shard-size {args.shard_size} is not a multiple of chunk size {chunk}")
    if args.images < 1 or args.topk < 1 or args.topk > args.num_classes:
        p.error("need --images >= 1 and 1 <= --topk <= --num-classes")
    return args


def main() -> None:
    common.main(parse_args, run, print_table)


if __name__ == "__main__":
    main()
