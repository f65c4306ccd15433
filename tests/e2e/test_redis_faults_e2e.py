"""Redis faults as a user of the real `countersign run` sees them (DESIGN §2 "Store unreachable").

Redis stopped: a privileged request is refused `503 approvals_unavailable` with `Retry-After`,
in the JSON error shape, and never forwarded; an allowed request still passes; readyz stays 200
and reports the store "down". Redis back: privileged requests are held and approved again.
With Sentinel: the master killed, the replica promoted, a request held across the failover and
a new one both complete once approved.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from redis.crc import key_slot

from proxy.authn.apikeys import key_digest
from tests.e2e.conftest import Process, free_port
from tests.redis_cluster_fixture import RedisClusterServers, RedisSentinelGroup, _command
from tests.redis_fixture import RedisServer

pytestmark = pytest.mark.timeout(90)

StartFn = Callable[[str, int], Process]
API = "/_countersign/api/approvals"
READYZ = "/_countersign/readyz"
AGENT_KEY = "cs_faults_agent_00000000000000000000000000"
ALICE_KEY = "cs_faults_alice_00000000000000000000000000"
AGENT = {"Authorization": f"Bearer {AGENT_KEY}"}
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}


def config(port: int, upstream: str, store: str) -> str:
    return f"""
server: {{listen: "127.0.0.1:{port}"}}
identity:
  api_keys:
    - {{sha256: "{key_digest(AGENT_KEY)}", subject: agent-7, groups: [agents]}}
    - {{sha256: "{key_digest(ALICE_KEY)}", subject: alice, groups: [data-owners], email: "alice@example.com"}}
store: {store}
routes:
  - {{name: cloud, prefix: /cloud/, upstream: "{upstream}"}}
