"""Cards delivered to the (local fake) Bot Connector: posted once with a client-credentials
token, updated in place as the approval changes (from any replica), through 429 + Retry-After
and outages with the shared retry, and replaced by the minimal card when Teams refuses one; each decision and the outcome replied
once in the card's thread, a reminder before expiry; what readyz reports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from proxy.model import ApprovalState, Verdict
from proxy.notify import NotifyHub
from proxy.notify.reminders import reminder_at
from proxy.notify.retry import GaveUp
from proxy.store.memory import MemoryStore
from proxy.teams.connector import BotConnector
from proxy.teams.delivery import MESSAGE_NOTE, ONCE_NOTE, TeamsHealth, TeamsNotifier
from tests.store_conformance import make_approval, record
from tests.teams_fake import (
    APP_ID,
    APP_PASSWORD,
    CONVERSATION,
    TENANT,
    FakeTeams,
    card_of,
    replies_to,
)

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


class Replica:
    """One replica's view of a shared store: leases are held per replica (as Redis does)."""

    def __init__(self, store: MemoryStore, leases: dict[str, str], name: str) -> None:
        self._store, self._leases, self._name = store, leases, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._store, attr)

    async def lease(self, name: str, seconds: float) -> bool:
        return self._leases.setdefault(name, self._name) == self._name


