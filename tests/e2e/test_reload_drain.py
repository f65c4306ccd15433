"""Reload on SIGHUP (and `countersign reload`), drain on SIGTERM: the real `countersign run`.

A reload swaps routes, policy and identity for the next request while held requests keep theirs
(and their approvals); a bad configuration is refused and the old one stays in force. A drain
answers held requests `503 shutting_down` with `Retry-After`, lets a slow allowed request finish,
flushes the audit and exits 0.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from proxy.authn.apikeys import key_digest
from tests.e2e.conftest import Process, free_port
from tests.e2e.test_cli import cli
from tests.redis_fixture import RedisServer

StartFn = Callable[[str, int], Process]
API = "/_countersign/api/approvals"
AGENT_KEY = "cs_reload_agent_00000000000000000000000000"
ALICE_KEY = "cs_reload_alice_00000000000000000000000000"
AGENT = {"Authorization": f"Bearer {AGENT_KEY}"}
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
SECRET_RULE = """    - {name: secrets, paths: ["/cloud/secret/**"], action: deny}
"""


def config(
    port: int,
    upstream: str,
    *,
    extra_rule: str = "",
    store: str = "memory://",
    server: str = "",
    pid_file: Path | None = None,
) -> str:
    pid = f', pid_file: "{pid_file}"' if pid_file else ""
    return f"""
server: {{listen: "127.0.0.1:{port}"{pid}{server}}}
identity:
  api_keys:
    - {{sha256: "{key_digest(AGENT_KEY)}", subject: agent-7, groups: [agents]}}
    - {{sha256: "{key_digest(ALICE_KEY)}", subject: alice, groups: [data-owners], email: "alice@example.com"}}
store: {{url: "{store}"}}
routes:
  - {{name: cloud, prefix: /cloud/, upstream: "{upstream}"}}
  - {{name: api, prefix: /api/, upstream: "{upstream}"}}
