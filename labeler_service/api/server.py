"""How ``labeler api`` serves the app: uvicorn, bounded in what a client can hold before any API
key is checked.

uvicorn's defaults let a client hold memory and connections without ever sending a request: its
httptools parser buffers a request head of any size (a 200 MB header was accepted), nothing
limits the time a connection takes to send its head (one that sends part of it stays open for
good), and connections are accepted until the process runs out of file descriptors (then
``/healthz`` and every route stop answering). Here:

- the head is parsed by h11, which refuses one that grows past ``max_header_bytes`` while it
  arrives (uvicorn's ``h11_max_incomplete_event_size``): 431, and the connection is closed, so
  a connection holds at most that much of a head (one that arrives whole in a single read is
  refused by the app, ``main.HeadSizeLimit``);
- ``GuardedH11Protocol`` closes a connection that has not sent a whole request head
  ``header_timeout`` seconds after it opened or after its previous response (uvicorn has only a
  keep-alive timeout, which the first byte of a head cancels);
- at most ``max_connections`` are open per process: one more closes the connection that has
  waited longest for a request head (an idle, slow or half-open client; never one with a
  request in flight), so a new client is served while a flood of idle connections is cut.
  uvicorn's own ``limit_concurrency`` counts idle connections as load: under such a flood it
  answers 503 to every request, ``/healthz`` included.

A reverse proxy in front (deploy/proxy/nginx.conf, a Kubernetes Ingress) bounds the same things
at the edge; these hold where the API is reached directly.
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import h11
import uvicorn
from fastapi.responses import JSONResponse
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from labeler_service.api import problems
from labeler_service.settings import get_settings

# File descriptors a process needs besides client connections: Redis connections, store files
# and pipes of the requests in the thread pool (40 threads), the log, the model-list child.
FD_RESERVE = 256


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head and a cap on connections.

    A connection is *waiting* while h11 expects a request head from it (its state IDLE): from
    when it opens, and again from the end of each response. It is never waiting while a
    request is in flight.
    """

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = get_settings()
        self.waiting_since: float | None = None
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.watch_head()
        self.make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_waiting()
        super().connection_lost(exc)

    def watch_head(self) -> None:
        """Start the head's deadline when the connection begins waiting (not again while it
        trickles a head in), stop it once a request arrives."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if not waiting:
            self.stop_waiting()
        elif self.waiting_since is None:
            self.waiting_since = self.loop.time()
            self.head_deadline = self.loop.call_later(self.limits.header_timeout,
                                                      self.head_timed_out)

    def stop_waiting(self) -> None:
        self.waiting_since = None
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def head_timed_out(self) -> None:
        self.head_deadline = None
        if self.waiting_since is not None:
            self.close_waiting()

    def close_waiting(self) -> None:
        """Close a connection that has no request in flight (nothing to answer)."""
        self.stop_waiting()
        self.transport.close()

    def make_room(self) -> None:
        """Over ``max_connections``: close the connection waiting longest for a head, or this
        new one if none is waiting. (Closing ones still count until closed: each new
        connection closes one.)"""
        if len(self.connections) <= self.limits.max_connections:
            return
        waiting = [c for c in self.connections if isinstance(c, GuardedH11Protocol)
                   and c is not self and c.waiting_since is not None]
        min(waiting, key=lambda c: c.waiting_since, default=self).close_waiting()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to every h11 parse error; a head over the limit (h11's buffer of
        unparsed bytes over it) is answered 431 instead, as RFC 6585 asks."""
        limit = self.config.h11_max_incomplete_event_size
        if limit is None or len(self.conn.trailing_data[0]) <= limit:
            return super().send_400_response(msg)
        self.send_and_close(head_too_large(limit))

    def send_and_close(self, answer: JSONResponse) -> None:
        headers = [(b"content-type", answer.media_type.encode()),
                   (b"content-length", str(len(answer.body)).encode()), (b"connection", b"close")]
        for event in (h11.Response(status_code=answer.status_code, headers=headers),
                      h11.Data(data=answer.body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


def head_too_large(limit: int) -> JSONResponse:
    return problems.problem(431, f"the request head (request line and headers) is over {limit} "
                                 "bytes")


def allow_file_descriptors(needed: int) -> None:
    """Raise this process's soft limit on open files to ``needed`` if it is lower; refuse to
    start if the hard limit is lower (the connection cap would not protect anything)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise ValueError(f"LABELER_MAX_CONNECTIONS needs {needed} open files with the "
                             f"API's own, but this process may open {hard} (ulimit -Hn): lower "
                             "LABELER_MAX_CONNECTIONS or raise the limit")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def serve(host: str, port: int, workers: int) -> None:
    """Run the API under uvicorn with the limits above (settings from LABELER_* variables)."""
    limits = get_settings()
    allow_file_descriptors(limits.max_connections + FD_RESERVE)
    uvicorn.run("labeler_service.api.main:create_app", factory=True, host=host, port=port,
                workers=workers, proxy_headers=True, log_level="info",
                http=f"{__name__}:GuardedH11Protocol",
                h11_max_incomplete_event_size=limits.max_header_bytes)
