"""Grants end to end: the real `countersign run`, tokens from the real test IdP.

bob approves agent-7's export with a grant of 2 uses: the next two requests of the same shape
(other bodies) pass at once, naming the grant, each audited; the third is held again, and so is
another agent's. A grant given from the CLI and then revoked over the API lets nothing more
through.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.e2e.conftest import Process, free_port
from tests.e2e.test_approvals_e2e import Tokens, audit_events, post, wait_pending
from tests.e2e.test_cli import cli
from tests.idp_fixture import TestIdP

StartFn = Callable[[str, int], Process]
API = "/_countersign/api/approvals"
GRANTS = "/_countersign/api/grants"


def config(port: int, upstream: str, issuer: str) -> str:
    return f"""
server:
  listen: "127.0.0.1:{port}"
identity:
  issuers: [{{issuer: "{issuer}", audiences: [countersign]}}]
routes:
  - {{name: cloud, prefix: /cloud/, upstream: "{upstream}"}}
approvals:
  timeout_seconds: 60
policy:
  rules:
    - name: exports
      route: cloud
      methods: [POST]
      paths: ["/cloud/exports/**"]
      when: {{groups: [agents]}}
      action: approve
      approvers: {{groups: [data-owners]}}
      grant: {{max_uses: 5, max_seconds: 1800}}
      risk: high
      note: "exports leave the company"
