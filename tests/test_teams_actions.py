"""Decisions from the card (Universal Actions) through the real route, verified tokens, the
fake roster and the real approval service: approve, deny with a reason, deny without one, the
owner refused, a non-approver refused, a stranger refused, a forged token refused, the card
refreshed for the clicker and updated in place for everyone, two replicas sharing one store."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.approvals.service import ApprovalService
from proxy.audit import AuditLog
from proxy.config import ApprovalsSettings
from proxy.model import ApprovalState, Requester
from proxy.notify import NotifyHub
from proxy.store.memory import MemoryStore
from proxy.teams.app import MESSAGES_PATH, TEAMS_BOT, TeamsBot, teams_routes
from proxy.teams.auth import ActivityVerifier
from proxy.teams.cards import CARD_CONTENT_TYPE
from proxy.teams.connector import BotConnector
from proxy.teams.delivery import MESSAGE_NOTE, TeamsNotifier
from proxy.teams.hosting import CountersignAgent
from tests.helpers import ListSink
from tests.store_conformance import make_approval
from tests.teams_fake import APP_ID, APP_PASSWORD, CONVERSATION, TENANT, FakeTeams, card_of

PUBLIC_URL = "https://countersign.example.com"
OWNER = "bob@example.com"


class Replica:
    def __init__(self, fake: FakeTeams, store: MemoryStore, session: aiohttp.ClientSession):
        connector = BotConnector(
            session, app_id=APP_ID, app_password=APP_PASSWORD, token_url=fake.token_url
        )
        self.hub = NotifyHub()
        self.hub.add(
            TeamsNotifier(
                connector,
                store,
                service_url=fake.service_url,
                conversation=CONVERSATION,
                public_url=PUBLIC_URL,
                first_delay=0.01,
            )
        )
        self.service = ApprovalService(
            store, ApprovalsSettings(), AuditLog([ListSink()]), notify=self.hub
        )
        verifier = ActivityVerifier(APP_ID, TENANT, fake.openid_metadata_url, session)
        app = web.Application()
        app[TEAMS_BOT] = TeamsBot(
            verifier,
            connector,
            self.service,
            service_url=fake.service_url,
            conversation=CONVERSATION,
            tenant_id=TENANT,
            public_url=PUBLIC_URL,
        )
        app.router.add_routes(teams_routes())
        self.client = TestClient(TestServer(app))


@pytest.fixture
async def world() -> AsyncIterator[tuple[FakeTeams, Replica, Replica, MemoryStore]]:
    fake = FakeTeams()
    await fake.start()
    fake.add_member("29:alice", "aad-alice", "alice@contoso.com", email="Alice@Example.com")
    fake.add_member("29:carol", "aad-carol", "carol@example.com")
    fake.add_member("29:bob", "aad-bob", "bob@example.com")
    fake.add_member("29:mallory", "aad-mallory", "mallory@example.com")
    store = MemoryStore()
    async with aiohttp.ClientSession() as session:
        one, two = Replica(fake, store, session), Replica(fake, store, session)
        await one.client.start_server()
        await two.client.start_server()
        yield fake, one, two, store
        await one.client.close()
        await two.client.close()
        await one.hub.aclose()
        await two.hub.aclose()
    await fake.close()


def click(fake: FakeTeams, who: str, verb: str, approval_id: str, **data: Any) -> dict[str, Any]:
    return fake.activity(
        type="invoke",
        name="adaptiveCard/action",
        **{"from": {"id": f"29:{who}", "aadObjectId": f"aad-{who}", "name": "Alice (CEO)"}},
        value={
            "action": {
                "type": "Action.Execute",
                "verb": verb,
                "data": {"approval_id": approval_id, **data},
            }
        },
    )


async def send(replica: Replica, fake: FakeTeams, activity: dict[str, Any], **sign: Any) -> Any:
    token = fake.sign(**sign)
    resp = await replica.client.post(
        MESSAGES_PATH, json=activity, headers={"Authorization": f"Bearer {token}"}
    )
    return resp.status, await resp.json(content_type=None) if resp.status != 200 or (
        resp.content_length
    ) else None


async def posted(fake: FakeTeams, replica: Replica, store: MemoryStore, **overrides: Any) -> str:
    approval = make_approval(
        requester=Requester(subject="agent-7", issuer="https://idp", owner=OWNER),
        approver_groups=(),
        approver_users=("alice@example.com", "bob@example.com", "carol@example.com"),
        expires_at=time.time() + 600,
        **overrides,
    )
    await store.create_or_join(approval)
    replica.hub("approval.requested", approval)
    await replica.hub.aclose(grace_seconds=5)
    assert await store.get_note(approval.id, MESSAGE_NOTE)
    return approval.id


async def test_approve_from_the_card_refreshes_it_for_everyone(world: Any) -> None:
    fake, one, two, store = world
    approval_id = await posted(fake, one, store)
    status, answer = await send(two, fake, click(fake, "alice", "approve", approval_id))
    assert status == 200 and answer["statusCode"] == 200
    assert answer["type"] == CARD_CONTENT_TYPE
    assert answer["value"]["body"][0]["text"] == "Countersign approval: Approved"
    approval = await store.get(approval_id)
    assert approval.state is ApprovalState.APPROVED
    decision = approval.decisions[0]
    # The roster's email, canonical; never the display name.
    assert decision.channel == "teams" and decision.person == "alice@example.com"
    assert decision.approver_subject == "aad-alice"
    await two.hub.aclose(grace_seconds=5)
    activity_id = fake.posts[0]["id"]
    assert len(fake.posts) == 1 and fake.updates[-1][0] == activity_id
    assert card_of(fake.activities[activity_id])["body"][0]["text"].endswith("Approved")


async def test_deny_needs_a_reason_typed_into_the_card(world: Any) -> None:
    fake, one, _, store = world
    approval_id = await posted(fake, one, store)
    _, answer = await send(one, fake, click(fake, "carol", "deny", approval_id))
    assert "A denial needs a reason" in answer["value"]["body"][0]["text"]
    assert (await store.get(approval_id)).state is ApprovalState.PENDING
    _, answer = await send(one, fake, click(fake, "carol", "deny", approval_id, reason="no *way*"))
    approval = await store.get(approval_id)
    assert approval.state is ApprovalState.DENIED and approval.decisions[0].reason == "no *way*"
    assert any("no \\*way\\*" in b.get("text", "") for b in answer["value"]["body"])


async def test_refusals_are_said_in_words_and_decide_nothing(world: Any) -> None:
    fake, one, _, store = world
    approval_id = await posted(fake, one, store)
    cases = {
        "bob": "You cannot decide this request",  # the owner
        "mallory": "You are not an approver of this request",
        "nobody": "only members of the approvals conversation can decide",  # not in the roster
    }
    for who, words in cases.items():
        status, answer = await send(one, fake, click(fake, who, "approve", approval_id))
        assert status == 200
        assert words in answer["value"]["body"][0]["text"], who
    # A roster entry whose object id differs from the token's activity: refused.
    fake.members["29:alice"]["aadObjectId"] = "aad-someone-else"
    _, answer = await send(one, fake, click(fake, "alice", "approve", approval_id))
    assert "could not tell who you are" in answer["value"]["body"][0]["text"]
    assert (await store.get(approval_id)).decisions == ()


async def test_forged_or_misdirected_activities_are_401(world: Any) -> None:
    fake, one, _, store = world
    approval_id = await posted(fake, one, store)
    activity = click(fake, "alice", "approve", approval_id)
    for sign in ({"forged": True}, {"aud": "other-bot"}, {"iss": "https://evil.example"}):
        status, answer = await send(one, fake, activity, **sign)
        assert status == 401 and answer["error"]["code"] == "unauthorized", sign
    other_tenant = {**activity, "channelData": {"tenant": {"id": "evil-tenant"}}}
    status, _ = await send(one, fake, other_tenant)
    assert status == 401
    resp = await one.client.post(MESSAGES_PATH, json=activity)
    assert resp.status == 401
    assert (await store.get(approval_id)).decisions == ()


async def test_other_activities_are_acknowledged(world: Any) -> None:
    fake, one, _, _ = world
    status, _ = await send(one, fake, fake.activity(type="conversationUpdate"))
    assert status == 200


async def test_verified_activities_are_dispatched_by_the_agents_sdk(
    world: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After Countersign's own check, the SDK's CloudAdapter runs the turn with the verified
    claims as its ClaimsIdentity; a message is acknowledged and ignored, a forged one never
    reaches it."""
    fake, one, _, _ = world
    seen: list[tuple[str, Any]] = []

    async def on_message(self: CountersignAgent, turn_context: Any) -> None:
        seen.append((turn_context.activity.type, turn_context.identity.claims))

    monkeypatch.setattr(CountersignAgent, "on_message_activity", on_message)
    status, _ = await send(one, fake, fake.activity(type="message", text="approve it"))
    assert status == 200
    [(kind, claims)] = seen
    assert kind == "message" and claims["aud"] == APP_ID
    assert claims["iss"] == "https://api.botframework.com"
    status, _ = await send(one, fake, fake.activity(type="message"), forged=True)
    assert status == 401 and len(seen) == 1
    assert fake.posts == [] and fake.replies == []  # nothing said back in chat


