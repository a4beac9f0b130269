"""Dependencies: the API key check and the per-app services (settings, Redis, store, jobs,
dataset registrations)."""

from __future__ import annotations

import hmac
from typing import Annotated

import redis
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from labeler_service.jobs import JobStore
from labeler_service.registrations import RegistrationStore
from labeler_service.settings import Settings
from storage import Store

bearer = HTTPBearer(auto_error=False, description="An API key from LABELER_API_KEYS.")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


def get_redis(request: Request) -> redis.Redis:
    return request.app.state.redis


def get_jobs(request: Request) -> JobStore:
    return request.app.state.jobs


def get_registrations(request: Request) -> RegistrationStore:
    return request.app.state.registrations


def require_api_key(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    keys: list[bytes] = request.app.state.api_keys
    given = credentials.credentials.encode() if credentials else b""
    # Compare against every key, always: the time taken says nothing about which key matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    if not given or not matched:
        raise HTTPException(401, "a valid API key is required: Authorization: Bearer <key>",
                            headers={"WWW-Authenticate": "Bearer"})


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]
RedisDep = Annotated[redis.Redis, Depends(get_redis)]
JobsDep = Annotated[JobStore, Depends(get_jobs)]
RegistrationsDep = Annotated[RegistrationStore, Depends(get_registrations)]
