"""Attack: one agent acting for different people reuses an approval given for one of them.

The binding covers the whole identity, the owner (`act.sub`) included (DESIGN §2): agent-x's
request for carol and the same request for bob are different requests.
"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.security.conftest import (
    JSON,
    Recorder,
    StartProxy,
    Tokens,
    decide,
    get_approval,
    send,
    start,
    wait_pending,
)

CAROL = "carol@example.com"
BOB = "bob@example.com"
BODY = b'{"format": "csv", "table": "payroll"}'


async def test_approval_for_one_owner_is_not_usable_for_another(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy(mode="async")
    url = f"{proc.url}/cloud/exports/payroll"
    for_carol = {**(await tokens("agent-x", act_for=CAROL)), **JSON}
    held = await send(session, "POST", url, headers=for_carol, data=BODY)
    assert held.status == 202, str(held)
    approval_id = held.json()["approval_id"]
    bob = await tokens("bob")
    shown = await get_approval(session, proc.url, bob, approval_id)
    assert shown["requester"]["subject"] == "agent-x"
    assert shown["owner"] == CAROL and shown["requester"]["owner"] == CAROL
    approved = await decide(session, proc.url, approval_id, bob, "approve", "ok for carol")
    assert approved.status == 200 and approved.json()["state"] == "approved", str(approved)

    # The same agent, the same request, another owner: not covered.
    for_bob = {**(await tokens("agent-x", act_for=BOB)), **JSON}
    reply = await send(
        session, "POST", url, headers={**for_bob, "Countersign-Approval": approval_id}, data=BODY
    )
    assert (reply.status, reply.code) == (403, "approval_mismatch"), str(reply)
    # ... nor for nobody (a token without `act`).
    for_nobody = {**(await tokens("agent-x")), **JSON}
    reply = await send(
        session,
        "POST",
        url,
        headers={**for_nobody, "Countersign-Approval": approval_id},
        data=BODY,
    )
    assert (reply.status, reply.code) == (403, "approval_mismatch"), str(reply)
    # ... nor for another agent (agent-7, acting for alice).
    agent7 = {**(await tokens("agent-7")), **JSON}
    reply = await send(
        session,
        "POST",
        url,
        headers={**agent7, "Countersign-Approval": approval_id},
        data=BODY,
    )
    assert (reply.status, reply.code) == (403, "approval_mismatch"), str(reply)
    await asyncio.sleep(0.2)
    assert recorder.requests == []
    assert (await get_approval(session, proc.url, bob, approval_id))["state"] == "approved"

    # The identity, not the token, is bound: a fresh token for carol runs it, once.
    fresh = {**(await tokens.fresh("agent-x", act_for=CAROL)), **JSON}
    reply = await send(
        session, "POST", url, headers={**fresh, "Countersign-Approval": approval_id}, data=BODY
    )
    assert reply.status == 200, str(reply)
    await asyncio.sleep(0.2)
    assert [(r.target, r.body) for r in recorder.requests] == [("/exports/payroll", BODY)]


async def test_identical_requests_for_two_owners_are_two_approvals(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy()
    url = f"{proc.url}/cloud/exports/payroll"
    for_carol = {**(await tokens("agent-x", act_for=CAROL)), **JSON}
    for_bob = {**(await tokens("agent-x", act_for=BOB)), **JSON}
    alice = await tokens("alice")
    call_carol = start(session, "POST", url, headers=for_carol, data=BODY)
    await wait_pending(session, proc.url, alice, 1)
    call_bob = start(session, "POST", url, headers=for_bob, data=BODY)
    pending = await wait_pending(session, proc.url, alice, 2)
    by_owner = {a["owner"]: a["approval_id"] for a in pending}
    assert set(by_owner) == {CAROL, BOB} and len(set(by_owner.values())) == 2

    # Each owner is refused on the request made on their behalf.
    reply = await decide(session, proc.url, by_owner[CAROL], await tokens("carol"), "approve")
    assert (reply.status, reply.code) == (403, "self_approval"), str(reply)
    reply = await decide(session, proc.url, by_owner[BOB], await tokens("bob"), "approve")
    assert (reply.status, reply.code) == (403, "self_approval"), str(reply)
    assert recorder.requests == []

    # bob may approve carol's: only hers runs.
    reply = await decide(session, proc.url, by_owner[CAROL], await tokens("bob"), "approve")
    assert reply.status == 200, str(reply)
    done = await asyncio.wait_for(call_carol, 10)
    assert done.status == 200 and done.headers["Countersign-Approval-Id"] == by_owner[CAROL]
    await asyncio.sleep(0.3)
    assert not call_bob.done()
    assert len(recorder.requests) == 1

    reply = await decide(session, proc.url, by_owner[BOB], alice, "deny", "not for bob")
    assert reply.status == 200, str(reply)
    refused = await asyncio.wait_for(call_bob, 10)
    assert (refused.status, refused.code) == (403, "approval_denied"), str(refused)
    await asyncio.sleep(0.2)
    assert len(recorder.requests) == 1
