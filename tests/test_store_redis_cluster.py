"""RedisStore with `store.mode: cluster` against a real 3-master Redis Cluster on loopback: the
conformance suite through a node that does not own the store's slot, every key in that one slot,
notices across nodes, a slot moved under a held wait, and failures as `StoreUnavailable`."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from redis.crc import key_slot

from proxy.model import ApprovalState, Outcome
from proxy.store.base import StoreUnavailable
from proxy.store.redis import RedisStore
from tests.redis_cluster_fixture import RedisClusterServers
from tests.store_conformance import StoreConformance, approve, make_approval

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers()
    try:
        servers.start()
        yield servers
    finally:
        servers.cleanup()


def slot_of(prefix: str) -> int:
    return key_slot(prefix.encode())


def not_owner(cluster: RedisClusterServers, prefix: str) -> int:
    """A node that does not serve the prefix's slot: the store must follow MOVED from it."""
    return (cluster.owner(slot_of(prefix)) + 1) % len(cluster.nodes)


def cluster_store(cluster: RedisClusterServers, prefix: str, node: int | None = None) -> RedisStore:
    seed = not_owner(cluster, prefix) if node is None else node
    return RedisStore(cluster.url(seed), key_prefix=prefix, timeout_seconds=1, mode="cluster")


class TestRedisClusterStore(StoreConformance):
    @pytest.fixture
    async def store(self, cluster: RedisClusterServers) -> AsyncIterator[RedisStore]:
        store = cluster_store(cluster, "test-" + secrets.token_hex(6))
        yield store
        await store.aclose()


async def keys_by_node(cluster: RedisClusterServers, prefix: str) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {}
    for index, port in enumerate(cluster.ports):
        client = aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            keys = [k async for k in client.scan_iter(match="{" + prefix + "}*")]
        finally:
            await client.aclose()
        if keys:
            found[index] = keys
    return found


async def test_every_key_of_a_store_is_in_its_one_slot(cluster: RedisClusterServers) -> None:
    prefix = "test-" + secrets.token_hex(6)
    store = cluster_store(cluster, prefix)
    try:
        approval, _ = await store.create_or_join(make_approval())
        await store.set_note(approval.id, "slack", "ts-1")
        await store.decide(approval.id, approve(), time.time())
        await store.claim(approval.id, time.time())
        await store.record_outcome(approval.id, Outcome.AMBIGUOUS, None)
        await store.remember_ambiguous(approval.fingerprint, approval.id)
        assert await store.lease("sweeper", 5)
        other, _ = await store.create_or_join(make_approval(), max_pending=5)
        assert (await store.list())[0][0].id == other.id
        found = await keys_by_node(cluster, prefix)
        assert list(found) == [cluster.owner(slot_of(prefix))]
        keys = found[cluster.owner(slot_of(prefix))]
        assert len(keys) >= 8
        assert {key_slot(k.encode()) for k in keys} == {slot_of(prefix)}
    finally:
        await store.aclose()


async def test_a_seed_that_does_not_own_the_slot_is_followed(cluster: RedisClusterServers) -> None:
    """As with a managed cluster's configuration endpoint: any node will do."""
    prefix = "test-" + secrets.token_hex(6)
    for node in range(len(cluster.nodes)):
        store = cluster_store(cluster, prefix, node=node)
        try:
            approval, created = await store.create_or_join(make_approval(fingerprint="f" * 64))
            assert await store.get(approval.id) == approval
            assert created is (node == 0)
            approvals, _ = await store.list()
            assert [a.id for a in approvals] == [approval.id]
        finally:
            await store.aclose()


async def test_a_waiter_is_woken_by_a_notice_from_another_node(
    cluster: RedisClusterServers,
) -> None:
    prefix = "test-" + secrets.token_hex(6)
    owner = cluster.owner(slot_of(prefix))
    stores = [cluster_store(cluster, prefix, node=i) for i in range(len(cluster.nodes))]
    try:
        approval, _ = await stores[0].create_or_join(make_approval())
        waiting = [asyncio.create_task(s.wait(approval.id, 10)) for s in stores]
        await asyncio.sleep(0.3)  # subscribed (each on some node), first read done
        started = time.monotonic()
        await stores[owner].decide(approval.id, approve(), time.time())
        woken = await asyncio.wait_for(asyncio.gather(*waiting), 5)
        assert all(w is not None and w.state is ApprovalState.APPROVED for w in woken)
        assert time.monotonic() - started < 0.4, "woken by the notice, not by polling"
    finally:
        for s in stores:
            await s.aclose()


