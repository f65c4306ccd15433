"""Teams wired into the real proxy (`notify.teams`): a held request's card is posted to the fake
Bot Connector, an approver's click on `POST /_countersign/teams/messages` releases it, and the
card is updated in place to the outcome; without a valid token the route answers 401."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from proxy.config import ApprovalsSettings, NotifySettings, Settings, TeamsSettings
from proxy.teams.app import MESSAGES_PATH
from tests.conftest import Factory
from tests.helpers import AGENT_KEY, bearer, settings_for
from tests.teams_fake import (
    APP_ID,
    APP_PASSWORD,
    CONVERSATION,
    TENANT,
    FakeTeams,
    card_of,
    replies_to,
)

AGENT = bearer(AGENT_KEY)
PUBLIC_URL = "https://countersign.example.com"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTeams]:
    teams = FakeTeams()
    await teams.start()
    teams.add_member("29:carol", "aad-carol", "carol@example.com")
    yield teams
    await teams.close()


def teams_settings(upstream: TestServer, fake: FakeTeams) -> Settings:
    base = settings_for(str(upstream.make_url("/")))
    teams = TeamsSettings(
        app_id=APP_ID,
        app_password=APP_PASSWORD,
        tenant_id=TENANT,
        conversation=CONVERSATION,
        service_url=fake.service_url,
        openid_metadata_url=fake.openid_metadata_url,
        token_url=fake.token_url,
    )
    return base.model_copy(
        update={
            "server": base.server.model_copy(update={"public_url": PUBLIC_URL}),
            "notify": NotifySettings(teams=teams),
            "approvals": ApprovalsSettings(
                mode="hold", timeout_seconds=60, groups={"data-owners": ("carol@example.com",)}
            ),
        }
    )


async def wait_for(predicate: Any, seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_a_click_in_teams_releases_the_held_request(
    make_proxy: Factory, upstream: TestServer, fake: FakeTeams
) -> None:
    client, sink = await make_proxy(teams_settings(upstream, fake))
    call = asyncio.create_task(
        client.post("/cloud/exports/customers", json={"format": "csv"}, headers=AGENT)
    )
    await wait_for(lambda: fake.posts)
    card = card_of(fake.posts[0])
    approval_id = card["actions"][0]["data"]["approval_id"]
    assert card["actions"][0]["verb"] == "approve"

    click = fake.activity(
        type="invoke",
        name="adaptiveCard/action",
        **{"from": {"id": "29:carol", "aadObjectId": "aad-carol", "name": "Carol"}},
        value={"action": {"verb": "approve", "data": {"approval_id": approval_id}}},
    )
    forged = await client.post(MESSAGES_PATH, json=click, headers=bearer(fake.sign(forged=True)))
    assert forged.status == 401
    assert (await forged.json())["error"]["code"] == "unauthorized"

    resp = await client.post(MESSAGES_PATH, json=click, headers=bearer(fake.sign()))
    assert resp.status == 200
    answer = await resp.json()
    assert answer["type"] == "application/vnd.microsoft.card.adaptive"
    held = await asyncio.wait_for(call, 10)
    assert held.status == 200 and held.headers["Countersign-Approval-Id"] == approval_id
    decided = sink.named("approval.decided")
    assert decided[0]["channel"] == "teams"
    assert decided[0]["approver"]["person"] == "carol@example.com"
    activity_id = fake.posts[0]["id"]
    await wait_for(
        lambda: card_of(fake.activities[activity_id])["body"][0]["text"].endswith("Executed")
    )
    assert len(fake.posts) == 1


def test_notify_teams_config() -> None:
    full = TeamsSettings(
        app_id="a", app_password="p", tenant_id="t", conversation="19:c@thread.tacv2"
    )
    assert full.enabled and full.service_url == "https://smba.trafficmanager.net/teams/"
    assert full.openid_metadata_url.startswith("https://login.botframework.com/")
    assert not TeamsSettings(app_id=" ", app_password="", tenant_id="", conversation="").enabled
    with pytest.raises(ValueError, match="all required"):
        TeamsSettings(app_id="a", app_password="p")
    with pytest.raises(ValueError, match="http"):
        TeamsSettings(token_url="ftp://x")


async def test_readyz_reports_teams_and_a_refused_card_is_counted(
    make_proxy: Factory, upstream: TestServer, fake: FakeTeams
) -> None:
    client, _ = await make_proxy(teams_settings(upstream, fake))
    fake.fail_next(413)  # the full card refused: the minimal one is sent and counted
    call = asyncio.create_task(
        client.post("/cloud/exports/customers", json={"format": "csv"}, headers=AGENT)
    )
    try:
        await wait_for(lambda: fake.posts)
        assert "Teams could not show its details" in str(card_of(fake.posts[0]))
        text = await (await client.get("/_countersign/metrics")).text()
        assert "countersign_teams_fallback_cards_total 1.0" in text
        resp = await client.get("/_countersign/readyz")
        assert resp.status == 200
        assert (await resp.json())["dependencies"]["teams"] == "ok"
    finally:
        call.cancel()


async def test_readyz_reports_teams_down_without_failing_readiness(
    make_proxy: Factory, upstream: TestServer, fake: FakeTeams
) -> None:
    settings = teams_settings(upstream, fake)
    assert settings.notify.teams is not None
    wrong = settings.notify.teams.model_copy(update={"app_password": "wrong"})
    client, _ = await make_proxy(
        settings.model_copy(update={"notify": NotifySettings(teams=wrong)})
    )
    resp = await client.get("/_countersign/readyz")
    body = await resp.json()
    assert (resp.status, body["status"], body["dependencies"]["teams"]) == (200, "ready", "down")


async def test_the_decision_and_outcome_are_replied_in_the_cards_thread(
    make_proxy: Factory, upstream: TestServer, fake: FakeTeams
) -> None:
    client, _ = await make_proxy(teams_settings(upstream, fake))
    call = asyncio.create_task(
        client.post("/cloud/exports/customers", json={"format": "csv"}, headers=AGENT)
    )
    await wait_for(lambda: fake.posts)
    root = fake.posts[0]["id"]
    approval_id = card_of(fake.posts[0])["actions"][0]["data"]["approval_id"]
    click = fake.activity(
        type="invoke",
        name="adaptiveCard/action",
        **{"from": {"id": "29:carol", "aadObjectId": "aad-carol", "name": "Carol"}},
        value={"action": {"verb": "approve", "data": {"approval_id": approval_id}}},
    )
    assert (await client.post(MESSAGES_PATH, json=click, headers=bearer(fake.sign()))).status == 200
    assert (await asyncio.wait_for(call, 10)).status == 200
    await wait_for(lambda: len(replies_to(fake, root)) == 2)
    said = replies_to(fake, root)
    assert said[0].startswith("carol\\@example\\.com approved via teams")
    assert said[1].startswith("Executed. Executed by carol\\@example\\.com")
    assert len(fake.posts) == 1
