"""A registration and the task time limit, with a real `labeler worker` (issue 23: A26/A27): a
scan killed at the hard limit before it could pause fails at once, and leaves no hashing
process behind; a scan pauses before the limit its task really has, whatever the worker's own;
and a task sent from a worker carries no time limit of that worker's."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from labeler_service.queue import (
    LABELING_QUEUE,
    REGISTER_TASK,
    REGISTRATION_QUEUE,
    app,
    configure,
)
from labeler_service.registrations import RegistrationStore
from labeler_service.settings import Settings
from storage.manifest import SCAN_PROCESS_MIN_FILES
from tests.service.conftest import REDIS_URL, Cluster

pytestmark = pytest.mark.slow


def session_processes(session: int) -> dict[int, str]:
    """The live processes of a session (a worker started in its own: its pool, and anything
    they started, orphaned or not), pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, UnicodeDecodeError):
            continue
        state, _, _, sid = stat[stat.rindex(")") + 2:].split()[:4]
        if int(sid) == session and state != "Z":
            found[int(entry.name)] = cmdline
    return found


def hashing_processes(session: int) -> list[int]:
    """The registration's hashing processes (multiprocessing's spawn) in the session."""
    return [pid for pid, cmd in session_processes(session).items() if "spawn_main" in cmd]


def test_a_scan_killed_at_the_time_limit_fails_at_once_and_leaves_no_hashing_process(
        cluster: Cluster):
    """A folder large enough to be hashed by processes, whose first file (sparse, 64 GB) takes
    minutes to hash: no progress callback comes before the 10 s limit (the listing, 4,100
    files, is done in a fraction of the 9 s before the pause could come, even on a loaded
    machine), and the task is killed.
    The registration fails within seconds with the reason (not "registering" until declared lost
    after the visibility timeout), and its hashing processes exit with the killed task."""
    sources = sorted((cluster.root / "data" / "toy").rglob("*.jpg"))
    big = cluster.root / "data" / "big"
    (big / "a").mkdir(parents=True)
    with open(big / "a" / "0.jpg", "wb") as f:
        f.truncate(64 << 30)  # sorts first: in the first batch of the first hashing process
    for i in range(SCAN_PROCESS_MIN_FILES):
        (big / f"c{i % 4}").mkdir(exist_ok=True)
        os.link(sources[i % len(sources)], big / f"c{i % 4}" / f"{i:05d}.jpg")
    cluster.settings.update(LABELER_TASK_TIME_LIMIT="10", LABELER_VISIBILITY_TIMEOUT="120")
    cluster.start_api()
    worker = cluster.start_worker()
    with cluster.client() as client:
        assert client.post("/v1/datasets", json={"name": "big", "path": "big"}).status_code == 202
    began, hashed_by = time.monotonic(), set()
    deadline = began + 60  # the registration would be "registering" for 120 s, then lost
    with cluster.client() as client:
        while (state := client.get("/v1/datasets/big").json())["state"] == "registering":
            assert time.monotonic() < deadline, f"still registering\n{cluster.logs()}"
            hashed_by.update(hashing_processes(worker.pid))
            time.sleep(0.1)
    assert hashed_by, "the scan never started its hashing processes"
    assert state["state"] == "failed", state
    assert "time limit (10 s)" in state["error"] and "register it again" in state["error"]
    while (left := hashing_processes(worker.pid)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, {pid: session_processes(worker.pid)[pid] for pid in left}


def single_thread_hash_speed(folder: Path) -> float:
    """Bytes a second sha256 hashes of a sparse file here, now (the best of three)."""
    probe = folder / "probe"
    with open(probe, "wb") as f:
        f.truncate(32 << 20)
    best = 0.0
    for _ in range(3):
        began = time.perf_counter()
        with open(probe, "rb") as f:
            hashlib.file_digest(f, "sha256")
        best = max(best, (32 << 20) / (time.perf_counter() - began))
    probe.unlink()
    return best


def test_a_scan_pauses_before_the_time_limit_its_task_was_sent_with(cluster: Cluster):
    """A registration task sent with a 10 s limit (as a worker configured so would send it),
    taken by a worker configured for 60 s: the scan pauses before 10 s, where the task is
    killed, not before the worker's own 54 s, and goes on in a next task to ready. The folder
    is sized from the hashing speed measured here, to outlast 1.5 x the deadline even hashed
    at that speed by every thread the scan has at once; its files hash in milliseconds each,
    so progress callbacks come well within the last second, and keeping the rows hashed so far
    (four small columns) takes far less than it."""
    limit, deadline, count = 10, 9.0, 2000  # hashed by threads: one callback per file
    threads = min(8, os.cpu_count() or 1)  # scan_image_folder's threads, the cores they get
    seconds_per_file = 1.5 * deadline * threads / count
    size = int(single_thread_hash_speed(cluster.root) * seconds_per_file)
    slow = cluster.root / "data" / "slow" / "c0"
    slow.mkdir(parents=True)
    for i in range(count):
        with open(slow / f"{i:05d}.png", "wb") as f:
            f.truncate(size)
    cluster.settings.update(LABELER_TASK_TIME_LIMIT="60", LABELER_VISIBILITY_TIMEOUT="120",
                            LABELER_LOG_LEVEL="INFO")
    cluster.start_api()
    cluster.start_worker()
    with redis.Redis.from_url(REDIS_URL, decode_responses=True) as client:
        outcome, registration = RegistrationStore(client, 86400, 120).begin(
            "slow", "slow", (cluster.root / "data" / "slow").resolve())
    assert outcome == "created"
    configure(app, Settings(redis_url=REDIS_URL, visibility_timeout=120))
    app.send_task(REGISTER_TASK, args=("slow", registration.attempt, 0),
                  task_id=f"register:slow:{registration.attempt}", queue=REGISTRATION_QUEUE,
                  time_limit=limit)
    ready = cluster.wait_dataset("slow", timeout=120)
    assert ready["state"] == "ready", ready
    assert ready["num_images"] == count
    assert f"register:slow:{registration.attempt}:1]" in cluster.log("w0.log")  # paused
    assert "Hard time limit" not in cluster.log("w0.log")


SEND_AS_A_WORKER = """
import sys
from labeler_service.queue import configure, enqueue_plan, enqueue_registration, enqueue_shard
from labeler_service.settings import get_settings
from labeler_service.tasks import app

configure(app, get_settings())  # as `labeler worker` starts, with its own time limit
app.finalize()  # the task classes take their options from it, as in a running worker
enqueue_plan("job-1-a")
enqueue_shard("job-1-a", 0)
enqueue_registration("big", "attempt", 1)
"""


def test_a_task_sent_from_a_worker_carries_no_time_limit_of_its_own(redis_db: redis.Redis):
    """A27: Celery stamps the sending process's task options into the message: a worker's
    time limit, sent on to a worker configured for longer, would kill the task there early."""
    redis_db.flushdb()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABELER_")}
    env.update(LABELER_REDIS_URL=REDIS_URL, LABELER_TASK_TIME_LIMIT="7",
               LABELER_VISIBILITY_TIMEOUT="30")
    sent = subprocess.run([sys.executable, "-c", SEND_AS_A_WORKER], env=env,
                          capture_output=True, text=True, timeout=120)
    assert sent.returncode == 0, sent.stderr
    messages = [json.loads(m) for queue in (LABELING_QUEUE, REGISTRATION_QUEUE)
                for m in redis_db.lrange(queue, 0, -1)]
    assert len(messages) == 3
    assert [m["headers"]["timelimit"] for m in messages] == [[None, None]] * 3
    redis_db.flushdb()
