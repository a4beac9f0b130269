"""Dataset listings in a burst against one API process, and what other routes wait meanwhile.

1. Setup: ``--datasets`` datasets of the same 12 made images (``Store.add_dataset``), an empty
   label set on the first, Redis at ``--redis-url`` (its db is emptied); ``labeler api`` started
   and ready before the clock runs.
2. The burst: ``--listings`` ``GET /v1/datasets?page_size=--page-size`` sent at once, each on its
   own connection, then ``GET /healthz`` and one image's labels as JSON
   (``GET /v1/labelsets/{id}/images/0``, a sync route). One thread reads every answer (a
   selector), so each request's time runs from its send to the end of its answer.
3. The same image request alone, before the burst, for scale.

Issue 23 (R17): 200 listings held every thread of the shared pool, and an image's labels took
39.8 s. Run it on the code before and after to compare.

Example::

    .venv/bin/python benchmarks/bench_listing.py --datasets 300 --listings 200
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common
import httpx
import redis

from labeler_service.sample import make_sample_images
from storage import LabelSetConfig, Store, TeacherSpec

API_KEY = "bench-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(root: Path, datasets: int) -> str:
    """``datasets`` datasets of one folder, and an empty label set on the first: its id."""
    make_sample_images(root / "data" / "toy", per_class=4)
    store = Store.open(root / "store")
    for i in range(datasets):
        store.add_dataset(f"bulk{i:04d}", root / "data" / "toy")
    dataset = store.dataset("bulk0000")
    teacher = TeacherSpec(model="test_nfnet", checkpoint_sha256=None, num_classes=3,
                          input_size=64, class_names=tuple(dataset.class_names))
    return dataset.create_labelset(LabelSetConfig(
        teacher=teacher, topk=2, grid=(2, 2), dataset_fingerprint=dataset.fingerprint,
        shard_size=4)).id


def head(path: str) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Connection: close\r\n\r\n").encode()


def timed(port: int, requests: list[tuple[str, bytes]]) -> dict[str, float]:
    """Send each request on its own connection, at once; seconds until each whole answer."""
    selector = selectors.DefaultSelector()
    for name, request in requests:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(request)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, (name, time.perf_counter(), []))
    seconds = {}
    while selector.get_map():
        for key, _ in selector.select():
            name, sent, chunks = key.data
            chunk = key.fileobj.recv(1 << 20)
            chunks.append(chunk)
            if not chunk:
                answer = b"".join(chunks)
                if not answer.startswith(b"HTTP/1.1 200"):
                    raise RuntimeError(f"{name}: {answer[:200]!r}")
                seconds[name] = time.perf_counter() - sent
                selector.unregister(key.fileobj)
                key.fileobj.close()
    return seconds


def start_api(root: Path, redis_url: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    env = {**os.environ, "LABELER_STORE": str(root / "store"),
           "LABELER_DATA_ROOT": str(root / "data"), "LABELER_CHECKPOINT_ROOT": str(root),
           "LABELER_REDIS_URL": redis_url, "LABELER_API_KEYS": API_KEY,
           "LABELER_LOG_LEVEL": "WARNING", **env}
    log = open(root / "api.log", "ab")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-m", "labeler_service", "api", "--port", str(port)],
                            env=env, stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError((root / "api.log").read_text())
        time.sleep(0.1)


def run(args: argparse.Namespace) -> dict:
    with common.scratch_dir(args, "bench-listing-") as root:
        redis.Redis.from_url(args.redis_url).flushdb()
        began = time.perf_counter()
        labelset = make_store(root, args.datasets)
        setup_s = time.perf_counter() - began
        port = free_port()
        extra = {"LABELER_LISTING_CONCURRENCY": str(args.listing_concurrency)} \
            if args.listing_concurrency else {}
        api = start_api(root, args.redis_url, port, extra)
        try:
            image = head(f"/v1/labelsets/{labelset}/images/0")
            alone = statistics.median(timed(port, [("image", image)])["image"]
                                      for _ in range(5))
            listing = head(f"/v1/datasets?page_size={args.page_size}")
            burst = [(f"list{i}", listing) for i in range(args.listings)]
            seconds = timed(port, [*burst, ("healthz", head("/healthz")), ("image", image)])
        finally:
            os.killpg(api.pid, signal.SIGTERM)
            api.wait(timeout=30)
    lists = sorted(v for k, v in seconds.items() if k.startswith("list"))
    return {
        "bench": "listing",
        "config": {k: v for k, v in vars(args).items() if k not in ("dir", "json_out")}
        | {"cpus": os.cpu_count()},
        "setup_s": setup_s,
        "listing_s": {"p50": statistics.median(lists), "max": lists[-1]},
        "healthz_s": seconds["healthz"], "image_s": seconds["image"], "image_alone_s": alone,
    }


def print_table(out: dict) -> None:
    c = out["config"]
    print(f"{c['datasets']} datasets, {c['listings']} x GET /v1/datasets?page_size="
          f"{c['page_size']} at once, cpu x{c['cpus']}")
    print(f"listings        p50 {out['listing_s']['p50']:8.3f} s   max "
          f"{out['listing_s']['max']:8.3f} s")
    print(f"GET /healthz        {out['healthz_s']:8.3f} s (sent after the listings)")
    print(f"image labels        {out['image_s']:8.3f} s (sent after the listings; alone "
          f"{out['image_alone_s']:.3f} s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--datasets", type=int, default=300)
    p.add_argument("--listings", type=int, default=200)
    p.add_argument("--page-size", type=int, default=100)
    p.add_argument("--listing-concurrency", type=int, default=None,
                   help="LABELER_LISTING_CONCURRENCY (default: the API's)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    common.add_scratch_args(p)
    return p.parse_args(argv)


if __name__ == "__main__":
    common.main(parse_args, run, print_table)
