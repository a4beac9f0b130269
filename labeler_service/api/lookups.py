"""Lookups the routes share, as HTTP answers: 404 for what does not exist, 409 for what is not
ready yet."""

from __future__ import annotations

from fastapi import HTTPException

from labeler_service.registrations import Registration, RegistrationStore, lookup
from storage import Dataset, Store


def find_dataset(store: Store, registrations: RegistrationStore, name: str) -> Dataset:
    """A ready dataset, for routes that use one: 404 if unknown, 409 if not ready."""
    found = lookup(store, registrations, name)
    if found is None:
        raise HTTPException(404, f"no dataset {name!r}")
    if isinstance(found, Registration):
        if found.state == "registering":
            raise HTTPException(409, f"dataset {name!r} is still registering: poll "
                                     f"GET /v1/datasets/{name} until its state is ready")
        raise HTTPException(409, f"dataset {name!r} failed to register ({found.error}); "
                                 "POST /v1/datasets again to retry")
    return found
