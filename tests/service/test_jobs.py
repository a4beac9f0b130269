"""The job record in the real Redis: completing a job is idempotent and survives the worker that
wrote the last shard dying before it could complete the job; a job cancelled as its last shard
is written leaves its label set summarised."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import redis

from labeler_service import keys
from labeler_service.jobs import COMPLETE_JOB, JobStore
from labeler_service.sample import make_random_checkpoint, make_sample_images
from storage import Store
from tests.service.conftest import JOB, REDIS_URL

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
    assert jobs.shard_done(job.id, 0, 4, 0) is None
    assert jobs.shard_done(job.id, 1, 3, 1) == COMPLETE_JOB  # every shard counted: complete it
    # The worker died before completing: the redelivered task counts nothing and is told again.
    assert jobs.shard_done(job.id, 1, 3, 1) == COMPLETE_JOB
    running = jobs.get(job.id)
    assert running.state == "running" and running.agreement is None
    assert (running.images_done, running.images_failed, running.shards_done) == (8, 1, 2)

    assert jobs.finish(job.id, "succeeded", agreement=AGREEMENT) is True
    assert jobs.finish(job.id, "succeeded", agreement=AGREEMENT) is False
    assert jobs.shard_done(job.id, 1, 3, 1) is None  # finished: nothing more to do
    done = jobs.get(job.id)
    assert done.state == "succeeded" and done.agreement == AGREEMENT and done.finished_at
    # The store's record keeps it too, so a job recovered after Redis is emptied shows it.
    redis_db.flushdb()
    assert jobs.get(job.id).agreement == AGREEMENT
    redis_db.flushdb()
    assert planned == []


@pytest.fixture
def tasks_here(tmp_path: Path, redis_db: redis.Redis,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The task bodies, run in this process as a worker runs them, on a store of toy (12
    images, 3 shards of 4, one teacher batch a shard) and the test's Redis db. The tasks they
    send wait in the broker: nothing takes them."""
    from labeler_service import tasks
    from labeler_service.queue import app, configure
    from labeler_service.settings import get_settings

    redis_db.flushdb()
    make_sample_images(tmp_path / "data" / "toy", per_class=4)
    make_random_checkpoint(tmp_path / "checkpoints" / "teacher.safetensors", num_classes=3)
    Store.open(tmp_path / "store").add_dataset("toy", tmp_path / "data" / "toy")
    for name, value in {"STORE": str(tmp_path / "store"), "DATA_ROOT": str(tmp_path / "data"),
                        "CHECKPOINT_ROOT": str(tmp_path / "checkpoints"), "REDIS_URL": REDIS_URL,
                        "DEVICE": "cpu", "BATCH_SIZE": "4", "SHARD_SIZE": "4",
                        "DECODE_WORKERS": "0"}.items():
        monkeypatch.setenv(f"LABELER_{name}", value)
    caches = (get_settings, tasks.services, tasks.teacher_for, tasks.dataset_for,
              tasks.decoder_for)
    for cache in caches:
        cache.cache_clear()
    configure(app, get_settings())
    yield tmp_path
    for cache in caches:
        cache.cache_clear()
    redis_db.flushdb()


def test_a_job_cancelled_as_its_last_shard_is_written_still_summarises_the_labelset(
        tasks_here: Path, redis_db: redis.Redis):
    """A42: the cancel lands while the last shard is being labeled, after the task's start
    (here: while it loads the teacher) and before its batch is done. The shard is written whole
    and the job stays cancelled, but the label set is complete: the task that wrote its last
    shard records the completion summary and the agreement, which no later task would."""
    from labeler_service import tasks
    from labeler_service.api.schemas import JobCreate

    jobs = tasks.services()[2]
    job = jobs.create("toy", JobCreate(**JOB).model_dump(exclude={"dataset"}))
    tasks.plan_job(job.id)
    tasks.label_shard(job.id, 0)
    tasks.label_shard(job.id, 1)
    tasks.teacher_for.cache_clear()  # loading it again leaves time to cancel in
    with ThreadPoolExecutor(1) as pool:
        last = pool.submit(tasks.label_shard, job.id, 2)
        deadline = time.monotonic() + 60
        while not redis_db.hexists(keys.job_deliveries(job.id), "2"):  # the task has begun
            assert time.monotonic() < deadline and not last.done(), last.exception()
            time.sleep(0.002)
        jobs.request_cancel(job.id)
        last.result()
    assert jobs.get(job.id).state == "cancelled"
    labelset = Store.open(tasks_here / "store").labelset(jobs.get(job.id).labelset)
    assert labelset.completion() == {"images": 12, "shards": 3, "counts": {"0": 12}}
    assert labelset.attrs["agreement"]["images"] == 12


@pytest.mark.parametrize("change", ["deleted", "broken"])
def test_a_checkpoint_gone_bad_after_planning_fails_the_job_not_the_worker(
        tasks_here: Path, redis_db: redis.Redis, change: str):
    """Review: a shard task loads the teacher again when its checkpoint's file changed, and did
    so outside the job's error handling: a checkpoint deleted or replaced by one that does not
    load after planning escaped as a worker traceback, leaving the job running until the stall
    sweep. Now the job fails with the reason."""
    from labeler_service import tasks
    from labeler_service.api.schemas import JobCreate

    jobs = tasks.services()[2]
    job = jobs.create("toy", JobCreate(**JOB).model_dump(exclude={"dataset"}))
    tasks.plan_job(job.id)
    checkpoint = tasks_here / "checkpoints" / "teacher.safetensors"
    if change == "deleted":
        checkpoint.unlink()
    else:
        checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception):  # noqa: B017 - as the worker sees it: the task failed
        tasks.label_shard.apply(args=(job.id, 0), throw=True, retries=tasks.label_shard.max_retries)
    failed = jobs.get(job.id)
    assert failed.state == "failed" and failed.error.startswith("shard 0: "), failed
    assert "\n" not in failed.error and str(tasks_here) not in failed.error
