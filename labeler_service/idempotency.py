"""``Idempotency-Key`` for ``POST /v1/jobs``: a retried request gets the job the first one made.

A key is claimed *in flight* for seconds only: if the API dies mid-request, a retry soon goes
through instead of answering "in progress" for a day. Once the job is created and queued, the key
records it for ``RECORDED_TTL``; a key is never recorded for a job that was not queued.
"""

from __future__ import annotations

import json

import redis

from labeler_service import keys

IN_FLIGHT_TTL = 30  # seconds: longer than a POST takes, short enough for a client's retry
RECORDED_TTL = 24 * 3600


class IdempotencyConflict(Exception):
    """The key cannot be used for this request now; ``status`` is the HTTP answer."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class IdempotencyKeys:
    def __init__(self, client: redis.Redis):
        self.r = client

    def claim(self, key: str, fingerprint: str) -> str | None:
        """The job id an earlier request with this key made, or None if this request is the
        first (the key is then in flight). ``fingerprint`` identifies the request body."""
        redis_key = keys.idempotency(key)
        if self.r.set(redis_key, json.dumps({"body": fingerprint, "job": ""}), nx=True,
                      ex=IN_FLIGHT_TTL):
            return None
        seen = json.loads(self.r.get(redis_key) or "{}")
        if seen.get("body") != fingerprint:
            raise IdempotencyConflict(422, "this Idempotency-Key was used with another request "
                                           "body")
        if not seen.get("job"):
            raise IdempotencyConflict(409, "a request with this Idempotency-Key is still in "
                                           "progress")
        return seen["job"]

    def record(self, key: str, fingerprint: str, job_id: str) -> None:
        self.r.set(keys.idempotency(key), json.dumps({"body": fingerprint, "job": job_id}),
                   ex=RECORDED_TTL)

    def release(self, key: str) -> None:
        """The request failed before making a job: a retry with the key may go through now."""
        self.r.delete(keys.idempotency(key))
