"""The job record in the real Redis: completing a job is idempotent and survives the worker that
wrote the last shard dying before it could complete the job."""

from __future__ import annotations

from pathlib import Path

import redis

from labeler_service.jobs import JobStore
from storage import Store

AGREEMENT = {"images": 12, "top1": 0.75, "top5": 1.0, "k": 2, "reason": None}


def test_the_last_shard_completes_the_job_once_even_if_delivered_again(
        redis_db: redis.Redis, tmp_path: Path):
    redis_db.flushdb()
    planned: list[str] = []  # what the job store would queue: nothing, the job is in Redis
    jobs = JobStore(redis_db, Store.open(tmp_path / "store"), 7 * 86400, planned.append)
    job = jobs.create("toy", {"topk": 2})
    jobs.start(job.id, "ls", images_total=8, shards_total=2, images_done=0, images_failed=0,
               shards_done=[])
    started_at = jobs.get(job.id).started_at
    assert started_at and jobs.get(job.id).finished_at is None
    jobs.start(job.id, "ls", images_total=8, shards_total=2, images_done=0, images_failed=0,
               shards_done=[])  # planned again (a redelivered plan): still the first start
    assert jobs.get(job.id).started_at == started_at
    assert jobs.shard_done(job.id, 0, 4, 0) is False
    assert jobs.shard_done(job.id, 1, 3, 1) is True  # every shard counted: complete it
    # The worker died before completing: the redelivered task counts nothing and is told again.
    assert jobs.shard_done(job.id, 1, 3, 1) is True
    running = jobs.get(job.id)
    assert running.state == "running" and running.agreement is None
    assert (running.images_done, running.images_failed, running.shards_done) == (8, 1, 2)

    assert jobs.finish(job.id, "succeeded", agreement=AGREEMENT) is True
    assert jobs.finish(job.id, "succeeded", agreement=AGREEMENT) is False
    assert jobs.shard_done(job.id, 1, 3, 1) is False  # finished: nothing more to do
    done = jobs.get(job.id)
    assert done.state == "succeeded" and done.agreement == AGREEMENT and done.finished_at
    # The store's record keeps it too, so a job recovered after Redis is emptied shows it.
    redis_db.flushdb()
    assert jobs.get(job.id).agreement == AGREEMENT
    redis_db.flushdb()
    assert planned == []
