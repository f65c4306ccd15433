"""The upstream's response head reaches the client byte for byte through the real `countersign
run` (issue 13 part 6): header names keep their case, values keep bytes that are not UTF-8
(a latin-1 `é`), repeated headers stay repeated and in order, and the upstream's own
`X-Request-Id` is not replaced. The upstream is a raw asyncio server writing exact bytes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.authn.apikeys import key_digest
from tests.e2e.conftest import Process, free_port

StartFn = Callable[[str, int], Process]
AGENT_KEY = "cs_bytes_agent_0000000000000000000000000"
UPSTREAM_HEAD = [
    b"X-Request-Id: upstream-support-id-42",
    b"x-MiXeD-CaSe: kept",
    b"X-Latin1: caf\xe9 cr\xe8me",
    b"Set-Cookie: a=1",
    b"Set-Cookie: b=2",
]
BODY = b'{"ok":true}'


@pytest.fixture
async def raw_upstream() -> AsyncIterator[int]:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head:
                    break
                writer.write(
                    b"HTTP/1.1 200 OK\r\n"
                    + b"".join(line + b"\r\n" for line in UPSTREAM_HEAD)
                    + b"Content-Type: application/json\r\n"
                    + b"Content-Length: %d\r\n\r\n" % len(BODY)
                    + BODY
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()
    await server.wait_closed()


async def test_response_header_bytes_pass_unchanged(
    run_countersign: StartFn, raw_upstream: int
) -> None:
    port = free_port()
    run_countersign(
        f"""
server: {{listen: "127.0.0.1:{port}"}}
identity:
  api_keys: [{{sha256: "{key_digest(AGENT_KEY)}", subject: agent-7, groups: [agents]}}]
routes: [{{name: raw, prefix: /raw/, upstream: "http://127.0.0.1:{raw_upstream}/"}}]
policy: {{rules: [{{name: all, paths: ["/raw/**"], action: allow}}]}}
audit: {{stdout: false}}
""",
        port,
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"GET /raw/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {AGENT_KEY}\r\n\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    # Every upstream line arrives as it was sent, in the same order.
    positions = [lines.index(line) for line in UPSTREAM_HEAD]
    assert positions == sorted(positions)
    # Countersign's own id rides under its own name.
    assert any(line.startswith(b"Countersign-Request-Id: ") for line in lines)
    assert await asyncio.wait_for(reader.readexactly(len(BODY)), 5) == BODY
    writer.close()
