"""``/v1/labelsets``: a label set's attributes, one image's labels, and a heatmap to look at."""

from __future__ import annotations

import io
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Header, HTTPException, Query
from fastapi import Path as PathParam
from fastapi.responses import Response

from labeler_service.api.deps import StoreDep
from labeler_service.api.schemas import ImageLabels, LabelSetOut
from labeler_service.heatmap import render_heatmap
from storage import ARRAY_NAMES, LABEL_ARRAYS, ImageStatus, LabelBlock, LabelSet, Store

router = APIRouter(prefix="/labelsets", tags=["labelsets"])
NPY = "application/x-npy"
LabelSetId = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9._-]{1,200}$")]
ImageIndex = Annotated[int, PathParam(ge=0)]


def find_labelset(store: Store, labelset_id: str) -> LabelSet:
    try:
        return store.labelset(labelset_id)
    except KeyError:
        raise HTTPException(404, f"no label set {labelset_id!r}") from None


def read_image(labelset: LabelSet, index: int) -> LabelBlock:
    if index >= labelset.num_images:
        raise HTTPException(404, f"label set {labelset.id} has {labelset.num_images} images")
    return labelset.read_image(index)


def to_json(values: np.ndarray) -> list:
    """Nested lists; JSON has no NaN, so unknown floats (not labeled, imported lse) are null."""
    if values.dtype.kind != "f":
        return values.tolist()
    return np.where(np.isnan(values), None, values.astype(np.float64)).tolist()


@router.get("/{labelset_id}", response_model=LabelSetOut,
            responses={404: {"description": "Not found"}})
def get_labelset(labelset_id: LabelSetId, store: StoreDep) -> LabelSetOut:
    labelset = find_labelset(store, labelset_id)
    pending = labelset.pending_shards()
    return LabelSetOut(id=labelset.id, dataset=labelset.dataset,
                       num_images=labelset.num_images, num_shards=labelset.num_shards,
                       shards_done=labelset.num_shards - len(pending), complete=not pending,
                       agreement=labelset.attrs.get("agreement"),
                       label_quality=labelset.attrs.get("label_quality"), attrs=labelset.attrs)


@router.get("/{labelset_id}/images/{index}", response_model=ImageLabels,
            responses={404: {"description": "Not found"},
                       200: {"content": {NPY: {"schema": {"type": "string",
                                                          "format": "binary"}}},
                             "description": "JSON, or one array as .npy with Accept: " + NPY}})
def get_image_labels(labelset_id: LabelSetId, index: ImageIndex, store: StoreDep,
                     accept: Annotated[str | None, Header()] = None,
                     array: Annotated[str, Query(pattern="^(" + "|".join(ARRAY_NAMES) + ")$",
                                                 description="Which array, for .npy")] = "logits",
                     ) -> ImageLabels | Response:
    """Top-K label maps of image ``index``: JSON, or ``Accept: application/x-npy`` for one
    array (``?array=``) in NumPy's .npy format."""
    labelset = find_labelset(store, labelset_id)
    block = read_image(labelset, index)
    if accept and NPY in accept:
        buffer = io.BytesIO()
        np.save(buffer, getattr(block, array)[0], allow_pickle=False)
        return Response(buffer.getvalue(), media_type=NPY)
    path = store.dataset(labelset.dataset).image_path(index)
    code = int(block.status[0])
    return ImageLabels(
        labelset=labelset.id, index=index, path=str(path), status=code,
        status_description=ImageStatus(code).description, grid=list(labelset.grid),
        topk=labelset.topk, **{name: to_json(getattr(block, name)[0]) for name in LABEL_ARRAYS})


@router.get("/{labelset_id}/images/{index}/heatmap.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}, 404: {"description": "Not found"},
                       409: {"description": "The image is not labeled"}})
def get_heatmap(labelset_id: LabelSetId, index: ImageIndex, store: StoreDep) -> Response:
    """The image with its top-1 class map overlaid, opacity by confidence, and a legend."""
    labelset = find_labelset(store, labelset_id)
    block = read_image(labelset, index)
    if block.status[0] != ImageStatus.LABELED:
        raise HTTPException(409, f"image {index} is not labeled: "
                                 f"{ImageStatus(int(block.status[0])).description}")
    dataset = store.dataset(labelset.dataset)
    image_path = f"{dataset.source_root}/{dataset.image_path(index)}"
    png = render_heatmap(image_path, block, labelset.teacher.class_names)
    return Response(png, media_type="image/png")
