"""The conformance suite every `Store` implementation must pass.

Subclass `StoreConformance` in a `test_*.py` file and provide the `store` fixture:

    class TestMemoryStore(StoreConformance):
        @pytest.fixture
        async def store(self) -> AsyncIterator[Store]:
            s = MemoryStore()
            yield s
            await s.aclose()

The fixture must hand out an empty store for every test. The base class has no `Test` prefix,
so pytest only collects it through its subclasses.

Times passed to `decide`, `claim`, `expire` and `due` are explicit; only `create_or_join`
judges "due" by the wall clock, so tests that rely on it put deadlines clearly in the past.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import time
from typing import Any

import pytest

from proxy.model import Approval, ApprovalState, DecisionRecord, Outcome, Requester, Verdict
from proxy.model.grant import Grant, GrantState, scope_of
from proxy.model.state import DuplicateApprover, NotClaimable, NotPending, TooManyPending
from proxy.store import codec
from proxy.store.base import InvalidCursor, Store, cursor_after

REQUESTER = Requester(
    subject="agent-7", issuer="https://idp", email=None, owner="alice@example.com"
)


def make_approval(**overrides: Any) -> Approval:
    """A fresh pending approval (random id and fingerprint) for rule "exports" on route "cloud"."""
    now = time.time()
    fields: dict[str, Any] = {
        "id": "apr_" + secrets.token_urlsafe(18),
        "fingerprint": secrets.token_hex(32),
        "state": ApprovalState.PENDING,
        "created_at": now,
        "expires_at": now + 60,
        "rule": "exports",
        "route": "cloud",
        "method": "POST",
        "path": "/cloud/exports/x",
        "query": "",
        "requester": REQUESTER,
        "approver_groups": ("data-owners",),
        "approver_users": (),
        "quorum": 1,
    }
    fields.update(overrides)
    return Approval(**fields)


def make_grant(**overrides: Any) -> Grant:
    """A fresh active grant (random id) of 3 uses for a minute, for REQUESTER on rule
    "exports": POST /cloud/exports/x on route "cloud"."""
    now = time.time()
    fields: dict[str, Any] = {
        "id": "grt_" + secrets.token_urlsafe(18),
        "approval_id": "apr_" + secrets.token_urlsafe(18),
        "scope": scope_of(
            issuer=REQUESTER.issuer,
            subject=REQUESTER.subject,
            client_id=REQUESTER.client_id,
            owner=REQUESTER.owner,
            rule="exports",
            route="cloud",
            method="POST",
            path="/cloud/exports/x",
            actions=(),
        ),
        "rule": "exports",
        "route": "cloud",
        "method": "POST",
        "path": "/cloud/exports/x",
        "actions": (),
        "requester": REQUESTER,
        "approver_groups": ("data-owners",),
        "approver_users": (),
        "uses": 3,
        "uses_left": 3,
        "created_at": now,
        "expires_at": now + 60,
        "granted_by": ("bob@example.com",),
    }
    fields.update(overrides)
    return Grant(**fields)


def record(
    verdict: Verdict = Verdict.APPROVE,
    approver: str = "bob",
    *,
    channel: str = "api",
    reason: str | None = None,
    at: float | None = None,
    person: str | None = None,
    approver_issuer: str = "https://idp",
) -> DecisionRecord:
    return DecisionRecord(
        verdict=verdict,
        approver_subject=approver,
        approver_email=f"{approver}@example.com",
        channel=channel,
        reason=reason,
        at=time.time() if at is None else at,
        approver_issuer=approver_issuer,
        person=person or f"{approver}@example.com",
    )


def approve(approver: str = "bob", **kwargs: Any) -> DecisionRecord:
    return record(Verdict.APPROVE, approver, **kwargs)


def deny(approver: str = "bob", reason: str = "not today", **kwargs: Any) -> DecisionRecord:
    return record(Verdict.DENY, approver, reason=reason, **kwargs)


async def listed(
    store: Store, state: ApprovalState | None = None, limit: int = 100
) -> list[Approval]:
    """The first page of a listing."""
    approvals, _ = await store.list(state, limit=limit)
    return approvals


async def every_page(
    store: Store, state: ApprovalState | None = None, limit: int = 100
) -> list[list[Approval]]:
    """Every page of a listing, following the cursors to the end."""
    pages: list[list[Approval]] = []
    cursor: str | None = None
    while True:
        page, cursor = await store.list(state, limit=limit, cursor=cursor)
        pages.append(page)
        if cursor is None:
            return pages
        assert len(pages) < 1000, "the cursors never end"


def newest_first(approvals: list[Approval]) -> list[str]:
    """Ids in listing order: created_at, then id, both descending."""
    return [a.id for a in sorted(approvals, key=lambda a: (a.created_at, a.id), reverse=True)]


class StoreConformance:
    """Behaviour every approval store must show; see `proxy/store/base.py`."""

    @pytest.fixture
    async def store(self) -> Store:
        raise NotImplementedError("a StoreConformance subclass must provide the store fixture")

    # -- helpers ------------------------------------------------------------------------------

    async def created(self, store: Store, **overrides: Any) -> Approval:
        approval, was_created = await store.create_or_join(make_approval(**overrides))
        assert was_created
        return approval

    async def approved(self, store: Store, **overrides: Any) -> Approval:
        approval = await self.created(store, **overrides)
        decided = await store.decide(approval.id, approve(), time.time())
        assert decided.state is ApprovalState.APPROVED
        return decided

    # -- create_or_join -----------------------------------------------------------------------

    async def test_create_stores_the_approval(self, store: Store) -> None:
        candidate = make_approval()
        approval, created = await store.create_or_join(candidate)
        assert created is True
        assert approval == candidate
        assert await store.get(candidate.id) == candidate

    async def test_create_round_trips_every_field(self, store: Store) -> None:
        candidate = make_approval(
            query="b=2&a=1",
            requester=Requester(
                subject="agent-7",
                issuer="https://idp",
                client_id="agent-client",
                email="agent7@example.com",
                owner="alice@example.com",
                groups=("agents", "batch"),
            ),
            approver_groups=("data-owners", "sre"),
            approver_users=("carol@example.com",),
            quorum=2,
            reason="monthly export for finance",
            body_preview='{"rows": 12, "password": "[REDACTED]"} \u00e9\u2603',
            body_bytes=1234,
            content_type="application/json",
            request_id="req-123",
        )
        await store.create_or_join(candidate)
        assert await store.get(candidate.id) == candidate

    async def test_same_fingerprint_joins_pending(self, store: Store) -> None:
        first = await self.created(store)
        joined, created = await store.create_or_join(make_approval(fingerprint=first.fingerprint))
        assert created is False
        assert joined.id == first.id
        assert joined.state is ApprovalState.PENDING

    async def test_joined_candidate_is_not_stored(self, store: Store) -> None:
        first = await self.created(store)
        candidate = make_approval(fingerprint=first.fingerprint)
        await store.create_or_join(candidate)
        assert await store.get(candidate.id) is None
        assert [a.id for a in await listed(store)] == [first.id]

    async def test_same_fingerprint_joins_approved_not_executed(self, store: Store) -> None:
        first = await self.approved(store)
        joined, created = await store.create_or_join(make_approval(fingerprint=first.fingerprint))
        assert created is False
        assert joined.id == first.id
        assert joined.state is ApprovalState.APPROVED

    @pytest.mark.parametrize("final", ["denied", "expired", "executed"])
    async def test_finished_approval_is_not_joined(self, store: Store, final: str) -> None:
        first = await self.created(store)
        if final == "denied":
            await store.decide(first.id, deny(), time.time())
        elif final == "expired":
            assert await store.expire(first.id, first.expires_at + 1) is not None
        else:
            await store.decide(first.id, approve(), time.time())
            await store.claim(first.id, time.time())
        finished = await store.get(first.id)
        assert finished is not None and finished.state.value == final

        candidate = make_approval(fingerprint=first.fingerprint)
        second, created = await store.create_or_join(candidate)
        assert created is True
        assert second.id == candidate.id != first.id
        assert second.state is ApprovalState.PENDING
        assert await store.get(first.id) == finished  # the old one is left alone
        # ... and the new one is what identical requests join from now on.
        third, created = await store.create_or_join(make_approval(fingerprint=first.fingerprint))
        assert created is False
        assert third.id == second.id

    async def test_different_fingerprint_creates_separate_approval(self, store: Store) -> None:
        first = await self.created(store)
        second, created = await store.create_or_join(make_approval())
        assert created is True
        assert second.id != first.id
        assert {a.id for a in await listed(store)} == {first.id, second.id}

    async def test_due_pending_approval_is_not_joined(self, store: Store) -> None:
        now = time.time()
        overdue = await self.created(store, created_at=now - 120, expires_at=now - 60)
        candidate = make_approval(fingerprint=overdue.fingerprint)
        fresh, created = await store.create_or_join(candidate)
        assert created is True
        assert fresh.id == candidate.id != overdue.id

    # -- get ----------------------------------------------------------------------------------

    async def test_get_unknown_is_none(self, store: Store) -> None:
        assert await store.get("apr_does-not-exist") is None

    # -- decide -------------------------------------------------------------------------------

    async def test_approve_with_quorum_one_approves(self, store: Store) -> None:
        approval = await self.created(store)
        rec = approve("bob", reason="looks fine")
        decided = await store.decide(approval.id, rec, time.time())
        assert decided.state is ApprovalState.APPROVED
        assert decided.decisions == (rec,)
        assert decided.approvals_count == 1
        assert decided.final_decision == rec
        assert await store.get(approval.id) == decided

    async def test_deny_keeps_the_record(self, store: Store) -> None:
        approval = await self.created(store)
        rec = DecisionRecord(
            verdict=Verdict.DENY,
            approver_subject="bob",
            approver_email="bob@example.com",
            channel="slack",
            reason="wrong bucket",
            at=1_700_000_000.25,
        )
        decided = await store.decide(approval.id, rec, time.time())
        assert decided.state is ApprovalState.DENIED
        stored = await store.get(approval.id)
        assert stored is not None
        assert stored.state is ApprovalState.DENIED
        assert stored.decisions == (rec,)
        final = stored.final_decision
        assert final is not None
        assert final.verdict is Verdict.DENY
        assert final.approver_subject == "bob"
        assert final.approver_email == "bob@example.com"
        assert final.channel == "slack"
        assert final.reason == "wrong bucket"
        assert final.at == 1_700_000_000.25

    async def test_deny_after_approve_is_not_pending(self, store: Store) -> None:
        approval = await self.approved(store)
        with pytest.raises(NotPending):
            await store.decide(approval.id, deny("carol"), time.time())
        assert await store.get(approval.id) == approval

    async def test_approve_after_deny_is_not_pending(self, store: Store) -> None:
        approval = await self.created(store)
        denied = await store.decide(approval.id, deny("bob"), time.time())
        with pytest.raises(NotPending):
            await store.decide(approval.id, approve("carol"), time.time())
        assert await store.get(approval.id) == denied

    async def test_decide_unknown_id_raises_key_error(self, store: Store) -> None:
        with pytest.raises(KeyError):
            await store.decide("apr_does-not-exist", approve(), time.time())

    # -- quorum -------------------------------------------------------------------------------

    async def test_quorum_two_first_approval_keeps_pending(self, store: Store) -> None:
        approval = await self.created(store, quorum=2)
        decided = await store.decide(approval.id, approve("bob"), time.time())
        assert decided.state is ApprovalState.PENDING
        assert decided.approvals_count == 1
        assert decided.final_decision is None
        assert await store.get(approval.id) == decided

    async def test_quorum_two_same_approver_twice_is_duplicate(self, store: Store) -> None:
        approval = await self.created(store, quorum=2)
        once = await store.decide(approval.id, approve("bob"), time.time())
        with pytest.raises(DuplicateApprover):
            await store.decide(approval.id, approve("bob"), time.time())
        stored = await store.get(approval.id)
        assert stored == once
        assert stored.state is ApprovalState.PENDING
        assert stored.approvals_count == 1

    async def test_quorum_two_second_distinct_approver_approves(self, store: Store) -> None:
        approval = await self.created(store, quorum=2)
        first, second = approve("bob"), approve("carol")
        await store.decide(approval.id, first, time.time())
        decided = await store.decide(approval.id, second, time.time())
        assert decided.state is ApprovalState.APPROVED
        assert decided.approvals_count == 2
        assert decided.decisions == (first, second)
        assert decided.final_decision == second
        assert await store.get(approval.id) == decided

    async def test_quorum_two_denial_before_quorum_denies(self, store: Store) -> None:
        approval = await self.created(store, quorum=2)
        await store.decide(approval.id, approve("bob"), time.time())
        rec = deny("carol", reason="no")
        decided = await store.decide(approval.id, rec, time.time())
        assert decided.state is ApprovalState.DENIED
        assert decided.final_decision == rec
        with pytest.raises(NotPending):
            await store.decide(approval.id, approve("dave"), time.time())

    # -- deadline -----------------------------------------------------------------------------

    async def test_decide_after_deadline_is_refused_and_left_to_expire(self, store: Store) -> None:
        approval = await self.created(store)
        late = approval.expires_at + 1
        with pytest.raises(NotPending) as info:
            await store.decide(approval.id, approve(at=late), late)
        assert info.value.approval is not None
        assert info.value.approval.state is ApprovalState.EXPIRED
        # decide() records nothing: the transition to expired is expire()'s, made exactly once,
        # so that exactly one caller audits it.
        stored = await store.get(approval.id)
        assert stored is not None and stored.decisions == ()
        expired = await store.expire(approval.id, late)
        assert expired is not None and expired.state is ApprovalState.EXPIRED
        assert await store.expire(approval.id, late) is None

    # -- decide_many (bulk decisions) -----------------------------------------------------------

    async def test_decide_many_decides_each_as_decide_would(self, store: Store) -> None:
        approvals = [await self.created(store) for _ in range(3)]
        rec = approve("bob", reason="batch")
        now = time.time()
        results = await store.decide_many([a.id for a in approvals], rec, now)
        assert len(results) == 3
        for approval, result in zip(approvals, results, strict=True):
            assert isinstance(result, Approval)
            assert result.id == approval.id
            assert result.state is ApprovalState.APPROVED
            assert result.decisions == (rec,)
            assert result.expires_at == now + approval.claim_seconds
            assert await store.get(approval.id) == result
        assert await listed(store, ApprovalState.PENDING) == []
        assert {a.id for a in await listed(store, ApprovalState.APPROVED)} == {
            a.id for a in approvals
        }
        # Each one is now claimable once, like any approved approval.
        claimed = await store.claim(approvals[0].id, time.time())
        assert claimed.state is ApprovalState.EXECUTED

    async def test_decide_many_deny_frees_the_requesters_slots(self, store: Store) -> None:
        approvals = [
            (await store.create_or_join(make_approval(), max_pending=2))[0] for _ in range(2)
        ]
        with pytest.raises(TooManyPending):
            await store.create_or_join(make_approval(), max_pending=2)
        results = await store.decide_many([a.id for a in approvals], deny(), time.time())
        assert all(isinstance(r, Approval) and r.state is ApprovalState.DENIED for r in results)
        _, created = await store.create_or_join(make_approval(), max_pending=2)
        assert created

    async def test_decide_many_reports_each_refusal_and_stores_nothing_for_it(
        self, store: Store
    ) -> None:
        fine = await self.created(store)
        denied = await self.created(store)
        denied = await store.decide(denied.id, deny("carol"), time.time())
        half = await self.created(store, quorum=2)
        half = await store.decide(half.id, approve("bob"), time.time())
        now = time.time()
        late = await self.created(store, created_at=now - 120, expires_at=now - 1)
        ids = [fine.id, "apr_does-not-exist", denied.id, half.id, late.id]
        results = await store.decide_many(ids, approve("bob"), now)
        assert [type(r).__name__ for r in results] == [
            "Approval",
            "ApprovalNotFound",
            "NotPending",
            "DuplicateApprover",
            "NotPending",
        ]
        assert isinstance(results[0], Approval) and results[0].state is ApprovalState.APPROVED
        assert await store.get(denied.id) == denied
        assert await store.get(half.id) == half
        stored_late = await store.get(late.id)
        assert stored_late is not None and stored_late.decisions == ()
        assert stored_late.state is ApprovalState.PENDING  # expire() makes that transition

    async def test_decide_many_counts_one_decision_towards_a_quorum(self, store: Store) -> None:
        approvals = [await self.created(store, quorum=2) for _ in range(3)]
        ids = [a.id for a in approvals]
        first = await store.decide_many(ids, approve("bob"), time.time())
        assert all(
            isinstance(r, Approval) and r.state is ApprovalState.PENDING and r.approvals_count == 1
            for r in first
        )
        again = await store.decide_many(ids, approve("bob"), time.time())
        assert all(isinstance(r, DuplicateApprover) for r in again)
        second = await store.decide_many(ids, approve("carol"), time.time())
        assert all(
            isinstance(r, Approval) and r.state is ApprovalState.APPROVED and r.approvals_count == 2
            for r in second
        )

    async def test_decide_many_wakes_every_waiter(self, store: Store) -> None:
        approvals = [await self.created(store) for _ in range(20)]
        waiters = [asyncio.create_task(store.wait(a.id, 5.0)) for a in approvals]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await store.decide_many([a.id for a in approvals], approve(), time.time())
        woken = await asyncio.gather(*waiters)
        assert time.monotonic() - started < 1.0, "woken by the change, not by a timeout"
        assert all(w is not None and w.state is ApprovalState.APPROVED for w in woken)

    async def test_decide_many_in_several_chunks(self, store: Store) -> None:
        approvals = await asyncio.gather(
            *(store.create_or_join(make_approval()) for _ in range(1_203))
        )
        ids = [a.id for a, _ in approvals]
        pending = [a for page in await every_page(store, ApprovalState.PENDING, 1000) for a in page]
        assert len(pending) == len(ids)
        results = await store.decide_many(ids, deny(), time.time())
        assert [r.id for r in results if isinstance(r, Approval)] == ids
        assert all(isinstance(r, Approval) and r.state is ApprovalState.DENIED for r in results)
        assert await listed(store, ApprovalState.PENDING) == []

    async def test_decide_many_of_nothing(self, store: Store) -> None:
        assert await store.decide_many([], approve(), time.time()) == []

    # -- claim --------------------------------------------------------------------------------

    async def test_claim_approved_executes(self, store: Store) -> None:
        approval = await self.approved(store)
        now = time.time()
        claimed = await store.claim(approval.id, now)
        assert claimed.state is ApprovalState.EXECUTED
        assert claimed.executed_at == now
        assert claimed.decisions == approval.decisions
        assert await store.get(approval.id) == claimed

    async def test_second_claim_is_not_claimable(self, store: Store) -> None:
        approval = await self.approved(store)
        first = await store.claim(approval.id, time.time())
        with pytest.raises(NotClaimable):
            await store.claim(approval.id, time.time())
        assert await store.get(approval.id) == first

    async def test_claim_pending_is_not_claimable(self, store: Store) -> None:
        approval = await self.created(store)
        with pytest.raises(NotClaimable):
            await store.claim(approval.id, time.time())
        assert await store.get(approval.id) == approval

    async def test_claim_denied_is_not_claimable(self, store: Store) -> None:
        approval = await self.created(store)
        denied = await store.decide(approval.id, deny(), time.time())
        with pytest.raises(NotClaimable):
            await store.claim(approval.id, time.time())
        assert await store.get(approval.id) == denied

    async def test_claim_expired_is_not_claimable(self, store: Store) -> None:
        approval = await self.created(store)
        expired = await store.expire(approval.id, approval.expires_at + 1)
        assert expired is not None
        with pytest.raises(NotClaimable):
            await store.claim(approval.id, time.time())

    # -- record_outcome -----------------------------------------------------------------------

    async def test_record_outcome_after_claim(self, store: Store) -> None:
        approval = await self.approved(store)
        claimed = await store.claim(approval.id, time.time())
        recorded = await store.record_outcome(approval.id, Outcome.COMPLETED, 201)
        assert recorded.upstream_status == 201
        assert recorded.state is ApprovalState.EXECUTED
        assert recorded.executed_at == claimed.executed_at
        assert await store.get(approval.id) == recorded

    async def test_record_outcome_before_claim_is_not_claimable(self, store: Store) -> None:
        pending = await self.created(store)
        with pytest.raises(NotClaimable):
            await store.record_outcome(pending.id, Outcome.COMPLETED, 200)
        approved = await self.approved(store)
        with pytest.raises(NotClaimable):
            await store.record_outcome(approved.id, Outcome.COMPLETED, 200)
        assert await store.get(approved.id) == approved

    # -- expire -------------------------------------------------------------------------------

    async def test_expire_not_yet_due(self, store: Store) -> None:
        approval = await self.created(store)
        assert await store.expire(approval.id, approval.expires_at - 1) is None
        assert await store.get(approval.id) == approval

    async def test_expire_due_exactly_once(self, store: Store) -> None:
        approval = await self.created(store)
        expired = await store.expire(approval.id, approval.expires_at + 1)
        assert expired is not None
        assert expired.id == approval.id
        assert expired.state is ApprovalState.EXPIRED
        assert await store.get(approval.id) == expired
        assert await store.expire(approval.id, approval.expires_at + 2) is None
        assert await store.get(approval.id) == expired

    async def test_expire_at_the_deadline(self, store: Store) -> None:
        approval = await self.created(store)
        expired = await store.expire(approval.id, approval.expires_at)
        assert expired is not None and expired.state is ApprovalState.EXPIRED

    async def test_an_unused_approval_lapses_after_its_claim_window(self, store: Store) -> None:
        approval = await self.approved(store, claim_seconds=120.0)
        # Approval starts the claim window: it may be used until then, not forever.
        assert time.time() + 100 < approval.expires_at <= time.time() + 120
        assert await store.expire(approval.id, approval.expires_at - 1) is None
        with pytest.raises(NotClaimable) as info:
            await store.claim(approval.id, approval.expires_at)
        assert info.value.approval is not None
        assert info.value.approval.state is ApprovalState.LAPSED
        assert approval.id in await store.due(approval.expires_at)
        lapsed = await store.expire(approval.id, approval.expires_at)
        assert lapsed is not None and lapsed.state is ApprovalState.LAPSED

    async def test_expire_never_touches_denied_or_executed(self, store: Store) -> None:
        denied = await self.created(store)
        denied = await store.decide(denied.id, deny(), time.time())
        executed = await self.approved(store)
        executed = await store.claim(executed.id, time.time())
        for approval in (denied, executed):
            assert await store.expire(approval.id, approval.expires_at + 3600) is None
            assert await store.get(approval.id) == approval

    async def test_expire_unknown_is_none(self, store: Store) -> None:
        assert await store.expire("apr_does-not-exist", time.time()) is None

    # -- due ----------------------------------------------------------------------------------

    async def test_due_lists_exactly_the_overdue_pending_and_unused(self, store: Store) -> None:
        now = time.time()
        a = await self.created(store, expires_at=now + 10)
        b = await self.created(store, expires_at=now + 20)
        await self.created(store, expires_at=now + 100)  # not due yet
        approved = await self.approved(store, expires_at=now + 10, claim_seconds=10.0)
        denied = await self.created(store, expires_at=now + 10)
        await store.decide(denied.id, deny(), now)
        expired = await self.created(store, expires_at=now + 10)
        await store.expire(expired.id, now + 11)
        assert approved.state is ApprovalState.APPROVED

        assert sorted(await store.due(now)) == []
        # The approved one got its 10 s claim window when it was approved.
        assert sorted(await store.due(now + 30)) == sorted([a.id, b.id, approved.id])
        assert a.id in await store.due(now + 15) and b.id not in await store.due(now + 15)

    async def test_due_respects_limit(self, store: Store) -> None:
        now = time.time()
        ids = {(await self.created(store, expires_at=now + 1)).id for _ in range(5)}
        limited = await store.due(now + 2, limit=2)
        assert len(limited) == 2
        assert set(limited) <= ids

    # -- list ---------------------------------------------------------------------------------

    async def test_list_newest_first_with_state_filter_and_limit(self, store: Store) -> None:
        now = time.time()
        oldest = await self.created(store, created_at=now - 3)
        middle = await self.created(store, created_at=now - 2)
        newest = await self.created(store, created_at=now - 1)
        await store.decide(middle.id, deny(), now)

        assert [a.id for a in await listed(store)] == [newest.id, middle.id, oldest.id]
        pending = await listed(store, ApprovalState.PENDING)
        assert [a.id for a in pending] == [newest.id, oldest.id]
        assert all(a.state is ApprovalState.PENDING for a in pending)
        assert [a.id for a in await listed(store, ApprovalState.DENIED)] == [middle.id]
        assert await listed(store, ApprovalState.APPROVED) == []
        assert [a.id for a in await listed(store, limit=2)] == [newest.id, middle.id]
        assert [a.id for a in await listed(store, ApprovalState.PENDING, limit=1)] == [newest.id]

    async def test_list_returns_current_values(self, store: Store) -> None:
        approval = await self.approved(store)
        claimed = await store.claim(approval.id, time.time())
        assert await listed(store) == [claimed]
        assert await listed(store, ApprovalState.EXECUTED) == [claimed]
        assert await listed(store, ApprovalState.APPROVED) == []

    async def test_list_empty(self, store: Store) -> None:
        assert await listed(store) == []
        assert await store.list(ApprovalState.PENDING) == ([], None)

    async def test_paging_yields_every_approval_once_newest_first(self, store: Store) -> None:
        now = time.time()
        # Groups of 7 share a creation time, so page boundaries fall inside a group.
        results = await asyncio.gather(
            *(
                store.create_or_join(make_approval(created_at=now - 100 + i // 7))
                for i in range(250)
            )
        )
        approvals = [a for a, _ in results]
        pages = await every_page(store, limit=100)
        assert [len(p) for p in pages] == [100, 100, 50]
        assert [a.id for p in pages for a in p] == newest_first(approvals)

    async def test_paging_with_a_state_filter(self, store: Store) -> None:
        now = time.time()
        results = await asyncio.gather(
            *(
                store.create_or_join(make_approval(created_at=now - 100 + i // 3))
                for i in range(120)
            )
        )
        approvals = [a for a, _ in results]
        denied = [
            await store.decide(a.id, deny(), now) for i, a in enumerate(approvals) if i % 3 == 1
        ]
        pending = [a for i, a in enumerate(approvals) if i % 3 != 1]
        pending_pages = await every_page(store, ApprovalState.PENDING, limit=30)
        assert [len(p) for p in pending_pages] == [30, 30, 20]
        assert [a.id for p in pending_pages for a in p] == newest_first(pending)
        assert all(a.state is ApprovalState.PENDING for p in pending_pages for a in p)
        denied_pages = await every_page(store, ApprovalState.DENIED, limit=25)
        assert [a.id for p in denied_pages for a in p] == newest_first(denied)
        assert all(a.state is ApprovalState.DENIED for p in denied_pages for a in p)
        assert await every_page(store, ApprovalState.APPROVED, limit=25) == [[]]

    async def test_a_cursor_outlives_its_approvals_change_of_state(self, store: Store) -> None:
        now = time.time()
        approvals = [await self.created(store, created_at=now - 10 + i) for i in range(4)]
        first, cursor = await store.list(ApprovalState.PENDING, limit=2)
        assert [a.id for a in first] == [approvals[3].id, approvals[2].id]
        assert cursor is not None
        await store.decide(approvals[2].id, deny(), now)  # the page's last one leaves `pending`
        rest, end = await store.list(ApprovalState.PENDING, limit=2, cursor=cursor)
        assert [a.id for a in rest] == [approvals[1].id, approvals[0].id]
        assert end is None
        # Any approval makes a cursor: the page after it, in any listing.
        after, _ = await store.list(cursor=cursor_after(approvals[3]))
        assert [a.id for a in after] == [approvals[2].id, approvals[1].id, approvals[0].id]

    @pytest.mark.parametrize("cursor", ["", "not a cursor", "@@@", "bm9zcGFjZQ", "x" * 5000])
    async def test_an_invalid_cursor_is_refused(self, store: Store, cursor: str) -> None:
        await self.created(store)
        with pytest.raises(InvalidCursor):
            await store.list(cursor=cursor)

    async def test_a_page_costs_the_same_whatever_the_history(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A page of pending approvals decodes about a page of approvals, even when hundreds
        of finished ones, newer than all of them, fill the store."""
        now = time.time()
        live = [await self.created(store, created_at=now - 500 + i) for i in range(5)]
        history = await asyncio.gather(
            *(store.create_or_join(make_approval(created_at=now - 100 + i / 8)) for i in range(400))
        )
        await asyncio.gather(*(store.decide(a.id, deny(), now) for a, _ in history))
        decoded = 0
        real_loads = codec.loads

        def counting_loads(text: str | bytes) -> Approval:
            nonlocal decoded
            decoded += 1
            return real_loads(text)

        monkeypatch.setattr(codec, "loads", counting_loads)
        page, cursor = await store.list(ApprovalState.PENDING, limit=3)
        assert [a.id for a in page] == [live[4].id, live[3].id, live[2].id]
        assert decoded <= 3
        decoded = 0
        page, cursor = await store.list(ApprovalState.PENDING, limit=3, cursor=cursor)
        assert [a.id for a in page] == [live[1].id, live[0].id]
        assert cursor is None
        assert decoded <= 3
        decoded = 0
        page, _ = await store.list(limit=3)
        assert len(page) == 3 and decoded <= 3

    # -- limits -------------------------------------------------------------------------------

    async def test_at_the_limit_creating_is_too_many_pending_and_stores_nothing(
        self, store: Store
    ) -> None:
        for _ in range(3):
            _, created = await store.create_or_join(make_approval(), max_pending=3)
            assert created
        candidate = make_approval()
        with pytest.raises(TooManyPending) as refused:
            await store.create_or_join(candidate, max_pending=3)
        assert "max_pending_per_identity is 3" in refused.value.message
        assert await store.get(candidate.id) is None
        assert candidate.id not in {a.id for a in await listed(store)}
        assert len(await listed(store, ApprovalState.PENDING)) == 3
        # The same fingerprint is free to be created by someone under the limit later.
        other = Requester(subject="agent-8", issuer="https://idp")
        _, created = await store.create_or_join(
            make_approval(fingerprint=candidate.fingerprint, requester=other), max_pending=3
        )
        assert created

    async def test_the_limit_counts_per_requester(self, store: Store) -> None:
        await store.create_or_join(make_approval(), max_pending=1)
        same_subject_other_issuer = Requester(subject=REQUESTER.subject, issuer="https://other")
        _, created = await store.create_or_join(
            make_approval(requester=same_subject_other_issuer), max_pending=1
        )
        assert created
        with pytest.raises(TooManyPending):
            await store.create_or_join(make_approval(), max_pending=1)

    async def test_approvals_created_without_a_limit_count_towards_it(self, store: Store) -> None:
        await self.created(store)
        await self.created(store)
        with pytest.raises(TooManyPending):
            await store.create_or_join(make_approval(), max_pending=2)
        _, created = await store.create_or_join(make_approval(), max_pending=3)
        assert created

    async def test_joining_is_allowed_at_the_limit(self, store: Store) -> None:
        first, _ = await store.create_or_join(make_approval(), max_pending=2)
        await store.create_or_join(make_approval(), max_pending=2)
        joined, created = await store.create_or_join(
            make_approval(fingerprint=first.fingerprint), max_pending=2
        )
        assert created is False
        assert joined.id == first.id
        approved = await store.decide(first.id, approve(), time.time())
        joined, created = await store.create_or_join(
            make_approval(fingerprint=first.fingerprint), max_pending=1
        )
        assert created is False
        assert joined == approved

    @pytest.mark.parametrize("how", ["denied", "approved", "expired"])
    async def test_an_approval_leaving_pending_frees_a_slot(self, store: Store, how: str) -> None:
        now = time.time()
        first, _ = await store.create_or_join(make_approval(expires_at=now + 1), max_pending=2)
        await store.create_or_join(make_approval(), max_pending=2)
        with pytest.raises(TooManyPending):
            await store.create_or_join(make_approval(), max_pending=2)
        if how == "denied":
            await store.decide(first.id, deny(), now)
        elif how == "approved":
            await store.decide(first.id, approve(), now)
        else:
            assert await store.expire(first.id, now + 2) is not None
        _, created = await store.create_or_join(make_approval(), max_pending=2)
        assert created
        with pytest.raises(TooManyPending):
            await store.create_or_join(make_approval(), max_pending=2)

    async def test_race_concurrent_creates_respect_the_limit(self, store: Store) -> None:
        candidates = [make_approval() for _ in range(30)]
        results = await asyncio.gather(
            *(store.create_or_join(c, max_pending=10) for c in candidates), return_exceptions=True
        )
        created = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(created) == 10
        assert all(isinstance(r, TooManyPending) for r in refused), refused
        assert len(await listed(store, ApprovalState.PENDING)) == 10

    # -- wait ---------------------------------------------------------------------------------

    async def test_wait_returns_at_once_when_not_pending(self, store: Store) -> None:
        approval = await self.approved(store)
        started = time.monotonic()
        got = await store.wait(approval.id, 5.0)
        assert time.monotonic() - started < 0.5
        assert got == approval

    async def test_wait_returns_promptly_when_decided(self, store: Store) -> None:
        approval = await self.created(store)

        async def decide_soon() -> Approval:
            await asyncio.sleep(0.05)
            return await store.decide(approval.id, approve(), time.time())

        task = asyncio.create_task(decide_soon())
        started = time.monotonic()
        got = await store.wait(approval.id, 5.0)
        elapsed = time.monotonic() - started
        decided = await task
        assert elapsed < 1.0
        assert got is not None
        assert got.state is ApprovalState.APPROVED
        assert got == decided

    async def test_wait_wakes_every_waiter(self, store: Store) -> None:
        approval = await self.created(store)
        waiters = [asyncio.create_task(store.wait(approval.id, 5.0)) for _ in range(5)]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        await store.decide(approval.id, deny(), time.time())
        results = await asyncio.gather(*waiters)
        assert time.monotonic() - started < 1.0
        assert all(r is not None and r.state is ApprovalState.DENIED for r in results)

    async def test_wait_wakes_on_expiry(self, store: Store) -> None:
        approval = await self.created(store)

        async def expire_soon() -> None:
            await asyncio.sleep(0.05)
            assert await store.expire(approval.id, approval.expires_at + 1) is not None

        task = asyncio.create_task(expire_soon())
        started = time.monotonic()
        got = await store.wait(approval.id, 5.0)
        await task
        assert time.monotonic() - started < 1.0
        assert got is not None and got.state is ApprovalState.EXPIRED

    async def test_wait_times_out_with_pending_approval(self, store: Store) -> None:
        approval = await self.created(store)
        started = time.monotonic()
        got = await store.wait(approval.id, 0.2)
        elapsed = time.monotonic() - started
        assert 0.15 <= elapsed < 2.0
        assert got == approval

    async def test_wait_unknown_is_none(self, store: Store) -> None:
        started = time.monotonic()
        assert await store.wait("apr_does-not-exist", 0.2) is None
        assert time.monotonic() - started < 2.0

    # -- races --------------------------------------------------------------------------------

    async def test_race_concurrent_decides_exactly_one_wins(self, store: Store) -> None:
        approval = await self.created(store)
        records = [
            record(Verdict.APPROVE if i % 2 else Verdict.DENY, f"approver-{i}") for i in range(50)
        ]
        random.shuffle(records)
        now = time.time()
        results = await asyncio.gather(
            *(store.decide(approval.id, r, now) for r in records), return_exceptions=True
        )
        winners = [
            (r, res)
            for r, res in zip(records, results, strict=True)
            if not isinstance(res, BaseException)
        ]
        losers = [res for res in results if isinstance(res, BaseException)]
        assert len(winners) == 1, winners
        assert len(losers) == 49
        assert all(isinstance(e, NotPending) for e in losers), {type(e) for e in losers}

        winning_record, winning_result = winners[0]
        assert isinstance(winning_result, Approval)
        expected = (
            ApprovalState.APPROVED
            if winning_record.verdict is Verdict.APPROVE
            else ApprovalState.DENIED
        )
        final = await store.get(approval.id)
        assert final is not None
        assert final.state is expected
        assert final.decisions == (winning_record,)
        assert final == winning_result

    async def test_race_quorum_two_exactly_two_approvals_count(self, store: Store) -> None:
        approval = await self.created(store, quorum=2)
        records = [approve(f"approver-{i}") for i in range(50)]
        now = time.time()
        results = await asyncio.gather(
            *(store.decide(approval.id, r, now) for r in records), return_exceptions=True
        )
        successes = [res for res in results if isinstance(res, Approval)]
        failures = [res for res in results if not isinstance(res, Approval)]
        assert len(successes) == 2
        assert all(isinstance(e, NotPending) for e in failures), {type(e) for e in failures}
        assert sorted(s.state for s in successes) == sorted(
            [ApprovalState.PENDING, ApprovalState.APPROVED]
        )
        final = await store.get(approval.id)
        assert final is not None
        assert final.state is ApprovalState.APPROVED
        assert final.approvals_count == 2
        assert len(final.decisions) == 2

    async def test_race_same_approver_counts_once(self, store: Store) -> None:
        approval = await self.created(store, quorum=2)
        now = time.time()
        results = await asyncio.gather(
            *(store.decide(approval.id, approve("bob"), now) for _ in range(10)),
            return_exceptions=True,
        )
        successes = [res for res in results if isinstance(res, Approval)]
        failures = [res for res in results if not isinstance(res, Approval)]
        assert len(successes) == 1
        assert all(isinstance(e, DuplicateApprover) for e in failures), {type(e) for e in failures}
        final = await store.get(approval.id)
        assert final is not None
        assert final.state is ApprovalState.PENDING
        assert final.approvals_count == 1
        assert len(final.decisions) == 1

    async def test_race_concurrent_claims_exactly_one_wins(self, store: Store) -> None:
        approval = await self.approved(store)
        now = time.time()
        results = await asyncio.gather(
            *(store.claim(approval.id, now + i) for i in range(50)), return_exceptions=True
        )
        successes = [res for res in results if isinstance(res, Approval)]
        failures = [res for res in results if not isinstance(res, Approval)]
        assert len(successes) == 1
        assert len(failures) == 49
        assert all(isinstance(e, NotClaimable) for e in failures), {type(e) for e in failures}
        final = await store.get(approval.id)
        assert final == successes[0]
        assert final.state is ApprovalState.EXECUTED

    async def test_race_concurrent_create_or_join_creates_once(self, store: Store) -> None:
        fingerprint = secrets.token_hex(32)
        candidates = [make_approval(fingerprint=fingerprint) for _ in range(20)]
        results = await asyncio.gather(*(store.create_or_join(c) for c in candidates))
        assert sum(1 for _, created in results if created) == 1
        ids = {approval.id for approval, _ in results}
        assert len(ids) == 1
        (winner_id,) = ids
        assert winner_id in {c.id for c in candidates}
        assert [a.id for a in await listed(store)] == [winner_id]

    async def test_race_concurrent_expires_exactly_one_reports(self, store: Store) -> None:
        approval = await self.created(store)
        late = approval.expires_at + 1
        results = await asyncio.gather(*(store.expire(approval.id, late) for _ in range(20)))
        reported = [r for r in results if r is not None]
        assert len(reported) == 1
        assert reported[0].state is ApprovalState.EXPIRED

    async def test_race_decide_and_claim_interleaved(self, store: Store) -> None:
        """Claims racing the approving decision: at most one claim ever succeeds."""
        approval = await self.created(store)
        now = time.time()
        claims = [store.claim(approval.id, now) for _ in range(20)]
        results = await asyncio.gather(
            *claims[:10],
            store.decide(approval.id, approve(), now),
            *claims[10:],
            return_exceptions=True,
        )
        claim_results = results[:10] + results[11:]
        assert isinstance(results[10], Approval)
        successes = [r for r in claim_results if isinstance(r, Approval)]
        assert len(successes) <= 1
        assert all(
            isinstance(r, NotClaimable) for r in claim_results if not isinstance(r, Approval)
        )
        final = await store.get(approval.id)
        assert final is not None
        expected = ApprovalState.EXECUTED if successes else ApprovalState.APPROVED
        assert final.state is expected

    # -- notes --------------------------------------------------------------------------------

    async def test_the_last_ambiguous_attempt_is_remembered_by_fingerprint(
        self, store: Store
    ) -> None:
        assert await store.last_ambiguous("f" * 64) is None
        await store.remember_ambiguous("f" * 64, "apr_first")
        assert await store.last_ambiguous("f" * 64) == "apr_first"
        await store.remember_ambiguous("f" * 64, "apr_second")
        assert await store.last_ambiguous("f" * 64) == "apr_second", "the latest attempt wins"
        assert await store.last_ambiguous("e" * 64) is None, "other requests know nothing"

    async def test_note_round_trips_and_overwrites(self, store: Store) -> None:
        approval = await self.created(store)
        assert await store.get_note(approval.id, "slack.message") is None
        await store.set_note(approval.id, "slack.message", '{"channel": "C1", "ts": "1.2"}')
        assert (
            await store.get_note(approval.id, "slack.message") == '{"channel": "C1", "ts": "1.2"}'
        )
        await store.set_note(approval.id, "slack.message", "second")
        assert await store.get_note(approval.id, "slack.message") == "second"

    async def test_notes_are_per_approval_and_per_name(self, store: Store) -> None:
        first = await self.created(store)
        second = await self.created(store)
        await store.set_note(first.id, "a", "1")
        await store.set_note(first.id, "b", "2")
        await store.set_note(second.id, "a", "3")
        assert await store.get_note(first.id, "a") == "1"
        assert await store.get_note(first.id, "b") == "2"
        assert await store.get_note(second.id, "a") == "3"
        assert await store.get_note(second.id, "b") is None

    async def test_note_of_unknown_approval(self, store: Store) -> None:
        assert await store.get_note("apr_unknown", "a") is None
        with pytest.raises(KeyError):
            await store.set_note("apr_unknown", "a", "1")

    async def test_notes_survive_every_transition(self, store: Store) -> None:
        approval = await self.created(store)
        await store.set_note(approval.id, "slack.message", "kept")
        await store.decide(approval.id, approve(), time.time())
        await store.claim(approval.id, time.time())
        await store.record_outcome(approval.id, Outcome.COMPLETED, 200)
        assert await store.get_note(approval.id, "slack.message") == "kept"

    # -- health -------------------------------------------------------------------------------

    async def test_ping(self, store: Store) -> None:
        assert await store.ping() is True

    # -- grants ------------------------------------------------------------------------------

    async def test_a_grant_round_trips(self, store: Store) -> None:
        grant = make_grant(actions=("tool:a", "tool:b"), granted_by=("a@x.io", "b@x.io"))
        assert await store.add_grant(grant)
        assert await store.get_grant(grant.id) == grant
        assert await store.get_grant("grt_unknown") is None

    async def test_a_grant_is_added_once(self, store: Store) -> None:
        grant = make_grant()
        assert await store.add_grant(grant)
        assert not await store.add_grant(make_grant(id=grant.id, uses=99, uses_left=99))
        stored = await store.get_grant(grant.id)
        assert stored is not None and stored.uses_left == 3

    async def test_each_use_takes_one_until_none_is_left(self, store: Store) -> None:
        grant = make_grant()
        await store.add_grant(grant)
        now = time.time()
        lefts = []
        for _ in range(3):
            used = await store.use_grant(grant.scope, now)
            assert used is not None and used.id == grant.id
            lefts.append(used.uses_left)
        assert lefts == [2, 1, 0]
        assert await store.use_grant(grant.scope, now) is None
        stored = await store.get_grant(grant.id)
        assert stored is not None and stored.uses_left == 0
        assert stored.state(now) is GrantState.EXHAUSTED

    async def test_race_a_grant_of_n_is_never_used_n_plus_one_times(self, store: Store) -> None:
        grant = make_grant(uses=5, uses_left=5)
        await store.add_grant(grant)
        now = time.time()
        results = await asyncio.gather(*(store.use_grant(grant.scope, now) for _ in range(60)))
        used = [r for r in results if r is not None]
        assert len(used) == 5
        assert sorted(r.uses_left for r in used) == [0, 1, 2, 3, 4]

    async def test_only_its_own_scope_uses_a_grant(self, store: Store) -> None:
        grant = make_grant()
        await store.add_grant(grant)
        other = make_grant(scope="0" * 64)
        await store.add_grant(other)
        used = await store.use_grant("f" * 64, time.time())
        assert used is None
        used = await store.use_grant(other.scope, time.time())
        assert used is not None and used.id == other.id
        mine = await store.get_grant(grant.id)
        assert mine is not None and mine.uses_left == 3

    async def test_an_expired_grant_is_not_used(self, store: Store) -> None:
        grant = make_grant()
        await store.add_grant(grant)
        assert await store.use_grant(grant.scope, grant.expires_at) is None
        assert await store.use_grant(grant.scope, grant.expires_at + 5) is None
        used = await store.use_grant(grant.scope, grant.expires_at - 1)
        assert used is not None and used.uses_left == 2

    async def test_an_expiry_is_reported_once(self, store: Store) -> None:
        grant = make_grant()
        await store.add_grant(grant)
        assert list(await store.expire_grants(grant.expires_at - 1)) == []
        reports = await asyncio.gather(
            *(store.expire_grants(grant.expires_at + 1) for _ in range(5))
        )
        ended = [g.id for r in reports for g in r]
        assert ended == [grant.id]
        assert list(await store.expire_grants(grant.expires_at + 2)) == []

    async def test_exhausted_and_revoked_grants_do_not_expire(self, store: Store) -> None:
        exhausted = make_grant(uses=1, uses_left=1)
        revoked = make_grant(scope="1" * 64)
        await store.add_grant(exhausted)
        await store.add_grant(revoked)
        assert await store.use_grant(exhausted.scope, time.time()) is not None
        await store.revoke_grant(revoked.id, "carol@example.com", time.time())
        later = max(exhausted.expires_at, revoked.expires_at) + 1
        assert list(await store.expire_grants(later)) == []

    async def test_a_revoked_grant_is_not_used(self, store: Store) -> None:
        grant = make_grant()
        await store.add_grant(grant)
        now = time.time()
        revoked, done = await store.revoke_grant(grant.id, "carol@example.com", now)
        assert done and revoked.revoked_by == "carol@example.com"
        assert revoked.revoked_at == pytest.approx(now)
        assert revoked.state(now) is GrantState.REVOKED
        assert await store.use_grant(grant.scope, now) is None
        again, done_again = await store.revoke_grant(grant.id, "dave@example.com", now + 1)
        assert not done_again and again.revoked_by == "carol@example.com"
        stored = await store.get_grant(grant.id)
        assert stored is not None and stored.uses_left == 3 and stored.revoked_at is not None

    async def test_revoking_an_unknown_grant(self, store: Store) -> None:
        with pytest.raises(KeyError):
            await store.revoke_grant("grt_unknown", "carol@example.com", time.time())

    async def test_race_revocation_and_uses(self, store: Store) -> None:
        grant = make_grant(uses=50, uses_left=50)
        await store.add_grant(grant)
        now = time.time()
        uses = [store.use_grant(grant.scope, now) for _ in range(20)]
        results = await asyncio.gather(
            *uses[:10], store.revoke_grant(grant.id, "carol@example.com", now), *uses[10:]
        )
        used = sum(1 for r in results if isinstance(r, Grant))
        stored = await store.get_grant(grant.id)
        assert stored is not None and stored.revoked_at is not None
        assert stored.uses_left == 50 - used
        assert await store.use_grant(grant.scope, now) is None

    async def test_a_second_grant_of_the_same_scope_is_used_after_the_first(
        self, store: Store
    ) -> None:
        first = make_grant(uses=1, uses_left=1)
        second = make_grant(scope=first.scope, uses=1, uses_left=1)
        await store.add_grant(first)
        await store.add_grant(second)
        now = time.time()
        a = await store.use_grant(first.scope, now)
        b = await store.use_grant(first.scope, now)
        assert a is not None and b is not None and {a.id, b.id} == {first.id, second.id}
        assert await store.use_grant(first.scope, now) is None

    async def test_grants_are_listed_newest_first(self, store: Store) -> None:
        now = time.time()
        grants = [make_grant(created_at=now + i) for i in range(3)]
        for grant in grants:
            await store.add_grant(grant)
        listed_ids = [g.id for g in await store.list_grants()]
        assert listed_ids == [g.id for g in reversed(grants)]
        assert [g.id for g in await store.list_grants(limit=2)] == listed_ids[:2]

    async def test_a_grants_listing_shows_uses_left_and_revocation(self, store: Store) -> None:
        grant = make_grant()
        await store.add_grant(grant)
        await store.use_grant(grant.scope, time.time())
        await store.revoke_grant(grant.id, "carol@example.com", time.time())
        [listed_grant] = await store.list_grants()
        assert listed_grant.uses_left == 2 and listed_grant.revoked_by == "carol@example.com"
