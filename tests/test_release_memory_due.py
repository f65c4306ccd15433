"""`MemoryStore.due` reads a deadline heap instead of every approval kept: whatever the
transitions, it answers what a scan of every approval would (the sweeper's contract), and the
heap does not grow without bound."""

from __future__ import annotations

import random

from proxy.model import Approval, ApprovalState, DecisionRecord, Requester, Verdict
from proxy.model import state as transitions
from proxy.store.memory import MemoryStore


def approval(n: int, expires_at: float) -> Approval:
    return Approval(
        id=f"apr_{n:05d}",
        fingerprint=f"{n:064d}",
        state=ApprovalState.PENDING,
        created_at=float(n),
        expires_at=expires_at,
        rule="exports",
        route="cloud",
        method="POST",
        path=f"/cloud/exports/{n}",
        query="",
        requester=Requester(subject=f"agent-{n % 7}", issuer="https://idp"),
        approver_groups=("data-owners",),
        approver_users=(),
        quorum=1,
        claim_seconds=float(n % 13 + 1),
    )


def record(verdict: Verdict, at: float) -> DecisionRecord:
    return DecisionRecord(
        verdict=verdict,
        approver_subject="alice",
        approver_email="alice@example.com",
        channel="api",
        reason="because",
        at=at,
        approver_issuer="https://idp",
        person="alice@example.com",
    )


def scanned(store: MemoryStore, now: float) -> set[str]:
    return {a.id for a in store._approvals.values() if transitions.is_due(a, now)}


async def test_due_answers_what_a_full_scan_would() -> None:
    rng = random.Random(14)
    store = MemoryStore(max_finished=300)  # some finished ones are pruned on the way
    ids: list[str] = []
    for n in range(1500):
        created = approval(n, expires_at=rng.uniform(10, 100))
        await store.create_or_join(created)
        ids.append(created.id)
        # Move a random earlier one on: decide, claim, expire or abandon.
        target = rng.choice(ids)
        now = rng.uniform(0, 110)
        step = rng.randrange(5)
        kept = store._approvals.get(target)
        if kept is None:
            continue
        try:
            if step == 0:
                await store.decide(target, record(Verdict.APPROVE, now), now)
            elif step == 1:
                await store.decide(target, record(Verdict.DENY, now), now)
            elif step == 2:
                await store.claim(target, now)
            elif step == 3:
                await store.expire(target, now)
            else:
                await store.abandon(target, now)
        except transitions.ApprovalError:
            pass
        if n % 100 == 0:
            for at in (0.0, 20.0, 55.5, 90.0, 200.0):
                assert set(await store.due(at, limit=10_000)) == scanned(store, at)
    for at in (0.0, 10.0, 37.0, 64.0, 99.0, 150.0, 1e9):
        expected = scanned(store, at)
        assert set(await store.due(at, limit=10_000)) == expected
        limited = await store.due(at, limit=7)
        assert len(limited) == min(7, len(expected)) == len(set(limited))
        assert set(limited) <= expected
        assert set(await store.due(at, limit=10_000)) == expected  # reading changes nothing
    live = sum(a.state in (ApprovalState.PENDING, ApprovalState.APPROVED) for a in ids_of(store))
    assert len(store._deadlines) <= 2 * live + 1024 + 1


def ids_of(store: MemoryStore) -> list[Approval]:
    return list(store._approvals.values())


async def test_the_sweeper_expires_each_due_approval_once() -> None:
    store = MemoryStore()
    for n in range(50):
        await store.create_or_join(approval(n, expires_at=100.0 + n))
    assert await store.due(99.0) == []
    due = await store.due(124.5)
    assert due == [f"apr_{n:05d}" for n in range(25)]  # soonest deadline first
    for approval_id in due:
        assert await store.expire(approval_id, 124.5) is not None
    assert await store.due(124.5) == []
    assert len(await store.due(1000.0, limit=100)) == 25


async def test_stale_deadlines_are_dropped_when_they_outnumber_the_live_ones() -> None:
    store = MemoryStore()
    for n in range(3000):
        await store.create_or_join(approval(n, expires_at=1e6))
    for n in range(3000):
        await store.decide(f"apr_{n:05d}", record(Verdict.APPROVE, 1.0), 1.0)
    assert len(store._deadlines) <= 2 * 3000 + 1024 + 1
    for n in range(3000):
        await store.claim(f"apr_{n:05d}", 1.5)
    assert len(store._deadlines) == 6000  # claims add none (the heap grows only on a push)
    await store.create_or_join(approval(5000, expires_at=1e6))  # the next push rebuilds it
    assert store._deadlines == [(1e6, "apr_05000")]
    assert await store.due(1e6) == ["apr_05000"]
