"""``/v1/datasets``: register an image folder under the data root, list and show datasets."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response, status

from labeler_service.api.deps import SettingsDep, StoreDep
from labeler_service.api.schemas import DatasetCreate, DatasetList, DatasetOut
from labeler_service.paths import PathOutsideRoot, is_kind, resolve_inside
from storage import Dataset, DatasetChangedError, Store, scan_image_folder
from storage.manifest import FileOutsideRoot

router = APIRouter(prefix="/datasets", tags=["datasets"])


def dataset_out(dataset: Dataset) -> DatasetOut:
    return DatasetOut(name=dataset.name, num_images=dataset.num_images,
                      class_names=list(dataset.class_names), fingerprint=dataset.fingerprint,
                      created_at=dataset.attrs["created_at"], labelsets=dataset.labelset_ids())


def find_dataset(store: Store, name: str) -> Dataset:
    try:
        return store.dataset(name)
    except KeyError:
        raise HTTPException(404, f"no dataset {name!r}") from None


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetOut,
             responses={200: {"description": "Already registered with the same contents"},
                        400: {"description": "Path outside the data root"},
                        409: {"description": "Registered with other contents"}})
def register_dataset(body: DatasetCreate, settings: SettingsDep, store: StoreDep,
                     response: Response) -> DatasetOut:
    """Register every image under ``path`` (relative to the data root), recursively."""
    try:
        directory = resolve_inside(settings.data_root, body.path)
    except PathOutsideRoot as e:
        raise HTTPException(400, str(e)) from None
    if not is_kind(directory, "dir"):
        raise HTTPException(422, f"{body.path!r} is not a directory under the data root")
    try:
        manifest = scan_image_folder(directory, confine_to=settings.data_root)
        dataset, created = store.add_dataset(body.name, directory, manifest=manifest)
    except FileOutsideRoot as e:
        raise HTTPException(400, str(e)) from None
    except DatasetChangedError as e:
        raise HTTPException(409, str(e)) from None
    response.headers["Location"] = f"/v1/datasets/{dataset.name}"
    if not created:
        response.status_code = status.HTTP_200_OK
    return dataset_out(dataset)


@router.get("", response_model=DatasetList)
def list_datasets(store: StoreDep) -> DatasetList:
    return DatasetList(datasets=[dataset_out(store.dataset(n)) for n in store.dataset_names()])


@router.get("/{name}", response_model=DatasetOut, responses={404: {"description": "Not found"}})
def get_dataset(name: str, store: StoreDep) -> DatasetOut:
    return dataset_out(find_dataset(store, name))
