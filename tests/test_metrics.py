"""Metrics (DESIGN §5) as Prometheus' own parser reads them, health, and `server.admin_listen`.

In-process apps for the families and labels; the real `countersign run` with `workers: 2` on a
real Redis for the one view across workers.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import DRAINING, build_app
from proxy.model import Approval
from proxy.notify import NotifyHub
from proxy.server.internal import ADMIN_SERVER
from proxy.server.metrics import Metrics
from proxy.server.runner import start
from tests.conftest import Client, Factory
from tests.helpers import AGENT_KEY, ALICE_KEY, bearer, settings_for
from tests.redis_fixture import RedisServer

AGENT = bearer(AGENT_KEY)
ALICE = bearer(ALICE_KEY)
API = "/_countersign/api/approvals"
FAMILIES = {
    "countersign_requests": ("counter", {"route", "decision", "status"}),
    "countersign_request_duration_seconds": ("histogram", {"route", "decision"}),
    "countersign_approvals_pending": ("gauge", set()),
    "countersign_approval_decision_seconds": ("histogram", set()),
    "countersign_notify_failures": ("counter", {"channel"}),
    "countersign_upstream_errors": ("counter", {"route", "kind"}),
}


def parse(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(families: dict[str, Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """`name`'s samples (e.g. countersign_requests_total) by their sorted labels."""
    found = {}
    for family in families.values():
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def scrape(client: Client) -> dict[str, Any]:
    resp = await client.get("/_countersign/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return parse(await resp.text())


async def pending_id(client: Client) -> str:
    for _ in range(200):
        resp = await client.get(API, params={"state": "pending"}, headers=ALICE)
        approvals = (await resp.json())["approvals"]
        if approvals:
            return str(approvals[0]["approval_id"])
        await asyncio.sleep(0.02)
    raise AssertionError("no pending approval appeared")


async def test_every_family_and_label_set_after_allow_deny_approve_and_upstream_failure(
    make_proxy: Factory,
) -> None:
    client, _ = await make_proxy()
    assert (await client.get("/cloud/buckets", headers=AGENT)).status == 200
    assert (await client.delete("/cloud/buckets/1", headers=AGENT)).status == 403
    assert (await client.get("/dead/x", headers=AGENT)).status == 502
    assert (await client.get("/cloud/buckets")).status == 401  # refused before the policy
    held = asyncio.create_task(
        client.post("/cloud/exports/customers", json={"format": "csv"}, headers=AGENT)
    )
    approval_id = await pending_id(client)
    during = await scrape(client)
    assert samples(during, "countersign_approvals_pending") == {(): 1.0}
    decided = await client.post(
        f"{API}/{approval_id}/decision", json={"verdict": "approve"}, headers=ALICE
    )
    assert decided.status == 200
    assert (await asyncio.wait_for(held, 5)).status == 200

    families = await scrape(client)
    for name, (kind, labels) in FAMILIES.items():
        assert families[name].type == kind, name
        for sample in families[name].samples:
            assert set(sample.labels) - {"le"} == labels, (name, sample)
    assert samples(families, "countersign_requests_total") == {
        (("decision", "allow"), ("route", "cloud"), ("status", "200")): 1.0,
        (("decision", "deny"), ("route", "cloud"), ("status", "403")): 1.0,
        (("decision", "allow"), ("route", "dead"), ("status", "502")): 1.0,
        (("decision", "none"), ("route", "cloud"), ("status", "401")): 1.0,
        (("decision", "approve"), ("route", "cloud"), ("status", "200")): 1.0,
    }
    assert samples(families, "countersign_upstream_errors_total") == {
        (("kind", "unavailable"), ("route", "dead")): 1.0
    }
    durations = samples(families, "countersign_request_duration_seconds_count")
    assert durations[(("decision", "approve"), ("route", "cloud"))] == 1.0
    assert durations[(("decision", "allow"), ("route", "cloud"))] == 1.0
    assert samples(families, "countersign_approvals_pending") == {(): 0.0}
    assert samples(families, "countersign_approval_decision_seconds_count") == {(): 1.0}
    assert samples(families, "countersign_notify_failures_total") == {}


async def test_an_approved_answer_is_counted_as_sent_when_the_client_leaves_during_the_fsync(
    upstream: TestServer, tmp_path: Path
) -> None:
    """The issue's bug: the handler awaits the audit file's fsync after relaying the answer and
    is cancelled when the client hangs up; what it sent is counted, not a 500."""
    settings = settings_for(str(upstream.make_url("/")))
    audit = settings.audit.model_copy(
        update={"file": str(tmp_path / "audit.jsonl"), "commit_interval_ms": 300, "stdout": False}
    )
    settings = settings.model_copy(update={"audit": audit})
    server = TestServer(build_app(settings), handler_cancellation=True)
    client = TestClient(server)
    await client.start_server()
    try:
        url = str(client.make_url("/cloud/exports/customers"))
        # A fresh connection, closed as soon as the answer is read.
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True)
        ) as session:

            async def call() -> int:
                async with session.post(url, json={"format": "csv"}, headers=AGENT) as resp:
                    await resp.read()
                    return resp.status

            held = asyncio.create_task(call())
            approval_id = await pending_id(client)
            await client.post(
                f"{API}/{approval_id}/decision", json={"verdict": "approve"}, headers=ALICE
            )
            assert await asyncio.wait_for(held, 5) == 200
        await asyncio.sleep(0.5)  # the cancelled handler has counted
        counted = samples(await scrape(client), "countersign_requests_total")
        assert counted[(("decision", "approve"), ("route", "cloud"), ("status", "200"))] == 1.0
        assert not any(dict(labels)["status"] == "500" for labels in counted)
    finally:
        await client.close()


