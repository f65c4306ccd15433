"""Several `countersign run` replicas on one real redis-server: one truth, fail closed.

Agents and approvers use API keys here (the IdP path is covered elsewhere); what is under test
is the shared store: decisions cross replicas, races have one winner across processes, a Redis
outage holds and refuses but never forwards unapproved, and a replica's crash loses nothing.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.authn.apikeys import key_digest
from tests.e2e.conftest import Process, free_port
from tests.redis_fixture import RedisServer

StartFn = Callable[[str, int], Process]
API = "/_countersign/api/approvals"
AGENT_KEY = "cs_replica_agent_0000000000000000000000000"
ALICE_KEY = "cs_replica_alice_0000000000000000000000000"
BOB_KEY = "cs_replica_bob_000000000000000000000000000"
AGENT = {"Authorization": f"Bearer {AGENT_KEY}"}
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
BOB = {"Authorization": f"Bearer {BOB_KEY}"}


def config(port: int, upstream: str, redis_url: str, prefix: str, mode: str = "hold") -> str:
    return f"""
server: {{listen: "127.0.0.1:{port}"}}
identity:
  api_keys:
    - {{sha256: "{key_digest(AGENT_KEY)}", subject: agent-7, groups: [agents], owner: "carol@example.com"}}
    - {{sha256: "{key_digest(ALICE_KEY)}", subject: alice, groups: [data-owners], email: "alice@example.com"}}
    - {{sha256: "{key_digest(BOB_KEY)}", subject: bob, groups: [data-owners], email: "bob@example.com"}}
store: {{url: "{redis_url}", key_prefix: "{prefix}", timeout_seconds: 1}}
routes:
  - {{name: cloud, prefix: /cloud/, upstream: "{upstream}"}}
