"""MemoryStore: the shared store conformance suite, plus its own retention rules."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest

from proxy.store.base import Store
from proxy.store.memory import MemoryStore
from proxy.types import ApprovalState
from tests.store_conformance import StoreConformance, approve, deny, make_approval


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
    assert {a.id for a in await store.list()} == {second, third}


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
    assert len(await store.list(ApprovalState.DENIED)) == 1


async def test_finished_beyond_retention_are_pruned() -> None:
    store = MemoryStore(retention_seconds=0)
    old = await finish(store, "denied")
    # Pruning runs when the next approval finishes.
    await finish(store, "denied")
    assert await store.get(old) is None
