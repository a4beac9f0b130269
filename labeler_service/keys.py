"""Every Redis key the service uses, in one place, and the clock its records are stamped with.

Redis holds only what can be rebuilt (docs/architecture.md): job state and counters, dataset
registrations, idempotency records, worker heartbeats and statistics. Everything lives under
``labeler:``, so one Redis can be shared with other applications.
"""

from __future__ import annotations

import hashlib
import time

PREFIX = "labeler:"

JOB_INDEX = f"{PREFIX}jobs"  # sorted set: job id -> created_at
REGISTRATION_INDEX = f"{PREFIX}registrations"  # set of dataset names being registered
STATS = f"{PREFIX}stats"  # hash of counters across workers, exported by the API's /metrics
WORKER_PATTERN = f"{PREFIX}worker:*"
RECOVERED = f"{PREFIX}recovered"  # set once the store's jobs are in Redis; gone if Redis is
STALL_SWEEP = f"{PREFIX}stall-sweep"  # held by the API process looking for stalled jobs


def now() -> float:
    """Wall-clock seconds: the timestamps of jobs and registrations (shared across machines)."""
    return round(time.time(), 3)


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"  # hash: the job's state and counters


def job_shards(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:shards"  # set of shards counted as done


def job_deliveries(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:deliveries"  # hash: shard -> shard task deliveries so far


def registration(name: str) -> str:
    return f"{PREFIX}registration:{name}"  # hash: one dataset's registration


def worker(hostname: str) -> str:
    return f"{PREFIX}worker:{hostname}"  # heartbeat, expires when the worker goes quiet


def idempotency(key: str) -> str:
    return f"{PREFIX}idempotency:{hashed(key)}"


def resolved_labelset(identity: str) -> str:
    return f"{PREFIX}resolved:{identity}"  # a request's identity (jobs.Resolutions) -> label set


def hashed(text: str) -> str:
    """Client-chosen text as a fixed-length key part (no delimiters, no unbounded size)."""
    return hashlib.sha256(text.encode()).hexdigest()
