"""Receipts through the real `countersign run` (DESIGN §8): an executed approval's signed
statement, served by the API, matching the audit file and what the client received, and checked
by `countersign receipt verify`."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from proxy.audit.receipts import verify_receipt
from proxy.audit.signing import load_public_keys, new_signing_key
from proxy.authn.apikeys import key_digest
from tests.e2e.conftest import Process, free_port
from tests.e2e.test_cli import cli

StartFn = Callable[[str, int], Process]
API = "/_countersign/api/approvals"
AGENT_KEY = "cs_rcpt_agent_000000000000000000000000000"
ALICE_KEY = "cs_rcpt_alice_000000000000000000000000000"
EVE_KEY = "cs_rcpt_eve_00000000000000000000000000000"
AGENT = {"Authorization": f"Bearer {AGENT_KEY}"}
ALICE = {"Authorization": f"Bearer {ALICE_KEY}"}
EVE = {"Authorization": f"Bearer {EVE_KEY}"}
PUBLIC_URL = "https://proxy.example.com"


def config(port: int, upstream: str, audit_file: Path, signing_key: Path | None) -> str:
    key = f'\n  signing_key: "{signing_key}"' if signing_key is not None else ""
    return f"""
server: {{listen: "127.0.0.1:{port}", public_url: "{PUBLIC_URL}"}}
identity:
  api_keys:
    - {{sha256: "{key_digest(AGENT_KEY)}", subject: agent-7, groups: [agents], owner: "carol@example.com"}}
    - {{sha256: "{key_digest(ALICE_KEY)}", subject: alice, groups: [data-owners], email: "alice@example.com"}}
    - {{sha256: "{key_digest(EVE_KEY)}", subject: eve, groups: [others], email: "eve@example.com"}}
routes:
  - {{name: cloud, prefix: /cloud/, upstream: "{upstream}"}}
