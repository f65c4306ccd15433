"""readyz reports the shared dependencies - store, identity provider, Slack - in its body and
stays 200 when one is down (DESIGN §5): every replica shares them. Probes are cached and bounded.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.config import NotifySettings, SlackSettings
from tests.conftest import Client, Factory
from tests.helpers import settings_for
from tests.idp_fixture import TestIdP
from tests.slack_fake import BOT_TOKEN, CHANNEL, FakeSlack

READYZ = "/_countersign/readyz"


async def readyz(client: Client) -> tuple[int, dict[str, Any]]:
    resp = await client.get(READYZ)
    return resp.status, await resp.json()


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = FakeSlack()
    await fake.start()
    yield fake
    await fake.close()


async def test_without_issuers_or_slack_both_are_not_configured(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    status, body = await readyz(client)
    assert status == 200
    assert body["dependencies"] == {
        "store": "ok",
        "idp": "not configured",
        "slack": "not configured",
    }


async def test_a_reachable_identity_provider_is_ok(
    make_proxy: Factory, upstream: TestServer, idp: TestIdP
) -> None:
    issuers = json.dumps([{"issuer": idp.issuer, "audiences": [idp.audience]}])
    client, _ = await make_proxy(settings_for(str(upstream.make_url("/")), issuers=issuers))
    status, body = await readyz(client)
    assert (status, body["dependencies"]["idp"]) == (200, "ok")


async def test_an_identity_provider_down_is_reported_never_not_ready_and_probed_sparingly(
    make_proxy: Factory, upstream: TestServer
) -> None:
    """An issuer whose discovery answers 503, then nothing at all: readyz stays 200 with
    `"idp": "down"`, and repeated probes within the cache window do not call the IdP again."""
    hits: list[str] = []

    async def unavailable(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=503)

    app = web.Application()
    app.router.add_get("/{tail:.*}", unavailable)
    issuer = TestServer(app)
    await issuer.start_server()
    try:
        issuers = json.dumps([{"issuer": str(issuer.make_url("")), "audiences": ["countersign"]}])
        client, _ = await make_proxy(settings_for(str(upstream.make_url("/")), issuers=issuers))
        status, body = await readyz(client)
        assert status == 200
        assert body["status"] == "ready"
        assert body["dependencies"]["idp"] == "down"
        seen = len(hits)
        for _ in range(5):
            assert (await readyz(client))[1]["dependencies"]["idp"] == "down"
        assert len(hits) == seen, "cached: readyz does not fetch the IdP on every probe"
    finally:
        await issuer.close()


async def test_an_identity_provider_that_hangs_is_down_within_the_probe_bound(
    make_proxy: Factory, upstream: TestServer
) -> None:
    async def hang(_: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(status=200)

    app = web.Application()
    app.router.add_get("/{tail:.*}", hang)
    issuer = TestServer(app)
    await issuer.start_server()
    try:
        issuers = json.dumps([{"issuer": str(issuer.make_url("")), "audiences": ["countersign"]}])
        client, _ = await make_proxy(settings_for(str(upstream.make_url("/")), issuers=issuers))
        started = time.monotonic()
        status, body = await readyz(client)
        assert (status, body["dependencies"]["idp"]) == (200, "down")
        assert time.monotonic() - started < 2.5
    finally:
        await issuer.close()


def with_slack(upstream: TestServer, fake: FakeSlack) -> Any:
    base = settings_for(str(upstream.make_url("/")))
    slack = SlackSettings(bot_token=BOT_TOKEN, channel=CHANNEL, api_url=fake.api_url)
    return base.model_copy(update={"notify": NotifySettings(slack=slack)})


async def test_slack_reachable_is_ok_from_one_cached_auth_test(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(with_slack(upstream, slack))
    for _ in range(3):
        status, body = await readyz(client)
        assert (status, body["dependencies"]["slack"]) == (200, "ok")
    assert len(slack.called("auth.test")) == 1


async def test_slack_answering_errors_is_down_and_still_ready(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    slack.fail_status = 503
    client, _ = await make_proxy(with_slack(upstream, slack))
    status, body = await readyz(client)
    assert status == 200 and body["status"] == "ready"
    assert body["dependencies"]["slack"] == "down"
