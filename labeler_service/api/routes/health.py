"""Liveness, readiness and metrics: no API key (probes and scrapers have none)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from labeler_service.api.deps import RedisDep, StoreDep
from labeler_service.api.problems import problem
from labeler_service.paths import public_reason

router = APIRouter(tags=["health"])


# HEAD too, as load balancers probe (kept out of the OpenAPI document: the same answer).
@router.head("/healthz", response_class=PlainTextResponse, include_in_schema=False)
@router.get("/healthz", response_class=PlainTextResponse)
async def healthz() -> str:
    """The process is up. (async: answered on the event loop, never behind busy worker
    threads.)"""
    return "ok"


@router.head("/readyz", response_class=PlainTextResponse, include_in_schema=False)
@router.get("/readyz", response_class=PlainTextResponse,
            responses={503: {"description": "Redis or the store is unreachable, or the store "
                                            "cannot be written"}})
def readyz(client: RedisDep, store: StoreDep) -> Response:
    """Redis answers, and the store is readable and writable (jobs write to it)."""
    failures = []
    try:
        client.ping()
    except Exception as e:
        failures.append(f"redis: {e}")
    try:
        store.dataset_names()
        store.check_writable()
    except Exception as e:
        failures.append(f"store: {public_reason(str(e), store_location=store.location)}")
    if failures:
        return problem(503, "; ".join(failures))
    return PlainTextResponse("ready")


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request, client: RedisDep) -> Response:
    """Prometheus text format."""
    return Response(request.app.state.metrics.render(client), media_type=CONTENT_TYPE_LATEST)