async def test_notify_failures_are_counted_by_channel() -> None:
    class WebhookNotifier:  # named as the channel it stands for: "webhook"
        async def notify(self, event: str, approval: Approval) -> None:
            raise ConnectionError("unreachable")

        async def aclose(self) -> None:
            return None

    metrics = Metrics()
    hub = NotifyHub([WebhookNotifier()], on_failure=metrics.notify_failure)
    hub("approval.requested", None)  # type: ignore[arg-type]
    await hub.aclose()
    counted = samples(parse(metrics.render().decode()), "countersign_notify_failures_total")
    assert counted == {(("channel", "webhook"),): 1.0}


def test_the_request_hot_path_is_cheap() -> None:
    """The per-request cost (one counter, one histogram), with label children cached."""
    metrics = Metrics()
    started = time.perf_counter()
    for _ in range(100_000):
        metrics.request("cloud", "allow", 200, 0.003)
    per_call = (time.perf_counter() - started) / 100_000
    assert per_call < 20e-6, f"{per_call * 1e6:.1f} µs per request"


async def test_readyz_reports_a_store_that_is_down_and_stays_ready(
    make_proxy: Factory, fresh_redis: RedisServer
) -> None:
    settings = settings_for("http://127.0.0.1:9")
    store = settings.store.model_copy(
        update={"url": fresh_redis.url, "key_prefix": "m-" + secrets.token_hex(4)}
    )
    client, _ = await make_proxy(settings.model_copy(update={"store": store}))
    resp = await client.get("/_countersign/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ready" and body["dependencies"]["store"] == "ok"
    fresh_redis.stop()
    resp = await client.get("/_countersign/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ready"
    assert body["dependencies"]["store"] == "down"
    assert body["checks"] == {"config": True, "started": True, "draining": False}


async def test_readyz_is_503_while_draining(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    client.app[DRAINING].set()
    resp = await client.get("/_countersign/readyz")
    assert resp.status == 503
    assert (await resp.json())["status"] == "draining"
    assert (await client.get("/_countersign/healthz")).status == 200


async def test_admin_listen_moves_health_and_metrics_off_the_public_port(
    upstream: TestServer,
) -> None:
    settings = settings_for(str(upstream.make_url("/")))
    server = settings.server.model_copy(update={"admin_listen": "127.0.0.1:0"})
    settings = settings.model_copy(update={"server": server})
    app = build_app(settings)
    serving = await start(settings, app)
    try:
        public = f"http://127.0.0.1:{serving.front.port}"
        admin = f"http://127.0.0.1:{app[ADMIN_SERVER].bound_port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{public}/cloud/buckets", headers=AGENT) as resp:
                assert resp.status == 200
            for path in ("metrics", "healthz", "readyz"):
                async with session.get(f"{public}/_countersign/{path}") as resp:
                    assert resp.status == 404, path
                    assert (await resp.json())["error"]["code"] == "no_route"
                async with session.get(f"{admin}/_countersign/{path}") as resp:
                    assert resp.status == 200, path
            async with session.get(f"{admin}/cloud/buckets", headers=AGENT) as resp:
                assert resp.status == 404, "the admin port proxies nothing"
            async with session.get(f"{admin}/_countersign/metrics") as resp:
                counted = samples(parse(await resp.text()), "countersign_requests_total")
        assert counted == {(("decision", "allow"), ("route", "cloud"), ("status", "200")): 1.0}
    finally:
        await serving.cleanup()
    assert app[ADMIN_SERVER].bound_port is None, "stopped with the app"


def test_admin_listen_is_validated_like_listen() -> None:
    import pytest
    from pydantic import ValidationError

    from proxy.config import ServerSettings

    with pytest.raises(ValidationError, match="expected host:port"):
        ServerSettings(admin_listen="9090")
    with pytest.raises(ValidationError, match=r"must differ from server\.listen"):
        ServerSettings(listen="127.0.0.1:8080", admin_listen="127.0.0.1:8080")
    assert ServerSettings(admin_listen="[::1]:9090").admin_address == ("::1", 9090)


def test_the_grafana_dashboard_uses_only_metrics_that_exist() -> None:
    import json
    import re

    text = json.dumps(json.loads(Path("deploy/grafana-dashboard.json").read_text()))
    used = set(re.findall(r"countersign_[a-z_]+", text))
    rendered = {
        sample.name
        for family in text_string_to_metric_families(Metrics().render().decode())
        for sample in family.samples
    } | {f"{name}_total" for name, (kind, _) in FAMILIES.items() if kind == "counter"}
    rendered |= {f"{name}_bucket" for name, (kind, _) in FAMILIES.items() if kind == "histogram"}
    assert used and used <= rendered, used - rendered
