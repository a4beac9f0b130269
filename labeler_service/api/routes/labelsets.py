"""``/v1/labelsets``: a label set's attributes, one image's labels, and a heatmap to look at."""

from __future__ import annotations

import io
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import numpy as np
from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import Response

from labeler_service.api.deps import SettingsDep, StoreDep
from labeler_service.api.schemas import ImageLabels, LabelSetOut
from labeler_service.heatmap import render_heatmap
from storage import (
    ARRAY_NAMES,
    LABEL_ARRAYS,
    ImageStatus,
    LabelBlock,
    LabelSet,
    ShardUnreadable,
    Store,
)
from storage.images import ImageRejected, read_image_bytes

router = APIRouter(prefix="/labelsets", tags=["labelsets"])
NPY = "application/x-npy"
LabelSetId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9._-]{1,200}$")]
ImageIndex = Annotated[int, PathParam(ge=0)]
T = TypeVar("T")


def find_labelset(store: Store, labelset_id: str) -> LabelSet:
    try:
        return store.labelset(labelset_id)
    except KeyError:
        raise HTTPException(404, f"no label set {labelset_id!r}") from None


def check_index(labelset: LabelSet, index: int) -> None:
    if index >= labelset.num_images:
        raise HTTPException(404, f"label set {labelset.id} has {labelset.num_images} images")


def readable(read: Callable[[], T]) -> T:
    """``read()``, with an undecodable stored array answered as a 503 naming the label set,
    the array and the shard (never the store's path)."""
    try:
        return read()
    except ShardUnreadable as e:
        raise HTTPException(503, str(e)) from None


def whole_image(labelset: LabelSet, index: int) -> LabelBlock:
    """Image ``index``'s labels, checked as ``labeler store verify`` checks them: an image whose
    status says labeled but whose stored labels are not all there (a shard object lost or
    emptied under a status record that survived) is never served, as labels or as a heatmap.
    A 409: the label set must be repaired, which retrying alone will not do."""
    block = readable(lambda: labelset.read_image(index))
    if labelset.damaged(block)[0]:
        raise HTTPException(409, f"image {index} of label set {labelset.id} is marked labeled, "
                                 "but its stored labels are missing or incomplete: run "
                                 "`labeler store verify --repair`, or POST its job again with "
                                 '"repair": true')
    return block


def accepts_npy(accept: str | None) -> bool:
    """``Accept`` lists application/x-npy itself (not a longer type that contains it)."""
    return bool(accept) and any(part.split(";")[0].strip().lower() == NPY
                                for part in accept.split(","))


def to_json(values: np.ndarray) -> list:
    """Nested lists; JSON has no NaN, so unknown floats (not labeled, imported lse) are null."""
    if values.dtype.kind != "f":
        return values.tolist()
    return np.where(np.isnan(values), None, values.astype(np.float64)).tolist()


@router.get("/{labelset_id}", response_model=LabelSetOut,
            responses={404: {"description": "Not found"}})
def get_labelset(labelset_id: LabelSetId, store: StoreDep) -> LabelSetOut:
    labelset = find_labelset(store, labelset_id)
    # A complete label set answers from its summary in one read; only an incomplete one reads
    # the status array (one object per shard). A summary the label set could not have is
    # ignored (LabelSet.completion), here and in the attrs shown.
    summary = labelset.completion()
    pending = [] if summary is not None else labelset.pending_shards()
    attrs = {k: v for k, v in labelset.attrs.items() if k != "completion"}
    if summary is not None:
        attrs["completion"] = summary
    return LabelSetOut(id=labelset.id, dataset=labelset.dataset,
                       num_images=labelset.num_images, num_shards=labelset.num_shards,
                       shards_done=labelset.num_shards - len(pending), complete=not pending,
                       agreement=labelset.attrs.get("agreement"),
                       label_quality=labelset.attrs.get("label_quality"), attrs=attrs)


@router.get("/{labelset_id}/images/{index}", response_model=ImageLabels,
            responses={404: {"description": "Not found"},
                       409: {"description": "The image is marked labeled but its stored labels "
                                            "are missing, or the dataset's stored manifest is "
                                            "damaged (labeler store verify --repair)"},
                       503: {"description": "A stored array of this image's shard cannot be "
                                            "decoded (labeler store verify --repair)"},
                       200: {"content": {NPY: {"schema": {"type": "string",
                                                          "format": "binary"}}},
                             "description": "JSON, or one array as .npy with Accept: " + NPY}})