"""


@pytest.fixture
async def proxy(run_countersign: StartFn, upstream: TestServer, idp: TestIdP) -> Process:
    port = free_port()
    return run_countersign(config(port, str(upstream.make_url("/")), idp.issuer), port)


async def pending_other_than(
    session: aiohttp.ClientSession, base: str, who: dict[str, str], seen: set[str]
) -> str:
    for _ in range(200):
        async with session.get(f"{base}{API}?state=pending", headers=who) as resp:
            approvals = (await resp.json())["approvals"]
        fresh = [a["approval_id"] for a in approvals if a["approval_id"] not in seen]
        if fresh:
            return str(fresh[0])
        await asyncio.sleep(0.05)
    raise AssertionError("no new pending approval")


async def test_a_grant_of_two_lets_two_through_then_holds(proxy: Process, idp: TestIdP) -> None:
    tokens = Tokens(idp)
    base = proxy.url
    bob = await tokens.bob()
    agent = await tokens.agent()
    url = f"{base}/cloud/exports/customers"
    async with aiohttp.ClientSession() as session:
        held = post(session, url, agent, {"n": 1})
        approval_id = await wait_pending(session, base, bob)
        async with session.get(f"{base}{API}/{approval_id}", headers=bob) as resp:
            shown = await resp.json()
        assert (shown["risk"], shown["note"], shown["state_label"]) == (
            "high",
            "exports leave the company",
            "Pending",
        )
        assert shown["grant"]["offered"] and shown["grant"]["max_uses"] == 5
        async with session.post(
            f"{base}{API}/{approval_id}/decision",
            json={"verdict": "approve", "reason": "ok", "grant": {"uses": 9, "seconds": 60}},
            headers=bob,
        ) as resp:
            assert resp.status == 400
            assert "at most 5 uses" in (await resp.json())["error"]["message"]
        async with session.post(
            f"{base}{API}/{approval_id}/decision",
            json={"verdict": "approve", "reason": "ok", "grant": {"uses": 2, "seconds": 600}},
            headers=bob,
        ) as resp:
            decided = await resp.json()
            assert resp.status == 200, decided
        grant_id = decided["grant"]["grant_id"]
        status, _, headers = await asyncio.wait_for(held, 10)
        assert status == 200 and headers["Countersign-Approval-Id"] == approval_id

        # The next two of the same shape pass at once, without a human.
        for n in (2, 3):
            status, echo, headers = await asyncio.wait_for(post(session, url, agent, {"n": n}), 5)
            assert status == 200, echo
            assert headers["Countersign-Grant-Id"] == grant_id
            assert json.loads(echo["body"]) == {"n": n}

        # The third is held again: a new approval, nothing forwarded while it waits.
        third = post(session, url, agent, {"n": 4})
        third_id = await pending_other_than(session, base, bob, {approval_id})
        await asyncio.sleep(0.2)
        assert not third.done()
        # Another agent (same groups, same request shape) never uses agent-7's grant.
        other = post(session, url, await tokens.client("agent-x"), {"n": 5})
        other_id = await pending_other_than(session, base, bob, {approval_id, third_id})
        assert not other.done()
        for pending in (third_id, other_id):
            async with session.post(
                f"{base}{API}/{pending}/decision",
                json={"verdict": "deny", "reason": "enough for today"},
                headers=bob,
            ) as resp:
                assert resp.status == 200
        for call in (third, other):
            status, body, headers = await asyncio.wait_for(call, 10)
            assert status == 403 and body["error"]["code"] == "approval_denied"
            assert "Countersign-Grant-Id" not in headers
        async with session.get(f"{base}{API}/{approval_id}", headers=bob) as resp:
            shown = await resp.json()
        assert shown["grant"]["uses_left"] == 0 and shown["grant"]["state"] == "exhausted"
    await asyncio.sleep(0.3)  # the audit batch reaches stdout
    events = audit_events(proxy)
    used = [e for e in events if e["event"] == "grant.used"]
    assert [e["uses_left"] for e in used] == [1, 0]
    assert {e["grant_id"] for e in used} == {grant_id}
    assert {e["approval_id"] for e in used} == {approval_id}
    assert [e["grant_id"] for e in events if e["event"] == "grant.created"] == [grant_id]
    assert [e["grant_id"] for e in events if e["event"] == "grant.exhausted"] == [grant_id]
    forwarded = [e for e in events if e["event"] == "request.forwarded"]
    assert [e.get("grant_id") for e in forwarded] == [None, grant_id, grant_id]


async def test_a_cli_grant_revoked_lets_nothing_more_through(proxy: Process, idp: TestIdP) -> None:
    tokens = Tokens(idp)
    base = proxy.url
    bob = await tokens.bob()
    agent = await tokens.agent()
    url = f"{base}/cloud/exports/orders"
    asynced = {"Prefer": "respond-async"}
    async with aiohttp.ClientSession() as session:
        status, body, _ = await post(session, url, agent, {"n": 1}, **asynced)
        assert status == 202
        approval_id = body["approval_id"]
        token = bob["Authorization"].removeprefix("Bearer ")
        done = await asyncio.to_thread(
            cli,
            "approvals",
            "approve",
            approval_id,
            "--url",
            base,
            "--token",
            token,
            "--grant-uses",
            "5",
            "--grant-minutes",
            "10",
        )
        assert done.returncode == 0, done.stderr
        assert "grant:" in done.stdout and "5 more like POST /cloud/exports/orders" in done.stdout
        status, _, headers = await post(session, url, agent, {"n": 2}, **asynced)
        assert status == 200
        grant_id = headers["Countersign-Grant-Id"]
        async with session.get(f"{base}{GRANTS}", headers=agent) as resp:
            listed: dict[str, Any] = await resp.json()
        assert [g["uses_left"] for g in listed["grants"]] == [4]
        async with session.delete(f"{base}{GRANTS}/{grant_id}", headers=agent) as resp:
            assert resp.status == 403  # the requester is no approver: it cannot even revoke
        async with session.delete(f"{base}{GRANTS}/{grant_id}", headers=bob) as resp:
            assert resp.status == 200 and (await resp.json())["state"] == "revoked"
        status, body, headers = await post(session, url, agent, {"n": 3}, **asynced)
        assert status == 202 and "Countersign-Grant-Id" not in headers
    await asyncio.sleep(0.3)
    events = audit_events(proxy)
    [revoked] = [e for e in events if e["event"] == "grant.revoked"]
    assert revoked["grant_id"] == grant_id and revoked["revoked_by"]["person"] == "bob@example.com"
