"""The GPU worker pool: Celery on Redis, one task per shard.

``plan_job`` loads the teacher, creates (or reopens) the label set, counts what the store already
holds and queues one ``label_shard`` task per missing shard, with a deterministic task id. A shard
task labels and writes its shard with the same code as ``labeler label``, so the results are the
same. Tasks are acknowledged late and rejected when their worker dies, and a shard is written whole
with its status last, so a task delivered twice, or after its worker was killed, redoes at most
one shard and never counts it twice.

``register_dataset`` scans an image folder and writes the dataset (``Store.add_dataset``, as
``labeler datasets add`` does in-process) for ``POST /v1/datasets``. It runs on its own queue,
``registration``, so a scan is not queued behind a job's shard tasks, nor they behind it;
every ``labeler worker`` consumes both queues unless ``--queues`` says otherwise (a worker that
scans labels nothing meanwhile).

The prefork parent never touches CUDA: the teacher is loaded lazily in the child, once, and
reused across tasks and jobs; so are the child's decoding processes, across a label set's shard
tasks (``decoder_for``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import time
from dataclasses import replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import redis
import torch
from celery import Task, signals
from celery.exceptions import TimeLimitExceeded

from labeler_service import keys
from labeler_service.jobs import (
    COMPLETE_JOB,
    LABELSET_DONE,
    JobStore,
    Resolutions,
    file_signature,
)
from labeler_service.labeling import (
    ImageDecoder,
    LabelingOptions,
    LabelingReport,
    TeacherRunner,
    check_class_space,
    label_shards,
    labelset_config,
)
from labeler_service.paths import public_reason, resolve_inside
from labeler_service.quality import record_summaries
from labeler_service.queue import (
    PLAN_TASK,
    QUEUES,
    REGISTER_TASK,
    SHARD_TASK,
    app,
    enqueue_plan,
    enqueue_registration,
    enqueue_shard,
)
from labeler_service.registrations import RegistrationStore, describe, run_registration
from labeler_service.settings import get_settings
from labeler_service.teacher import TeacherError, build_teacher
from storage import ImageStatus, Store, StoreError
from storage.images import DecodingProcessDied
from storage.verify import completed_shard_problem

log = logging.getLogger(__name__)
# Errors worth retrying: the store or Redis briefly unreachable, a decoding process killed.
TRANSIENT = (OSError, redis.ConnectionError, redis.TimeoutError, DecodingProcessDied)


# -- per-process state (created after fork) ---------------------------------------------------

@lru_cache(maxsize=1)
def services():
    """Redis client, store and job repository of this process."""
    settings = get_settings()
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    store = Store.open(settings.store)
    return client, store, JobStore(client, store, settings.job_ttl_seconds, enqueue_plan)


@lru_cache(maxsize=1)
def registration_store():
    settings = get_settings()
    return RegistrationStore(services()[0], settings.job_ttl_seconds, settings.visibility_timeout)


def request_teacher(request: dict):
    """The teacher a job's request names, and its checkpoint's file signature (what planning
    records the request's resolution under: jobs.Resolutions)."""
    checkpoint = resolve_checkpoint(request["teacher"]["checkpoint"])
    signature = file_signature(checkpoint)
    teacher = teacher_for(request["teacher"]["model"], str(checkpoint), tuple(signature),
                          request["teacher"]["input_size"], request["topk"])
    return teacher, signature


@lru_cache(maxsize=1)  # one teacher in GPU memory per process: the latest one asked for
def teacher_for(model: str, checkpoint: str, signature: tuple, input_size: int, topk: int):
    """``signature`` (the checkpoint's jobs.file_signature) is in the cache key only: a
    checkpoint rewritten or replaced under the same path is loaded again, not served from
    here."""
    settings = get_settings()
    device = torch.device(settings.device if torch.cuda.is_available() else "cpu")
    precision = settings.precision if device.type == "cuda" else "fp32"
    teacher, spec, grid = build_teacher(model, Path(checkpoint), input_size, device,
                                        precision=precision)
    # Not compiled here: planning loads the teacher too, for its spec alone (label_shard compiles).
    return TeacherRunner(teacher, spec.mean, spec.std, topk, device, precision), spec, grid


@lru_cache(maxsize=8)
def dataset_for(name: str):
    """The dataset, opened once per process and reused by every shard task (a name's contents
    never change: registering changed contents under it is refused). Each shard task reads its
    own rows of the manifest, never the whole."""
    return services()[1].dataset(name)


@lru_cache(maxsize=1)  # one set of decoding processes per worker process: the latest asked for
def decoder_for(dataset_name: str, labelset_id: str, device: str):
    """The decoding processes for a label set's images, started at its first shard task and
    kept for the next ones (starting them per task cost ~120 ms a shard on 2 CPU cores:
    BENCHMARKS.md). Replacing it ends the previous one's processes."""
    dataset = dataset_for(dataset_name)
    return ImageDecoder.for_labelset(dataset, dataset.labelset(labelset_id), labeling_options(),
                                     torch.device(device))


def resolve_checkpoint(relative: str) -> Path:
    """A request's checkpoint path, inside the checkpoint root (re-checked on the worker)."""
    return resolve_inside(get_settings().checkpoint_root, relative)


def labeling_options():
    settings = get_settings()
    options = LabelingOptions(batch_size=settings.batch_size, num_workers=settings.decode_workers,
                              device=settings.device, precision=settings.precision,
                              shard_size=settings.shard_size, progress=False)
    if settings.max_pixels:
        options.max_pixels = settings.max_pixels
    return options


def job_error(error: BaseException) -> str:
    """A job's ``error`` as clients see it: no server path, one bounded line."""
    settings = get_settings()
    return public_reason(f"{type(error).__name__}: {error}",
                         [settings.data_root, settings.checkpoint_root], settings.store)


def heartbeat(client: redis.Redis, hostname: str) -> None:
    client.set(keys.worker(hostname), int(time.time()), ex=60)


# -- tasks ------------------------------------------------------------------------------------

class LabelerTask(Task):
    """Celery runs ``on_failure`` in the worker's parent process when a child is killed at the
    hard time limit, and then acknowledges the task: without this, the shard would never come
    back and its job would stay running for ever (a registration: registering, for ever)."""

    def on_failure(self, exc, task_id, args, kwargs, einfo) -> None:
        if not isinstance(exc, TimeLimitExceeded):
            return
        if self.name == SHARD_TASK:  # again; over_delivered bounds how often
            log.warning("shard task %s hit the time limit: queued again", task_id)
            enqueue_shard(*args)
            return
        client = redis.Redis.from_url(get_settings().redis_url, decode_responses=True)
        try:
            if self.name == PLAN_TASK:
                JobStore(client, Store.open(get_settings().store), get_settings().job_ttl_seconds,
                         enqueue_plan).finish(args[0], "failed", "planning the job took longer "
                                              "than the task time limit")
            elif self.name == REGISTER_TASK:
                fail_registration_at_time_limit(client, *args[:2],
                                                limit=exc.args[0] if exc.args else None)
        finally:
            client.close()


def fail_registration_at_time_limit(client: redis.Redis, name: str, attempt: str,
                                    limit: float | None) -> None:
    """A scan killed at the hard time limit: it could not pause (no file finished hashing, no
    folder finished listing, in the last tenth of its time). Failed at once with what to do,
    rather than registering until declared lost; the scan's hashing processes exit with it."""
    settings = get_settings()
    seconds = f"{limit:.0f} s" if isinstance(limit, int | float) else "its time"
    log.warning("registration %s (attempt %s) was killed at the time limit (%s)", name,
                attempt, seconds)
    RegistrationStore(client, settings.job_ttl_seconds, settings.visibility_timeout).finish(
        name, attempt, "failed",
        f"the scan was stopped at the task time limit ({seconds}) before it could pause: "
        "listing one folder or hashing one file took longer than a tenth of it (a file of "
        "many GB?); remove such files, or raise LABELER_TASK_TIME_LIMIT (below "
        "LABELER_VISIBILITY_TIMEOUT), and register it again")


def task_time_limit(task: Task) -> float | None:
    """The hard time limit this delivery of ``task`` runs under: the one in its message (a
    task sent with its own limit), else this worker's configured one."""
    stamped = (task.request.timelimit or (None, None))[0]
    return stamped or get_settings().task_time_limit


@app.task(bind=True, base=LabelerTask, name=PLAN_TASK, autoretry_for=TRANSIENT,
          retry_backoff=True, retry_backoff_max=60, max_retries=5)
def plan_job(self, job_id: str) -> None:
    client, _, jobs = services()
    heartbeat(client, self.request.hostname or "worker")
    job = jobs.get(job_id)
    if job is None or job.finished:
        return
    request = job.request
    try:
        dataset = dataset_for(job.dataset)
        if not Path(dataset.source_root).is_dir():
            # Otherwise every image would be recorded as missing and the job would "succeed".
            raise FileNotFoundError(f"the images of dataset {job.dataset!r} are not reachable "
                                    "(the folder was moved or unmounted?)")
        (_, spec, grid), signature = request_teacher(request)
        if not request.get("ignore_dataset_classes"):
            check_class_space(dataset, spec, override='"ignore_dataset_classes": true')
        labelset = dataset.create_labelset(labelset_config(
            dataset, spec, request["topk"], grid,
            resolve_checkpoint(request["teacher"]["checkpoint"]), get_settings().shard_size))
    except (TeacherError, StoreError, KeyError, ValueError, FileNotFoundError) as e:
        jobs.finish(job_id, "failed", job_error(e))
        return
    except Exception as e:  # anything else loading the teacher: retried if transient, else
        if isinstance(e, TRANSIENT) and self.request.retries < self.max_retries:
            raise
        jobs.finish(job_id, "failed", job_error(e))  # the job fails, never stays queued
        return
    record_resolution(Resolutions(client, jobs.store, get_settings().job_ttl_seconds),
                      dataset, request, signature, labelset.id)
    if request.get("repair"):
        repair_completed_shards(labelset)
    todo = jobs.start_from_store(job_id, labelset, bool(request.get("retry_failed")))
    if not todo:
        complete_job(jobs, job_id, dataset, labelset)
    for shard in todo:
        enqueue_shard(job_id, shard)


def record_resolution(resolutions: Resolutions, dataset, request: dict, signature: list,
                      labelset_id: str) -> None:
    """Record what the request resolved to under the checkpoint's signature as it was before
    the teacher was loaded, if it still is: a checkpoint changed while it was being hashed
    records nothing (its next request is planned again)."""
    if file_signature(Path(signature[0])) == signature:
        resolutions.record(resolutions.identity(dataset, request, signature), labelset_id)


def repair_completed_shards(labelset) -> list[int]:
    """Mark every completed shard that fails ``labeler store verify``'s checks pending, and
    check the completion summary against the status records (a status object lost under a
    summary that still says complete): rebuilt from them, or removed while shards are
    pending, so the job labels them. What a repair pays for: every shard is read."""
    claimed_complete = labelset.completion() is not None
    pending = set(labelset.pending_shards())
    bad = [s for s in range(labelset.num_shards)
           if s not in pending and completed_shard_problem(labelset, s)]
    for shard in bad:
        labelset.mark_pending(shard)
    if bad:
        log.warning("label set %s: %d completed shards failed their checks and are labeled "
                    "again: %s", labelset.id, len(bad), bad[:20])
    if claimed_complete and pending:
        log.warning("label set %s: its completion summary said complete, but shards %s are "
                    "pending: the summary is removed", labelset.id, sorted(pending)[:20])
    labelset.rebuild_completion()
    return bad


def complete_job(jobs, job_id: str, dataset, labelset) -> None:
    """Every shard is written: record the label set's summaries, then succeed (in that order,
    so a job reads succeeded only with its figures). A job in which no image could be labeled
    fails, with the commonest reason, as ``labeler label`` does."""
    status = labelset.status()
    if status.size and not (status == ImageStatus.LABELED).any():
        codes, counts = np.unique(status[status > 0], return_counts=True)
        common = ImageStatus(int(codes[counts.argmax()])).description if codes.size else "?"
        jobs.finish(job_id, "failed", f"no image could be labeled: all {status.size} failed "
                                      f"(mostly: {common}); fix them and POST the job again "
                                      "with retry_failed")
        return
    jobs.finish(job_id, "succeeded", agreement=record_summaries(dataset, labelset))


def over_delivered(client: redis.Redis, job_id: str, shard: int) -> bool:
    """Count this delivery of the shard's task; True once it has come more often than
    ``max_shard_deliveries`` (it crashed its worker or timed out every time)."""
    key = keys.job_deliveries(job_id)
    pipe = client.pipeline()
    pipe.hincrby(key, str(shard), 1)
    pipe.expire(key, get_settings().job_ttl_seconds)
    deliveries, _ = pipe.execute()
    return int(deliveries) > get_settings().max_shard_deliveries


def give_up_shard(labelset, shard: int):
    """Write the shard with every image failed as SHARD_GAVE_UP, so the job goes on; labeling
    with ``retry_failed`` tries them again. Returns the shard's status."""
    block = labelset.empty_block(shard)
    block.status[:] = ImageStatus.SHARD_GAVE_UP
    labelset.write_shard(shard, block)
    log.error("label set %s: shard %d crashed or timed out on %d deliveries; its images are "
              "failed", labelset.id, shard, get_settings().max_shard_deliveries)
    return block.status


@app.task(bind=True, base=LabelerTask, name=SHARD_TASK, autoretry_for=TRANSIENT,
          retry_backoff=True, retry_backoff_max=60, max_retries=5)
def label_shard(self, job_id: str, shard: int) -> None:
    client, store, jobs = services()
    heartbeat(client, self.request.hostname or "worker")
    job = jobs.get(job_id)
    if job is None or job.finished or job.cancel_requested:
        return
    labelset = store.labelset(job.labelset)
    status = labelset.shard_status(shard)  # a torn status object reads as pending
    # Not already written by an earlier delivery (or, retrying failures, still failing).
    todo = (status == ImageStatus.PENDING).any() or (
        job.request.get("retry_failed") and (status > 0).any())
    if todo and over_delivered(client, job_id, shard):
        status = give_up_shard(labelset, shard)
    elif todo:
        request = job.request
        began = time.perf_counter()
        settings, input_size = get_settings(), request["teacher"]["input_size"]
        batch_size = settings.batch_size_for(input_size)
        decoder = None
        try:
            # Inside the job's error handling: the checkpoint may have been deleted, or replaced
            # by one that does not load, since planning (each shard task loads it again when
            # its file changed).
            (runner, spec, _), _ = request_teacher(request)
            if spec.checkpoint_sha256 != labelset.teacher.checkpoint_sha256:
                jobs.finish(job_id, "failed", "the checkpoint changed since the job was "
                                              "planned: POST the job again to label with the new "
                                              "one")
                return
            if settings.compile_teacher:
                # Once per process, for the shards this service makes (the runner outlives the
                # label set: other shard sizes are padded to it, or labeled in pieces of it).
                runner.compile(min(batch_size, settings.shard_size), input_size)
            decoder = decoder_for(job.dataset, labelset.id, str(runner.device))
            report = label_shards(labelset, dataset_for(job.dataset), runner, [shard],
                                  replace(labeling_options(), batch_size=batch_size),
                                  should_stop=lambda: jobs.cancel_requested(job_id),
                                  report=LabelingReport(labelset.id, 1), decoder=decoder)
        except Exception as e:
            if decoder is not None:  # no decoding processes left behind
                decoder.close()
                decoder_for.cache_clear()
            if isinstance(e, TRANSIENT) and self.request.retries < self.max_retries:
                raise
            jobs.finish(job_id, "failed", f"shard {shard}: {job_error(e)}")
            raise
        if report.stopped and not report.shards_written:
            return  # cancelled: the shard is left pending
        stats = client.pipeline()
        stats.hincrbyfloat(keys.STATS, "shard_seconds_sum", time.perf_counter() - began)
        stats.hincrby(keys.STATS, "shards_labeled", 1)
        stats.hincrby(keys.STATS, "images_labeled", report.images_labeled)
        stats.execute()
        status = labelset.shard_status(shard)
    # Counted even if the job was cancelled as the shard was written: if it was the label set's
    # last, no later shard task will record the label set's summaries.
    then = jobs.shard_done(job_id, shard, int((status == ImageStatus.LABELED).sum()),
                           int((status > 0).sum()))
    if then == COMPLETE_JOB:
        complete_job(jobs, job_id, dataset_for(job.dataset), labelset)
    elif then == LABELSET_DONE:
        record_summaries(dataset_for(job.dataset), labelset)


@app.task(bind=True, base=LabelerTask, name=REGISTER_TASK, autoretry_for=TRANSIENT,
          retry_backoff=True, retry_backoff_max=60, max_retries=5)
def register_dataset(self, name: str, attempt: str, part: int = 0) -> str | None:
    """Scan the folder of registration ``name`` (this ``attempt`` of it) and write the dataset.

    A scan that reaches the task's deadline (derived from the time limit this delivery really
    has) pauses, its rows kept in the store, and queues the next ``part``, which goes on from
    them; one killed at the limit before it could pause fails (``LabelerTask``). Delivered
    again after a crash, it is harmless: ``add_dataset`` finds the dataset it wrote (same
    contents: nothing to do), rewrites one left half-written, or goes on from the last pause.
    """
    client, store, _ = services()
    heartbeat(client, self.request.hostname or "worker")
    registrations = registration_store()
    settings = get_settings()
    try:
        state = run_registration(registrations, store, settings.data_root, name, attempt,
                                 time_limit=task_time_limit(self))
        if state == "paused":
            enqueue_registration(name, attempt, part + 1)
        return state
    except Exception as e:
        if isinstance(e, TRANSIENT) and self.request.retries < self.max_retries:
            raise
        with contextlib.suppress(redis.RedisError):
            registrations.finish(name, attempt, "failed",
                                 describe(e, settings.data_root, store.location))
        raise


@signals.worker_process_init.connect
def _allow_decoding_processes(**_) -> None:
    """Prefork children are daemonic, and daemonic processes may not start children; but the
    teacher's images are decoded in DataLoader worker processes. Those exit when this process
    dies (they watch their parent), so lifting the flag leaves no orphans."""
    process = multiprocessing.current_process()
    process._config["daemon"] = False
    # This process is billiard's, and so is its authkey's type, whose pickling multiprocessing's
    # spawn (the registration's hashing processes) cannot allow: the same key, in its own type.
    process._config["authkey"] = multiprocessing.process.AuthenticationString(
        bytes(process.authkey))


@signals.worker_ready.connect
def _announce(sender=None, **_) -> None:
    log.info("labeler worker ready: queues %s, store %s", ",".join(QUEUES),
             get_settings().store)
    client = redis.Redis.from_url(get_settings().redis_url)
    try:  # counted by /metrics from now, not from its first task
        heartbeat(client, getattr(sender, "hostname", None) or "worker")
    finally:
        client.close()