def get_image_labels(labelset_id: LabelSetId, index: ImageIndex, store: StoreDep,
                     accept: Annotated[str | None, Header()] = None,
                     array: Annotated[str, Query(pattern="^(" + "|".join(ARRAY_NAMES) + ")$",
                                                 description="Which array, for .npy")] = "logits",
                     ) -> ImageLabels | Response:
    """Top-K label maps of image ``index``: JSON, or ``Accept: application/x-npy`` for one
    array (``?array=``) in NumPy's .npy format. Labels are served only whole (every array of
    the image is read and checked); ``status``, the record itself, is read alone."""
    labelset = find_labelset(store, labelset_id)
    check_index(labelset, index)
    if accepts_npy(accept):
        values = (readable(lambda: labelset.read_array(array, index, index + 1)) if
                  array == "status" else getattr(whole_image(labelset, index), array))
        buffer = io.BytesIO()
        np.save(buffer, values[0], allow_pickle=False)
        return Response(buffer.getvalue(), media_type=NPY)
    block = whole_image(labelset, index)
    path = store.dataset(labelset.dataset).image_path(index)
    code = int(block.status[0])
    return ImageLabels(
        labelset=labelset.id, index=index, path=str(path), status=code,
        status_description=ImageStatus(code).description, grid=list(labelset.grid),
        topk=labelset.topk, **{name: to_json(getattr(block, name)[0]) for name in LABEL_ARRAYS})


# What a heatmap's source file failing to read answers: gone, changed, or not an image now.
SOURCE_ERRORS = {ImageStatus.MISSING_FILE: 410, ImageStatus.CHANGED_FILE: 409,
                 ImageStatus.NOT_A_FILE: 409, ImageStatus.OUTSIDE_ROOT: 409,
                 ImageStatus.TOO_MANY_PIXELS: 422}
RENDER_WAIT_SECONDS = 0.5  # a waiting request holds a worker thread: keep it short


@router.get("/{labelset_id}/images/{index}/heatmap.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "Not found"},
                       409: {"description": "The image is not labeled, its stored labels "
                                            "are missing, or its file changed since "
                                            "registration"},
                       410: {"description": "The image file is gone"},
                       422: {"description": "The image is too large to draw over"},
                       503: {"description": "Too many heatmaps being drawn; retry"}})
def get_heatmap(labelset_id: LabelSetId, index: ImageIndex, store: StoreDep,
                settings: SettingsDep, request: Request) -> Response:
    """The image with its top-1 class map overlaid, opacity by confidence, and a legend."""
    labelset = find_labelset(store, labelset_id)
    check_index(labelset, index)
    block = whole_image(labelset, index)
    if block.status[0] != ImageStatus.LABELED:
        raise HTTPException(409, f"image {index} is not labeled: "
                                 f"{ImageStatus(int(block.status[0])).description}")
    dataset = store.dataset(labelset.dataset)
    renders: threading.BoundedSemaphore = request.app.state.heatmap_renders
    if not renders.acquire(timeout=RENDER_WAIT_SECONDS):
        raise HTTPException(503, "too many heatmaps are being drawn; retry shortly",
                            headers={"Retry-After": "2"})
    try:
        # As labeling reads it: a regular file, inside the dataset's folder now, with the
        # registered contents (a file replaced since is not drawn over someone else's labels),
        # and no more bytes read than were registered.
        sizes = dataset.sizes(index, index + 1)
        data = read_image_bytes(Path(dataset.source_root) / dataset.image_path(index),
                                dataset.image_sha256(index), root=dataset.source_root,
                                expected_size=None if sizes is None else int(sizes[0]))
        png = render_heatmap(data, block, labelset.teacher.class_names,
                             settings.heatmap_max_pixels)
    except ImageRejected as e:
        raise HTTPException(SOURCE_ERRORS.get(e.status, 409),
                            f"image {index}: {e.status.description}") from None
    finally:
        renders.release()
    return Response(png, media_type="image/png")
