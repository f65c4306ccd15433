"""The front server's limits through the real `countersign run` (issue 14 parts 1 and 7): the
request-head timeout (slowloris), the idle timeout, 431, the connection cap, pipelining, a
keep-alive connection shared by proxied and control-plane requests, and a client that leaves
mid-body (its upstream exchange is cancelled and nothing is left open)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.authn.apikeys import key_digest
from tests.e2e.conftest import Process, free_port

StartFn = Callable[[str, int], Process]
AGENT_KEY = "cs_front_agent_00000000000000000000000000"
AUTH_LINE = f"Authorization: Bearer {AGENT_KEY}\r\n"


class Upstream:
    """An upstream that records how the uploads it received ended."""

    def __init__(self) -> None:
        self.uploads_started = asyncio.Event()
        self.upload_outcomes: list[str] = []

    async def hello(self, request: web.Request) -> web.Response:
        return web.json_response({"path": request.path, "n": request.query.get("n")})

    async def upload(self, request: web.Request) -> web.Response:
        self.uploads_started.set()
        received = 0
        try:
            async for chunk in request.content.iter_any():
                received += len(chunk)
        except Exception as exc:  # the proxy's connection to us broke off mid-body
            self.upload_outcomes.append(f"broken:{type(exc).__name__}")
            raise
        except asyncio.CancelledError:
            self.upload_outcomes.append("cancelled")
            raise
        self.upload_outcomes.append(f"complete:{received}")
        return web.json_response({"received": received})


@pytest.fixture
async def recording_upstream() -> AsyncIterator[tuple[TestServer, Upstream]]:
    state = Upstream()
    app = web.Application()
    app.router.add_get("/hello", state.hello)
    app.router.add_post("/upload", state.upload)
    server = TestServer(app, host="127.0.0.1", handler_cancellation=True)
    await server.start_server()
    yield server, state
    await server.close()


@dataclass(frozen=True)
class Running:
    """A `countersign run` in front of the recording upstream."""

    proc: Process
    port: int
    upstream: Upstream
    audit_file: Path


StartFront = Callable[..., Running]


@pytest.fixture
def start_front(
    run_countersign: StartFn,
    recording_upstream: tuple[TestServer, Upstream],
    tmp_path: Path,
) -> StartFront:
    """`start_front(**server_settings)`: the proxy of `config`, with those `server.` keys."""
    server, state = recording_upstream

    def start(**server_settings: object) -> Running:
        port = free_port()
        audit_file = tmp_path / "audit.jsonl"
        text = config(port, str(server.make_url("/")), audit_file, **server_settings)
        return Running(run_countersign(text, port), port, state, audit_file)

    return start


def config(port: int, upstream: str, audit_file: Path, **server: object) -> str:
    limits = "".join(f", {key}: {value}" for key, value in server.items())
    return f"""
server: {{listen: "127.0.0.1:{port}"{limits}}}
identity:
  api_keys:
    - {{sha256: "{key_digest(AGENT_KEY)}", subject: agent-7, groups: [agents]}}
routes:
  - {{name: cloud, prefix: /cloud/, upstream: "{upstream}"}}
policy:
  rules:
    - {{name: all, paths: ["/cloud/**"], action: allow}}
audit: {{stdout: false, file: "{audit_file}"}}
"""


async def status_line(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 5)


async def read_answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    status = await status_line(reader)
    headers: dict[str, str] = {}
    while (line := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await asyncio.wait_for(reader.readexactly(length), 5)
    return status, headers, body


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sent until it closed the connection (fails if it does not)."""
    return await asyncio.wait_for(reader.read(), seconds)


def open_fds(proc: Process) -> int:
    return len(os.listdir(f"/proc/{proc.proc.pid}/fd"))


async def test_a_slow_request_head_is_cut_off_at_the_header_timeout(
    start_front: StartFront,
) -> None:
    port = start_front(header_timeout_seconds=0.5).port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(b"GET /cloud/hello HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    await writer.drain()
    for _ in range(3):  # a byte now and then, never the end of the head
        await asyncio.sleep(0.1)
        writer.write(b"a")
        await writer.drain()
    answer = await closed_within(reader, 3)
    elapsed = time.monotonic() - started
    assert 0.4 <= elapsed < 2.0
    if answer:  # 408 in the JSON shape, then closed
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b"request_timeout" in answer
    writer.close()
    # A connection that never sends anything is closed too.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await closed_within(reader, 3) == b""
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed(
    start_front: StartFront,
) -> None:
    port = start_front(idle_timeout_seconds=0.5).port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET /cloud/hello HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}\r\n".encode())
    status, headers, _ = await read_answer(reader)
    assert status.startswith(b"HTTP/1.1 200 ")
    assert headers.get("connection", "keep-alive").lower() != "close"
    started = time.monotonic()
    assert await closed_within(reader, 3) == b""
    assert time.monotonic() - started >= 0.4
    writer.close()


async def test_a_head_over_max_header_bytes_is_431(
    start_front: StartFront,
) -> None:
    port = start_front(max_header_bytes=8192).port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    filler = "".join(f"X-Filler-{i}: {'v' * 100}\r\n" for i in range(100))  # ~11 KiB
    writer.write(f"GET /cloud/hello HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}{filler}\r\n".encode())
    status, headers, body = await read_answer(reader)
    assert status.startswith(b"HTTP/1.1 431 ")
    assert json.loads(body)["error"]["code"] == "header_too_large"
    assert headers.get("connection", "").lower() == "close"
    writer.close()


