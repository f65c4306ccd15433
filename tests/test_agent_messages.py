"""Every refusal an agent gets on a privileged request says what happened and what to do next:
SDKs of the OpenAI and Anthropic kind show `error.message` to the model as the exception text."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp.test_utils import TestServer

from proxy.server.responses import default_message
from tests.conftest import Client, Factory
from tests.helpers import AGENT_KEY, ALICE_KEY, bearer, settings_for

AGENT = bearer(AGENT_KEY)
ALICE = bearer(ALICE_KEY)
EXPORT = "/cloud/exports/customers"
API = "/_countersign/api/approvals"


async def ask(client: Client, body: Any = None, **headers: str) -> tuple[int, dict[str, Any], Any]:
    resp = await client.post(EXPORT, json=body or {"a": 1}, headers={**AGENT, **headers})
    return resp.status, await resp.json(), resp.headers


async def approve(client: Client, approval_id: str, verdict: str = "approve", **extra: Any) -> None:
    resp = await client.post(
        f"{API}/{approval_id}/decision", json={"verdict": verdict, **extra}, headers=ALICE
    )
    assert resp.status == 200, await resp.text()


async def test_denied_tells_the_agent_not_to_retry(make_proxy: Factory) -> None:
    client, _ = await make_proxy(mode="async")
    status, body, _ = await ask(client)
    assert status == 202
    approval_id = body["approval_id"]
    await approve(client, approval_id, "deny", reason="not this quarter")
    status, body, _ = await ask(client, **{"Countersign-Approval": approval_id})
    assert status == 403 and body["error"]["code"] == "approval_denied"
    assert body["error"]["message"] == (
        "Denied by alice@example.com: not this quarter. Do not retry this request; it will be "
        "denied again unless something changes."
    )
    assert default_message("approval_denied", 403, {"decided_by": "c@x", "reason": "No."}) == (
        "Denied by c@x: No. Do not retry this request; it will be denied again unless something "
        "changes."
    )


async def test_expired_names_the_window_and_the_inbox(make_proxy: Factory) -> None:
    client, _ = await make_proxy(timeout=1)
    status, body, _ = await asyncio.wait_for(ask(client), 5)
    assert status == 403
    error = body["error"]
    assert error["code"] == "approval_expired"
    assert error["message"] == (
        f"Nobody decided within 1 s (approval {error['approval_id']}). Ask a human to look at "
        "the approvals inbox, then send the request again."
    )


async def test_lapsed_used_and_mismatch_say_what_to_do(make_proxy: Factory) -> None:
    client, _ = await make_proxy(mode="async", claim=1)
    _, body, _ = await ask(client)
    approval_id = body["approval_id"]

    status, body, _ = await ask(client, {"a": 2}, **{"Countersign-Approval": approval_id})
    assert status == 403 and body["error"]["code"] == "approval_mismatch"
    assert body["error"]["message"] == (
        "This approval does not cover this exact request by this caller: re-send the identical "
        "request (same method, path, query, headers and body) or ask for a new approval."
    )

    await approve(client, approval_id)
    status, _, _ = await ask(client, **{"Countersign-Approval": approval_id})
    assert status == 200
    status, body, _ = await ask(client, **{"Countersign-Approval": approval_id})
    assert status == 403 and body["error"]["code"] == "approval_used"
    assert body["error"]["message"] == (
        "This approval was already used once; each approval covers one execution. Send the "
        "request again (without Countersign-Approval) to ask for a new one."
    )

    _, body, _ = await ask(client, {"b": 1})
    second = body["approval_id"]
    await approve(client, second)
    await asyncio.sleep(1.3)
    status, body, _ = await ask(client, {"b": 1}, **{"Countersign-Approval": second})
    assert status == 403 and body["error"]["code"] == "approval_lapsed"
    assert body["error"]["message"] == (
        "Approved, but not sent again within approvals.claim_seconds; send the request again to "
        "ask for a new approval."
    )


async def test_too_many_pending_names_the_limit_and_retry_after(
    make_proxy: Factory, upstream: TestServer
) -> None:
    settings = settings_for(str(upstream.make_url("/")), mode="async")
    settings = settings.model_copy(
        update={"approvals": settings.approvals.model_copy(update={"max_pending_per_identity": 1})}
    )
    client, _ = await make_proxy(settings)
    assert (await ask(client, {"n": 1}))[0] == 202
    status, body, headers = await ask(client, {"n": 2})
    assert status == 429 and body["error"]["code"] == "too_many_pending"
    assert body["error"]["message"] == (
        "You have too many requests waiting for approval (limit 1); wait for decisions, then "
        "retry after the Retry-After seconds."
    )
    assert headers["Retry-After"].isdigit() and int(headers["Retry-After"]) > 0


async def test_a_refused_connection_leaves_the_approval_unused(make_proxy: Factory) -> None:
    # The cloud route (and its `exports` rule) points at a closed port: nothing can be sent.
    client, sink = await make_proxy(settings_for("http://127.0.0.1:9", mode="async"))
    _, body, _ = await ask(client)
    approval_id = body["approval_id"]
    await approve(client, approval_id)
    status, body, _ = await ask(client, **{"Countersign-Approval": approval_id})
    assert status == 502
    error = body["error"]
    assert error["code"] == "upstream_unavailable" and error["approval_id"] == approval_id
    message = error["message"]
    assert message.startswith("The upstream could not be reached (")
    assert message.endswith(
        "); nothing was sent and the approval is still unused: send the identical request again."
    )
    shown = await (await client.get(f"{API}/{approval_id}", headers=ALICE)).json()
    assert shown["state"] == "approved" and shown["outcome"] is None
    assert "approval is still unused" in json.dumps(sink.named("request.completed"))


async def _hang_up_upstream() -> tuple[asyncio.AbstractServer, str, list[bytes]]:
    """An upstream that reads the request, then closes without answering: it may have run."""
    received: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(65536))
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}", received


async def test_an_upstream_that_fails_after_receiving_may_have_run_and_a_retry_shows_it(
    make_proxy: Factory,
) -> None:
    server, url, received = await _hang_up_upstream()
    try:
        client, _ = await make_proxy(settings_for(url, mode="async"))
        _, body, _ = await ask(client)
        first = body["approval_id"]
        await approve(client, first)
        status, body, _ = await ask(client, **{"Countersign-Approval": first})
        assert status == 502 and received, "the request reached the upstream"
        message = body["error"]["message"]
        assert message.startswith("The upstream failed on the approved request (")
        assert message.endswith(
            "): it may or may not have run. Check its effect before retrying; a retry needs a "
            "new approval."
        )
        for _ in range(100):  # the outcome is recorded in the background
            shown = await (await client.get(f"{API}/{first}", headers=ALICE)).json()
            if shown["outcome"] is not None:
                break
            await asyncio.sleep(0.02)
        assert shown["state"] == "executed" and shown["outcome"] == "ambiguous"
        # The identical retry opens a new approval, which tells approvers of the first attempt.
        status, body, _ = await ask(client)
        assert status == 202 and body["approval_id"] != first
        retry = await (await client.get(f"{API}/{body['approval_id']}", headers=ALICE)).json()
        assert retry["earlier_attempt"] == first
        # A different request knows nothing of it.
        _, other, _ = await ask(client, {"b": 2})
        shown = await (await client.get(f"{API}/{other['approval_id']}", headers=ALICE)).json()
        assert shown["earlier_attempt"] is None
    finally:
        server.close()
        await server.wait_closed()


async def test_a_plain_request_to_a_failed_upstream_keeps_its_message(
    make_proxy: Factory,
) -> None:
    client, _ = await make_proxy()
    resp = await client.get("/dead/x", headers=AGENT)
    assert resp.status == 502
    message = (await resp.json())["error"]["message"]
    assert "approved" not in message and "127.0.0.1:9" in message
