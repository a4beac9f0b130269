"""The task queue: the Celery app, its configuration, the queue names, and sending tasks.

Tasks are sent by name, so the API (and anything else that enqueues) never imports the task
bodies in ``labeler_service.tasks`` nor what they import (the teacher, torch). The app is
configured explicitly, by ``labeler worker`` at start-up and by the API in its lifespan, never on
import: each process says which Redis its tasks go to.
"""

from __future__ import annotations

import json

import redis
from celery import Celery

from labeler_service.settings import Settings

LABELING_QUEUE = "labeling"  # plan and shard tasks
REGISTRATION_QUEUE = "registration"  # dataset scans
QUEUES = (LABELING_QUEUE, REGISTRATION_QUEUE)  # what `labeler worker` consumes by default

PLAN_TASK = "labeler.plan_job"
SHARD_TASK = "labeler.label_shard"
REGISTER_TASK = "labeler.register_dataset"

app = Celery("labeler_service")


def configure(celery: Celery, settings: Settings) -> None:
    """Point ``celery`` at ``settings``' Redis with the delivery guarantees the tasks rely on."""
    celery.close()  # drop connections to a previous broker, if any
    amqp = celery.__dict__.get("amqp")
    if amqp is not None:  # close() keeps the producer pool of the previous broker, and would
        amqp._producer_pool = None  # send there (kombu keeps one pool per broker, shared)
    # kombu sweeps for overdue unacknowledged tasks every interval x throttle seconds (100 s by
    # default, whatever the timeout): sweep every tenth of the timeout instead.
    restore_interval = max(1, min(10, settings.visibility_timeout // 10))
    celery.conf.update(
        broker_url=settings.redis_url,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "unacked_restore_interval": restore_interval,
            "unacked_restore_throttle": 1,
            # The sweep's lock: a worker killed while holding it would stop every redelivery
            # for kombu's default 300 s. A sweep takes milliseconds, and restoring a message is
            # a transaction, so two sweepers cannot restore one message twice.
            "unacked_mutex_expire": 5 * restore_interval,
        },
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        task_default_queue=LABELING_QUEUE,
        task_routes={REGISTER_TASK: {"queue": REGISTRATION_QUEUE}},
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
    )


# Deterministic task ids: a task sent twice for the same work is the same task.

def send(name: str, args: tuple, task_id: str, queue: str) -> None:
    """Send a task that runs under the time limit of the worker that takes it. Sent from a
    worker, Celery would stamp that worker's own limit into the message (send_task takes the
    registered task's options), and a worker configured for longer would kill it at the
    sender's limit, with a deadline derived from its own."""
    app.send_task(name, args=args, task_id=task_id, queue=queue, time_limit=None,
                  soft_time_limit=None)


def enqueue_plan(job_id: str) -> None:
    send(PLAN_TASK, (job_id,), f"{job_id}:plan", LABELING_QUEUE)


def enqueue_shard(job_id: str, shard: int) -> None:
    send(SHARD_TASK, (job_id, shard), f"{job_id}:shard:{shard}", LABELING_QUEUE)


def enqueue_registration(name: str, attempt: str, part: int = 0) -> None:
    """``part`` > 0: the scan's next task after ``part`` paused ones (one per time limit)."""
    task_id = f"register:{name}:{attempt}" + (f":{part}" if part else "")
    send(REGISTER_TASK, (name, attempt, part), task_id, REGISTRATION_QUEUE)


# Where kombu's Redis transport keeps messages: a list per queue (tasks are sent without a
# priority, so kombu's per-priority lists stay empty), and every delivered, unacknowledged
# message in one hash (kombu's default name).
_UNACKED = "unacked"


def jobs_in_broker(client: redis.Redis, max_queued: int = 10_000) -> set[str] | None:
    """The ids of the jobs with a task (plan or shard) the broker holds: queued, or delivered and
    not yet acknowledged. None when more than ``max_queued`` tasks wait: too many to read, and
    then every job counts as held.

    A message can still be lost: kombu's Redis transport pops it from the queue list before it
    records it as unacknowledged, so a worker killed in between loses it for good. What is not
    here is not coming (labeler_service.jobs.JobStore.requeue_stalled).
    """
    if client.llen(LABELING_QUEUE) > max_queued:
        return None
    pipe = client.pipeline()
    pipe.lrange(LABELING_QUEUE, 0, -1)
    pipe.hvals(_UNACKED)
    held: set[str] = set()
    for messages in pipe.execute():
        for message in messages:
            task_id = _task_id(message)
            if task_id is not None:
                held.add(task_id.split(":", 1)[0])
    return held


def _task_id(message: str | bytes) -> str | None:
    """The task id in a kombu message: queued ones are the message, unacknowledged ones the
    first of [message, exchange, routing key]. None for anything else."""
    try:
        data = json.loads(message)
        if isinstance(data, list):
            data = data[0]
        return str(data["headers"]["id"])
    except (ValueError, TypeError, KeyError, IndexError):
        return None