approvals: {{mode: {mode}, timeout_seconds: 60}}
policy:
  rules:
    - {{name: reads, methods: [GET], action: allow}}
    - name: exports
      methods: [POST]
      paths: ["/cloud/exports/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
    - name: flash
      methods: [POST]
      paths: ["/cloud/flash/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
      timeout_seconds: 2
"""


@pytest.fixture
def replicas(
    run_countersign: StartFn, upstream: TestServer, fresh_redis: RedisServer
) -> Callable[..., list[Process]]:
    prefix = "e2e-" + secrets.token_hex(6)

    def start(count: int = 2, mode: str = "hold") -> list[Process]:
        procs = []
        for _ in range(count):
            port = free_port()
            text = config(port, str(upstream.make_url("/")), fresh_redis.url, prefix, mode)
            procs.append(run_countersign(text, port))
        return procs

    return start


def events(*procs: Process, name: str) -> list[dict[str, Any]]:
    time.sleep(0.2)  # audit lines are flushed in batches every 50 ms
    found = []
    for proc in procs:
        for line in proc.stdout().splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event["event"] == name:
                    found.append(event)
    return found


async def pending(session: aiohttp.ClientSession, proc: Process) -> list[dict[str, Any]]:
    async with session.get(f"{proc.url}{API}?state=pending", headers=ALICE) as resp:
        assert resp.status == 200, await resp.text()
        return list((await resp.json())["approvals"])


async def wait_pending(session: aiohttp.ClientSession, proc: Process) -> str:
    for _ in range(200):
        found = await pending(session, proc)
        if found:
            return str(found[0]["approval_id"])
        await asyncio.sleep(0.05)
    raise AssertionError("no pending approval")


async def decide(
    session: aiohttp.ClientSession,
    proc: Process,
    approval_id: str,
    who: dict[str, str],
    verdict: str = "approve",
) -> int:
    async with session.post(
        f"{proc.url}{API}/{approval_id}/decision",
        json={"verdict": verdict, "reason": "replicas"},
        headers=who,
    ) as resp:
        return resp.status


def post(
    session: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> asyncio.Task[tuple[int, dict[str, Any]]]:
    async def call() -> tuple[int, dict[str, Any]]:
        async with session.post(url, json=body, headers={**AGENT, **(headers or {})}) as resp:
            return resp.status, await resp.json()

    return asyncio.create_task(call())


async def test_a_decision_on_one_replica_releases_the_request_held_on_another(
    replicas: Callable[..., list[Process]],
) -> None:
    a, b = replicas()
    async with aiohttp.ClientSession() as session:
        held = post(session, f"{a.url}/cloud/exports/x", {"n": 1})
        approval_id = await wait_pending(session, b)  # B sees what A holds
        started = time.monotonic()
        assert await decide(session, b, approval_id, ALICE) == 200
        status, _ = await asyncio.wait_for(held, 10)
        released_after = time.monotonic() - started
    assert status == 200
    assert released_after < 1.0, f"released {released_after:.3f} s after the decision"
    forwarded = events(a, b, name="request.forwarded")
    assert [e["approval_id"] for e in forwarded] == [approval_id]


async def test_races_across_two_processes_have_one_winner(
    replicas: Callable[..., list[Process]],
) -> None:
    a, b = replicas(mode="async")
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{a.url}/cloud/exports/r", json={"n": 1}, headers=AGENT) as resp:
            approval_id = (await resp.json())["approval_id"]
        deciders = [
            decide(session, proc, approval_id, who, "approve" if i % 2 else "deny")
            for i, (proc, who) in enumerate([(a, ALICE), (b, BOB), (b, ALICE), (a, BOB)] * 6)
        ]
        statuses = await asyncio.gather(*deciders)
        assert statuses.count(200) == 1 and set(statuses) == {200, 409}
        async with session.get(f"{a.url}{API}/{approval_id}", headers=ALICE) as resp:
            state = (await resp.json())["state"]
        use = {"Countersign-Approval": approval_id}
        claims = await asyncio.gather(
            *(post(session, f"{p.url}/cloud/exports/r", {"n": 1}, use) for p in [a, b] * 10)
        )
    forwarded = events(a, b, name="request.forwarded")
    if state == "approved":
        assert sorted(s for s, _ in claims).count(200) == 1, "executed exactly once"
        assert {b["error"]["code"] for s, b in claims if s != 200} == {"approval_used"}
        assert len(forwarded) == 1
    else:
        assert {b["error"]["code"] for _, b in claims} == {"approval_denied"}
        assert forwarded == []
    assert len(events(a, b, name="approval.decided")) == 1


async def test_redis_outage_fails_closed_and_recovers_by_itself(
    replicas: Callable[..., list[Process]], fresh_redis: RedisServer
) -> None:
    a, b = replicas()
    async with aiohttp.ClientSession() as session:
        held = post(session, f"{a.url}/cloud/exports/outage", {"n": 1})
        approval_id = await wait_pending(session, a)
        fresh_redis.stop()
        try:
            # Allowed traffic keeps flowing.
            async with session.get(f"{a.url}/cloud/buckets", headers=AGENT) as resp:
                assert resp.status == 200
            # New privileged requests are refused, and nothing is forwarded.
            status, body = await asyncio.wait_for(
                post(session, f"{b.url}/cloud/exports/other", {"n": 2}), 10
            )
            assert (status, body["error"]["code"]) == (503, "approvals_unavailable")
            async with session.get(f"{a.url}/_countersign/readyz") as resp:
                # A shared dependency down is reported, not "not ready" (DESIGN §5): every
                # replica shares it, and allowed traffic still flows.
                assert resp.status == 200
                assert (await resp.json())["dependencies"]["store"] == "down"
            async with session.get(f"{a.url}{API}", headers=ALICE) as resp:
                assert resp.status == 503
            await asyncio.sleep(1)
            assert not held.done(), "the held request waits; it is neither run nor dropped"
        finally:
            fresh_redis.start()
        for _ in range(100):
            async with session.get(f"{a.url}/_countersign/readyz") as resp:
                if (await resp.json())["dependencies"]["store"] == "ok":
                    break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("replica did not see the store again")
        assert await decide(session, b, approval_id, ALICE) == 200
        status, _ = await asyncio.wait_for(held, 10)
        assert status == 200
    forwarded = events(a, b, name="request.forwarded")
    assert [e["approval_id"] for e in forwarded if e["approval_id"]] == [approval_id]


async def test_a_crashed_replica_loses_nothing(replicas: Callable[..., list[Process]]) -> None:
    a, b = replicas()
    async with aiohttp.ClientSession() as session:
        held = post(session, f"{a.url}/cloud/exports/crash", {"n": 1})
        approval_id = await wait_pending(session, b)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        with pytest.raises(aiohttp.ClientError):  # the connection died with the replica
            await asyncio.wait_for(held, 10)
        # The agent retries on the surviving replica: it joins the same approval.
        retry = post(session, f"{b.url}/cloud/exports/crash", {"n": 1})
        await asyncio.sleep(0.3)
        assert [p["approval_id"] for p in await pending(session, b)] == [approval_id]
        assert await decide(session, b, approval_id, BOB) == 200
        status, _ = await asyncio.wait_for(retry, 10)
        assert status == 200
    forwarded = events(a, b, name="request.forwarded")
    assert [e["approval_id"] for e in forwarded] == [approval_id]


async def test_expiry_is_noticed_when_the_holding_replica_died(
    replicas: Callable[..., list[Process]],
) -> None:
    a, b = replicas()
    async with aiohttp.ClientSession() as session:
        held = post(session, f"{a.url}/cloud/flash/now", {"n": 1})
        approval_id = await wait_pending(session, b)
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        held.cancel()
        for _ in range(100):
            if events(b, name="approval.expired"):
                break
            await asyncio.sleep(0.1)
    expired = events(b, name="approval.expired")
    assert [e["approval_id"] for e in expired] == [approval_id]


async def test_workers_share_the_port_and_the_store(
    run_countersign: StartFn, upstream: TestServer, fresh_redis: RedisServer
) -> None:
    port = free_port()
    text = config(port, str(upstream.make_url("/")), fresh_redis.url, "e2e-" + secrets.token_hex(6))
    proc = run_countersign(text.replace("server: {", "server: {workers: 3, "), port)
    async with aiohttp.ClientSession() as session:
        for _ in range(30):
            async with session.get(f"{proc.url}/cloud/buckets", headers=AGENT) as resp:
                assert resp.status == 200
        # Held by one worker, decided through whichever worker answers the API call.
        held = post(session, f"{proc.url}/cloud/exports/w", {"n": 1})
        approval_id = await wait_pending(session, proc)
        assert await decide(session, proc, approval_id, ALICE) == 200
        status, _ = await asyncio.wait_for(held, 10)
        assert status == 200
    code = proc.stop()
    assert code == 0, proc.stderr()[-6000:]
    started = [
        json.loads(line) for line in proc.stderr().splitlines() if '"server.started"' in line
    ]
    assert len({e["pid"] for e in started}) == 3
    lines = proc.stdout().splitlines()
    assert all(json.loads(line)["event"] for line in lines), "no interleaved audit lines"
    assert sum('"request.completed"' in line for line in lines) == 31  # one per request
    assert sum('"request.forwarded"' in line for line in lines) == 1  # the approved one's step


def test_workers_need_a_shared_store(tmp_path: Any) -> None:
    from tests.e2e.test_cli import cli

    path = tmp_path / "w.yaml"
    path.write_text("server:\n  workers: 2\n")
    result = cli("check", "-c", str(path))
    assert result.returncode == 2
    assert f"{path}:2: server.workers: more than one worker needs a shared store" in result.stderr
