"""``/v1/jobs``: submit, poll, list and cancel labeling jobs."""

from __future__ import annotations

import hashlib
import json
import subprocess
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi import Path as PathParam

from labeler_service.api.deps import JobsDep, RedisDep, RegistrationsDep, SettingsDep, StoreDep
from labeler_service.api.lookups import find_dataset
from labeler_service.api.schemas import JobCreate, JobOut, JobPage
from labeler_service.checkpoint_files import checkpoint_problem, fitted_metadata
from labeler_service.idempotency import IdempotencyConflict, IdempotencyKeys
from labeler_service.jobs import Job, JobStore, Resolutions, file_signature
from labeler_service.model_names import timm_model_names
from labeler_service.paths import PathOutsideRoot, is_kind, public_reason, resolve_inside
from storage import Dataset, StoreError

router = APIRouter(prefix="/jobs", tags=["jobs"])
RETRY_AFTER_SECONDS = "2"
JOB_ID_PATH = PathParam(pattern=r"^job-[0-9a-f]+-[0-9a-f]+$", max_length=64)


def with_retry_after(job: Job, response: Response) -> JobOut:
    if not job.finished:
        response.headers["Retry-After"] = RETRY_AFTER_SECONDS
    return JobOut.of(job)


def find_job(jobs: JobStore, job_id: str) -> Job:
    job = jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


def check_request(body: JobCreate, settings: SettingsDep, store: StoreDep,
                  registrations: RegistrationsDep) -> tuple[Dataset, list[str | int]]:
    """Refuse what cannot run; returns the dataset and the checkpoint's file signature."""
    dataset = find_dataset(store, registrations, body.dataset)  # 409 while it is registering
    try:
        checkpoint = resolve_inside(settings.checkpoint_root, body.teacher.checkpoint)
    except PathOutsideRoot as e:
        raise HTTPException(400, str(e)) from None
    if not is_kind(checkpoint, "file"):
        raise HTTPException(422, f"no checkpoint {body.teacher.checkpoint!r} under the "
                                 "checkpoint root")
    problem = checkpoint_problem(checkpoint)  # cheap: its header only, no torch
    if problem:
        raise HTTPException(422, f"checkpoint {body.teacher.checkpoint!r}: {problem}")
    try:
        known = timm_model_names()
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        raise HTTPException(503, f"cannot list timm's models now ({type(e).__name__}); "
                                 "retry") from None
    if body.teacher.model not in known:
        raise HTTPException(422, f"unknown timm model {body.teacher.model!r}")
    fitted = fitted_metadata(checkpoint)  # valid: checkpoint_problem has read it
    if fitted is not None and fitted["model"] != body.teacher.model:
        raise HTTPException(422, f"checkpoint {body.teacher.checkpoint!r}: fitted for model "
                                 f"{fitted['model']!r}, not {body.teacher.model!r}: label with "
                                 f"model {fitted['model']!r}")
    try:
        return dataset, file_signature(checkpoint)  # a stat: the file is never hashed here
    except OSError:  # gone since it was looked at
        raise HTTPException(422, f"no checkpoint {body.teacher.checkpoint!r} under the "
                                 "checkpoint root") from None


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             responses={400: {"description": "Checkpoint path outside its root"},
                        404: {"description": "No such dataset"},
                        409: {"description": "The dataset is not ready (registering or "
                                             "failed), or the same Idempotency-Key is still in "
                                             "progress"},
                        422: {"description": "Invalid request, or Idempotency-Key reused with "
                                             "another body"}})
def submit_job(body: JobCreate, response: Response, settings: SettingsDep, store: StoreDep,
               jobs: JobsDep, client: RedisDep, registrations: RegistrationsDep,
               idempotency_key: Annotated[str | None, Header(max_length=255)] = None) -> JobOut:
    """Queue a labeling job; poll the ``Location`` it answers with."""
    dataset, signature = check_request(body, settings, store, registrations)
    request = body.model_dump(exclude={"dataset"})
    fingerprint = hashlib.sha256(json.dumps(body.model_dump(), sort_keys=True).encode()).hexdigest()
    idempotency = IdempotencyKeys(client)
    if idempotency_key:
        try:
            earlier = idempotency.claim(idempotency_key, fingerprint)
        except IdempotencyConflict as e:
            raise HTTPException(e.status, str(e)) from None
        if earlier is not None:
            job = find_job(jobs, earlier)
            response.headers["Location"] = f"/v1/jobs/{job.id}"
            return with_retry_after(job, response)
    try:
        done = Resolutions(client, store, settings.job_ttl_seconds).complete_labelset(
            dataset, request, signature)
        if done is not None:  # nothing to label: the job succeeds at once
            job = jobs.create_succeeded(body.dataset, request, done)
        else:
            job = jobs.create(body.dataset, request)
    except Exception as e:
        if idempotency_key:  # let a retry with the same key through
            idempotency.release(idempotency_key)
        if isinstance(e, OSError | StoreError):
            raise HTTPException(503, public_reason(f"the store cannot be written: {e}",
                                                   store_location=store.location)) from None
        raise
    if done is None:
        jobs.enqueue(job.id)
    # Only now: a recorded key always names a job that was queued. (A crash before this leaves a
    # queued job that the API's start-up queues again; the in-flight key expires in seconds.)
    if idempotency_key:
        idempotency.record(idempotency_key, fingerprint, job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return with_retry_after(job, response)


@router.get("", response_model=JobPage)
def list_jobs(jobs: JobsDep, page_size: Annotated[int, Query(ge=1, le=500)] = 50,
              page_token: Annotated[str | None, Query(max_length=512)] = None) -> JobPage:
    """Newest first; pass ``next_page_token`` back as ``page_token`` for the next page."""
    try:
        page, token = jobs.page(page_size, page_token)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    return JobPage(jobs=[JobOut.of(j) for j in page], next_page_token=token)


@router.get("/{job_id}", response_model=JobOut, responses={404: {"description": "Not found"}})
def get_job(job_id: Annotated[str, JOB_ID_PATH], jobs: JobsDep, response: Response) -> JobOut:
    return with_retry_after(find_job(jobs, job_id), response)


@router.post("/{job_id}:cancel", response_model=JobOut,
             responses={404: {"description": "Not found"}})
def cancel_job(job_id: Annotated[str, JOB_ID_PATH], jobs: JobsDep, response: Response) -> JobOut:
    """Best effort: workers stop between batches; a finished job keeps its state."""
    job = jobs.request_cancel(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return with_retry_after(job, response)
