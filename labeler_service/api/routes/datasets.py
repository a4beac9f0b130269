"""``/v1/datasets``: register an image folder under the data root (a long-running operation),
list and show datasets.

``POST`` checks what is cheap (the body, the path inside the data root, that it is a directory),
records a registration in Redis and queues the scan on a worker: 202 Accepted with
``Location: /v1/datasets/{name}``, which reports ``state`` registering, then ready or failed.
The store is the source of truth for ready datasets; Redis holds registrations not finished yet,
and failed ones (labeler_service/registrations.py).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Annotated

import anyio
from fastapi import APIRouter, HTTPException, Query, Request, Response, status

from labeler_service.api.deps import RegistrationsDep, SettingsDep, StoreDep
from labeler_service.api.schemas import (
    DatasetCreate,
    DatasetList,
    DatasetOut,
    Problem,
    SkippedNamesOut,
)
from labeler_service.paths import PathOutsideRoot, is_kind, resolve_inside
from labeler_service.queue import enqueue_registration
from labeler_service.registrations import Registration, RegistrationStore, lookup, ready_dataset
from storage import Dataset, Store

router = APIRouter(prefix="/datasets", tags=["datasets"])
RETRY_AFTER_SECONDS = "5"  # a scan takes seconds to many minutes


def dataset_out(dataset: Dataset) -> DatasetOut:
    skipped = dataset.skipped_names
    return DatasetOut(name=dataset.name, state="ready", num_images=dataset.num_images,
                      class_names=list(dataset.class_names), fingerprint=dataset.fingerprint,
                      created_at=dataset.attrs["created_at"], labelsets=dataset.labelset_ids(),
                      files_scanned=dataset.num_images, files_total=dataset.num_images,
                      error=None, skipped_names=None if skipped is None else SkippedNamesOut(
                          count=skipped.count, examples=skipped.examples))


def registration_out(registration: Registration, response: Response | None = None) -> DatasetOut:
    if response is not None and registration.state == "registering":
        response.headers["Retry-After"] = RETRY_AFTER_SECONDS
    return DatasetOut(name=registration.name, state=registration.state, num_images=None,
                      class_names=None, fingerprint=None, created_at=None, labelsets=[],
                      files_scanned=registration.files_scanned,
                      files_total=registration.files_total, error=registration.error)


def already_registered(dataset: Dataset, directory: Path) -> DatasetOut:
    if dataset.source_root != str(directory):
        raise HTTPException(409, f"dataset {dataset.name!r} is already registered from another "
                                 "folder; register this one under another name")
    return dataset_out(dataset)


LOCATION = {"description": "/v1/datasets/{name}", "schema": {"type": "string"}}
RETRY_AFTER = {"description": "Seconds to wait before polling, while registering",
               "schema": {"type": "string"}}


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=DatasetOut,
             responses={202: {"description": "Registration queued or in progress: poll Location",
                              "headers": {"Location": LOCATION, "Retry-After": RETRY_AFTER}},
                        200: {"description": "Already registered from this folder (not "
                                             "scanned again)", "model": DatasetOut,
                              "headers": {"Location": LOCATION}},
                        400: {"description": "Path outside the data root", "model": Problem},
                        409: {"description": "The name is registered, or being registered, "
                                             "from another folder", "model": Problem},
                        422: {"description": "Invalid request, or the path is not a directory",
                              "model": Problem}})
def register_dataset(body: DatasetCreate, settings: SettingsDep, store: StoreDep,
                     registrations: RegistrationsDep, response: Response) -> DatasetOut:
    """Register every image under ``path`` (relative to the data root), recursively.

    202 Accepted: the folder is scanned on a worker; poll ``Location`` (``state`` registering,
    then ready or failed). The same name and folder again: the same registration while it runs
    (202), the dataset once ready (200, no rescan), a new registration after a failure (202).
    """
    try:
        directory = resolve_inside(settings.data_root, body.path)
    except PathOutsideRoot as e:
        raise HTTPException(400, str(e)) from None
    if not is_kind(directory, "dir"):
        raise HTTPException(422, f"{body.path!r} is not a directory under the data root")
    response.headers["Location"] = f"/v1/datasets/{body.name}"
    dataset = ready_dataset(store, body.name)
    if dataset is not None:
        response.status_code = status.HTTP_200_OK
        return already_registered(dataset, directory)
    outcome, registration = registrations.begin(body.name, body.path, directory)
    if outcome == "ready":  # Redis says ready: the store decides
        dataset = ready_dataset(store, body.name)
        if dataset is not None:
            response.status_code = status.HTTP_200_OK
            return already_registered(dataset, directory)
        outcome, registration = registrations.begin(body.name, body.path, directory, force=True)
    if outcome == "conflict":
        raise HTTPException(409, f"dataset {body.name!r} is being registered from another "
                                 f"folder ({registration.path!r})")
    if outcome == "created":
        try:
            enqueue_registration(registration.name, registration.attempt)
        except Exception:
            registrations.discard(registration.name, registration.attempt)
            raise
    return registration_out(registration, response)


@router.get("", response_model=DatasetList,
            responses={400: {"description": "Invalid page_token"}})
async def list_datasets(request: Request, store: StoreDep, registrations: RegistrationsDep,
                        page_size: Annotated[int, Query(ge=1, le=500)] = 100,
                        page_token: Annotated[str | None, Query(max_length=512)] = None
                        ) -> DatasetList:
    """Datasets by name: ready ones (the store's) and registrations in progress or failed.
    Only the page's datasets are opened; pass ``next_page_token`` back for the next page."""
    after = decode_name_token(page_token) if page_token else ""
    # A page reads a few store objects per dataset: a burst of listings in the shared thread
    # pool held every thread and stalled every sync route. They run a few at a time instead
    # (LABELER_LISTING_CONCURRENCY); the others wait on the event loop, holding no thread.
    return await anyio.to_thread.run_sync(list_page, store, registrations, page_size, after,
                                          limiter=request.app.state.listings)


def list_page(store: Store, registrations: RegistrationStore, page_size: int,
              after: str) -> DatasetList:
    """Up to ``page_size`` datasets named after ``after``, and the next page's token."""
    pending = {r.name: r for r in registrations.all() if r.state != "ready"}
    names = sorted(n for n in set(store.dataset_names()) | set(pending) if n > after)
    page: list[DatasetOut] = []
    for name in names:
        if len(page) == page_size:
            break
        dataset = ready_dataset(store, name)
        if dataset is not None:
            page.append(dataset_out(dataset))
        elif name in pending:
            page.append(registration_out(pending[name]))
    more = bool(page) and names[-1] > page[-1].name
    return DatasetList(datasets=page,
                       next_page_token=encode_name_token(page[-1].name) if more else "")


def encode_name_token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode().rstrip("=")


def decode_name_token(token: str) -> str:
    try:
        return base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_",
                                validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, "invalid page_token") from None


@router.get("/{name}", response_model=DatasetOut,
            responses={200: {"headers": {"Retry-After": RETRY_AFTER}},
                       404: {"description": "Not found", "model": Problem}})
def get_dataset(name: str, store: StoreDep, registrations: RegistrationsDep,
                response: Response) -> DatasetOut:
    """A dataset; ``Retry-After`` while it is registering."""
    found = lookup(store, registrations, name)
    if found is None:
        raise HTTPException(404, f"no dataset {name!r}")
    if isinstance(found, Registration):
        return registration_out(found, response)
    return dataset_out(found)