async def test_connections_beyond_the_cap_are_refused_and_earlier_ones_served(
    start_front: StartFront,
) -> None:
    port = start_front(max_connections=3).port
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
    await asyncio.sleep(0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    refused = await closed_within(reader, 3)
    if refused:
        assert refused.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in refused
    writer.close()
    # The three earlier connections are still served.
    for r, w in held:
        w.write(f"GET /cloud/hello HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}\r\n".encode())
        status, _, _ = await read_answer(r)
        assert status.startswith(b"HTTP/1.1 200 ")
    # The refusal is counted for the operator (on one of the held connections: the cap).
    r, w = held[0]
    w.write(b"GET /_countersign/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    _, _, body = await read_answer(r)
    text = body.decode()
    assert 'countersign_connections_closed_total{reason="max_connections"} 1.0' in text
    assert "countersign_connections_open 3.0" in text
    for _, w in held:
        w.close()


async def test_pipelined_requests_are_answered_in_order_and_share_with_the_control_plane(
    start_front: StartFront,
) -> None:
    port = start_front().port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    pipelined = b"".join(
        f"GET /cloud/hello?n={n} HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}\r\n".encode() for n in range(3)
    )
    control = b"GET /_countersign/healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    writer.write(pipelined + control + pipelined)
    await writer.drain()
    seen: list[str | None] = []
    for _ in range(7):
        status, _, body = await read_answer(reader)
        assert status.startswith(b"HTTP/1.1 200 "), status
        answer = json.loads(body)
        seen.append(answer.get("n", "health"))
    assert seen == ["0", "1", "2", "health", "0", "1", "2"]
    writer.close()
    # An SDK's pooled client: one connection for the proxied call and the approvals API.
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {AGENT_KEY}"},
        limits=httpx.Limits(max_connections=1),
    ) as client:
        for _ in range(2):
            assert (await client.get("/cloud/hello")).status_code == 200
            assert (await client.get("/_countersign/healthz")).status_code == 200


async def test_a_client_that_leaves_mid_body_cancels_its_upstream_exchange(
    start_front: StartFront,
) -> None:
    running = start_front()
    port, proc, state, audit_file = running.port, running.proc, running.upstream, running.audit_file
    await asyncio.sleep(0.2)
    baseline = open_fds(proc)
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST /cloud/upload HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}"
        "Content-Length: 10000000\r\n\r\n".encode()
    )
    writer.write(b"x" * 1_000_000)
    await writer.drain()
    await asyncio.wait_for(state.uploads_started.wait(), 5)
    writer.transport.abort()  # the client goes away with 9 MB still unsent
    for _ in range(100):
        if state.upload_outcomes:
            break
        await asyncio.sleep(0.05)
    assert state.upload_outcomes and not state.upload_outcomes[0].startswith("complete")
    # The exchange is recorded as the client leaving; nothing stays open in the proxy.
    for _ in range(100):
        lines = [json.loads(x) for x in audit_file.read_text().splitlines() if x]
        completed = [x for x in lines if x.get("event") == "request.completed"]
        if completed:
            break
        await asyncio.sleep(0.05)
    assert completed[-1]["error"] == "client_disconnected" and completed[-1]["status"] == 499
    for _ in range(100):
        if open_fds(proc) <= baseline:
            break
        await asyncio.sleep(0.05)
    assert open_fds(proc) <= baseline


async def test_connect_and_unknown_methods_are_405_in_the_json_shape(
    start_front: StartFront,
) -> None:
    port = start_front().port
    for request_line in ("CONNECT example.com:443", "BREW /cloud/pot", "get /cloud/hello"):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"{request_line} HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}\r\n".encode())
        status, _, body = await read_answer(reader)
        assert status.startswith(b"HTTP/1.1 405 "), (request_line, status)
        assert json.loads(body)["error"]["code"] == "method_not_allowed"
        writer.close()


async def test_a_stalled_body_is_cut_on_the_control_plane_and_on_proxied_uploads(
    start_front: StartFront,
) -> None:
    """Bodies read before anyone is authenticated (a control-plane request is read whole before
    aiohttp sees it) must not hold a connection forever: no byte for
    `server.body_timeout_seconds` is `408` and the connection closes. A proxied upload that
    stalls on its way upstream is the client's failure, and the audit says so (not an
    upstream error)."""
    running = start_front(body_timeout_seconds=0.5)
    port = running.port
    for head in (
        "POST /_countersign/api/decisions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n",
        f"POST /cloud/upload HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}Content-Length: 1000\r\n\r\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head.encode() + b"{")
        await writer.drain()
        started = time.monotonic()
        answer = await closed_within(reader, 5)
        assert 0.4 <= time.monotonic() - started < 3, head
        writer.close()
        assert answer.startswith(b"HTTP/1.1 408 "), (head, answer[:60])
        assert b"request_timeout" in answer
    for _ in range(100):
        lines = [json.loads(x) for x in running.audit_file.read_text().splitlines() if x]
        completed = [x for x in lines if x.get("event") == "request.completed"]
        if completed:
            break
        await asyncio.sleep(0.05)
    (upload,) = [x for x in completed if x["path"] == "/cloud/upload"]
    assert (upload["status"], upload["error"]) == (408, "request_timeout")
