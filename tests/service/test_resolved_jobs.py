"""What a job answers with, against one API and one `labeler worker` shared by the module: its
own dataset's label set, made by the checkpoint as it is now, whole and with its summaries
recorded; a repair job checks the completion summary against the status records; a damaged
manifest fails a job with that reason (issue 23: A34, A5, A22/A23, A42, A18-A20)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
from collections.abc import Iterator

import pytest
import redis
import zarr

from labeler_service.sample import make_random_checkpoint, make_sample_images
from storage import Store
from tests.service.conftest import JOB, Cluster, stop

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_db: redis.Redis) -> Iterator[Cluster]:
    """The API and one worker; data/toy (12 images, 3 shards of 4) and teacher.safetensors.
    Each test registers the folder under names of its own."""
    root = tmp_path_factory.mktemp("served")
    redis_db.flushdb()
    make_sample_images(root / "data" / "toy", per_class=4)
    make_random_checkpoint(root / "checkpoints" / "teacher.safetensors", num_classes=3)
    cluster = Cluster(root)
    cluster.start_api()
    cluster.start_worker()
    yield cluster
    for proc in [cluster.api, *cluster.workers]:
        stop(proc, signal.SIGKILL)
    redis_db.flushdb()


def job_for(dataset: str, checkpoint: str = "teacher.safetensors", **extra) -> dict:
    return {**JOB, "dataset": dataset, "teacher": {**JOB["teacher"], "checkpoint": checkpoint},
            **extra}


def post(cluster: Cluster, body: dict) -> dict:
    with cluster.client() as client:
        r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()


def run(cluster: Cluster, body: dict) -> dict:
    """POST the job and wait for it to end."""
    return cluster.wait_job(post(cluster, body)["id"])


def labelset_attrs(cluster: Cluster, labelset_id: str) -> dict:
    return Store.open(cluster.root / "store", mode="r").labelset(labelset_id).attrs


def test_a_folder_registered_under_two_names_gets_a_labelset_for_each(served: Cluster):
    """A34: one folder registered as cls3 and as bulk000 (one fingerprint). A job for bulk000
    after cls3 was labeled is answered with a label set of bulk000's, not cls3's."""
    served.register("cls3", "toy")
    served.register("bulk000", "toy")
    first = run(served, job_for("cls3"))
    assert first["state"] == "succeeded", first
    second = run(served, job_for("bulk000"))
    assert second["state"] == "succeeded", second
    assert second["labelset"] != first["labelset"]
    with served.client() as client:
        shown = client.get(f"/v1/labelsets/{second['labelset']}").json()
    assert shown["dataset"] == "bulk000" and shown["complete"], shown
    assert second["labelset"] in Store.open(served.root / "store").dataset(
        "bulk000").labelset_ids()


def test_a_checkpoint_rewritten_in_place_is_not_answered_with_the_old_labels(served: Cluster):
    """A5: the checkpoint rewritten in place with other weights, same size, its mtime put back:
    the next job labels with the new weights (a new label set, of the new file's sha256)."""
    served.register("a5", "toy")
    checkpoint = served.root / "checkpoints" / "a5.safetensors"
    make_random_checkpoint(checkpoint, num_classes=3, seed=1)
    first = run(served, job_for("a5", "a5.safetensors"))
    assert first["state"] == "succeeded", first

    before = checkpoint.stat()
    other = make_random_checkpoint(served.root / "other.safetensors", num_classes=3, seed=2)
    with open(checkpoint, "r+b") as f:  # the same inode, rewritten
        f.write(other.read_bytes())
    os.utime(checkpoint, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = checkpoint.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)

    again = run(served, job_for("a5", "a5.safetensors"))
    assert again["state"] == "succeeded", again
    assert again["labelset"] != first["labelset"]
    teacher = labelset_attrs(served, again["labelset"])["teacher"]
    assert teacher["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_a_repair_job_labels_a_shard_whose_status_was_lost(served: Cluster):
    """A22/A23: a status shard object of a complete label set deleted; its completion summary
    still says complete. A plain job trusts the summary (O(1)); a repair job checks it against
    the status records, removes it, and labels the lost shard again."""
    served.register("lost", "toy")
    first = run(served, job_for("lost"))
    assert first["state"] == "succeeded", first
    labelset_id = first["labelset"]
    status = served.root / "store" / "datasets" / "lost" / "labels" / labelset_id / "status"
    (status / "c" / "1").unlink()
    with served.client() as client:
        assert client.get(f"/v1/labelsets/{labelset_id}/images/5").json()["status"] == -1

    plain = post(served, job_for("lost"))
    assert plain["state"] == "succeeded" and plain["labelset"] == labelset_id, plain

    repaired = run(served, job_for("lost", repair=True))
    assert repaired["state"] == "succeeded", repaired
    assert repaired["progress"]["images_done"] == 12
    with served.client() as client:
        for index in range(4, 8):
            image = client.get(f"/v1/labelsets/{labelset_id}/images/{index}").json()
            assert image["status"] == 0, image
        shown = client.get(f"/v1/labelsets/{labelset_id}").json()
    assert shown["complete"] and shown["attrs"]["completion"]["counts"] == {"0": 12}, shown


def test_a_complete_labelset_without_its_summaries_gets_them_from_the_next_job(
        served: Cluster):
    """A42: a label set whose last shard was written as its job was cancelled is complete
    without its completion summary and agreement. The next job records them (planned, not
    answered at once with agreement null)."""
    served.register("sums", "toy")
    first = run(served, job_for("sums"))
    assert first["state"] == "succeeded" and first["agreement"] is not None, first
    labelset = Store.open(served.root / "store").labelset(first["labelset"])
    group = zarr.open_group(store=labelset.group.store, path=labelset.group.path, mode="r+")
    for name in ("completion", "agreement"):
        group.attrs.pop(name)

    again = run(served, job_for("sums"))
    assert again["state"] == "succeeded", again
    assert again["labelset"] == first["labelset"]
    assert again["agreement"] == first["agreement"]
    attrs = labelset_attrs(served, first["labelset"])
    assert attrs["agreement"] == first["agreement"]
    assert attrs["completion"]["counts"] == {"0": 12}


def test_a_job_on_a_damaged_manifest_fails_with_that_reason(served: Cluster):
    """A18/A19: the sha256 column of the wrong shape. A job fails naming the damaged manifest
    (not a zip() error, not files changed), and so does a repair job."""
    served.register("torn", "toy")
    manifest = zarr.open_group(served.root / "store" / "datasets" / "torn" / "manifest",
                               mode="r+")
    digests = manifest["sha256"][:]
    manifest.create_array("sha256", shape=(11, 32), dtype="uint8", overwrite=True)[:] = \
        digests[:11]
    for body in (job_for("torn"), job_for("torn", repair=True)):
        job = run(served, body)
        assert job["state"] == "failed", job
        assert "dataset 'torn'" in job["error"] and "manifest is damaged" in job["error"], job
        assert "changed" not in job["error"]


def test_a_retry_counts_failures_from_the_records_not_a_forged_summary(served: Cluster):
    """A21 (review): a well-formed but false completion summary ({"0": 12} over 11 labeled and
    1 failed) made a retry_failed job succeed at once, leaving the failed image unretried. A
    retry reads the status records."""
    shutil.copytree(served.root / "data" / "toy", served.root / "data" / "broken")
    victim = sorted((served.root / "data" / "broken").rglob("*.jpg"))[0]
    served.register("forged", "broken")
    victim.write_bytes(victim.read_bytes()[:100])  # unreadable and changed: fails when labeled
    first = run(served, job_for("forged"))
    assert first["state"] == "succeeded" and first["progress"]["images_failed"] == 1, first
    labelset = Store.open(served.root / "store").labelset(first["labelset"])
    group = zarr.open_group(store=labelset.group.store, path=labelset.group.path, mode="r+")
    group.update_attributes({"completion": {"images": 12, "shards": 3, "counts": {"0": 12}}})

    retry = post(served, job_for("forged", retry_failed=True))
    assert retry["state"] != "succeeded", retry  # planned, not answered from the summary
    assert served.wait_job(retry["id"])["progress"]["images_failed"] == 1
