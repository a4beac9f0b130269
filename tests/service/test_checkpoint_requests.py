"""Checkpoints a job cannot use, over the real HTTP stack (uvicorn in a subprocess, the real
Redis, workers as deployed): a malformed file or malformed teacher metadata is a 422 at
``POST /v1/jobs`` with the reason, and so is a teacher fitted for another model; a checkpoint
only a worker can find wrong (another model's weights) fails its job with one line that suits a
REST user."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from labeler_service.checkpoint_files import FITTED_FORMAT
from labeler_service.sample import make_random_checkpoint
from storage import Store
from tests.service.conftest import JOB, Cluster

BAD_OFFSETS = ["[]", '"ab"', "1e400", "null", "{}", "NaN"]


def job_with(checkpoint: str) -> dict:
    return {**JOB, "teacher": {**JOB["teacher"], "checkpoint": checkpoint}}


def with_offsets(path: Path, offsets: str) -> None:
    """A .safetensors file of one tensor whose ``data_offsets`` are the raw JSON ``offsets``."""
    header = ('{"w": {"dtype": "F32", "shape": [1], "data_offsets": ' + offsets + "}}").encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)


def fitted(path: Path, weights: Path, **fields: str) -> None:
    """``weights`` with teacher metadata as ``labeler teacher fit`` writes it; ``fields``
    replace values by raw JSON text."""
    meta = {"format": FITTED_FORMAT, "format_version": "1", "model": '"test_nfnet"',
            "class_names": '["circles", "squares", "stripes"]', **fields}
    save_file(load_file(str(weights)), str(path), metadata=meta)


def registered_here(cluster: Cluster) -> None:
    """Dataset toy registered straight into the store (no worker needed), the API started."""
    Store.open(cluster.root / "store").add_dataset("toy", cluster.root / "data" / "toy")
    cluster.start_api()


def test_a_malformed_checkpoint_is_a_422_with_its_reason(cluster: Cluster):
    """A3: data_offsets of [], "ab", 1e400, null, an object or NaN were a 500. A4: malformed
    teacher metadata was accepted, to fail later (or label with 8 "class names"), and a teacher
    fitted for another model failed its job with advice to "pass --model"."""
    checkpoints = cluster.root / "checkpoints"
    for i, offsets in enumerate(BAD_OFFSETS):
        with_offsets(checkpoints / f"offsets{i}.safetensors", offsets)
    teacher = checkpoints / "teacher.safetensors"
    fitted(checkpoints / "names.safetensors", teacher, class_names='"notalist"')
    fitted(checkpoints / "stride.safetensors", teacher, output_stride="7")
    fitted(checkpoints / "resnet-fit.safetensors", teacher, model='"test_resnet"')
    expected = {f"offsets{i}.safetensors": "not a safetensors file: tensor 'w' has data_offsets"
                for i in range(len(BAD_OFFSETS))}
    expected["names.safetensors"] = "malformed teacher metadata: 'class_names' is 'notalist'"
    expected["stride.safetensors"] = "malformed teacher metadata: 'output_stride' is 7"
    expected["resnet-fit.safetensors"] = ("fitted for model 'test_resnet', not 'test_nfnet': "
                                          "label with model 'test_resnet'")
    registered_here(cluster)
    with cluster.client() as client:
        for name, reason in expected.items():
            r = client.post("/v1/jobs", json=job_with(name))
            assert r.status_code == 422, (name, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            detail = r.json()["detail"]
            assert detail.startswith(f"checkpoint {name!r}: {reason}"), detail
            assert str(cluster.root) not in r.text
        assert client.get("/v1/jobs").json()["jobs"] == []
        assert client.post("/v1/jobs", json=JOB).status_code == 202  # the good one still is


@pytest.mark.slow
def test_a_checkpoint_the_worker_refuses_fails_its_job_in_one_line(cluster: Cluster):
    """A9: another model's checkpoint (which only loading it tells) fails its job with one line
    naming the checkpoint and the model, in words that suit a REST user."""
    checkpoints = cluster.root / "checkpoints"
    make_random_checkpoint(checkpoints / "convnext.safetensors", model="test_convnext",
                           num_classes=3)
    registered_here(cluster)
    cluster.start_worker()
    with cluster.client() as client:
        job_id = client.post("/v1/jobs", json=job_with("convnext.safetensors")).json()["id"]
    job = cluster.wait_job(job_id)
    assert job["state"] == "failed" and "\n" not in job["error"], job
    assert "--model" not in job["error"] and str(cluster.root) not in job["error"], job
    assert "checkpoint convnext.safetensors does not fit test_nfnet (" in job["error"]
    assert "is it a checkpoint of another model?" in job["error"]
