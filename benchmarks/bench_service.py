"""The label service against ``labeler label`` on the same data, and job-status latency under load.

1. Setup: ImageNet-like JPEGs (``bench_label.make_imagenet_like``), a random-weight checkpoint with
   1000 classes, Redis at ``--redis-url`` (its db is emptied).
2. ``labeler label`` in this process: ``label_dataset`` on a fresh store, timed from call to
   return (teacher load included).
3. The service: ``labeler api`` (uvicorn) and ``--workers`` ``labeler worker`` processes, started
   and ready before the clock starts; the dataset registered over REST; then the clock runs from
   ``POST /v1/jobs`` to the job reading ``succeeded`` (polled every 50 ms). The worker loads the
   teacher inside that time, as ``labeler label`` does.
4. Latency: a second process (``--load-threads`` threads, each with its own HTTP connection)
   sends ``--load-requests`` ``GET /v1/jobs/{id}`` in total over loopback; p50/p99/max of the
   per-request wall times it measured, and its requests/s.

Both paths use the same options (batch size, shard size, decode workers, fp32 on CPU), so the
labels are identical; the ratio is the service's overhead: task dispatch, one task per shard, the
plan task and Redis round trips.

Example::

    .venv/bin/python benchmarks/bench_service.py --images 256 --model nfnet_l0 --input-size 224
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common
import httpx
import redis
from bench_label import make_imagenet_like
from celery import Celery

from labeler_service.labeling import LabelingOptions, label_dataset
from labeler_service.sample import make_random_checkpoint
from storage import Store

API_KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_main(url: str, job_id: str, threads: int, requests: int) -> None:
    """The load process: print one line of latencies (ms), space separated."""
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        mine = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
            for _ in range(n):
                began = time.perf_counter()
                r = c.get(f"/v1/jobs/{job_id}")
                mine.append((time.perf_counter() - began) * 1000)
                assert r.status_code == 200, r.text
        with lock:
            latencies.extend(mine)

    began = time.perf_counter()
    pool = [threading.Thread(target=worker, args=(requests // threads,)) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(f"{time.perf_counter() - began:.4f}", " ".join(f"{v:.3f}" for v in latencies))


def run(args) -> dict:
    scratch = Path(tempfile.mkdtemp(prefix="bench-service-", dir=args.dir))
    processes: list[subprocess.Popen] = []
    try:
        data = scratch / "data"
        mean_bytes = make_imagenet_like(data / "images", args.images, seed=0, noise=12.0,
                                        quality=90)
        make_random_checkpoint(scratch / "checkpoints" / "teacher.pth", model=args.model,
                               num_classes=1000)
        options = LabelingOptions(batch_size=args.batch_size, num_workers=args.decode_workers,
                                  shard_size=args.shard_size, progress=False)

        local = Store.open(scratch / "local")
        local.add_dataset("bench", data / "images")
        began = time.perf_counter()
        report = label_dataset(local, "bench", args.model, scratch / "checkpoints" / "teacher.pth",
                               args.input_size, 5, options, ignore_dataset_classes=True)
        local_s = time.perf_counter() - began

        client_redis = redis.Redis.from_url(args.redis_url)
        client_redis.flushdb()
        port = free_port()
        env = {**os.environ, "LABELER_STORE": str(scratch / "store"),
               "LABELER_DATA_ROOT": str(data), "LABELER_CHECKPOINT_ROOT": str(scratch /
                                                                            "checkpoints"),
               "LABELER_REDIS_URL": args.redis_url, "LABELER_API_KEYS": API_KEY,
               "LABELER_DEVICE": "cpu", "LABELER_BATCH_SIZE": str(args.batch_size),
               "LABELER_SHARD_SIZE": str(args.shard_size),
               "LABELER_DECODE_WORKERS": str(args.decode_workers),
               "LABELER_LOG_LEVEL": "WARNING"}
        log = open(scratch / "service.log", "ab")  # noqa: SIM115 - closed with the scratch dir
        cmd = [sys.executable, "-m", "labeler_service"]
        processes.append(subprocess.Popen([*cmd, "api", "--port", str(port)], env=env,
                                          stdout=log, stderr=log, start_new_session=True))
        for i in range(args.workers):
            processes.append(subprocess.Popen([*cmd, "worker", "--name", f"bench{i}@%h"],
                                              env=env, stdout=log, stderr=log,
                                              start_new_session=True))
        url = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"},
                              timeout=60)
        deadline = time.monotonic() + 60
        while True:
            try:
                if client.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError((scratch / "service.log").read_text())
            time.sleep(0.1)
        celery = Celery(broker=args.redis_url)  # worker start-up stays off the clock
        while len(celery.control.ping(timeout=0.5)) < args.workers:
            if time.monotonic() > deadline:
                raise RuntimeError((scratch / "service.log").read_text())
        r = client.post("/v1/datasets", json={"name": "bench", "path": "images"})
        assert r.status_code in (201, 202), r.text
        while r.json()["state"] == "registering":  # a worker scans the folder: off the clock
            time.sleep(0.1)
            r = client.get("/v1/datasets/bench")
        assert r.json()["state"] == "ready", r.text

        job_body = {"dataset": "bench", "topk": 5, "ignore_dataset_classes": True,
                    "teacher": {"model": args.model, "checkpoint": "teacher.pth",
                                "input_size": args.input_size}}
        began = time.perf_counter()
        job = client.post("/v1/jobs", json=job_body).json()
        while job["state"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.05)
            job = client.get(f"/v1/jobs/{job['id']}").json()
        service_s = time.perf_counter() - began
        assert job["state"] == "succeeded", job
        assert job["labelset"] == report.labelset_id

        out = subprocess.run([sys.executable, __file__, "--load", url, job["id"],
                              str(args.load_threads), str(args.load_requests)],
                             capture_output=True, text=True, check=True).stdout.split()
        load_s, latencies = float(out[0]), sorted(float(v) for v in out[1:])
        n = args.images
        return {
            "bench": "service",
            "config": {k: v for k, v in vars(args).items() if k not in ("dir", "json_out")}
            | {"mean_jpeg_bytes": mean_bytes, "cpus": os.cpu_count()},
            "labeler_label_s": local_s, "labeler_label_img_s": n / local_s,
            "service_s": service_s, "service_img_s": n / service_s,
            "ratio": local_s / service_s,
            "latency_ms": {"p50": statistics.median(latencies),
                           "p99": latencies[int(0.99 * (len(latencies) - 1))],
                           "max": latencies[-1], "requests": len(latencies),
                           "requests_per_s": len(latencies) / load_s},
        }
    finally:
        for proc in processes:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
        shutil.rmtree(scratch, ignore_errors=True)


def print_table(out: dict) -> None:
    c = out["config"]
    print(f"{c['model']} @ {c['input_size']} px, {c['images']} images, batch {c['batch_size']}, "
          f"shards of {c['shard_size']}, {c['workers']} worker(s), {c['decode_workers']} decode "
          f"worker(s), cpu x{c['cpus']}")
    print(f"labeler label     {out['labeler_label_s']:8.2f} s  {out['labeler_label_img_s']:7.1f} "
          "img/s")
    print(f"service (REST)    {out['service_s']:8.2f} s  {out['service_img_s']:7.1f} img/s  "
          f"ratio {out['ratio']:.3f} (target >= 0.9)")
    lat = out["latency_ms"]
    print(f"GET /v1/jobs/{{id}}: p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, max "
          f"{lat['max']:.2f} ms over {lat['requests']} requests from {c['load_threads']} "
          f"threads of a second process ({lat['requests_per_s']:.0f} req/s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--model", default="nfnet_l0")
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="labeler worker processes")
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    p.add_argument("--load-threads", type=int, default=4)
    p.add_argument("--load-requests", type=int, default=2000)
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--json-out", type=Path, default=None)
    return p.parse_args(argv)


def main() -> None:
    common.main(parse_args, run, print_table)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        load_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
