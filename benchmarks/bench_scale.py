"""The store and service at ImageNet scale: each operation's time and peak memory against N.

Reproduces issue 15's simulation: a dataset of ``--images`` images in 1000 classes, a label set
with ImageNet's label geometry (18x18 grid, top-5, shards of 1024) written through the store's
own functions, then every operation whose cost could grow with N:

- ``labeler datasets add`` of a real image tree (hardlinks of a few ImageNet-sized JPEGs) in its
  own process: wall time and peak RSS (imports included);
- writing every shard of labels (``LabelSet.write_shard``), then the completion summary;
- the trainer stream's start (``TokenLabelStream``: the columns it reads) and its first batch;
- what a labeling worker's shard task holds of the manifest (``shard_batches``, traced);
- ``GET /v1/labelsets/{id}``, ``POST /v1/jobs`` on the complete label set (Redis emptied before
  each POST: the store's index answers), and one image's labels, through the real app (FastAPI's
  TestClient, the real Redis), p50 / p99;
- ``labeler datasets list`` and ``labeler store verify`` in their own processes.

With ``--no-images`` (the 14.2M run) there is no image tree: the manifest is made up (paths,
digests and sizes) and written with ``Store.add_dataset(manifest=...)``, and only ``status`` is
written (every image labeled), so the trainer's first batch and one image's labels are skipped.

    cd benchmarks && ../.venv/bin/python bench_scale.py --images 1281167 --dir /tmp \\
        --json-out /tmp/scale-1.28M.json
    cd benchmarks && ../.venv/bin/python bench_scale.py --images 14200000 --no-images \\
        --dir /tmp --json-out /tmp/scale-14.2M.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import common
import numpy as np
from bench_completion import percentiles

from storage import ImageStatus, LabelSetConfig, Store, TeacherSpec

REPO = Path(__file__).resolve().parents[1]
CLASSES = 1000
LINKS_PER_SOURCE = 60_000  # ext4 allows 65,000 hardlinks to one file


# The child's own peak RSS, measured by a small launcher: a child forked from this process (torch
# imported) would count this process's pages as its own peak until it exec'd.
LAUNCH = """
import json, os, subprocess, sys, time
began = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
print(json.dumps({"seconds": time.perf_counter() - began, "peak_rss_mb": usage.ru_maxrss / 1024,
                  "cpu_s": usage.ru_utime + usage.ru_stime,
                  "status": os.waitstatus_to_exitcode(status)}), file=sys.stderr)
