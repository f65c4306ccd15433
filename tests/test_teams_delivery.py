"""Cards delivered to the (local fake) Bot Connector: posted once with a client-credentials
token, updated in place as the approval changes (from any replica), through 429 + Retry-After
and outages with the shared retry, and replaced by the minimal card when Teams refuses one."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.model import ApprovalState
from proxy.notify import NotifyHub
from proxy.notify.retry import GaveUp
from proxy.store.memory import MemoryStore
from proxy.teams.connector import BotConnector
from proxy.teams.delivery import MESSAGE_NOTE, TeamsNotifier
from tests.store_conformance import make_approval, record
from tests.teams_fake import APP_ID, APP_PASSWORD, CONVERSATION, FakeTeams, card_of

PUBLIC_URL = "https://countersign.example.com"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTeams]:
    teams = FakeTeams()
    await teams.start()
    yield teams
    await teams.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def notifier(
    fake: FakeTeams, session: aiohttp.ClientSession, store: MemoryStore, **kwargs: object
) -> TeamsNotifier:
    connector = BotConnector(
        session, app_id=APP_ID, app_password=APP_PASSWORD, token_url=fake.token_url
    )
    return TeamsNotifier(
        connector,
        store,
        service_url=fake.service_url,
        conversation=CONVERSATION,
        public_url=PUBLIC_URL,
        first_delay=0.01,
        **kwargs,  # type: ignore[arg-type]
    )


async def test_posted_once_then_updated_in_place_from_another_replica(
    fake: FakeTeams, session: aiohttp.ClientSession
) -> None:
    store = MemoryStore()
    one, two = notifier(fake, session, store), notifier(fake, session, store)
    approval = make_approval()
    await store.create_or_join(approval)
    await one.notify("approval.requested", approval)
    assert len(fake.posts) == 1 and not fake.updates
    activity_id = fake.posts[0]["id"]
    assert await store.get_note(approval.id, MESSAGE_NOTE) == activity_id
    assert card_of(fake.posts[0])["actions"][0]["verb"] == "approve"
    decided = await store.decide(approval.id, record(approver="carol"), time.time())
    assert decided.state is ApprovalState.APPROVED
    await two.notify("approval.decided", decided)  # the other replica updates the same card
    assert len(fake.posts) == 1
    assert [u[0] for u in fake.updates] == [activity_id]
    card = card_of(fake.activities[activity_id])
    assert card["body"][0]["text"] == "Countersign approval: Approved"
    assert "Input.Text" not in str(card)
    assert fake.tokens_issued == 2  # one per connector, then cached


async def test_429_with_retry_after_and_outages_are_retried(
    fake: FakeTeams, session: aiohttp.ClientSession
) -> None:
    store = MemoryStore()
    approval = make_approval()
    await store.create_or_join(approval)
    fake.fail_next(429, retry_after=0.2)
    fake.fail_next(503)
    started = time.monotonic()
    await notifier(fake, session, store).notify("approval.requested", approval)
    assert time.monotonic() - started >= 0.2  # Retry-After honoured
    assert len(fake.posts) == 1


async def test_a_refused_card_falls_back_to_the_minimal_one(
    fake: FakeTeams, session: aiohttp.ClientSession
) -> None:
    store = MemoryStore()
    approval = make_approval()
    await store.create_or_join(approval)
    fallbacks: list[int] = []
    fake.fail_next(413)
    await notifier(fake, session, store, on_fallback=lambda: fallbacks.append(1)).notify(
        "approval.requested", approval
    )
    assert fallbacks == [1]
    card = card_of(fake.posts[0])
    assert "Teams could not show its details" in str(card)
    assert card["actions"][0]["url"].endswith(approval.id)


async def test_giving_up_is_counted_by_the_hub(
    fake: FakeTeams, session: aiohttp.ClientSession
) -> None:
    store = MemoryStore()
    approval = make_approval()
    await store.create_or_join(approval)
    failed: list[str] = []
    hub = NotifyHub(on_failure=failed.append)
    hub.add(notifier(fake, session, store, retry_seconds=0.2))
    fake.fail_next(503, times=100)
    hub("approval.requested", approval)
    await hub.aclose(grace_seconds=5)
    assert failed == ["teams"]
    with pytest.raises(GaveUp):
        await notifier(fake, session, store, retry_seconds=0.1).notify(
            "approval.requested", approval
        )
