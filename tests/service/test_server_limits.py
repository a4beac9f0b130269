"""What a client can hold of the API before any key is checked, over the real server:
``labeler api`` (uvicorn) in a subprocess, raw sockets where a well-behaved HTTP client would not
do what an attacker does (issue 23: A47/A48, A45, HEAD probes, R17)."""

from __future__ import annotations

import gzip
import json
import resource
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from storage import LabelSetConfig, Store, TeacherSpec
from tests.service.conftest import API_KEY, Cluster

pytestmark = pytest.mark.slow
PROBLEM = "application/problem+json"


def connect(cluster: Cluster) -> socket.socket:
    return socket.create_connection(("127.0.0.1", cluster.port), timeout=10)


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """The server closed ``sock`` (EOF, or a reset) within ``within`` seconds; what it sent
    before closing (a 431, say) is read and dropped."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def send_until_refused(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; False if the server closed the connection part-way."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def request_head(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: api", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- A48: request heads ----------------------------------------------------------------------

def test_a_request_head_over_the_limit_is_refused_and_holds_no_memory(cluster: Cluster):
    """A 200 MB header was accepted, and 6 partial 60 MB headers added 400 MB. Now a head over
    LABELER_MAX_HEADER_BYTES (16 KiB) is answered 431 and its connection closed: partial heads of
    16 MB each add nothing while they are held open."""
    cluster.start_api()
    with httpx.Client(base_url=cluster.url) as client:
        padded = client.get("/healthz", headers={"X-Pad": "a" * 8000})
        assert padded.status_code == 200  # a large but reasonable head still passes
        too_large = client.get("/healthz", headers={"X-Pad": "a" * 20_000})
    assert too_large.status_code == 431 and too_large.headers["content-type"] == PROBLEM
    assert "16384 bytes" in too_large.json()["detail"]

    before = rss_bytes(cluster.api.pid)
    held = [connect(cluster) for _ in range(6)]
    partial = b"GET /healthz HTTP/1.1\r\nHost: api\r\nX-Pad: " + b"a" * (16 << 20)
    try:
        refused = [not send_until_refused(sock, partial) for sock in held]
        grown = rss_bytes(cluster.api.pid) - before
        assert grown < 16 << 20, f"the API grew by {grown >> 20} MiB"
        assert all(refused)
        assert all(closed_by_server(sock, within=5) for sock in held)
    finally:
        for sock in held:
            sock.close()


def test_a_connection_that_sends_part_of_a_head_is_closed_after_the_timeout(cluster: Cluster):
    """A connection that never completes its request head (silent, or trickling a header line
    at a time) is closed LABELER_HEADER_TIMEOUT seconds after it opened, not kept for good; a
    slow client that completes its head within the time is answered."""
    cluster.settings["LABELER_HEADER_TIMEOUT"] = "2"
    cluster.start_api()
    began = time.monotonic()
    silent, trickling = connect(cluster), connect(cluster)
    try:
        trickling.sendall(b"GET /healthz HTTP/1.1\r\nHost: api\r\n")
        while time.monotonic() - began < 20:
            if not send_until_refused(trickling, b"X-Slow: 1\r\n"):
                break
            time.sleep(0.2)
        closed_after = time.monotonic() - began
        assert 2 <= closed_after < 20, "the trickling connection was not closed"
        assert closed_by_server(silent, within=20 - closed_after)
    finally:
        silent.close()
        trickling.close()

    with connect(cluster) as slow:
        for line in request_head("/healthz").splitlines(keepends=True):
            slow.sendall(line)
            time.sleep(0.1)
        assert slow.recv(4096).startswith(b"HTTP/1.1 200")


# -- A47: connections --------------------------------------------------------------------------

def test_idle_connections_past_the_cap_are_closed_and_healthz_answers(cluster: Cluster):
    """About 20,000 idle connections used up the API's file descriptors: /healthz and every
    route stopped answering. Here the API may open 200 files and keeps at most 50 connections
    (LABELER_MAX_CONNECTIONS): of 250 idle ones, the oldest are closed as new ones come, and a
    new client's /healthz is answered."""
    cluster.settings["LABELER_MAX_CONNECTIONS"] = "50"
    cluster.start_api()
    resource.prlimit(cluster.api.pid, resource.RLIMIT_NOFILE, (200, 200))
    idle = [connect(cluster) for _ in range(250)]
    try:
        with httpx.Client(base_url=cluster.url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200
        still_open = [sock for sock in idle if not closed_by_server(sock, within=0.05)]
        assert len(still_open) <= 50
        assert idle[0] not in still_open and idle[-1] in still_open  # the oldest went first
    finally:
        for sock in idle:
            sock.close()


def test_the_api_raises_its_open_files_limit_for_its_connections_or_says_why_not(
        cluster: Cluster):
    """The connection cap protects only if the process may open that many files: a soft limit
    below it is raised; a hard limit below it is one line and exit 1."""
    command = [sys.executable, "-m", "labeler_service", "api", "--port", str(cluster.port)]

    def limited(soft: int, hard: int):
        return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    refused = subprocess.run(command, env={**cluster.env, "LABELER_MAX_CONNECTIONS": "5000"},
                             preexec_fn=limited(1024, 1024), capture_output=True, text=True,
                             timeout=60)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        "Error: LABELER_MAX_CONNECTIONS needs 5256 open files with the API's own, but this "
        "process may open 1024 (ulimit -Hn): lower LABELER_MAX_CONNECTIONS or raise the limit"]

    cluster.settings["LABELER_MAX_CONNECTIONS"] = "500"
    cluster.api = subprocess.Popen(command, env=cluster.env, preexec_fn=limited(300, 4096),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
    deadline = time.monotonic() + 60
    while not answers(cluster) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert resource.prlimit(cluster.api.pid, resource.RLIMIT_NOFILE) == (756, 4096)


def answers(cluster: Cluster) -> bool:
    try:
        return httpx.get(f"{cluster.url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# -- A45, HEAD probes ----------------------------------------------------------------------------

def test_a_compressed_body_is_refused_with_415(cluster: Cluster):
    """A gzip body was answered "nested too deeply?"; any Content-Encoding but identity on a
    body is 415, with Accept-Encoding: identity (RFC 9110), and nothing is registered."""
    cluster.start_api()
    body = json.dumps({"name": "toy", "path": "toy"}).encode()
    with cluster.client() as client:
        for coding in ("gzip", "deflate, gzip", "br"):
            r = client.post("/v1/datasets", content=gzip.compress(body),
                            headers={"Content-Type": "application/json",
                                     "Content-Encoding": coding})
            assert r.status_code == 415 and r.headers["content-type"] == PROBLEM, r.text
            assert r.headers["accept-encoding"] == "identity"
            assert coding in r.json()["detail"] and "uncompressed" in r.json()["detail"]
        assert client.get("/v1/datasets").json()["datasets"] == []
        plain = client.post("/v1/datasets", content=body,
                            headers={"Content-Type": "application/json",
                                     "Content-Encoding": "identity"})
        assert plain.status_code == 202, plain.text
        # A request without a body is not refused for the header alone.
        assert client.get("/v1/datasets", headers={"Content-Encoding": "gzip"}).status_code == 200


def test_head_on_the_probes(cluster: Cluster):
    """Load balancers probe with HEAD: /healthz and /readyz answer it as GET, without a body."""
    cluster.start_api()
    with httpx.Client(base_url=cluster.url) as client:
        for path in ("/healthz", "/readyz"):
            r = client.head(path)
            assert r.status_code == 200 and r.content == b"", (path, r.status_code)
            assert r.headers["content-type"].startswith("text/plain")


# -- R17: listings in flight -----------------------------------------------------------------

def many_datasets(cluster: Cluster, count: int) -> str:
    """``count`` datasets of the same 12 images, and an empty label set on the first; its id."""
    store = Store.open(cluster.root / "store")
    for i in range(count):
        store.add_dataset(f"bulk{i:03d}", cluster.root / "data" / "toy")
    dataset = store.dataset("bulk000")
    teacher = TeacherSpec(model="test_nfnet", checkpoint_sha256=None, num_classes=3,
                          input_size=64, class_names=tuple(dataset.class_names))
    return dataset.create_labelset(LabelSetConfig(
        teacher=teacher, topk=2, grid=(2, 2), dataset_fingerprint=dataset.fingerprint,
        shard_size=4)).id


def answered_in_order(cluster: Cluster, requests: dict[str, bytes]) -> list[str]:
    """Send each request on its own connection, in order, then the names of the requests in
    the order their whole responses arrived (each asks the server to close once answered)."""
    selector = selectors.DefaultSelector()
    for name, head in requests.items():
        sock = connect(cluster)
        sock.sendall(head)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, (name, []))
    order = []
    deadline = time.monotonic() + 300
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=1):
            name, chunks = key.data
            chunk = key.fileobj.recv(1 << 20)
            chunks.append(chunk)
            if not chunk:
                assert b"".join(chunks).startswith(b"HTTP/1.1 200"), (name, chunks[:1])
                order.append(name)
                selector.unregister(key.fileobj)
                key.fileobj.close()
    assert not selector.get_map(), f"unanswered after 300 s: {len(selector.get_map())}"
    return order


