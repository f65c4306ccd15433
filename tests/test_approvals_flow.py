"""Approvals through the real app in process: hold and async modes, the API, every refusal."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from proxy.model import Outcome
from tests.conftest import Client, Factory
from tests.helpers import (
    AGENT_KEY,
    ALICE_KEY,
    BOB_KEY,
    CAROL_KEY,
    DAVE_KEY,
    MALLORY_KEY,
    bearer,
)

AGENT = bearer(AGENT_KEY)
ALICE = bearer(ALICE_KEY)
EXPORT = "/cloud/exports/customers"
API = "/_countersign/api/approvals"


async def pending_id(client: Client, who: dict[str, str] = ALICE, tries: int = 100) -> str:
    """The id of the one pending approval, once the held request has created it."""
    for _ in range(tries):
        resp = await client.get(API, params={"state": "pending"}, headers=who)
        approvals = (await resp.json())["approvals"]
        if approvals:
            return str(approvals[0]["approval_id"])
        await asyncio.sleep(0.02)
    raise AssertionError("no pending approval appeared")


async def decide(
    client: Client, approval_id: str, who: dict[str, str], verdict: str, reason: str | None = None
) -> tuple[int, dict[str, Any]]:
    body: dict[str, Any] = {"verdict": verdict}
    if reason is not None:
        body["reason"] = reason
    resp = await client.post(f"{API}/{approval_id}/decision", json=body, headers=who)
    return resp.status, await resp.json()


def held(client: Client, body: dict[str, Any] | None = None, **headers: str) -> asyncio.Task[Any]:
    async def call() -> tuple[int, dict[str, Any], dict[str, str]]:
        resp = await client.post(
            EXPORT, json=body or {"format": "csv"}, headers={**AGENT, **headers}
        )
        return resp.status, await resp.json(), dict(resp.headers)

    return asyncio.create_task(call())


async def test_hold_mode_approve_forwards_the_exact_request(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    call = held(client, {"format": "csv", "password": "hunter2"}, **{"Countersign-Reason": "Q3"})
    approval_id = await pending_id(client)
    assert approval_id.startswith("apr_") and len(approval_id) >= 4 + 22
    shown = await (await client.get(f"{API}/{approval_id}", headers=ALICE)).json()
    assert shown["requester"]["subject"] == "agent-key"
    assert shown["requester"]["owner"] == "bob@example.com"
    assert shown["reason"] == "Q3"
    assert (shown["method"], shown["path"], shown["route"], shown["rule"]) == (
        "POST",
        EXPORT,
        "cloud",
        "exports",
    )
    assert "hunter2" not in shown["body_preview"] and '"format": "csv"' in shown["body_preview"]
    assert not call.done(), "the agent's call is held open"

    status, decided = await decide(client, approval_id, ALICE, "approve", "ok for Q3")
    assert status == 200 and decided["state"] == "approved"
    status, echo, headers = await asyncio.wait_for(call, 5)
    assert status == 200
    assert headers["Countersign-Approval-Id"] == approval_id
    assert echo["path"] == "/api/exports/customers"
    assert json.loads(echo["body"]) == {"format": "csv", "password": "hunter2"}
    assert "countersign-reason" not in echo["headers"]

    final = await (await client.get(f"{API}/{approval_id}", headers=ALICE)).json()
    assert final["state"] == "executed" and final["upstream_status"] == 200
    assert final["decisions"][0]["approver"]["email"] == "alice@example.com"
    assert final["decisions"][0]["channel"] == "api"
    requested = sink.named("approval.requested")[0]
    assert requested["approval_id"] == approval_id and requested["rule"] == "exports"
    assert requested["requester"]["subject"] == "agent-key"
    event = sink.named("approval.decided")[0]
    assert event["approver"]["email"] == "alice@example.com"
    assert (event["channel"], event["reason"], event["outcome"]) == ("api", "ok for Q3", "approved")
    assert sink.named("request.forwarded")[0]["approval_id"] == approval_id
    assert "hunter2" not in json.dumps(sink.events)


async def test_hold_mode_deny_returns_403_with_reason(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    call = held(client)
    approval_id = await pending_id(client)
    status, body = await decide(client, approval_id, ALICE, "deny", "not this quarter")
    assert status == 200 and body["state"] == "denied"
    status, body, _ = await asyncio.wait_for(call, 5)
    assert status == 403
    error = body["error"]
    assert error["code"] == "approval_denied"
    assert error["message"].startswith("Denied by alice@example.com: not this quarter. ")
    assert error["approval_id"] == approval_id and error["rule"] == "exports"
    assert error["reason"] == "not this quarter"
    assert error["decided_by"] == "alice@example.com"


async def test_denial_needs_a_reason(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    call = held(client)
    approval_id = await pending_id(client)
    for reason in (None, "", "   "):
        status, body = await decide(client, approval_id, ALICE, "deny", reason)
        assert status == 400 and body["error"]["code"] == "reason_required"
    await decide(client, approval_id, ALICE, "deny", "now with a reason")
    await call


async def test_expiry_releases_the_held_request_and_is_audited(make_proxy: Factory) -> None:
    client, sink = await make_proxy(timeout=1)
    status, body, _ = await asyncio.wait_for(held(client), 5)
    assert status == 403
    error = body["error"]
    assert error["code"] == "approval_expired" and error["rule"] == "exports"
    expired = sink.named("approval.expired")
    assert len(expired) == 1 and expired[0]["approval_id"] == error["approval_id"]
    status, late = await decide(client, error["approval_id"], ALICE, "approve")
    assert status == 409 and late["error"]["code"] == "approval_not_pending"


async def test_expiry_is_audited_even_with_nobody_waiting(make_proxy: Factory) -> None:
    client, sink = await make_proxy(timeout=1, mode="async")
    resp = await client.post(EXPORT, json={"a": 1}, headers=AGENT)
    assert resp.status == 202
    approval_id = (await resp.json())["approval_id"]
    for _ in range(60):
        if sink.named("approval.expired"):
            break
        await asyncio.sleep(0.05)
    assert [e["approval_id"] for e in sink.named("approval.expired")] == [approval_id]


async def test_retry_while_pending_joins_one_approval(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    first = held(client)
    approval_id = await pending_id(client)
    second = held(client)  # the agent's retry: same request, same caller
    await asyncio.sleep(0.1)
    assert len(sink.named("approval.requested")) == 1
    await decide(client, approval_id, ALICE, "approve")
    results = await asyncio.gather(first, second)
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 403], "one execution; the other waiter learns it was used"
    used = next(r[1] for r in results if r[0] == 403)
    assert used["error"]["code"] == "approval_used"
    assert len(sink.named("request.forwarded")) == 1


async def test_disconnect_then_retry_joins_and_runs_once(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    first = held(client)
    approval_id = await pending_id(client)
    first.cancel()  # the agent's HTTP client gives up; the approval stays pending
    await asyncio.sleep(0.1)
    shown = await (await client.get(f"{API}/{approval_id}", headers=ALICE)).json()
    assert shown["state"] == "pending"
    retry = held(client)
    await asyncio.sleep(0.1)
    await decide(client, approval_id, ALICE, "approve")
    status, _, headers = await asyncio.wait_for(retry, 5)
    assert status == 200 and headers["Countersign-Approval-Id"] == approval_id
    assert len(sink.named("approval.requested")) == 1
    assert len(sink.named("request.forwarded")) == 1


async def test_different_body_is_a_different_approval(make_proxy: Factory) -> None:
    client, sink = await make_proxy(mode="async")
    one = await (await client.post(EXPORT, json={"a": 1}, headers=AGENT)).json()
    two = await (await client.post(EXPORT, json={"a": 2}, headers=AGENT)).json()
    assert one["approval_id"] != two["approval_id"]
    assert len(sink.named("approval.requested")) == 2


@pytest.mark.parametrize(
    ("who", "error"),
    [
        (bearer(BOB_KEY), "self_approval"),  # the human the agent acts for
        (AGENT, "self_approval"),  # the requester itself
        (bearer(MALLORY_KEY), "not_an_approver"),
    ],
)
async def test_self_approval_and_strangers_are_refused(
    make_proxy: Factory, who: dict[str, str], error: str
) -> None:
    client, sink = await make_proxy(mode="async")
    resp = await client.post(EXPORT, json={"a": 1}, headers=AGENT)
    approval_id = (await resp.json())["approval_id"]
    status, body = await decide(client, approval_id, who, "approve")
    assert status == 403 and body["error"]["code"] == error
    assert not sink.named("approval.decided")
    shown = await (await client.get(f"{API}/{approval_id}", headers=ALICE)).json()
    assert shown["state"] == "pending"


async def test_directory_member_may_approve(make_proxy: Factory) -> None:
    client, _ = await make_proxy(mode="async")
    resp = await client.post(EXPORT, json={"a": 1}, headers=AGENT)
    approval_id = (await resp.json())["approval_id"]
    status, body = await decide(client, approval_id, bearer(CAROL_KEY), "approve")
    assert status == 200 and body["state"] == "approved"


async def test_quorum_needs_distinct_approvers(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    call = asyncio.create_task(
        client.post("/cloud/iam/roles", json={"role": "admin"}, headers=AGENT)
    )
    approval_id = await pending_id(client)
    status, body = await decide(client, approval_id, ALICE, "approve")
    assert status == 200 and body["state"] == "pending" and body["approvals"] == 1
    status, body = await decide(client, approval_id, ALICE, "approve")
    assert status == 409 and body["error"]["code"] == "already_approved"
    assert not call.done()
    status, body = await decide(client, approval_id, bearer(DAVE_KEY), "approve")
    assert status == 200 and body["state"] == "approved" and body["approvals"] == 2
    resp = await asyncio.wait_for(call, 5)
    assert resp.status == 200
    assert [e["outcome"] for e in sink.named("approval.decided")] == ["pending", "approved"]


async def test_one_denial_ends_a_quorum(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    call = asyncio.create_task(client.post("/cloud/iam/roles", json={"role": "x"}, headers=AGENT))
    approval_id = await pending_id(client)
    await decide(client, approval_id, ALICE, "approve")
    status, body = await decide(client, approval_id, bearer(DAVE_KEY), "deny", "no admins")
    assert status == 200 and body["state"] == "denied"
    resp = await asyncio.wait_for(call, 5)
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "approval_denied"


async def test_racing_deciders_exactly_one_wins(make_proxy: Factory) -> None:
    client, sink = await make_proxy(mode="async")
    resp = await client.post(EXPORT, json={"a": 1}, headers=AGENT)
    approval_id = (await resp.json())["approval_id"]
    deciders = [ALICE, bearer(CAROL_KEY), bearer(DAVE_KEY)] * 6
    results = await asyncio.gather(
        *(
            decide(client, approval_id, who, "approve" if i % 2 else "deny", "race")
            for i, who in enumerate(deciders)
        )
    )
    winners = [r for r in results if r[0] == 200]
    losers = [r for r in results if r[0] != 200]
    assert len(winners) == 1
    assert {r[0] for r in losers} == {409}
    assert len(sink.named("approval.decided")) == 1


async def test_body_above_the_limit_is_413_before_any_approval(make_proxy: Factory) -> None:
    client, sink = await make_proxy(max_body=1000)
    resp = await client.post(EXPORT, data=b"x" * 1001, headers=AGENT)
    assert resp.status == 413
    body = await resp.json()
    assert body["error"]["code"] == "payload_too_large" and body["error"]["limit"] == 1000
    assert not sink.named("approval.requested")


async def test_async_mode_202_then_resend_once(make_proxy: Factory) -> None:
    client, sink = await make_proxy(mode="async")
    resp = await client.post(EXPORT, json={"a": 1}, headers=AGENT)
    assert resp.status == 202
    body = await resp.json()
    approval_id = body["approval_id"]
    assert body["state"] == "pending"
    assert resp.headers["Location"] == f"{API}/{approval_id}"
    # Our own answer: our request id under both names (there is no upstream's).
    assert resp.headers["Countersign-Request-Id"] == resp.headers["X-Request-Id"]
    assert resp.headers["Countersign-Request-Id"] == body["request_id"]
    # The requester polls its own approval.
    polled = await client.get(resp.headers["Location"], headers=AGENT)
    assert polled.status == 200 and (await polled.json())["state"] == "pending"
    again = await client.post(
        EXPORT, json={"a": 1}, headers={**AGENT, "Countersign-Approval": approval_id}
    )
    assert again.status == 202, "still pending: nothing runs"
    await decide(client, approval_id, ALICE, "approve")
    run = await client.post(
        EXPORT, json={"a": 1}, headers={**AGENT, "Countersign-Approval": approval_id}
    )
    assert run.status == 200 and run.headers["Countersign-Approval-Id"] == approval_id
    sent = (await run.json())["headers"]
    assert sent["countersign-request-id"] == run.headers["Countersign-Request-Id"]
    second = await client.post(
        EXPORT, json={"a": 1}, headers={**AGENT, "Countersign-Approval": approval_id}
    )
    assert second.status == 403 and (await second.json())["error"]["code"] == "approval_used"
    assert len(sink.named("request.forwarded")) == 1


@pytest.mark.parametrize(
    ("path", "body", "who"),
    [
        (EXPORT, {"a": 2}, AGENT),  # different body
        ("/cloud/exports/other", {"a": 1}, AGENT),  # different path
        (EXPORT + "?x=1", {"a": 1}, AGENT),  # different query
        (EXPORT, {"a": 1}, bearer(DAVE_KEY)),  # different caller (dave may not ask; he's denied)
    ],
)
async def test_approval_covers_only_the_exact_request(
    make_proxy: Factory, path: str, body: dict[str, Any], who: dict[str, str]
) -> None:
    client, sink = await make_proxy(mode="async")
    resp = await client.post(EXPORT, json={"a": 1}, headers=AGENT)
    approval_id = (await resp.json())["approval_id"]
    await decide(client, approval_id, ALICE, "approve")
    other = await client.post(path, json=body, headers={**who, "Countersign-Approval": approval_id})
    assert other.status == 403
    assert (await other.json())["error"]["code"] in ("approval_mismatch", "policy_denied")
    assert not sink.named("request.forwarded")
    # The real request still runs, once.
    run = await client.post(
        EXPORT, json={"a": 1}, headers={**AGENT, "Countersign-Approval": approval_id}
    )
    assert run.status == 200


async def test_api_validation_errors(make_proxy: Factory) -> None:
    client, _ = await make_proxy(mode="async")
    resp = await client.post(EXPORT, json={"a": 1}, headers=AGENT)
    approval_id = (await resp.json())["approval_id"]
    url = f"{API}/{approval_id}/decision"
    cases = [
        (b"not json", None),
        (b"[1, 2]", None),
        (b'{"verdict": "maybe"}', "verdict"),
        (b'{"verdict": "approve", "reason": 5}', "reason"),
        (b'{"verdict": "approve", "extra": 1}', "extra"),
    ]
    for payload, field in cases:
        r = await client.post(
            url, data=payload, headers={**ALICE, "Content-Type": "application/json"}
        )
        error = (await r.json())["error"]
        assert r.status == 400 and error["code"] == "invalid_request", payload
        assert error.get("field") == field and error["message"], payload
    r = await client.post(f"{API}/apr_nope/decision", json={"verdict": "approve"}, headers=ALICE)
    assert r.status == 404 and (await r.json())["error"]["code"] == "approval_not_found"
    r = await client.get(API, params={"state": "bogus"}, headers=ALICE)
    error = (await r.json())["error"]
    assert r.status == 400 and (error["code"], error["field"]) == ("invalid_request", "state")
    r = await client.get(API)
    assert r.status == 401 and r.headers["WWW-Authenticate"].startswith(
        'Bearer error="invalid_token"'
    )


async def test_listing_shows_only_what_the_caller_may_see(make_proxy: Factory) -> None:
    client, _ = await make_proxy(mode="async")
    await client.post(EXPORT, json={"a": 1}, headers=AGENT)
    for who, count in ((ALICE, 1), (AGENT, 1), (bearer(BOB_KEY), 1), (bearer(MALLORY_KEY), 0)):
        resp = await client.get(API, headers=who)
        assert len((await resp.json())["approvals"]) == count


async def test_an_approval_not_used_in_time_lapses(make_proxy: Factory) -> None:
    client, sink = await make_proxy(mode="async", claim=1)
    resp = await client.post(EXPORT, json={"a": 1}, headers=AGENT)
    approval_id = (await resp.json())["approval_id"]
    status, body = await decide(client, approval_id, ALICE, "approve")
    assert status == 200 and body["state"] == "approved"
    await asyncio.sleep(1.3)
    late = await client.post(
        EXPORT, json={"a": 1}, headers={**AGENT, "Countersign-Approval": approval_id}
    )
    assert late.status == 403
    refused = await late.json()
    assert refused["error"]["code"] == "approval_lapsed"
    assert "not sent again within approvals.claim_seconds" in refused["error"]["message"]
    assert [e["approval_id"] for e in sink.named("approval.lapsed")] == [approval_id]
    assert not sink.named("approval.expired")
    assert not sink.named("request.forwarded")
    shown = await (await client.get(f"{API}/{approval_id}", headers=ALICE)).json()
    assert shown["state"] == "lapsed"


async def test_an_executed_request_is_answered_even_if_recording_its_outcome_fails(
    make_proxy: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from proxy.store.base import StoreUnavailable
    from proxy.store.memory import MemoryStore

    failures = 0
    original = MemoryStore.record_outcome

    async def flaky(
        self: MemoryStore, approval_id: str, outcome: Outcome, upstream_status: int | None
    ) -> Any:
        nonlocal failures
        if failures < 2:  # the store hiccups just after the upstream answered
            failures += 1
            raise StoreUnavailable("injected")
        return await original(self, approval_id, outcome, upstream_status)

    monkeypatch.setattr(MemoryStore, "record_outcome", flaky)
    client, sink = await make_proxy()
    call = held(client)
    approval_id = await pending_id(client)
    await decide(client, approval_id, ALICE, "approve")
    status, _, headers = await asyncio.wait_for(call, 5)
    assert status == 200, "the upstream ran it: the client gets the upstream's answer"
    assert headers["Countersign-Approval-Id"] == approval_id
    assert [e["approval_id"] for e in sink.named("request.forwarded")] == [approval_id]
    for _ in range(50):  # recorded in the background once the store is back
        shown = await (await client.get(f"{API}/{approval_id}", headers=ALICE)).json()
        if shown["upstream_status"] == 200:
            break
        await asyncio.sleep(0.1)
    assert shown["state"] == "executed" and shown["upstream_status"] == 200
    assert shown["outcome"] == "completed"


async def test_held_bytes_are_counted_while_bodies_arrive(
    make_proxy: Factory, upstream: Any
) -> None:
    """`approvals.max_held_bytes` covers uploads still arriving: a second upload is refused
    while the first one's bytes are in memory, before either is complete."""
    from tests.helpers import settings_for

    base = settings_for(str(upstream.make_url("/")))
    settings = base.model_copy(
        update={"approvals": base.approvals.model_copy(update={"max_held_bytes": 3000})}
    )
    client, _ = await make_proxy(settings)
    more = asyncio.Event()

    async def slow_upload() -> Any:
        yield b"a" * 2000
        await more.wait()
        yield b"b"

    first = asyncio.create_task(
        client.post(EXPORT, data=slow_upload(), headers={**AGENT, "X-Part": "1"})
    )
    await asyncio.sleep(0.3)  # its first 2000 bytes are held, the rest has not come
    second = await client.post(EXPORT, data=b"c" * 1500, headers=AGENT)
    assert second.status == 429
    body = await second.json()
    assert body["error"]["code"] == "too_many_pending"
    assert second.headers["Retry-After"]
    more.set()
    pending = await (await client.get(f"{API}?state=pending", headers=ALICE)).json()
    for _ in range(50):
        if pending["approvals"]:
            break
        await asyncio.sleep(0.05)
        pending = await (await client.get(f"{API}?state=pending", headers=ALICE)).json()
    assert [a["body_bytes"] for a in pending["approvals"]] == [2001]
    first.cancel()


async def test_a_rule_may_answer_async_while_the_default_holds(
    make_proxy: Factory, upstream: Any
) -> None:
    """`mode: async` on a rule: its requests get 202 without asking; others are still held."""
    from tests.helpers import settings_for

    base = settings_for(str(upstream.make_url("/")))
    rules = tuple(
        r.model_copy(update={"mode": "async"}) if r.name == "exports" else r
        for r in base.policy.rules
    )
    settings = base.model_copy(update={"policy": base.policy.model_copy(update={"rules": rules})})
    client, _ = await make_proxy(settings)
    resp = await client.post(EXPORT, json={"a": 1}, headers=AGENT)
    assert resp.status == 202
    body = await resp.json()
    assert body["state"] == "pending" and resp.headers["Location"].endswith(body["approval_id"])
    assert "Preference-Applied" not in resp.headers  # nobody asked; the rule said so
