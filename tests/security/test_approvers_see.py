"""Attack: make the approver judge something other than what will run.

Duplicate JSON keys (a parser that keeps the first shows `1`, the upstream keeps the last and
moves a million), a body long enough to push the interesting part out of a preview, a secret in a
header. The approver must see the raw text (never a re-serialized document), where it is cut,
every bound header with secrets marked, and be able to fetch the exact bytes (DESIGN §2, What
approvers see).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import subprocess

import aiohttp

from tests.e2e.conftest import COUNTERSIGN
from tests.security.conftest import (
    API,
    ASYNC,
    WAIT,
    Recorder,
    StartProxy,
    Tokens,
    decide,
    get_approval,
    send,
    start,
    wait_pending,
)

API_KEY_SECRET = "secret-4f9a8b7c6d5e4f3a2b1c"
PASSWORD = "hunter2"
FILLER = "The quarterly export covers every customer of the EU region. " * 80  # ~5 KiB
BODY = (
    '{"amount": 1, "amount": 1000000, "currency": "EUR", '
    f'"password": "{PASSWORD}", "memo": "{FILLER}", "to": "IBAN DE00 1234"}}'
).encode()
HEADERS = {
    "Content-Type": "application/json",
    "X-Api-Key": API_KEY_SECRET,
    "X-Env": "prod",
}


def header_entry(shown: dict[str, object], name: str) -> dict[str, object]:
    headers = shown["headers"]
    assert isinstance(headers, list)
    found = [h for h in headers if str(h["name"]).lower() == name.lower()]
    assert len(found) == 1, (name, headers)
    entry: dict[str, object] = found[0]
    return entry


async def test_approver_sees_raw_text_cut_marker_headers_and_exact_body(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    assert len(BODY) > 4096
    proc = start_proxy()
    agent = await tokens("agent-7")
    call = start(
        session,
        "POST",
        f"{proc.url}/cloud/exports/transfer?x=1&y=2",
        headers={**agent, **HEADERS, "Countersign-Reason": "monthly payout"},
        data=BODY,
    )
    bob = await tokens("bob")
    [pending] = await wait_pending(session, proc.url, bob)
    approval_id = pending["approval_id"]
    shown = await get_approval(session, proc.url, bob, approval_id)
    dump = json.dumps(shown)

    # The raw text: both `amount` keys, in their order, not re-serialized.
    preview = shown["body_preview"]
    assert '"amount": 1, "amount": 1000000' in preview, preview[:300]
    assert preview.startswith('{"amount": 1, "amount": 1000000, "currency": "EUR", ')
    # Cut, and saying so in the preview itself.
    assert shown["body_truncated"] is True
    assert shown["body_bytes"] == len(BODY)
    raw = BODY.decode()
    common = 0
    while common < min(len(raw), len(preview)) and raw[common] == preview[common]:
        common += 1
    tail = preview[common:]
    assert 'to": "IBAN' not in preview  # the end of the body is beyond the cut
    assert "cut" in tail.lower() or "truncat" in tail.lower(), tail[-200:]
    # No secret value in what approvers are shown.
    assert PASSWORD not in dump, preview[:200]
    assert API_KEY_SECRET not in dump
    # The rest of what will run.
    assert shown["method"] == "POST"
    assert shown["target"] == "/exports/transfer?x=1&y=2"
    assert shown["upstream_url"] == recorder.url.rstrip("/") + "/exports/transfer?x=1&y=2"
    assert shown["owner"] == "alice@example.com"
    assert shown["requester"]["subject"] == "agent-7"
    assert shown["rule"] == "exports" and shown["route"] == "cloud"
    assert isinstance(shown["actions"], list)
    assert shown["reason"] == "monthly payout"
    api_key = header_entry(shown, "X-Api-Key")
    assert api_key["redacted"] is True and API_KEY_SECRET not in str(api_key["value"])
    assert header_entry(shown, "X-Env") == {"name": "x-env", "value": "prod", "redacted": False}
    assert header_entry(shown, "Content-Type")["value"] == "application/json"
    names = {str(h["name"]).lower() for h in shown["headers"]}
    assert not names & {"authorization", "countersign-reason", "content-length", "host"}

    # The exact bytes, for approvers.
    async with session.get(f"{proc.url}{API}/{approval_id}/body", headers=bob) as resp:
        assert resp.status == 200
        exact = await resp.read()
    assert exact == BODY
    assert hashlib.sha256(exact).hexdigest() == shown["body_sha256"]
    # ... and for nobody else.
    async with session.get(
        f"{proc.url}{API}/{approval_id}/body", headers=await tokens("mallory")
    ) as resp:
        assert resp.status == 404
    assert recorder.requests == []

    # What runs is what was shown.
    approved = await decide(session, proc.url, approval_id, bob, "approve")
    assert approved.status == 200, str(approved)
    reply = await asyncio.wait_for(call, 10)
    assert reply.status == 200, str(reply)
    await asyncio.sleep(0.2)
    [ran] = recorder.requests
    assert ran.body == BODY and hashlib.sha256(ran.body).hexdigest() == shown["body_sha256"]
    assert ran.target == shown["target"]
    assert ran.header("X-Env") == "prod" and ran.header("X-Api-Key") == API_KEY_SECRET
    assert ran.header("Countersign-Reason") is None


def cli_bytes(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [COUNTERSIGN, *args], capture_output=True, timeout=15, env={**os.environ, **env}
    )


async def test_cli_show_body_prints_the_exact_bytes(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy()
    agent = await tokens("agent-7")
    held = await send(
        session,
        "POST",
        f"{proc.url}/cloud/exports/transfer",
        headers={**agent, **HEADERS, **ASYNC},
        data=BODY,
    )
    assert held.status == 202, str(held)
    approval_id = held.json()["approval_id"]
    bob = (await tokens("bob"))["Authorization"].split()[1]
    env = {"COUNTERSIGN_URL": proc.url, "COUNTERSIGN_TOKEN": bob}
    result = await asyncio.to_thread(cli_bytes, "approvals", "show", approval_id, "--body", env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == BODY
    assert recorder.requests == []


async def test_cli_show_does_not_let_the_body_rewrite_the_terminal(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    """`countersign approvals show` prints the preview to an approver's terminal: control
    characters from the agent's body (ESC sequences, a carriage return) must not reach it raw,
    or the body can erase what it says and print something harmless in its place."""
    proc = start_proxy()
    spoof = (
        b'{"amount": 1000000, "to": "attacker"}'
        b"\r\x1b[2K\x1b[1A\x1b[2K"  # back to the line start, erase, up one line, erase
        b'  body:      {"amount": 1, "to": "savings"}'
    )
    held = await send(
        session,
        "POST",
        f"{proc.url}/cloud/exports/transfer",
        headers={**(await tokens("agent-7")), "Content-Type": "text/plain", **ASYNC},
        data=spoof,
    )
    assert held.status == 202, str(held)
    approval_id = held.json()["approval_id"]
    bob = (await tokens("bob"))["Authorization"].split()[1]
    env = {"COUNTERSIGN_URL": proc.url, "COUNTERSIGN_TOKEN": bob}
    result = await asyncio.to_thread(cli_bytes, "approvals", "show", approval_id, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert b"1000000" in result.stdout
    assert b"\x1b" not in result.stdout, result.stdout
    assert b"\r" not in result.stdout, result.stdout
    assert recorder.requests == []


async def test_a_compressed_body_runs_exactly_as_approved(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    """The approval binds the bytes as sent (gzip), approvers can download those very bytes, and
    the upstream gets them with their Content-Encoding: nothing is decompressed on the way."""
    compressed = gzip.compress(b'{"format": "csv", "rows": "all"}')
    proc = start_proxy()
    agent = await tokens("agent-7")
    headers = {**agent, "Content-Type": "application/json", "Content-Encoding": "gzip"}
    call = start(session, "POST", f"{proc.url}/cloud/exports/gz", headers=headers, data=compressed)
    bob = await tokens("bob")
    [pending] = await wait_pending(session, proc.url, bob)
    shown = await get_approval(session, proc.url, bob, pending["approval_id"])
    assert shown["body_sha256"] == hashlib.sha256(compressed).hexdigest()
    assert header_entry(shown, "content-encoding")["value"] == "gzip"
    assert not recorder.requests
    reply = await decide(session, proc.url, pending["approval_id"], bob, "approve")
    assert reply.status == 200, str(reply)
    done = await asyncio.wait_for(call, WAIT)
    assert done.status == 200, str(done)
    [seen] = await recorder.wait_for(1)
    assert seen.body == compressed
    assert seen.header("Content-Encoding") == "gzip"