"""


def measured(argv: list[str], ok: tuple[int, ...] = (0,)) -> dict:
    """Run a process to its end: its wall time, its own peak RSS and its stdout."""
    proc = subprocess.run([sys.executable, "-c", LAUNCH, *argv], capture_output=True, text=True,
                          cwd=REPO)
    *err, last = proc.stderr.rstrip().splitlines() or [""]
    figures = json.loads(last)
    if figures["status"] not in ok:
        raise RuntimeError(f"{argv[:4]} failed ({figures['status']}): {chr(10).join(err)[-2000:]}")
    return {"seconds": figures["seconds"], "peak_rss_mb": figures["peak_rss_mb"],
            "cpu_s": figures["cpu_s"], "stdout": proc.stdout}


def labeler(*args: str) -> list[str]:
    return [sys.executable, "-m", "labeler_service", *args]


def make_tree(root: Path, n: int) -> Path:
    """n hardlinks, ImageNet's layout (``n{class:08d}/n{class:08d}_{i}.JPEG``), of a few
    ImageNet-sized JPEGs (500x375, ~100 kB: smoothed noise)."""
    from PIL import Image, ImageFilter

    if (root / "done").exists():
        return root / "tree"
    rng = np.random.default_rng(0)
    sources = root / "sources"
    sources.mkdir(parents=True, exist_ok=True)
    sources_n = max(16, -(-n // LINKS_PER_SOURCE))
    for s in range(sources_n):
        noise = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
        Image.fromarray(noise).filter(ImageFilter.GaussianBlur(2)).save(
            sources / f"{s}.JPEG", quality=90)
    tree = root / "tree"
    for c in range(CLASSES):
        (tree / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        c = i % CLASSES
        os.link(sources / f"{i % sources_n}.JPEG", tree / f"n{c:08d}" / f"n{c:08d}_{i}.JPEG")
    (root / "done").touch()
    return tree


def labelset_config(dataset) -> LabelSetConfig:
    teacher = TeacherSpec(model="dm_nfnet_f6", checkpoint_sha256=None, num_classes=CLASSES,
                          input_size=576, class_names=tuple(dataset.class_names))
    return LabelSetConfig(teacher=teacher, topk=5, grid=(18, 18),
                          dataset_fingerprint=dataset.fingerprint, shard_size=1024)


def write_labels(labelset, with_labels: bool) -> dict:
    """Every shard written as a labeling worker writes it (one random block reused: the codecs'
    work is the same), or only ``status`` (``--no-images``); then the completion summary."""
    began = time.perf_counter()
    if with_labels:
        rng = np.random.default_rng(0)
        template = labelset.empty_block(0)
        template.logits[:] = rng.standard_normal(template.logits.shape).astype(np.float16)
        template.classes[:] = rng.integers(0, CLASSES, template.classes.shape)
        template.lse[:] = rng.standard_normal(template.lse.shape)
        template.global_logits[:] = rng.standard_normal(template.global_logits.shape)
        template.global_classes[:] = rng.integers(0, CLASSES, template.global_classes.shape)
        template.status[:] = ImageStatus.LABELED
        for shard in range(labelset.num_shards):
            block = labelset.empty_block(shard)
            for name in ("logits", "classes", "lse", "global_logits", "global_classes",
                         "status"):
                getattr(block, name)[:] = getattr(template, name)[:len(block)]
            labelset.write_shard(shard, block)
    else:
        labelset.array("status")[:] = ImageStatus.LABELED
    seconds = time.perf_counter() - began
    labelset.record_completion()
    return {"seconds": seconds, "images_per_s": labelset.num_images / seconds,
            "what": "every array" if with_labels else "status only"}


# The --no-images registration: made-up columns built compactly (as a scan collects them), then
# written by Store.add_dataset: its peak is a registration's without the hashing threads.
WRITE_MADE_UP = """
import json, sys, time
import numpy as np
from storage import Manifest, PathColumn, Store
location, source, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
began = time.perf_counter()
rng = np.random.default_rng(0)
manifest = Manifest(
    path=PathColumn.from_strings(f"n{i % 1000:08d}/n{i % 1000:08d}_{i}.JPEG" for i in range(n)),
    sha256=rng.integers(0, 256, (n, 32), dtype=np.uint8),
    width=rng.integers(300, 501, n).astype(np.int32),
    height=rng.integers(250, 451, n).astype(np.int32),
    label=(np.arange(n) % 1000).astype(np.int32),
    class_names=tuple(f"n{c:08d}" for c in range(1000)))
made = time.perf_counter()
Store.open(location).add_dataset("bench", source, manifest=manifest)
print(json.dumps({"made_up_s": made - began, "write_s": time.perf_counter() - made,
                  "manifest_mb": (manifest.path.nbytes + manifest.sha256.nbytes
                                  + 12 * len(manifest)) / 2**20}))
"""

STREAM_START = """
import json, resource, sys, time
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
began = time.perf_counter()
from trainer.data.stream import StreamConfig, TokenLabelStream
imported, imported_mb = time.perf_counter(), peak_mb()
stream = TokenLabelStream(StreamConfig(store=sys.argv[1], dataset="bench", labelset=sys.argv[2]))
started = time.perf_counter()
out = {"import_s": imported - began, "start_s": started - imported, "usable": len(stream),
       "peak_after_import_mb": imported_mb, "peak_after_start_mb": peak_mb()}
if sys.argv[3] == "1":
    from torch.utils.data import DataLoader
    batch = next(iter(DataLoader(stream, batch_size=64, num_workers=2)))
    out["first_batch_s"] = time.perf_counter() - started
