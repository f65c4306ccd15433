"""`request.completed` (DESIGN §8): one audit event per allowed or refused request, with all that
the request's steps knew; a privileged request keeps its step events and ends with it too."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.conftest import Client, Factory
from tests.helpers import AGENT_KEY, ALICE_KEY, ListSink, bearer

AGENT = bearer(AGENT_KEY)
ALICE = bearer(ALICE_KEY)
API = "/_countersign/api/approvals"


async def until_pending(client: Client) -> str:
    for _ in range(200):
        resp = await client.get(API, params={"state": "pending"}, headers=ALICE)
        approvals = (await resp.json())["approvals"]
        if approvals:
            return str(approvals[0]["approval_id"])
        await asyncio.sleep(0.02)
    raise AssertionError("no pending approval")


def names(sink: ListSink) -> list[str]:
    return [e["event"] for e in sink.events]


async def test_a_normalized_path_is_recorded_with_the_path_as_received(
    make_proxy: Factory,
) -> None:
    client, sink = await make_proxy()
    resp = await client.get("/cloud//buckets/reports", headers=AGENT)
    assert resp.status == 200
    assert names(sink) == ["request.completed"]
    completed = sink.events[0]
    assert completed["path"] == "/cloud/buckets/reports"
    assert completed["raw_path"] == "/cloud//buckets/reports"


async def test_a_refusal_before_anything_is_known_is_one_event(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    resp = await client.get("/nowhere/x", headers=AGENT)
    assert resp.status == 404
    assert names(sink) == ["request.completed"]
    event = sink.events[0]
    assert (event["status"], event["error"], event["route"], event["rule"]) == (
        404,
        "no_route",
        None,
        None,
    )
    assert event["action"] is None and event["identity"]["subject"] == "agent-key"
    assert event["method"] == "GET" and event["path"] == "/nowhere/x"
    assert event["bytes_sent"] == len(await resp.read()) > 0


async def test_an_approved_request_keeps_its_steps_and_ends_with_request_completed(
    make_proxy: Factory,
) -> None:
    client, sink = await make_proxy()
    call = asyncio.create_task(
        client.post("/cloud/exports/q3", json={"format": "csv"}, headers=AGENT)
    )
    approval_id = await until_pending(client)
    resp = await client.post(
        f"{API}/{approval_id}/decision", json={"verdict": "approve"}, headers=ALICE
    )
    assert resp.status == 200
    answer = await asyncio.wait_for(call, 5)
    assert answer.status == 200
    body = await answer.read()
    request_id = answer.headers["Countersign-Request-Id"]
    mine = [e for e in sink.events if e.get("request_id") == request_id]
    assert [e["event"] for e in mine] == [
        "approval.requested",
        "approval.decided",
        "request.forwarded",
        "request.completed",
    ]
    forwarded, completed = mine[2], mine[3]
    assert (forwarded["approval_id"], forwarded["outcome"], forwarded["status"]) == (
        approval_id,
        "completed",
        200,
    )
    assert completed["approval_id"] == approval_id
    assert (completed["rule"], completed["action"], completed["status"]) == (
        "exports",
        "approve",
        200,
    )
    assert completed["bytes_sent"] == len(body) and completed["error"] is None
    # Its duration covers the whole exchange, the human's wait included.
    assert completed["duration_ms"] >= forwarded["duration_ms"]


async def test_a_denied_request_ends_with_its_refusal(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    call = asyncio.create_task(
        client.post("/cloud/exports/q4", json={"format": "csv"}, headers=AGENT)
    )
    approval_id = await until_pending(client)
    await client.post(
        f"{API}/{approval_id}/decision",
        json={"verdict": "deny", "reason": "not now"},
        headers=ALICE,
    )
    answer = await asyncio.wait_for(call, 5)
    assert answer.status == 403
    request_id = answer.headers["Countersign-Request-Id"]
    mine = [e for e in sink.events if e.get("request_id") == request_id]
    assert [e["event"] for e in mine] == [
        "approval.requested",
        "approval.decided",
        "request.completed",
    ]
    completed: dict[str, Any] = mine[-1]
    assert (completed["status"], completed["error"], completed["approval_id"]) == (
        403,
        "approval_denied",
        approval_id,
    )
    assert completed["reason"] == "not now" and completed["decided_by"] == "alice@example.com"
    assert completed["action"] == "approve" and completed["rule"] == "exports"


async def test_a_client_that_leaves_while_held_is_recorded(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    call = asyncio.create_task(
        client.post("/cloud/exports/gone", json={"format": "csv"}, headers=AGENT)
    )
    await until_pending(client)
    call.cancel()
    for _ in range(100):
        if sink.named("request.completed"):
            break
        await asyncio.sleep(0.02)
    completed = [e for e in sink.named("request.completed") if e["path"] == "/cloud/exports/gone"]
    assert len(completed) == 1
    assert (completed[0]["status"], completed[0]["error"]) == (499, "client_disconnected")
