"""Attack: flood the approvers (and the proxy's memory) with held requests.

At most `approvals.max_pending_per_identity` pending approvals per identity and
`approvals.max_held_bytes` of held bodies per process; beyond them `429 too_many_pending` with
`Retry-After` (DESIGN §2, Limits). Joining an open approval is not a new one.
"""

from __future__ import annotations

import asyncio

import aiohttp

from tests.security.conftest import (
    JSON,
    Recorder,
    Reply,
    StartProxy,
    Tokens,
    decide,
    list_approvals,
    send,
    start,
    wait_pending,
)


def assert_too_many(reply: Reply) -> None:
    assert (reply.status, reply.code) == (429, "too_many_pending"), str(reply)
    retry_after = reply.headers.get("Retry-After")
    assert retry_after is not None and retry_after.isdigit() and int(retry_after) > 0, retry_after


async def test_pending_approvals_per_identity_are_bounded(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy(mode="async", max_pending_per_identity=3)
    agent = {**(await tokens("agent-7")), **JSON}
    bob = await tokens("bob")

    def export(n: int) -> str:
        return f"{proc.url}/cloud/exports/table-{n}"

    ids = []
    for n in range(3):
        reply = await send(session, "POST", export(n), headers=agent, data=b"{}")
        assert reply.status == 202, str(reply)
        ids.append(reply.json()["approval_id"])
    assert len(set(ids)) == 3

    fourth = await send(session, "POST", export(3), headers=agent, data=b"{}")
    assert_too_many(fourth)
    # The same agent with another token is the same identity.
    other_token = {**(await tokens.fresh("agent-7")), **JSON}
    assert_too_many(await send(session, "POST", export(4), headers=other_token, data=b"{}"))
    # An identical retry of a pending one joins it: no new approval, no 429.
    retry = await send(session, "POST", export(1), headers=agent, data=b"{}")
    assert retry.status == 202 and retry.json()["approval_id"] == ids[1], str(retry)
    # Another agent is not held back by agent-7's backlog.
    other = {**(await tokens("agent-x", act_for="carol@example.com")), **JSON}
    reply = await send(session, "POST", export(3), headers=other, data=b"{}")
    assert reply.status == 202, str(reply)
    pending = await list_approvals(session, proc.url, bob)
    assert len(pending) == 4
    assert sorted(a["approval_id"] for a in pending if a["requester"]["subject"] == "agent-7") == (
        sorted(ids)
    )

    # A decision frees a slot.
    denied = await decide(session, proc.url, ids[0], bob, "deny", "one at a time")
    assert denied.status == 200, str(denied)
    reply = await send(session, "POST", export(3), headers=agent, data=b"{}")
    assert reply.status == 202, str(reply)
    assert_too_many(await send(session, "POST", export(5), headers=agent, data=b"{}"))
    await asyncio.sleep(0.2)
    assert recorder.requests == []


async def test_held_bytes_are_bounded_per_process(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy(max_held_bytes=3000)
    agent = {**(await tokens("agent-7")), "Content-Type": "application/octet-stream"}
    bob = await tokens("bob")
    first_body, second_body, third_body = (bytes([n]) * 2000 for n in (1, 2, 3))

    first = start(session, "POST", f"{proc.url}/cloud/exports/a", headers=agent, data=first_body)
    [pending] = await wait_pending(session, proc.url, bob)
    # 2000 held + 2000 more > 3000: refused before an approval exists.
    second = await send(
        session, "POST", f"{proc.url}/cloud/exports/b", headers=agent, data=second_body
    )
    assert_too_many(second)
    # Also for another identity: the budget is the process's.
    other = {**(await tokens("agent-x", act_for="carol@example.com"))}
    reply = await send(
        session,
        "POST",
        f"{proc.url}/cloud/exports/c",
        headers={**other, "Content-Type": "application/octet-stream"},
        data=third_body,
    )
    assert_too_many(reply)
    assert len(await list_approvals(session, proc.url, bob)) == 1
    assert recorder.requests == []

    approved = await decide(session, proc.url, pending["approval_id"], bob, "approve")
    assert approved.status == 200, str(approved)
    reply = await asyncio.wait_for(first, 10)
    assert reply.status == 200, str(reply)

    # The first is answered: its bytes are no longer held, another request may wait.
    third = start(session, "POST", f"{proc.url}/cloud/exports/b", headers=agent, data=second_body)
    [pending] = await wait_pending(session, proc.url, bob)
    assert pending["path"] == "/cloud/exports/b"
    denied = await decide(session, proc.url, pending["approval_id"], bob, "deny", "no")
    assert denied.status == 200, str(denied)
    reply = await asyncio.wait_for(third, 10)
    assert (reply.status, reply.code) == (403, "approval_denied"), str(reply)
    await asyncio.sleep(0.2)
    assert [(r.target, r.body) for r in recorder.requests] == [("/exports/a", first_body)]
