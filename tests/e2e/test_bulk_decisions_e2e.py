"""A bulk decision end to end: held requests on the real `countersign run`, released by one
`countersign approvals approve --all --rule exports` (the CLI, with a person's token)."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp.test_utils import TestServer

from tests.e2e.conftest import free_port
from tests.e2e.test_approvals_e2e import API, StartFn, Tokens, audit_events, config, post
from tests.e2e.test_cli import cli
from tests.idp_fixture import TestIdP

HELD = 4


async def test_one_cli_call_releases_every_held_request_of_a_rule(
    run_countersign: StartFn, upstream: TestServer, idp: TestIdP
) -> None:
    port = free_port()
    proc = run_countersign(config(port, str(upstream.make_url("/")), idp.issuer), port)
    tokens = Tokens(idp)
    bob = await tokens.bob()
    env = {"COUNTERSIGN_URL": proc.url, "COUNTERSIGN_TOKEN": bob["Authorization"].split()[1]}
    async with aiohttp.ClientSession() as session:
        agent = await tokens.agent()
        calls = [
            post(session, f"{proc.url}/cloud/exports/{n}", agent, {"n": n}) for n in range(HELD)
        ]
        # One of another rule stays held: the filter names only `exports`.
        other = post(session, f"{proc.url}/cloud/iam/roles", agent, {"role": "x"})
        for _ in range(200):
            async with session.get(f"{proc.url}{API}?state=pending", headers=bob) as resp:
                pending = (await resp.json())["approvals"]
            if len(pending) == HELD + 1:
                break
            await asyncio.sleep(0.05)
        exports = {a["approval_id"] for a in pending if a["rule"] == "exports"}
        assert len(exports) == HELD

        usage = await asyncio.to_thread(cli, "approvals", "approve", "--all", env=env)
        assert usage.returncode == 2 and "--rule or --requester" in usage.stderr
        done = await asyncio.to_thread(
            cli, "approvals", "approve", "--all", "--rule", "exports", "--reason", "batch", env=env
        )
        assert done.returncode == 0, done.stderr
        assert f"approved {HELD} approvals ({HELD} now approved)" in done.stdout

        outcomes = await asyncio.wait_for(asyncio.gather(*calls), 20)
        assert [status for status, _, _ in outcomes] == [200] * HELD
        assert {headers["Countersign-Approval-Id"] for _, _, headers in outcomes} == exports
        assert not other.done(), "the iam request is still held"

        denied = await asyncio.to_thread(
            cli, "approvals", "deny", "--all", "--rule", "iam", "--reason", "not now", env=env
        )
        assert denied.returncode == 0, denied.stderr
        assert "denied 1 approval (1 now denied)" in denied.stdout
        status, body, _ = await asyncio.wait_for(other, 20)
        assert status == 403 and body["error"]["code"] == "approval_denied"
    proc.stop()
    decided = [e for e in audit_events(proc) if e["event"] == "approval.decided"]
    assert len(decided) == HELD + 1
    assert {e["approval_id"] for e in decided if e["rule"] == "exports"} == exports
    assert all(e["approver"]["person"] == "bob@example.com" for e in decided)
