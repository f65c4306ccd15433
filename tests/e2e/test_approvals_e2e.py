"""Approvals end to end: the real `countersign run` process, tokens from the real test IdP.

Agents authenticate with client credentials; approvers with their own tokens (bob through the
authorization code + PKCE flow as a person would, carol with client credentials). agent-7 acts
for alice@example.com, so alice may never approve agent-7's requests.
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
from tests.e2e.test_cli import cli
from tests.idp_fixture import TestIdP

StartFn = Callable[[str, int], Process]
API = "/_countersign/api/approvals"


def config(port: int, upstream: str, issuer: str, mode: str = "hold") -> str:
    return f"""
server:
  listen: "127.0.0.1:{port}"
  max_body_bytes: 4096
identity:
  issuers: [{{issuer: "{issuer}", audiences: [countersign]}}]
routes:
  - {{name: cloud, prefix: /cloud/, upstream: "{upstream}"}}
approvals:
  mode: {mode}
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
    - name: iam
      methods: [POST]
      paths: ["/cloud/iam/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
      quorum: 2
    - name: flash
      methods: [POST]
      paths: ["/cloud/flash/**"]
      action: approve
      approvers: {{users: [bob@example.com]}}
      timeout_seconds: 2
"""


class Tokens:
    def __init__(self, idp: TestIdP) -> None:
        self.idp = idp
        self._cache: dict[str, str] = {}

    async def agent(self) -> dict[str, str]:
        return await self._bearer("agent-7", lambda: self.idp.token("agent-7"))

    async def bob(self) -> dict[str, str]:  # a person, through auth code + PKCE
        return await self._bearer("bob", lambda: self.idp.user_token("bob@example.com"))

    async def client(self, name: str) -> dict[str, str]:
        return await self._bearer(name, lambda: self.idp.token(name))

    async def _bearer(self, key: str, fetch: Callable[[], Any]) -> dict[str, str]:
        if key not in self._cache:
            self._cache[key] = await fetch()
        return {"Authorization": f"Bearer {self._cache[key]}"}


@pytest.fixture
async def hold_proxy(run_countersign: StartFn, upstream: TestServer, idp: TestIdP) -> Process:
    port = free_port()
    return run_countersign(config(port, str(upstream.make_url("/")), idp.issuer), port)


async def wait_pending(session: aiohttp.ClientSession, base: str, who: dict[str, str]) -> str:
    for _ in range(100):
        async with session.get(f"{base}{API}?state=pending", headers=who) as resp:
            approvals = (await resp.json())["approvals"]
        if approvals:
            return str(approvals[0]["approval_id"])
        await asyncio.sleep(0.05)
    raise AssertionError("no pending approval")


async def decide_pending(
    base: str, idp: TestIdP, verdict: str, reason: str, wait: float = 20
) -> dict[str, Any]:
    """bob waits for the one pending approval, reads it, decides it; returns it as shown
    before the decision."""
    bob = await Tokens(idp).bob()
    async with aiohttp.ClientSession() as session:
        approval_id = await asyncio.wait_for(wait_pending(session, base, bob), wait)
        async with session.get(f"{base}{API}/{approval_id}", headers=bob) as resp:
            shown: dict[str, Any] = await resp.json()
        status, body = await decide(session, base, approval_id, bob, verdict, reason)
    assert status == 200, body
    return shown


async def decide(
    session: aiohttp.ClientSession,
    base: str,
    approval_id: str,
    who: dict[str, str],
    verdict: str,
    reason: str | None = None,
) -> tuple[int, dict[str, Any]]:
    payload = {"verdict": verdict, **({"reason": reason} if reason is not None else {})}
    async with session.post(
        f"{base}{API}/{approval_id}/decision", json=payload, headers=who
    ) as resp:
        return resp.status, await resp.json()


def post(
    session: aiohttp.ClientSession, url: str, who: dict[str, str], body: Any, **headers: str
) -> asyncio.Task[tuple[int, dict[str, Any], dict[str, str]]]:
    async def call() -> tuple[int, dict[str, Any], dict[str, str]]:
        async with session.post(url, json=body, headers={**who, **headers}) as resp:
            return resp.status, await resp.json(), dict(resp.headers)

    return asyncio.create_task(call())


def audit_events(proc: Process) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout().splitlines() if line.startswith("{")]


async def test_held_export_approved_by_a_person_runs_once_and_is_audited(
    hold_proxy: Process, idp: TestIdP
) -> None:
    tokens = Tokens(idp)
    base = hold_proxy.url
    async with aiohttp.ClientSession() as session:
        call = post(
            session,
            f"{base}/cloud/exports/customers",
            await tokens.agent(),
            {"format": "csv"},
            **{"Countersign-Reason": "Q3 board report"},
        )
        approval_id = await wait_pending(session, base, await tokens.bob())
        async with session.get(f"{base}{API}/{approval_id}", headers=await tokens.bob()) as r:
            shown = await r.json()
        assert shown["requester"]["subject"] == "agent-7"
        assert shown["requester"]["email"] == "agent7@example.com"
        assert shown["requester"]["owner"] == "alice@example.com"
        assert shown["reason"] == "Q3 board report"
        status, body = await decide(
            session, base, approval_id, await tokens.bob(), "approve", "fine for the board"
        )
        assert status == 200 and body["state"] == "approved"
        status, echo, headers = await asyncio.wait_for(call, 10)
        assert status == 200 and headers["Countersign-Approval-Id"] == approval_id
        assert json.loads(echo["body"]) == {"format": "csv"}
    assert hold_proxy.stop() == 0
    events = audit_events(hold_proxy)
    requested = [e for e in events if e["event"] == "approval.requested"]
    decided = [e for e in events if e["event"] == "approval.decided"]
    forwarded = [e for e in events if e["event"] == "request.forwarded"]
    assert [e["approval_id"] for e in requested] == [approval_id]
    assert decided[0]["approver"] == {
        "subject": "bob@example.com",
        "issuer": decided[0]["approver"]["issuer"],
        "email": "bob@example.com",
        "person": "bob@example.com",
    }
    assert (decided[0]["channel"], decided[0]["reason"]) == ("api", "fine for the board")
    assert [e["approval_id"] for e in forwarded] == [approval_id]
    assert forwarded[0]["status"] == 200


async def test_self_approval_and_non_approvers_are_refused(
    hold_proxy: Process, idp: TestIdP
) -> None:
    tokens = Tokens(idp)
    base = hold_proxy.url
    async with aiohttp.ClientSession() as session:
        call = post(session, f"{base}/cloud/exports/x", await tokens.agent(), {"n": 1})
        approval_id = await wait_pending(session, base, await tokens.bob())
        # alice is in data-owners, but agent-7 acts for her: never her call.
        for who, error in (
            (await tokens.client("alice"), "self_approval"),
            (await tokens.agent(), "self_approval"),
            # mallory's credential names no person (no verified email): refused before anything.
            (await tokens.client("mallory"), "approver_unidentified"),
        ):
            status, body = await decide(session, base, approval_id, who, "approve")
            assert (status, body["error"]["code"]) == (403, error)
        status, body = await decide(session, base, approval_id, await tokens.bob(), "deny")
        assert (status, body["error"]["code"]) == (400, "reason_required")
        status, body = await decide(
            session, base, approval_id, await tokens.bob(), "deny", "exports are frozen"
        )
        assert status == 200
        status, body, _ = await asyncio.wait_for(call, 10)
        assert status == 403
        error = body["error"]
        assert error["code"] == "approval_denied"
        assert error["message"].startswith("Denied by bob@example.com: exports are frozen. ")
        assert error["reason"] == "exports are frozen"
        assert error["decided_by"] == "bob@example.com"
        assert error["approval_id"] == approval_id and error["rule"] == "exports"


async def test_quorum_of_two_distinct_people(hold_proxy: Process, idp: TestIdP) -> None:
    tokens = Tokens(idp)
    base = hold_proxy.url
    async with aiohttp.ClientSession() as session:
        call = post(session, f"{base}/cloud/iam/roles", await tokens.agent(), {"role": "admin"})
        approval_id = await wait_pending(session, base, await tokens.bob())
        status, body = await decide(session, base, approval_id, await tokens.bob(), "approve")
        assert status == 200 and body["state"] == "pending"
        # bob again, with his other token (the "bob" client): the same person counts once.
        status, body = await decide(
            session, base, approval_id, await tokens.client("bob"), "approve"
        )
        assert (status, body["error"]["code"]) == (409, "already_approved")
        status, body = await decide(
            session, base, approval_id, await tokens.client("carol"), "approve"
        )
        assert status == 200 and body["state"] == "approved" and body["approvals"] == 2
        status, _, _ = await asyncio.wait_for(call, 10)
        assert status == 200


async def test_expiry_releases_with_403_and_is_audited(hold_proxy: Process, idp: TestIdP) -> None:
    tokens = Tokens(idp)
    async with aiohttp.ClientSession() as session:
        status, body, _ = await asyncio.wait_for(
            post(session, f"{hold_proxy.url}/cloud/flash/now", await tokens.agent(), {}), 10
        )
    error = body["error"]
    assert status == 403 and error["code"] == "approval_expired" and error["rule"] == "flash"
    await asyncio.sleep(0.2)  # the audit batch reaches stdout
    expired = [e for e in audit_events(hold_proxy) if e["event"] == "approval.expired"]
    assert [e["approval_id"] for e in expired] == [error["approval_id"]]


async def test_large_body_is_413_before_an_approval(hold_proxy: Process, idp: TestIdP) -> None:
    tokens = Tokens(idp)
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{hold_proxy.url}/cloud/exports/big", data=b"x" * 5000, headers=await tokens.agent()
        ) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "payload_too_large"
        async with session.get(f"{hold_proxy.url}{API}", headers=await tokens.bob()) as resp:
            assert (await resp.json())["approvals"] == []


async def test_racing_deciders_and_joined_retries(hold_proxy: Process, idp: TestIdP) -> None:
    tokens = Tokens(idp)
    base = hold_proxy.url
    async with aiohttp.ClientSession() as session:
        agent = await tokens.agent()
        first = post(session, f"{base}/cloud/exports/race", agent, {"n": 1})
        approval_id = await wait_pending(session, base, await tokens.bob())
        retry = post(session, f"{base}/cloud/exports/race", agent, {"n": 1})  # joins
        deciders = [await tokens.bob(), await tokens.client("carol")] * 10
        results = await asyncio.gather(
            *(
                decide(session, base, approval_id, who, "approve" if i % 3 else "deny", "race")
                for i, who in enumerate(deciders)
            )
        )
        assert sorted(status for status, _ in results).count(200) == 1
        assert {status for status, _ in results} == {200, 409}
        outcomes = await asyncio.wait_for(asyncio.gather(first, retry), 10)
        winner = next(body for status, body in results if status == 200)
        if winner["state"] == "approved":
            assert sorted(s for s, _, _ in outcomes) == [200, 403]  # one execution
        else:
            assert [b["error"]["code"] for _, b, _ in outcomes] == ["approval_denied"] * 2
    hold_proxy.stop()
    events = audit_events(hold_proxy)
    assert len([e for e in events if e["event"] == "approval.requested"]) == 1
    assert len([e for e in events if e["event"] == "approval.decided"]) == 1
    assert len([e for e in events if e["event"] == "request.forwarded"]) <= 1


async def test_cli_approves_a_held_request(hold_proxy: Process, idp: TestIdP) -> None:
    tokens = Tokens(idp)
    bob = (await tokens.bob())["Authorization"].split()[1]
    env = {"COUNTERSIGN_URL": hold_proxy.url, "COUNTERSIGN_TOKEN": bob}
    async with aiohttp.ClientSession() as session:
        call = post(session, f"{hold_proxy.url}/cloud/exports/cli", await tokens.agent(), {})
        approval_id = await wait_pending(session, hold_proxy.url, await tokens.bob())
        listed = await asyncio.to_thread(cli, "approvals", "list", env=env)
        assert approval_id in listed.stdout and "agent7@example.com" in listed.stdout
        denied = await asyncio.to_thread(cli, "approvals", "deny", approval_id, env=env)
        assert denied.returncode == 2 and "--reason" in denied.stderr  # required
        ok = await asyncio.to_thread(cli, "approvals", "approve", approval_id, env=env)
        assert ok.returncode == 0, ok.stderr
        again = await asyncio.to_thread(cli, "approvals", "approve", approval_id, env=env)
        assert again.returncode == 1 and "409 approval_not_pending" in again.stderr
        status, _, _ = await asyncio.wait_for(call, 10)
        assert status == 200


async def test_async_mode_202_poll_and_resend_once(
    run_countersign: StartFn, upstream: TestServer, idp: TestIdP
) -> None:
    port = free_port()
    proc = run_countersign(config(port, str(upstream.make_url("/")), idp.issuer, "async"), port)
    tokens = Tokens(idp)
    base = proc.url
    agent = await tokens.agent()
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/cloud/exports/a", json={"n": 1}, headers=agent) as resp:
            assert resp.status == 202
            body = await resp.json()
            location = resp.headers["Location"]
        approval_id = body["approval_id"]
        assert (body["state"], location) == ("pending", f"{API}/{approval_id}")
        async with session.get(f"{base}{location}", headers=agent) as resp:
            assert (await resp.json())["state"] == "pending"
        await decide(session, base, approval_id, await tokens.bob(), "approve")
        use = {**agent, "Countersign-Approval": approval_id}
        async with session.post(f"{base}/cloud/exports/a", json={"n": 2}, headers=use) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 403 and error["code"] == "approval_mismatch"
        carol = {**(await tokens.client("carol")), "Countersign-Approval": approval_id}
        async with session.post(f"{base}/cloud/exports/a", json={"n": 1}, headers=carol) as resp:
            assert resp.status == 403  # another caller: not covered
        async with session.post(f"{base}/cloud/exports/a", json={"n": 1}, headers=use) as resp:
            assert resp.status == 200
            assert resp.headers["Countersign-Approval-Id"] == approval_id
        async with session.post(f"{base}/cloud/exports/a", json={"n": 1}, headers=use) as resp:
            assert resp.status == 403 and (await resp.json())["error"]["code"] == "approval_used"
        async with session.get(f"{base}{location}", headers=agent) as resp:
            final = await resp.json()
        assert final["state"] == "executed" and final["upstream_status"] == 200
