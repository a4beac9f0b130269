"""Issue 13's adversarial cases against the REST API in-process (FastAPI's TestClient, the real
Redis, a real store labeled here): files changed under a label set, corrupt and torn shards, a
read-only store, files that are not checkpoints. Each answers a problem+json with a reason and
names no server path; nothing is a 500."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from labeler_service.api.main import create_app
from labeler_service.idempotency import IN_FLIGHT_TTL, IdempotencyKeys
from labeler_service.labeling import LabelingOptions, label_dataset
from labeler_service.sample import make_random_checkpoint, make_sample_images
from labeler_service.settings import Settings
from storage import Store
from tests.service.conftest import JOB, REDIS_URL

AUTH = {"Authorization": "Bearer k1"}
PROBLEM = "application/problem+json"




@pytest.fixture
def labeled(tmp_path: Path) -> tuple[Path, str]:
    """data/toy (12 images), a checkpoint, and a store with toy labeled in 3 shards of 4."""
    make_sample_images(tmp_path / "data" / "toy", per_class=4)
    checkpoint = make_random_checkpoint(tmp_path / "checkpoints" / "teacher.safetensors",
                                        num_classes=3)
    store = Store.open(tmp_path / "store")
    store.add_dataset("toy", tmp_path / "data" / "toy")
    report = label_dataset(store, "toy", "test_nfnet", checkpoint, 64, 2,
                           LabelingOptions(batch_size=4, num_workers=0, shard_size=4,
                                           progress=False))
    return tmp_path, report.labelset_id


def settings(root: Path, **overrides) -> Settings:
    return Settings(store=str(root / "store"), data_root=root / "data",
                    checkpoint_root=root / "checkpoints", redis_url=REDIS_URL, api_keys="k1",
                    **overrides)


@contextlib.contextmanager
def api(root: Path, **overrides) -> Iterator[TestClient]:
    with TestClient(create_app(settings(root, **overrides)), headers=AUTH) as client:
        yield client


def problem(r, status: int, root: Path | None = None) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith(PROBLEM)
    detail = r.json()["detail"]
    if root is not None:
        assert str(root) not in r.text, r.text  # no server path
    return detail


def image_file(root: Path, index: int) -> Path:
    dataset = Store.open(root / "store", mode="r").dataset("toy")
    return Path(dataset.source_root) / dataset.image_path(index)


def shard_object(root: Path, labelset_id: str, array: str, shard: int) -> Path:
    folder = root / "store" / "datasets" / "toy" / "labels" / labelset_id / array / "c"
    objects = sorted(p for p in folder.rglob("*") if p.is_file()
                     and p.relative_to(folder).parts[0] == str(shard))
    assert objects, f"no shard object for {array} shard {shard}"
    return objects[0]


# -- 1, 13, 15: heatmaps of files changed since registration -----------------------------------

def test_heatmap_of_a_deleted_changed_replaced_or_linked_out_image(labeled, clean_redis):
    root, labelset_id = labeled
    url = f"/v1/labelsets/{labelset_id}/images/{{}}/heatmap.png"
    with api(root) as client:
        assert client.get(url.format(0)).headers["content-type"] == "image/png"

        image_file(root, 0).unlink()
        assert "file missing" in problem(client.get(url.format(0)), 410, root)
        assert client.get(f"/v1/labelsets/{labelset_id}/images/0").status_code == 200

        image_file(root, 1).write_bytes(image_file(root, 2).read_bytes())  # another image now
        assert "changed" in problem(client.get(url.format(1)), 409, root)

        image_file(root, 2).unlink()
        os.mkfifo(image_file(root, 2))  # would block a plain open() for ever
        began = time.monotonic()
        assert "regular file" in problem(client.get(url.format(2)), 409, root)
        assert time.monotonic() - began < 2

        secret = root / "secret.png"  # outside the data root, with the registered bytes
        shutil.copy(image_file(root, 3), secret)
        image_file(root, 3).unlink()
        image_file(root, 3).symlink_to(secret)
        assert "outside" in problem(client.get(url.format(3)), 409, root)


def test_heatmap_pixels_and_renders_are_bounded(labeled, clean_redis):
    root, labelset_id = labeled
    with api(root, heatmap_max_pixels=1000) as client:  # every sample image is larger
        assert "too many pixels" in problem(
            client.get(f"/v1/labelsets/{labelset_id}/images/0/heatmap.png"), 422, root)
    with api(root, heatmap_concurrency=1) as client:
        client.app.state.heatmap_renders.acquire()  # one render in progress, holding the slot
        r = client.get(f"/v1/labelsets/{labelset_id}/images/0/heatmap.png")
        assert "too many heatmaps" in problem(r, 503) and r.headers["retry-after"]
        client.app.state.heatmap_renders.release()
        assert client.get(f"/v1/labelsets/{labelset_id}/images/0/heatmap.png").status_code \
            == 200


# -- 2, 6: corrupt and torn shards ------------------------------------------------------------

def test_a_corrupt_logits_shard_is_a_503_for_its_images_only(labeled, clean_redis):
    root, labelset_id = labeled
    shard_object(root, labelset_id, "logits", 1).write_bytes(os.urandom(300))
    with api(root) as client:
        detail = problem(client.get(f"/v1/labelsets/{labelset_id}/images/5"), 503, root)
        assert labelset_id in detail and "'logits'" in detail and "shard 1" in detail
        npy = {"Accept": "application/x-npy"}
        r = client.get(f"/v1/labelsets/{labelset_id}/images/5", params={"array": "status"},
                       headers=npy)  # the record itself is still served
        assert r.status_code == 200 and r.headers["content-type"] == "application/x-npy"
        for array in ("logits", "lse", "classes"):  # labels only whole: not this image's
            problem(client.get(f"/v1/labelsets/{labelset_id}/images/5",
                               params={"array": array}, headers=npy), 503, root)
        problem(client.get(f"/v1/labelsets/{labelset_id}/images/5/heatmap.png"), 503, root)
        assert client.get(f"/v1/labelsets/{labelset_id}/images/0").status_code == 200
        assert client.get(f"/v1/labelsets/{labelset_id}/images/9").status_code == 200


def test_a_torn_status_shard_reads_as_pending(labeled, clean_redis):
    root, labelset_id = labeled
    # A rewrite that crashed mid-write: the writer removed the completion summary first.
    Store.open(root / "store").labelset(labelset_id).drop_completion()
    shard_object(root, labelset_id, "status", 2).write_bytes(b"\x00torn")
    with api(root) as client:
        r = client.get(f"/v1/labelsets/{labelset_id}/images/9")
        assert r.status_code == 200 and r.json()["status"] == -1
        assert client.get(f"/v1/labelsets/{labelset_id}").json()["shards_done"] == 2
        assert client.get(f"/v1/labelsets/{labelset_id}/images/0").json()["status"] == 0


def test_accept_must_name_npy_itself(labeled, clean_redis):
    root, labelset_id = labeled
    with api(root) as client:
        r = client.get(f"/v1/labelsets/{labelset_id}/images/0",
                       headers={"Accept": "application/x-npyz"})
        assert r.headers["content-type"].startswith("application/json")
        r = client.get(f"/v1/labelsets/{labelset_id}/images/0",
                       headers={"Accept": "text/html, application/x-npy;q=0.9"})
        assert r.headers["content-type"] == "application/x-npy"


# -- 3: a read-only store ---------------------------------------------------------------------

@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """``path`` read-only for this process: a read-only bind mount as root (whom permissions
    do not stop), the write bits removed otherwise."""
    if os.geteuid() == 0:
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
            yield
        finally:
            subprocess.run(["umount", str(path)], check=True)
    else:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)


def test_a_read_only_store_is_not_ready_and_refuses_jobs_with_503(labeled, clean_redis):
    root, _ = labeled
    with read_only(root / "store"), api(root) as client:
        assert "cannot be written" in problem(client.get("/readyz"), 503, root)
        detail = problem(client.post("/v1/jobs", json=JOB), 503, root)
        assert "cannot be written" in detail
        assert client.get("/v1/jobs").json()["jobs"] == []  # nothing half-made
    with api(root) as client:
        assert client.get("/readyz").status_code == 200
        assert client.post("/v1/jobs", json=JOB).status_code == 202


# -- 4, 18: files that are not checkpoints ------------------------------------------------------

@pytest.mark.parametrize("name,data", [
    ("empty.pt", b""),
    ("readme.pth", b"weights are elsewhere\n"),
    ("garbage.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"x" * 64),
])
def test_a_file_that_is_plainly_no_checkpoint_is_422_at_post(labeled, clean_redis, name, data):
    root, _ = labeled
    (root / "checkpoints" / name).write_bytes(data)
    with api(root) as client:
        body = {**JOB, "teacher": {**JOB["teacher"], "checkpoint": name}}
        detail = problem(client.post("/v1/jobs", json=body), 422, root)
        assert name in detail and "\n" not in detail
        assert client.get("/v1/jobs").json()["jobs"] == []


# -- 5: idempotency keys in flight ------------------------------------------------------------

def test_an_in_flight_key_expires_in_seconds(clean_redis):
    keys = IdempotencyKeys(clean_redis)
    assert keys.claim("order-1", "body") is None
    (stored,) = clean_redis.keys("labeler:idempotency:*")
    assert 0 < clean_redis.ttl(stored) <= IN_FLIGHT_TTL <= 60
    keys.record("order-1", "body", "job-1")
    assert clean_redis.ttl(stored) > 3600 and keys.claim("order-1", "body") == "job-1"


def test_a_queued_job_whose_plan_was_never_sent_is_queued_at_start(labeled, clean_redis):
    """The API died between creating the job and queueing its plan: the next start queues it."""
    root, _ = labeled
    with api(root) as client:
        jobs = client.app.state.jobs
        job = jobs.create("toy", {k: v for k, v in JOB.items() if k != "dataset"})
        sent = jobs.requeue_unsent()
        assert sent == [job.id]
        assert jobs.requeue_unsent() == []  # once
    planned = [m for m in clean_redis.lrange("labeling", 0, -1) if job.id in m]
    assert len(planned) == 1


# -- 16: memory bounded whatever the input size ---------------------------------------------

def test_large_inputs_get_smaller_teacher_batches():
    s = Settings(batch_size=64)
    assert s.batch_size_for(224) == 64 and s.batch_size_for(576) == 25
    assert s.batch_size_for(2048) == 2 and Settings(batch_size=64,
                                                    max_batch_pixels=1).batch_size_for(64) == 1


# -- 17: no route's cost grows with the store -------------------------------------------------

def test_datasets_are_listed_a_page_at_a_time(labeled, clean_redis):
    root, _ = labeled
    store = Store.open(root / "store")
    for i in range(5):
        store.add_dataset(f"more-{i}", root / "data" / "toy")
    with api(root) as client:
        seen, token = [], None
        while True:
            page = client.get("/v1/datasets", params={"page_size": 2,
                                                      **({"page_token": token} if token else {})})
            assert page.status_code == 200 and len(page.json()["datasets"]) <= 2
            seen += [d["name"] for d in page.json()["datasets"]]
            token = page.json()["next_page_token"]
            if not token:
                break
        assert seen == sorted(seen) == [f"more-{i}" for i in range(5)] + ["toy"]
        problem(client.get("/v1/datasets", params={"page_token": "%%%"}), 400)


def test_label_sets_and_jobs_are_found_without_listing_the_store(labeled, clean_redis,
                                                                 monkeypatch):
    root, labelset_id = labeled
    with api(root) as client:
        assert client.get(f"/v1/labelsets/{labelset_id}").status_code == 200  # indexes it
        store = client.app.state.store
        listed = []
        import zarr

        real = zarr.Group.group_keys

        def counting(self):
            listed.append(self.path)
            return real(self)

        monkeypatch.setattr(zarr.Group, "group_keys", counting)
        assert client.get(f"/v1/labelsets/{labelset_id}").status_code == 200
        assert client.get("/v1/jobs/job-1-abcdef").status_code == 404
        assert listed == [], listed  # neither datasets nor jobs were listed
        assert store.labelset(labelset_id).id == labelset_id


# -- 19-24: messages that say what is wrong ---------------------------------------------------

def test_a_registration_on_a_read_only_store_says_the_store_cannot_be_written(tmp_path):
    from labeler_service.registrations import describe

    store = tmp_path / "store"
    error = OSError(30, "Read-only file system", str(store / "datasets" / "toy" / "manifest"))
    reason = describe(error, tmp_path / "data", str(store))
    assert reason == "the store cannot be written (Read-only file system)"


@pytest.mark.parametrize("name", ["zarr.json", "ZARR.JSON", "x.json"])
def test_names_reserved_by_the_store_layout_are_422(labeled, clean_redis, name):
    root, _ = labeled
    with api(root) as client:
        r = client.post("/v1/datasets", json={"name": name, "path": "toy"})
        assert r.status_code == 422 and "reserved" in r.text
    with pytest.raises(ValueError, match="reserved"):
        Store.open(root / "store").add_dataset(name, root / "data" / "toy")


def test_jobs_are_listed_from_the_store_after_redis_is_emptied(labeled, clean_redis):
    root, _ = labeled
    with api(root) as client:
        made = {client.post("/v1/jobs", json=JOB).json()["id"] for _ in range(3)}
        clean_redis.flushdb()  # the API keeps running
        listed = {j["id"] for j in client.get("/v1/jobs").json()["jobs"]}
        assert listed == made


def test_a_progress_write_after_redis_lost_a_job_leaves_no_broken_record(labeled, clean_redis):
    """A worker's progress write that lands just after Redis was emptied creates a record with
    no id (HSET on a missing key); reading the job recovers it whole from the store instead of
    failing on the partial record (a 500, seen once under bench_scale's Redis flushes)."""
    root, _ = labeled
    with api(root) as client:
        job = client.post("/v1/jobs", json=JOB).json()
        clean_redis.flushdb()
        clean_redis.hset(f"labeler:job:{job['id']}", mapping={"images_done": 3,
                                                             "progressed_at": time.time()})
        again = client.get(f"/v1/jobs/{job['id']}")
        assert again.status_code == 200, again.text
        assert (again.json()["id"], again.json()["dataset"]) == (job["id"], job["dataset"])
        assert {j["id"] for j in client.get("/v1/jobs").json()["jobs"]} == {job["id"]}


def test_api_keys_clients_cannot_send_are_refused_in_configuration(tmp_path):
    with pytest.raises(ValueError, match="printable ASCII"):
        Settings(api_keys="ключ-1").api_key_list()
    from click.testing import CliRunner

    from labeler_service.cli import main

    result = CliRunner(env={"LABELER_API_KEYS": "clé"}).invoke(main, ["api"])
    assert result.exit_code == 1 and "printable ASCII" in result.output
    assert "Traceback" not in result.output


def test_deeply_nested_json_is_422_like_any_invalid_body(labeled, clean_redis):
    root, _ = labeled
    with api(root) as client:
        body = b'{"dataset": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        with api(root, max_body_bytes=1_000_000) as big:
            problem(big.post("/v1/jobs", content=body,
                             headers={"Content-Type": "application/json"}), 422)
        problem(client.post("/v1/jobs", content=b"{not json",
                            headers={"Content-Type": "application/json"}), 422)


# -- issue 23: nothing wrong is served ----------------------------------------------------------

def test_an_image_whose_labels_are_gone_is_a_409_never_served_as_labeled(labeled, clean_redis):
    """R21: a shard's ``lse`` object emptied (shard 1) or deleted (shard 2) under a status that
    still says labeled: JSON, every label array and the heatmap are a 409 that says how to
    repair, as ``labeler store verify`` reports it; its status and other shards still serve."""
    root, labelset_id = labeled
    shard_object(root, labelset_id, "lse", 1).write_bytes(b"")
    shard_object(root, labelset_id, "lse", 2).unlink()
    url = f"/v1/labelsets/{labelset_id}/images/{{}}"
    npy = {"Accept": "application/x-npy"}
    with api(root) as client:
        for index in (5, 9):
            for r in (client.get(url.format(index)),
                      client.get(url.format(index), params={"array": "lse"}, headers=npy),
                      client.get(url.format(index), params={"array": "logits"}, headers=npy),
                      client.get(url.format(index) + "/heatmap.png")):
                detail = problem(r, 409, root)
                assert f"image {index}" in detail and "store verify --repair" in detail
                assert '"repair": true' in detail
            status = client.get(url.format(index), params={"array": "status"}, headers=npy)
            assert status.status_code == 200
        whole = client.get(url.format(0))
        assert whole.status_code == 200 and whole.json()["lse"][0][0] is not None
        assert client.get(url.format(0) + "/heatmap.png").status_code == 200


def damage_manifest_column(root: Path, column: str, values) -> None:
    """Overwrite a stored manifest column of dataset toy, as a damaged store would hold it."""
    import zarr

    array = zarr.open_array(root / "store" / "datasets" / "toy" / "manifest" / column, mode="r+")
    array[:] = values


def test_a_damaged_path_column_is_a_409_naming_the_dataset(labeled, clean_redis):
    """A20: path offsets out of order (row 6 ends before row 5 does): the image's path would be
    wrong (glued to or cut from its neighbour's), so its labels and heatmap are a 409 naming
    the dataset and what to do, not a 500 and never a wrong path."""
    import zarr

    root, labelset_id = labeled
    ends = zarr.open_array(root / "store" / "datasets" / "toy" / "manifest" / "path_end",
                           mode="r")[:]
    ends[6] = ends[4]
    damage_manifest_column(root, "path_end", ends)
    with api(root) as client:
        for path in ("", "/heatmap.png"):
            detail = problem(client.get(f"/v1/labelsets/{labelset_id}/images/6{path}"), 409,
                             root)
            assert "dataset 'toy'" in detail and "manifest is damaged" in detail
            assert "store verify" in detail
        assert client.get(f"/v1/labelsets/{labelset_id}/images/0").status_code == 200


def test_a_summary_the_labelset_could_not_have_is_not_served(labeled, clean_redis):
    """A21: a tampered completion summary (15 images of 12) is ignored, in what GET shows too:
    the label set answers from its status records."""
    import zarr

    root, labelset_id = labeled
    labelset = Store.open(root / "store").labelset(labelset_id)
    truth = labelset.completion()
    assert truth is not None
    group = zarr.open_group(store=labelset.group.store, path=labelset.group.path, mode="r+")
    group.update_attributes({"completion": {**truth, "counts": {"0": 15}}})
    with api(root) as client:
        shown = client.get(f"/v1/labelsets/{labelset_id}").json()
        assert shown["complete"] and shown["shards_done"] == 3
        assert "completion" not in shown["attrs"]


def test_a_malformed_recorded_summary_is_served_as_null_not_a_500(labeled, clean_redis):
    """An `agreement` or `label_quality` attr not of its schema (hand-edited, damaged) made the
    label set's GET a 500 (response validation): it is served as not recorded."""
    import zarr

    root, labelset_id = labeled
    labelset = Store.open(root / "store").labelset(labelset_id)
    group = zarr.open_group(store=labelset.group.store, path=labelset.group.path, mode="r+")
    group.update_attributes({"agreement": {"images": "many"}, "label_quality": ["not", "one"]})
    with api(root) as client:
        response = client.get(f"/v1/labelsets/{labelset_id}")
        assert response.status_code == 200, response.text
        assert response.json()["agreement"] is None
        assert response.json()["label_quality"] is None


def test_names_a_registration_left_out_are_shown(tmp_path: Path, clean_redis):
    """A29 (review): files left out for their names (not UTF-8, control characters) were only
    counted in the store; `labeler datasets add` says so, and GET /v1/datasets/{name} shows
    them."""
    from click.testing import CliRunner

    from labeler_service.cli import main

    folder = make_sample_images(tmp_path / "data" / "odd", per_class=2)
    first = sorted(folder.rglob("*.jpg"))[0]
    os.rename(first, os.fsencode(first.parent) + b"/caf\xe9.jpg")
    out = CliRunner().invoke(main, ["datasets", "add", "odd", str(folder), "--store",
                                    str(tmp_path / "store")], catch_exceptions=False).output
    assert "odd: skipped 1 file(s) or folder(s) whose names are not UTF-8" in out
    assert "caf\\udce9.jpg" in out
    with api(tmp_path) as client:
        shown = client.get("/v1/datasets/odd").json()
    assert shown["num_images"] == 5 and shown["skipped_names"]["count"] == 1, shown
    assert shown["skipped_names"]["examples"][0].endswith("caf\\udce9.jpg")
