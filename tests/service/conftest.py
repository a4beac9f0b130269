"""The service for real: Redis at 127.0.0.1:6379 (db 11 unless TOKENLABEL_TEST_REDIS_URL names
another, emptied per test), the API served by uvicorn in a subprocess, and ``celery worker``
subprocesses, each in its own process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from labeler_service import keys
from labeler_service.sample import make_random_checkpoint, make_sample_images
from storage import LabelSetConfig, Store, TeacherSpec

# Another db lets two test runs share one Redis server without emptying each other's.
REDIS_URL = os.environ.get("TOKENLABEL_TEST_REDIS_URL", "redis://127.0.0.1:6379/11")
API_KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    """The API and workers of one test, sharing one Redis db, store, data and checkpoints."""

    root: Path
    redis_url: str = REDIS_URL
    port: int = field(default_factory=free_port)
    api: subprocess.Popen | None = None
    workers: list[subprocess.Popen] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("LABELER_")}
        env.update({
            "LABELER_STORE": str(self.root / "store"),
            "LABELER_DATA_ROOT": str(self.root / "data"),
            "LABELER_CHECKPOINT_ROOT": str(self.root / "checkpoints"),
            "LABELER_REDIS_URL": self.redis_url,
            "LABELER_API_KEYS": API_KEY,
            "LABELER_DEVICE": "cpu",
            "LABELER_BATCH_SIZE": "2",
            "LABELER_SHARD_SIZE": "4",
            "LABELER_DECODE_WORKERS": "0",
            "LABELER_VISIBILITY_TIMEOUT": "30",
            "LABELER_TASK_TIME_LIMIT": "20",
            "LABELER_LOG_LEVEL": "WARNING",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.settings)
        return env

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=AUTH, timeout=30)

    def _spawn(self, *args: str, log: str) -> subprocess.Popen:
        out = open(self.root / log, "ab")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen([sys.executable, "-m", "labeler_service", *args], env=self.env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def start_api(self) -> None:
        self.api = self._spawn("api", "--port", str(self.port), log="api.log")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.api.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"API did not start:\n{(self.root / 'api.log').read_text()}")

    def stop_api(self) -> None:
        stop(self.api)
        self.api = None

    def start_worker(self, name: str = "w0") -> subprocess.Popen:
        """``labeler worker``, as deployed: it consumes the labeling and registration queues.
        Returns once it is ready (its first heartbeat), so tests time what it does, not its
        start."""
        proc = self._spawn("worker", "--name", f"{name}@test", log=f"{name}.log")
        self.workers.append(proc)
        client = redis.Redis.from_url(self.redis_url)
        try:
            deadline = time.monotonic() + 60
            while not client.exists(keys.worker(f"{name}@test")):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"worker {name} did not start:\n{self.log(name + '.log')}")
                time.sleep(0.05)
        finally:
            client.close()
        return proc

    def log(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_dataset(self, name: str, states=("ready", "failed"), timeout: float = 60) -> dict:
        """Poll GET /v1/datasets/{name} until its registration reaches one of ``states``."""
        with self.client() as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                dataset = client.get(f"/v1/datasets/{name}").json()
                if dataset.get("state") in states:
                    return dataset
                time.sleep(0.1)
        raise TimeoutError(f"dataset {name} still {dataset}\n{self.logs()}")

    def register(self, name: str = "toy", path: str = "toy") -> dict:
        """POST /v1/datasets, then wait until a worker has scanned the folder: the dataset."""
        with self.client() as client:
            r = client.post("/v1/datasets", json={"name": name, "path": path})
            assert r.status_code in (200, 202), r.text
        dataset = self.wait_dataset(name)
        assert dataset["state"] == "ready", dataset.get("error")
        return dataset

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in self.root.glob("*.log"))

    def wait_job(self, job_id: str, states=("succeeded", "failed", "cancelled"),
                 timeout: float = 120) -> dict:
        with self.client() as client:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                job = client.get(f"/v1/jobs/{job_id}").json()
                if job["state"] in states:
                    return job
                time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {job['state']}: {job}\n{self.logs()}")


def stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def redis_server(port: int) -> Iterator[redis.Redis]:
    """A Redis of a test's own on ``port`` (nothing kept on disk), and a client of it."""
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, decode_responses=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield client
    finally:
        client.close()
        proc.terminate()
        proc.wait()


@pytest.fixture(scope="session")
def redis_db() -> redis.Redis:
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        client.ping()
    except redis.ConnectionError as e:  # CI's .ci/run checks first; this names the cause
        raise RuntimeError(f"the service tests need Redis at {REDIS_URL}: {e}") from e
    return client


@pytest.fixture
def clean_redis(redis_db: redis.Redis) -> Iterator[redis.Redis]:
    """Redis db 11, emptied before and after the test."""
    redis_db.flushdb()
    yield redis_db
    redis_db.flushdb()


@pytest.fixture
def cluster(tmp_path: Path, redis_db: redis.Redis) -> Iterator[Cluster]:
    redis_db.flushdb()
    (tmp_path / "data").mkdir()
    make_sample_images(tmp_path / "data" / "toy", per_class=4)  # 12 images, 3 shards of 4
    make_random_checkpoint(tmp_path / "checkpoints" / "teacher.safetensors", num_classes=3)
    cluster = Cluster(tmp_path)
    yield cluster
    for proc in [cluster.api, *cluster.workers]:
        stop(proc, signal.SIGKILL)
    redis_db.flushdb()


def make_empty_labelset(store: str) -> str:
    """An empty (all pending) label set of dataset ``toy``, written straight into the store."""
    dataset = Store.open(store).dataset("toy")
    teacher = TeacherSpec(model="test_nfnet", checkpoint_sha256=None, num_classes=3,
                          input_size=64, class_names=tuple(dataset.class_names))
    return dataset.create_labelset(LabelSetConfig(
        teacher=teacher, topk=2, grid=(2, 2), dataset_fingerprint=dataset.fingerprint,
        shard_size=4)).id


JOB = {"dataset": "toy", "topk": 2,
       "teacher": {"model": "test_nfnet", "checkpoint": "teacher.safetensors", "input_size": 64}}
