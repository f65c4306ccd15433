"""Grants: "approve this and the next N of the same shape for T seconds" (DESIGN §2).

The store's own grant operations (atomic use, expiry, revocation) are in the conformance suite
(`tests/store_conformance.py`, run against memory, Redis, Sentinel and Cluster); here: the scope
a grant binds, the config keys, the state machine's rule for quorum, and the service over both
the memory and a real Redis store: creation limits, use and binding, audit, revocation, expiry.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from proxy.approvals.service import ApprovalService
from proxy.audit import AuditLog
from proxy.config import (
    ApprovalsSettings,
    ApproversSettings,
    ConfigError,
    GrantSettings,
    RuleSettings,
    load_settings_text,
)
from proxy.model import Action, Approval, ApprovalState, Identity, Verdict
from proxy.model.binding import binding_of
from proxy.model.grant import GrantState, grant_id_for, scope_of
from proxy.model.state import InvalidGrant, NotAnApprover, SelfApproval, check_grant_request
from proxy.store.base import Store
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from tests.helpers import ListSink
from tests.redis_fixture import RedisServer
from tests.store_conformance import approve, make_approval

AGENT = Identity(
    subject="agent-7",
    issuer="https://idp",
    client_id="agent-7",
    groups=frozenset({"agents"}),
    owner="alice@example.com",
)
BOB = Identity(
    subject="bob",
    issuer="https://idp",
    email="bob@example.com",
    groups=frozenset({"data-owners"}),
    email_verified=True,
)
DAVE = Identity(
    subject="dave",
    issuer="https://idp",
    email="dave@example.com",
    groups=frozenset({"data-owners"}),
    email_verified=True,
)
ALICE = Identity(  # in data-owners, but agent-7 acts for her
    subject="alice",
    issuer="https://idp",
    email="alice@example.com",
    groups=frozenset({"data-owners"}),
    email_verified=True,
)
MALLORY = Identity(
    subject="mallory", issuer="https://idp", email="mallory@example.com", email_verified=True
)
RULE = RuleSettings(
    name="exports",
    action=Action.APPROVE,
    approvers=ApproversSettings(groups=("data-owners",)),
    timeout_seconds=60,
    grant=GrantSettings(max_uses=5, max_seconds=600),
)
NO_GRANTS = RULE.model_copy(update={"grant": None})
QUORUM_2 = RULE.model_copy(update={"quorum": 2})
PATH = "/cloud/exports/x"


class Clock:
    def __init__(self) -> None:
        self.now = 2_000_000_000.0

    def __call__(self) -> float:
        return self.now


# -- the scope ---------------------------------------------------------------------------------

SCOPE_PARTS: dict[str, Any] = {
    "issuer": "https://idp",
    "subject": "agent-7",
    "client_id": "agent-7",
    "owner": "alice@example.com",
    "rule": "exports",
    "route": "cloud",
    "method": "POST",
    "path": PATH,
    "actions": ("tool:a", "tool:b"),
}


@pytest.mark.parametrize(
    ("part", "other"),
    [
        ("issuer", "https://other-idp"),
        ("subject", "agent-8"),
        ("client_id", None),
        ("client_id", "agent-8"),
        ("owner", None),
        ("owner", "bob@example.com"),
        ("rule", "iam"),
        ("route", "raw"),
        ("method", "PUT"),
        ("path", "/cloud/exports/y"),
        ("path", "/cloud/exports/x/"),
        ("path", "/cloud/exports"),
        ("actions", ("tool:a",)),
        ("actions", ("tool:a", "tool:b", "tool:c")),
        ("actions", ()),
    ],
)
def test_every_bound_part_changes_the_scope(part: str, other: Any) -> None:
    assert scope_of(**SCOPE_PARTS) != scope_of(**{**SCOPE_PARTS, part: other})


def test_action_order_and_repeats_do_not_change_the_scope() -> None:
    same = {**SCOPE_PARTS, "actions": ("tool:b", "tool:a", "tool:b")}
    assert scope_of(**SCOPE_PARTS) == scope_of(**same)


def test_parts_cannot_be_shifted_into_one_another() -> None:
    a = {**SCOPE_PARTS, "subject": "agent", "client_id": "-7"}
    b = {**SCOPE_PARTS, "subject": "agent-", "client_id": "7"}
    assert scope_of(**a) != scope_of(**b)


# -- config ------------------------------------------------------------------------------------

RULES = """
policy:
  rules:
    - name: exports
      methods: [POST]
      action: {action}
{extra}
"""
APPROVERS = "      approvers: {groups: [data-owners]}\n"


def load_rule(extra: str, action: str = "approve") -> RuleSettings:
    body = (APPROVERS if action == "approve" else "") + extra
    text = RULES.format(action=action, extra=body)
    return load_settings_text(text, "grants.yaml", env={}).policy.rules[0]


def test_grant_risk_and_note_load() -> None:
    rule = load_rule(
        "      grant: {max_uses: 10, max_seconds: 1800}\n"
        "      risk: high\n"
        '      note: "exports leave the company: check the recipient"\n'
    )
    assert rule.grant == GrantSettings(max_uses=10, max_seconds=1800)
    assert rule.risk == "high"
    assert rule.note == "exports leave the company: check the recipient"


@pytest.mark.parametrize(
    "extra",
    [
        "      grant: {max_uses: 0, max_seconds: 60}\n",
        "      grant: {max_uses: 5, max_seconds: 0}\n",
        "      grant: {max_uses: -1, max_seconds: 60}\n",
        "      grant: {max_uses: 1001, max_seconds: 60}\n",
        "      grant: {max_uses: 5, max_seconds: 604801}\n",
        '      grant: {max_uses: "5", max_seconds: 60}\n',
        "      grant: {max_uses: 5}\n",
        "      grant: {max_uses: 5, max_seconds: 60, forever: true}\n",
        "      risk: extreme\n",
        '      note: ""\n',
    ],
)
def test_bad_grant_risk_or_note_is_refused(extra: str) -> None:
    with pytest.raises(ConfigError):
        load_rule(extra)


@pytest.mark.parametrize(
    "extra",
    ["      grant: {max_uses: 5, max_seconds: 60}\n", "      risk: low\n", "      note: hi\n"],
)
def test_grant_risk_and_note_only_on_approve_rules(extra: str) -> None:
    with pytest.raises(ConfigError):
        load_rule(extra, action="allow")


# -- the state machine -------------------------------------------------------------------------


def grantable(**overrides: Any) -> Approval:
    return make_approval(grant_max_uses=5, grant_max_seconds=600, **overrides)


def asking(approver: str, uses: int | None, seconds: int | None, at: float) -> Any:
    return replace(approve(approver, at=at), grant_uses=uses, grant_seconds=seconds)


@pytest.mark.parametrize(
    ("approval", "verdict", "uses", "seconds", "says"),
    [
        (make_approval(), Verdict.APPROVE, 2, 60, "grants are not allowed for rule 'exports'"),
        (grantable(), Verdict.APPROVE, 6, 60, "at most 5 uses for at most 600 seconds"),
        (grantable(), Verdict.APPROVE, 5, 601, "at most 5 uses for at most 600 seconds"),
        (grantable(), Verdict.APPROVE, 0, 60, "at least 1 use"),
        (grantable(), Verdict.APPROVE, 2, None, "both"),
        (grantable(), Verdict.DENY, 2, 60, "not with a denial"),
    ],
)
def test_grant_requests_beyond_the_rule_are_refused(
    approval: Approval, verdict: Verdict, uses: int | None, seconds: int | None, says: str
) -> None:
    with pytest.raises(InvalidGrant, match=says) as caught:
        check_grant_request(approval, verdict, uses, seconds)
    assert caught.value.code == "invalid_request"


def test_grant_requests_within_the_rule_pass() -> None:
    check_grant_request(grantable(), Verdict.APPROVE, 5, 600)
    check_grant_request(make_approval(), Verdict.APPROVE, None, None)


async def test_quorum_one_grant_is_made_on_approval() -> None:
    store = MemoryStore()
    approval, _ = await store.create_or_join(grantable())
    decided = await store.decide(approval.id, asking("bob", 3, 120, 1.0), approval.created_at)
    assert decided.state is ApprovalState.APPROVED
    assert decided.grant_id == grant_id_for(approval.id)
    assert (decided.grant_uses, decided.grant_seconds) == (3, 120)
    assert decided.grant_expires_at == 121.0


async def test_quorum_two_takes_the_smallest_of_both_asks() -> None:
    store = MemoryStore()
    approval, _ = await store.create_or_join(grantable(quorum=2))
    now = approval.created_at
    first = await store.decide(approval.id, asking("bob", 2, 600, 1.0), now)
    assert first.state is ApprovalState.PENDING and first.grant_id is None
    second = await store.decide(approval.id, asking("dave", 5, 60, 2.0), now)
    assert second.state is ApprovalState.APPROVED
    assert (second.grant_uses, second.grant_seconds) == (2, 60)


async def test_quorum_two_makes_no_grant_unless_every_approver_asks() -> None:
    store = MemoryStore()
    approval, _ = await store.create_or_join(grantable(quorum=2))
    now = approval.created_at
    await store.decide(approval.id, asking("bob", 2, 600, 1.0), now)
    second = await store.decide(approval.id, approve("dave", at=2.0), now)
    assert second.state is ApprovalState.APPROVED and second.grant_id is None


# -- the service, over both stores -------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    if request.param == "memory":
        memory = MemoryStore()
        yield memory
        await memory.aclose()
        return
    server: RedisServer = request.getfixturevalue("fresh_redis")
    redis = RedisStore(server.url, key_prefix="test-" + secrets.token_hex(6), timeout_seconds=1)
    yield redis
    await redis.aclose()


class Setup:
    def __init__(self, store: Store) -> None:
        self.clock = Clock()
        self.sink = ListSink()
        self.service = ApprovalService(
            store,
            ApprovalsSettings(groups={"data-owners": ("carol@example.com",)}),
            AuditLog([self.sink]),
            clock=self.clock,
        )

    async def open(
        self,
        identity: Identity = AGENT,
        rule: RuleSettings = RULE,
        path: str = PATH,
        body: bytes = b'{"n": 1}',
    ) -> Approval:
        approval, _ = await self.service.open(
            identity=identity,
            rule=rule,
            binding=binding_of(
                method="POST",
                target=path.removeprefix("/cloud").encode(),
                headers=((b"content-type", b"application/json"),),
                body=body,
                route="cloud",
                rule=rule.name,
                identity=identity,
            ),
            path=path,
            query="",
            upstream_url="http://upstream" + path,
            reason=None,
            request_id="req-" + secrets.token_hex(4),
        )
        return approval

    async def use(
        self,
        identity: Identity = AGENT,
        rule: RuleSettings = RULE,
        path: str = PATH,
        method: str = "POST",
        actions: tuple[str, ...] = (),
        route: str = "cloud",
    ) -> Any:
        return await self.service.use_grant(
            identity=identity,
            rule=rule,
            route=route,
            method=method,
            path=path,
            actions=actions,
            request_id="req-" + secrets.token_hex(4),
        )

    async def granted(self, uses: int = 2, seconds: int = 300) -> Approval:
        approval = await self.open()
        return await self.service.decide(
            approval.id, BOB, Verdict.APPROVE, "ok", "api", grant_uses=uses, grant_seconds=seconds
        )


async def test_an_approval_with_a_grant_creates_it_and_shows_it(store: Store) -> None:
    s = Setup(store)
    decided = await s.granted(uses=2, seconds=300)
    assert decided.grant_id is not None
    grant = await s.service.get_grant(decided.grant_id)
    assert grant is not None
    assert (grant.uses, grant.uses_left, grant.approval_id) == (2, 2, decided.id)
    assert grant.expires_at == s.clock.now + 300
    assert grant.granted_by == ("bob@example.com",)
    assert grant.pattern == "POST /cloud/exports/x"
    [created] = s.sink.named("grant.created")
    assert created["grant_id"] == grant.id and created["approval_id"] == decided.id
    assert created["uses"] == 2 and created["granted_by"] == ["bob@example.com"]
    [decided_event] = s.sink.named("approval.decided")
    assert decided_event["grant"] == {"uses": 2, "seconds": 300}
    shown = await s.service.view_live(decided)
    assert shown["grant"] == {
        "offered": True,
        "max_uses": 5,
        "max_seconds": 600,
        "pattern": "POST /cloud/exports/x",
        "grant_id": grant.id,
        "uses": 2,
        "seconds": 300,
        "expires_at": shown["grant"]["expires_at"],
        "uses_left": 2,
        "state": "active",
    }
    assert shown["grant"]["expires_at"].startswith("2033-05-18T03:3")


async def test_uses_pass_then_run_out_each_audited(store: Store) -> None:
    s = Setup(store)
    decided = await s.granted(uses=2)
    first = await s.use()
    second = await s.use()
    assert first is not None and second is not None
    assert (first.uses_left, second.uses_left) == (1, 0)
    assert await s.use() is None
    used = s.sink.named("grant.used")
    assert [e["uses_left"] for e in used] == [1, 0]
    assert all(e["approval_id"] == decided.id and e["grant_id"] == first.id for e in used)
    assert all(e["request_id"].startswith("req-") for e in used)
    [exhausted] = s.sink.named("grant.exhausted")
    assert exhausted["grant_id"] == first.id
    grant = await s.service.get_grant(first.id)
    assert grant is not None and s.service.grant_view(grant)["state"] == "exhausted"


async def test_concurrent_uses_never_exceed_the_grant(store: Store) -> None:
    s = Setup(store)
    await s.granted(uses=3)
    results = await asyncio.gather(*(s.use() for _ in range(30)))
    assert sum(1 for r in results if r is not None) == 3
    assert len(s.sink.named("grant.used")) == 3
    assert len(s.sink.named("grant.exhausted")) == 1


@pytest.mark.parametrize(
    "other",
    [
        {"identity": replace(AGENT, subject="agent-8")},
        {"identity": replace(AGENT, client_id="agent-8")},
        {"identity": replace(AGENT, owner="bob@example.com")},
        {"identity": replace(AGENT, issuer="https://other-idp")},
        {"path": "/cloud/exports/y"},
        {"method": "PUT"},
        {"actions": ("tool:x",)},
        {"route": "raw"},
        {"rule": RULE.model_copy(update={"name": "other-exports"})},
    ],
)
async def test_a_grant_covers_only_its_identity_rule_route_and_shape(
    store: Store, other: dict[str, Any]
) -> None:
    s = Setup(store)
    await s.granted(uses=2)
    assert await s.use(**other) is None
    assert not s.sink.named("grant.used")
    assert await s.use() is not None  # still there for the agent it was made for


async def test_body_and_query_may_differ(store: Store) -> None:
    """The scope holds neither: a request with another body reaches the same grant (the
    policy judged it `approve` under the same rule before the gate asks)."""
    s = Setup(store)
    await s.granted(uses=1)
    assert await s.use() is not None


async def test_a_rule_that_no_longer_allows_grants_uses_none(store: Store) -> None:
    s = Setup(store)
    await s.granted(uses=2)
    assert await s.use(rule=NO_GRANTS) is None  # e.g. the config was reloaded without it
    assert await s.use() is not None


async def test_asking_beyond_the_rule_is_refused_and_decides_nothing(store: Store) -> None:
    s = Setup(store)
    approval = await s.open()
    with pytest.raises(InvalidGrant, match="at most 5 uses"):
        await s.service.decide(
            approval.id, BOB, Verdict.APPROVE, None, "api", grant_uses=6, grant_seconds=60
        )
    plain = await s.open(rule=NO_GRANTS, path="/cloud/exports/z")
    with pytest.raises(InvalidGrant, match="grants are not allowed"):
        await s.service.decide(
            plain.id, BOB, Verdict.APPROVE, None, "api", grant_uses=1, grant_seconds=60
        )
    for still in (approval, plain):
        current = await s.service.get(still.id)
        assert current is not None and current.state is ApprovalState.PENDING
    assert not s.sink.named("approval.decided")


async def test_zero_self_approval_still_holds_with_a_grant(store: Store) -> None:
    s = Setup(store)
    approval = await s.open()
    with pytest.raises(SelfApproval):
        await s.service.decide(
            approval.id, ALICE, Verdict.APPROVE, None, "api", grant_uses=2, grant_seconds=60
        )
    assert await s.use() is None


async def test_quorum_two_grant_is_made_once_at_the_quorum(store: Store) -> None:
    s = Setup(store)
    approval = await s.open(rule=QUORUM_2)
    await s.service.decide(
        approval.id, BOB, Verdict.APPROVE, None, "api", grant_uses=4, grant_seconds=600
    )
    assert not s.sink.named("grant.created")
    assert await s.use(rule=QUORUM_2) is None  # not approved yet: no grant
    decided = await s.service.decide(
        approval.id, DAVE, Verdict.APPROVE, None, "api", grant_uses=2, grant_seconds=900 // 3
    )
    assert decided.state is ApprovalState.APPROVED
    [created] = s.sink.named("grant.created")
    assert created["uses"] == 2 and set(created["granted_by"]) == {
        "bob@example.com",
        "dave@example.com",
    }


async def test_an_expired_grant_is_not_used_and_its_expiry_is_audited_once(
    store: Store,
) -> None:
    s = Setup(store)
    decided = await s.granted(uses=2, seconds=60)
    s.clock.now += 60
    assert await s.use() is None
    await s.service.expire_due()
    await s.service.expire_due()
    [expired] = s.sink.named("grant.expired")
    assert expired["grant_id"] == decided.grant_id and expired["uses_left"] == 2


async def test_revocation_by_an_approver_ends_it_at_once(store: Store) -> None:
    s = Setup(store)
    decided = await s.granted(uses=3)
    assert decided.grant_id is not None
    assert await s.use() is not None
    with pytest.raises(NotAnApprover):
        await s.service.revoke_grant(decided.grant_id, AGENT)
    # carol is an approver through the `approvals.groups` directory.
    carol = Identity(
        subject="carol", issuer="https://idp", email="carol@example.com", email_verified=True
    )
    revoked = await s.service.revoke_grant(decided.grant_id, carol)
    assert revoked.state(s.clock.now) is GrantState.REVOKED
    assert revoked.revoked_by == "carol@example.com"
    assert await s.use() is None
    await s.service.revoke_grant(decided.grant_id, BOB)  # again: nothing more to audit
    [event] = s.sink.named("grant.revoked")
    assert event["grant_id"] == decided.grant_id and event["uses_left"] == 2
    assert event["revoked_by"]["person"] == "carol@example.com"
    s.clock.now += 3600
    await s.service.expire_due()
    assert not s.sink.named("grant.expired")


async def test_grants_are_visible_like_approvals(store: Store) -> None:
    s = Setup(store)
    decided = await s.granted()
    for who in (AGENT, BOB, DAVE):
        assert [g.id for g in await s.service.grants_for(who)] == [decided.grant_id]
    assert await s.service.grants_for(MALLORY) == []
    owner = Identity(
        subject="alice-2", issuer="https://idp", email="alice@example.com", email_verified=True
    )
    assert [g.id for g in await s.service.grants_for(owner)] == [decided.grant_id]


# -- through the app in process: the API and the gate ------------------------------------------

API = "/_countersign/api/approvals"
GRANTS = "/_countersign/api/grants"
EXPORT = "/cloud/exports/customers"


def with_export_grant(upstream: str, **grant: int) -> Any:
    """The test config, its `exports` rule allowing grants (and showing a risk and a note)."""
    from tests.helpers import settings_for

    settings = settings_for(upstream)
    rules = tuple(
        rule.model_copy(
            update={
                "grant": GrantSettings(**(grant or {"max_uses": 5, "max_seconds": 600})),
                "risk": "high",
                "note": "exports leave the company",
            }
        )
        if rule.name == "exports"
        else rule
        for rule in settings.policy.rules
    )
    policy = settings.policy.model_copy(update={"rules": rules})
    return settings.model_copy(update={"policy": policy})


async def test_the_api_grants_and_the_gate_uses_it(make_proxy: Any, upstream: Any) -> None:
    from tests.helpers import AGENT_KEY, ALICE_KEY, CAROL_KEY, MALLORY_KEY, bearer

    agent, alice, carol = bearer(AGENT_KEY), bearer(ALICE_KEY), bearer(CAROL_KEY)
    client, sink = await make_proxy(with_export_grant(str(upstream.make_url("/"))))
    asynced = {**agent, "Prefer": "respond-async"}
    first = await client.post(EXPORT, json={"n": 1}, headers=asynced)
    assert first.status == 202
    approval_id = (await first.json())["approval_id"]
    shown = await (await client.get(f"{API}/{approval_id}", headers=alice)).json()
    assert (shown["risk"], shown["note"], shown["state_label"]) == (
        "high",
        "exports leave the company",
        "Pending",
    )
    assert shown["approvers"] == {
        "groups": ["data-owners"],
        "users": [],
        "members": ["carol@example.com"],
    }
    assert shown["grant"]["offered"] and shown["grant"]["pattern"] == f"POST {EXPORT}"

    async def decision(payload: dict[str, Any], who: dict[str, str] = alice) -> Any:
        resp = await client.post(f"{API}/{approval_id}/decision", json=payload, headers=who)
        return resp.status, await resp.json()

    for bad, says in (
        ({"uses": 6, "minutes": 5}, "at most 5 uses"),
        ({"uses": 2, "seconds": 601}, "at most 5 uses for at most 600 seconds"),
        ({"uses": 2}, "grant must be"),
        ({"uses": True, "seconds": 60}, "whole numbers"),
        ([2, 60], "must be an object"),
    ):
        status, body = await decision({"verdict": "approve", "grant": bad})
        assert status == 400, body
        assert body["error"]["code"] == "invalid_request" and says in body["error"]["message"]
    status, body = await decision({"verdict": "approve", "grant": {"uses": 2, "minutes": 5}})
    assert status == 200, body
    assert body["state"] == "approved" and body["state_label"] == "Approved"
    grant_id = body["grant"]["grant_id"]
    assert body["grant"]["uses"] == 2 and body["grant"]["uses_left"] == 2

    # The next two of the same shape (other bodies) pass at once, naming the grant.
    for n, left in ((2, 1), (3, 0)):
        resp = await client.post(EXPORT, json={"n": n}, headers=asynced)
        assert resp.status == 200, await resp.text()
        assert resp.headers["Countersign-Grant-Id"] == grant_id
        assert "Countersign-Approval-Id" not in resp.headers
        echo = await resp.json()
        assert json.loads(echo["body"]) == {"n": n}
        shown = await (await client.get(f"{API}/{approval_id}", headers=alice)).json()
        assert shown["grant"]["uses_left"] == left
    third = await client.post(EXPORT, json={"n": 4}, headers=asynced)
    assert third.status == 202 and "Countersign-Grant-Id" not in third.headers

    listed = await (await client.get(GRANTS, headers=carol)).json()
    assert [g["grant_id"] for g in listed["grants"]] == [grant_id]
    assert listed["grants"][0]["state"] == "exhausted"
    assert (await (await client.get(GRANTS, headers=bearer(MALLORY_KEY))).json()) == {"grants": []}
    resp = await client.get(f"{GRANTS}/{grant_id}", headers=bearer(MALLORY_KEY))
    assert resp.status == 404
    resp = await client.delete(f"{GRANTS}/{grant_id}", headers=agent)
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "not_an_approver"
    resp = await client.delete(f"{GRANTS}/{grant_id}", headers=carol)
    assert resp.status == 200 and (await resp.json())["state"] == "revoked"

    await asyncio.sleep(0.05)
    used = sink.named("grant.used")
    assert [e["uses_left"] for e in used] == [1, 0]
    assert all(e["approval_id"] == approval_id for e in used)
    forwarded = [e for e in sink.named("request.forwarded") if e.get("grant_id") == grant_id]
    assert len(forwarded) == 2 and all(e["rule"] == "exports" for e in forwarded)
    assert [e["event"] for e in sink.events if e["event"].startswith("grant.")] == [
        "grant.created",
        "grant.used",
        "grant.used",
        "grant.exhausted",
        "grant.revoked",
    ]


async def test_a_rule_without_grants_refuses_one_over_the_api(
    make_proxy: Any, upstream: Any
) -> None:
    from tests.helpers import AGENT_KEY, ALICE_KEY, bearer

    client, _ = await make_proxy()
    resp = await client.post(
        EXPORT, json={"n": 1}, headers={**bearer(AGENT_KEY), "Prefer": "respond-async"}
    )
    approval_id = (await resp.json())["approval_id"]
    resp = await client.post(
        f"{API}/{approval_id}/decision",
        json={"verdict": "approve", "grant": {"uses": 1, "seconds": 60}},
        headers=bearer(ALICE_KEY),
    )
    body = await resp.json()
    assert resp.status == 400
    assert body["error"]["message"] == "grants are not allowed for rule 'exports'"
    assert body["error"]["field"] == "grant"
    shown = await (await client.get(f"{API}/{approval_id}", headers=bearer(ALICE_KEY))).json()
    assert shown["state"] == "pending" and shown["grant"]["offered"] is False
