"""REST round trip with real processes: the service labels exactly what `labeler label` does."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from labeler_service.labeling import LabelingOptions, label_dataset
from storage import ARRAY_NAMES, Store
from tests.conftest import assert_compiled_labels_match
from tests.service.conftest import JOB, Cluster

pytestmark = pytest.mark.slow


def test_register_submit_poll_fetch_equals_labeler_label(cluster: Cluster, tmp_path):
    # Decoding in a DataLoader process under Celery's (daemonic) prefork child.
    cluster.settings["LABELER_DECODE_WORKERS"] = "1"
    cluster.start_api()
    cluster.start_worker()
    with cluster.client() as client:
        r = client.post("/v1/datasets", json={"name": "toy", "path": "toy"})
        assert r.status_code == 202, r.text
        assert r.headers["location"] == "/v1/datasets/toy"
        assert cluster.wait_dataset("toy")["num_images"] == 12  # scanned by the worker
        assert client.post("/v1/datasets", json={"name": "toy", "path": "toy"}).status_code == 200

        r = client.post("/v1/jobs", json=JOB)
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["state"] == "queued" and r.headers["retry-after"]

        done = cluster.wait_job(job["id"])
        assert done["state"] == "succeeded", done
        assert done["progress"] == {"images_done": 12, "images_total": 12, "images_failed": 0,
                                    "shards_done": 3, "shards_total": 3}
        assert done["started_at"] and done["finished_at"]
        r = client.get(f"/v1/jobs/{job['id']}")
        assert "retry-after" not in r.headers
        labelset_id = done["labelset"]

        info = client.get(f"/v1/labelsets/{labelset_id}").json()
        assert info["complete"] and info["attrs"]["teacher"]["model"] == "test_nfnet"
        # The job that wrote the last shard measured the teacher against the folder classes
        # before it succeeded; the job and the label set show the same figures.
        agreement = info["agreement"]
        assert agreement["images"] == 12 and agreement["k"] == 2 and agreement["reason"] is None
        assert done["agreement"] == agreement and info["label_quality"] is None

        image = client.get(f"/v1/labelsets/{labelset_id}/images/5").json()
        assert image["status"] == 0 and image["grid"] == [2, 2] and image["topk"] == 2
        npy = client.get(f"/v1/labelsets/{labelset_id}/images/5?array=classes",
                         headers={"Accept": "application/x-npy"})
        assert npy.headers["content-type"] == "application/x-npy"
        classes = np.load(io.BytesIO(npy.content))
        assert classes.tolist() == image["classes"]

        png = client.get(f"/v1/labelsets/{labelset_id}/images/5/heatmap.png")
        assert png.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(png.content))
        assert picture.format == "PNG" and picture.width > 32

    # The same job in one process, on a fresh store, gives the same label set, byte for byte.
    local = Store.open(tmp_path / "local")
    local.add_dataset("toy", tmp_path / "data" / "toy")
    report = label_dataset(local, "toy", "test_nfnet", tmp_path / "checkpoints" /
                           "teacher.safetensors", 64, 2,
                           LabelingOptions(batch_size=2, num_workers=0, shard_size=4,
                                           progress=False))
    assert report.labelset_id == labelset_id
    served = Store.open(tmp_path / "store").labelset(labelset_id).read_block(0, 12)
    expected = local.labelset(labelset_id).read_block(0, 12)
    for name in ARRAY_NAMES:
        np.testing.assert_array_equal(getattr(served, name), getattr(expected, name), name)
    assert report.agreement == agreement


def test_a_job_whose_labelset_is_complete_succeeds_at_once(cluster: Cluster):
    cluster.start_api()
    cluster.start_worker()
    cluster.register("toy", "toy")
    with cluster.client() as client:
        first = cluster.wait_job(client.post("/v1/jobs", json=JOB).json()["id"])
        assert first["state"] == "succeeded"
        r = client.post("/v1/jobs", json=JOB)  # the same request again, no Idempotency-Key
        again = r.json()
        assert r.status_code == 202 and again["id"] != first["id"]
        assert again["state"] == "succeeded" and again["labelset"] == first["labelset"]
        assert again["progress"]["images_done"] == 12 and "retry-after" not in r.headers
        assert again["agreement"] == first["agreement"] and first["agreement"]["images"] == 12


def test_a_worker_compiling_its_teacher_labels_what_eager_does(cluster: Cluster, tmp_path):
    """``LABELER_COMPILE_TEACHER`` in a real worker: inductor on this CPU, inside a Celery prefork
    child, compiled in the first shard task for batches of 4 (the worker's 8, capped at its
    shard size) and reused by the others. Its labels are the eager ``labeler label``'s to rounding.
    The time limit leaves room for a cold compile (~40 s here; the shape is the CLI test's)."""
    cluster.settings.update(LABELER_COMPILE_TEACHER="true", LABELER_BATCH_SIZE="8",
                            LABELER_VISIBILITY_TIMEOUT="600", LABELER_TASK_TIME_LIMIT="480",
                            LABELER_LOG_LEVEL="INFO")
    cluster.start_api()
    cluster.start_worker()
    cluster.register("toy", "toy")
    with cluster.client() as client:
        done = cluster.wait_job(client.post("/v1/jobs", json=JOB).json()["id"], timeout=480)
    assert done["state"] == "succeeded", done
    assert done["progress"]["images_done"] == 12 and done["progress"]["images_failed"] == 0
    assert cluster.log("w0.log").count("teacher compiled for batches of 4 at 64 px") == 1

    local = Store.open(tmp_path / "local")
    local.add_dataset("toy", tmp_path / "data" / "toy")
    label_dataset(local, "toy", "test_nfnet", tmp_path / "checkpoints" / "teacher.safetensors",
                  64, 2, LabelingOptions(batch_size=3, num_workers=0, shard_size=4,
                                         progress=False))
    assert_compiled_labels_match(
        Store.open(tmp_path / "store").labelset(done["labelset"]).read_block(0, 12),
        local.labelset(done["labelset"]).read_block(0, 12))
