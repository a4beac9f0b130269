"""Registering a dataset over REST with real processes: POST is 202 and queues one scan, GET
shows it registering, a `labeler worker` scans it (queue `registration`) into the same dataset
`labeler datasets add` makes, or fails it with the reason."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
from click.testing import CliRunner

from labeler_service.cli import main
from labeler_service.queue import REGISTRATION_QUEUE
from labeler_service.sample import make_sample_images
from storage import Store
from tests.service.conftest import JOB, Cluster

pytestmark = pytest.mark.slow


def test_register_with_a_worker(cluster: Cluster, redis_db: redis.Redis, tmp_path_factory):
    # A folder with a symlink to an image outside the data root: refused by the scan.
    outside = make_sample_images(tmp_path_factory.mktemp("outside"), per_class=1)
    escape = make_sample_images(cluster.root / "data" / "escape", per_class=1)
    os.symlink(outside / "circles" / "0000.jpg", escape / "squares" / "elsewhere.jpg")
    cluster.start_api()  # no worker yet: the scans wait in their queue
    with cluster.client() as client:
        body = {"name": "toy", "path": "toy"}
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: client.post("/v1/datasets", json=body), range(8)))
        assert [r.status_code for r in answers] == [202] * 8, [r.text for r in answers]
        assert {r.headers["location"] for r in answers} == {"/v1/datasets/toy"}
        r = client.get("/v1/datasets/toy")
        assert r.json()["state"] == "registering" and int(r.headers["retry-after"]) > 0
        conflict = client.post("/v1/datasets", json={"name": "toy", "path": "escape"})
        assert conflict.status_code == 409, conflict.text
        assert conflict.headers["content-type"].startswith("application/problem+json")
        job = client.post("/v1/jobs", json=JOB)
        assert job.status_code == 409 and "still registering" in job.json()["detail"], job.text
        assert client.post("/v1/datasets", json={"name": "escape", "path": "escape"}
                           ).status_code == 202
        assert redis_db.llen(REGISTRATION_QUEUE) == 2  # one scan per dataset, however many POSTs

    cluster.start_worker()  # `labeler worker`, as deployed
    toy = cluster.wait_dataset("toy")
    assert toy["state"] == "ready" and toy["num_images"] == 12, toy
    assert toy["files_scanned"] == toy["files_total"] == 12 and toy["error"] is None
    failed = cluster.wait_dataset("escape")
    assert failed["state"] == "failed", failed
    assert "squares/elsewhere.jpg" in failed["error"]
    assert "outside the data root" in failed["error"]

    # `labeler datasets add` on the same folder: the same dataset.
    local = cluster.root / "local"
    result = CliRunner().invoke(main, ["datasets", "add", "toy", str(cluster.root / "data" / "toy"),
                                       "--store", str(local)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    expected = Store.open(local).dataset("toy")
    served = Store.open(cluster.root / "store").dataset("toy")
    assert toy["fingerprint"] == served.fingerprint == expected.fingerprint
    assert served.source_root == str((cluster.root / "data" / "toy").resolve())

    with cluster.client() as client:
        again = client.post("/v1/datasets", json={"name": "toy", "path": "toy"})
        assert again.status_code == 200 and again.json() == toy  # no second scan
        other = client.post("/v1/datasets", json={"name": "toy", "path": "escape"})
        assert other.status_code == 409, other.text
        names = {d["name"]: d["state"] for d in client.get("/v1/datasets").json()["datasets"]}
        assert names == {"toy": "ready", "escape": "failed"}
        job = client.post("/v1/jobs", json=JOB)  # labeled in test_round_trip.py
        assert job.status_code == 202, job.text


def test_a_large_folder_is_hashed_by_processes_inside_the_worker(cluster: Cluster):
    """A folder of SCAN_PROCESS_MIN_FILES files or more is hashed by spawned processes, from
    inside a Celery prefork child (daemonic until the worker lifts the flag): the same dataset
    as a thread-hashed `labeler datasets add` of it."""
    from storage.manifest import SCAN_PROCESS_MIN_FILES, scan_image_folder

    sources = sorted((cluster.root / "data" / "toy").rglob("*.jpg"))
    big = cluster.root / "data" / "big"
    for i in range(SCAN_PROCESS_MIN_FILES):
        (big / f"c{i % 4}").mkdir(parents=True, exist_ok=True)
        os.link(sources[i % len(sources)], big / f"c{i % 4}" / f"{i:05d}.jpg")
    cluster.start_api()
    cluster.start_worker()
    dataset = cluster.register("big", "big")
    assert dataset["num_images"] == SCAN_PROCESS_MIN_FILES
    threads = scan_image_folder(big, processes=0)
    assert dataset["fingerprint"] == threads.fingerprint()
    assert "Traceback" not in cluster.log("w0.log")
