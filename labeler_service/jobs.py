"""Labeling jobs: live state and progress counters in Redis, the durable record in the store.

Redis holds what changes fast (state, counters, cancel flags, idempotency keys, the job index).
The store holds what must survive Redis being emptied: each job's request (``jobs/<id>`` attrs)
and, above all, the label set's per-shard completion records, the source of truth for what is
done. A job missing from Redis but present in the store is recovered: re-created in Redis and
planned again, which counts finished shards from the store and queues only the missing ones.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis
import zarr

from labeler_service import keys
from labeler_service.keys import now
from storage import Dataset, LabelSet, Store, StoreError

log = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running")
TERMINAL_STATES = ("succeeded", "failed", "cancelled")
STATES = ACTIVE_STATES + TERMINAL_STATES

# Record one finished shard, once: SADD makes a redelivered or repeated shard count nothing.
# Returns -1 if the job is gone (Redis emptied), 0 if already counted, 1 if counted, 2 if every
# shard is counted and the job is still running: the caller completes it (measures the label
# set, then succeeds). A repeated last shard answers 2 again, so a worker lost between the last
# shard and completing the job leaves it to the redelivered task, not running for ever. 3 if this
# shard was the last one and the job had already ended (cancelled while its last shard was being
# written): the label set is complete and no one else will record its summaries.
_SHARD_DONE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local added = redis.call('SADD', KEYS[2], ARGV[1])
if added == 1 then
  redis.call('HINCRBY', KEYS[1], 'images_done', tonumber(ARGV[2]) + tonumber(ARGV[3]))
  redis.call('HINCRBY', KEYS[1], 'images_failed', tonumber(ARGV[3]))
  redis.call('HINCRBY', KEYS[1], 'shards_done', 1)
  redis.call('HSET', KEYS[1], 'progressed_at', ARGV[4])
end
local done = tonumber(redis.call('HGET', KEYS[1], 'shards_done') or '0')
local total = tonumber(redis.call('HGET', KEYS[1], 'shards_total') or '-1')
if total >= 0 and done >= total then
  local state = redis.call('HGET', KEYS[1], 'state')
  if state == 'running' then return 2 end
  if added == 1 and (state == 'cancelled' or state == 'failed') then return 3 end
end
return added
"""
# A recovered job's record, written whole only if no record has its id yet (HSETNX and HSET in one
# step: a reader between the two would see a record holding nothing but its id). 1 if written.
_RECOVER = """
if redis.call('HSETNX', KEYS[1], 'id', ARGV[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""
# Note that a job's plan was sent, on the job's own record only (never creating a stub of one).
_MARK_ENQUEUED = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'enqueued', 1)
return 1
"""
# Move an active job to a terminal state; a job already finished keeps its state.
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
if state ~= 'queued' and state ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[1], 'finished_at', ARGV[2], 'error', ARGV[3],
           'agreement', ARGV[4])
