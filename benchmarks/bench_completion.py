"""``GET /v1/labelsets/{id}`` and "is this label set complete?" at ImageNet scale, with the
completion summary against without it (the status array read, one object per shard).

A label set of ``--images`` images (ImageNet's label geometry, shards of 1024) whose ``status``
is written in one call (every image labeled: the other arrays stay unwritten, which neither path
reads), registered under a manifest of made-up paths. Then, with the summary recorded and with it
removed: ``labelset.is_complete()`` on a freshly opened label set (what ``POST /v1/jobs`` does
for a complete label set, and the planner), and ``GET /v1/labelsets/{id}`` through the real app
(FastAPI's TestClient, the real Redis), ``--requests`` times each: p50, p99, max.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common
from bench_store import imagenet_labelset
from fastapi.testclient import TestClient

from labeler_service.api.main import create_app
from labeler_service.settings import Settings
from storage import ImageStatus, Store


def percentiles(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"p50_ms": statistics.median(ordered) * 1e3,
            "p99_ms": ordered[int(0.99 * (len(ordered) - 1))] * 1e3,
            "max_ms": ordered[-1] * 1e3, "requests": len(ordered)}


def run(args) -> dict:
    with common.scratch_dir(args, "bench_completion-") as base:
        labelset = imagenet_labelset(base, args.images)
        store = Store.open(base / "store")
        labelset.array("status")[:] = ImageStatus.LABELED
        settings = Settings(store=str(base / "store"), data_root=base, checkpoint_root=base,
                            redis_url=args.redis_url, api_keys="k")
        out = {"bench": "completion", "config": {"images": args.images,
                                                 "shards": labelset.num_shards,
                                                 "requests": args.requests}}
        with TestClient(create_app(settings), headers={"Authorization": "Bearer k"}) as client:
            for case in ("with summary", "without summary"):
                if case == "with summary":
                    store.labelset(labelset.id).record_completion()
                else:
                    store.labelset(labelset.id).drop_completion()
                complete, get = [], []
                for _ in range(args.requests):
                    t = time.perf_counter()
                    assert Store.open(base / "store").labelset(labelset.id).is_complete()
                    complete.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    r = client.get(f"/v1/labelsets/{labelset.id}")
                    get.append(time.perf_counter() - t)
                    assert r.status_code == 200 and r.json()["complete"], r.text
                out[case] = {"is_complete": percentiles(complete), "get": percentiles(get)}
    return out


def print_table(out: dict) -> None:
    c = out["config"]
    print(f"{c['images']} images in {c['shards']} shards; {c['requests']} requests each")
    print(f"{'case':<17} {'what':<26} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for case in ("with summary", "without summary"):
        for what, key in (("labelset.is_complete()", "is_complete"),
                          ("GET /v1/labelsets/{id}", "get")):
            r = out[case][key]
            print(f"{case:<17} {what:<26} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
                  f"{r['max_ms']:>8.1f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=1_281_167)
    p.add_argument("--requests", type=int, default=50)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12")
    common.add_scratch_args(p)
    return p.parse_args(argv)


def main() -> None:
    common.main(parse_args, run, print_table)


if __name__ == "__main__":
    main()
