"""WebSocket upgrades through the real `countersign run` (issue 14 part 2): the handshake is
authenticated, routed, judged and audited like any request; once the upstream accepts it, the
bytes go both ways until either side closes, and the tunnel's opening and closing are audited
with byte counts. The client is the `websockets` library; the upstream is aiohttp's WebSocket
server on loopback."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest
import websockets
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from websockets.exceptions import ConnectionClosed, InvalidStatus

from proxy.authn.apikeys import key_digest
from tests.e2e.conftest import Process, free_port

StartFn = Callable[[str, int], Process]
AGENT_KEY = "cs_ws_agent_000000000000000000000000000000"
AUTH = {"Authorization": f"Bearer {AGENT_KEY}"}
ALICE_KEY = "cs_ws_alice_000000000000000000000000000000"


async def _echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(max_msg_size=4 * 1024 * 1024)
    await ws.prepare(request)
    async for message in ws:
        if message.type == WSMsgType.TEXT:
            if message.data == "close-4001":
                await ws.close(code=4001, message=b"upstream says bye")
                break
            await ws.send_str(f"echo:{message.data}")
        elif message.type == WSMsgType.BINARY:
            await ws.send_bytes(message.data)
    return ws


async def _plain(request: web.Request) -> web.Response:
    return web.json_response({"path": request.path})


@pytest.fixture
async def ws_upstream() -> AsyncIterator[TestServer]:
    app = web.Application()
    app.router.add_get("/echo", _echo)
    app.router.add_get("/held/echo", _echo)
    app.router.add_get("/plain", _plain)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    yield server
    await server.close()


def config(port: int, upstream: str, audit_file: Path) -> str:
    return f"""
server: {{listen: "127.0.0.1:{port}"}}
identity:
  api_keys:
    - {{sha256: "{key_digest(AGENT_KEY)}", subject: agent-7, groups: [agents]}}
    - {{sha256: "{key_digest(ALICE_KEY)}", subject: alice, email: alice@example.com,
       groups: [humans]}}
routes:
  - {{name: live, prefix: /live/, upstream: "{upstream}"}}
policy:
  rules:
    - {{name: forbidden, paths: ["/live/forbidden/**"], action: deny}}
    - name: held
      paths: ["/live/held/**"]
      action: approve
      approvers: {{users: ["alice@example.com"]}}
    - {{name: streams, methods: [GET], paths: ["/live/**"], action: allow}}
audit: {{stdout: false, file: "{audit_file}"}}
"""


def events(audit_file: Path, name: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in audit_file.read_text().splitlines() if line]
    return [line for line in lines if line.get("event") == name]


async def wait_for_events(audit_file: Path, name: str, count: int) -> list[dict[str, object]]:
    for _ in range(100):
        if audit_file.exists() and len(found := events(audit_file, name)) >= count:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {count} {name} events in {audit_file}")


async def test_text_binary_large_frames_and_close_codes_pass_both_ways(
    run_countersign: StartFn, ws_upstream: TestServer, tmp_path: Path
) -> None:
    port = free_port()
    audit_file = tmp_path / "audit.jsonl"
    run_countersign(config(port, str(ws_upstream.make_url("/")), audit_file), port)
    url = f"ws://127.0.0.1:{port}/live/echo"
    big = bytes(range(256)) * 4096  # 1 MiB
    # No permessage-deflate: the byte counts below are then the frames' own sizes.
    async with websockets.connect(
        url, additional_headers=AUTH, max_size=4 * 1024 * 1024, compression=None
    ) as ws:
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "echo:hello"
        await ws.send(b"\x00\x01\xff")
        assert await asyncio.wait_for(ws.recv(), 5) == b"\x00\x01\xff"
        await ws.send(big)
        assert await asyncio.wait_for(ws.recv(), 10) == big
        # The upstream closes with its own code: the client sees that code.
        await ws.send("close-4001")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4001
    # A client-side close with a code reaches the upstream and ends cleanly.
    async with websockets.connect(url, additional_headers=AUTH) as ws:
        await ws.send("one")
        assert await asyncio.wait_for(ws.recv(), 5) == "echo:one"
        await ws.close(code=1000, reason="done")
    opened = await wait_for_events(audit_file, "websocket.opened", 2)
    closed_events = await wait_for_events(audit_file, "websocket.closed", 2)
    assert opened[0]["route"] == "live" and opened[0]["rule"] == "streams"
    assert opened[0]["path"] == "/live/echo"
    first = next(e for e in closed_events if e["request_id"] == opened[0]["request_id"])
    # Both directions carried the megabyte (plus framing).
    assert int(str(first["bytes_from_client"])) > len(big)
    assert int(str(first["bytes_to_client"])) > len(big)
    completed = await wait_for_events(audit_file, "request.completed", 2)
    mine = [e for e in completed if e["request_id"] == opened[0]["request_id"]]
    assert mine and mine[0]["status"] == 101 and mine[0]["action"] == "allow"


async def test_a_refused_handshake_is_answered_in_json_and_never_reaches_the_upstream(
    run_countersign: StartFn, ws_upstream: TestServer, tmp_path: Path
) -> None:
    port = free_port()
    audit_file = tmp_path / "audit.jsonl"
    run_countersign(config(port, str(ws_upstream.make_url("/")), audit_file), port)
    # No credential: 401.
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(f"ws://127.0.0.1:{port}/live/echo"):
            pass
    assert refused.value.response.status_code == 401
    # Denied by the policy: 403 with the JSON error shape.
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(
            f"ws://127.0.0.1:{port}/live/forbidden/echo", additional_headers=AUTH
        ):
            pass
    assert refused.value.response.status_code == 403
    body = json.loads(refused.value.response.body or b"{}")
    assert body["error"]["code"] == "policy_denied"
    # The upstream refuses the switch (no WebSocket there): its answer is relayed, no tunnel.
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(f"ws://127.0.0.1:{port}/live/plain", additional_headers=AUTH):
            pass
    assert refused.value.response.status_code == 200
    assert events(audit_file, "websocket.opened") == []


async def test_an_approve_rule_holds_the_handshake_until_a_human_decides(
    run_countersign: StartFn, ws_upstream: TestServer, tmp_path: Path
) -> None:
    port = free_port()
    audit_file = tmp_path / "audit.jsonl"
    run_countersign(config(port, str(ws_upstream.make_url("/")), audit_file), port)
    connecting = asyncio.ensure_future(
        websockets.connect(
            f"ws://127.0.0.1:{port}/live/held/echo", additional_headers=AUTH, open_timeout=20
        )
    )
    api = f"http://127.0.0.1:{port}/_countersign/api/approvals"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {ALICE_KEY}"}) as client:
        pending: list[dict[str, object]] = []
        for _ in range(100):
            pending = (await client.get(api, params={"state": "pending"})).json()["approvals"]
            if pending:
                break
            await asyncio.sleep(0.05)
        assert len(pending) == 1 and not connecting.done()  # held: no 101 yet
        decided = await client.post(
            f"{api}/{pending[0]['approval_id']}/decision",
            json={"verdict": "approve", "reason": "live debugging session"},
        )
        assert decided.status_code == 200, decided.text
    ws = await asyncio.wait_for(connecting, 10)
    try:
        await ws.send("approved")
        assert await asyncio.wait_for(ws.recv(), 5) == "echo:approved"
    finally:
        await ws.close()
    opened = await wait_for_events(audit_file, "websocket.opened", 1)
    assert opened[0]["approval_id"] == pending[0]["approval_id"]
