"""The upstream client (proxy/forward.py, proxy/h1/) against real servers on loopback.

Each upstream here is a small asyncio server that reads the raw request and answers with
crafted bytes, so a test controls exactly what is on the wire: framing, interim answers,
broken answers, stalls and disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import random
import socket
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.forward import (
    Forwarder,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.h1.connection import _HIGH_WATER

# (pytest-asyncio 1.4's replacement, the pytest_asyncio_loop_factories hook, would apply to the
# whole suite from a conftest; this module alone runs on both loops.)
pytestmark = pytest.mark.filterwarnings(
    'ignore:Overriding the "event_loop_policy" fixture is deprecated'
)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every test runs on both loops: `countersign run` uses uvloop, the in-process tests
    asyncio's own; their transports differ in the details."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()


# ---------------------------------------------------------------------------- raw upstream


@dataclass
class Received:
    """One request as the upstream read it off the wire."""

    connection: int  # which TCP connection (1, 2, ...) it came on
    request_line: str
    headers: list[tuple[str, str]]
    body: bytes  # de-chunked
    wire_body: bytes  # as sent, chunked framing included

    @property
    def method(self) -> str:
        return self.request_line.split(" ")[0]

    @property
    def target(self) -> str:
        return self.request_line.split(" ")[1]

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


Handler = Callable[[Received, asyncio.StreamWriter], Awaitable[None]]


async def _read_request(
    reader: asyncio.StreamReader, connection: int, read_body: bool = True
) -> Received | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    request_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    headers = []
    for line in lines:
        name, _, value = line.partition(":")
        headers.append((name, value.strip()))
    names = {k.lower(): v for k, v in headers}
    body = b""
    wire = b""
    if not read_body:
        pass
    elif names.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            wire += size_line
            size = int(size_line.strip(), 16)
            data = await reader.readexactly(size + 2)
            wire += data
            assert data.endswith(b"\r\n"), "a chunk must end with CRLF"
            if size == 0:
                break
            body += data[:-2]
    elif "content-length" in names:
        body = wire = await reader.readexactly(int(names["content-length"]))
    return Received(connection, request_line, headers, body, wire)


@dataclass
class RawUpstream:
    """An HTTP/1.1 upstream on 127.0.0.1: `handler` writes whatever bytes it likes per request
    (closing the writer ends the connection)."""

    handler: Handler
    read_bodies: bool = True  # False: the handler answers with the request body unread
    tls: ssl.SSLContext | None = None  # serve HTTPS with this context
    connections: int = 0
    requests: list[Received] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        number = self.connections
        try:
            while not writer.is_closing():
                request = await _read_request(reader, number, self.read_bodies)
                if request is None:
                    break
                self.requests.append(request)
                await self.handler(request, writer)
                if not writer.is_closing():
                    await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._server.wait_closed()


def answer(*responses: bytes) -> Handler:
    """Answer the n-th request (across connections) with responses[n]; the last one repeats."""
    count = 0

    async def handler(_: Received, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        writer.write(responses[min(count, len(responses) - 1)])
        count += 1

    return handler


async def never_answer(_: Received, __: asyncio.StreamWriter) -> None:
    await asyncio.sleep(3600)


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

Serve = Callable[..., Awaitable[RawUpstream]]
MakeForwarder = Callable[..., Forwarder]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    servers: list[RawUpstream] = []

    async def start(
        handler: Handler, read_bodies: bool = True, tls: ssl.SSLContext | None = None
    ) -> RawUpstream:
        server = RawUpstream(handler, read_bodies, tls)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def make_forwarder() -> AsyncIterator[MakeForwarder]:
    forwarders: list[Forwarder] = []

    def make(**kwargs: Any) -> Forwarder:
        kwargs.setdefault("read_timeout", 2.0)
        kwargs.setdefault("connect_timeout", 2.0)
        forwarder = Forwarder(**kwargs)
        forwarders.append(forwarder)
        return forwarder

    yield make
    for forwarder in forwarders:
        await forwarder.aclose()


@pytest.fixture
def forwarder(make_forwarder: MakeForwarder) -> Forwarder:
    return make_forwarder()


async def read_body(response: UpstreamResponse) -> bytes:
    """The whole body through read(), then the connection back to the pool."""
    parts = []
    while chunk := await response.read():
        parts.append(chunk)
    response.release()
    return b"".join(parts)


async def fetch(
    forwarder: Forwarder,
    url: str,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: AsyncIterable[bytes] | bytes | None = None,
    **kwargs: Any,
) -> tuple[UpstreamResponse, bytes]:
    response = await forwarder.send(method, url, headers or [], body, **kwargs)
    return response, await read_body(response)


async def wait_until(condition: Callable[[], bool], within: float = 1.0) -> None:
    """Poll for a state change nothing signals (a connection the pool saw close, ...)."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.005)


