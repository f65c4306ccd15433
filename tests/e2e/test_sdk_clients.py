"""The clients agents really use, against the real `countersign run` process: the official
`openai` Python SDK and raw `httpx`, through a route to a fake OpenAI-compatible upstream.

The SDK and httpx are pinned in the test extras; nothing here is mocked but the upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import Process, free_port
from tests.e2e.test_approvals_e2e import API, decide_pending
from tests.idp_fixture import TestIdP
from tests.openai_upstream import COMPLETION, OpenAIUpstream, openai_upstream

StartFn = Callable[[str, int], Process]
WAIT = 15  # seconds: the bound on every wait in this file
DENIAL = "Denied by bob@example.com: not this quarter"


def config(port: int, upstream_v1: str, issuer: str) -> str:
    # strip_prefix (default): /openai/chat/completions → {upstream}/v1/chat/completions
    return f"""
server:
  listen: "127.0.0.1:{port}"
identity:
  issuers: [{{issuer: "{issuer}", audiences: [countersign]}}]
routes:
  - {{name: openai, prefix: /openai/, upstream: "{upstream_v1}"}}
approvals:
  timeout_seconds: 60
policy:
  rules:
    - {{name: reads, methods: [GET], action: allow}}
    - {{name: chat, methods: [POST], paths: ["/openai/chat/completions"], action: allow}}
    - name: delete-model
      route: openai
      methods: [DELETE]
      paths: ["/openai/models/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
"""


@pytest.fixture
async def fake_openai() -> AsyncIterator[OpenAIUpstream]:
    async with openai_upstream() as upstream:
        yield upstream


@pytest.fixture
async def proxy(run_countersign: StartFn, fake_openai: OpenAIUpstream, idp: TestIdP) -> Process:
    port = free_port()
    return run_countersign(config(port, fake_openai.v1, idp.issuer), port)


async def sdk_client(proxy: Process, idp: TestIdP) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{proxy.url}/openai",
        api_key=await idp.token("agent-7"),
        timeout=httpx.Timeout(30, connect=5),
        max_retries=0,
    )


async def decide_when_pending(proxy: Process, idp: TestIdP, verdict: str, reason: str) -> str:
    """bob waits for the one pending approval and decides it; returns its id."""
    shown = await decide_pending(proxy.url, idp, verdict, reason, WAIT)
    return str(shown["approval_id"])


async def test_openai_sdk_allowed_chat_completion(
    proxy: Process, idp: TestIdP, fake_openai: OpenAIUpstream
) -> None:
    async with await sdk_client(proxy, idp) as client:
        completion = await asyncio.wait_for(
            client.chat.completions.create(
                model="gpt-test-1", messages=[{"role": "user", "content": "hi"}]
            ),
            WAIT,
        )
    assert completion.model_dump(exclude_unset=True) == COMPLETION
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    [seen] = fake_openai.requests
    assert (seen.method, seen.path) == ("POST", "/v1/chat/completions")
    assert "authorization" not in seen.headers  # the agent's token is Countersign's, not theirs


async def test_openai_sdk_held_delete_runs_once_approved(
    proxy: Process, idp: TestIdP, fake_openai: OpenAIUpstream
) -> None:
    async with await sdk_client(proxy, idp) as client:
        call = asyncio.create_task(client.models.delete("ft-x"))
        await decide_when_pending(proxy, idp, "approve", "old fine-tune")
        deleted = await asyncio.wait_for(call, WAIT)
    assert deleted.deleted is True and deleted.id == "ft-x"
    assert [(r.method, r.path) for r in fake_openai.requests] == [("DELETE", "/v1/models/ft-x")]


async def test_openai_sdk_denial_is_a_permission_denied_error(
    proxy: Process, idp: TestIdP, fake_openai: OpenAIUpstream
) -> None:
    async with await sdk_client(proxy, idp) as client:
        call = asyncio.create_task(client.models.delete("ft-x"))
        approval_id = await decide_when_pending(proxy, idp, "deny", "not this quarter")
        with pytest.raises(openai.PermissionDeniedError) as caught:
            await asyncio.wait_for(call, WAIT)
    e = caught.value
    assert e.status_code == 403
    # The SDK unwraps `error`: e.body is the inner object, and e.code / e.message come from it.
    assert isinstance(e.body, dict)
    assert e.body["code"] == "approval_denied" and e.code == "approval_denied"
    assert e.body["approval_id"] == approval_id and e.body["reason"] == "not this quarter"
    # openai 3.57 puts error.message in the exception text; str(e) prints exactly:
    # Error code: 403 - Denied by bob@example.com: not this quarter. Do not retry this request;
    # it will be denied again unless something changes.
    assert str(e) == e.message
    assert str(e).startswith(f"Error code: 403 - {DENIAL}. ")
    assert e.body["message"] in str(e)
    assert fake_openai.requests == []


async def httpx_client(proxy: Process, idp: TestIdP) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=proxy.url,
        headers={"Authorization": f"Bearer {await idp.token('agent-7')}"},
        timeout=httpx.Timeout(30, connect=5),
    )


async def test_httpx_held_then_approved_and_held_then_denied(
    proxy: Process, idp: TestIdP, fake_openai: OpenAIUpstream
) -> None:
    async with await httpx_client(proxy, idp) as client:
        call = asyncio.create_task(client.delete("/openai/models/ft-a"))
        approval_id = await decide_when_pending(proxy, idp, "approve", "fine")
        resp = await asyncio.wait_for(call, WAIT)
        assert resp.status_code == 200
        assert resp.json() == {"id": "ft-a", "object": "model", "deleted": True}
        assert resp.headers["Countersign-Approval-Id"] == approval_id
        assert resp.headers["X-Request-Id"] == "req_upstream_1"

        call = asyncio.create_task(client.delete("/openai/models/ft-b"))
        await decide_when_pending(proxy, idp, "deny", "not this quarter")
        resp = await asyncio.wait_for(call, WAIT)
    assert resp.status_code == 403
    assert resp.headers["Content-Type"].startswith("application/json")
    error: dict[str, Any] = resp.json()["error"]
    assert error["code"] == "approval_denied"
    assert error["message"].startswith(DENIAL)
    assert [r.path for r in fake_openai.requests] == ["/v1/models/ft-a"]


async def test_httpx_respond_async_then_resend_with_the_approval(
    proxy: Process, idp: TestIdP, fake_openai: OpenAIUpstream
) -> None:
    async with await httpx_client(proxy, idp) as client:
        prefer = {"Prefer": "respond-async"}
        resp = await asyncio.wait_for(client.delete("/openai/models/ft-z", headers=prefer), WAIT)
        assert resp.status_code == 202
        body = resp.json()
        approval_id = body["approval_id"]
        assert body["state"] == "pending" and body["expires_at"] and body["message"]
        assert resp.headers["Location"] == f"{API}/{approval_id}"
        assert resp.headers["Preference-Applied"] == "respond-async"
        assert fake_openai.requests == []

        assert await decide_when_pending(proxy, idp, "approve", "ok") == approval_id
        polled = await client.get(resp.headers["Location"])
        assert polled.json()["state"] == "approved"

        resp = await asyncio.wait_for(
            client.delete(
                "/openai/models/ft-z", headers={**prefer, "Countersign-Approval": approval_id}
            ),
            WAIT,
        )
    assert resp.status_code == 200
    assert resp.json() == {"id": "ft-z", "object": "model", "deleted": True}
    assert resp.headers["X-Request-Id"] == "req_upstream_1"
    assert [(r.method, r.path) for r in fake_openai.requests] == [("DELETE", "/v1/models/ft-z")]