async def move_slot(cluster: RedisClusterServers, slot: int, source: int, target: int) -> None:
    """Migrate one slot with its keys, as `redis-cli --cluster reshard` does."""
    clients = [
        aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True) for port in cluster.ports
    ]
    try:
        ids = [await c.execute_command("CLUSTER", "MYID") for c in clients]
        src, dst = clients[source], clients[target]
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
        while keys := await src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            port = cluster.ports[target]
            await src.execute_command("MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)
        for c in clients:
            await c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    finally:
        for c in clients:
            await c.aclose()


async def test_a_held_wait_survives_its_slot_moving(cluster: RedisClusterServers) -> None:
    prefix = "test-" + secrets.token_hex(6)
    slot = slot_of(prefix)
    source = cluster.owner(slot)
    target = (source + 2) % len(cluster.nodes)
    waiter, decider = cluster_store(cluster, prefix), cluster_store(cluster, prefix)
    try:
        approval, _ = await waiter.create_or_join(make_approval())
        waiting = asyncio.create_task(waiter.wait(approval.id, 15))
        await asyncio.sleep(0.2)
        await move_slot(cluster, slot, source, target)
        found = await keys_by_node(cluster, prefix)
        assert list(found) == [target]
        await decider.decide(approval.id, approve(), time.time())  # follows MOVED
        woken = await asyncio.wait_for(waiting, 5)
        assert woken is not None and woken.state is ApprovalState.APPROVED
        claimed = await waiter.claim(approval.id, time.time())
        assert claimed.state is ApprovalState.EXECUTED
    finally:
        await waiter.aclose()
        await decider.aclose()


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down"),
        redis.exceptions.MovedError("3999 127.0.0.1:6381"),
        redis.exceptions.AskError("3999 127.0.0.1:6381"),
        redis.exceptions.TryAgainError("TRYAGAIN"),
        redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica."),
        redis.exceptions.ResponseError("ERR Error running script: the node is failing"),
        redis.exceptions.ConnectionError("Connection refused"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
        redis.exceptions.SlotNotCoveredError("slot 3999 is not covered"),
        redis.exceptions.RedisClusterException("no node for the slot"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_any_error_from_the_cluster_client_is_store_unavailable(
    cluster: RedisClusterServers, error: Exception
) -> None:
    store = cluster_store(cluster, "test-" + secrets.token_hex(6))

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise error

    try:
        store._cluster.execute_command = failing  # type: ignore[union-attr,method-assign]
        with pytest.raises(StoreUnavailable):
            await store.get("apr_x")
        with pytest.raises(StoreUnavailable):
            await store.create_or_join(make_approval())
        with pytest.raises(StoreUnavailable):
            await store.decide("apr_x", approve(), time.time())
        with pytest.raises(StoreUnavailable):
            await store.list()
        with pytest.raises(StoreUnavailable):
            await store.due(time.time())
    finally:
        await store.aclose()


async def test_a_node_down_is_store_unavailable_then_recovers() -> None:
    """The owner of the slot stopped: StoreUnavailable (no other error); works once it is up."""
    servers = RedisClusterServers()
    try:
        servers.start()
        prefix = "test-" + secrets.token_hex(6)
        owner = servers.owner(slot_of(prefix))
        store = cluster_store(servers, prefix)
        try:
            approval, _ = await store.create_or_join(make_approval())
            servers.nodes[owner].stop()
            started = time.monotonic()
            for _ in range(3):
                with pytest.raises(StoreUnavailable):
                    await store.get(approval.id)
                with pytest.raises(StoreUnavailable):
                    await store.decide(approval.id, approve(), time.time())
            assert not await store.ping()
            assert time.monotonic() - started < 20
            servers.nodes[owner].start()  # its nodes.conf brings it back with its slots
            deadline = time.monotonic() + 15
            while True:  # (no persistence in this fixture: what it held is gone)
                try:
                    again, _ = await store.create_or_join(make_approval())
                    break
                except StoreUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            decided = await store.decide(again.id, approve(), time.time())
            assert decided.state is ApprovalState.APPROVED
        finally:
            await store.aclose()
    finally:
        servers.cleanup()