policy:
  rules:
    - name: downloads
      methods: [GET]
      paths: ["/cloud/download/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
    - name: exports
      methods: [POST]
      paths: ["/cloud/exports/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
audit:
  stdout: false
  file: "{audit_file}"{key}
"""


def keys(tmp_path: Path) -> tuple[Path, Path]:
    key = new_signing_key()
    private, public = tmp_path / "audit-key.pem", tmp_path / "audit-key.pub"
    private.write_bytes(key.private_pem())
    private.chmod(0o600)
    public.write_bytes(key.public_pem())
    return private, public


async def pending_id(session: aiohttp.ClientSession, base: str) -> str:
    for _ in range(200):
        async with session.get(f"{base}{API}?state=pending", headers=ALICE) as resp:
            pending = (await resp.json())["approvals"]
        if pending:
            return str(pending[0]["approval_id"])
        await asyncio.sleep(0.05)
    raise AssertionError("no pending approval")


async def approved_call(
    session: aiohttp.ClientSession, base: str, method: str, path: str, body: Any = None
) -> tuple[str, int, dict[str, str], bytes]:
    """The agent's request, held until alice approves it: (approval id, status, headers, the
    body bytes as received)."""

    async def call() -> tuple[int, dict[str, str], bytes]:
        # auto_decompress off: the bytes exactly as the proxy relayed them.
        async with session.request(method, f"{base}{path}", json=body, headers=AGENT) as resp:
            return resp.status, dict(resp.headers), await resp.read()

    held = asyncio.create_task(call())
    approval_id = await pending_id(session, base)
    async with session.post(
        f"{base}{API}/{approval_id}/decision",
        json={"verdict": "approve", "reason": "ok for the audit"},
        headers=ALICE,
    ) as resp:
        assert resp.status == 200
    status, headers, data = await asyncio.wait_for(held, 20)
    return approval_id, status, headers, data


async def fetch_receipt(
    session: aiohttp.ClientSession, base: str, approval_id: str, who: dict[str, str]
) -> tuple[int, dict[str, str], str]:
    """GET the receipt, following `Retry-After` while it is being issued."""
    for _ in range(50):
        async with session.get(f"{base}{API}/{approval_id}/receipt", headers=who) as resp:
            text = await resp.text()
            if resp.status == 404 and resp.headers.get("Retry-After") == "1":
                await asyncio.sleep(0.1)
                continue
            return resp.status, dict(resp.headers), text
    raise AssertionError("the receipt was never issued")


def audit_lines(audit_file: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in audit_file.read_text().splitlines() if line.strip()]


async def test_an_executed_approval_has_a_receipt_that_verifies(
    run_countersign: StartFn, upstream: TestServer, tmp_path: Path
) -> None:
    private, public = keys(tmp_path)
    audit_file = tmp_path / "audit.jsonl"
    port = free_port()
    proc = run_countersign(config(port, str(upstream.make_url("/")), audit_file, private), port)
    base = proc.url
    public_keys = load_public_keys([public])
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        # A whole (small) answer, and a streamed one.
        approval_id, status, headers, body = await approved_call(
            session, base, "POST", "/cloud/exports/customers", {"format": "csv"}
        )
        assert status == 200 and headers["Countersign-Approval-Id"] == approval_id
        assert headers["Countersign-Receipt"] == f"{PUBLIC_URL}{API}/{approval_id}/receipt"
        download_id, status, headers, download = await approved_call(
            session, base, "GET", "/cloud/download/300000"
        )
        assert status == 200 and download == b"\0" * 300000
        assert headers["Countersign-Receipt"] == f"{PUBLIC_URL}{API}/{download_id}/receipt"

        # The requester fetches it; so may the approver; nobody else learns it exists.
        status, rheaders, token = await fetch_receipt(session, base, approval_id, AGENT)
        assert status == 200, token
        assert rheaders["Content-Type"].startswith("application/jose")
        status, _, same = await fetch_receipt(session, base, approval_id, ALICE)
        assert (status, same) == (200, token)
        status, _, refused = await fetch_receipt(session, base, approval_id, EVE)
        assert status == 404 and json.loads(refused)["error"]["code"] == "approval_not_found"
        async with session.get(f"{base}{API}/{approval_id}/receipt") as resp:
            assert resp.status == 401
        status, _, download_token = await fetch_receipt(session, base, download_id, AGENT)
        assert status == 200

        # A pending approval has none yet.
        waiting = asyncio.create_task(
            session.post(f"{base}/cloud/exports/later", json={"n": 2}, headers=AGENT)
        )
        pending = await pending_id(session, base)
        async with session.get(f"{base}{API}/{pending}/receipt", headers=AGENT) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 404 and "Retry-After" not in resp.headers
        assert error["code"] == "no_receipt" and "not executed yet" in error["message"]
        assert "pending" in error["message"]
        waiting.cancel()

    payload = verify_receipt(token, public_keys)
    assert payload["approval_id"] == approval_id
    assert payload["rule"] == "exports" and payload["status"] == 200
    assert payload["response_sha256"] == hashlib.sha256(body).hexdigest()
    assert payload["response_bytes"] == len(body) and payload["response_complete"] is True
    assert payload["requester"]["subject"] == "agent-7"
    assert payload["requester"]["owner"] == "carol@example.com"
    assert payload["binding"]["method"] == "POST"
    assert payload["binding"]["target"] == "/exports/customers"
    assert payload["binding"]["body_sha256"] == hashlib.sha256(b'{"format": "csv"}').hexdigest()
    [decision] = payload["decisions"]
    assert (decision["verdict"], decision["person"], decision["channel"]) == (
        "approve",
        "alice@example.com",
        "api",
    )
    streamed = verify_receipt(download_token, public_keys)
    assert streamed["response_sha256"] == hashlib.sha256(b"\0" * 300000).hexdigest()
    assert streamed["response_bytes"] == 300000

    # The audit line it cites is the `request.forwarded` of that approval.
    assert proc.stop() == 0
    lines = audit_lines(audit_file)
    for receipt, the_id in ((payload, approval_id), (streamed, download_id)):
        [forwarded] = [
            e for e in lines if e["event"] == "request.forwarded" and e.get("approval_id") == the_id
        ]
        assert receipt["audit"]["seq"] == forwarded["seq"]
        assert receipt["audit"]["hash"] == forwarded["hash"]
    [issued] = [
        e for e in lines if e["event"] == "approval.receipt" and e["approval_id"] == approval_id
    ]
    assert issued["receipt_sha256"] == hashlib.sha256(token.encode()).hexdigest()
    assert issued["key_id"] == next(iter(public_keys))

    # `countersign receipt verify`: 0 valid (and the response file matches), 1 one byte off.
    receipt_file, response_file = tmp_path / "receipt.jws", tmp_path / "response.bin"
    receipt_file.write_text(token)
    response_file.write_bytes(body)
    done = cli(
        "receipt",
        "verify",
        str(receipt_file),
        "--public-key",
        str(public),
        "--response",
        str(response_file),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"VALID: receipt for approval {approval_id}" in done.stdout
    assert "alice@example.com" in done.stdout and "matches response_sha256" in done.stdout
    middle = len(token) // 2
    flipped = "A" if token[middle] != "A" else "B"
    receipt_file.write_text(token[:middle] + flipped + token[middle + 1 :])
    done = cli("receipt", "verify", str(receipt_file), "--public-key", str(public))
    assert done.returncode == 1 and done.stdout.startswith("INVALID: "), done.stdout


async def test_without_a_signing_key_there_are_no_receipts(
    run_countersign: StartFn, upstream: TestServer, tmp_path: Path
) -> None:
    audit_file = tmp_path / "audit.jsonl"
    port = free_port()
    proc = run_countersign(config(port, str(upstream.make_url("/")), audit_file, None), port)
    async with aiohttp.ClientSession() as session:
        approval_id, status, headers, _ = await approved_call(
            session, proc.url, "POST", "/cloud/exports/x", {"n": 1}
        )
        assert status == 200 and "Countersign-Receipt" not in headers
        async with session.get(f"{proc.url}{API}/{approval_id}/receipt", headers=AGENT) as resp:
            error = (await resp.json())["error"]
            assert resp.status == 404 and "Retry-After" not in resp.headers
    assert error["code"] == "no_receipt" and "audit.signing_key" in error["message"]
    assert proc.stop() == 0
    assert not [e for e in audit_lines(audit_file) if e["event"] == "approval.receipt"]


def test_a_signing_key_that_cannot_be_used_stops_the_start_up(
    upstream: TestServer, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    path = tmp_path / "countersign.yaml"
    path.write_text(config(free_port(), str(upstream.make_url("/")), tmp_path / "a.jsonl", bad))
    done = cli("run", "-c", str(path))
    assert done.returncode == 1
    [line] = done.stderr.splitlines()  # one clear line, no traceback
    assert json.loads(line)["event"] == "server.start_failed" and str(bad) in line
    checked = cli("check", "-c", str(path))
    assert checked.returncode == 2 and "audit.signing_key" in checked.stderr