# ---------------------------------------------------------------------------- a plain exchange


async def test_get_returns_the_answer_without_hop_by_hop_headers(
    serve: Serve, forwarder: Forwarder
) -> None:
    server = await serve(
        answer(
            b"HTTP/1.1 201 Made It\r\n"
            b"Content-Type: text/plain\r\n"
            b"Connection: keep-alive, X-Upstream-Secret\r\n"
            b"Keep-Alive: timeout=5\r\n"
            b"X-Upstream-Secret: hop\r\n"
            b"Set-Cookie: a=1\r\n"
            b"Set-Cookie: b=2\r\n"
            b"Content-Length: 5\r\n"
            b"\r\n"
            b"hello"
        )
    )
    response, body = await fetch(
        forwarder,
        server.url + "/a%2Fb?x=1&y=%20",
        headers=[
            ("X-Request-Id", "r-1"),
            ("Accept", "a"),
            ("Accept", "b"),
        ],
    )
    assert (response.status, response.reason, body) == (201, "Made It", b"hello")
    assert response.headers == [
        ("Content-Type", "text/plain"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Content-Length", "5"),
    ]
    assert response.content_length == 5
    [request] = server.requests
    assert request.request_line == "GET /a%2Fb?x=1&y=%20 HTTP/1.1", "the target is sent as given"
    assert request.all("Host") == [f"127.0.0.1:{server.port}"], "Host is the upstream's netloc"
    assert request.get("X-Request-Id") == "r-1"
    assert request.all("Accept") == ["a", "b"]
    assert request.get("Content-Length") is None and request.get("Transfer-Encoding") is None


async def test_url_without_a_path_asks_for_slash(serve: Serve, forwarder: Forwarder) -> None:
    server = await serve(answer(OK))
    _, body = await fetch(forwarder, server.url)
    assert body == b"ok"
    assert server.requests[0].request_line == "GET / HTTP/1.1"


async def test_not_an_http_url_is_refused(forwarder: Forwarder) -> None:
    with pytest.raises(UpstreamUnavailable, match="not an http"):
        await forwarder.send("GET", "ftp://127.0.0.1/x", [], None)


# ---------------------------------------------------------------------------- keep-alive


async def test_sequential_requests_share_one_connection(serve: Serve, forwarder: Forwarder) -> None:
    server = await serve(answer(OK))
    for _ in range(3):
        _, body = await fetch(forwarder, server.url + "/")
        assert body == b"ok"
    assert server.connections == 1
    assert [r.connection for r in server.requests] == [1, 1, 1]
    assert forwarder.open_connections == 1


async def test_connection_close_from_the_upstream_means_a_new_connection(
    serve: Serve, forwarder: Forwarder
) -> None:
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    server = await serve(answer(closing, OK))
    first, _ = await fetch(forwarder, server.url + "/")
    assert first.headers == [("Content-Length", "2")]
    await fetch(forwarder, server.url + "/")
    assert [r.connection for r in server.requests] == [1, 2]


async def test_http_1_0_answer_is_not_kept_alive(serve: Serve, forwarder: Forwarder) -> None:
    server = await serve(answer(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"))
    for _ in range(2):
        _, body = await fetch(forwarder, server.url + "/")
        assert body == b"ok"
    assert server.connections == 2


async def test_upstream_closing_an_idle_connection_is_noticed(
    serve: Serve, forwarder: Forwarder
) -> None:
    async def answer_then_close(_: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(OK)  # keep-alive by default, yet the upstream closes once idle
        await writer.drain()
        writer.close()

    server = await serve(answer_then_close)
    await fetch(forwarder, server.url + "/")
    await wait_until(lambda: forwarder.open_connections == 0)
    _, body = await fetch(forwarder, server.url + "/")
    assert body == b"ok" and server.connections == 2


async def test_get_on_a_connection_the_upstream_dropped_is_retried(
    serve: Serve, forwarder: Forwarder
) -> None:
    """The upstream closes its idle connection just as it is reused: the request is lost unanswered;
    a GET goes again on a new connection, and the caller never knows."""

    async def drop_second_request_on_first_connection(
        request: Received, writer: asyncio.StreamWriter
    ) -> None:
        if request.connection == 1 and len(server.requests) == 2:
            writer.close()  # read, never answered
        else:
            writer.write(OK)

    server = await serve(drop_second_request_on_first_connection)
    await fetch(forwarder, server.url + "/one")
    response, body = await fetch(forwarder, server.url + "/two")
    assert (response.status, body) == (200, b"ok")
    assert [(r.connection, r.target) for r in server.requests] == [
        (1, "/one"),
        (1, "/two"),
        (2, "/two"),
    ]


async def test_post_on_a_connection_the_upstream_dropped_is_not_retried(
    serve: Serve, forwarder: Forwarder
) -> None:
    async def drop_the_post(request: Received, writer: asyncio.StreamWriter) -> None:
        if request.method == "POST":
            writer.close()
        else:
            writer.write(OK)

    server = await serve(drop_the_post)
    await fetch(forwarder, server.url + "/")
    with pytest.raises(UpstreamUnavailable, match="closed the connection"):
        await forwarder.send("POST", server.url + "/pay", [], b'{"amount": 1}')
    await asyncio.sleep(0.05)  # a retry, if any, would have arrived by now
    assert [(r.connection, r.method) for r in server.requests] == [(1, "GET"), (1, "POST")]
    assert server.connections == 1


async def test_get_with_no_answer_on_a_reused_connection_times_out_once(
    serve: Serve, forwarder: Forwarder
) -> None:
    """A read timeout is the upstream being slow, not a stale connection: the GET is not sent
    again (which would double both the wait and the upstream's work)."""

    async def answer_first_only(request: Received, writer: asyncio.StreamWriter) -> None:
        if len(server.requests) == 1:
            writer.write(OK)
        else:
            await asyncio.sleep(3600)

    server = await serve(answer_first_only)
    await fetch(forwarder, server.url + "/")
    with pytest.raises(UpstreamTimeout):
        await forwarder.send("GET", server.url + "/slow", [], None, read_timeout=0.2)
    await asyncio.sleep(0.05)  # a second try would have arrived at once
    assert [r.target for r in server.requests] == ["/", "/slow"]


# ---------------------------------------------------------------------------- strict parsing


@pytest.mark.parametrize(
    "wire",
    [
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n",
            id="content-length-and-transfer-encoding",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            id="two-content-lengths",
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello!",
            id="content-length-list",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", id="negative-length"),
        pytest.param(b"garbage\r\n\r\n", id="garbage-status-line"),
        pytest.param(b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", id="bad-status-code"),
        pytest.param(b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n", id="space-in-header-name"),
    ],
)
async def test_invalid_answer_is_502(serve: Serve, forwarder: Forwarder, wire: bytes) -> None:
    server = await serve(answer(wire, OK))
    with pytest.raises(UpstreamUnavailable):
        await fetch(forwarder, server.url + "/")
    _, body = await fetch(forwarder, server.url + "/")  # the broken connection is not reused
    assert body == b"ok" and server.connections == 2


@pytest.mark.parametrize("connection", [b"", b"Connection: upgrade\r\n"])
async def test_switching_protocols_is_502(
    serve: Serve, forwarder: Forwarder, connection: bytes
) -> None:
    """The proxy never asks for an upgrade: a 101 is a broken answer, not a bodiless one."""
    server = await serve(
        answer(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n%b\r\nxyz" % connection, OK)
    )
    with pytest.raises(UpstreamUnavailable, match="switched protocols"):
        await forwarder.send("GET", server.url + "/", [], None)
    _, body = await fetch(forwarder, server.url + "/")
    assert body == b"ok" and server.connections == 2


@pytest.mark.parametrize(
    ("method", "wire"),
    [
        pytest.param(
            "GET", OK + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL", id="second-answer"
        ),
        pytest.param("GET", OK + b"HTTP/1.1 200 OK\r\n", id="start-of-an-answer"),
        pytest.param("GET", OK + b"junk", id="junk"),
        pytest.param("GET", b"HTTP/1.1 204 No Content\r\n\r\n" + OK, id="answer-after-204"),
        pytest.param(
            "HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", id="head-with-body"
        ),
    ],
)
async def test_bytes_beyond_the_answer_drop_the_connection(
    serve: Serve, forwarder: Forwarder, method: str, wire: bytes
) -> None:
    """More than the answer, even in the same packet: the connection's framing is off, and
    whatever follows must never be taken for the answer to the next request."""
    server = await serve(answer(wire, OK))
    response = await forwarder.send(method, server.url + "/", [], None)
    assert response.status in (200, 204)
    await read_body(response)
    _, body = await fetch(forwarder, server.url + "/")
    assert body == b"ok" and server.connections == 2


async def test_malformed_chunk_size_fails_the_body(serve: Serve, forwarder: Forwarder) -> None:
    server = await serve(
        answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")
    )
    response = await forwarder.send("GET", server.url + "/", [], None)
    assert response.status == 200  # the head was valid; the body is not
    with pytest.raises(UpstreamUnavailable, match="invalid response"):
        await response.read()
    response.close()


async def test_answer_without_framing_ends_with_the_connection(
    serve: Serve, forwarder: Forwarder
) -> None:
    async def until_close(_: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"second part")
        await writer.drain()
        writer.close()

    server = await serve(until_close)
    response, body = await fetch(forwarder, server.url + "/")
    assert response.content_length is None
    assert body == b"first part, second part"
    _, body = await fetch(forwarder, server.url + "/")
    assert body == b"first part, second part" and server.connections == 2


# ---------------------------------------------------------------------------- bodies


async def test_chunked_answer_is_dechunked(serve: Serve, forwarder: Forwarder) -> None:
    server = await serve(
        answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kept: 1\r\n\r\n"
            b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
        )
    )
    response, body = await fetch(forwarder, server.url + "/")
    assert body == b"hello world"
    assert response.headers == [("X-Kept", "1")]
    assert response.content_length is None
    await fetch(forwarder, server.url + "/")
    assert server.connections == 1


async def test_trailer_fields_are_not_taken_for_headers(serve: Serve, forwarder: Forwarder) -> None:
    server = await serve(
        answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Kept: 1\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Trailer: late\r\nX-Other: later\r\n\r\n"
        )
    )
    response, body = await fetch(forwarder, server.url + "/")
    assert body == b"hello"
    assert response.headers == [("X-Kept", "1")]
    await fetch(forwarder, server.url + "/")
    assert server.connections == 1


async def test_large_body_streams_in_pieces_and_arrives_intact(
    serve: Serve, forwarder: Forwarder
) -> None:
    payload = random.Random(7).randbytes(3 * 1024 * 1024 // 2)

    async def big(_: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(payload))
        for i in range(0, len(payload), 100_000):
            writer.write(payload[i : i + 100_000])
            await writer.drain()

    server = await serve(big)
    response = await forwarder.send("GET", server.url + "/", [], None)
    assert response.content_length == len(payload)
    chunks = []
    while chunk := await response.read():
        chunks.append(chunk)
        await asyncio.sleep(0)  # a reader slower than the socket: flow control kicks in
    response.release()
    assert len(chunks) > 1
    assert b"".join(chunks) == payload
    await fetch(forwarder, server.url + "/")
    assert server.connections == 1


async def test_complete_body_taken_at_once_leaves_the_connection_usable(
    serve: Serve, forwarder: Forwarder
) -> None:
    """A body just over the flow-control mark arrives whole (reading paused on its last byte);
    taking it with read_all() must resume reading, or the next exchange on this pooled
    connection would never see its answer."""
    payload = b"x" * (_HIGH_WATER + 1)
    server = await serve(
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(payload), payload), OK)
    )
    response = await forwarder.send("GET", server.url + "/", [], None)
    await wait_until(lambda: response.body_complete)
    assert response.read_all() == payload
    response.release()
    _, body = await asyncio.wait_for(
        fetch(forwarder, server.url + "/", read_timeout=0.3), timeout=1.0
    )
    assert body == b"ok"
    assert server.connections == 1


async def test_small_answer_is_complete_with_its_head(serve: Serve, forwarder: Forwarder) -> None:
    server = await serve(answer(OK))
    response = await forwarder.send("GET", server.url + "/", [], None)
    await wait_until(lambda: response.body_complete)
    assert response.read_all() == b"ok"
    response.release()
    await fetch(forwarder, server.url + "/")
    assert server.connections == 1


@pytest.mark.parametrize(
    ("framing", "length"),
    [(b"Content-Length: 5\r\n", 5), (b"Transfer-Encoding: chunked\r\n", None)],
)
async def test_head_answer_has_no_body_and_keeps_the_connection(
    serve: Serve, forwarder: Forwarder, framing: bytes, length: int | None
) -> None:
    server = await serve(
        answer(b"HTTP/1.1 200 OK\r\n%bContent-Type: text/plain\r\n\r\n" % framing, OK)
    )
    response = await asyncio.wait_for(forwarder.send("HEAD", server.url + "/", [], None), 0.5)
    assert response.status == 200 and response.content_length == length
    assert response.body_complete
    assert await asyncio.wait_for(response.read(), 0.5) == b""
    response.release()
    _, body = await fetch(forwarder, server.url + "/")
    assert body == b"ok"
    assert [(r.connection, r.method) for r in server.requests] == [(1, "HEAD"), (1, "GET")]


async def test_head_answer_without_framing_completes_at_once(
    serve: Serve, forwarder: Forwarder
) -> None:
    server = await serve(answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", OK))
    response = await asyncio.wait_for(forwarder.send("HEAD", server.url + "/", [], None), 0.5)
    assert await asyncio.wait_for(response.read(), 0.5) == b""
    response.release()
    _, body = await fetch(forwarder, server.url + "/")
    assert body == b"ok"


async def test_204_and_304_have_no_body(serve: Serve, forwarder: Forwarder) -> None:
    server = await serve(
        answer(
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nContent-Length: 10\r\n\r\n',
            OK,
        )
    )
    for status in (204, 304):
        response = await forwarder.send("GET", server.url + "/", [], None)
        assert response.status == status and response.content_length is None
        assert await asyncio.wait_for(response.read(), 0.5) == b""
        response.release()
    _, body = await fetch(forwarder, server.url + "/")
    assert body == b"ok" and server.connections == 1


@pytest.mark.parametrize("separate_writes", [False, True])
async def test_interim_answers_are_skipped(
    serve: Serve, forwarder: Forwarder, separate_writes: bool
) -> None:
    parts = [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 200 Fine\r\nContent-Length: 4\r\nX-Final: 1\r\n\r\ndone",
    ]

    async def interim(_: Received, writer: asyncio.StreamWriter) -> None:
        if not separate_writes:
            writer.write(b"".join(parts))
            return
        for part in parts:
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(0.01)

    server = await serve(interim)
    response, body = await fetch(forwarder, server.url + "/", "POST", body=b"data")
    assert (response.status, response.reason, body) == (200, "Fine", b"done")
    assert response.headers == [("Content-Length", "4"), ("X-Final", "1")]
    await fetch(forwarder, server.url + "/")
    assert server.connections == 1


# ---------------------------------------------------------------------------- request framing


async def _chunks(*parts: bytes, pause: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        if pause:
            await asyncio.sleep(pause)
        yield part


@pytest.fixture
async def echo_upstream(serve: Serve) -> RawUpstream:
    return await serve(answer(OK))


async def test_post_without_body_sends_content_length_zero(
    echo_upstream: RawUpstream, forwarder: Forwarder
) -> None:
    await fetch(forwarder, echo_upstream.url + "/", "POST")
    await fetch(forwarder, echo_upstream.url + "/", "GET")
    post, get = echo_upstream.requests
    assert post.get("Content-Length") == "0" and post.get("Transfer-Encoding") is None
    assert get.get("Content-Length") is None and get.get("Transfer-Encoding") is None


@pytest.mark.parametrize("size", [3, 200_000])
async def test_bytes_body_sends_its_own_length(
    echo_upstream: RawUpstream, forwarder: Forwarder, size: int
) -> None:
    payload = random.Random(size).randbytes(size)
    await fetch(
        forwarder,
        echo_upstream.url + "/upload",
        "PUT",
        headers=[("Content-Length", "99"), ("Transfer-Encoding", "chunked")],
        body=payload,
    )
    [request] = echo_upstream.requests
    assert request.get("Content-Length") == str(size)
    assert request.get("Transfer-Encoding") is None
    assert request.body == payload


async def test_streamed_body_without_length_is_sent_chunked(
    echo_upstream: RawUpstream, forwarder: Forwarder
) -> None:
    await fetch(
        forwarder,
        echo_upstream.url + "/upload",
        "POST",
        body=_chunks(b"hello", b"", b" wor", b"ld", pause=0.01),  # an empty piece ends nothing
    )
    [request] = echo_upstream.requests
    assert request.get("Transfer-Encoding") == "chunked"
    assert request.get("Content-Length") is None
    assert request.body == b"hello world"
    assert request.wire_body == b"5\r\nhello\r\n4\r\n wor\r\n2\r\nld\r\n0\r\n\r\n"


async def test_streamed_body_with_length_is_sent_raw(
    echo_upstream: RawUpstream, forwarder: Forwarder
) -> None:
    await fetch(
        forwarder,
        echo_upstream.url + "/upload",
        "POST",
        headers=[("Content-Length", "11")],
        body=_chunks(b"hello", b" world"),
    )
    [request] = echo_upstream.requests
    assert request.get("Content-Length") == "11"
    assert request.get("Transfer-Encoding") is None
    assert request.wire_body == b"hello world"


async def test_failing_upload_is_502(echo_upstream: RawUpstream, forwarder: Forwarder) -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"first part"
        raise ConnectionResetError("the client went away")

    with pytest.raises(UpstreamUnavailable, match="request body could not be read: the client"):
        await forwarder.send("POST", echo_upstream.url + "/upload", [], broken())
    await asyncio.sleep(0.02)
    assert echo_upstream.requests == [], "the upstream never got a complete request"
    assert forwarder.open_connections == 0


async def test_answer_before_the_end_of_the_upload_stops_it(
    serve: Serve, forwarder: Forwarder
) -> None:
    """An upstream may refuse a body without reading it (413): the caller gets that answer, the
    upload stops, and the connection, mid-request, is not reused."""
    server = await serve(
        answer(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig", OK),
        read_bodies=False,
    )
    upload_stopped = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x" * 1024
                await asyncio.sleep(0.01)
        finally:
            upload_stopped.set()

    response, body = await fetch(forwarder, server.url + "/upload", "POST", body=endless())
    assert (response.status, body) == (413, b"big")
    await asyncio.wait_for(upload_stopped.wait(), 0.5)
    _, body = await fetch(forwarder, server.url + "/")
    assert body == b"ok" and server.connections == 2


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/", [("X-Evil", "a\r\nX-Injected: 1")]),
        ("/", [("X-Evil", "a\nb")]),
        ("/", [("X-Evil\r\nX-Injected", "1")]),
        ("/x HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /y", []),
    ],
)
async def test_line_break_in_the_request_head_is_refused_unsent(
    echo_upstream: RawUpstream,
    forwarder: Forwarder,
    path: str,
    headers: list[tuple[str, str]],
) -> None:
    with pytest.raises(UpstreamUnavailable, match="line break"):
        await forwarder.send("GET", echo_upstream.url + path, headers, None)
    await asyncio.sleep(0.02)
    assert echo_upstream.connections == 0 and echo_upstream.requests == []


# ---------------------------------------------------------------------------- failures


async def test_no_answer_within_the_read_timeout_is_504(serve: Serve, forwarder: Forwarder) -> None:
    server = await serve(never_answer)
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"no data from the upstream for 0\.2 s"):
        await forwarder.send("GET", server.url + "/", [], None, read_timeout=0.2)
    assert 0.15 < time.monotonic() - started < 1.0  # the read_timeout, not the default 2 s
    assert len(server.requests) == 1


async def test_a_shorter_read_timeout_on_a_reused_connection_still_holds(
    serve: Serve, forwarder: Forwarder
) -> None:
    """The read timer is one per connection, left armed between exchanges: an exchange with a
    shorter timeout than the one before on the same connection must still fail at its own."""
    answered = 0

    async def first_then_silent(_: Received, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        answered += 1
        if answered == 1:
            writer.write(OK)
        else:
            await asyncio.sleep(3600)

    server = await serve(first_then_silent)
    _, body = await fetch(forwarder, server.url + "/", read_timeout=30)
    assert body == b"ok"
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout, match=r"for 0\.2 s"):
        await forwarder.send("GET", server.url + "/", [], None, read_timeout=0.2)
    assert 0.15 < time.monotonic() - started < 1.0
    assert [r.connection for r in server.requests] == [1, 1]  # the same connection


async def test_stall_mid_body_times_out_the_read(serve: Serve, forwarder: Forwarder) -> None:
    async def stall(_: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(3600)

    server = await serve(stall)
    response = await forwarder.send("GET", server.url + "/", [], None, read_timeout=0.2)
    assert await response.read() == b"abc"
    started = time.monotonic()
    with pytest.raises(UpstreamTimeout):
        await response.read()
    assert time.monotonic() - started < 1.0
    response.close()


async def test_trickling_body_does_not_time_out(serve: Serve, forwarder: Forwarder) -> None:
    """The read timeout is the time without a byte, not for the whole body."""

    async def trickle(_: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        for byte in b"abcdef":
            await asyncio.sleep(0.05)
            writer.write(bytes([byte]))
            await writer.drain()

    server = await serve(trickle)
    _, body = await fetch(forwarder, server.url + "/", read_timeout=0.2)
    assert body == b"abcdef"


async def test_slow_reader_is_not_a_slow_upstream(serve: Serve, forwarder: Forwarder) -> None:
    """While the caller has not taken what arrived (reading paused by flow control), the
    upstream is not the one keeping it waiting: no read timeout."""
    payload = random.Random(3).randbytes(1024 * 1024)
    server = await serve(
        answer(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(payload), payload))
    )
    response = await forwarder.send("GET", server.url + "/", [], None, read_timeout=0.15)
    await asyncio.sleep(0.45)
    assert await read_body(response) == payload


async def test_disconnect_mid_body_fails_the_read(serve: Serve, forwarder: Forwarder) -> None:
    async def truncate(_: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()
        writer.close()

    server = await serve(truncate)
    response = await forwarder.send("GET", server.url + "/", [], None)
    received = b""
    with pytest.raises(UpstreamUnavailable, match="closed the connection"):
        while chunk := await response.read():
            received += chunk
    assert received == b"0123456789"
    response.close()


async def test_closed_port_is_502(forwarder: Forwarder) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UpstreamUnavailable, match=f"cannot connect to 127.0.0.1:{port}"):
        await forwarder.send("GET", f"http://127.0.0.1:{port}/", [], None)
    assert forwarder.open_connections == 0


@contextlib.contextmanager
def full_backlog() -> Iterator[int]:
    """A listening port whose accept queue is full: further SYNs go unanswered."""
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(socket.socket())
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        for _ in range(8):
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        probe = stack.enter_context(socket.socket())
        probe.settimeout(0.1)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            yield port
            return
        except OSError:
            pass
        pytest.skip("cannot fill a loopback accept queue here")


async def test_connect_timeout_is_504(make_forwarder: MakeForwarder) -> None:
    forwarder = make_forwarder(connect_timeout=0.2)
    with full_backlog() as port:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout, match=r"timed out after 0\.2 s"):
            await forwarder.send("GET", f"http://127.0.0.1:{port}/", [], None)
        assert time.monotonic() - started < 1.0
    assert forwarder.open_connections == 0


# ---------------------------------------------------------------------------- the pool


async def test_pool_limit_serves_requests_one_after_the_other(
    serve: Serve, make_forwarder: MakeForwarder
) -> None:
    in_flight = 0
    most_in_flight = 0

    async def slow(_: Received, writer: asyncio.StreamWriter) -> None:
        nonlocal in_flight, most_in_flight
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        await asyncio.sleep(0.05)
        in_flight -= 1
        writer.write(OK)

    server = await serve(slow)
    forwarder = make_forwarder(pool_size=1)
    results = await asyncio.gather(
        fetch(forwarder, server.url + "/1"), fetch(forwarder, server.url + "/2")
    )
    assert [(r.status, body) for r, body in results] == [(200, b"ok"), (200, b"ok")]
    assert most_in_flight == 1
    assert sorted(r.target for r in server.requests) == ["/1", "/2"]
    assert server.connections == 1 and forwarder.open_connections == 1


async def test_pool_limit_waits_for_a_dropped_connection(
    serve: Serve, make_forwarder: MakeForwarder
) -> None:
    server = await serve(answer(OK))
    forwarder = make_forwarder(pool_size=1)
    first = await forwarder.send("GET", server.url + "/", [], None)
    second = asyncio.create_task(fetch(forwarder, server.url + "/"))
    await asyncio.sleep(0.05)
    assert not second.done(), "the only connection is taken"
    first.close()
    _, body = await asyncio.wait_for(second, 0.5)
    assert body == b"ok" and server.connections == 2


async def test_pool_limit_evicts_an_idle_connection_to_another_origin(
    serve: Serve, make_forwarder: MakeForwarder
) -> None:
    first = await serve(answer(OK))
    second = await serve(answer(OK))
    forwarder = make_forwarder(pool_size=1)
    for server in (first, second, first):
        _, body = await fetch(forwarder, server.url + "/")
        assert body == b"ok"
        assert forwarder.open_connections == 1
    assert (first.connections, second.connections) == (2, 1)


async def test_pool_waiter_cancelled_passes_its_turn(
    serve: Serve, make_forwarder: MakeForwarder
) -> None:
    server = await serve(answer(OK))
    forwarder = make_forwarder(pool_size=1)
    holder = await forwarder.send("GET", server.url + "/1", [], None)
    cancelled = asyncio.create_task(fetch(forwarder, server.url + "/2"))
    waiting = asyncio.create_task(fetch(forwarder, server.url + "/3"))
    await asyncio.sleep(0.02)
    cancelled.cancel()
    await read_body(holder)
    _, body = await asyncio.wait_for(waiting, 0.5)
    assert body == b"ok"
    assert cancelled.cancelled()
    assert [r.target for r in server.requests] == ["/1", "/3"]
    assert server.connections == 1


async def test_concurrent_requests_open_concurrent_connections(
    serve: Serve, forwarder: Forwarder
) -> None:
    both_in = asyncio.Event()

    async def meet(_: Received, writer: asyncio.StreamWriter) -> None:
        if len(server.requests) == 2:
            both_in.set()
        await asyncio.wait_for(both_in.wait(), 0.5)  # neither is answered until both arrived
        writer.write(OK)

    server = await serve(meet)
    results = await asyncio.gather(*(fetch(forwarder, server.url + "/") for _ in range(2)))
    assert [body for _, body in results] == [b"ok", b"ok"]
    assert server.connections == 2 and forwarder.open_connections == 2


async def test_closing_an_unread_response_drops_its_connection(
    serve: Serve, forwarder: Forwarder
) -> None:
    async def big(_: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"z" * 100_000)

    server = await serve(big)
    response = await forwarder.send("GET", server.url + "/", [], None)
    response.close()
    response.close()  # idempotent
    _, body = await fetch(forwarder, server.url + "/")
    assert len(body) == 100_000
    assert [r.connection for r in server.requests] == [1, 2]


async def test_release_before_the_end_of_the_body_drops_the_connection(
    serve: Serve, forwarder: Forwarder
) -> None:
    async def partial(_: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"defghij")

    server = await serve(partial)
    response = await forwarder.send("GET", server.url + "/", [], None)
    assert await response.read() == b"abc"
    response.release()
    await asyncio.sleep(0.15)
    await fetch(forwarder, server.url + "/")
    assert server.connections == 2


async def test_idle_connections_are_closed_after_idle_timeout(
    serve: Serve, make_forwarder: MakeForwarder
) -> None:
    server = await serve(answer(OK))
    forwarder = make_forwarder(idle_timeout=0.1)
    await fetch(forwarder, server.url + "/")
    assert forwarder.open_connections == 1
    await wait_until(lambda: forwarder.open_connections == 0, within=0.5)
    await fetch(forwarder, server.url + "/")
    assert server.connections == 2


async def test_aclose_closes_pooled_connections(serve: Serve, forwarder: Forwarder) -> None:
    server = await serve(answer(OK))
    await fetch(forwarder, server.url + "/")
    assert forwarder.open_connections == 1
    await forwarder.aclose()
    assert forwarder.open_connections == 0
    with pytest.raises(UpstreamUnavailable, match="shutting down"):
        await forwarder.send("GET", server.url + "/", [], None)


# ---------------------------------------------------------------------------- HTTPS upstreams


def _certificate_authority(tmp: Path) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA (its PEM file) and a server context whose certificate it signed, for
    127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    validity = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1))

    def certificate(
        subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: Any, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(validity[0])
            .not_valid_after(validity[1])
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            # What Python 3.13's default VERIFY_X509_STRICT asks of a chain: key usages and
            # key identifiers, as any real CA issues them.
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=ca,
                    crl_sign=ca,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), False
            )
        )
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    ca_cert = certificate("test CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = certificate("127.0.0.1", key, ca_name, ca_key, ca=False)
    ca_file = tmp / "ca.pem"
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "server.pem").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp / "server.pem")
    return ca_file, server


