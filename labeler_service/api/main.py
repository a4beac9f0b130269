"""The FastAPI application: ``create_app()``; served by ``labeler api``."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager

import anyio
import redis
from fastapi import Depends, FastAPI
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from labeler_service import model_names
from labeler_service.api import problems
from labeler_service.api.deps import require_api_key
from labeler_service.api.metrics import Metrics
from labeler_service.api.routes import datasets, health, jobs, labelsets
from labeler_service.api.schemas import Problem
from labeler_service.api.server import head_too_large
from labeler_service.jobs import JobStore
from labeler_service.queue import app as celery_app
from labeler_service.queue import configure, enqueue_plan, jobs_in_broker
from labeler_service.registrations import RegistrationStore
from labeler_service.settings import Settings, get_settings
from storage import Store, StoreError

log = logging.getLogger(__name__)


class BodySizeLimit:
    """413 for request bodies over the limit, declared (Content-Length) or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # FastAPI passes an HTTPException raised while reading the body through
                # (anything else becomes a 400 "error parsing the body").
                raise HTTPException(413, f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, counting_receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problems.problem(413, f"request body over {self.max_bytes} bytes")
        await response(scope, receive, send)


class HeadSizeLimit:
    """431 for a request head (request line and headers) over the limit. The server's parser
    refuses a head that grows past it while arriving (labeler_service/api/server.py); one that
    arrives whole in a single read is parsed, and refused here."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and head_size(scope) > self.max_bytes:
            return await head_too_large(self.max_bytes)(scope, receive, send)
        await self.app(scope, receive, send)


def head_size(scope: Scope) -> int:
    """The bytes of the request line and headers as sent (give or take whitespace)."""
    line = len(scope["method"]) + len(scope["raw_path"]) + len(scope["query_string"]) + 12
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"]) + 2


class EncodedBodyRefusal:
    """415 for a request body with a Content-Encoding other than identity (RFC 9110 15.5.16):
    the routes read JSON as sent, and a gzip body read as JSON would be answered as malformed
    JSON. Refused before it is read, so nothing is decompressed (no zip bomb)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            coding = encoded_body_coding(dict(scope["headers"]))
            if coding is not None:
                response = problems.problem(
                    415, f"request bodies with Content-Encoding {coding[:64]!r} are not accepted: "
                         "send the body uncompressed", headers={"Accept-Encoding": "identity"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def encoded_body_coding(headers: dict[bytes, bytes]) -> str | None:
    """The Content-Encoding of a request that has a body, unless it is identity."""
    has_body = bool(headers.get(b"content-length", b"").lstrip(b"0")) or (
        b"transfer-encoding" in headers)
    coding = headers.get(b"content-encoding", b"").decode("latin-1").strip()
    if not has_body or coding.lower() in ("", "identity"):
        return None
    return coding


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        configure(celery_app, settings)  # jobs go to this app's Redis, whatever the environment
        app.state.settings = settings
        app.state.heatmap_renders = threading.BoundedSemaphore(settings.heatmap_concurrency)
        app.state.listings = anyio.CapacityLimiter(settings.listing_concurrency)
        # Listed in a child process (no torch here), before the first POST needs them.
        threading.Thread(target=model_names.warm, daemon=True).start()
        app.state.api_keys = [k.encode() for k in settings.api_key_list()]
        if not app.state.api_keys:
            log.warning("no API keys configured (LABELER_API_KEYS): every /v1 request gets 401")
        app.state.redis = redis.Redis.from_url(settings.redis_url, decode_responses=True,
                                               socket_timeout=5, health_check_interval=30)
        app.state.store = Store.open(settings.store)
        app.state.jobs = JobStore(app.state.redis, app.state.store, settings.job_ttl_seconds,
                                  enqueue_plan)
        app.state.registrations = RegistrationStore(app.state.redis, settings.job_ttl_seconds,
                                                    stale_after=settings.visibility_timeout)
        try:
            app.state.jobs.recover_at_start()
            retry_recovery = False
        except redis.RedisError as e:
            log.error("Redis unreachable at start (%s); /readyz will say so until it answers",
                      e)
            retry_recovery = True
        except (OSError, StoreError) as e:  # a read-only or unreachable store: serve anyway
            log.error("the store could not be read or written at start (%s); /readyz will "
                      "say so", e)
            retry_recovery = False
        stop_watching = threading.Event()
        threading.Thread(target=app.state.jobs.look_after, name="look-after-jobs", daemon=True,
                         args=(lambda: jobs_in_broker(app.state.redis), settings.stall_seconds,
                               stop_watching, retry_recovery)).start()
        yield
        stop_watching.set()
        app.state.redis.close()

    app = FastAPI(
        title="tokenlabel labeler",
        version="1",
        summary="Dense token labels from a CNN teacher, as a service.",
        lifespan=lifespan,
    )
    problems.install(app)
    metrics = Metrics()
    app.state.metrics = metrics

    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(EncodedBodyRefusal)
    app.add_middleware(HeadSizeLimit, max_bytes=settings.max_header_bytes)

    @app.middleware("http")  # outermost: sees every response, 413s and 500s included
    async def count_requests(request, call_next):
        began = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            metrics.observe_request(request.method, getattr(route, "path_format", "unmatched"),
                                    status, time.perf_counter() - began)

    app.include_router(health.router)
    secured = [Depends(require_api_key)]
    errors = {401: {"description": "No valid API key", "model": Problem},
              413: {"description": "Request body too large", "model": Problem},
              415: {"description": "Request body with a Content-Encoding: send it "
                                   "uncompressed", "model": Problem},
              503: {"description": "Redis unavailable", "model": Problem}}
    for module in (datasets, jobs, labelsets):
        app.include_router(module.router, prefix="/v1", dependencies=secured, responses=errors)
    return app
