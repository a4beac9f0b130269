"""The REST API in-process: FastAPI's TestClient over ``create_app``, the real Redis (db 11, or
LABELER_TEST_API_REDIS_URL), no workers (submitted jobs stay queued; dataset registrations are
run here, with the task's own function, where a test needs them done). Status codes, headers and
RFC 9457 problem bodies."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from fastapi.testclient import TestClient

from labeler_service.api.main import create_app
from labeler_service.api.schemas import JobCreate
from labeler_service.jobs import Job
from labeler_service.queue import REGISTRATION_QUEUE, configure, enqueue_plan
from labeler_service.queue import app as celery_app
from labeler_service.registrations import describe, run_registration
from labeler_service.sample import make_sample_images
from labeler_service.settings import Settings
from storage import Store, StoreError
from tests.service.conftest import (
    JOB,
    REDIS_URL,
    free_port,
    make_empty_labelset,
    redis_server,
)

# db 11 like the other service tests; another db when sessions share one Redis at the same time.
REDIS_URL = os.environ.get("LABELER_TEST_API_REDIS_URL", REDIS_URL)

KEYS = ("k1", "k2")
AUTH = {"Authorization": "Bearer k1"}
PROBLEM = "application/problem+json"
MAX_BODY = 2048
DATASET = {"name": "toy", "path": "toy"}


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    """``r`` is an RFC 9457 problem with this status; its body."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert {"type", "title", "status", "detail"} <= body.keys(), body
    assert body["status"] == status and isinstance(body["title"], str) and body["title"]
    assert body["detail"]
    return body


def assert_validation_problem(r: httpx.Response) -> list[dict[str, Any]]:
    """A 422 from request validation: the problem carries ``errors``, each with a ``loc``."""
    body = assert_problem(r, 422)
    assert body["errors"], body
    for error in body["errors"]:
        assert isinstance(error["loc"], list) and error["loc"], error
        assert error["msg"] and error["type"], error
    return body["errors"]


def error_locs(r: httpx.Response) -> list[list]:
    return [e["loc"] for e in assert_validation_problem(r)]


    client.close()


@pytest.fixture
def root(tmp_path: Path, checkpoint: Path) -> Path:
    """data/toy (3 classes x 4 images), checkpoints/teacher.safetensors (3 classes), no store."""
    make_sample_images(tmp_path / "data" / "toy", per_class=4)
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(checkpoint, tmp_path / "checkpoints" / "teacher.safetensors")
    return tmp_path


