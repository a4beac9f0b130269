"""Property-based requests generated from the OpenAPI schema (schemathesis): no 5xx, ever.

In-process over ASGI (schemathesis runs the app's lifespan), the real Redis (db 11 unless
LABELER_TEST_API_REDIS_URL names another), no workers. A dataset (its registration run here, as
a worker would), a queued job and an unlabeled label set exist first, and about half of the cases
aim their path parameters and ``dataset`` at them, so the handlers get past their 404s. Valid
and invalid requests (schemathesis' positive and negative modes), every one with a valid API key.

One pytest test per operation, each a Hypothesis run over ``APIOperation.as_strategy()``:
schemathesis' own ``from_fixture`` loader needs ``Node._nodeid``, which pytest 9 no longer has,
and a schema loaded at import would start the app (store, Redis) during collection.
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hypothesis.strategies as st
import pytest
import redis
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.generation import GenerationMode

from labeler_service.api.main import create_app
from labeler_service.registrations import run_registration
from labeler_service.sample import make_sample_images
from labeler_service.settings import Settings
from tests.service.conftest import JOB, REDIS_URL, make_empty_labelset

pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("LABELER_TEST_API_REDIS_URL", REDIS_URL)
AUTH = {"Authorization": "Bearer k1"}
MAX_EXAMPLES = 25  # per operation; derandomized, so a run is the same run every time
# Aimed values: real, escaping, odd and too-long-for-the-filesystem paths; page tokens with a
# NaN, an infinite and a finite score, and one of the wrong shape. Hypothesis favours the first
# of a sampled_from (the "simplest"), so the odd ones come first.
DATA_PATHS = ["x" * 256, "toy", "../toy", ".", "toy/circles", "toy/circles/0000.jpg"]
CHECKPOINTS = ["y" * 256, "teacher.safetensors", "../data", ".", "missing.pth"]
PAGE_TOKENS = [base64.urlsafe_b64encode(raw).decode().rstrip("=") for raw in (
    b'[NaN, "job-1-2"]', b'[1e999, "job-1-2"]', b'[1700000000.0, "job-1-2"]', b'["x", 1]')]
OPERATIONS = [(method.upper(), path) for path, methods in
              create_app(Settings(api_keys="")).openapi()["paths"].items() for method in methods]


@dataclass
class Service:
    app: FastAPI
    job_id: str
    labelset_id: str


@pytest.fixture
def service(tmp_path: Path, checkpoint: Path) -> Iterator[Service]:
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    make_sample_images(tmp_path / "data" / "toy", per_class=2)  # 6 images
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(checkpoint, tmp_path / "checkpoints" / "teacher.safetensors")
    config = Settings(store=str(tmp_path / "store"), data_root=tmp_path / "data",
                      checkpoint_root=tmp_path / "checkpoints", redis_url=REDIS_URL,
                      api_keys="k1,k2", api_keys_file=None, max_body_bytes=4096)
    app = create_app(config)
    with TestClient(app, headers=AUTH) as setup:
        assert setup.post("/v1/datasets", json={"name": "toy", "path": "toy"}).status_code == 202
        registrations = setup.app.state.registrations
        assert run_registration(registrations, setup.app.state.store, config.data_root, "toy",
                                registrations.get("toy").attempt) == "ready"  # as a worker does
        r = setup.post("/v1/jobs", json=JOB)
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
    yield Service(app, job_id, make_empty_labelset(config.store))
    client.flushdb()
    client.close()


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_server_errors(service: Service, method: str, path: str):
    schema = schemathesis.openapi.from_asgi("/openapi.json", service.app)
    operation = schema[path][method]
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                      operation.as_strategy(GenerationMode.NEGATIVE))
    real = {"name": "toy", "job_id": service.job_id, "labelset_id": service.labelset_id}

    @given(case=cases, aim=st.booleans(), index=st.sampled_from([0, 5, 6, 7, 2**63]),
           data_path=st.sampled_from(DATA_PATHS), checkpoint=st.sampled_from(CHECKPOINTS),
           page_token=st.sampled_from(PAGE_TOKENS))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    def no_5xx(case, aim: bool, index: int, data_path: str, checkpoint: str,
               page_token: str) -> None:
        if aim:
            if (method, path) == ("GET", "/v1/jobs"):
                case.query = {**(case.query or {}), "page_token": page_token}
            if case.path_parameters:
                case.path_parameters = {k: {**real, "index": index}.get(k, v)
                                        for k, v in case.path_parameters.items()}
            if isinstance(case.body, dict):
                body = dict(case.body)
                if "dataset" in body:
                    body["dataset"] = "toy"
                if "path" in body:
                    body["path"] = data_path
                if isinstance(body.get("teacher"), dict):
                    body["teacher"] = {**body["teacher"], "model": "test_nfnet",
                                       "checkpoint": checkpoint}
                case.body = body
        # Negative cases may carry a broken Authorization header: every case gets the valid key,
        # so they reach the handlers (the 401s are test_api.py's).
        case.headers = {**(case.headers or {}), **AUTH}
        response = case.call()  # an exception the app raises comes through as that exception
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} -> {response.status_code}: "
            f"{response.text[:1000]}\n{case.as_curl_command(headers=AUTH)}")

    no_5xx()
