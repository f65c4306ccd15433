"""The front lends `/_countersign…` requests to the control plane's aiohttp server, which
normalizes paths its own way: a target that starts with the control-plane prefix but resolves
elsewhere (`/_countersign/../cloud/…`, encoded dots, a doubled slash) must never reach an
upstream unjudged, nor leak the control plane onto a route. And a WebSocket on a path the
policy denies never opens. Real `countersign run`, raw sockets, the recording upstream."""

from __future__ import annotations

import asyncio

import pytest

from tests.security.conftest import Recorder, StartProxy, Tokens

_DENY_SECRETS = [
    {"name": "secrets", "route": "cloud", "paths": ["/cloud/secrets/**"], "action": "deny"}
]


async def raw(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


@pytest.mark.parametrize(
    "target",
    [
        "/_countersign/../cloud/secrets/keys",
        "/_countersign/%2e%2e/cloud/secrets/keys",
        "/_countersign/%2E%2E/cloud/secrets/keys",
        "/_countersign/..%2fcloud/secrets/keys",
        "/_countersign//../cloud/secrets/keys",
        "/_countersign/api/../../cloud/secrets/keys",
    ],
)
async def test_a_control_plane_prefix_is_no_way_around_the_policy(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, target: str
) -> None:
    proc = start_proxy(extra_rules=_DENY_SECRETS)
    agent = (await tokens("agent-7"))["Authorization"]
    answer = await raw(
        proc.port,
        f"GET {target} HTTP/1.1\r\nHost: x\r\nAuthorization: {agent}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 403, 404), (target, answer[:200])
    assert recorder.requests == [], f"{target}: reached the upstream"


async def test_a_websocket_on_a_denied_path_never_opens(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens
) -> None:
    proc = start_proxy(extra_rules=_DENY_SECRETS)
    agent = (await tokens("agent-7"))["Authorization"]
    answer = await raw(
        proc.port,
        f"GET /cloud/secrets/stream HTTP/1.1\r\nHost: x\r\nAuthorization: {agent}\r\n"
        "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode(),
    )
    assert answer.startswith(b"HTTP/1.1 403 "), answer[:200]
    assert b"policy_denied" in answer
    assert recorder.requests == []