def test_dataset_listings_in_flight_leave_other_routes_answering(cluster: Cluster):
    """200 concurrent GET /v1/datasets held every thread of the shared pool (p50 50 s), and an
    image's labels waited behind them (39.8 s). With 80 listings sent first, /healthz and an
    image's labels (a sync route) are answered before a quarter of the listings are: listings
    run a few at a time in threads of their own (LABELER_LISTING_CONCURRENCY)."""
    labelset = many_datasets(cluster, 20)
    cluster.start_api()
    auth = f"Authorization: Bearer {API_KEY}"
    listings = 80
    requests = {f"list{i}": request_head("/v1/datasets?page_size=500", auth,
                                         "Connection: close") for i in range(listings)}
    requests["healthz"] = request_head("/healthz", "Connection: close")
    requests["image"] = request_head(f"/v1/labelsets/{labelset}/images/0", auth,
                                     "Connection: close")
    order = answered_in_order(cluster, requests)
    assert order.index("healthz") < listings // 4, order
    assert order.index("image") < listings // 4, order
    with cluster.client() as client:  # and every listing was whole
        assert len(client.get("/v1/datasets").json()["datasets"]) == 20


def test_a_body_sent_too_slowly_is_cut_and_cannot_lock_other_clients_out(cluster: Cluster):
    """Review of A47: a request whose head is whole but whose body trickles in (a byte every
    few seconds, no key: FastAPI reads the body before any key is checked) held its connection
    for good, and 5 of them locked every new client out with LABELER_MAX_CONNECTIONS=5. Now a
    body not sent LABELER_BODY_TIMEOUT seconds after its head is cut, and a new client closes
    the connection that has owed its input the longest."""
    cluster.settings.update({"LABELER_MAX_CONNECTIONS": "5", "LABELER_BODY_TIMEOUT": "3",
                             "LABELER_HEADER_TIMEOUT": "30"})
    cluster.start_api()
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: api\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{")
    slow = [connect(cluster) for _ in range(5)]
    try:
        for sock in slow:
            sock.sendall(head)
        with httpx.Client(base_url=cluster.url, timeout=10) as client:
            assert client.get("/healthz").status_code == 200  # the oldest slow body made room
        began = time.monotonic()
        for sock in slow[1:]:
            send_until_refused(sock, b" ")
        assert all(closed_by_server(sock, within=20) for sock in slow)
        assert time.monotonic() - began < 20
    finally:
        for sock in slow:
            sock.close()
