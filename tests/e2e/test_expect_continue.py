"""`Expect: 100-continue` through the real `countersign run` (issue 13 part 6): the client is
asked for its body only once the request is authenticated and judged, so a refused upload is
never sent. A raw socket plays the client, as curl does for large uploads: head first, then wait
for `100 Continue` (or a final answer) before sending the body."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from aiohttp.test_utils import TestServer

from proxy.authn.apikeys import key_digest
from tests.e2e.conftest import Process, free_port

StartFn = Callable[[str, int], Process]
AGENT_KEY = "cs_expect_agent_0000000000000000000000000"


def config(port: int, upstream: str) -> str:
    return f"""
server: {{listen: "127.0.0.1:{port}", max_body_bytes: 4096}}
identity:
  api_keys:
    - {{sha256: "{key_digest(AGENT_KEY)}", subject: agent-7, groups: [agents]}}
routes:
  - {{name: cloud, prefix: /cloud/, upstream: "{upstream}"}}
policy:
  rules:
    - {{name: uploads, methods: [POST, PUT], paths: ["/cloud/uploads/**"], action: allow}}
    - name: exports
      methods: [POST]
      paths: ["/cloud/exports/**"]
      action: approve
      approvers: {{users: ["alice@example.com"]}}
audit: {{stdout: false}}
"""


async def head_then_wait(
    port: int, path: str, length: int, *, credential: bool = True
) -> tuple[str, asyncio.StreamReader, asyncio.StreamWriter]:
    """Send a request head announcing `length` body bytes and `Expect: 100-continue`; the first
    status line the proxy answers with (the body not sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    auth = f"Authorization: Bearer {AGENT_KEY}\r\n" if credential else ""
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{auth}"
        f"Content-Type: application/octet-stream\r\nContent-Length: {length}\r\n"
        "Expect: 100-continue\r\n\r\n".encode()
    )
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 5)
    return line.decode().strip(), reader, writer


async def rest_of_answer(reader: asyncio.StreamReader) -> tuple[dict[str, str], bytes]:
    headers: dict[str, str] = {}
    while (line := await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 5)
    return headers, body


async def test_refusals_are_answered_without_asking_for_the_body(
    run_countersign: StartFn, upstream: TestServer
) -> None:
    port = free_port()
    run_countersign(config(port, str(upstream.make_url("/"))), port)
    cases = [
        ("/cloud/uploads/big.bin", 10_000_000, False, "401"),  # no credential
        ("/cloud/secrets/dump", 10_000_000, True, "403"),  # the policy denies it
        ("/cloud/exports/big", 10_000_000, True, "413"),  # held whole: over max_body_bytes
    ]
    for path, length, credential, status in cases:
        line, reader, writer = await head_then_wait(port, path, length, credential=credential)
        assert line.startswith(f"HTTP/1.1 {status} "), (path, line)
        headers, body = await rest_of_answer(reader)
        assert "error" in json.loads(body)
        # The client never sent its body, so the connection cannot go on: the answer says so
        # (the client closes it, as curl does).
        assert headers.get("connection", "").lower() == "close"
        writer.close()


async def test_an_allowed_upload_is_asked_for_and_relayed(
    run_countersign: StartFn, upstream: TestServer
) -> None:
    port = free_port()
    run_countersign(config(port, str(upstream.make_url("/"))), port)
    payload = bytes(range(256)) * 64
    line, reader, writer = await head_then_wait(port, "/cloud/uploads/a.bin", len(payload))
    assert line == "HTTP/1.1 100 Continue"
    assert await asyncio.wait_for(reader.readline(), 5) == b"\r\n"
    writer.write(payload)
    await writer.drain()
    status = (await asyncio.wait_for(reader.readline(), 5)).decode()
    assert status.startswith("HTTP/1.1 200 ")
    _, body = await rest_of_answer(reader)
    echoed = json.loads(body)
    assert echoed["method"] == "POST" and echoed["path"] == "/uploads/a.bin"
    assert echoed["body_bytes"] == len(payload)
    assert "expect" not in echoed["headers"]  # hop by hop: answered here, not forwarded
    # An unknown expectation is refused in the JSON shape.
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
    writer2.write(
        f"POST /cloud/uploads/x HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {AGENT_KEY}\r\n"
        "Content-Length: 3\r\nExpect: teapot\r\n\r\n".encode()
    )
    await writer2.drain()
    assert (await asyncio.wait_for(reader2.readline(), 5)).startswith(b"HTTP/1.1 417 ")
    _, body = await rest_of_answer(reader2)
    assert json.loads(body)["error"]["code"] == "expectation_failed"
    writer.close()
    writer2.close()