async def test_https_upstream_is_verified_and_used(
    serve: Serve, make_forwarder: MakeForwarder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_file, tls = _certificate_authority(tmp_path)
    server = await serve(answer(OK), tls=tls)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))  # what the system's CA store would say
    forwarder = make_forwarder()
    for _ in range(2):
        response, body = await fetch(forwarder, server.url + "/secure?x=1")
        assert (response.status, body) == (200, b"ok")
    assert server.requests[0].request_line == "GET /secure?x=1 HTTP/1.1"
    assert server.connections == 1  # kept alive over TLS too


async def test_https_upstream_with_an_untrusted_certificate_is_502(
    serve: Serve, make_forwarder: MakeForwarder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, tls = _certificate_authority(tmp_path)
    server = await serve(answer(OK), tls=tls)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "nothing-trusted.pem"))
    forwarder = make_forwarder()
    with pytest.raises(UpstreamUnavailable, match="certificate verify failed"):
        await forwarder.send("GET", server.url + "/", [], None)
    assert server.requests == []


# ---------------------------------------------------------------------------- review fixes


async def test_a_steady_upload_longer_than_the_read_timeout_succeeds(
    echo_upstream: RawUpstream, make_forwarder: MakeForwarder
) -> None:
    """The timeout is for silence, not for the time an upload takes."""
    forwarder = make_forwarder(read_timeout=0.2)
    pieces = [b"x" * 100] * 8
    response, _ = await fetch(
        forwarder, echo_upstream.url + "/upload", "POST", body=_chunks(*pieces, pause=0.08)
    )
    assert response.status == 200
    assert echo_upstream.requests[0].body == b"x" * 800


async def test_an_endless_response_head_is_502(serve: Serve, forwarder: Forwarder) -> None:
    async def endless(_: Received, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n")
        for i in range(5000):
            writer.write(b"X-Filler-%d: %s\r\n" % (i, b"y" * 60))
            await writer.drain()

    server = await serve(endless)
    with pytest.raises(UpstreamUnavailable, match="response head is too large"):
        await forwarder.send("GET", server.url + "/", [], None)


async def test_a_transfer_coding_other_than_chunked_is_502(
    serve: Serve, forwarder: Forwarder
) -> None:
    server = await serve(answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxxxx"))
    with pytest.raises(UpstreamUnavailable, match="unsupported Transfer-Encoding: gzip"):
        await forwarder.send("GET", server.url + "/", [], None)


async def test_an_injected_host_header_is_the_one_sent(serve: Serve, forwarder: Forwarder) -> None:
    server = await serve(answer(OK))
    await fetch(forwarder, server.url + "/", headers=[("Host", "internal.example")])
    [request] = server.requests
    assert request.all("Host") == ["internal.example"]
