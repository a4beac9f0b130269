"""The task queue: the Celery app, its configuration, the queue names, and sending tasks.

Tasks are sent by name, so the API (and anything else that enqueues) never imports the task
bodies in ``labeler_service.tasks`` nor what they import (the teacher, torch). The app is
configured explicitly, by ``labeler worker`` at start-up and by the API in its lifespan, never on
import: each process says which Redis its tasks go to.
"""

from __future__ import annotations

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
    celery.conf.update(
        broker_url=settings.redis_url,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            # kombu sweeps for overdue unacknowledged tasks every interval x throttle seconds
            # (100 s by default, whatever the timeout): sweep every tenth of the timeout instead.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
            "unacked_restore_throttle": 1,
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

def enqueue_plan(job_id: str) -> None:
    app.send_task(PLAN_TASK, args=(job_id,), task_id=f"{job_id}:plan", queue=LABELING_QUEUE)


def enqueue_shard(job_id: str, shard: int) -> None:
    app.send_task(SHARD_TASK, args=(job_id, shard), task_id=f"{job_id}:shard:{shard}",
                  queue=LABELING_QUEUE)


def enqueue_registration(name: str, attempt: str) -> None:
    app.send_task(REGISTER_TASK, args=(name, attempt), task_id=f"register:{name}:{attempt}",
                  queue=REGISTRATION_QUEUE)
