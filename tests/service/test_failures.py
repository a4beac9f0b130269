"""Workers killed, Redis emptied, the API restarted: the job still finishes, and the store
holds each image's labels exactly once, equal to a clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from labeler_service.labeling import LabelingOptions, label_dataset
from labeler_service.sample import make_sample_images
from storage import ARRAY_NAMES, Store
from tests.service.conftest import JOB, Cluster, free_port, stop

pytestmark = pytest.mark.slow
# Slow enough shards to be caught mid-way: 24 images, shards of 4, one image per batch, 256 px.
SLOW = {"LABELER_BATCH_SIZE": "1", "LABELER_SHARD_SIZE": "4"}
SLOW_JOB = {**JOB, "teacher": {**JOB["teacher"], "input_size": 256}}


def bigger_dataset(cluster: Cluster) -> None:
    make_sample_images(cluster.root / "data" / "toy", per_class=8)


def start_slow_job(cluster: Cluster, workers: tuple[str, ...] = ("w0",),
                   **settings: str) -> tuple[str, list[subprocess.Popen]]:
    """The API, workers and a 24-image job of slow shards; returns (job id, worker processes)."""
    cluster.settings.update(SLOW | settings)
    bigger_dataset(cluster)
    cluster.start_api()
    procs = [cluster.start_worker(name) for name in workers]
    return submit(cluster), procs


def submit(cluster: Cluster) -> str:
    cluster.register("toy", "toy")
    with cluster.client() as client:
        r = client.post("/v1/jobs", json=SLOW_JOB)
        assert r.status_code == 202, r.text
        return r.json()["id"]


def shards_written(cluster: Cluster) -> int:
    return len([p for p in (cluster.root / "store").glob("datasets/toy/labels/*/status/c/*")
                if p.name.isdigit()])


def wait_for(predicate, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise TimeoutError(what)


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def assert_no_shard_labeled_twice(redis_db) -> None:
    """Labeling work done, from the workers' counters: a shard labeled twice would exceed 24.
    (A kill between a shard's write and its counter update can leave one shard uncounted.)"""
    assert 20 <= int(redis_db.hget("labeler:stats", "images_labeled")) <= 24


def assert_equals_clean_run(cluster: Cluster, job: dict) -> None:
    assert job["state"] == "succeeded", job
    assert job["progress"]["images_done"] == job["progress"]["images_total"] == 24
    assert job["progress"]["shards_done"] == 6
    local = Store.open(cluster.root / "clean")
    local.add_dataset("toy", cluster.root / "data" / "toy")
    report = label_dataset(local, "toy", "test_nfnet", cluster.root / "checkpoints" /
                           "teacher.safetensors", 256, 2,
                           LabelingOptions(batch_size=1, num_workers=0, shard_size=4,
                                           progress=False))
    assert report.labelset_id == job["labelset"]
    served = Store.open(cluster.root / "store").labelset(job["labelset"]).read_block(0, 24)
    expected = local.labelset(job["labelset"]).read_block(0, 24)
    for name in ARRAY_NAMES:
        np.testing.assert_array_equal(getattr(served, name), getattr(expected, name), name)


def test_two_workers_one_child_killed_mid_shard(cluster: Cluster, redis_db):
    job_id, (first, second) = start_slow_job(cluster, workers=("w0", "w1"))
    wait_for(lambda: shards_written(cluster) >= 1, what="a first shard")
    time.sleep(0.1)  # into the next shard (4 images of ~50 ms)
    (child,) = children(first.pid)  # the prefork child running w0's current task
    os.kill(child, signal.SIGKILL)

    job = cluster.wait_job(job_id)
    assert_equals_clean_run(cluster, job)
    assert_no_shard_labeled_twice(redis_db)
    assert first.poll() is None and second.poll() is None  # w0 replaced its child


def test_whole_worker_killed_then_redelivered(cluster: Cluster, redis_db):
    # A time limit that planning (a cold teacher load) meets on a loaded machine too; the
    # visibility timeout above it is how long the lost shard waits to come back.
    job_id, (worker,) = start_slow_job(cluster, LABELER_VISIBILITY_TIMEOUT="30",
                                       LABELER_TASK_TIME_LIMIT="20", LABELER_STALL_SECONDS="5")
    wait_for(lambda: shards_written(cluster) >= 1, what="a first shard")
    time.sleep(0.1)
    stop(worker, signal.SIGKILL)  # the machine is lost: parent and child, no goodbye
    written = shards_written(cluster)
    assert written < 6

    # The unacknowledged shard comes back after the visibility timeout; or, if the kill fell
    # between the worker taking it from the queue and recording it as unacknowledged, the API
    # plans the job again once nothing of it is left in the broker (test_lost_tasks.py).
    cluster.start_worker("w1")
    job = cluster.wait_job(job_id, timeout=120)
    assert_equals_clean_run(cluster, job)
    assert_no_shard_labeled_twice(redis_db)


def test_redis_emptied_and_api_restarted(cluster: Cluster, redis_db):
    job_id, _ = start_slow_job(cluster)
    wait_for(lambda: shards_written(cluster) >= 2, what="two shards")
    redis_db.flushdb()  # jobs, counters, queue: all gone
    cluster.stop_api()
    cluster.start_api()  # recovers the job from the store and plans it again

    job = cluster.wait_job(job_id, timeout=120)
    assert_equals_clean_run(cluster, job)
    assert Path(cluster.root / "store" / "jobs" / job_id / "zarr.json").is_file()

    redis_db.flushdb()  # again, now that it is finished: recovered with its state and progress
    with cluster.client() as client:
        again = client.get(f"/v1/jobs/{job_id}").json()
    assert (again["state"], again["progress"]) == ("succeeded", job["progress"])


def start_redis(port: int, root: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no", "--dir", str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    client = redis.Redis(port=port)
    wait_for(lambda: _pings(client), timeout=10, what="redis-server")
    return proc


def _pings(client: redis.Redis) -> bool:
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def test_redis_restarted_mid_job(cluster: Cluster):
    """A private redis-server (no persistence) killed and started again while a job runs: the
    API and the worker reconnect, the job is recovered from the store and finishes."""
    port = free_port()
    server = start_redis(port, cluster.root)
    cluster.redis_url = f"redis://127.0.0.1:{port}/0"
    try:
        job_id, _ = start_slow_job(cluster)
        wait_for(lambda: shards_written(cluster) >= 2, what="two shards")
        stop(server, signal.SIGKILL)
        server = start_redis(port, cluster.root)  # empty: it kept nothing

        job = cluster.wait_job(job_id, timeout=120)  # the GET recovers the job
        assert_equals_clean_run(cluster, job)
    finally:
        stop(server, signal.SIGKILL)


def test_cancel_a_running_job_stops_between_batches(cluster: Cluster):
    job_id, _ = start_slow_job(cluster)
    wait_for(lambda: shards_written(cluster) >= 1, what="a first shard")
    with cluster.client() as client:
        r = client.post(f"/v1/jobs/{job_id}:cancel")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        written = shards_written(cluster)
        time.sleep(2)  # more than a shard's time: a worker that ignored the flag would go on
        assert shards_written(cluster) <= written + 1  # at most the batch in flight's shard
        assert shards_written(cluster) < 6
        job = client.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "cancelled" and job["finished_at"]
        labelset = Store.open(cluster.root / "store").labelset(job["labelset"])
        assert not labelset.is_complete()  # what was written stays; the rest is left pending
