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
  keep-alive timeout, which the first byte of a head cancels), or a whole body
  ``body_timeout`` seconds after its head (FastAPI reads the body before any key is checked);
- at most ``max_connections`` are open per process: one more closes the connection that has
  owed a head or a body the longest (an idle, slow or half-open client; never one the app is
  answering), so a new client is served while a flood of stalled connections is cut; when every
  connection is being answered, the new one gets a 503. uvicorn's own ``limit_concurrency``
  counts idle connections as load: under such a flood it answers 503 to every request,
  ``/healthz`` included.

A reverse proxy in front (deploy/proxy/nginx.conf, a Kubernetes Ingress) bounds the same things
at the edge, and connections per client address, which the API does not: these bounds hold
where the API is reached directly, but ``max_connections`` clients each answered slowly (a
slow reader of large answers) still fill it.
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
_BUSY_BODY = b'{"type":"about:blank","title":"Service Unavailable","status":503,' \
    b'"detail":"every connection of this API process is being answered; retry"}'
# Written raw: the new connection has sent no request yet, and h11 answers only requests.
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n"
        b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
        + str(len(_BUSY_BODY)).encode() + b"\r\n\r\n" + _BUSY_BODY)


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with deadlines on what a client owes and a cap on connections.

    A connection *owes* a request head while h11 expects one from it (its state IDLE: from when
    it opens, and again from the end of each response), then the request's body while it is
    being sent (SEND_BODY). Each has a deadline from when it became owed (trickling bytes does
    not restart it): ``header_timeout`` for a head, ``body_timeout`` for a body (bodies are at
    most ``max_body_bytes``). A connection owes nothing while the app answers it.
    """

    def __init__(self, config: Config, server_state: ServerState, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = get_settings()
        self.owed: Any = None  # h11.IDLE (a head) or h11.SEND_BODY (a body), or None
        self.owed_since: float | None = None
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.watch_input()
        self.make_room()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch_input()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.watch_input()

    def connection_lost(self, exc: Exception | None) -> None:
        self.stop_watching()
        super().connection_lost(exc)

    def watch_input(self) -> None:
        """Start a deadline when the connection comes to owe a head or a body; stop it once
        that has arrived."""
        state = self.conn.their_state
        owed = state if state in (h11.IDLE, h11.SEND_BODY) and \
            not self.transport.is_closing() else None
        if owed is self.owed:
            return
        self.stop_watching()
        if owed is not None:
            self.owed, self.owed_since = owed, self.loop.time()
            timeout = (self.limits.header_timeout if owed is h11.IDLE
                       else self.limits.body_timeout)
            self.deadline = self.loop.call_later(timeout, self.close_stalled)

    def stop_watching(self) -> None:
        self.owed = self.owed_since = None
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def close_stalled(self) -> None:
        """Close a connection that did not send what it owes in time: before its head there is
        nothing to answer; mid-body, the app sees the client gone (``http.disconnect``)."""
        self.stop_watching()
        self.transport.close()

    def make_room(self) -> None:
        """Over ``max_connections``: close the connection that has owed a head or a body the
        longest (idle, slow or half-open clients; never one the app is answering), or, if
        every other connection is being answered, answer this new one 503. (Closing ones
        still count until closed: each new connection closes one.)"""
        if len(self.connections) <= self.limits.max_connections:
            return
        owing = [c for c in self.connections if isinstance(c, GuardedH11Protocol)
                 and c is not self and c.owed_since is not None]
        if owing:
            min(owing, key=lambda c: c.owed_since).close_stalled()
        else:
            self.stop_watching()
            self.transport.write(BUSY)
            self.transport.close()

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
