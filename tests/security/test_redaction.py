"""Attack: leak an agent's secrets through Countersign's own outputs.

A held request carries secrets in its query, its form body and the agent's reason; none may
show in the audit (stdout), the operational log (stderr), the approvals API or the webhook
payloads, while the harmless parts stay visible to approvers (DESIGN §8: secrets are redacted
everywhere they could show).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import aiohttp

from tests.security.conftest import (
    API,
    Recorder,
    StartProxy,
    Tokens,
    decide,
    start,
    wait_audit,
    wait_pending,
)

OPENAI_KEY = "sk-proj-" + "A1b2C3d4E5" * 4  # 40 characters after the prefix
PASSWORD = "hunter2"
GITHUB_TOKEN = "ghp_" + "Zz9Yy8Xx7W" * 3 + "v6Uu5T"  # 36 characters after the prefix
SECRETS = (OPENAI_KEY, PASSWORD, GITHUB_TOKEN)
WEBHOOK_SECRET = "webhook-signing-secret-0123456789"


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


async def test_secrets_never_show_in_audit_logs_api_or_webhooks(
    start_proxy: StartProxy,
    recorder: Recorder,
    webhook_receiver: Recorder,
    tokens: Tokens,
    session: aiohttp.ClientSession,
) -> None:
    assert len(OPENAI_KEY) == 48 and len(GITHUB_TOKEN) == 40
    proc = start_proxy(webhooks=[{"url": webhook_receiver.url + "hooks", "secret": WEBHOOK_SECRET}])
    target = f"/cloud/exports/report?api_key={OPENAI_KEY}&page=2"
    call = start(
        session,
        "POST",
        proc.url + target,
        headers={
            **(await tokens("agent-7")),
            "Content-Type": "application/x-www-form-urlencoded",
            "Countersign-Reason": f"use key {GITHUB_TOKEN} please",
        },
        data=f"password={PASSWORD}&user=x".encode(),
    )
    bob = await tokens("bob")
    [pending] = await wait_pending(session, proc.url, bob)
    approval_id = pending["approval_id"]

    # The approvals API: list and show.
    shown_texts = [json.dumps(pending)]
    async with session.get(f"{proc.url}{API}/{approval_id}", headers=bob) as resp:
        shown_texts.append(await resp.text())
    async with session.get(f"{proc.url}{API}/{approval_id}", headers=await tokens("agent-7")) as r:
        shown_texts.append(await r.text())  # the requester's own view
    for text in shown_texts:
        assert leaks(text) == [], text
    shown = json.loads(shown_texts[1])
    assert "page=2" in shown["query"] and "page=2" in shown["target"]
    assert "page=2" in shown["upstream_url"]
    assert "api_key=" in shown["query"]  # the name stays, its value is gone
    assert "user=x" in shown["body_preview"] and "password=" in shown["body_preview"]
    assert shown["reason"] is not None and "please" in shown["reason"]

    denied = await decide(session, proc.url, approval_id, bob, "deny", "no keys in reasons")
    assert denied.status == 200, str(denied)
    assert leaks(denied.body.decode()) == []
    reply = await asyncio.wait_for(call, 10)
    assert (reply.status, reply.code) == (403, "approval_denied"), str(reply)
    assert leaks(reply.body.decode()) == []

    # Webhooks: requested and decided, each signed over the exact bytes.
    hooks = await webhook_receiver.wait_for(2)
    events = [h.header("X-Countersign-Event") for h in hooks]
    assert {"approval.requested", "approval.decided"} <= set(events), events
    for hook in hooks:
        assert leaks(hook.body.decode()) == [], hook.body[:2000]
        stamp = hook.header("X-Countersign-Timestamp")
        assert stamp is not None and abs(int(stamp) - time.time()) < 60
        mac = hmac.new(WEBHOOK_SECRET.encode(), stamp.encode() + b"." + hook.body, hashlib.sha256)
        assert hook.header("X-Countersign-Signature") == "v1=" + mac.hexdigest()
        payload = hook.json()
        assert payload["approval"]["approval_id"] == approval_id
        assert "page=2" in payload["approval"]["query"]
        assert WEBHOOK_SECRET not in hook.body.decode()

    # Audit (stdout) and operational log (stderr), once everything is flushed.
    await wait_audit(proc, "approval.decided", approval_id=approval_id)
    assert proc.stop() == 0
    stdout, stderr = proc.stdout(), proc.stderr()
    assert f'"approval_id": "{approval_id}"' in stdout or approval_id in stdout
    assert leaks(stdout) == [], [line for line in stdout.splitlines() if leaks(line)][:3]
    assert leaks(stderr) == [], [line for line in stderr.splitlines() if leaks(line)][:3]
    assert "page=2" in stdout  # the query is audited, minus its secret
    assert recorder.requests == []


async def test_secrets_in_other_shapes_are_redacted_too(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    """Encoded names, nested JSON text, credentials in a bound header, free-text reasons."""
    hidden = {
        "query": "Q9w8e7r6t5y4u3i2o1p0",
        "json": "correct-horse-battery-staple",
        "nested": "zzz-nested-secret-value-9",
        "header": "hdr0bearer1value2secret3",
        "reason": "opensesame42xyz",
    }
    proc = start_proxy()
    call = start(
        session,
        "POST",
        f"{proc.url}/cloud/exports/shapes?API%5FKEY={hidden['query']}&page=3",
        headers={
            **(await tokens("agent-7")),
            "Content-Type": "application/json",
            "X-Upstream-Authorization": f"Bearer {hidden['header']}",
            "Countersign-Reason": f"my password is: {hidden['reason']} ok",
        },
        data=json.dumps(
            {
                "db_password": hidden["json"],
                "config": json.dumps({"api_key": hidden["nested"]}),
                "rows": 10,
            }
        ).encode(),
    )
    bob = await tokens("bob")
    [pending] = await wait_pending(session, proc.url, bob)
    approval_id = pending["approval_id"]
    async with session.get(f"{proc.url}{API}/{approval_id}", headers=bob) as resp:
        shown_text = await resp.text()
    shown = json.loads(shown_text)
    assert [k for k, v in hidden.items() if v in shown_text] == [], shown_text
    assert "page=3" in shown["query"] and '"rows": 10' in shown["body_preview"]
    header = [h for h in shown["headers"] if h["name"].lower() == "x-upstream-authorization"]
    assert header and header[0]["redacted"] is True, header

    await decide(session, proc.url, approval_id, bob, "deny", "no")
    reply = await asyncio.wait_for(call, 10)
    assert (reply.status, reply.code) == (403, "approval_denied"), str(reply)
    await wait_audit(proc, "approval.decided", approval_id=approval_id)
    proc.stop()
    for name, text in (("stdout", proc.stdout()), ("stderr", proc.stderr())):
        found = [k for k, v in hidden.items() if v in text]
        assert found == [], (name, found)
    assert recorder.requests == []