print(json.dumps(out))
"""


def worker_manifest_bytes(dataset, labelset) -> dict:
    """What one shard task holds of the manifest: the traced peak while its batches are drawn
    (``shard_batches`` reads each shard's rows when reached), against the whole manifest's
    compact columns (what every worker process held before: a fixed-width unicode copy)."""
    from labeler_service.labeling import shard_batches

    tracemalloc.start()
    for _ in shard_batches(labelset, dataset, [labelset.num_shards // 2], 64):
        pass
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"shard_task_peak_mb": peak / 2**20}


def single_image_reads(store: Store, labelset_id: str, requests: int) -> dict:
    """``LabelSet.read_image`` of scattered images (one shard's inner chunk per array): on an
    open label set, as BENCHMARKS (a) measures it, and each from a freshly opened store and
    label set, as a request does."""
    labelset = store.labelset(labelset_id)
    indices = [(i * 7919) % labelset.num_images for i in range(requests)]
    open_reads, fresh_reads = [], []
    for index in indices:
        t = time.perf_counter()
        labelset.read_image(index)
        open_reads.append(time.perf_counter() - t)
    for index in indices:
        t = time.perf_counter()
        Store.open(store.location, mode="r").labelset(labelset_id).read_image(index)
        fresh_reads.append(time.perf_counter() - t)
    return {"open": percentiles(open_reads), "fresh": percentiles(fresh_reads)}


def api_requests(base: Path, store: Store, labelset, requests: int, with_images: bool,
                 redis_url: str) -> dict:
    import redis
    import torch
    from fastapi.testclient import TestClient

    from labeler_service.api.main import create_app
    from labeler_service.jobs import Resolutions
    from labeler_service.settings import Settings

    checkpoints = base / "checkpoints"
    checkpoints.mkdir(exist_ok=True)
    torch.save({}, checkpoints / "teacher.pth")
    settings = Settings(store=str(store.location), data_root=base, checkpoint_root=checkpoints,
                        redis_url=redis_url, api_keys="k")
    client_redis = redis.Redis.from_url(redis_url)
    client_redis.flushdb()
    body = {"dataset": "bench", "topk": 5, "teacher": {"model": "dm_nfnet_f6",
            "checkpoint": "teacher.pth", "input_size": 576}}
    request = {"teacher": body["teacher"], "topk": 5, "ignore_dataset_classes": False,
               "retry_failed": False, "repair": False}
    identity = Resolutions.identity(store.dataset("bench").fingerprint, request,
                                    (checkpoints / "teacher.pth").resolve())
    Resolutions(client_redis, store, 3600).record(identity, labelset.id)
    out: dict = {}
    with TestClient(create_app(settings), headers={"Authorization": "Bearer k"}) as client:
        timings: dict[str, list[float]] = {"get_labelset": [], "post_job_complete": [],
                                           "post_job_complete_redis_emptied": [],
                                           "image_labels": []}
        # Not timed: the first POST waits for the API's one listing of timm's models (a child
        # process started with the app), a start-up cost rather than a request's.
        assert client.post("/v1/jobs", json=body).status_code == 202
        os.sync()  # the label writes' dirty pages: flushed, not stalling the requests' writes
        for i in range(requests):
            t = time.perf_counter()
            r = client.get(f"/v1/labelsets/{labelset.id}")
            timings["get_labelset"].append(time.perf_counter() - t)
            assert r.status_code == 200 and r.json()["complete"], r.text
            t = time.perf_counter()
            r = client.post("/v1/jobs", json=body)
            timings["post_job_complete"].append(time.perf_counter() - t)
            assert r.status_code == 202 and r.json()["state"] == "succeeded", r.text
            client_redis.flushdb()  # then the job succeeds at once from the store alone
            t = time.perf_counter()
            r = client.post("/v1/jobs", json=body)
            timings["post_job_complete_redis_emptied"].append(time.perf_counter() - t)
            assert r.status_code == 202 and r.json()["state"] == "succeeded", r.text
            if with_images:
                index = (i * 7919) % labelset.num_images
                t = time.perf_counter()
                r = client.get(f"/v1/labelsets/{labelset.id}/images/{index}")
                timings["image_labels"].append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
        for name, seconds in timings.items():
            if seconds:
                out[name] = percentiles(seconds)
    client_redis.flushdb()
    return out


def run(args) -> dict:
    out: dict = {"bench": "scale", "config": {"images": args.images, "classes": CLASSES,
                                              "images_on_disk": not args.no_images}}
    with common.scratch_dir(args, "bench_scale-") as base:
        location = base / "store"
        if args.no_images:
            write = measured([sys.executable, "-c", WRITE_MADE_UP, str(location), str(base),
                              str(args.images)])
            out["register"] = {**json.loads(write["stdout"]), "seconds": write["seconds"],
                               "peak_rss_mb": write["peak_rss_mb"], "cpu_s": write["cpu_s"]}
        else:
            began = time.perf_counter()
            tree = make_tree(args.tree_dir or base / "images", args.images)
            out["tree_s"] = time.perf_counter() - began
            add = measured(labeler("datasets", "add", "bench", str(tree), "--store",
                                   str(location)))
            out["register"] = {"seconds": add["seconds"], "peak_rss_mb": add["peak_rss_mb"],
                               "cpu_s": add["cpu_s"]}
        print("registered", out["register"], flush=True)
        if args.register_only:
            return out
        store = Store.open(location)
        dataset = store.dataset("bench")
        labelset = dataset.create_labelset(labelset_config(dataset))
        out["write_labels"] = write_labels(labelset, not args.no_images)
        print("labels", out["write_labels"], flush=True)

        stream = measured([sys.executable, "-c", STREAM_START, str(location), labelset.id,
                           "0" if args.no_images else "1"])
        out["trainer_stream"] = {**json.loads(stream["stdout"]),
                                 "peak_rss_mb": stream["peak_rss_mb"]}
        print("stream", out["trainer_stream"], flush=True)
        out["worker_manifest"] = worker_manifest_bytes(dataset, labelset)
        if not args.no_images:
            out["read_image"] = single_image_reads(store, labelset.id, args.requests)
        out["api"] = api_requests(base, store, labelset, args.requests, not args.no_images,
                                  args.redis_url)
        print("api", out["api"], flush=True)
        listing = measured(labeler("datasets", "list", "--store", str(location)))
        out["datasets_list"] = {"seconds": listing["seconds"],
                                "peak_rss_mb": listing["peak_rss_mb"]}
        # --no-images: the label arrays other than status are unwritten, and verify says so (1)
        verify = measured(labeler("store", "verify", "--store", str(location)), ok=(0, 1))
        out["verify"] = {"seconds": verify["seconds"], "peak_rss_mb": verify["peak_rss_mb"],
                         "report_lines": len(verify["stdout"].splitlines())}
    return out


def print_table(out: dict) -> None:
    n = out["config"]["images"]
    reg = out["register"]
    print(f"\n{n:,} images ({'on disk' if out['config']['images_on_disk'] else 'no images'})")
    if "trainer_stream" not in out:  # --register-only
        print(f"| register | {reg['seconds']:.1f} s | {reg['peak_rss_mb']:.0f} MB |")
        return
    stream = out["trainer_stream"]
    rows = [("register", f"{reg['seconds']:.1f} s", f"{reg['peak_rss_mb']:.0f} MB"),
            ("write labels", f"{out['write_labels']['images_per_s']:,.0f} img/s", ""),
            ("trainer stream start", f"{stream['start_s']:.2f} s",
             f"{stream['peak_rss_mb']:.0f} MB"),
            ("worker shard task, manifest", "",
             f"{out['worker_manifest']['shard_task_peak_mb']:.3f} MB")]
    if "read_image" in out:
        reads = out["read_image"]
        rows.append(("read_image", f"p50 {reads['open']['p50_ms']:.1f} ms open, "
                     f"{reads['fresh']['p50_ms']:.1f} ms freshly opened", ""))
    if "first_batch_s" in stream:
        rows.append(("trainer first batch", f"{stream['first_batch_s']:.2f} s", ""))
    for name, figures in out["api"].items():
        rows.append((name, f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms", ""))
    for name in ("datasets_list", "verify"):
        rows.append((name, f"{out[name]['seconds']:.2f} s", f"{out[name]['peak_rss_mb']:.0f} MB"))
    for row in rows:
        print(f"| {row[0]} | {row[1]} | {row[2]} |")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--no-images", action="store_true",
                   help="no image tree: a made-up manifest, status only (the 14.2M run)")
    p.add_argument("--tree-dir", type=Path, default=None,
                   help="keep the image tree here (reused when complete)")
    p.add_argument("--register-only", action="store_true",
                   help="stop after `labeler datasets add` (the 14.2M registration)")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    common.add_scratch_args(p)
    return p.parse_args()


if __name__ == "__main__":
    common.main(parse_args, run, print_table)