@pytest.fixture
def settings_for(root: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        values = {"store": str(root / "store"), "data_root": root / "data",
                  "checkpoint_root": root / "checkpoints", "redis_url": REDIS_URL,
                  "api_keys": ",".join(KEYS), "api_keys_file": None,
                  "max_body_bytes": MAX_BODY, **overrides}
        return Settings(**values)

    return make


@pytest.fixture
def start(settings_for: Callable[..., Settings], clean_redis: redis.Redis
          ) -> Callable[..., AbstractContextManager[TestClient]]:
    """``with start(**settings) as client``: the app with its lifespan running."""

    @contextmanager
    def started(**overrides: Any) -> Iterator[TestClient]:
        app = create_app(settings_for(**overrides))
        with TestClient(app, headers=AUTH) as client:
            yield client

    return started


@pytest.fixture
def client(start) -> Iterator[TestClient]:
    with start() as client:
        yield client


def run_registration_here(client: TestClient, name: str) -> str | None:
    """What a worker's ``labeler.register_dataset`` task does, in this process: scan and write
    the registration ``name`` in progress. Returns the state it ended in."""
    state = client.app.state
    registration = state.registrations.get(name)
    assert registration is not None, name
    return run_registration(state.registrations, state.store, state.settings.data_root, name,
                            registration.attempt, time_limit=state.settings.task_time_limit)


def register(client: TestClient, body: dict | None = None) -> httpx.Response:
    """POST /v1/datasets (202), the scan run here, then GET the dataset."""
    body = DATASET if body is None else body
    r = client.post("/v1/datasets", json=body)
    assert r.status_code == 202, r.text
    run_registration_here(client, body["name"])
    return client.get(r.headers["location"])


@pytest.fixture
def registered(client: TestClient) -> TestClient:
    """The client, with dataset ``toy`` registered."""
    assert register(client).json()["state"] == "ready"
    return client


def submit(client: TestClient, body: dict | None = None, **headers: str) -> httpx.Response:
    return client.post("/v1/jobs", json=JOB if body is None else body, headers=headers)


def job_with(**changes: Any) -> dict:
    teacher = {**JOB["teacher"], **changes.pop("teacher", {})}
    return {**JOB, "teacher": teacher, **changes}


def list_all_jobs(client: TestClient) -> list[dict]:
    r = client.get("/v1/jobs", params={"page_size": 500})
    assert r.status_code == 200, r.text
    assert r.json()["next_page_token"] == ""
    return r.json()["jobs"]


# -- authentication ---------------------------------------------------------------------------


@pytest.mark.parametrize("authorization", [
    None, "Bearer wrong", "Bearer ", "Bearer k1x", "Basic azE6azE=", "Token k1", "k1"])
def test_v1_needs_a_valid_bearer_key(client: TestClient, authorization: str | None):
    headers = {"Authorization": authorization} if authorization is not None else {}
    anonymous = TestClient(client.app, headers=headers)  # the app's lifespan is already running
    for method, path in [("GET", "/v1/datasets"), ("GET", "/v1/jobs"), ("POST", "/v1/jobs"),
                         ("GET", "/v1/labelsets/anything"), ("GET", "/v1/datasets/toy")]:
        r = anonymous.request(method, path, json=JOB if method == "POST" else None)
        assert_problem(r, 401)
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("key", KEYS)
def test_every_configured_key_works(client: TestClient, key: str):
    r = client.get("/v1/datasets", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    assert r.json() == {"datasets": [], "next_page_token": ""}


def test_probes_and_metrics_need_no_key(client: TestClient):
    anonymous = TestClient(client.app)
    assert anonymous.get("/healthz").text == "ok"
    assert anonymous.get("/readyz").text == "ready"
    assert anonymous.get("/metrics").status_code == 200


def test_no_configured_keys_means_every_v1_route_is_401(start):
    with start(api_keys="") as client:
        v1 = [(method.upper(), path) for path, ops in client.app.openapi()["paths"].items()
              if path.startswith("/v1") for method in ops]
        assert len(v1) >= 9, v1
        for method, template in v1:
            path = (template.replace("{name}", "toy").replace("{job_id}", "job-1-2")
                    .replace("{labelset_id}", "ls").replace("{index}", "0"))
            for key in ("", *KEYS):
                r = client.request(method, path, headers={"Authorization": f"Bearer {key}"},
                                   json=JOB if method == "POST" else None)
                assert_problem(r, 401)
                assert r.headers["www-authenticate"] == "Bearer"
        assert client.get("/healthz").status_code == 200


# -- 404 --------------------------------------------------------------------------------------


def make_labelset(settings: Settings) -> str:
    return make_empty_labelset(settings.store)


def test_unknown_resources_are_404(registered: TestClient):
    assert "'nope'" in assert_problem(registered.get("/v1/datasets/nope"), 404)["detail"]
    assert_problem(registered.get("/v1/jobs/job-18f00000000-0123456789ab"), 404)
    assert_problem(registered.get("/v1/labelsets/no-such-labelset"), 404)
    assert_problem(registered.get("/v1/labelsets/no-such-labelset/images/0"), 404)
    assert_problem(registered.get("/v1/labelsets/no-such-labelset/images/0/heatmap.png"), 404)
    assert_problem(submit(registered, job_with(dataset="nope")), 404)
    assert_problem(registered.get("/v1/no-such-route"), 404)


def test_image_index_past_the_end_is_404(registered: TestClient):
    labelset_id = make_labelset(registered.app.state.settings)
    r = registered.get(f"/v1/labelsets/{labelset_id}")
    assert r.status_code == 200, r.text
    assert r.json()["num_images"] == 12 and not r.json()["complete"]
    last = registered.get(f"/v1/labelsets/{labelset_id}/images/11")
    assert last.status_code == 200, last.text
    assert last.json()["status"] == -1 and last.json()["lse"] == [[None, None], [None, None]]
    for index in (12, 13, 10**12):
        assert_problem(registered.get(f"/v1/labelsets/{labelset_id}/images/{index}"), 404)
        assert_problem(registered.get(f"/v1/labelsets/{labelset_id}/images/{index}/heatmap.png"),
                       404)
    assert_validation_problem(registered.get(f"/v1/labelsets/{labelset_id}/images/-1"))
    # Not labeled yet: a heatmap has nothing to show.
    assert_problem(registered.get(f"/v1/labelsets/{labelset_id}/images/0/heatmap.png"), 409)


# -- 400: paths outside their root ------------------------------------------------------------

ESCAPES = ["../x", "a/../../x", "..", "toy/../../x", "/etc", "/", "//etc/passwd"]


@pytest.mark.parametrize("path", ESCAPES)
def test_dataset_path_outside_the_data_root_is_400(client: TestClient, path: str):
    assert_problem(client.post("/v1/datasets", json={"name": "esc", "path": path}), 400)
    assert client.get("/v1/datasets").json() == {"datasets": [], "next_page_token": ""}


def test_dataset_symlink_out_of_the_data_root_is_400(client: TestClient, root: Path):
    outside = make_sample_images(root / "outside", per_class=1)
    os.symlink(outside, root / "data" / "link")
    os.symlink("../outside", root / "data" / "relative-link")
    for path in ("link", "relative-link", "link/circles"):
        assert_problem(client.post("/v1/datasets", json={"name": "esc", "path": path}), 400)
    # A link that stays inside the root is followed.
    os.symlink("toy", root / "data" / "inside-link")
    r = register(client, {"name": "inside", "path": "inside-link"})
    assert r.json()["state"] == "ready" and r.json()["num_images"] == 12, r.text


@pytest.mark.parametrize("escape", ESCAPES)
def test_checkpoint_outside_the_checkpoint_root_is_400(registered: TestClient, escape: str):
    assert_problem(submit(registered, job_with(teacher={"checkpoint": escape})), 400)
    assert list_all_jobs(registered) == []


def test_checkpoint_symlink_out_of_the_checkpoint_root_is_400(registered: TestClient,
                                                              root: Path):
    outside = root / "outside.safetensors"
    shutil.copy(root / "checkpoints" / "teacher.safetensors", outside)
    os.symlink(outside, root / "checkpoints" / "link.safetensors")
    r = submit(registered, job_with(teacher={"checkpoint": "link.safetensors"}))
    assert "outside" in assert_problem(r, 400)["detail"]
    # The same file reached through "..": refused too.
    r = submit(registered, job_with(teacher={"checkpoint": "../outside.safetensors"}))
    assert_problem(r, 400)
    assert list_all_jobs(registered) == []


# -- paths the filesystem refuses: a client error, never a 500 ----------------------------------


def assert_client_error(r: httpx.Response, root: Path) -> None:
    assert r.status_code in (400, 404, 409, 422), r.text
    assert_problem(r, r.status_code)
    assert str(root) not in r.text  # no server path in what clients see


# A name longer than NAME_MAX (255): within the schema's max_length, but stat() says ENAMETOOLONG.
@pytest.mark.parametrize("path", ["a" * 256, "toy/" + "b" * 300])
def test_dataset_path_too_long_for_the_filesystem(client: TestClient, root: Path, path: str):
    assert_client_error(client.post("/v1/datasets", json={"name": "long", "path": path}), root)


@pytest.mark.parametrize("path", ["a" * 256, "a" * 1000 + ".safetensors"])
def test_checkpoint_path_too_long_for_the_filesystem(registered: TestClient, root: Path,
                                                     path: str):
    assert_client_error(submit(registered, job_with(teacher={"checkpoint": path})), root)


def test_symlink_loop_in_the_data_root(client: TestClient, root: Path):
    os.symlink("loop", root / "data" / "loop")
    os.symlink("pong", root / "data" / "ping")
    os.symlink("ping", root / "data" / "pong")
    for path in ("loop", "ping", "loop/x"):
        assert_client_error(client.post("/v1/datasets", json={"name": "loop", "path": path}),
                            root)


def test_symlink_loop_in_the_checkpoint_root(registered: TestClient, root: Path):
    os.symlink("loop.pth", root / "checkpoints" / "loop.pth")
    assert_client_error(submit(registered, job_with(teacher={"checkpoint": "loop.pth"})), root)


def test_dangling_image_symlink_in_a_dataset_is_skipped(client: TestClient, root: Path):
    folder = make_sample_images(root / "data" / "dangling", per_class=1)
    os.symlink(root / "data" / "gone.jpg", folder / "circles" / "gone.jpg")
    r = register(client, {"name": "dangling", "path": "dangling"})
    assert r.json()["state"] == "ready" and r.json()["num_images"] == 3  # not a file: not listed


def test_image_symlink_out_of_the_data_root_is_refused(client: TestClient, root: Path,
                                                        tmp_path_factory):
    outside = make_sample_images(tmp_path_factory.mktemp("outside"), per_class=1)
    folder = make_sample_images(root / "data" / "escape", per_class=1)
    os.symlink(outside / "circles" / "0000.jpg", folder / "circles" / "link.jpg")
    r = register(client, {"name": "escape", "path": "escape"})
    escape = r.json()
    assert escape["state"] == "failed" and "retry-after" not in r.headers, escape
    assert "circles/link.jpg" in escape["error"] and "outside the data root" in escape["error"]
    assert escape["num_images"] is None and escape["fingerprint"] is None
    assert Store.open(client.app.state.settings.store).dataset_names() == []
    # A job on it is refused with the reason; registering again (fixed) starts a new scan.
    r = submit(client, job_with(dataset="escape"))
    assert "outside the data root" in assert_problem(r, 409)["detail"]
    os.unlink(folder / "circles" / "link.jpg")
    again = register(client, {"name": "escape", "path": "escape"}).json()
    assert again["state"] == "ready" and again["num_images"] == 3 and again["error"] is None


# -- 413 ---------------------------------------------------------------------------------------


def big_body() -> bytes:
    body = json.dumps({"name": "toy", "path": "x" * 4096}).encode()
    assert len(body) > 2 * MAX_BODY
    return body


def test_body_over_the_limit_with_content_length_is_413(client: TestClient):
    r = client.post("/v1/datasets", content=big_body(),
                    headers={"Content-Type": "application/json"})
    assert r.request.headers["content-length"] == str(len(big_body()))
    assert "2048" in assert_problem(r, 413)["detail"]
    r = client.post("/v1/jobs", content=big_body(), headers={"Content-Type": "application/json"})
    assert_problem(r, 413)


def test_body_over_the_limit_chunked_is_413(client: TestClient):
    body = big_body()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 512):
            yield body[i:i + 512]

    r = client.post("/v1/datasets", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in r.request.headers
    assert_problem(r, 413)


def test_body_under_the_limit_chunked_is_read(client: TestClient):
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "toy", '
        yield b'"path": "toy"}'

    r = client.post("/v1/datasets", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 202, r.text


# -- 422 ---------------------------------------------------------------------------------------


def test_dataset_validation_errors(client: TestClient):
    assert ["body", "path"] in error_locs(client.post("/v1/datasets", json={"name": "x"}))
    assert ["body", "name"] in error_locs(client.post("/v1/datasets", json={"path": "toy"}))
    assert ["body"] in error_locs(client.post("/v1/datasets"))
    assert ["body", "path"] in error_locs(
        client.post("/v1/datasets", json={"name": "toy", "path": 3}))
    assert ["body", "colour"] in error_locs(
        client.post("/v1/datasets", json={**DATASET, "colour": "red"}))  # extra=forbid
    for name in ("-toy", ".toy", "to y", "toy/x", "", "x" * 129, "tøy"):
        r = client.post("/v1/datasets", json={"name": name, "path": "toy"})
        assert ["body", "name"] in error_locs(r), name
    assert ["body", "path"] in error_locs(client.post("/v1/datasets", json={"name": "t",
                                                                            "path": ""}))
    assert error_locs(client.post("/v1/datasets", content=b"{not json",
                                  headers={"Content-Type": "application/json"}))
    assert client.get("/v1/datasets").json() == {"datasets": [], "next_page_token": ""}


def test_dataset_path_that_is_not_a_directory_is_422(client: TestClient):
    for path in ("toy/circles/0000.jpg", "missing", "toy/missing"):
        r = client.post("/v1/datasets", json={"name": "t", "path": path})
        assert path in assert_problem(r, 422)["detail"]


@pytest.mark.parametrize(("body", "loc"), [
    ({k: v for k, v in JOB.items() if k != "teacher"}, ["body", "teacher"]),
    ({k: v for k, v in JOB.items() if k != "dataset"}, ["body", "dataset"]),
    (job_with(teacher={"input_size": "big"}), ["body", "teacher", "input_size"]),
    (job_with(teacher={"input_size": 10}), ["body", "teacher", "input_size"]),
    (job_with(teacher={"input_size": 4096}), ["body", "teacher", "input_size"]),
    (job_with(topk=0), ["body", "topk"]),
    (job_with(topk=1001), ["body", "topk"]),
    (job_with(topk="two"), ["body", "topk"]),
    (job_with(priority=1), ["body", "priority"]),
    (job_with(teacher={"colour": "red"}), ["body", "teacher", "colour"]),
    (job_with(dataset="-toy"), ["body", "dataset"]),
    (job_with(teacher={"model": "Test NFNet"}), ["body", "teacher", "model"]),
    ({**JOB, "teacher": "test_nfnet"}, ["body", "teacher"]),
])
def test_job_validation_errors(registered: TestClient, body: dict, loc: list):
    assert loc in error_locs(submit(registered, body))
    assert list_all_jobs(registered) == []


def test_job_with_a_missing_checkpoint_or_unknown_model_is_422(registered: TestClient):
    for checkpoint in ("missing.safetensors", "sub/missing.pth", "."):
        r = submit(registered, job_with(teacher={"checkpoint": checkpoint}))
        assert "checkpoint" in assert_problem(r, 422)["detail"]
    r = submit(registered, job_with(teacher={"model": "no_such_model"}))
    assert "no_such_model" in assert_problem(r, 422)["detail"]
    assert list_all_jobs(registered) == []


# -- datasets ---------------------------------------------------------------------------------


def registration_record(redis_db: redis.Redis, name: str) -> dict[str, str]:
    return redis_db.hgetall(f"labeler:registration:{name}")


def test_register_is_202_then_registering_then_ready(client: TestClient, root: Path,
                                                      clean_redis: redis.Redis):
    r = client.post("/v1/datasets", json=DATASET)
    assert r.status_code == 202, r.text
    assert r.headers["location"] == "/v1/datasets/toy" and int(r.headers["retry-after"]) > 0
    pending = r.json()
    assert pending == {"name": "toy", "state": "registering", "num_images": None,
                       "class_names": None, "fingerprint": None, "created_at": None,
                       "labelsets": [], "files_scanned": 0, "files_total": None, "error": None,
                       "skipped_names": None}
    assert clean_redis.llen(REGISTRATION_QUEUE) == 1  # queued for a worker, not scanned here
    assert clean_redis.llen("labeling") == 0  # not in front of (or behind) shard tasks

    polled = client.get("/v1/datasets/toy")
    assert polled.json() == pending and int(polled.headers["retry-after"]) > 0
    assert client.get("/v1/datasets").json() == {"datasets": [pending], "next_page_token": ""}
    # While it registers: the same folder is the same registration, another folder a conflict,
    # and a job on it is refused.
    again = client.post("/v1/datasets", json=DATASET)
    assert again.status_code == 202 and again.json() == pending
    assert client.post("/v1/datasets", json={"name": "toy", "path": "./toy/"}).status_code == 202
    assert clean_redis.llen(REGISTRATION_QUEUE) == 1
    other = client.post("/v1/datasets", json={"name": "toy", "path": "toy/circles"})
    assert "another folder" in assert_problem(other, 409)["detail"]
    r = submit(client)
    assert "still registering" in assert_problem(r, 409)["detail"]
    assert list_all_jobs(client) == []

    assert run_registration_here(client, "toy") == "ready"
    r = client.get("/v1/datasets/toy")
    ready = r.json()
    assert r.status_code == 200 and "retry-after" not in r.headers
    assert ready["state"] == "ready" and ready["error"] is None
    assert ready["num_images"] == ready["files_scanned"] == ready["files_total"] == 12
    assert ready["class_names"] == ["circles", "squares", "stripes"]
    assert ready["labelsets"] == [] and ready["created_at"]
    # The same dataset `labeler datasets add` (Store.add_dataset in-process) makes.
    local = Store.open(root / "local")
    expected, _ = local.add_dataset("toy", root / "data" / "toy")
    assert ready["fingerprint"] == expected.fingerprint
    assert client.get("/v1/datasets").json() == {"datasets": [ready], "next_page_token": ""}

    # Ready: the same folder again is the dataset (200, no new scan); another folder a conflict.
    again = client.post("/v1/datasets", json=DATASET)
    assert again.status_code == 200, again.text
    assert again.json() == ready and again.headers["location"] == "/v1/datasets/toy"
    assert "retry-after" not in again.headers
    assert clean_redis.llen(REGISTRATION_QUEUE) == 1
    other = client.post("/v1/datasets", json={"name": "toy", "path": "toy/circles"})
    assert "already registered" in assert_problem(other, 409)["detail"]
    assert submit(client).status_code == 202

    # The same folder under a second name is a second dataset.
    second = register(client, {"name": "toy2", "path": "toy"}).json()
    assert second["state"] == "ready" and second["fingerprint"] == ready["fingerprint"]
    names = [d["name"] for d in client.get("/v1/datasets").json()["datasets"]]
    assert names == ["toy", "toy2"]


def test_concurrent_posts_queue_one_scan(client: TestClient, clean_redis: redis.Redis):
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/datasets", json=DATASET), range(16)))
    assert [r.status_code for r in answers] == [202] * 16, [r.text for r in answers]
    assert clean_redis.llen(REGISTRATION_QUEUE) == 1
    assert run_registration_here(client, "toy") == "ready"
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: client.post("/v1/datasets", json=DATASET), range(8)))
    assert {r.status_code for r in answers} == {200}
    assert clean_redis.llen(REGISTRATION_QUEUE) == 1


def test_registration_lost_by_redis_store_says_ready(registered: TestClient,
                                                     clean_redis: redis.Redis):
    ready = registered.get("/v1/datasets/toy").json()
    clean_redis.flushdb()
    assert registered.get("/v1/datasets/toy").json() == ready
    assert registered.get("/v1/datasets").json() == {"datasets": [ready], "next_page_token": ""}
    assert registered.post("/v1/datasets", json=DATASET).status_code == 200
    assert submit(registered).status_code == 202


def test_a_registration_stuck_past_the_visibility_timeout_is_queued_again(
        client: TestClient, clean_redis: redis.Redis):
    assert client.post("/v1/datasets", json=DATASET).status_code == 202
    first = registration_record(clean_redis, "toy")
    # Its task was lost (a purged queue, a broker restarted without the message): no heartbeat.
    timeout = client.app.state.settings.visibility_timeout
    clean_redis.hset("labeler:registration:toy", "updated_at", time.time() - timeout - 5)
    # Clients see it failed (lost), not registering for ever; a job on it says why.
    seen = client.get("/v1/datasets/toy")
    assert seen.json()["state"] == "failed" and "lost" in seen.json()["error"]
    assert "retry-after" not in seen.headers
    assert client.get("/v1/datasets").json()["datasets"][0]["state"] == "failed"
    assert "lost" in assert_problem(submit(client), 409)["detail"]
    # Even from another folder it can be registered again (a lost one holds no name).
    lost_elsewhere = client.post("/v1/datasets", json={"name": "toy", "path": "toy/circles"})
    assert lost_elsewhere.status_code == 202
    clean_redis.hset("labeler:registration:toy", "updated_at", time.time() - timeout - 5)
    r = client.post("/v1/datasets", json=DATASET)
    assert r.status_code == 202 and r.json()["state"] == "registering"
    second = registration_record(clean_redis, "toy")
    assert second["attempt"] != first["attempt"]
    assert clean_redis.llen(REGISTRATION_QUEUE) == 3
    # The old task, should it still come, does nothing; the new one registers.
    state = client.app.state
    assert run_registration(state.registrations, state.store, state.settings.data_root, "toy",
                            first["attempt"]) is None
    assert registration_record(clean_redis, "toy")["state"] == "registering"
    assert run_registration_here(client, "toy") == "ready"
    assert client.get("/v1/datasets/toy").json()["state"] == "ready"


def test_redis_emptied_mid_scan_the_dataset_is_still_written(client: TestClient,
                                                             clean_redis: redis.Redis):
    assert client.post("/v1/datasets", json=DATASET).status_code == 202
    state = client.app.state
    attempt = state.registrations.get("toy").attempt
    looks = 0

    def clock() -> float:  # each look 2 s later (a progress write each time); Redis lost at 3
        nonlocal looks
        looks += 1
        if looks == 3:
            clean_redis.flushdb()
        return looks * 2.0

    assert run_registration(state.registrations, state.store, state.settings.data_root, "toy",
                            attempt, clock=clock) == "ready"
    assert looks > 3
    assert client.get("/v1/datasets/toy").json()["num_images"] == 12  # the store says ready


def test_a_scan_past_its_deadline_fails_with_advice(client: TestClient):
    assert client.post("/v1/datasets", json=DATASET).status_code == 202
    state = client.app.state
    ticks = iter(range(0, 10**6, 7))  # every look at the clock: 7 s later
    result = run_registration(state.registrations, state.store, state.settings.data_root, "toy",
                              state.registrations.get("toy").attempt, time_limit=20,
                              clock=lambda: next(ticks))
    assert result == "failed"
    failed = client.get("/v1/datasets/toy").json()
    assert failed["state"] == "failed" and "LABELER_VISIBILITY_TIMEOUT" in failed["error"]
    # Failed: the next POST starts a new registration.
    assert register(client).json()["state"] == "ready"


def test_a_scan_longer_than_one_task_goes_on_in_the_next(client: TestClient,
                                                          clean_redis: redis.Redis, root: Path):
    """Each task pauses at its deadline with the rows hashed so far kept in the store; the next
    task for the attempt goes on from them, so no folder is too big for one time limit."""
    assert client.post("/v1/datasets", json=DATASET).status_code == 202
    state = client.app.state
    attempt = state.registrations.get("toy").attempt
    states, scanned = [], []
    while not states or states[-1] == "paused":
        ticks = iter(range(10**6))  # each look at the clock 1 s later; the deadline at 9 s
        states.append(run_registration(state.registrations, state.store,
                                       state.settings.data_root, "toy", attempt, time_limit=10,
                                       clock=ticks.__next__))
        record = registration_record(clean_redis, "toy")
        scanned.append(int(record["files_scanned"]))
        if states[-1] == "paused":
            assert record["state"] == "registering" and record["attempt"] == attempt
            assert len(state.store.partial_scan("toy", attempt)) == scanned[-1]
    assert len(states) >= 3 and states[-1] == "ready" and set(states[:-1]) == {"paused"}
    assert scanned == sorted(scanned) and len(set(scanned)) == len(scanned)  # each went on
    dataset = client.get("/v1/datasets/toy").json()
    assert dataset["state"] == "ready" and dataset["num_images"] == 12
    direct, _ = Store.open(root / "direct").add_dataset("toy", state.store.dataset(
        "toy").source_root)
    assert state.store.dataset("toy").fingerprint == direct.fingerprint


def test_a_folder_gone_before_the_scan_fails(client: TestClient, root: Path):
    folder = make_sample_images(root / "data" / "brief", per_class=1)
    assert client.post("/v1/datasets", json={"name": "brief", "path": "brief"}).status_code == 202
    shutil.rmtree(folder)
    assert run_registration_here(client, "brief") == "failed"
    failed = client.get("/v1/datasets/brief").json()
    assert failed["state"] == "failed" and "not a directory" in failed["error"]
    assert client.get("/v1/datasets").json()["datasets"] == [failed]


def test_an_unreadable_subdirectory_fails_the_registration(client: TestClient, root: Path,
                                                            monkeypatch: pytest.MonkeyPatch):
    make_sample_images(root / "data" / "locked", per_class=1)
    real_scandir = os.scandir

    def scandir(path):  # chmod 0 would not stop these tests when they run as root
        if str(path).endswith("squares"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    failed = register(client, {"name": "locked", "path": "locked"}).json()
    assert failed["state"] == "failed", failed
    assert failed["error"] == "cannot read the folder: [Errno 13] Permission denied: " \
                              "'locked/squares'"  # not a smaller dataset; no server paths


# -- jobs -------------------------------------------------------------------------------------


def test_submit_is_202_with_location_and_retry_after(registered: TestClient):
    r = submit(registered)
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    assert int(r.headers["retry-after"]) > 0
    assert job["state"] == "queued" and job["dataset"] == "toy"
    assert job["request"] == {"teacher": JOB["teacher"], "topk": 2,
                              "ignore_dataset_classes": False, "retry_failed": False,
                              "repair": False}
    assert job["created_at"] and job["started_at"] is None and job["finished_at"] is None
    assert job["labelset"] is None and job["error"] is None

    polled = registered.get(r.headers["location"])
    assert polled.status_code == 200
    assert polled.json() == job
    assert int(polled.headers["retry-after"]) > 0


def idempotent(client: TestClient, key: str, body: dict | None = None) -> httpx.Response:
    return submit(client, body, **{"Idempotency-Key": key})


def test_idempotency_key_replays_the_same_job(registered: TestClient):
    first = idempotent(registered, "order-1")
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]

    again = idempotent(registered, "order-1")
    assert again.status_code == 202, again.text
    assert again.json()["id"] == job_id
    assert again.headers["location"] == f"/v1/jobs/{job_id}"
    # The same request spelled with its defaults is the same request.
    explicit = idempotent(registered, "order-1", {**JOB, "ignore_dataset_classes": False})
    assert explicit.json()["id"] == job_id
    assert [j["id"] for j in list_all_jobs(registered)] == [job_id]

    other_body = idempotent(registered, "order-1", job_with(topk=3))
    assert "Idempotency-Key" in assert_problem(other_body, 422)["detail"]
    assert [j["id"] for j in list_all_jobs(registered)] == [job_id]

    second_key = idempotent(registered, "order-2")
    assert second_key.status_code == 202 and second_key.json()["id"] != job_id
    no_key = submit(registered)
    assert no_key.status_code == 202
    ids = {j["id"] for j in list_all_jobs(registered)}
    assert ids == {job_id, second_key.json()["id"], no_key.json()["id"]}


def test_idempotency_key_still_in_flight_is_409(registered: TestClient,
                                                clean_redis: redis.Redis):
    key = "order-in-flight"
    fingerprint = hashlib.sha256(json.dumps(JobCreate(**JOB).model_dump(),
                                            sort_keys=True).encode()).hexdigest()
    redis_key = f"labeler:idempotency:{hashlib.sha256(key.encode()).hexdigest()}"
    clean_redis.set(redis_key, json.dumps({"body": fingerprint, "job": ""}), ex=60)
    assert "in progress" in assert_problem(idempotent(registered, key), 409)["detail"]
    assert list_all_jobs(registered) == []
    # Another body under that key is still a misuse of the key.
    assert_problem(idempotent(registered, key, job_with(topk=3)), 422)
    # Once the first request records its job, the key replays it.
    job_id = submit(registered).json()["id"]
    clean_redis.set(redis_key, json.dumps({"body": fingerprint, "job": job_id}), ex=60)
    assert idempotent(registered, key).json()["id"] == job_id


def test_idempotency_key_is_stored_with_an_expiry(registered: TestClient,
                                                  clean_redis: redis.Redis):
    assert idempotent(registered, "order-ttl").status_code == 202
    keys = clean_redis.keys("labeler:idempotency:*")
    assert len(keys) == 1
    assert 0 < clean_redis.ttl(keys[0]) <= 24 * 3600


def test_idempotency_key_longer_than_255_is_422(registered: TestClient):
    assert error_locs(idempotent(registered, "k" * 256)) == [["header", "idempotency-key"]]


# -- pagination -------------------------------------------------------------------------------


def pages(client: TestClient, page_size: int) -> list[list[dict]]:
    out, token = [], None
    while True:
        params = {"page_size": page_size, **({"page_token": token} if token else {})}
        r = client.get("/v1/jobs", params=params)
        assert r.status_code == 200, r.text
        out.append(r.json()["jobs"])
        token = r.json()["next_page_token"]
        if not token:
            return out
        assert len(out) < 20, "pagination does not end"


def assert_newest_first(jobs: list[dict]) -> None:
    keys = [(j["created_at"], j["id"]) for j in jobs]
    assert keys == sorted(keys, reverse=True)


def test_pagination_newest_first_without_gaps_or_duplicates(registered: TestClient):
    created = [submit(registered).json()["id"] for _ in range(7)]
    got = pages(registered, 3)
    assert [len(p) for p in got] == [3, 3, 1]
    listed = [j["id"] for p in got for j in p]
    assert len(set(listed)) == 7 and set(listed) == set(created)
    assert_newest_first([j for p in got for j in p])
    assert [j["id"] for j in list_all_jobs(registered)] == listed
    # A page exactly as large as what is left ends the listing: no empty page after it.
    assert [[j["id"] for j in p] for p in pages(registered, 7)] == [listed]
    assert [len(p) for p in pages(registered, 1)] == [1] * 7


def test_pagination_of_jobs_created_in_the_same_millisecond(registered: TestClient):
    jobs = registered.app.state.jobs
    request = JobCreate(**JOB).model_dump(exclude={"dataset"})
    created = {jobs.create("toy", request, created_at=1_700_000_000.123).id for _ in range(7)}
    created.add(jobs.create("toy", request, created_at=1_700_000_001.0).id)  # newest
    created.add(jobs.create("toy", request, created_at=1_699_999_999.0).id)  # oldest
    for size in (1, 2, 3, 4):
        got = [j for p in pages(registered, size) for j in p]
        ids = [j["id"] for j in got]
        assert len(ids) == 9 and set(ids) == created, size
        assert_newest_first(got)


def test_invalid_page_token_is_400(registered: TestClient):
    submit(registered)
    bad = ["!!!", "not-a-token", base64.urlsafe_b64encode(b"[1]").decode(),
           base64.urlsafe_b64encode(b'["x", "y"]').decode(),
           base64.urlsafe_b64encode(b"{}").decode(), "\u00e9t\u00e9"]
    for token in bad:
        r = registered.get("/v1/jobs", params={"page_token": token})
        assert "page_token" in assert_problem(r, 400)["detail"], token


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_page_token_with_a_non_finite_score_is_not_a_server_error(registered: TestClient,
                                                                  literal: bytes):
    submit(registered)
    token = base64.urlsafe_b64encode(b"[" + literal + b', "job-1-2"]').decode()
    r = registered.get("/v1/jobs", params={"page_token": token})
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert_problem(r, 400)


@pytest.mark.parametrize("params", [{"page_size": 0}, {"page_size": 501}, {"page_size": -1},
                                    {"page_size": "ten"}, {"page_token": "x" * 513}])
def test_invalid_page_parameters_are_422(registered: TestClient, params: dict):
    [loc] = error_locs(registered.get("/v1/jobs", params=params))
    assert loc == ["query", next(iter(params))]


# -- cancel -----------------------------------------------------------------------------------


def test_cancel_a_queued_job(registered: TestClient):
    job_id = submit(registered).json()["id"]
    r = registered.post(f"/v1/jobs/{job_id}:cancel")
    assert r.status_code == 200, r.text
    cancelled = r.json()
    assert cancelled["state"] == "cancelled" and cancelled["finished_at"]
    assert "retry-after" not in r.headers

    again = registered.post(f"/v1/jobs/{job_id}:cancel")
    assert again.status_code == 200
    assert again.json()["state"] == "cancelled"
    assert again.json()["finished_at"] == cancelled["finished_at"]

    polled = registered.get(f"/v1/jobs/{job_id}")
    assert polled.json()["state"] == "cancelled" and "retry-after" not in polled.headers
    # DELETE does not cancel (REFERENCE section 5).
    assert_problem(registered.delete(f"/v1/jobs/{job_id}"), 405)


def test_cancel_unknown_or_malformed_job(registered: TestClient):
    assert_problem(registered.post("/v1/jobs/job-18f00000000-0123456789ab:cancel"), 404)
    for job_id in ("nope", "job-XYZ-1", "job-1", "job-1-2-3", "a:b", "job-1-g"):
        r = registered.post(f"/v1/jobs/{job_id}:cancel")
        assert r.status_code in (404, 422), (job_id, r.text)
        assert_problem(r, r.status_code)
        r = registered.get(f"/v1/jobs/{job_id}")
        assert r.status_code in (404, 422), (job_id, r.text)
        assert_problem(r, r.status_code)
    assert_validation_problem(registered.get("/v1/jobs/job-1-" + "a" * 70))


# -- metrics and readiness --------------------------------------------------------------------


def test_metrics(registered: TestClient):
    submit(registered)
    submit(registered)
    registered.get("/v1/datasets/nope")
    text = registered.get("/metrics").text
    assert 'labeler_jobs{state="queued"} 2.0' in text
    assert 'labeler_jobs{state="cancelled"} 0.0' in text
    assert "labeler_http_requests_total{" in text
    assert 'status="202"' in text and 'status="404"' in text
    assert 'labeler_queue_depth{queue="labeling"}' in text and "labeler_workers 0.0" in text
    assert 'labeler_queue_depth{queue="registration"}' in text


def test_readyz_is_503_when_redis_is_unreachable(start, root: Path):
    with start(redis_url="redis://127.0.0.1:1/0") as client:
        assert client.get("/healthz").status_code == 200
        body = assert_problem(client.get("/readyz"), 503)
        assert "redis" in body["detail"]
        # Registering needs Redis (its state lives there); a dataset already in the store does
        # not, so the job below is valid, and has nowhere to be queued.
        assert_problem(client.post("/v1/datasets", json=DATASET), 503)
        Store.open(client.app.state.settings.store).add_dataset("toy", root / "data" / "toy")
        assert client.get("/v1/datasets/toy").json()["state"] == "ready"
        r = client.post("/v1/jobs", json=JOB)  # a valid job, and nowhere to queue it
        assert_problem(r, 503)
        assert r.headers["retry-after"] and "Redis is unavailable" in r.json()["detail"]


def test_redis_that_starts_after_the_api_is_used_once_it_answers(start, root: Path):
    """Nothing orders Redis and the API (podman-compose ignores health conditions): the API
    starts without it, is not ready, and once Redis answers is ready and recovers the jobs."""
    port = free_port()
    with start(redis_url=f"redis://127.0.0.1:{port}/0") as client:
        assert_problem(client.get("/readyz"), 503)
        jobs = client.app.state.jobs  # a job the store holds and this Redis will not know
        jobs._write_record(Job(id="job-1-2ec0fe", dataset="toy", state="queued",
                               request={k: v for k, v in JOB.items() if k != "dataset"},
                               created_at=1.0))
        deadline = time.monotonic() + 30
        with redis_server(port) as late:
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "not ready after Redis started"
                time.sleep(0.1)
            while not late.exists("labeler:job:job-1-2ec0fe"):  # recovered, and planned
                assert time.monotonic() < deadline, "the store's job was not recovered"
                time.sleep(0.1)
            r = client.get("/v1/jobs/job-1-2ec0fe")
            assert r.status_code == 200 and r.json()["state"] == "queued", r.text
            assert any("job-1-2ec0fe" in m for m in late.lrange("labeling", 0, -1))


def test_an_app_configured_again_sends_to_its_new_broker(clean_redis):
    """Each API app says which Redis its tasks go to, however many a process has made."""
    configure(celery_app, Settings(redis_url=REDIS_URL))
    enqueue_plan("job-1-aa")
    port = free_port()
    with redis_server(port) as other:
        configure(celery_app, Settings(redis_url=f"redis://127.0.0.1:{port}/0"))
        enqueue_plan("job-1-bb")
        assert other.llen("labeling") == 1 and clean_redis.llen("labeling") == 1
    celery_app.close()


def test_readyz_is_200_when_redis_and_store_answer(client: TestClient):
    r = client.get("/readyz")
    assert r.status_code == 200 and r.text == "ready"


def test_a_failed_registration_names_no_server_path(tmp_path: Path):
    data_root, store = tmp_path / "data", tmp_path / "store"
    io_error = OSError(5, "Input/output error", str(data_root / "toy" / "a.jpg"))
    assert describe(io_error, data_root, str(store)) == (
        "OSError: [Errno 5] Input/output error: 'toy/a.jpg'")
    store_error = StoreError(f"cannot write {store}/datasets/toy/manifest/path")
    assert describe(store_error, data_root, str(store)) == (
        "StoreError: cannot write <store>/datasets/toy/manifest/path")


def test_the_list_forgets_expired_names_but_not_live_ones(client: TestClient,
                                                          clean_redis: redis.Redis):
    registrations = client.app.state.registrations
    assert client.post("/v1/datasets", json=DATASET).status_code == 202
    clean_redis.sadd(registrations.INDEX, "gone")  # its record expired
    assert [d["name"] for d in client.get("/v1/datasets").json()["datasets"]] == ["toy"]
    assert clean_redis.smembers(registrations.INDEX) == {"toy"}
    # Forgetting is conditional in Redis itself: a name re-created after the list read its
    # empty record is not dropped.
    registrations._forget(keys=[registrations.key("toy"), registrations.INDEX], args=["toy"])
    assert clean_redis.smembers(registrations.INDEX) == {"toy"}
