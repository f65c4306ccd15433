"""MemoryStore: the shared store conformance suite, plus its own retention rules."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.model import Approval, ApprovalState
from proxy.model.state import TooManyPending
from proxy.store.base import Store
from proxy.store.memory import MemoryStore
from tests.store_conformance import StoreConformance, approve, deny, listed, make_approval


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    async def store(self) -> AsyncIterator[Store]:
        store = MemoryStore()
        yield store
        await store.aclose()


async def finish(store: MemoryStore, how: str) -> str:
    """Create an approval and take it to a finished state; returns its id."""
    approval, _ = await store.create_or_join(make_approval())
    if how == "denied":
        await store.decide(approval.id, deny(), time.time())
    elif how == "expired":
        assert await store.expire(approval.id, approval.expires_at + 1) is not None
    else:
        await store.decide(approval.id, approve(), time.time())
        await store.claim(approval.id, time.time())
    return approval.id


async def test_finished_beyond_max_finished_are_pruned() -> None:
    store = MemoryStore(max_finished=2)
    first = await finish(store, "denied")
    second = await finish(store, "executed")
    assert await store.get(first) is not None
    third = await finish(store, "expired")

    assert await store.get(first) is None  # the oldest finished one is gone
    assert await store.get(second) is not None
    assert await store.get(third) is not None
    assert {a.id for a in await listed(store)} == {second, third}


async def test_pruning_keeps_live_approvals() -> None:
    store = MemoryStore(max_finished=1)
    pending, _ = await store.create_or_join(make_approval())
    approved, _ = await store.create_or_join(make_approval())
    await store.decide(approved.id, approve(), time.time())
    for _ in range(3):
        await finish(store, "denied")
    still_pending = await store.get(pending.id)
    still_approved = await store.get(approved.id)
    assert still_pending is not None and still_pending.state is ApprovalState.PENDING
    assert still_approved is not None and still_approved.state is ApprovalState.APPROVED
    assert len(await listed(store, ApprovalState.DENIED)) == 1


async def test_finished_beyond_retention_are_pruned() -> None:
    store = MemoryStore(retention_seconds=0)
    old = await finish(store, "denied")
    # Pruning runs when the next approval finishes.
    await finish(store, "denied")
    assert await store.get(old) is None


def assert_indexes_match(store: MemoryStore) -> None:
    """Every index names exactly the approvals kept, each in its current state."""
    kept = store._approvals
    assert sorted(store._created) == store._created
    assert {i for _, i in store._created} == set(kept)
    assert len(store._created) == len(kept)
    for state, index in store._by_state.items():
        assert sorted(index) == index
        assert {i for _, i in index} == {i for i, a in kept.items() if a.state is state}
    pending = {i for ids in store._pending.values() for i in ids}
    assert pending == {i for i, a in kept.items() if a.state is ApprovalState.PENDING}
    assert all(store._pending.values()), "no empty per-requester sets are kept"


async def test_pruning_drops_the_index_entries_too() -> None:
    store = MemoryStore(max_finished=3)
    live, _ = await store.create_or_join(make_approval(), max_pending=5)
    ids = [await finish(store, how) for how in ["denied", "executed", "expired"] * 4]
    assert_indexes_match(store)
    assert len(store._approvals) == 4
    assert {a.id for a in await listed(store)} == {live.id, *ids[-3:]}
    assert [a.id for a in await listed(store, ApprovalState.PENDING)] == [live.id]


async def test_retention_drops_the_index_entries_too() -> None:
    store = MemoryStore(retention_seconds=0)
    for _ in range(3):
        await finish(store, "denied")
    assert_indexes_match(store)
    assert len(store._approvals) <= 1  # pruning runs when an approval finishes


class _Watched(dict[str, Approval]):
    """The approvals by id, refusing a scan of them all and counting lookups."""

    lookups = 0

    def __getitem__(self, key: str) -> Approval:
        self.lookups += 1
        return super().__getitem__(key)

    def values(self) -> Any:
        raise AssertionError("scanned every approval")

    def items(self) -> Any:
        raise AssertionError("scanned every approval")

    def __iter__(self) -> Any:
        raise AssertionError("scanned every approval")


async def test_limits_and_pages_never_scan_every_approval() -> None:
    store = MemoryStore()
    now = time.time()
    live = [
        (await store.create_or_join(make_approval(created_at=now - 50 + i)))[0] for i in range(4)
    ]
    for _ in range(300):
        await finish(store, "denied")
    watched = _Watched(store._approvals)
    store._approvals = watched
    page, cursor = await store.list(ApprovalState.PENDING, limit=2)
    assert [a.id for a in page] == [live[3].id, live[2].id]
    page, cursor = await store.list(ApprovalState.PENDING, limit=2, cursor=cursor)
    assert [a.id for a in page] == [live[1].id, live[0].id] and cursor is None
    assert watched.lookups == 4
    with pytest.raises(TooManyPending):
        await store.create_or_join(make_approval(), max_pending=4)
    _, created = await store.create_or_join(make_approval(), max_pending=5)
    assert created
    await store.decide(live[0].id, deny(), time.time())
    store._approvals = dict(dict.items(watched))
    assert_indexes_match(store)
