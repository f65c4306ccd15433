"""RedisStore against a real redis-server: the shared conformance suite, then faults."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.model import Approval, ApprovalState, Outcome
from proxy.model.state import NotClaimable, TooManyPending
from proxy.store import codec
from proxy.store.base import StoreUnavailable
from proxy.store.redis import RedisStore
from tests.redis_fixture import RedisServer
from tests.store_conformance import StoreConformance, approve, deny, make_approval


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


async def test_decide_many_rereads_what_another_replica_changed(fresh_redis: RedisServer) -> None:
    """A bulk decision swaps from the values a listing just read; one that another replica
    changed meanwhile is decided again from what Redis holds (here: refused, as denied)."""
    prefix = "test-" + secrets.token_hex(6)
    a = RedisStore(fresh_redis.url, key_prefix=prefix)
    b = RedisStore(fresh_redis.url, key_prefix=prefix)
    try:
        first, _ = await a.create_or_join(make_approval())
        second, _ = await a.create_or_join(make_approval())
        listed, _ = await a.list(ApprovalState.PENDING)
        assert {x.id for x in listed} == {first.id, second.id}  # `a` remembers both as pending
        await b.decide(first.id, deny("carol"), time.time())
        results = await a.decide_many([first.id, second.id], approve("bob"), time.time())
        assert type(results[0]).__name__ == "NotPending"
        assert isinstance(results[1], Approval) and results[1].state is ApprovalState.APPROVED
        stored = await b.get(first.id)
        assert stored is not None and stored.state is ApprovalState.DENIED
        assert [d.approver_subject for d in stored.decisions] == ["carol"]
    finally:
        await a.aclose()
        await b.aclose()


async def test_decide_many_with_redis_down_reports_unavailable(fresh_redis: RedisServer) -> None:
    store = new_store(fresh_redis)
    try:
        approval, _ = await store.create_or_join(make_approval())
        await store.list(ApprovalState.PENDING)
        fresh_redis.stop()
        results = await store.decide_many([approval.id], approve(), time.time())
        assert len(results) == 1 and isinstance(results[0], StoreUnavailable)
    finally:
        await store.aclose()


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
        # The same TTL, read back at two moments: Redis applies a script's PEXPIRE from its
        # clock at that call, a millisecond or so after the PTTL it copies, and a loaded
        # machine may put a second between the two reads below.
        assert notes_ttl > 0 and abs(approval_ttl - notes_ttl) < 5000
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
        await store.record_outcome(approval.id, Outcome.COMPLETED, 200)
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


async def test_concurrent_creates_by_one_requester_stop_at_the_limit(
    fresh_redis: RedisServer,
) -> None:
    """50 distinct approvals by one requester, at once, through two replicas: exactly
    `max_pending` (20) are created, the check and the creation being one atomic step."""
    prefix = "test-" + secrets.token_hex(6)
    a = RedisStore(fresh_redis.url, key_prefix=prefix)
    b = RedisStore(fresh_redis.url, key_prefix=prefix)
    try:
        candidates = [make_approval() for _ in range(50)]
        results = await asyncio.gather(
            *(
                (a if i % 2 else b).create_or_join(c, max_pending=20)
                for i, c in enumerate(candidates)
            ),
            return_exceptions=True,
        )
        created = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, BaseException)]
        assert len(created) == 20
        assert len(refused) == 30
        assert all(isinstance(r, TooManyPending) for r in refused), refused
        stored = [await a.get(c.id) for c in candidates]
        assert sum(1 for s in stored if s is not None) == 20
        pending, cursor = await b.list(ApprovalState.PENDING)
        assert len(pending) == 20 and cursor is None
    finally:
        await a.aclose()
        await b.aclose()


async def test_every_key_written_expires(fresh_redis: RedisServer) -> None:
    import redis.asyncio as aioredis

    prefix = "test-" + secrets.token_hex(6)
    store = RedisStore(fresh_redis.url, key_prefix=prefix, retention_seconds=100)
    observer = aioredis.Redis.from_url(fresh_redis.url, decode_responses=True)
    try:
        now = time.time()
        pending, _ = await store.create_or_join(make_approval(), max_pending=5)
        executed, _ = await store.create_or_join(make_approval(), max_pending=5)
        await store.set_note(executed.id, "slack.message", "x")
        await store.decide(executed.id, approve(), now)
        await store.claim(executed.id, now)
        await store.record_outcome(executed.id, Outcome.COMPLETED, 200)
        denied, _ = await store.create_or_join(make_approval(), max_pending=5)
        await store.decide(denied.id, deny(), now)
        await store.lease("sweep", 5)
        await store.list()
        await store.list(ApprovalState.PENDING)
        keys = [k async for k in observer.scan_iter(match=f"{{{prefix}}}:*")]
        tag = f"{{{prefix}}}"
        requester = hashlib.sha256(pending.requester_key.encode()).hexdigest()
        assert {
            f"{tag}:apr:{pending.id}",
            f"{tag}:notes:{executed.id}",
            f"{tag}:fp:{pending.fingerprint}",
            f"{tag}:deadlines",
            f"{tag}:created",
            f"{tag}:state:pending",
            f"{tag}:state:executed",
            f"{tag}:state:denied",
            f"{tag}:pending:{requester}",
            f"{tag}:lease:sweep",
        } <= set(keys)
        ttls = {k: await observer.pttl(k) for k in keys}
        assert all(ttl > 0 for ttl in ttls.values()), ttls
        # A shared index outlives every approval it names.
        longest = max(ttls[f"{tag}:apr:{i}"] for i in (pending.id, executed.id, denied.id))
        for index in ("created", "state:pending", f"pending:{requester}", "deadlines"):
            assert ttls[f"{tag}:{index}"] >= ttls[f"{tag}:apr:{pending.id}"] - 1000
        assert ttls[f"{tag}:created"] >= longest - 1000
        assert await observer.smembers(f"{tag}:pending:{requester}") == {pending.id}
    finally:
        await observer.aclose()
        await store.aclose()


async def test_pending_entries_of_approvals_gone_do_not_count(fresh_redis: RedisServer) -> None:
    """An approval whose key expired while still pending (never swept) frees its slot."""
    import redis.asyncio as aioredis

    prefix = "test-" + secrets.token_hex(6)
    store = RedisStore(fresh_redis.url, key_prefix=prefix)
    observer = aioredis.Redis.from_url(fresh_redis.url, decode_responses=True)
    try:
        gone, _ = await store.create_or_join(make_approval(), max_pending=2)
        await store.create_or_join(make_approval(), max_pending=2)
        with pytest.raises(TooManyPending):
            await store.create_or_join(make_approval(), max_pending=2)
        await observer.delete(f"{{{prefix}}}:apr:{gone.id}")  # as if its retention ran out
        _, created = await store.create_or_join(make_approval(), max_pending=2)
        assert created
        requester = hashlib.sha256(gone.requester_key.encode()).hexdigest()
        members = await observer.smembers(f"{{{prefix}}}:pending:{requester}")
        assert gone.id not in members and len(members) == 2
    finally:
        await observer.aclose()
        await store.aclose()


async def test_listing_forgets_entries_whose_approval_is_gone(fresh_redis: RedisServer) -> None:
    import redis.asyncio as aioredis

    prefix = "test-" + secrets.token_hex(6)
    store = RedisStore(fresh_redis.url, key_prefix=prefix)
    observer = aioredis.Redis.from_url(fresh_redis.url, decode_responses=True)
    try:
        now = time.time()
        approvals = [
            (await store.create_or_join(make_approval(created_at=now - 10 + i)))[0]
            for i in range(6)
        ]
        for gone in approvals[1:5]:
            await observer.delete(f"{{{prefix}}}:apr:{gone.id}")
        page, cursor = await store.list(ApprovalState.PENDING, limit=2)
        assert [a.id for a in page] == [approvals[5].id, approvals[0].id]
        assert cursor is None
        assert await observer.zcard(f"{{{prefix}}}:state:pending") == 2
        page, cursor = await store.list(limit=1)
        assert [a.id for a in page] == [approvals[5].id] and cursor is not None
        page, cursor = await store.list(limit=1, cursor=cursor)
        assert [a.id for a in page] == [approvals[0].id]
        assert await observer.zcard(f"{{{prefix}}}:created") == 2
    finally:
        await observer.aclose()
        await store.aclose()


async def test_a_page_takes_a_fixed_number_of_commands(fresh_redis: RedisServer) -> None:
    store = new_store(fresh_redis)
    try:
        now = time.time()
        for i in range(5):
            await store.create_or_join(make_approval(created_at=now - 500 + i))
        history = await asyncio.gather(
            *(store.create_or_join(make_approval(created_at=now - 100 + i / 4)) for i in range(400))
        )
        await asyncio.gather(*(store.decide(a.id, deny(), now) for a, _ in history))
        await store.list(limit=1)  # loads the listing script into Redis
        commands: list[str] = []
        real_command = store._command

        def counting_command(*args: Any) -> asyncio.Future[Any]:
            commands.append(str(args[0]))
            return real_command(*args)

        store._command = counting_command  # type: ignore[method-assign]
        page, cursor = await store.list(ApprovalState.PENDING, limit=3)
        assert len(page) == 3 and cursor is not None
        assert commands == ["EVALSHA", "MGET"]
        commands.clear()
        page, cursor = await store.list(ApprovalState.DENIED, limit=100, cursor=None)
        assert len(page) == 100 and cursor is not None
        assert commands == ["EVALSHA", "MGET"]
    finally:
        await store.aclose()