def notifier(
    fake: FakeTeams, session: aiohttp.ClientSession, store: MemoryStore | Replica, **kwargs: object
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


# -- the thread: decisions, the outcome, the reminder; readyz's evidence ---------------------------


async def test_each_decision_and_the_outcome_are_replied_once_in_the_thread(
    fake: FakeTeams, session: aiohttp.ClientSession
) -> None:
    store, leases = MemoryStore(), dict[str, str]()
    one = notifier(fake, session, Replica(store, leases, "one"))
    two = notifier(fake, session, Replica(store, leases, "two"))
    approval = make_approval(quorum=2)
    await store.create_or_join(approval)
    await one.notify("approval.requested", approval)
    root = fake.posts[0]["id"]
    assert replies_to(fake, root) == []  # nothing to say while nobody decided
    first = await store.decide(approval.id, record(approver="carol"), time.time())
    await two.notify("approval.decided", first)
    [said] = replies_to(fake, root)
    assert (
        said.startswith("carol\\@example\\.com approved via api") and "(1 of 2 approvals)" in said
    )
    denied = await store.decide(
        approval.id, record(Verdict.DENY, "dave", reason="**not** <b>now</b>"), time.time()
    )
    assert denied.state is ApprovalState.DENIED
    await asyncio.gather(
        one.notify("approval.decided", denied), two.notify("approval.decided", denied)
    )
    await one.notify("approval.decided", denied)  # said once, across replicas and events
    texts = replies_to(fake, root)
    assert len(texts) == 3, texts
    assert texts[1].startswith("dave\\@example\\.com denied via api")
    assert "\\*\\*not\\*\\* \\<b\\>now\\<\\/b\\>" in texts[1]  # the reason shown literally
    assert texts[2].startswith("Denied. Denied by dave\\@example\\.com")
    assert await store.get_note(approval.id, ONCE_NOTE + "outcome") == fake.replies[2]["id"]
    assert all(r["replyToId"] == root for r in fake.replies)


async def test_a_reply_teams_refuses_is_recorded_and_not_retried(
    fake: FakeTeams, session: aiohttp.ClientSession
) -> None:
    store = MemoryStore()
    approval = make_approval()
    await store.create_or_join(approval)
    teams = notifier(fake, session, store)
    await teams.notify("approval.requested", approval)
    decided = await store.decide(approval.id, record(approver="carol"), time.time())
    fake.reply_failures.append(400)
    with pytest.raises(GaveUp, match="HTTP 400"):
        await teams.notify("approval.decided", decided)
    note = await store.get_note(approval.id, ONCE_NOTE + "decision.0")
    assert note is not None and note.startswith("failed: replying in the thread answered HTTP 400")
    await notifier(fake, session, store).notify("approval.decided", decided)
    assert fake.replies == []


async def test_the_reminder_is_replied_once_before_expiry(
    fake: FakeTeams, session: aiohttp.ClientSession
) -> None:
    store = MemoryStore()
    now = time.time()
    approval = make_approval(
        created_at=now,
        expires_at=now + 1.5,
        approver_users=("carol@example.com", "Erin@Example.com"),
        approver_groups=("data-owners",),
    )
    await store.create_or_join(approval)
    leases: dict[str, str] = {}
    one = notifier(fake, session, Replica(store, leases, "one"), reminder_min_lifetime=0.0)
    two = notifier(fake, session, Replica(store, leases, "two"), reminder_min_lifetime=0.0)
    try:
        await one.notify("approval.requested", approval)
        await two.notify("approval.requested", approval)  # both schedule it; one says it
        root = fake.posts[0]["id"]
        for _ in range(100):
            if replies_to(fake, root):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        [reminder] = replies_to(fake, root)
        assert reminder.startswith("Still pending: expires ")
        assert "1 more approval needed" in reminder
        assert "carol\\@example\\.com, erin\\@example\\.com" in reminder
        assert "(or anyone in data\\-owners)" in reminder
    finally:
        await one.aclose()
        await two.aclose()


def test_no_reminder_for_short_approvals_and_the_timing_is_slacks() -> None:
    now = 1_000_000.0
    assert reminder_at(make_approval(created_at=now, expires_at=now + 119)) is None
    assert reminder_at(make_approval(created_at=now, expires_at=now + 600)) == now + 480
    assert reminder_at(make_approval(created_at=now, expires_at=now + 3600)) == now + 3300


async def test_health_is_the_last_call_else_a_cached_token(
    fake: FakeTeams, session: aiohttp.ClientSession
) -> None:
    good = BotConnector(session, app_id=APP_ID, app_password=APP_PASSWORD, token_url=fake.token_url)
    assert await TeamsHealth(good, ttl=0.0).state() == "ok"
    assert await TeamsHealth(good, ttl=0.0).state() == "ok"
    assert fake.tokens_issued == 1  # the cached token, no new fetch
    bad = BotConnector(session, app_id=APP_ID, app_password="wrong", token_url=fake.token_url)
    assert await TeamsHealth(bad).state() == "down"

    store = MemoryStore()
    approval = make_approval()
    await store.create_or_join(approval)
    fake.fail_next(503, times=100)
    teams = TeamsNotifier(
        good, store, service_url=fake.service_url, conversation=CONVERSATION, retry_seconds=0.1
    )
    with pytest.raises(GaveUp):
        await teams.notify("approval.requested", approval)
    assert await TeamsHealth(good).state() == "down"  # the last call, fresher than the token
    fake.failures.clear()
    await teams.notify("approval.requested", approval)
    assert await TeamsHealth(good).state() == "ok"

    closed = FakeTeams()
    await closed.start()
    url = closed.token_url
    await closed.close()
    gone = BotConnector(session, app_id=APP_ID, app_password=APP_PASSWORD, token_url=url)
    assert await TeamsHealth(gone).state() == "down"


# -- the owner's direct message ------------------------------------------------------------------


async def test_the_owner_is_told_once_in_a_direct_message(
    fake: FakeTeams, session: aiohttp.ClientSession
) -> None:
    # The owner (alice@example.com) is found by UPN, case-insensitively; told once across
    # replicas and events.
    fake.add_member("29:alice", "aad-alice", "Alice@Example.COM", email=None)
    fake.add_member("29:carol", "aad-carol", "carol@example.com")
    store, leases = MemoryStore(), dict[str, str]()
    one = notifier(fake, session, Replica(store, leases, "one"), tenant_id=TENANT)
    two = notifier(fake, session, Replica(store, leases, "two"), tenant_id=TENANT)
    approval = make_approval()
    await store.create_or_join(approval)
    await one.notify("approval.requested", approval)
    assert fake.direct_posts == []  # nothing to tell while pending
    denied = await store.decide(
        approval.id, record(Verdict.DENY, "carol", reason="not *today*"), time.time()
    )
    await asyncio.gather(
        one.notify("approval.decided", denied), two.notify("approval.decided", denied)
    )
    await two.notify("approval.decided", denied)
    [card] = fake.direct_to("29:alice")
    assert len(fake.direct_posts) == 1 and len(fake.posts) == 1
    text = card["body"][0]["text"]
    assert text.startswith("Your agent agent\\-7's request ")
    assert "was denied by carol\\@example\\.com: not \\*today\\*." in text
    assert card["actions"][0]["url"].endswith(approval.id)
    assert await store.get_note(approval.id, ONCE_NOTE + "owner") == fake.direct_posts[0]["id"]


async def test_an_owner_not_in_the_roster_is_skipped_quietly(
    fake: FakeTeams, session: aiohttp.ClientSession
) -> None:
    fake.add_member("29:carol", "aad-carol", "carol@example.com")
    store = MemoryStore()
    approval = make_approval()
    await store.create_or_join(approval)
    teams = notifier(fake, session, store, tenant_id=TENANT)
    await teams.notify("approval.requested", approval)
    expired = await store.expire(approval.id, approval.expires_at + 1)
    assert expired is not None
    await teams.notify("approval.expired", expired)
    assert fake.directs == {} and fake.direct_posts == []
    note = await store.get_note(approval.id, ONCE_NOTE + "owner")
    assert note is not None and note.startswith("skipped")
    assert fake.roster_reads == 1
    await teams.notify("approval.expired", expired)
    assert fake.roster_reads == 1  # decided once, not looked up again
