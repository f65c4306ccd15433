"""A bulk decision releases held requests chunk by chunk (issue 14, the release benchmark):
the first chunk's requests go on while later chunks are still being decided, yet every
approval is decided and audited on its own, the answer lists them all, and a store failing on
one chunk spoils only that chunk. Also: `evolve` is `dataclasses.replace`, and the memory
store's waiters leave nothing behind."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

import pytest

from proxy.approvals import service as service_module
from proxy.approvals.service import ApprovalService
from proxy.audit import AuditLog
from proxy.config import ApprovalsSettings
from proxy.model import (
    Approval,
    ApprovalState,
    DecisionRecord,
    Identity,
    Outcome,
    Requester,
    Verdict,
)
from proxy.model.approval import evolve
from proxy.model.state import ApprovalError
from proxy.store.base import Store, StoreUnavailable
from proxy.store.memory import MemoryStore
from tests.helpers import ListSink
from tests.test_bulk_decisions import APPROVER, REQUESTER, open_one

CHUNK = 10  # the tests shrink the release chunk: several chunks with few approvals


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "_RELEASE_FIRST", CHUNK)
    monkeypatch.setattr(service_module, "_RELEASE_CHUNK", CHUNK)


async def test_the_first_chunk_is_released_before_the_bulk_decision_returns(
    store: Store,
) -> None:
    sink = ListSink()
    service = ApprovalService(
        store, ApprovalsSettings(max_pending_per_identity=1000), AuditLog([sink])
    )
    count = CHUNK * 4 + 3
    approvals = [await open_one(service, n) for n in range(count)]
    # Per claim: how many decisions were audited by then, and whether the bulk call had returned.
    claims: list[tuple[int, bool]] = []
    returned = asyncio.Event()

    async def hold(approval: Approval) -> ApprovalState:
        decided = await service.wait_for_decision(approval.id)
        if decided.state is not ApprovalState.APPROVED:
            return decided.state
        claims.append((len(sink.named("approval.decided")), returned.is_set()))
        return (await service.claim(approval.id)).state

    held = [asyncio.create_task(hold(a)) for a in approvals]
    await asyncio.sleep(0.2)  # every waiter parked
    assert not any(task.done() for task in held)
    outcome = await service.decide_many(APPROVER, Verdict.APPROVE, "release", "api", rule="exports")
    returned.set()
    states = await asyncio.wait_for(asyncio.gather(*held), 30)

    assert states == [ApprovalState.EXECUTED] * count
    # The answer lists every one, oldest first, as decided (one decision each).
    assert [a.id for a in outcome.decided] == [a.id for a in approvals]
    assert outcome.skipped == []
    assert all(a.state is ApprovalState.APPROVED for a in outcome.decided)
    assert all(len(a.decisions) == 1 for a in outcome.decided)
    decided = sink.named("approval.decided")
    assert [e["approval_id"] for e in decided] == [a.id for a in approvals]
    assert all(e["bulk"] is True and e["outcome"] == "approved" for e in decided)
    assert all(e["approver"]["person"] == "alice@example.com" for e in decided)
    # Requests were claimed while later chunks were still undecided (before the bulk call
    # returned, with fewer than all decisions made).
    assert any(not done and made < count for made, done in claims)
    if isinstance(store, MemoryStore):
        # One process, one loop: nobody runs before its chunk's events are sealed. (With Redis
        # another replica, or this one through the notice, may read the decision first, as
        # with a single decision.)
        assert all(made >= 1 for made, _ in claims)


async def test_the_decided_event_has_the_fields_and_order_of_a_single_decision() -> None:
    sink = ListSink()
    store = MemoryStore()
    service = ApprovalService(
        store, ApprovalsSettings(max_pending_per_identity=1000), AuditLog([sink])
    )
    single = await open_one(service, 1)
    await open_one(service, 2)
    await service.decide(single.id, APPROVER, Verdict.APPROVE, "ok", "api")
    await service.decide_many(APPROVER, Verdict.APPROVE, "ok", "api", rule="exports")
    one, many = sink.named("approval.decided")
    assert [k for k in many if k != "bulk"] == list(one)  # the same fields, in the same order
    for key in ("approver", "channel", "verdict", "reason", "approvals", "quorum", "outcome"):
        assert one[key] == many[key]


async def test_each_approval_is_judged_for_its_own_requester() -> None:
    """The approver checks are made once per requester and rule, and still per approval."""
    sink = ListSink()
    store = MemoryStore()
    service = ApprovalService(
        store, ApprovalsSettings(max_pending_per_identity=1000), AuditLog([sink])
    )
    for_alice = Identity(
        subject="agent-9", issuer="https://idp", groups=frozenset(), owner="alice@example.com"
    )
    opened = [await open_one(service, n, for_alice if n % 3 == 0 else REQUESTER) for n in range(30)]
    outcome = await service.decide_many(APPROVER, Verdict.APPROVE, "go", "api", rule="exports")
    own = [a.id for a in opened if a.requester.subject == "agent-9"]
    assert {s.approval_id: s.code for s in outcome.skipped} == dict.fromkeys(own, "self_approval")
    assert [a.id for a in outcome.decided] == [a.id for a in opened if a.id not in own]
    for approval_id in own:
        kept = await store.get(approval_id)
        assert kept is not None and kept.state is ApprovalState.PENDING
    assert len(sink.named("approval.decided")) == 20


class FailingChunk:
    """A store whose bulk call fails on the chunks named (as Redis does when a chunk's round
    trip fails: every id of it `StoreUnavailable`)."""

    def __init__(self, store: MemoryStore, failing: set[int]) -> None:
        self._store = store
        self._failing = failing
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def decide_many(
        self, approval_ids: Sequence[str], record: DecisionRecord, now: float
    ) -> list[Approval | ApprovalError | StoreUnavailable]:
        call = self.calls
        self.calls += 1
        if call in self._failing:
            return [StoreUnavailable("redis: down") for _ in approval_ids]
        return await self._store.decide_many(approval_ids, record, now)


async def test_a_chunk_the_store_cannot_reach_stops_the_bulk_and_the_rest_is_skipped() -> None:
    """The store down for a whole chunk: the chunks before stay decided, that chunk and every
    later one are skipped as `approvals_unavailable` without being tried (each try would wait
    out the store's timeout again)."""
    sink = ListSink()
    memory = MemoryStore()
    failing = FailingChunk(memory, {1})
    service = ApprovalService(
        failing, ApprovalsSettings(max_pending_per_identity=1000), AuditLog([sink])
    )
    approvals = [await open_one(service, n) for n in range(CHUNK * 3)]
    outcome = await service.decide_many(APPROVER, Verdict.APPROVE, "go", "api", rule="exports")
    assert failing.calls == 2
    spoiled = {a.id for a in approvals[CHUNK:]}
    assert {s.approval_id for s in outcome.skipped} == spoiled
    assert {s.code for s in outcome.skipped} == {"approvals_unavailable"}
    assert [a.id for a in outcome.decided] == [a.id for a in approvals[:CHUNK]]
    assert len(sink.named("approval.decided")) == CHUNK
    for approval in approvals:
        kept = await memory.get(approval.id)
        assert kept is not None
        assert kept.state is (
            ApprovalState.PENDING if approval.id in spoiled else ApprovalState.APPROVED
        )


async def test_chunks_grow_from_the_first_to_the_most(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "_RELEASE_FIRST", 3)
    monkeypatch.setattr(service_module, "_RELEASE_CHUNK", 10)
    memory = MemoryStore()
    sizes: list[int] = []
    counting = FailingChunk(memory, set())
    inner = counting.decide_many

    async def counted(
        approval_ids: Sequence[str], record: DecisionRecord, now: float
    ) -> list[Approval | ApprovalError | StoreUnavailable]:
        sizes.append(len(approval_ids))
        return await inner(approval_ids, record, now)

    counting.decide_many = counted  # type: ignore[method-assign]
    service = ApprovalService(
        counting,
        ApprovalsSettings(max_pending_per_identity=1000),
        AuditLog([ListSink()]),
    )
    for n in range(40):
        await open_one(service, n)
    outcome = await service.decide_many(APPROVER, Verdict.APPROVE, "go", "api", rule="exports")
    assert sizes == [3, 10, 10, 10, 7]  # 4x the last, up to the most
    assert len(outcome.decided) == 40


async def test_every_chunk_failing_raises_store_unavailable() -> None:
    memory = MemoryStore()
    failing = FailingChunk(memory, {0, 1})
    service = ApprovalService(
        failing, ApprovalsSettings(max_pending_per_identity=1000), AuditLog([ListSink()])
    )
    for n in range(CHUNK + 1):
        await open_one(service, n)
    with pytest.raises(StoreUnavailable):
        await service.decide_many(APPROVER, Verdict.APPROVE, "go", "api", rule="exports")


# -- evolve ------------------------------------------------------------------------------------


def sample() -> Approval:
    return Approval(
        id="apr_1",
        fingerprint="f" * 64,
        state=ApprovalState.PENDING,
        created_at=1.0,
        expires_at=301.0,
        rule="exports",
        route="cloud",
        method="POST",
        path="/cloud/exports/1",
        query="a=1",
        requester=Requester(subject="agent-7", issuer="https://idp"),
        approver_groups=("data-owners",),
        approver_users=("dave@example.com",),
        quorum=2,
        reason="why",
        headers=(("content-type", "application/json", False),),
    )


def test_evolve_is_dataclasses_replace_for_every_field() -> None:
    base = sample()
    assert evolve(base) == base and evolve(base) is not base
    values: dict[str, Any] = {
        "state": ApprovalState.EXECUTED,
        "outcome": Outcome.COMPLETED,
        "requester": Requester(subject="x", issuer="y"),
    }
    for field in dataclasses.fields(Approval):
        old = getattr(base, field.name)
        new = values.get(field.name)
        if new is None:
            if isinstance(old, bool):
                new = not old
            elif isinstance(old, (int, float)):
                new = old + 7
            elif isinstance(old, str):
                new = old + "-changed"
            elif isinstance(old, tuple):
                new = (*old, "more")
            else:  # None-valued optionals
                new = 5 if "uses" in field.name or "status" in field.name else "set"
        changes: dict[str, Any] = {field.name: new}
        changed = evolve(base, **changes)
        expected = dataclasses.replace(base, **changes)
        assert changed == expected, field.name
        assert hash(changed) == hash(expected)
        assert getattr(base, field.name) == old  # the original is untouched
    with pytest.raises(TypeError):
        evolve(base, nonsense=1)  # type: ignore[call-arg]
    with pytest.raises(dataclasses.FrozenInstanceError):
        evolve(base).state = ApprovalState.DENIED  # type: ignore[misc]


# -- the memory store's waiters ----------------------------------------------------------------


async def test_memory_waiters_are_woken_timed_out_or_cancelled_without_leftovers() -> None:
    sink = ListSink()
    store = MemoryStore()
    service = ApprovalService(
        store, ApprovalsSettings(max_pending_per_identity=1000), AuditLog([sink])
    )
    first = await open_one(service, 1)
    # Timed out: returned as it is, still pending; nothing left registered.
    assert (await store.wait(first.id, 0.01)) == first
    assert store._changed == {}
    # Cancelled: nothing left registered.
    waiting = asyncio.create_task(store.wait(first.id, 30))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert store._changed == {}
    # Two waiters, one change: both woken with the decided approval.
    both = [asyncio.create_task(store.wait(first.id, 30)) for _ in range(2)]
    await asyncio.sleep(0.01)
    await service.decide(first.id, APPROVER, Verdict.APPROVE, None, "api")
    woken = await asyncio.wait_for(asyncio.gather(*both), 5)
    assert [a.state if a else None for a in woken] == [ApprovalState.APPROVED] * 2
    assert store._changed == {}
    # Closing the store lets every waiter go.
    second = await open_one(service, 2)
    parked = asyncio.create_task(store.wait(second.id, 30))
    await asyncio.sleep(0.01)
    await store.aclose()
    assert (await asyncio.wait_for(parked, 5)) == second
