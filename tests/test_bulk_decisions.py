"""Bulk decisions (`POST /_countersign/api/decisions`): one call decides every pending approval
its filter selects that the caller may decide, each recorded as its own decision; the others
are skipped and reported. Through the real app in process, and on the service with many held
requests on both stores."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from proxy.approvals.service import ApprovalService
from proxy.audit import AuditLog
from proxy.config import ApprovalsSettings, ApproversSettings, RuleSettings
from proxy.model import Action, Approval, ApprovalState, Identity, Verdict
from proxy.model.binding import binding_of
from proxy.store.base import Store
from tests.conftest import Client, Factory
from tests.helpers import (
    AGENT_KEY,
    ALICE_KEY,
    BOB_KEY,
    CAROL_KEY,
    CI_KEY,
    DAVE_KEY,
    MALLORY_KEY,
    ListSink,
    bearer,
)

AGENT = bearer(AGENT_KEY)
CI = bearer(CI_KEY)
ALICE = bearer(ALICE_KEY)
BOB = bearer(BOB_KEY)  # a data owner, but agent-key acts for him
CAROL = bearer(CAROL_KEY)
DAVE = bearer(DAVE_KEY)
MALLORY = bearer(MALLORY_KEY)
API = "/_countersign/api/approvals"
DECISIONS = "/_countersign/api/decisions"


async def ask(client: Client, path: str, who: dict[str, str] = AGENT, n: int = 0) -> str:
    """Open an approval without waiting for it (`Prefer: respond-async`); its id."""
    resp = await client.post(
        path, json={"format": "csv", "n": n}, headers={**who, "Prefer": "respond-async"}
    )
    assert resp.status == 202, await resp.text()
    return str((await resp.json())["approval_id"])


async def bulk(
    client: Client, who: dict[str, str], body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    resp = await client.post(DECISIONS, json=body, headers=who)
    return resp.status, await resp.json()


async def state_of(client: Client, approval_id: str) -> dict[str, Any]:
    resp = await client.get(f"{API}/{approval_id}", headers=ALICE)
    assert resp.status == 200
    shown: dict[str, Any] = await resp.json()
    return shown


def skipped_codes(body: dict[str, Any]) -> dict[str, str]:
    return {s["approval_id"]: s["code"] for s in body["skipped"]}


# -- through the app ---------------------------------------------------------------------------


async def test_held_requests_are_released_by_one_bulk_approval(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    calls = [
        asyncio.create_task(
            client.post(f"/cloud/exports/{n}", json={"format": "csv"}, headers=AGENT)
        )
        for n in range(5)
    ]
    for _ in range(200):
        listing = await (await client.get(API, params={"state": "pending"}, headers=ALICE)).json()
        if len(listing["approvals"]) == 5:
            break
        await asyncio.sleep(0.02)
    ids = {a["approval_id"] for a in listing["approvals"]}
    assert len(ids) == 5 and not any(c.done() for c in calls)

    status, body = await bulk(
        client, ALICE, {"verdict": "approve", "reason": "batch", "filter": {"rule": "exports"}}
    )
    assert status == 200, body
    assert body["count"] == 5 and body["skipped"] == []
    assert {d["approval_id"] for d in body["decided"]} == ids
    assert {d["state"] for d in body["decided"]} == {"approved"}

    responses = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert [r.status for r in responses] == [200] * 5
    assert {r.headers["Countersign-Approval-Id"] for r in responses} == ids
    for approval_id in ids:
        shown = await state_of(client, approval_id)
        assert shown["state"] == "executed" and shown["upstream_status"] == 200
        assert len(shown["decisions"]) == 1 and shown["decisions"][0]["reason"] == "batch"
    # One approval.decided per approval, each its own decision, marked as part of a batch.
    decided = sink.named("approval.decided")
    assert sorted(e["approval_id"] for e in decided) == sorted(ids)
    for event in decided:
        assert event["approver"]["person"] == "alice@example.com"
        assert (event["verdict"], event["reason"], event["channel"]) == ("approve", "batch", "api")
        assert event["outcome"] == "approved" and event["bulk"] is True


async def test_a_bulk_denial_needs_a_reason_and_refuses_each_held_request(
    make_proxy: Factory,
) -> None:
    client, sink = await make_proxy(mode="async")
    ids = [await ask(client, f"/cloud/exports/{n}") for n in range(3)]
    for reason in (None, "", "  "):
        body: dict[str, Any] = {"verdict": "deny", "filter": {"rule": "exports"}}
        if reason is not None:
            body["reason"] = reason
        status, answer = await bulk(client, ALICE, body)
        assert status == 400 and answer["error"]["code"] == "reason_required"
    assert not sink.named("approval.decided")
    status, answer = await bulk(
        client, ALICE, {"verdict": "deny", "reason": "not now", "filter": {"ids": ids}}
    )
    assert status == 200 and answer["count"] == 3
    assert [d["state"] for d in answer["decided"]] == ["denied"] * 3
    for approval_id in ids:
        shown = await state_of(client, approval_id)
        assert shown["state"] == "denied"
        assert shown["decisions"][0]["reason"] == "not now"
    assert sorted(e["approval_id"] for e in sink.named("approval.decided")) == sorted(ids)


async def test_the_filter_selects_by_rule_requester_and_ids(make_proxy: Factory) -> None:
    client, _ = await make_proxy(mode="async")
    exports = [await ask(client, f"/cloud/exports/{n}") for n in range(2)]
    agent_iam = await ask(client, "/cloud/iam/roles", AGENT)
    ci_iam = await ask(client, "/cloud/iam/roles", CI)

    # rule: only that rule's approvals.
    status, body = await bulk(client, ALICE, {"verdict": "approve", "filter": {"rule": "exports"}})
    assert status == 200
    assert sorted(d["approval_id"] for d in body["decided"]) == sorted(exports)
    assert (await state_of(client, agent_iam))["approvals"] == 0

    # requester (a subject): only what it asked for; combined keys all apply.
    status, body = await bulk(
        client, ALICE, {"verdict": "approve", "filter": {"rule": "iam", "requester": "ci-key"}}
    )
    assert [d["approval_id"] for d in body["decided"]] == [ci_iam]
    assert body["decided"][0]["state"] == "pending"  # quorum 2: one approval of two
    assert (await state_of(client, agent_iam))["approvals"] == 0

    # ids alone; an id outside the other keys is reported, not decided.
    status, body = await bulk(
        client,
        DAVE,
        {"verdict": "approve", "filter": {"ids": [agent_iam, ci_iam], "requester": "ci-key"}},
    )
    assert [d["approval_id"] for d in body["decided"]] == [ci_iam]
    assert body["decided"][0]["state"] == "approved"
    assert skipped_codes(body) == {agent_iam: "not_selected"}
    status, body = await bulk(client, DAVE, {"verdict": "approve", "filter": {"ids": [agent_iam]}})
    assert body["count"] == 1 and body["decided"][0]["approval_id"] == agent_iam


async def test_a_requester_filter_matches_a_persons_email(make_proxy: Factory) -> None:
    client, _ = await make_proxy(mode="async")
    # alice asks herself (she is in no `agents` group, but iam has no condition).
    alices = await ask(client, "/cloud/iam/roles", ALICE)
    agents = await ask(client, "/cloud/iam/roles", AGENT)
    status, body = await bulk(
        client, DAVE, {"verdict": "approve", "filter": {"requester": "Alice@Example.com"}}
    )
    assert status == 200
    assert [d["approval_id"] for d in body["decided"]] == [alices]
    assert (await state_of(client, agents))["approvals"] == 0


async def test_what_the_caller_may_not_decide_is_skipped_and_reported(
    make_proxy: Factory,
) -> None:
    client, sink = await make_proxy(mode="async")
    ids = [await ask(client, f"/cloud/exports/{n}") for n in range(2)]
    # bob may see them (his agent asked) but never decide them: zero self-approval.
    status, body = await bulk(client, BOB, {"verdict": "approve", "filter": {"rule": "exports"}})
    assert status == 200 and body["count"] == 0 and body["decided"] == []
    assert skipped_codes(body) == dict.fromkeys(ids, "self_approval")
    assert all(s["message"] for s in body["skipped"])
    # The agent itself neither.
    status, body = await bulk(client, AGENT, {"verdict": "approve", "filter": {"ids": ids}})
    assert skipped_codes(body) == dict.fromkeys(ids, "self_approval")
    # mallory is nobody's approver: what she names is reported, ...
    status, body = await bulk(client, MALLORY, {"verdict": "approve", "filter": {"ids": ids}})
    assert status == 200 and body["count"] == 0
    assert skipped_codes(body) == dict.fromkeys(ids, "not_an_approver")
    # ... what she may not even see is not shown to her at all.
    status, body = await bulk(
        client, MALLORY, {"verdict": "approve", "filter": {"rule": "exports"}}
    )
    assert body == {"decided": [], "skipped": [], "count": 0}
    assert not sink.named("approval.decided")
    for approval_id in ids:
        assert (await state_of(client, approval_id))["state"] == "pending"

    # A batch mixing what may and may not be decided: the rest still goes through.
    decided_already = ids[0]
    status, _ = await bulk(client, ALICE, {"verdict": "approve", "filter": {"ids": [ids[0]]}})
    status, body = await bulk(
        client,
        CAROL,
        {"verdict": "approve", "filter": {"ids": [*ids, "apr_does-not-exist"]}},
    )
    assert status == 200
    assert [d["approval_id"] for d in body["decided"]] == [ids[1]]
    assert skipped_codes(body) == {
        decided_already: "approval_not_pending",
        "apr_does-not-exist": "approval_not_found",
    }


async def test_quorum_counts_one_decision_per_approval_and_person(make_proxy: Factory) -> None:
    client, sink = await make_proxy(mode="async")
    ids = [await ask(client, "/cloud/iam/roles", AGENT, n) for n in range(3)]
    first = {"verdict": "approve", "filter": {"rule": "iam"}}
    status, body = await bulk(client, ALICE, first)
    assert status == 200
    assert body["count"] == 3 and {d["state"] for d in body["decided"]} == {"pending"}
    # The same person again counts nothing: each is skipped as already approved.
    status, body = await bulk(client, ALICE, first)
    assert status == 200
    assert body["count"] == 0 and skipped_codes(body) == dict.fromkeys(ids, "already_approved")
    status, body = await bulk(client, DAVE, first)
    assert status == 200
    assert body["count"] == 3 and {d["state"] for d in body["decided"]} == {"approved"}
    for approval_id in ids:
        shown = await state_of(client, approval_id)
        assert (shown["state"], shown["approvals"], shown["quorum"]) == ("approved", 2, 2)
    events = sink.named("approval.decided")
    assert len(events) == 6
    assert sorted((e["approval_id"], e["approvals"]) for e in events) == sorted(
        [(i, 1) for i in ids] + [(i, 2) for i in ids]
    )


async def test_bulk_decision_validation(make_proxy: Factory) -> None:
    client, _ = await make_proxy(mode="async")
    bad: list[Any] = [
        {"verdict": "approve"},  # no filter
        {"verdict": "approve", "filter": {}},
        {"verdict": "approve", "filter": {"rules": "exports"}},
        {"verdict": "approve", "filter": {"rule": ""}},
        {"verdict": "approve", "filter": {"rule": 7}},
        {"verdict": "approve", "filter": {"ids": []}},
        {"verdict": "approve", "filter": {"ids": "apr_x"}},
        {"verdict": "approve", "filter": {"ids": [1]}},
        {"verdict": "approve", "filter": {"ids": ["apr_x"] * 10_001}},
        {"verdict": "maybe", "filter": {"rule": "exports"}},
        {"verdict": "approve", "reason": 5, "filter": {"rule": "exports"}},
        {"verdict": "approve", "filter": {"rule": "exports"}, "grant": {"uses": 2, "seconds": 9}},
        ["not", "an", "object"],
    ]
    for body in bad:
        resp = await client.post(DECISIONS, json=body, headers=ALICE)
        assert resp.status == 400, body
        assert (await resp.json())["error"]["code"] == "invalid_request"
    resp = await client.post(DECISIONS, data=b"{not json", headers=ALICE)
    assert resp.status == 400
    resp = await client.post(DECISIONS, json={"verdict": "approve", "filter": {"rule": "x"}})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"


# -- many held requests, on both stores --------------------------------------------------------

REQUESTER = Identity(
    subject="agent-7", issuer="https://idp", groups=frozenset({"agents"}), owner="bob@example.com"
)
APPROVER = Identity(
    subject="alice",
    issuer="https://idp",
    email="alice@example.com",
    groups=frozenset({"data-owners"}),
    email_verified=True,
)
RULE = RuleSettings(
    name="exports",
    action=Action.APPROVE,
    approvers=ApproversSettings(groups=("data-owners",)),
    timeout_seconds=300,
)
MANY = 2_000


async def open_one(service: ApprovalService, n: int, requester: Identity = REQUESTER) -> Approval:
    """Open (as a held request would) the approval of `POST /cloud/exports/{n}`."""
    approval, created = await service.open(
        identity=requester,
        rule=RULE,
        binding=binding_of(
            method="POST",
            target=f"/api/exports/{n}".encode(),
            headers=((b"content-type", b"application/json"),),
            body=f'{{"n": {n}}}'.encode(),
            route="cloud",
            rule="exports",
            identity=requester,
        ),
        path=f"/cloud/exports/{n}",
        query="",
        upstream_url=f"http://upstream/api/exports/{n}",
        reason=None,
        request_id=f"r{n}",
    )
    assert created
    return approval


async def test_two_thousand_held_requests_released_by_one_bulk_decision(store: Store) -> None:
    sink = ListSink()
    service = ApprovalService(
        store, ApprovalsSettings(max_pending_per_identity=MANY), AuditLog([sink])
    )

    async def hold(n: int) -> ApprovalState:
        approval = await open_one(service, n)
        decided = await service.wait_for_decision(approval.id)
        if decided.state is ApprovalState.APPROVED:
            return (await service.claim(approval.id)).state  # what a released request does
        return decided.state

    held = [asyncio.create_task(hold(n)) for n in range(MANY)]
    for _ in range(600):
        if len(sink.named("approval.requested")) == MANY:
            break
        await asyncio.sleep(0.05)
    assert len(sink.named("approval.requested")) == MANY
    assert not any(task.done() for task in held)

    started = time.monotonic()
    outcome = await service.decide_many(APPROVER, Verdict.APPROVE, "release", "api", rule="exports")
    states = await asyncio.wait_for(asyncio.gather(*held), 60)
    elapsed = time.monotonic() - started

    assert len(outcome.decided) == MANY and outcome.skipped == []
    assert states == [ApprovalState.EXECUTED] * MANY
    decided = sink.named("approval.decided")
    assert len(decided) == MANY and len({e["approval_id"] for e in decided}) == MANY
    pending, _ = await store.list(ApprovalState.PENDING)
    assert pending == []
    # A generous bound (the CI machine is busy): the release bench measures the real figure.
    assert elapsed < 30, f"{MANY} held requests took {elapsed:.1f} s to be released"