approvals: {{mode: hold, timeout_seconds: 60}}
policy:
  rules:
    - {{name: reads, methods: [GET], action: allow}}
    - name: exports
      methods: [POST]
      paths: ["/cloud/exports/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
"""


def forwarded(proc: Process) -> list[dict[str, Any]]:
    time.sleep(0.2)  # audit lines are group-committed
    lines = (json.loads(line) for line in proc.stdout().splitlines() if line[:1] == "{")
    return [event for event in lines if event["event"] == "request.forwarded"]


def post(
    session: aiohttp.ClientSession, url: str
) -> asyncio.Task[tuple[int, dict[str, Any], dict[str, str]]]:
    async def call() -> tuple[int, dict[str, Any], dict[str, str]]:
        async with session.post(url, json={"n": 1}, headers=AGENT) as resp:
            return resp.status, await resp.json(), dict(resp.headers)

    return asyncio.create_task(call())


async def dependencies(session: aiohttp.ClientSession, proc: Process) -> tuple[int, Any]:
    async with session.get(proc.url + READYZ) as resp:
        return resp.status, (await resp.json())["dependencies"]


async def wait_store(session: aiohttp.ClientSession, proc: Process, state: str) -> None:
    deadline = time.monotonic() + 20
    while (await dependencies(session, proc))[1]["store"] != state:
        assert time.monotonic() < deadline, f"readyz never reported the store {state!r}"
        await asyncio.sleep(0.1)


async def pending_for(
    session: aiohttp.ClientSession,
    proc: Process,
    path: str,
    call: asyncio.Task[tuple[int, dict[str, Any], dict[str, str]]] | None = None,
) -> str | None:
    """The id of the pending approval for `path`, retried through a store outage; None if
    `call` (the request that should be held) ended instead."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        async with session.get(f"{proc.url}{API}?state=pending", headers=ALICE) as resp:
            if resp.status == 200:
                for approval in (await resp.json())["approvals"]:
                    if approval["path"] == path:
                        return str(approval["approval_id"])
        if call is not None and call.done():
            return None
        await asyncio.sleep(0.1)
    raise AssertionError(f"no pending approval for {path}")


async def approve(session: aiohttp.ClientSession, proc: Process, approval_id: str) -> None:
    """Approve, retrying while the store is unavailable (503) as an approver's client would."""
    deadline = time.monotonic() + 20
    while True:
        async with session.post(
            f"{proc.url}{API}/{approval_id}/decision",
            json={"verdict": "approve", "reason": "faults"},
            headers=ALICE,
        ) as resp:
            if resp.status == 200:
                return
            assert resp.status == 503, await resp.text()
        assert time.monotonic() < deadline, "the decision never went through"
        await asyncio.sleep(0.2)


async def held_then_approved(session: aiohttp.ClientSession, proc: Process, path: str) -> str:
    """A privileged request held, approved and run. Right after the store came back, a request
    may still meet a connection the outage broke and be answered 503 approvals_unavailable with
    Retry-After (nothing stored, nothing forwarded): retried, as an SDK honouring it would."""
    deadline = time.monotonic() + 20
    while True:
        call = post(session, proc.url + path)
        approval_id = await pending_for(session, proc, path, call)
        if approval_id is not None:
            break
        status, body, headers = call.result()
        assert (status, body["error"]["code"]) == (503, "approvals_unavailable"), body
        assert int(headers["Retry-After"]) > 0
        assert time.monotonic() < deadline, "privileged requests never came back"
        await asyncio.sleep(0.2)
    assert not call.done()
    await approve(session, proc, approval_id)
    status, _, headers = await asyncio.wait_for(call, 15)
    assert status == 200
    assert headers["Countersign-Approval-Id"] == approval_id
    return approval_id


async def test_redis_stopped_refuses_privileged_requests_and_recovers(
    run_countersign: StartFn, upstream: TestServer, fresh_redis: RedisServer
) -> None:
    port = free_port()
    prefix = "faults-" + secrets.token_hex(6)
    store = f'{{url: "{fresh_redis.url}", key_prefix: "{prefix}", timeout_seconds: 1}}'
    proc = run_countersign(config(port, str(upstream.make_url("/")), store), port)
    async with aiohttp.ClientSession() as session:
        await wait_store(session, proc, "ok")
        fresh_redis.stop()
        try:
            status, body, headers = await asyncio.wait_for(
                post(session, f"{proc.url}/cloud/exports/refused"), 15
            )
            assert status == 503
            assert int(headers["Retry-After"]) > 0
            assert headers["Content-Type"].startswith("application/json")
            error = body["error"]
            assert error["code"] == "approvals_unavailable"
            assert isinstance(error["message"], str) and error["message"]
            assert error["request_id"]
            async with session.get(f"{proc.url}/cloud/buckets", headers=AGENT) as resp:
                assert resp.status == 200
            status, deps = await dependencies(session, proc)
            assert (status, deps["store"]) == (200, "down")
        finally:
            fresh_redis.start()
        await wait_store(session, proc, "ok")
        approval_id = await held_then_approved(session, proc, "/cloud/exports/after")
    assert proc.stop() == 0
    # Only the approved request was forwarded; the refused one never was.
    assert [e["approval_id"] for e in forwarded(proc) if e.get("approval_id")] == [approval_id]


@pytest.fixture
def sentinels() -> Iterator[RedisSentinelGroup]:
    group = RedisSentinelGroup()
    try:
        group.start()
        yield group
    finally:
        group.cleanup()


async def test_a_sentinel_failover_through_the_process(
    run_countersign: StartFn, upstream: TestServer, sentinels: RedisSentinelGroup
) -> None:
    port = free_port()
    nodes = ", ".join(f'"{host}:{p}"' for host, p in sentinels.nodes)
    store = (
        '{url: "redis://sentinel-names-the-master/0", mode: sentinel, timeout_seconds: 1, '
        f"sentinel: {{master: {sentinels.master_name}, nodes: [{nodes}]}}}}"
    )
    proc = run_countersign(config(port, str(upstream.make_url("/")), store), port)
    async with aiohttp.ClientSession() as session:
        await wait_store(session, proc, "ok")
        await held_then_approved(session, proc, "/cloud/exports/before")

        # A request held across the failover: its approval reached the replica first.
        held = post(session, f"{proc.url}/cloud/exports/across")
        approval_id = await pending_for(session, proc, "/cloud/exports/across", held)
        assert approval_id is not None, "the request was not held"
        old_master = sentinels.master_port()
        assert _command(old_master, "WAIT", "1", "2000").startswith(b":1")
        sentinels.master.kill()
        deadline = time.monotonic() + 30
        while sentinels.master_port() == old_master:
            assert time.monotonic() < deadline, "the sentinels did not fail over in 30 s"
            await asyncio.sleep(0.2)
        assert not held.done()
        await wait_store(session, proc, "ok")
        await approve(session, proc, approval_id)
        status, _, headers = await asyncio.wait_for(held, 20)
        assert status == 200
        assert headers["Countersign-Approval-Id"] == approval_id

        # And a new privileged request after the failover.
        await held_then_approved(session, proc, "/cloud/exports/after")
    assert proc.stop() == 0


@pytest.fixture
def cluster() -> Iterator[RedisClusterServers]:
    servers = RedisClusterServers()
    try:
        servers.start()
        yield servers
    finally:
        servers.cleanup()


async def test_a_cluster_through_the_process_from_a_node_that_does_not_own_the_slot(
    run_countersign: StartFn, upstream: TestServer, cluster: RedisClusterServers
) -> None:
    """As a managed cluster's configuration endpoint may be: the node given is not the one that
    serves the `{prefix}` slot. Privileged requests and the approvals list follow the slot."""
    prefix = "cluster-" + secrets.token_hex(6)
    owner = cluster.owner(key_slot(f"{{{prefix}}}".encode()))
    seed = next(i for i in range(len(cluster.nodes)) if i != owner)
    port = free_port()
    store = f'{{url: "{cluster.url(seed)}", mode: cluster, key_prefix: "{prefix}"}}'
    proc = run_countersign(config(port, str(upstream.make_url("/")), store), port)
    async with aiohttp.ClientSession() as session:
        await wait_store(session, proc, "ok")
        approval_id = await held_then_approved(session, proc, "/cloud/exports/cluster")
        async with session.get(f"{proc.url}{API}?state=executed", headers=ALICE) as resp:
            assert resp.status == 200
            listed = [a["approval_id"] for a in (await resp.json())["approvals"]]
        assert approval_id in listed
    assert proc.stop() == 0
    # Everything the store keeps lives on the slot's owner.
    assert _command(cluster.ports[owner], "DBSIZE") != b":0\r\n"