async def test_the_owner_hears_of_a_teams_decision_once_across_replicas(world: Any) -> None:
    fake, one, two, store = world
    approval_id = await posted(fake, one, store)
    status, _ = await send(two, fake, click(fake, "carol", "approve", approval_id))
    assert status == 200
    await two.hub.aclose(grace_seconds=5)
    approved = await store.get(approval_id)
    one.hub("approval.decided", approved)  # the other replica sees the same event
    await one.hub.aclose(grace_seconds=5)
    [card] = fake.direct_to("29:bob")  # OWNER, found in the roster by email
    assert "was approved by carol\\@example\\.com." in card["body"][0]["text"]
    assert len(fake.direct_posts) == 1 and len(fake.posts) == 1


async def test_approve_and_grant_from_the_card_within_the_rules_limits(world: Any) -> None:
    fake, one, _, store = world
    approval_id = await posted(fake, one, store, grant_max_uses=5, grant_max_seconds=1800)
    card = card_of(fake.posts[0])
    inputs = {b["id"]: b for b in card["body"] if b["type"] == "Input.Number"}
    assert (inputs["grant_uses"]["max"], inputs["grant_time"]["max"]) == (5, 30)
    assert "minutes" in inputs["grant_time"]["label"]
    verbs = [a.get("verb") for a in card["actions"]]
    assert verbs[:3] == ["approve", "deny", "approve_grant"]

    # Beyond the rule's limits, or not a whole number: said on the card, nothing decided.
    for uses, minutes, words in (
        ("6", "30", "whole number of uses from 1 to 5"),
        ("3", "x", "whole number of minutes from 1 to 30"),
        ("0", "10", "whole number of uses from 1 to 5"),
        ("²", "10", "whole number of uses from 1 to 5"),
        (None, "10", "whole number of uses from 1 to 5"),
    ):
        data = {"grant_uses": uses, "grant_time": minutes}
        status, answer = await send(
            one, fake, click(fake, "carol", "approve_grant", approval_id, **data)
        )
        assert status == 200 and words in answer["value"]["body"][0]["text"], (uses, minutes)
        assert answer["value"]["body"][0]["color"] == "Attention"
    assert (await store.get(approval_id)).decisions == ()

    data = {"grant_uses": "3", "grant_time": 10, "reason": "batch export"}
    status, answer = await send(
        one, fake, click(fake, "carol", "approve_grant", approval_id, **data)
    )
    assert status == 200 and answer["value"]["body"][0]["text"] == "Countersign approval: Approved"
    approval = await store.get(approval_id)
    assert approval.state is ApprovalState.APPROVED and approval.grant_id
    decision = approval.decisions[0]
    assert (decision.channel, decision.grant_uses, decision.grant_seconds) == ("teams", 3, 600)
    grant = await store.get_grant(approval.grant_id)
    assert grant is not None and grant.uses == 3


async def test_no_grant_offered_or_taken_where_the_rule_allows_none(world: Any) -> None:
    fake, one, _, store = world
    approval_id = await posted(fake, one, store)
    card = card_of(fake.posts[0])
    assert "approve_grant" not in str(card) and "Input.Number" not in str(card)
    data = {"grant_uses": "1", "grant_time": "1"}
    _, answer = await send(one, fake, click(fake, "carol", "approve_grant", approval_id, **data))
    assert "this rule does not offer grants" in answer["value"]["body"][0]["text"]
    assert (await store.get(approval_id)).decisions == ()


async def test_a_verified_body_that_is_not_an_activity_is_400(world: Any) -> None:
    fake, one, _, _ = world
    status, answer = await send(one, fake, fake.activity(**{"from": "not an account"}))
    assert status == 400 and answer["error"]["code"] == "invalid_request"
