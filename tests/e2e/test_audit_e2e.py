"""The audit trail of the real `countersign run`: crash safety and redaction on every channel."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from proxy.audit.chain import verify_files
from proxy.audit.file_sink import rotated_files
from proxy.authn.apikeys import key_digest
from tests.e2e.conftest import Process, free_port

StartFn = Callable[[str, int], Process]
API = "/_countersign/api/approvals"
AGENT_KEY = "cs_audit_agent_00000000000000000000000000"
ALICE_KEY = "cs_audit_alice_00000000000000000000000000"
AGENT = {"Authorization": f"Bearer {AGENT_KEY}"}
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
UPSTREAM_SECRET = "upstream-credential-7f3a9c"

# One of each kind of secret the redaction must catch.
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhZ2VudCJ9.c2lnbmF0dXJlLXZhbHVl"
SLACK = "xoxb-123456789012-abcdefABCDEF"
AWS = "AKIAIOSFODNN7EXAMPLE"
PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA\n-----END RSA PRIVATE KEY-----"
CUSTOM = "ACME-998877"  # matched by a configured pattern
SECRETS = [JWT, SLACK, AWS, "MIIEpAIBAAKCAQEA", CUSTOM, UPSTREAM_SECRET, "hunter2", "123-45-6789"]


def config(port: int, upstream: str, audit_file: Path) -> str:
    return f"""
server: {{listen: "127.0.0.1:{port}"}}
identity:
  api_keys:
    - {{sha256: "{key_digest(AGENT_KEY)}", subject: agent-7, groups: [agents], owner: "carol@example.com"}}
    - {{sha256: "{key_digest(ALICE_KEY)}", subject: alice, groups: [data-owners], email: "alice@example.com"}}
routes:
  - name: cloud
    prefix: /cloud/
    upstream: "{upstream}"
    inject_headers: {{Authorization: "Bearer {UPSTREAM_SECRET}"}}
policy:
  rules:
    - {{name: reads, methods: [GET], action: allow}}
    - name: exports
      methods: [POST]
      paths: ["/cloud/exports/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
audit:
  stdout: true
  file: "{audit_file}"
  commit_interval_ms: 1000
  redact: {{patterns: ["ACME-[0-9]{{6}}"], fields: [ssn]}}
"""


async def held_and_approved(
    session: aiohttp.ClientSession, base: str, body: Any, **headers: str
) -> tuple[str, int]:
    async def call() -> int:
        async with session.post(
            f"{base}/cloud/exports/crash", json=body, headers={**AGENT, **headers}
        ) as resp:
            return resp.status

    held = asyncio.create_task(call())
    for _ in range(100):
        async with session.get(f"{base}{API}?state=pending", headers=ALICE) as resp:
            pending = (await resp.json())["approvals"]
        if pending:
            break
        await asyncio.sleep(0.05)
    approval_id = pending[0]["approval_id"]
    async with session.post(
        f"{base}{API}/{approval_id}/decision",
        json={"verdict": "approve", "reason": "ok"},
        headers=ALICE,
    ) as resp:
        assert resp.status == 200
    return approval_id, await asyncio.wait_for(held, 10)


async def test_kill_9_never_loses_a_decision(
    run_countersign: StartFn, upstream: TestServer, tmp_path: Path
) -> None:
    audit_file = tmp_path / "audit" / "audit.jsonl"
    port = free_port()
    proc = run_countersign(config(port, str(upstream.make_url("/")), audit_file), port)
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.get(f"{proc.url}/cloud/buckets", headers=AGENT) as resp:
                assert resp.status == 200
        approval_id, status = await held_and_approved(session, proc.url, {"n": 1})
        assert status == 200
        for _ in range(5):  # pass-through after the decision: may be lost with the last batch
            async with session.get(f"{proc.url}/cloud/buckets", headers=AGENT) as resp:
                assert resp.status == 200
    proc.proc.send_signal(signal.SIGKILL)
    proc.proc.wait()

    report = verify_files([audit_file])
    assert report.ok, report.problem
    events = [json.loads(line) for line in audit_file.read_text().splitlines() if line.strip()]
    # Its step events are durable; its `request.completed` is group-committed like any other.
    mine = [
        e
        for e in events
        if e.get("approval_id") == approval_id and e["event"] != "request.completed"
    ]
    assert [e["event"] for e in mine] == [
        "approval.requested",
        "approval.decided",
        "request.forwarded",
    ], "every step of the privileged action survived the crash"
    assert mine[-1]["outcome"] == "completed" and mine[-1]["status"] == 200

    # The next run continues the same chain.
    port = free_port()
    proc = run_countersign(config(port, str(upstream.make_url("/")), audit_file), port)
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proc.url}/cloud/buckets", headers=AGENT) as resp,
    ):
        assert resp.status == 200
    assert proc.stop() == 0
    report = verify_files([*rotated_files(audit_file), audit_file])
    assert report.ok and report.first_seq == 1


async def test_secrets_never_come_out_of_any_channel(
    run_countersign: StartFn, upstream: TestServer, tmp_path: Path
) -> None:
    audit_file = tmp_path / "audit.jsonl"
    port = free_port()
    proc = run_countersign(config(port, str(upstream.make_url("/")), audit_file), port)
    reason = f"export for {CUSTOM} using {JWT} and {AWS} {SLACK}"
    body = {"password": "hunter2", "ssn": "123-45-6789", "note": PEM, "token": JWT}
    async with aiohttp.ClientSession() as session:
        # Secrets in the path, the reason header, the body and the credential header.
        async with session.get(
            f"{proc.url}/cloud/buckets/{AWS}", headers={**AGENT, "Cookie": "session=hunter2"}
        ) as resp:
            assert resp.status == 200
        async with session.get(
            f"{proc.url}/cloud/x", headers={"Authorization": f"Bearer {JWT}"}
        ) as resp:
            assert resp.status == 401
        approval_id, status = await held_and_approved(
            session, proc.url, body, **{"Countersign-Reason": reason}
        )
        assert status == 200
        # The approvals API (what approvers see) is a channel too.
        async with session.get(f"{proc.url}{API}/{approval_id}", headers=ALICE) as resp:
            shown = await resp.text()
        async with session.get(f"{proc.url}{API}?state=executed", headers=ALICE) as resp:
            listed = await resp.text()
    assert proc.stop() == 0
    channels = {
        "stdout audit": proc.stdout(),
        "stderr logs": proc.stderr(),
        "audit file": audit_file.read_text(),
        "approval API": shown,
        "approval list": listed,
    }
    assert "[REDACTED]" in channels["approval API"]
    for name, text in channels.items():
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} leaked through the {name}"
    assert verify_files([audit_file]).ok
