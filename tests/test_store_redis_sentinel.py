"""RedisStore with `store.mode: sentinel` against a real master, replica and 3 sentinels on
loopback: the conformance suite, then the master killed while a request is held: the sentinels
fail over, and the approval is decided, the held wait returns, and the approval is claimed."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.exceptions

from proxy.model import Approval, ApprovalState, Outcome
from proxy.store.base import StoreUnavailable
from proxy.store.redis import RedisStore
from tests.redis_cluster_fixture import RedisSentinelGroup, _command, _Process, _server_args
from tests.redis_fixture import RedisServer, _free_port
from tests.store_conformance import StoreConformance, approve, make_approval

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(scope="module")
def sentinels() -> Iterator[RedisSentinelGroup]:
    group = RedisSentinelGroup()
    try:
        group.start()
        yield group
    finally:
        group.cleanup()


def sentinel_store(group: RedisSentinelGroup, prefix: str) -> RedisStore:
    return RedisStore(
        "redis://sentinel-names-the-master/0",  # the host is not used
        key_prefix=prefix,
        timeout_seconds=1,
        mode="sentinel",
        sentinel_master=group.master_name,
        sentinel_nodes=group.nodes,
    )


class TestRedisSentinelStore(StoreConformance):
    @pytest.fixture
    async def store(self, sentinels: RedisSentinelGroup) -> AsyncIterator[RedisStore]:
        store = sentinel_store(sentinels, "test-" + secrets.token_hex(6))
        yield store
        await store.aclose()


async def test_a_replica_refusing_writes_is_store_unavailable(
    fresh_redis: RedisServer, tmp_path: Any
) -> None:
    """READONLY (a store pointed at a replica, or at a master just demoted by a failover) from a
    script: StoreUnavailable, as a 503 to the request, never an unexpected error."""
    port = _free_port()
    replica = _Process(
        tmp_path,
        port,
        _server_args(tmp_path, port, "--replicaof", "127.0.0.1", str(fresh_redis.port)),
    )
    replica.start()
    store = RedisStore(f"redis://127.0.0.1:{port}/0", key_prefix="test-" + secrets.token_hex(6))
    try:
        with pytest.raises(StoreUnavailable, match=r"(?i)read.?only"):
            await store.create_or_join(make_approval())
        with pytest.raises(StoreUnavailable):
            await store.lease("sweeper", 5)
        with pytest.raises(StoreUnavailable):
            await store.remember_ambiguous("f" * 64, "apr_x")
        assert await store.get("apr_x") is None  # reads still work there
    finally:
        await store.aclose()
        replica.stop()


@pytest.mark.parametrize(
    "error",
    [
        redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica."),
        redis.exceptions.ResponseError("ERR Error running script: the node is failing"),
        redis.exceptions.BusyLoadingError("LOADING Redis is loading the dataset in memory"),
        redis.exceptions.OutOfMemoryError("OOM command not allowed"),
        redis.exceptions.ConnectionError("Connection refused"),
        redis.exceptions.TimeoutError("Timeout reading from socket"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_any_error_redis_answers_is_store_unavailable(
    fresh_redis: RedisServer, error: Exception
) -> None:
    """What a pipelined command gets back (standalone and sentinel share that path)."""
    store = RedisStore(fresh_redis.url, key_prefix="test-" + secrets.token_hex(6))

    def failing(*args: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_exception(error)
        return future

    try:
        store._enqueue = failing  # type: ignore[method-assign]
        for call in (
            lambda: store.get("apr_x"),
            lambda: store.create_or_join(make_approval()),
            lambda: store.decide("apr_x", approve(), time.time()),
            lambda: store.list(),
            lambda: store.due(time.time()),
            lambda: store.lease("sweeper", 5),
            lambda: store.get_note("apr_x", "slack"),
        ):
            with pytest.raises(StoreUnavailable):
                await call()
    finally:
        await store.aclose()


async def retrying(what: str, call: object, seconds: float = 15) -> object:
    """Call until the store is available again (the failover is under way meanwhile); only
    `StoreUnavailable` is tolerated: any other error fails the test."""
    assert callable(call)
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{what}: the store did not come back in {seconds} s"
                ) from None
            await asyncio.sleep(0.2)


async def test_a_held_request_survives_a_failover(sentinels: RedisSentinelGroup) -> None:
    prefix = "test-" + secrets.token_hex(6)
    waiter, decider = sentinel_store(sentinels, prefix), sentinel_store(sentinels, prefix)
    try:
        old_master = sentinels.master_port()
        assert old_master == sentinels.master.port
        approval, _ = await waiter.create_or_join(make_approval(expires_at=time.time() + 60))
        # Acknowledged by the replica before the crash (else it may be lost, as with any
        # asynchronous replication: not the store's doing).
        assert _command(old_master, "WAIT", "1", "2000").startswith(b":1")

        async def wait_until_decided() -> Approval:
            """What ApprovalService.wait_for_decision does: wait again through an outage."""
            while True:
                try:
                    current = await waiter.wait(approval.id, 30)
                except StoreUnavailable:
                    await asyncio.sleep(0.25)
                    continue
                assert current is not None
                if current.state is not ApprovalState.PENDING:
                    return current

        held = asyncio.create_task(wait_until_decided())
        await asyncio.sleep(0.3)  # subscribed, first read done
        assert not held.done()

        sentinels.master.kill()
        deadline = time.monotonic() + 20
        while sentinels.master_port() == old_master:
            assert time.monotonic() < deadline, "the sentinels did not fail over in 20 s"
            await asyncio.sleep(0.2)
        assert sentinels.master_port() == sentinels.replica.port
        assert not held.done()

        decided = await retrying(
            "decide", lambda: decider.decide(approval.id, approve(), time.time())
        )
        assert isinstance(decided, Approval) and decided.state is ApprovalState.APPROVED
        woken = await asyncio.wait_for(held, 10)
        assert woken.state is ApprovalState.APPROVED
        claimed = await waiter.claim(approval.id, time.time())
        assert claimed.state is ApprovalState.EXECUTED
        done = await waiter.record_outcome(approval.id, Outcome.COMPLETED, 200)
        assert done.outcome is Outcome.COMPLETED
        # A new approval goes to the new master too, and is woken by its notice.
        again, _ = await decider.create_or_join(make_approval())
        waiting = asyncio.create_task(waiter.wait(again.id, 10))
        await asyncio.sleep(0.5)
        await decider.decide(again.id, approve(), time.time())
        result = await asyncio.wait_for(waiting, 5)
        assert result is not None and result.state is ApprovalState.APPROVED
    finally:
        await waiter.aclose()
        await decider.aclose()


def test_the_config_builds_each_topology() -> None:
    from proxy.app import build_store
    from proxy.config import ConfigError, load_settings_text

    def store_of(text: str) -> RedisStore:
        store = build_store(load_settings_text(text, "c.yaml", env={}))
        assert isinstance(store, RedisStore)
        return store

    cluster = store_of("store:\n  mode: cluster\n  url: redis://127.0.0.1:7000\n")
    assert cluster._cluster is not None and cluster._sentinel is None
    sentinel = store_of(
        "store:\n  mode: sentinel\n  url: redis://:pw@mymaster/0\n"
        "  sentinel: {master: mymaster, nodes: ['10.0.0.5:26379', '[::1]:26380']}\n"
    )
    assert sentinel._sentinel is not None and sentinel._cluster is None
    assert [
        (s.connection_pool.connection_kwargs["host"]) for s in sentinel._sentinel.sentinels
    ] == [
        "10.0.0.5",
        "::1",
    ]
    standalone = store_of("store:\n  url: redis://127.0.0.1:6379/0\n")
    assert standalone._cluster is None and standalone._sentinel is None

    def errors(text: str) -> list[str]:
        with pytest.raises(ConfigError) as info:
            load_settings_text(text, "c.yaml", env={})
        return [str(issue) for issue in info.value.issues]

    assert errors("store:\n  mode: sentinel\n  url: redis://m/0\n") == [
        "c.yaml:1: store.sentinel: mode: sentinel needs sentinel: {master: NAME, nodes: "
        '["host:port", ...]}'
    ]
    assert errors("store:\n  url: redis://m/0\n  sentinel: {master: m, nodes: ['a:1']}\n") == [
        "c.yaml:3: store.sentinel: only makes sense with mode: sentinel"
    ]
    assert errors(
        "store:\n  mode: sentinel\n  url: redis://m/0\n  sentinel: {master: m, nodes: [a]}\n"
    ) == ["c.yaml:4: store.sentinel.nodes: 'a' is not host:port (e.g. 10.0.0.5:26379)"]
    assert errors("store:\n  mode: cluster\n") == [
        "c.yaml:1: store.url: mode: cluster needs a redis:// (or rediss://) URL, any node of the "
        "cluster (e.g. redis://redis-1:6379)"
    ]
    assert errors("store:\n  mode: cluster\n  url: redis://a:7000/2\n") == [
        "c.yaml:3: store.url: a Redis Cluster has only database 0"
    ]
    assert errors("store:\n  mode: replicated\n  url: redis://a:7000\n") == [
        "c.yaml:2: store.mode: must be one of standalone, cluster, sentinel; got 'replicated'"
    ]
