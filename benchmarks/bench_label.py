"""``labeler label`` images/s against the bare teacher forward on the same batches and machine.

1. Setup (not timed): an ImageFolder of ImageNet-like JPEGs (``draw_sample`` shapes, 300-500 x
   280-420 px, i.e. ~400x350 on average, with pixel noise so that files are ~90 KB and decode
   costs what a photo costs), a random-weight checkpoint from ``make_random_checkpoint`` with
   1000 classes, registered in a fresh store.
2. Bare forward: ``build_teacher`` and ``teacher.summarise(x, topk)`` (the dense forward plus the
   top-K summary the labeler stores) on pre-decoded, pre-normalised tensors, batched exactly as
   the job batches (``--batch-size`` images, never across a ``--shard-size`` boundary), for the
   same number of images, one warm-up batch per distinct batch shape excluded. On CUDA as the
   job runs it: ``cudnn.benchmark`` on (the job's ``TeacherRunner`` turns it on), channels_last
   model and input, ``torch.autocast("cuda", dtype=torch.bfloat16)`` (``--precision``: the job's
   ``LabelingOptions.precision``, bf16 by default; fp32 means no autocast), with
   ``torch.cuda.synchronize()`` before each clock read. When the decoded inputs would exceed
   ``--cache-gb`` the first batches are reused cyclically (reported as ``distinct_batches``).
3. The full job: ``label_dataset(...)`` with ``LabelingOptions(batch_size, num_workers, device,
   progress=False)`` on a fresh store, timed from call to return (model load, checkpoint hash and
   dense-head check included), plus ``report.seconds`` (the labeling loop alone: decoding in
   ``--workers`` processes, transfer, normalisation, teacher, top-K, shard writes). The loop's
   first batch includes worker start-up and the first forward, which the bare pass excludes, so
   the ratio is slightly pessimistic for short runs.
4. Decoding alone (first round, after the job, on its store): the job's ``ImageDecoder`` over
   the job's batches with no teacher, from the first batch on: the rate decoding caps the job
   at, so that a job short of the bare forward says whether the decoding is what it waits for.

Both passes run the teacher as the job's ``TeacherRunner`` prepares it
(``prepare_for_inference``): NFNet's weight standardisation folded into plain convs once. With
``--unfolded-pass``, one bare pass is first timed without that (timm's layers re-standardise
every weight in every forward): the lever's worth. With ``--compile`` both passes are
``torch.compile``d (the job: ``labeler label --compile``); the compile is in the bare pass's
warm-up (``bare.compile_s``) and in the job's call-to-return time, not in its loop.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one image through the dense
teacher (the dense head included); GFLOPs/image x images/s gives achieved TFLOP/s, reported as a
fraction of ``--peak-tflops`` (989: H100 SXM dense bf16) on CUDA.

Default model: ``nfnet_l0`` at 224 px (its training size; 35 M parameters, 8.7 GFLOPs/image
with the dense head, a 7x7 grid): the smallest real NFNet in timm, whose forward runs ~13-16
img/s on 2 CPU cores, so 512 images take under a minute per pass. ``dm_nfnet_f0`` (~14 GFLOPs
at 192 px) measured 2.6 img/s there, too slow for a CPU check; ``test_nfnet`` (~0.6 GFLOPs at
160 px) is so cheap that decoding dominates, a stress test of the pipeline rather than the
target. On CUDA use the real teacher, e.g. ``--model dm_nfnet_f6 --input-size 576``.

Prints a table, then one JSON line with every number (also to ``--json-out``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import common
import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from labeler_service.labeling import (
    AUTOCAST_DTYPES,
    ImageDecoder,
    LabelingOptions,
    ModelInput,
    default_workers,
    label_dataset,
    prepare_for_inference,
    shard_batches,
)
from labeler_service.sample import SAMPLE_CLASSES, draw_sample, make_random_checkpoint
from labeler_service.teacher import build_teacher, fold_weight_standardization
from storage import Store
from storage.images import decode_image
from storage.labelset import DEFAULT_CHUNK_SIZE, DEFAULT_SHARD_SIZE
from storage.manifest import list_image_files

DATASET = "bench"


# -- setup --------------------------------------------------------------------------------------

def _make_image(path: Path, kind: str, seed: int, noise: float, quality: int) -> int:
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(300, 501)), int(rng.integers(280, 421))
    pixels = np.asarray(draw_sample(kind, width, height, rng), dtype=np.float32)
    if noise:
        pixels = pixels + rng.normal(0.0, noise, pixels.shape).astype(np.float32)
    data = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(data, "JPEG", quality=quality)
    path.write_bytes(data.getvalue())
    return len(data.getvalue())


def make_imagenet_like(root: Path, n: int, seed: int, noise: float, quality: int) -> float:
    """``root/<class>/<i>.JPEG`` for n images; returns the mean file size in bytes."""
    for kind in SAMPLE_CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
    jobs = [(root / SAMPLE_CLASSES[i % len(SAMPLE_CLASSES)] / f"{i:06d}.JPEG",
             SAMPLE_CLASSES[i % len(SAMPLE_CLASSES)], seed * 1_000_003 + i) for i in range(n)]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        sizes = list(pool.map(lambda j: _make_image(*j, noise, quality), jobs))
    return float(np.mean(sizes))


def job_batches(n: int, shard_size: int, batch_size: int) -> list[range]:
    """The job's batches: ``batch_size`` images, never across a shard (as ``shard_batches``)."""
    batches = []
    for start in range(0, n, shard_size):
        stop = min(start + shard_size, n)
        batches += [range(i, min(i + batch_size, stop)) for i in range(start, stop, batch_size)]
    return batches


