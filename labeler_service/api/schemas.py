"""Request and response bodies of the REST API: every schema in one place."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
)

from labeler_service.jobs import Job
from labeler_service.settings import INPUT_SIZE_MAX, INPUT_SIZE_MIN
from storage.store import check_name

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
log = logging.getLogger(__name__)


class Problem(BaseModel):
    """RFC 9457 problem details (``application/problem+json``)."""

    type: str = "about:blank"
    title: str
    status: int
    detail: Any = None


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored


class DatasetCreate(Request):
    name: str = Field(pattern=NAME_PATTERN, examples=["imagenet-train"],
                      description="Not ending in .json (reserved by the store layout).")
    path: str = Field(min_length=1, max_length=4096, examples=["imagenet/train"],
                      description="Directory relative to the server's data root.")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        return check_name(name)  # the store's own rule: one home


class SkippedNamesOut(BaseModel):
    count: int
    examples: list[str] = Field(description="The first few, escaped as Python does.")


class DatasetOut(BaseModel):
    """A dataset, or its registration while the folder is being scanned (or after it failed).
    The fields the scan gives (``num_images``, ``class_names``, ``fingerprint``, ``created_at``)
    are null until the dataset is ready."""

    name: str
    state: Literal["registering", "ready", "failed"] = Field(
        description="registering (the folder is being scanned; poll with the Retry-After "
                    "interval), ready, or failed (see error; POST again to retry)")
    num_images: int | None
    class_names: list[str] | None
    fingerprint: str | None
    created_at: str | None = Field(description="When the dataset was written to the store.")
    labelsets: list[str]
    files_scanned: int = Field(description="Image files hashed so far.")
    files_total: int | None = Field(
        description="Image files in the folder; null while the folder is still being listed.")
    skipped_names: SkippedNamesOut | None = Field(
        None, description="Files and folders the registration left out because their names are "
                          "not UTF-8 text or hold control characters; null when none were.")
    error: str | None = Field(description="Why the registration failed.")


class DatasetList(BaseModel):
    datasets: list[DatasetOut]
    next_page_token: str = Field("", description="Empty at the end; else pass it back as "
                                 "page_token for the next page.")


class TeacherRequest(Request):
    model: str = Field(pattern=r"^[a-z0-9_.]{1,64}$", examples=["dm_nfnet_f6"])
    checkpoint: str = Field(min_length=1, max_length=4096, examples=["dm_nfnet_f6.safetensors"],
                            description="File relative to the server's checkpoint root.")
    input_size: int = Field(ge=INPUT_SIZE_MIN, le=INPUT_SIZE_MAX, examples=[576])


class JobCreate(Request):
    dataset: str = Field(pattern=NAME_PATTERN)
    teacher: TeacherRequest
    topk: int = Field(5, ge=1, le=1000)
    ignore_dataset_classes: bool = False
    retry_failed: bool = Field(False, description="Label again the images that failed in an "
                               "earlier job of the same label set (e.g. files restored).")
    repair: bool = Field(False, description="Before labeling, decode every completed shard of "
                         "the label set and label again those that fail (what `labeler store "
                         "verify --repair` does): ~23 s per ImageNet-1k on 2 CPU cores.")


class Progress(BaseModel):
    images_done: int
    images_total: int
    images_failed: int
    shards_done: int
    shards_total: int


class Agreement(BaseModel):
    """How often the teacher's image-level top-1 / top-k contain each image's folder class, over
    the labeled images with a known class. Null figures, with a reason, where it cannot be
    measured (the teacher's classes are not the dataset's, no classes, imported labels)."""

    images: int
    top1: float | None
    top5: float | None = Field(description="Share whose top-k contains the class.")
    k: int | None = Field(description="min(5, the label set's top-K).")
    reason: str | None = None


def _none_if_malformed(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A summary read from the store (or a job record) that is not of its schema (damaged,
    hand-edited) is served as not recorded, never as a 500 for the whole resource."""
    try:
        return handler(value)
    except ValidationError as e:
        log.warning("a recorded summary is malformed and is served as null: %s",
                    e.errors()[0]["msg"])
        return None


RecordedAgreement = Annotated[Agreement | None, WrapValidator(_none_if_malformed)]
RecordedSummary = Annotated[dict[str, Any] | None, WrapValidator(_none_if_malformed)]


class JobOut(BaseModel):
    id: str
    state: str = Field(description="queued, running, succeeded, failed or cancelled")
    progress: Progress
    labelset: str | None
    dataset: str
    request: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    agreement: RecordedAgreement = Field(
        None, description="The label set's teacher agreement, once the job succeeded.")

    @classmethod
    def of(cls, job: Job) -> JobOut:
        def when(ts: float | None) -> datetime | None:
            return None if ts is None else datetime.fromtimestamp(ts, UTC)

        return cls(
            id=job.id, state=job.state, labelset=job.labelset, dataset=job.dataset,
            request=job.request, created_at=when(job.created_at), started_at=when(job.started_at),
            finished_at=when(job.finished_at), error=job.error, agreement=job.agreement,
            progress=Progress(images_done=job.images_done, images_total=job.images_total,
                              images_failed=job.images_failed, shards_done=job.shards_done,
                              shards_total=job.shards_total))


class JobPage(BaseModel):
    jobs: list[JobOut]
    next_page_token: str = Field(description="Empty at the end.")


class LabelSetOut(BaseModel):
    id: str
    dataset: str
    num_images: int
    num_shards: int
    shards_done: int
    complete: bool
    agreement: RecordedAgreement = Field(description="Recorded when the label set completed.")
    label_quality: RecordedSummary = Field(
        description="Dense quality against ground-truth masks, when `labeler evaluate-labels` "
                    "measured it (docs/store-format.md).")
    attrs: dict[str, Any]


class ImageLabels(BaseModel):
    labelset: str
    index: int
    path: str
    status: int
    status_description: str
    grid: list[int]
    topk: int
    logits: list[list[list[float | None]]] = Field(description="[K][H][W], descending along K")
    classes: list[list[list[int]]]
    lse: list[list[float | None]] = Field(description="[H][W]; null when unknown (imported)")
    global_logits: list[float | None]
    global_classes: list[int]
