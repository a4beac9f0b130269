"""Prometheus metrics: request counts and latency from this process; job, image, shard, queue
and worker figures read from Redis at scrape time, so every API replica reports the cluster."""

from __future__ import annotations

import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from labeler_service.jobs import STATES, JobStore
from labeler_service.keys import STATS, WORKER_PATTERN
from labeler_service.queue import QUEUES


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("labeler_http_requests", "HTTP requests",
                                ["method", "route", "status"], registry=r)
        self.latency = Histogram("labeler_http_request_seconds", "HTTP request latency",
                                 ["route"], registry=r,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.jobs = Gauge("labeler_jobs", "Jobs known to Redis, by state", ["state"], registry=r)
        self.images = Gauge("labeler_images_labeled", "Images labeled by the workers",
                            registry=r)
        self.shards = Gauge("labeler_shards_labeled", "Shards labeled by the workers",
                            registry=r)
        self.shard_seconds = Gauge("labeler_shard_seconds_sum",
                                   "Seconds spent labeling shards (divide by shards_labeled)",
                                   registry=r)
        self.queue = Gauge("labeler_queue_depth", "Tasks waiting, by queue (labeling: shards, "
                           "registration: dataset scans)", ["queue"], registry=r)
        self.workers = Gauge("labeler_workers", "Workers seen in the last minute", registry=r)

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self, client: redis.Redis) -> bytes:
        ids = client.zrange(JobStore.INDEX, 0, -1)
        pipe = client.pipeline()
        for job_id in ids:
            pipe.hget(JobStore.key(job_id), "state")
        states = pipe.execute() if ids else []
        for state in STATES:
            self.jobs.labels(state).set(sum(1 for s in states if s == state))
        stats = client.hgetall(STATS)
        self.images.set(float(stats.get("images_labeled", 0)))
        self.shards.set(float(stats.get("shards_labeled", 0)))
        self.shard_seconds.set(float(stats.get("shard_seconds_sum", 0)))
        for queue in QUEUES:
            self.queue.labels(queue).set(client.llen(queue))
        self.workers.set(sum(1 for _ in client.scan_iter(WORKER_PATTERN, count=1000)))
        return generate_latest(self.registry)
