"""A task the broker lost: kombu's Redis transport pops a message from the queue before it
records it as unacknowledged, so a worker killed in between loses it, and its job would wait for
ever. The API finds jobs with no progress and no task in the broker and plans them again.

Against the real Redis: messages sent by the real Celery app and taken by a real kombu consumer;
then the API, a ``labeler worker`` and a plan message deleted from the queue."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from kombu import Connection

from labeler_service import keys
from labeler_service.jobs import JobStore
from labeler_service.queue import (
    LABELING_QUEUE,
    app,
    configure,
    enqueue_plan,
    enqueue_shard,
    jobs_in_broker,
)
from labeler_service.settings import Settings
from storage import Store
from tests.service.conftest import JOB, REDIS_URL, Cluster, stop

REQUEST = {k: v for k, v in JOB.items() if k != "dataset"}




@pytest.fixture
def broker(clean_redis) -> Iterator[redis.Redis]:
    """The Celery app sending to Redis db 11, as the API's is."""
    configure(app, Settings(redis_url=REDIS_URL))
    yield clean_redis
    app.close()


def jobstore(client: redis.Redis, root: Path, planned: list[str]) -> JobStore:
    return JobStore(client, Store.open(root / "store"), 86400, planned.append)


def age(client: redis.Redis, job_id: str, seconds: float) -> None:
    client.hset(keys.job(job_id), "progressed_at", keys.now() - seconds)


def test_the_broker_holds_queued_and_unacknowledged_tasks(broker):
    enqueue_plan("job-a")
    enqueue_shard("job-b", 3)
    assert jobs_in_broker(broker) == {"job-a", "job-b"}

    with Connection(REDIS_URL) as connection:  # a worker takes job-a's plan, not yet done
        queue = connection.SimpleQueue(LABELING_QUEUE)
        message = queue.get(timeout=5)
        assert message.headers["id"] == "job-a:plan"
        assert broker.hlen("unacked") == 1
        assert jobs_in_broker(broker) == {"job-a", "job-b"}
        message.ack()
        assert jobs_in_broker(broker) == {"job-b"}
        queue.close()

    broker.lpush(LABELING_QUEUE, "not a kombu message")  # ignored, not an error
    assert jobs_in_broker(broker) == {"job-b"}
    assert jobs_in_broker(broker, max_queued=1) is None  # too many to read: unknown


def test_only_active_jobs_stalled_with_no_task_in_the_broker_are_planned_again(
        clean_redis, tmp_path):
    planned: list[str] = []
    jobs = jobstore(clean_redis, tmp_path, planned)
    lost, held, recent, done = (jobs.create("toy", REQUEST).id for _ in range(4))
    for job_id in (lost, held, done):
        age(clean_redis, job_id, 600)
    jobs.finish(done, "succeeded")

    assert jobs.requeue_stalled(None, 300) == []  # the broker could not be read: nothing
    assert jobs.requeue_stalled({held}, 300) == [lost] and planned == [lost]
    # Planned again: the job counts as progressing, and is not planned again every sweep.
    assert jobs.requeue_stalled({held}, 300) == []
    age(clean_redis, lost, 600)
    stalled = jobs.requeue_stalled(set(), 300)
    assert stalled == [lost, held] and recent not in stalled and done not in stalled


def test_a_shard_counts_as_progress(clean_redis, tmp_path):
    jobs = jobstore(clean_redis, tmp_path, [])
    job_id = jobs.create("toy", REQUEST).id
    clean_redis.hset(keys.job(job_id), mapping={"state": "running", "shards_total": 2})
    age(clean_redis, job_id, 600)
    jobs.shard_done(job_id, 0, 4, 0)
    assert jobs.requeue_stalled(set(), 300) == []


@pytest.mark.slow
def test_a_plan_the_broker_lost_is_sent_again_and_the_job_finishes(cluster: Cluster, redis_db):
    cluster.settings["LABELER_STALL_SECONDS"] = "2"
    cluster.start_api()
    cluster.start_worker("w0")
    cluster.register("toy", "toy")
    stop(cluster.workers.pop())  # w0 scanned the folder and leaves: no worker takes the plan
    with cluster.client() as client:
        r = client.post("/v1/jobs", json=JOB)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
    assert jobs_in_broker(redis_db) == {job_id}
    redis_db.delete(LABELING_QUEUE)  # lost, as by a worker killed as it took the message

    cluster.start_worker("w1")
    job = cluster.wait_job(job_id, timeout=60)
    assert job["state"] == "succeeded", job
    assert job["progress"]["images_done"] == 12
    assert "planned again 1 jobs" in cluster.log("api.log")
