"""A reload adds the new configuration's secrets to the one redactor every channel uses: a route
secret that arrives by reload is redacted from audit events and from what approvers see."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from proxy.app import RELOADER, build_app, build_redactor
from proxy.audit import AuditLog
from proxy.authn.apikeys import key_digest
from proxy.config import load_settings_text
from tests.helpers import AGENT_KEY, ALICE_KEY, ListSink, bearer

AGENT = bearer(AGENT_KEY)
ALICE = bearer(ALICE_KEY)
NEW_SECRET = "vaultsecret-5d2c9e71"  # no built-in pattern knows it: only the config does
VAULT_ROUTE = """  - name: vault
    prefix: /vault/
    upstream: "{upstream}"
    inject_headers: {{X-Vault-Token: "Bearer {secret}"}}
"""


def config(upstream: str, extra_route: str = "") -> str:
    return f"""
server: {{listen: "127.0.0.1:0"}}
identity:
  api_keys:
    - {{sha256: "{key_digest(AGENT_KEY)}", subject: agent-key, groups: [agents]}}
    - {{sha256: "{key_digest(ALICE_KEY)}", subject: alice, groups: [data-owners], email: "alice@example.com"}}
routes:
  - {{name: cloud, prefix: /cloud/, upstream: "{upstream}"}}
{extra_route}approvals: {{mode: hold, timeout_seconds: 60}}
policy:
  rules:
    - {{name: reads, methods: [GET], action: allow}}
    - name: exports
      methods: [POST]
      paths: ["/*/exports/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
"""


def mentions(sink: ListSink, text: str) -> list[dict[str, Any]]:
    return [event for event in sink.events if text in str(event)]


async def test_a_secret_added_by_reload_is_redacted_in_audit_and_approvals(
    upstream: TestServer, tmp_path: Path
) -> None:
    origin = str(upstream.make_url("/"))
    path = tmp_path / "countersign.yaml"
    path.write_text(config(origin))
    settings = load_settings_text(path.read_text(), str(path), env={})
    redactor = build_redactor(settings)
    sink = ListSink()
    app = build_app(settings, audit_log=AuditLog([sink], redactor), redactor=redactor)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        # Before the reload the value is nobody's secret: shown as it is.
        assert (await client.get(f"/cloud/{NEW_SECRET}", headers=AGENT)).status == 200
        await asyncio.sleep(0.1)
        assert mentions(sink, NEW_SECRET)

        path.write_text(config(origin, VAULT_ROUTE.format(upstream=origin, secret=NEW_SECRET)))
        assert await app[RELOADER].reload(str(path))
        sink.events.clear()

        resp = await client.get(f"/vault/{NEW_SECRET}", headers=AGENT)
        assert resp.status == 200
        assert (await resp.json())["headers"]["x-vault-token"] == f"Bearer {NEW_SECRET}"
        held = asyncio.create_task(
            client.post(f"/vault/exports/{NEW_SECRET}?copy={NEW_SECRET}", json={}, headers=AGENT)
        )
        approval: dict[str, Any] = {}
        for _ in range(100):
            resp = await client.get("/_countersign/api/approvals?state=pending", headers=ALICE)
            listed = (await resp.json())["approvals"]
            if listed:
                approval = listed[0]
                break
            await asyncio.sleep(0.05)
        assert approval, "no pending approval"
        assert NEW_SECRET not in str(approval)
        assert approval["path"] == "/vault/exports/[REDACTED]"
        held.cancel()
        await asyncio.sleep(0.1)
        assert sink.named("request.completed")
        assert not mentions(sink, NEW_SECRET)
        assert "[REDACTED]" in str(sink.named("request.completed"))
    finally:
        await client.close()