# -- timing helpers -----------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_for(device: torch.device, precision: str):
    """What ``TeacherRunner`` does: autocast on CUDA only, none for fp32."""
    dtype = AUTOCAST_DTYPES[precision]
    if device.type == "cuda" and dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


# -- the bare teacher ---------------------------------------------------------------------------

class BareForward:
    """The teacher alone on pre-decoded, pre-normalised batches (built once, timed per round)."""

    def __init__(self, args, checkpoint: Path, files: list[Path]):
        self.device = torch.device(args.device)
        self.topk, self.precision = args.topk, args.precision
        self.teacher, self.spec, self.grid = build_teacher(args.model, checkpoint,
                                                           args.input_size, self.device)
        # As TeacherRunner does, but with the weight standardisation folded only by ``fold``,
        # so that a pass can be timed without it first (--unfolded-pass).
        prepare_for_inference(self.teacher, self.device, fold_standardization=False)
        if self.device.type == "cuda":  # a process-wide flag: the job's passes get it as well
            torch.backends.cudnn.benchmark = args.cudnn_benchmark
        self.summarise = self.teacher.summarise
        self.compile = args.compile
        self.compile_s = 0.0  # the warm-up of the compiled pass: compiling, once per shape

        n, size, batch = len(files), args.input_size, args.batch_size
        self.batches = job_batches(n, args.shard_size, batch)
        per_batch = batch * 3 * size * size * 4
        self.distinct = max(1, min(len(self.batches), int(args.cache_gb * 2**30 // per_batch)))
        # Pool entry j holds `batch` images starting at batch j's first image (wrapping), so
        # with every batch cached, timed batch t is exactly the job's batch t.
        needed = sorted({(b[0] + k) % n for b in self.batches[:self.distinct]
                         for k in range(batch)})
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            decoded = dict(zip(needed, pool.map(
                lambda i: decode_image(files[i].read_bytes(), size, self.spec.interpolation),
                needed), strict=True))
        model_input = ModelInput(self.spec.mean, self.spec.std, self.device)  # as the job's
        self.pool = []
        for b in self.batches[:self.distinct]:
            pixels = np.stack([decoded[(b[0] + k) % n] for k in range(batch)])
            self.pool.append(model_input(torch.from_numpy(pixels)))
        del decoded

    def inputs(self, t: int) -> torch.Tensor:
        return self.pool[t % self.distinct][:len(self.batches[t])]

    def fold(self) -> None:
        """Fold the weight standardisation, as the job's runner does; compile after it."""
        fold_weight_standardization(self.teacher.model)
        if self.compile:  # TeacherRunner compiles normalisation + summarise; here summarise
            self.summarise = torch.compile(self.teacher.summarise, dynamic=False)

    @torch.no_grad()
    def gflops_per_image(self) -> float:
        with FlopCounterMode(display=False) as counter, autocast_for(self.device, self.precision):
            self.teacher(self.inputs(0)[:1])
        return counter.get_total_flops() / 1e9

    @torch.no_grad()
    def run(self) -> float:
        """Seconds for all batches, after one untimed warm-up batch per batch shape."""
        with autocast_for(self.device, self.precision):
            start = time.perf_counter()
            for size in sorted({len(b) for b in self.batches}, reverse=True):
                self.summarise(self.inputs(0)[:size], self.topk)
            synchronize(self.device)
            self.compile_s = max(self.compile_s, time.perf_counter() - start)
            start = time.perf_counter()
            for t in range(len(self.batches)):
                self.summarise(self.inputs(t), self.topk)
            synchronize(self.device)
            return time.perf_counter() - start


# -- the job ------------------------------------------------------------------------------------

def run_job(args, checkpoint: Path, images: Path, store_dir: Path, decode: bool = False) -> dict:
    store = Store.open(store_dir)
    store.add_dataset(DATASET, images)  # manifest scan: not timed
    options = LabelingOptions(batch_size=args.batch_size, num_workers=args.workers,
                              device=args.device, precision=args.precision, compile=args.compile,
                              shard_size=args.shard_size,
                              chunk_size=min(args.chunk_size, args.shard_size), progress=False)
    synchronize(torch.device(args.device))
    start = time.perf_counter()
    report = label_dataset(store, DATASET, args.model, checkpoint, args.input_size, args.topk,
                           options, ignore_dataset_classes=True)
    synchronize(torch.device(args.device))
    wall = time.perf_counter() - start
    if report.images_labeled != args.images or report.images_failed:
        raise RuntimeError(f"job labeled {report.images_labeled} of {args.images} images, "
                           f"failures: {dict(report.images_failed)} {report.failures[:3]}")
    out = {"wall_s": wall, "loop_s": report.seconds, "labelset_id": report.labelset_id,
           "shards_written": report.shards_written}
    if decode:
        out["decode"] = decode_alone(store, report.labelset_id, options)
    return out


def decode_alone(store: Store, labelset_id: str, options: LabelingOptions) -> dict:
    """The job's decoding alone: its ``ImageDecoder`` (processes, pinned memory on CUDA) over
    the job's batches with no teacher, timed from the first batch (the processes' start-up
    excluded): the most images/s decoding lets the job reach."""
    dataset = store.dataset(DATASET)
    labelset = dataset.labelset(labelset_id)
    device = torch.device(options.device)
    decoder = ImageDecoder.for_labelset(dataset, labelset, options, device)
    first, count = None, 0
    try:
        batches = shard_batches(labelset, dataset, range(labelset.num_shards),
                                options.batch_size)
        for batch in decoder(batches):
            if first is None:
                first = time.perf_counter()
            else:
                count += len(batch.indices)
        seconds = time.perf_counter() - first
    finally:
        decoder.close()
    return {"img_s": count / seconds if seconds else None, "seconds": seconds,
            "images_timed": count, "workers": decoder.num_workers}


# -- driver -------------------------------------------------------------------------------------

def run(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with common.scratch_dir(args, "bench_label-") as base:
        t0 = time.perf_counter()
        images = base / "images"
        mean_bytes = make_imagenet_like(images, args.images, args.seed, args.jpeg_noise,
                                        args.jpeg_quality)
        checkpoint = make_random_checkpoint(base / f"{args.model}.safetensors", model=args.model,
                                            num_classes=1000, seed=args.seed)
        files = [images / p for p in list_image_files(images).paths]  # manifest order
        bare = BareForward(args, checkpoint, files)
        gflops = bare.gflops_per_image()
        setup_s = time.perf_counter() - t0
        unfolded_s = [bare.run()] if args.unfolded_pass else []
        bare.fold()

        bare_s, jobs, memory = [], [], {"bare": 0.0, "job": 0.0}
        for r in range(args.rounds):
            with common.peak_gpu_memory(device) as peak:
                bare_s.append(bare.run())
            memory["bare"] = max(memory["bare"], peak["gib"])
            with common.peak_gpu_memory(device) as peak:
                jobs.append(run_job(args, checkpoint, images, base / f"store-{r}",
                                    decode=r == 0))
            memory["job"] = max(memory["job"], peak["gib"])
            shutil.rmtree(base / f"store-{r}", ignore_errors=True)

    n = args.images
    bare_rate = n / statistics.median(bare_s)
    loop_rate = n / statistics.median(j["loop_s"] for j in jobs)
    wall_rate = n / statistics.median(j["wall_s"] for j in jobs)
    out = {
        "bench": "label",
        "config": {
            "model": args.model, "input_size": args.input_size, "grid": list(bare.grid),
            "topk": args.topk, "images": n, "batch_size": args.batch_size,
            "compile": args.compile,
            "workers": (default_workers(torch.device(args.device)) if args.workers is None
                        else args.workers), "device": args.device, "precision": args.precision,
            "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else f"cpu x{os.cpu_count()}"),
            "torch_threads": torch.get_num_threads(), "shard_size": args.shard_size,
            "rounds": args.rounds, "distinct_batches": bare.distinct,
            "batches": len(bare.batches), "mean_jpeg_bytes": mean_bytes,
            "torch": torch.__version__, "setup_s": setup_s,
        },
        "gflops_per_image": gflops,
        "bare": {"img_s": bare_rate, "seconds": bare_s,
                 "compile_s": bare.compile_s if args.compile else None},
        "job": {"loop_img_s": loop_rate, "wall_img_s": wall_rate,
                "loop_s": [j["loop_s"] for j in jobs], "wall_s": [j["wall_s"] for j in jobs],
                "labelset_id": jobs[0]["labelset_id"]},
        "decode": jobs[0]["decode"],  # decoding alone, no teacher (first round)
        "ratio_loop": loop_rate / bare_rate,
        "ratio_wall": wall_rate / bare_rate,
        "target_ratio_min": 0.9,
    }
    if unfolded_s:  # the lever: re-standardising every weight in every batch, as timm does
        out["bare_unfolded"] = {"img_s": n / unfolded_s[0], "seconds": unfolded_s,
                                "folded_speedup": bare_rate / (n / unfolded_s[0])}
    achieved = {k: gflops * v / 1e3 for k, v in
                (("bare", bare_rate), ("job_loop", loop_rate), ("job_wall", wall_rate))}
    out["achieved_tflops"] = achieved
    if device.type == "cuda":
        out["gpu_memory_gib"] = memory  # peak allocated by torch in each pass
        out["peak_tflops"] = args.peak_tflops
        out["fraction_of_peak"] = {k: v / args.peak_tflops for k, v in achieved.items()}
    return out


def print_table(out: dict) -> None:
    c = out["config"]
    print(f"{c['model']} @ {c['input_size']} px (grid {c['grid'][0]}x{c['grid'][1]}), "
          f"{out['gflops_per_image']:.2f} GFLOPs/image, {c['images']} images "
          f"(~{c['mean_jpeg_bytes'] / 1e3:.0f} KB JPEGs), batch {c['batch_size']}, "
          f"{c['workers']} workers, {c['device_name']}, {c['torch_threads']} torch threads, "
          f"precision {c['precision'] if c['device'] != 'cpu' else 'fp32'}, "
          f"{c['rounds']} round(s), {c['distinct_batches']}/{c['batches']} "
          "distinct bare batches")
    frac = out.get("fraction_of_peak")
    header = f"{'pass':<28} {'seconds':>9} {'img/s':>9} {'TFLOP/s':>8} {'vs bare':>8}"
    if frac:
        header += f" {'of peak':>8}"
    print(header)
    print("-" * len(header))
    bare_rate = out["bare"]["img_s"]
    rows = [("bare teacher.summarise", statistics.median(out["bare"]["seconds"]), bare_rate,
             "bare"),
            ("label_dataset loop", statistics.median(out["job"]["loop_s"]),
             out["job"]["loop_img_s"], "job_loop"),
            ("label_dataset call->return", statistics.median(out["job"]["wall_s"]),
             out["job"]["wall_img_s"], "job_wall")]
    if "bare_unfolded" in out:  # no FLOP figure of its own: the same model, re-standardised
        u = out["bare_unfolded"]
        print(f"{'bare, weights re-standardised':<28} {u['seconds'][0]:>9.2f} {u['img_s']:>9.1f} "
              f"{'':>8} {u['img_s'] / bare_rate:>8.3f}")
    for name, seconds, rate, key in rows:
        line = (f"{name:<28} {seconds:>9.2f} {rate:>9.1f} {out['achieved_tflops'][key]:>8.3f} "
                f"{rate / bare_rate:>8.3f}")
        if frac:
            line += f" {frac[key]:>8.1%}"
        print(line)
    d = out["decode"]
    if d["img_s"]:
        print(f"{'decoding alone, no teacher':<28} {d['seconds']:>9.2f} {d['img_s']:>9.1f} "
              f"{'':>8} {d['img_s'] / bare_rate:>8.3f}   ({d['workers']} processes, "
              f"{d['images_timed']} images after the first batch)")
    ok = out["ratio_loop"] >= out["target_ratio_min"]
    print(f"target: job / bare >= {out['target_ratio_min']}: "
          f"{'PASS' if ok else 'FAIL'} (loop {out['ratio_loop']:.3f}, "
          f"call->return {out['ratio_wall']:.3f})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="nfnet_l0", help="timm NFNet (see the module docstring)")
    p.add_argument("--input-size", type=int, default=224, help="teacher input side in px")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes of the job (default: labeler's default_workers)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own choice)")
    p.add_argument("--precision", choices=sorted(AUTOCAST_DTYPES), default="bf16",
                   help="autocast dtype on CUDA for both passes (fp32: none; CPU: always fp32, "
                        "as in the job)")
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.backends.cudnn.benchmark on CUDA (the job turns it on)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the teacher in both passes (the job: labeler --compile)")
    p.add_argument("--unfolded-pass", action="store_true",
                   help="first time one bare pass with timm's per-forward weight "
                        "standardisation (what folding it saves)")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE)
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate bare and job this many times; medians are reported")
    p.add_argument("--peak-tflops", type=float, default=989.0,
                   help="the GPU's dense bf16 peak (H100 SXM: 989; H200: 989)")
    p.add_argument("--cache-gb", type=float, default=4.0,
                   help="most memory for the bare pass's pre-normalised inputs (on the device)")
    p.add_argument("--jpeg-noise", type=float, default=32.0,
                   help="pixel noise std of the sample JPEGs (32: ~90 KB files, ImageNet ~110 KB)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    common.add_scratch_args(p)
    args = p.parse_args(argv)
    if min(args.images, args.batch_size, args.shard_size, args.rounds) < 1:
        p.error("--images, --batch-size, --shard-size and --rounds must be >= 1")
    if args.shard_size % min(args.chunk_size, args.shard_size):
        p.error("--shard-size must be a multiple of --chunk-size")
    common.check_device(p, args.device)
    return args


def main() -> None:
    common.main(parse_args, run, print_table)


if __name__ == "__main__":
    main()