approvals: {{mode: hold, timeout_seconds: 60}}
policy:
  rules:
{extra_rule}    - {{name: reads, methods: [GET], action: allow}}
    - name: exports
      methods: [POST]
      paths: ["/cloud/exports/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
"""


def config_file(proc: Process) -> Path:
    return proc.stdout_path.parent / "countersign.yaml"


def events(proc: Process, name: str) -> list[dict[str, Any]]:
    return [
        event
        for event in (json.loads(line) for line in proc.stdout().splitlines() if line[:1] == "{")
        if event["event"] == name
    ]


def log_lines(proc: Process, name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stderr().splitlines() if f'"{name}"' in line]


async def until(check: Callable[[], bool], within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def status_of(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url, headers=AGENT) as resp:
        return resp.status


async def wait_pending(session: aiohttp.ClientSession, proc: Process) -> str:
    for _ in range(200):
        async with session.get(f"{proc.url}{API}?state=pending", headers=ALICE) as resp:
            found = (await resp.json())["approvals"]
        if found:
            return str(found[0]["approval_id"])
        await asyncio.sleep(0.05)
    raise AssertionError("no pending approval")


def post(
    session: aiohttp.ClientSession, url: str, body: Any
) -> asyncio.Task[tuple[int, dict[str, Any], dict[str, str]]]:
    async def call() -> tuple[int, dict[str, Any], dict[str, str]]:
        async with session.post(url, json=body, headers=AGENT) as resp:
            return resp.status, await resp.json(), dict(resp.headers)

    return asyncio.create_task(call())


async def approve(session: aiohttp.ClientSession, proc: Process, approval_id: str) -> None:
    async with session.post(
        f"{proc.url}{API}/{approval_id}/decision",
        json={"verdict": "approve", "reason": "reload test"},
        headers=ALICE,
    ) as resp:
        assert resp.status == 200, await resp.text()


async def test_sighup_swaps_the_policy_held_requests_keep_theirs_bad_config_refused(
    run_countersign: StartFn, upstream: TestServer
) -> None:
    port = free_port()
    origin = str(upstream.make_url("/"))
    proc = run_countersign(config(port, origin), port)
    path = config_file(proc)
    async with aiohttp.ClientSession() as session:
        held = post(session, f"{proc.url}/cloud/exports/a", {"n": 1})
        approval_id = await wait_pending(session, proc)
        assert await status_of(session, f"{proc.url}/cloud/secret/x") == 200

        path.write_text(config(port, origin, extra_rule=SECRET_RULE))
        proc.proc.send_signal(signal.SIGHUP)
        await until(lambda: bool(events(proc, "config.reloaded")))
        reloaded = events(proc, "config.reloaded")[0]
        assert reloaded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert reloaded["restart_needed"] == []
        assert await status_of(session, f"{proc.url}/cloud/secret/x") == 403

        # The held request, started before the reload, still waits and completes when approved.
        assert not held.done()
        await approve(session, proc, approval_id)
        status, _, headers = await asyncio.wait_for(held, 10)
        assert status == 200
        assert headers["Countersign-Approval-Id"] == approval_id

        # A bad configuration is refused; the running one stays in force.
        path.write_text("policy: [\n")
        proc.proc.send_signal(signal.SIGHUP)
        await until(lambda: bool(log_lines(proc, "config.reload_failed")))
        failed = log_lines(proc, "config.reload_failed")[0]
        assert failed["errors"] and failed["level"] == "error"
        assert proc.proc.poll() is None
        assert await status_of(session, f"{proc.url}/cloud/secret/x") == 403
        assert await status_of(session, f"{proc.url}/cloud/open") == 200

        # A key that cannot change live is applied to nothing and named.
        changed = config(port, origin, extra_rule=SECRET_RULE, server=", max_body_bytes: 4096")
        path.write_text(changed)
        proc.proc.send_signal(signal.SIGHUP)
        await until(lambda: len(events(proc, "config.reloaded")) == 2)
        assert events(proc, "config.reloaded")[1]["restart_needed"] == ["server.max_body_bytes"]
        assert log_lines(proc, "config.reload_partial")
    assert proc.stop() == 0
    assert events(proc, "config.reload_failed")


async def test_countersign_reload_checks_first_then_signals(
    run_countersign: StartFn, upstream: TestServer, tmp_path: Path
) -> None:
    port = free_port()
    origin = str(upstream.make_url("/"))
    pid_file = tmp_path / "countersign.pid"
    proc = run_countersign(config(port, origin, pid_file=pid_file), port)
    path = config_file(proc)
    assert pid_file.read_text().strip() == str(proc.proc.pid)

    path.write_text("routes: [{name: x}]\n")
    result = cli("reload", "-c", str(path))
    assert result.returncode == 2, result.stderr
    assert "routes" in result.stderr
    await asyncio.sleep(0.3)
    assert not log_lines(proc, "config.reload_failed"), "a refused config is not sent"

    path.write_text(config(port, origin, extra_rule=SECRET_RULE, pid_file=pid_file))
    result = cli("reload", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert f"SIGHUP to process {proc.proc.pid}" in result.stdout
    await until(lambda: bool(events(proc, "config.reloaded")))
    async with aiohttp.ClientSession() as session:
        assert await status_of(session, f"{proc.url}/cloud/secret/x") == 403

    result = cli("reload", "-c", str(path), "--pid", str(proc.proc.pid))
    assert result.returncode == 0, result.stderr
    await until(lambda: len(events(proc, "config.reloaded")) == 2)
    assert proc.stop() == 0
    assert not pid_file.exists(), "removed at exit"


async def test_sigterm_drains_held_503_slow_request_finishes_exit_0(
    run_countersign: StartFn, upstream: TestServer
) -> None:
    port = free_port()
    proc = run_countersign(config(port, str(upstream.make_url("/"))), port)
    async with aiohttp.ClientSession() as session:
        held = post(session, f"{proc.url}/cloud/exports/a", {"n": 1})
        approval_id = await wait_pending(session, proc)

        async def slow() -> tuple[int, Any]:
            async with session.get(f"{proc.url}/api/slow", headers=AGENT) as resp:
                return resp.status, await resp.json()

        slow_call = asyncio.create_task(slow())
        # Nothing is audited on arrival (one `request.completed` at the end): give it time to
        # reach the upstream, which answers after 5 s.
        await asyncio.sleep(1.0)
        assert not slow_call.done()
        started = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)

        status, body, headers = await asyncio.wait_for(held, 5)
        assert status == 503 and body["error"]["code"] == "shutting_down", body
        assert headers["Retry-After"] == "5"
        assert time.monotonic() - started < 3, "answered at once, not at the end of the drain"

        # No new connections once draining.
        await asyncio.sleep(0.2)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            pass
        else:
            writer.close()
            raise AssertionError("still accepting connections while draining")

        assert await asyncio.wait_for(slow_call, 10) == (200, {"slow": True})
    code = await asyncio.to_thread(proc.proc.wait, 20)
    assert code == 0, proc.stderr()[-4000:]
    completed = events(proc, "request.completed")
    refused = [e for e in completed if e["error"] == "shutting_down"]
    assert [e["approval_id"] for e in refused] == [approval_id]
    assert [e["status"] for e in refused] == [503]
    assert [e for e in completed if e["path"] == "/api/slow" and e["status"] == 200]
    assert not events(proc, "approval.abandoned"), "the approval is left open for the retry"
    assert log_lines(proc, "server.stopped")


async def test_workers_each_reload_on_sighup(
    run_countersign: StartFn, upstream: TestServer, fresh_redis: RedisServer
) -> None:
    port = free_port()
    origin = str(upstream.make_url("/"))
    prefix = "e2e-" + secrets.token_hex(6)
    store = f'{fresh_redis.url}", key_prefix: "{prefix}'
    proc = run_countersign(config(port, origin, store=store, server=", workers: 2"), port)
    path = config_file(proc)
    await until(lambda: len(log_lines(proc, "server.started")) == 2)
    path.write_text(
        config(port, origin, store=store, server=", workers: 2", extra_rule=SECRET_RULE)
    )
    proc.proc.send_signal(signal.SIGHUP)
    await until(lambda: len(log_lines(proc, "config.reloaded")) == 2)
    assert len({line["pid"] for line in log_lines(proc, "config.reloaded")}) == 2
    async with aiohttp.ClientSession() as session:
        for _ in range(20):  # whichever worker the kernel picks
            async with aiohttp.ClientSession() as fresh:  # a new connection each time
                assert await status_of(fresh, f"{proc.url}/cloud/secret/x") == 403
        assert await status_of(session, f"{proc.url}/cloud/open") == 200
    assert proc.stop() == 0, proc.stderr()[-4000:]
    assert len(events(proc, "config.reloaded")) == 2


async def test_a_route_secret_added_by_sighup_is_redacted_in_the_audit(
    run_countersign: StartFn, upstream: TestServer
) -> None:
    """The reloaded route injects a secret; a request naming it afterwards shows it redacted on
    stdout (audit) and stderr (logs), as the secrets of the starting configuration are."""
    secret = "vaultsecret-" + secrets.token_hex(6)  # no built-in pattern knows it
    port = free_port()
    origin = str(upstream.make_url("/"))
    proc = run_countersign(config(port, origin), port)
    vault = (
        f'  - {{name: vault, prefix: /vault/, upstream: "{origin}", '
        f'inject_headers: {{X-Vault-Token: "Bearer {secret}"}}}}\n'
    )
    text = config(port, origin).replace("approvals:", vault + "approvals:", 1)
    async with aiohttp.ClientSession() as session:
        config_file(proc).write_text(text)
        proc.proc.send_signal(signal.SIGHUP)
        await until(lambda: bool(events(proc, "config.reloaded")))
        async with session.get(f"{proc.url}/vault/{secret}", headers=AGENT) as resp:
            assert resp.status == 200
            assert (await resp.json())["headers"]["x-vault-token"] == f"Bearer {secret}"
    assert proc.stop() == 0
    decided = [e for e in events(proc, "request.completed") if e["path"].startswith("/vault/")]
    assert [e["path"] for e in decided] == ["/vault/[REDACTED]"]
    assert secret not in proc.stdout()
    assert secret not in proc.stderr()
