"""Errors as RFC 9457 ``application/problem+json``, validation errors included."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from storage import ManifestDamaged

MEDIA_TYPE = "application/problem+json"
BODY_PARSE_ERROR = "There was an error parsing the body"


def problem(status: int, detail: Any = None, headers: dict[str, str] | None = None,
            **extra: Any) -> JSONResponse:
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status}
    if detail is not None:
        body["detail"] = detail
    body.update(extra)
    return JSONResponse(body, status_code=status, media_type=MEDIA_TYPE, headers=headers)


def install(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_problem(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == BODY_PARSE_ERROR:
            # FastAPI's answer when json.loads itself raises (a RecursionError on deeply nested
            # JSON): as for any other body that is not valid JSON, 422.
            return problem(422, "the request body is not valid JSON (not UTF-8, or nested too "
                                "deeply)")
        return problem(exc.status_code, exc.detail, headers=getattr(exc, "headers", None))

    @app.exception_handler(ManifestDamaged)
    async def manifest_problem(request: Request, exc: ManifestDamaged) -> JSONResponse:
        # What the damaged columns give is wrong (paths glued together, digests cut short):
        # nothing is served from them. Not a 5xx: retrying cannot help, registering the
        # dataset again does, and the detail (naming the dataset, no server path) says so.
        return problem(409, str(exc))

    @app.exception_handler(redis.RedisError)
    async def redis_problem(request: Request, exc: redis.RedisError) -> JSONResponse:
        return problem(503, f"Redis is unavailable: {type(exc).__name__}",
                       headers={"Retry-After": "5"})

    @app.exception_handler(RequestValidationError)
    async def validation_problem(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
                  for e in exc.errors()]
        return problem(422, "the request is not valid", errors=errors)
