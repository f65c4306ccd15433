"""Attack: make an approval run twice, late, or for nobody.

An approval executes at most once; an approved approval must be used within
`approvals.claim_seconds` or it lapses; a client that disconnects while held is recorded
(`request.abandoned`) and an identical request joins the same approval (DESIGN §2, States).
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp

from tests.security.conftest import (
    ASYNC,
    JSON,
    Recorder,
    StartProxy,
    Tokens,
    audit_events,
    decide,
    get_approval,
    send,
    start,
    wait_audit,
    wait_pending,
)

BODY = b'{"format": "parquet"}'


async def test_abandoned_request_is_recorded_and_runs_only_when_asked_again(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy()
    url = f"{proc.url}/cloud/exports/abandoned"
    agent = {**(await tokens("agent-7")), **JSON}
    bob = await tokens("bob")
    call = start(session, "POST", url, headers=agent, data=BODY)
    [pending] = await wait_pending(session, proc.url, bob)
    approval_id = pending["approval_id"]
    assert pending["abandoned_at"] is None

    call.cancel()  # the agent gives up: its connection closes
    with contextlib.suppress(asyncio.CancelledError):
        await call
    event = await wait_audit(proc, "request.abandoned", approval_id=approval_id)
    assert event["approval_id"] == approval_id
    shown = await get_approval(session, proc.url, bob, approval_id)
    assert shown["state"] == "pending" and shown["abandoned_at"] is not None

    approved = await decide(session, proc.url, approval_id, bob, "approve", "late but fine")
    assert approved.status == 200 and approved.json()["state"] == "approved", str(approved)
    await asyncio.sleep(0.5)
    assert recorder.requests == []  # nobody is waiting: nothing runs on its own
    assert (await get_approval(session, proc.url, bob, approval_id))["state"] == "approved"

    # A different request does not pick it up ...
    other = start(session, "POST", url, headers=agent, data=b'{"format": "csv"}')
    [new] = await wait_pending(session, proc.url, bob)
    assert new["approval_id"] != approval_id
    await asyncio.sleep(0.2)
    assert not other.done() and recorder.requests == []
    # ... the identical one joins it and runs, once.
    reply = await send(session, "POST", url, headers=agent, data=BODY)
    assert reply.status == 200, str(reply)
    assert reply.headers["Countersign-Approval-Id"] == approval_id
    await asyncio.sleep(0.2)
    assert [(r.target, r.body) for r in recorder.requests] == [("/exports/abandoned", BODY)]
    final = await get_approval(session, proc.url, bob, approval_id)
    assert final["state"] == "executed" and final["upstream_status"] == 200
    denied = await decide(session, proc.url, new["approval_id"], bob, "deny", "not asked for")
    assert denied.status == 200, str(denied)
    refused = await asyncio.wait_for(other, 10)
    assert (refused.status, refused.code) == (403, "approval_denied"), str(refused)
    assert len(recorder.requests) == 1


async def test_approval_not_used_within_claim_seconds_lapses(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy(mode="async", claim_seconds=1)
    url = f"{proc.url}/cloud/exports/late"
    agent = {**(await tokens("agent-7")), **JSON}
    held = await send(session, "POST", url, headers=agent, data=BODY)
    assert held.status == 202, str(held)
    approval_id = held.json()["approval_id"]
    bob = await tokens("bob")
    approved = await decide(session, proc.url, approval_id, bob, "approve")
    assert approved.status == 200 and approved.json()["state"] == "approved", str(approved)

    await asyncio.sleep(1.5)
    use = {**agent, "Countersign-Approval": approval_id}
    reply = await send(session, "POST", url, headers=use, data=BODY)
    assert (reply.status, reply.code) == (403, "approval_lapsed"), str(reply)
    assert reply.json()["error"]["approval_id"] == approval_id
    again = await send(session, "POST", url, headers=use, data=BODY)
    assert (again.status, again.code) == (403, "approval_lapsed"), str(again)
    await wait_audit(proc, "approval.lapsed", approval_id=approval_id)
    lapsed = [
        e
        for e in audit_events(proc)
        if e["event"] == "approval.lapsed" and e.get("approval_id") == approval_id
    ]
    assert len(lapsed) == 1, lapsed  # audited exactly once
    assert (await get_approval(session, proc.url, bob, approval_id))["state"] == "lapsed"
    # A late decision cannot revive it.
    late = await decide(session, proc.url, approval_id, await tokens("carol"), "approve")
    assert (late.status, late.code) == (409, "approval_not_pending"), str(late)
    await asyncio.sleep(0.2)
    assert recorder.requests == []


async def test_concurrent_resends_execute_once(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy(mode="async")
    url = f"{proc.url}/cloud/exports/once"
    agent = {**(await tokens("agent-7")), **JSON}
    held = await send(session, "POST", url, headers={**agent, **ASYNC}, data=BODY)
    assert held.status == 202, str(held)
    approval_id = held.json()["approval_id"]
    await decide(session, proc.url, approval_id, await tokens("bob"), "approve")

    use = {**agent, **ASYNC, "Countersign-Approval": approval_id}
    replies = await asyncio.wait_for(
        asyncio.gather(*(send(session, "POST", url, headers=use, data=BODY) for _ in range(8))),
        15,
    )
    statuses = sorted(r.status for r in replies)
    assert statuses == [200] + [403] * 7, [str(r) for r in replies]
    assert {r.code for r in replies if r.status == 403} == {"approval_used"}
    await asyncio.sleep(0.3)
    assert [(r.target, r.body) for r in recorder.requests] == [("/exports/once", BODY)]
    forwarded = [
        e
        for e in audit_events(proc)
        if e["event"] == "request.forwarded" and e.get("approval_id") == approval_id
    ]
    assert len(forwarded) == 1, forwarded


async def test_naming_an_approval_that_is_not_approved_runs_nothing(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    """`Countersign-Approval` with a pending, denied or unknown id never forwards."""
    proc = start_proxy(mode="async")
    agent = {**(await tokens("agent-7")), **JSON}
    bob = await tokens("bob")

    pending = await send(session, "POST", f"{proc.url}/cloud/exports/p", headers=agent, data=BODY)
    assert pending.status == 202, str(pending)
    pending_id = pending.json()["approval_id"]
    use = {**agent, "Countersign-Approval": pending_id}
    reply = await send(session, "POST", f"{proc.url}/cloud/exports/p", headers=use, data=BODY)
    assert reply.status == 202 and reply.json()["approval_id"] == pending_id, str(reply)

    denied = await send(session, "POST", f"{proc.url}/cloud/exports/d", headers=agent, data=BODY)
    denied_id = denied.json()["approval_id"]
    assert (await decide(session, proc.url, denied_id, bob, "deny", "no")).status == 200
    use = {**agent, "Countersign-Approval": denied_id}
    reply = await send(session, "POST", f"{proc.url}/cloud/exports/d", headers=use, data=BODY)
    assert (reply.status, reply.code) == (403, "approval_denied"), str(reply)

    # An unknown id and another request's id answer alike: ids are not an oracle.
    for named in ("apr_doesnotexist000000000000", denied_id):
        use = {**agent, "Countersign-Approval": named}
        reply = await send(session, "POST", f"{proc.url}/cloud/exports/u", headers=use, data=BODY)
        assert (reply.status, reply.code) == (403, "approval_mismatch"), (named, str(reply))
    await asyncio.sleep(0.2)
    assert recorder.requests == []
