"""RedisStore against a real redis-server: the shared conformance suite, then faults."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.approvals.state import NotClaimable
from proxy.store import codec
from proxy.store.base import StoreUnavailable
from proxy.store.redis import RedisStore
from proxy.types import Approval, ApprovalState
from tests.redis_fixture import RedisServer
from tests.store_conformance import StoreConformance, approve, make_approval


def new_store(server: RedisServer) -> RedisStore:
    return RedisStore(server.url, key_prefix="test-" + secrets.token_hex(6), timeout_seconds=1)


class TestRedisStore(StoreConformance):
    @pytest.fixture
    async def store(self, fresh_redis: RedisServer) -> AsyncIterator[RedisStore]:
        store = new_store(fresh_redis)
        yield store
        await store.aclose()


async def test_two_stores_on_one_redis_see_the_same_approvals(fresh_redis: RedisServer) -> None:
    prefix = "test-" + secrets.token_hex(6)
    a = RedisStore(fresh_redis.url, key_prefix=prefix)
    b = RedisStore(fresh_redis.url, key_prefix=prefix)
    try:
        approval, _ = await a.create_or_join(make_approval())
        joined, created = await b.create_or_join(make_approval(fingerprint=approval.fingerprint))
        assert not created and joined.id == approval.id
        waiting = asyncio.create_task(a.wait(approval.id, 10))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        await b.decide(approval.id, approve(), time.time())
        woken = await asyncio.wait_for(waiting, 5)
        assert woken is not None and woken.state is ApprovalState.APPROVED
        assert time.monotonic() - started < 0.5, "woken by the notice, not by polling"
    finally:
        await a.aclose()
        await b.aclose()


async def test_many_waiters_need_few_connections(fresh_redis: RedisServer) -> None:
    import redis.asyncio as aioredis

    observer = aioredis.Redis.from_url(fresh_redis.url)
    store = RedisStore(
        fresh_redis.url, key_prefix="test-" + secrets.token_hex(6), max_connections=8
    )
    try:
        before = (await observer.info("clients"))["connected_clients"]
        approvals = [(await store.create_or_join(make_approval()))[0] for _ in range(1000)]
        waiters = [asyncio.create_task(store.wait(a.id, 20)) for a in approvals]
        await asyncio.sleep(0.5)
        during = (await observer.info("clients"))["connected_clients"]
        # 1,000 held waiters: at most the pool (8) plus the one subscription.
        assert during - before <= 8 + 1, f"{during - before} connections for 1,000 waiters"
        for a in approvals:
            await store.decide(a.id, approve(), time.time())
        results = await asyncio.wait_for(asyncio.gather(*waiters), 20)
        assert all(r is not None and r.state is ApprovalState.APPROVED for r in results)
    finally:
        await store.aclose()
        await observer.aclose()


async def test_redis_down_is_store_unavailable_and_recovers(fresh_redis: RedisServer) -> None:
    store = new_store(fresh_redis)
    try:
        approval, _ = await store.create_or_join(make_approval())
        assert await store.ping()
        fresh_redis.stop()
        assert not await store.ping()
        with pytest.raises(StoreUnavailable):
            await store.get(approval.id)
        with pytest.raises(StoreUnavailable):
            await store.decide(approval.id, approve(), time.time())
        with pytest.raises(StoreUnavailable):
            await store.create_or_join(make_approval())
        fresh_redis.start()
        # What Redis held survives the restart, untouched by the failed calls.
        kept = await store.get(approval.id)
        assert kept is not None and kept.state is ApprovalState.PENDING
        decided = await store.decide(approval.id, approve(), time.time())
        assert decided.state is ApprovalState.APPROVED
    finally:
        await store.aclose()


async def test_a_decision_made_while_the_subscription_was_down_is_not_missed(
    fresh_redis: RedisServer,
) -> None:
    prefix = "test-" + secrets.token_hex(6)
    waiter_store = RedisStore(fresh_redis.url, key_prefix=prefix, timeout_seconds=1)
    decider = RedisStore(fresh_redis.url, key_prefix=prefix, timeout_seconds=1)
    try:
        approval, _ = await waiter_store.create_or_join(make_approval(expires_at=time.time() + 60))

        async def wait_until_decided() -> ApprovalState:
            while True:
                try:
                    current = await waiter_store.wait(approval.id, 30)
                except StoreUnavailable:
                    await asyncio.sleep(0.1)
                    continue
                assert current is not None
                if current.state is not ApprovalState.PENDING:
                    return current.state

        waiting = asyncio.create_task(wait_until_decided())
        await asyncio.sleep(0.2)
        fresh_redis.restart()  # drops the subscription; the waiter must recover by itself
        await decider.decide(approval.id, approve(), time.time())
        assert await asyncio.wait_for(waiting, 10) is ApprovalState.APPROVED
    finally:
        await waiter_store.aclose()
        await decider.aclose()


async def test_lease_is_held_by_one_store_at_a_time(fresh_redis: RedisServer) -> None:
    prefix = "test-" + secrets.token_hex(6)
    a = RedisStore(fresh_redis.url, key_prefix=prefix)
    b = RedisStore(fresh_redis.url, key_prefix=prefix)
    try:
        assert await a.lease("sweep", 0.5)
        assert await a.lease("sweep", 0.5), "the holder renews"
        assert not await b.lease("sweep", 0.5)
        await asyncio.sleep(0.6)
        assert await b.lease("sweep", 0.5), "a lapsed lease passes on"
    finally:
        await a.aclose()
        await b.aclose()


async def test_notes_share_the_approvals_ttl(fresh_redis: RedisServer) -> None:
    import redis.asyncio as aioredis

    prefix = "test-" + secrets.token_hex(6)
    store = RedisStore(fresh_redis.url, key_prefix=prefix, retention_seconds=100)
    observer = aioredis.Redis.from_url(fresh_redis.url)
    try:
        approval, _ = await store.create_or_join(make_approval())
        await store.set_note(approval.id, "slack.message", "x")
        approval_ttl = await observer.pttl(f"{{{prefix}}}:apr:{approval.id}")
        notes_ttl = await observer.pttl(f"{{{prefix}}}:notes:{approval.id}")
        assert 0 < notes_ttl <= approval_ttl and approval_ttl - notes_ttl < 1000
        # A transition resets the approval's TTL (finished: the retention) and the notes' too.
        await store.decide(approval.id, approve(), time.time())
        await store.claim(approval.id, time.time())
        notes_ttl = await observer.pttl(f"{{{prefix}}}:notes:{approval.id}")
        assert 90_000 < notes_ttl <= 100_000
    finally:
        await observer.aclose()
        await store.aclose()


async def test_a_woken_waiter_takes_the_decision_from_the_notice(
    fresh_redis: RedisServer,
) -> None:
    """The notice carries the approval's new JSON: waking, then claiming from it, reads
    nothing from Redis."""
    prefix = "test-" + secrets.token_hex(6)
    waiter_store = RedisStore(fresh_redis.url, key_prefix=prefix)
    decider = RedisStore(fresh_redis.url, key_prefix=prefix)
    try:
        approval, _ = await waiter_store.create_or_join(make_approval())
        waiting = asyncio.create_task(waiter_store.wait(approval.id, 10))
        await asyncio.sleep(0.2)  # subscribed, first read done
        reads = 0
        real_get = waiter_store._redis.get

        def counting_get(*args: object, **kwargs: object) -> object:
            nonlocal reads
            reads += 1
            return real_get(*args, **kwargs)  # type: ignore[arg-type]

        waiter_store._redis.get = counting_get  # type: ignore[method-assign,assignment]
        decided = await decider.decide(approval.id, approve(), time.time())
        woken = await asyncio.wait_for(waiting, 5)
        assert woken == decided
        claimed = await waiter_store.claim(approval.id, time.time())
        assert claimed.state is ApprovalState.EXECUTED
        assert reads == 0
    finally:
        await waiter_store.aclose()
        await decider.aclose()


async def test_only_changes_to_pending_approvals_are_published(fresh_redis: RedisServer) -> None:
    import redis.asyncio as aioredis

    prefix = "test-" + secrets.token_hex(6)
    store = RedisStore(fresh_redis.url, key_prefix=prefix)
    listener = aioredis.Redis.from_url(fresh_redis.url, decode_responses=True)
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    try:
        await pubsub.subscribe(f"{{{prefix}}}:changes")
        approval, _ = await store.create_or_join(make_approval())
        decided = await store.decide(approval.id, approve(), time.time())
        await store.claim(approval.id, time.time())
        await store.record_outcome(approval.id, 200)
        other, _ = await store.create_or_join(make_approval(expires_at=time.time() - 1))
        expired = await store.expire(other.id, time.time())
        assert expired is not None
        notices = []
        quiet_until = time.monotonic() + 0.5
        while time.monotonic() < quiet_until:
            message = await pubsub.get_message(timeout=0.1)
            if message is not None:
                notices.append(message["data"])
        assert [n.partition(" ")[0] for n in notices] == [approval.id, other.id]
        assert codec.loads(notices[0].partition(" ")[2]) == decided
        assert codec.loads(notices[1].partition(" ")[2]) == expired
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        await listener.aclose()
        await store.aclose()


async def test_scripts_flushed_from_redis_are_loaded_again(fresh_redis: RedisServer) -> None:
    import redis.asyncio as aioredis

    store = new_store(fresh_redis)
    admin = aioredis.Redis.from_url(fresh_redis.url)
    try:
        approval, _ = await store.create_or_join(make_approval())
        await admin.script_flush()
        decided = await asyncio.gather(
            store.decide(approval.id, approve(), time.time()),
            store.create_or_join(make_approval()),
        )
        assert decided[0].state is ApprovalState.APPROVED
        await admin.script_flush()
        claimed = await store.claim(approval.id, time.time())
        assert claimed.state is ApprovalState.EXECUTED
    finally:
        await admin.aclose()
        await store.aclose()


async def test_a_burst_of_commands_shares_pipelines(fresh_redis: RedisServer) -> None:
    """Thousands of concurrent claims leave in a few pipelines, each claim still exactly once."""
    store = new_store(fresh_redis)
    try:
        approvals = await asyncio.gather(
            *(store.create_or_join(make_approval()) for _ in range(500))
        )
        ids = [a.id for a, _ in approvals]
        await asyncio.gather(*(store.decide(i, approve(), time.time()) for i in ids))
        sent = 0
        real_send = store._send

        async def counting_send(batch: list[Any]) -> None:
            nonlocal sent
            sent += 1
            await real_send(batch)

        store._send = counting_send  # type: ignore[method-assign]
        outcomes = await asyncio.gather(
            *(store.claim(i, time.time()) for i in ids for _ in range(2)), return_exceptions=True
        )
        claimed = [o for o in outcomes if isinstance(o, Approval)]
        assert sorted(a.id for a in claimed) == sorted(ids)
        assert all(isinstance(o, NotClaimable) for o in outcomes if not isinstance(o, Approval))
        assert sent < 50, f"{sent} pipelines for 1,000 claims"
    finally:
        await store.aclose()


async def test_an_id_made_of_a_clients_raw_bytes_fails_nobody_else(
    fresh_redis: RedisServer,
) -> None:
    """aiohttp hands header bytes that are not UTF-8 over as surrogate escapes; such an id
    (e.g. a forged Countersign-Approval header) is an unknown key, and the commands that share
    its pipeline are answered as usual."""
    store = RedisStore(fresh_redis.url, key_prefix="test-" + secrets.token_hex(6))
    try:
        approval, _ = await store.create_or_join(make_approval())
        found, odd = await asyncio.gather(store.get(approval.id), store.get("apr_x\udcff"))
        assert found is not None and found.id == approval.id
        assert odd is None
    finally:
        await store.aclose()