return 1
"""


# What counting a shard leaves its caller to do (JobStore.shard_done).
COMPLETE_JOB = "complete the job"
LABELSET_DONE = "record the label set's summaries"

# Request fields that do not change which label set a job makes.
NOT_IDENTITY = ("retry_failed", "repair")


def file_signature(path: Path) -> list[str | int]:
    """What tells a file's contents apart without reading them: its path, size, mtime, ctime
    and inode. A file rewritten in place has a new ctime even when its size and mtime are put
    back (setting the mtime is itself a change the ctime records), and a file replaced by
    another has a new inode, so a checkpoint is hashed once, at planning, never per request.
    (No device number: the API and the workers may see one file system under different ones.)"""
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


class Resolutions:
    """Which label set a request resolved to, as planning recorded it: in Redis and in the
    store (``index/resolved/<identity>``), so that a job whose label set is already complete
    succeeds at once, even after Redis lost its keys and with no worker running.

    Planning hashes the checkpoint (its sha256 is in the label set's id) and records the
    identity of the request as it saw it: the dataset (name and fingerprint: one folder may be
    registered under two names, each with its own label sets), the request, and the
    checkpoint's :func:`file_signature`. A checkpoint changed in any way has a new signature,
    so a new plan (hashing it again) rather than a stale answer."""

    def __init__(self, client: redis.Redis, store: Store, ttl_seconds: int):
        self.r, self.store, self.ttl = client, store, ttl_seconds

    @staticmethod
    def identity(dataset: Dataset, request: dict[str, Any],
                 checkpoint_signature: list[str | int]) -> str:
        key = json.dumps({"dataset": dataset.name, "fingerprint": dataset.fingerprint,
                          "request": {k: v for k, v in request.items() if k not in NOT_IDENTITY},
                          "checkpoint": checkpoint_signature},
                         sort_keys=True)
        return keys.hashed(key)

    def record(self, identity: str, labelset_id: str) -> None:
        self.r.set(keys.resolved_labelset(identity), labelset_id, ex=self.ttl)
        self.store.root.require_group("index").require_group("resolved").require_group(
            identity).update_attributes({"labelset": labelset_id})

    def find(self, identity: str) -> str | None:
        found = self.r.get(keys.resolved_labelset(identity))
        if found is None:
            try:
                found = self.store.root[f"index/resolved/{identity}"].attrs["labelset"]
            except KeyError:
                return None
        return str(found)

    def complete_labelset(self, dataset: Dataset, request: dict[str, Any],
                          checkpoint_signature: list[str | int]) -> LabelSet | None:
        """The label set an earlier identical request made, if the job has nothing to do: the
        label set is ``dataset``'s, complete with its summaries recorded, and the request asks
        for no repair and no retry of failed images it has. Found in O(1) (Redis, or the store's
        index), never by reading status records: a plain job trusts the completion summary
        (a repair job checks it against them). A label set complete without its summaries
        (its last shard was written as its job was cancelled) is not done: planning the job
        records them."""
        if request.get("repair"):
            return None  # the planner checks its shards
        labelset_id = self.find(self.identity(dataset, request, checkpoint_signature))
        if labelset_id is None:
            return None
        try:
            labelset = self.store.labelset(labelset_id)
        except KeyError:
            return None
        if (labelset.dataset, labelset.dataset_fingerprint) != (dataset.name,
                                                                dataset.fingerprint):
            return None  # another dataset's (or this name's before it was registered again)
        if labelset.completion() is None or labelset.attrs.get("agreement") is None:
            return None
        if request.get("retry_failed") and (labelset.status() > 0).any():
            # Its failed images are to be labeled again: counted from the status records (one
            # read a shard, for the retry alone), not the summary, which a retry must not trust.
            return None
        return labelset


def progress_in_store(labelset: LabelSet, retry_failed: bool = False) -> dict[str, Any]:
    """A label set's progress as its shard completion records tell it; with ``retry_failed``
    the shards holding failed images count as not done (the job labels them again)."""
    summary = labelset.completion()
    if summary is not None and not retry_failed:  # complete: no status read
        return {"images_total": labelset.num_images, "shards_total": labelset.num_shards,
                "images_done": labelset.num_images, "images_failed": labelset.images_failed(),
                "shards_done": range(labelset.num_shards)}
    status = labelset.status()
    todo = set(labelset.pending_shards(status, retry_failed=retry_failed))
    done = np.ones(labelset.num_images, bool)
    for shard in todo:
        done[slice(*labelset.shard_range(shard))] = False
    counted = status[done]
    return {"images_total": labelset.num_images, "shards_total": labelset.num_shards,
            "images_done": int(counted.size), "images_failed": int((counted > 0).sum()),
            "shards_done": [s for s in range(labelset.num_shards) if s not in todo]}


def new_job_id() -> str:
    return f"job-{int(time.time() * 1000):x}-{secrets.token_hex(6)}"


@dataclass
class Job:
    id: str
    dataset: str
    request: dict[str, Any]  # {"teacher": {...}, "topk": k}
    state: str
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    labelset: str | None = None
    error: str | None = None
    images_total: int = 0
    images_done: int = 0
    images_failed: int = 0
    shards_total: int = 0
    shards_done: int = 0
    cancel_requested: bool = False
    agreement: dict[str, Any] | None = None  # the label set's, once the job succeeded

    @classmethod
    def from_hash(cls, h: dict[str, str]) -> Job:
        def opt_float(key: str) -> float | None:
            return float(h[key]) if h.get(key) else None

        return cls(
            id=h["id"], dataset=h["dataset"], request=json.loads(h["request"]), state=h["state"],
            created_at=float(h["created_at"]), started_at=opt_float("started_at"),
            finished_at=opt_float("finished_at"), labelset=h.get("labelset") or None,
            error=h.get("error") or None,
            **{k: int(h.get(k, 0)) for k in ("images_total", "images_done", "images_failed",
                                             "shards_total", "shards_done")},
            cancel_requested=h.get("cancel") == "1",
            agreement=json.loads(h["agreement"]) if h.get("agreement") else None,
        )

    def to_hash(self) -> dict[str, str | float]:
        """Its Redis record, as ``from_hash`` reads it, less the progress counts, which planning
        and the shard tasks write (``_set_progress``, ``_SHARD_DONE``). A field with no value is
        left out, not written empty: ``start`` sets ``started_at`` only where it is absent."""
        optional = {"started_at": self.started_at, "finished_at": self.finished_at,
                    "labelset": self.labelset, "error": self.error,
                    "agreement": json.dumps(self.agreement) if self.agreement is not None else None}
        return {"id": self.id, "dataset": self.dataset,
                "request": json.dumps(self.request, sort_keys=True), "state": self.state,
                "created_at": self.created_at,
                **{k: v for k, v in optional.items() if v is not None}}

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


class JobStore:
    """Jobs in Redis, mirrored to ``jobs/<id>`` in the label store."""

    def __init__(self, client: redis.Redis, store: Store, ttl_seconds: int,
                 enqueue_plan: Callable[[str], None]):
        self.r = client
        self.store = store
        self.ttl = ttl_seconds
        self.enqueue_plan = enqueue_plan  # queues a recovered job's plan (labeler_service.queue)
        self._jobs: zarr.Group | None = None
        self._shard_done = client.register_script(_SHARD_DONE)
        self._finish = client.register_script(_FINISH)
        self._mark_enqueued = client.register_script(_MARK_ENQUEUED)
        self._recover = client.register_script(_RECOVER)

    # -- keys -------------------------------------------------------------------------------

    key = staticmethod(keys.job)
    done_key = staticmethod(keys.job_shards)
    INDEX = keys.JOB_INDEX

    # -- creation and reads -----------------------------------------------------------------

    def create(self, dataset: str, request: dict[str, Any], job_id: str | None = None,
               created_at: float | None = None) -> Job:
        job = Job(id=job_id or new_job_id(), dataset=dataset, request=request, state="queued",
                  created_at=created_at or now())
        self._create(job, {"progressed_at": job.created_at})
        return job

    def create_succeeded(self, dataset: str, request: dict[str, Any],
                         labelset: LabelSet) -> Job:
        """A job whose label set is already complete: made in its final state, with one write
        of its store record (each is a small file renamed into place, and a disk's slow write
        was the tail of a POST that made the job, started it and finished it in three)."""
        at = now()
        progress = progress_in_store(labelset)
        agreement = labelset.attrs.get("agreement")
        job = Job(id=new_job_id(), dataset=dataset, request=request, state="succeeded",
                  created_at=at, started_at=at, finished_at=at, labelset=labelset.id,
                  agreement=agreement, images_total=progress["images_total"],
                  images_done=progress["images_done"],
                  images_failed=progress["images_failed"],
                  shards_total=progress["shards_total"],
                  shards_done=len(progress["shards_done"]))
        self._create(job, {
            "progressed_at": at,
            **{k: getattr(job, k) for k in ("images_total", "images_done", "images_failed",
                                            "shards_total", "shards_done")}},
            record={"state": "succeeded", "labelset": labelset.id, "finished_at": at,
                    "error": "", "agreement": agreement})
        self.r.expire(self.key(job.id), self.ttl)
        return job

    def _create(self, job: Job, fields: dict[str, Any],
                record: dict[str, Any] | None = None) -> None:
        # Redis first: if it is down the request fails and leaves nothing behind that a later
        # recovery could revive.
        pipe = self.r.pipeline()
        pipe.hset(self.key(job.id), mapping=job.to_hash() | fields)
        pipe.zadd(self.INDEX, {job.id: job.created_at})
        pipe.execute()
        try:
            self._write_record(job, **(record or {}))
        except Exception:
            self.r.delete(self.key(job.id))
            self.r.zrem(self.INDEX, job.id)
            raise

    def start_from_store(self, job_id: str, labelset: LabelSet,
                         retry_failed: bool = False) -> list[int]:
        """Count what the store already holds for this job's label set, mark the job running,
        and return the shards still to label (none: the caller completes the job)."""
        progress = progress_in_store(labelset, retry_failed)
        self.start(job_id, labelset.id, **progress)
        if len(progress["shards_done"]) == labelset.num_shards:
            return []  # O(1) for a complete label set (ImageNet-21k: 13,868 shards)
        done = set(progress["shards_done"])
        return [s for s in range(labelset.num_shards) if s not in done]

    def get(self, job_id: str) -> Job | None:
        h = self.r.hgetall(self.key(job_id))
        if h.get("id"):
            return Job.from_hash(h)
        # None, or fields without an id: a progress write that landed just after Redis lost the
        # record. Either way the store has the job; recovering it writes the record whole.
        return self.recover(job_id)

    def page(self, page_size: int, token: str | None) -> tuple[list[Job], str]:
        """Newest first. The token is an opaque cursor (created_at, id) of the last job seen.
        If Redis lost its state since jobs were last recovered (emptied, or restarted without
        persistence), the store's job records are recovered first, so none is left out."""
        if not self.r.exists(keys.RECOVERED):
            self.recover_all()
        max_score: str | float = "+inf"
        after_id = None
        if token:
            score, after_id = decode_token(token)
            max_score = score
        ids: list[str] = []
        offset = 0
        while len(ids) < page_size + 1:
            batch = self.r.zrevrangebyscore(self.INDEX, max_score, "-inf", start=offset,
                                            num=page_size + 1, withscores=True)
            if not batch:
                break
            offset += len(batch)
            for job_id, score in batch:
                if after_id is not None and score == float(max_score) and job_id >= after_id:
                    continue  # at or before the cursor among jobs created in the same ms
                ids.append(job_id)
        jobs = []
        for job_id in ids[:page_size]:
            job = self.get(job_id)
            if job is None:  # expired: drop it from the index
                self.r.zrem(self.INDEX, job_id)
            else:
                jobs.append(job)
        more = len(ids) > page_size and jobs
        return jobs, encode_token(jobs[-1].created_at, jobs[-1].id) if more else ""

    # -- transitions --------------------------------------------------------------------------

    def start(self, job_id: str, labelset: str, images_total: int, shards_total: int,
              images_done: int, images_failed: int, shards_done: Sequence[int]) -> None:
        """Planned: the label set is known and the shards already done in the store are counted."""
        self._set_progress(job_id, labelset, images_total, shards_total, images_done,
                           images_failed, shards_done, progressed_at=now())
        self.r.hsetnx(self.key(job_id), "started_at", now())  # planned again: still the first
        self.r.eval("if redis.call('HGET', KEYS[1], 'state') == 'queued' then "
                    "redis.call('HSET', KEYS[1], 'state', 'running') end", 1, self.key(job_id))
        self._update_record(job_id, labelset=labelset)

    def _set_progress(self, job_id: str, labelset: str, images_total: int, shards_total: int,
                      images_done: int, images_failed: int, shards_done: Sequence[int],
                      **extra: Any) -> None:
        pipe = self.r.pipeline()
        pipe.delete(self.done_key(job_id))
        # The set counts each shard task's result once; a job with every shard done has no shard
        # task to come, so it gets none (a complete ImageNet-21k job would add 13,868 members).
        if shards_done and len(shards_done) < shards_total:
            pipe.sadd(self.done_key(job_id), *shards_done)
        pipe.hset(self.key(job_id), mapping={
            "labelset": labelset, "images_total": images_total, "shards_total": shards_total,
            "images_done": images_done, "images_failed": images_failed,
            "shards_done": len(shards_done), **extra})
        pipe.execute()

    def shard_done(self, job_id: str, shard: int, labeled: int, failed: int) -> str | None:
        """Count a finished shard once. Then, with every shard done: ``COMPLETE_JOB`` while the
        job is running (the caller completes it: ``finish(..., "succeeded", agreement)``);
        ``LABELSET_DONE`` once, if the job had ended meanwhile (cancelled as its last shard was
        written): the caller records the label set's summaries, which no job will. Else None."""
        result = self._shard_done(keys=[self.key(job_id), self.done_key(job_id)],
                                  args=[shard, labeled, failed, now()])
        return {2: COMPLETE_JOB, 3: LABELSET_DONE}.get(result)

    def finish(self, job_id: str, state: str, error: str = "",
               agreement: dict[str, Any] | None = None) -> bool:
        """Move an active job to ``state`` (with its label set's agreement when it succeeded);
        False if it had already finished."""
        encoded = json.dumps(agreement) if agreement is not None else ""
        if not self._finish(keys=[self.key(job_id)], args=[state, now(), error, encoded]):
            return False
        self.r.expire(self.key(job_id), self.ttl)
        self.r.expire(self.done_key(job_id), self.ttl)
        self._update_record(job_id, state=state, error=error, finished_at=now(),
                            agreement=agreement)
        return True

    def request_cancel(self, job_id: str) -> Job | None:
        if not self.r.exists(self.key(job_id)) and self.get(job_id) is None:
            return None
        self.r.hset(self.key(job_id), "cancel", "1")
        self.finish(job_id, "cancelled")
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return self.r.hget(self.key(job_id), "cancel") == "1"

    # -- the durable record -----------------------------------------------------------------

    def _jobs_group(self):
        if self._jobs is None:  # a handle, kept: require_group reads the store each time
            self._jobs = self.store.root.require_group("jobs")
        return self._jobs

    def _write_record(self, job: Job, **final: Any) -> None:
        self._jobs_group().create_group(job.id, attributes={
            "id": job.id, "dataset": job.dataset, "request": job.request,
            "created_at": job.created_at, "state": "active", **final})

    def _update_record(self, job_id: str, **attrs: Any) -> None:
        try:
            record = self.store.root[f"jobs/{job_id}"]
        except KeyError:
            return
        record.update_attributes(attrs)  # one write (attrs.update writes once per key)

    def recover(self, job_id: str) -> Job | None:
        """A job Redis lost (emptied or restarted without persistence), from the store."""
        try:  # one read for this id: an unknown id lists nothing
            attrs = self.store.root[f"jobs/{job_id}"].attrs.asdict()
        except KeyError:
            return None
        state = attrs.get("state", "active")
        if state != "active" and (attrs.get("finished_at") or 0) + self.ttl < now():
            return None  # finished longer ago than jobs are kept: gone, not lost
        job = Job(id=job_id, dataset=attrs["dataset"], request=attrs["request"],
                  state="queued" if state == "active" else state,
                  created_at=attrs["created_at"], finished_at=attrs.get("finished_at"),
                  labelset=attrs.get("labelset"), error=attrs.get("error") or None,
                  agreement=attrs.get("agreement"))
        mapping = job.to_hash() | {"progressed_at": now()}
        # Written only if no record has the id: two recoverers racing create one and plan once.
        fields = [str(v) for pair in mapping.items() if pair[0] != "id" for v in pair]
        if not self._recover(keys=[self.key(job_id)], args=[job_id, *fields]):
            return Job.from_hash(self.r.hgetall(self.key(job_id)))
        self.r.zadd(self.INDEX, {job_id: job.created_at})
        if job.finished:
            if job.labelset:  # its progress, from the store's completion records
                try:
                    labelset = self.store.labelset(job.labelset)
                    self._set_progress(job_id, labelset.id, **progress_in_store(labelset))
                except KeyError:
                    pass
            self.r.expire(self.key(job_id), self.ttl)
            self.r.expire(self.done_key(job_id), self.ttl)
            return Job.from_hash(self.r.hgetall(self.key(job_id)))
        else:
            self.enqueue(job_id)
        return job

    def enqueue(self, job_id: str) -> None:
        """Queue the job's plan, then note that it was queued (``enqueued``): a job created but
        never queued (the API died between the two) is found by :meth:`requeue_unsent`."""
        self.enqueue_plan(job_id)
        self._mark_enqueued(keys=[self.key(job_id)])

    def requeue_unsent(self) -> list[str]:
        """Queue every queued job whose plan was never sent (run at API start). A plan sent
        twice is harmless: planning counts what the store holds and queues only the rest."""
        unsent = []
        for job_id in self.r.zrange(self.INDEX, 0, -1):
            state, enqueued = self.r.hmget(self.key(job_id), "state", "enqueued")
            if state == "queued" and not enqueued:
                self.enqueue(job_id)
                unsent.append(job_id)
        return unsent

    def requeue_stalled(self, in_broker: set[str] | None, stall_seconds: float) -> list[str]:
        """Plan again every active job that has made no progress for ``stall_seconds`` and has
        no task in the broker (``in_broker``: the ids of the jobs that have; None: unknown, so
        none is planned). Its task was lost (labeler_service.queue.jobs_in_broker): without this
        the job would wait for ever. Planning again is harmless: it queues only the shards the
        store does not hold."""
        if in_broker is None:
            return []
        ids = [j for j in self.r.zrange(self.INDEX, 0, -1) if j not in in_broker]
        pipe = self.r.pipeline()
        for job_id in ids:
            pipe.hmget(self.key(job_id), "state", "progressed_at", "created_at")
        stalled = []
        for job_id, (state, progressed_at, created_at) in zip(ids, pipe.execute(), strict=True):
            last = progressed_at or created_at
            if state in ACTIVE_STATES and last and now() - float(last) >= stall_seconds:
                self.r.hset(self.key(job_id), "progressed_at", now())  # once per stall period
                self.enqueue(job_id)
                stalled.append(job_id)
        return stalled

    def recover_at_start(self) -> None:
        """What the API does at start: recover the jobs Redis lost, queue those never sent."""
        recovered = self.recover_all()
        if recovered:
            log.warning("recovered %d jobs Redis had lost: %s", len(recovered), recovered)
        unsent = self.requeue_unsent()
        if unsent:
            log.warning("queued %d jobs whose plan was never sent: %s", len(unsent), unsent)

    def look_after(self, in_broker: Callable[[], set[str] | None], stall_seconds: float,
                   stop: threading.Event, retry_recovery: bool = False) -> None:
        """The API's background thread, until ``stop`` is set. First, if Redis was away at
        start, :meth:`recover_at_start` once it answers (retried with backoff: Redis may start
        after the API, and nothing orders them). Then, every quarter of the stall period,
        :meth:`requeue_stalled`, once across all the API processes sharing this Redis."""
        delay = 0.5
        while retry_recovery and not stop.wait(delay):
            try:
                self.recover_at_start()
                log.warning("Redis answers: jobs recovered")
                retry_recovery = False
            except redis.RedisError:
                delay = min(30.0, delay * 2)
            except (OSError, StoreError) as e:
                log.error("the store could not be read or written (%s); jobs not recovered", e)
                retry_recovery = False
        period = max(1.0, stall_seconds / 4)
        while not stop.wait(period):
            try:
                if self.r.set(keys.STALL_SWEEP, 1, nx=True, px=int(period * 1000)):
                    stalled = self.requeue_stalled(in_broker(), stall_seconds)
                    if stalled:
                        log.warning("planned again %d jobs with no progress for %.0f s and no "
                                    "task in the broker: %s", len(stalled), stall_seconds,
                                    stalled)
            except redis.RedisError as e:  # Redis away: /readyz says so; try again next period
                log.warning("could not look for stalled jobs: %s", e)

    def recover_all(self) -> list[str]:
        """Recover every job the store knows and Redis does not (run at API start)."""
        if "jobs" not in self.store.root.group_keys():  # no job was ever made in this store
            self.r.set(keys.RECOVERED, 1)
            return []
        group = self.store.root["jobs"]
        missing = [j for j in group.group_keys() if not self.r.exists(self.key(j))]
        recovered = [j for j in missing if self.recover(j) is not None]
        self.r.set(keys.RECOVERED, 1)  # until Redis loses its state again
        return recovered


def encode_token(score: float, job_id: str) -> str:
    raw = json.dumps([score, job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> tuple[float, str]:
    try:
        score, job_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        score = float(score)
    except Exception as e:
        raise ValueError("invalid page_token") from e
    if not math.isfinite(score):
        raise ValueError("invalid page_token")
    return score, str(job_id)
