"""Slack beyond the message: decisions and outcomes as thread replies, the reminder before
expiry, the direct message to the agent's owner, and grants chosen in Slack - all against the
strict fake (`tests/slack_fake.py`)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient
from structlog.testing import capture_logs

from proxy.config import GrantSettings, Settings
from proxy.model import Approval, Requester, Verdict
from proxy.notify import NotifyHub
from proxy.notify.reminders import reminder_at
from proxy.server.metrics import Metrics
from proxy.slack.delivery import SlackNotifier
from proxy.store.memory import MemoryStore
from tests.conftest import Factory
from tests.helpers import AGENT_KEY, ALICE_KEY, bearer
from tests.slack_fake import (
    BOT_TOKEN,
    CHANNEL,
    FakeSlack,
    block_action,
    grant_submission,
    view_submission,
)
from tests.store_conformance import make_approval, record
from tests.test_metrics import parse, samples
from tests.test_slack import approval_state, click, hold, message_text, slack_settings, wait_for

AGENT = bearer(AGENT_KEY)
GRANT = "countersign_approve_grant"


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = FakeSlack()
    await fake.start()
    yield fake
    await fake.close()


def web_client(slack: FakeSlack) -> AsyncWebClient:
    return AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url, retry_handlers=[])


def with_grant(settings: Settings, max_uses: int = 5, max_seconds: int = 1800) -> Settings:
    """The "exports" rule offering grants of up to `max_uses` for `max_seconds`."""
    grant = GrantSettings(max_uses=max_uses, max_seconds=max_seconds)
    rules = tuple(
        r.model_copy(update={"grant": grant}) if r.name == "exports" else r
        for r in settings.policy.rules
    )
    return settings.model_copy(
        update={"policy": settings.policy.model_copy(update={"rules": rules})}
    )


# -- decisions and outcomes in the thread; the owner's direct message -------------------------


async def test_a_decision_and_the_outcome_are_replied_in_the_thread_and_the_owner_is_told(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack)
    await click(
        client, view_submission("UCAROL", "countersign_approve_note", approval_id, "*ok* <!here>")
    )
    assert (await asyncio.wait_for(call, 10)).status == 200
    await wait_for(lambda: len(slack.replies()) == 2)
    decision, outcome = slack.replies()
    assert "`carol@example.com` approved via `slack` at <!date^" in decision
    assert "`*ok* &lt;!here&gt;`" in decision, "the approver's note is shown literally"
    assert outcome.startswith("*Executed*.") and "upstream answered *200*" in outcome
    (parent_ts,) = slack.messages
    for reply in slack.threads[parent_ts]:
        assert reply["thread_ts"] == parent_ts and reply["channel"] == CHANNEL
    # The agent's owner (bob@example.com is UBOB in the workspace) hears of it directly.
    await wait_for(lambda: slack.dms.get("UBOB"))
    (dm,) = slack.dms["UBOB"]
    assert dm["channel"] == "DUBOB"
    assert "Your agent `agent-key`'s request `POST /api/exports/customers`" in dm["text"]
    assert "*approved* by `carol@example.com`" in dm["text"]
    assert slack.called("users.lookupByEmail")[0]["email"] == "bob@example.com"
    assert slack.called("conversations.open")[0]["users"] == "UBOB"
    # Said once: later events (the execution) add nothing.
    await asyncio.sleep(0.3)
    assert len(slack.replies()) == 2 and len(slack.dms["UBOB"]) == 1
    assert len(slack.posts()) == 1


async def test_a_denial_is_replied_with_its_reason_and_the_owner_is_told(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack)
    await click(
        client, view_submission("UCAROL", "countersign_deny", approval_id, "not this quarter")
    )
    assert (await asyncio.wait_for(call, 10)).status == 403
    await wait_for(lambda: len(slack.replies()) == 2)
    decision, outcome = slack.replies()
    assert "denied via `slack`" in decision and "`not this quarter`" in decision
    assert outcome.startswith("*Denied*.")
    await wait_for(lambda: slack.dms.get("UBOB"))
    assert "*denied* by `carol@example.com`: `not this quarter`" in slack.dms["UBOB"][0]["text"]


async def test_each_approval_of_a_quorum_is_replied_with_the_progress(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack, path="/cloud/iam/roles")
    await click(client, block_action("UCAROL", approval_id, "countersign_approve"))
    await wait_for(lambda: len(slack.replies()) == 1)
    assert "(1 of 2 approvals)" in slack.replies()[0]
    assert not slack.dms, "not decided yet: the owner is not told"
    resp = await client.post(
        f"/_countersign/api/approvals/{approval_id}/decision",
        json={"verdict": "approve", "reason": "fine"},
        headers=bearer(ALICE_KEY),
    )
    assert resp.status == 200
    assert (await asyncio.wait_for(call, 10)).status == 200
    await wait_for(lambda: len(slack.replies()) == 3)
    _, second, outcome = slack.replies()
    assert "`alice@example.com` approved via `api`" in second and "(2 of 2 approvals)" in second
    assert "*Executed*" in outcome
    await wait_for(lambda: slack.dms.get("UBOB"))


async def test_an_expiry_is_replied_and_the_owner_is_told(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    settings = slack_settings(upstream, slack)
    settings = settings.model_copy(
        update={"approvals": settings.approvals.model_copy(update={"timeout_seconds": 1})}
    )
    client, _ = await make_proxy(settings)
    call, _ = await hold(client, slack)
    assert (await asyncio.wait_for(call, 10)).status == 403
    await wait_for(lambda: slack.replies())
    assert slack.replies() == ["*Expired*. :hourglass: *Expired*: not decided in time"]
    await wait_for(lambda: slack.dms.get("UBOB"))
    assert "*expired*: nobody decided it in time" in slack.dms["UBOB"][0]["text"]


async def test_an_owner_without_slack_is_skipped_quietly_and_a_real_error_is_counted(
    slack: FakeSlack,
) -> None:
    metrics = Metrics()
    hub = NotifyHub(on_failure=metrics.notify_failure)
    store = MemoryStore()
    hub.add(SlackNotifier(web_client(slack), CHANNEL, store, first_delay=0.05))
    owner = Requester(subject="agent-7", issuer="https://idp", owner="nobody@example.com")
    nobody = make_approval(requester=owner)
    with capture_logs() as logs:
        await deliver_decided(slack, hub, store, nobody)
    assert slack.called("users.lookupByEmail")[0]["email"] == "nobody@example.com"
    assert ("users.lookupByEmail", "users_not_found") in slack.refusals
    assert not slack.called("conversations.open") and not slack.dms
    skipped = next(e for e in logs if e["event"] == "slack.owner_not_on_slack")
    assert skipped["log_level"] == "debug"
    assert not [e for e in logs if e["log_level"] == "warning"]
    assert not samples(parse(metrics.render().decode()), "countersign_notify_failures_total")

    # The app lacks users:read.email: a real error, counted once, said once; the thread still
    # gets its replies.
    slack.errors["users.lookupByEmail"] = "missing_scope"
    with capture_logs() as logs:
        await deliver_decided(slack, hub, store, make_approval())
    counted = samples(parse(metrics.render().decode()), "countersign_notify_failures_total")
    assert counted == {(("channel", "slack"),): 1.0}
    failed = [e for e in logs if e["event"] == "slack.follow_up_failed"]
    assert len(failed) == 1 and "lacks a scope it needs (users:read.email)" in failed[0]["error"]
    assert [len(t) for t in slack.threads.values()] == [1, 1], "each decision replied"
    await hub.aclose()


async def deliver_decided(
    slack: FakeSlack, hub: NotifyHub, store: MemoryStore, approval: Approval
) -> None:
    """Open `approval` in `store`, deliver it, approve it there and deliver the decision."""
    await store.create_or_join(approval)
    posted = len(slack.messages)
    hub("approval.requested", approval)
    await wait_for(lambda: len(slack.messages) > posted)
    decided = await store.decide(approval.id, record(approver="carol"), time.time())
    hub("approval.decided", decided)
    await hub.aclose(grace_seconds=10)


# -- the reminder ----------------------------------------------------------------------------


def test_the_reminder_is_due_at_80_percent_or_5_minutes_before_whichever_is_later() -> None:
    now = 1_000_000.0
    assert reminder_at(make_approval(created_at=now, expires_at=now + 90)) is None
    assert reminder_at(make_approval(created_at=now, expires_at=now + 600)) == now + 480
    assert reminder_at(make_approval(created_at=now, expires_at=now + 3600)) == now + 3300


def due_soon(**overrides: Any) -> Approval:
    """A pending approval whose reminder falls due in about 0.3 s (lifetime 300 s)."""
    now = time.time()
    return make_approval(created_at=now - 239.7, expires_at=now + 60.3, **overrides)


async def test_the_reminder_names_who_may_still_approve_and_mentions_only_slack_users(
    slack: FakeSlack,
) -> None:
    store = MemoryStore()
    notifier = SlackNotifier(web_client(slack), CHANNEL, store, first_delay=0.05)
    approval = due_soon(
        quorum=2,
        approver_members=(
            "carol@example.com",
            "alice@example.com",  # approved already
            "bob@example.com",
            "dave@example.com",  # not on Slack
        ),
        approver_users=("<!channel>@example.com",),
        requester=Requester(subject="agent-7", issuer="https://idp", owner="bob@example.com"),
    )
    await store.create_or_join(approval)
    await notifier.notify("approval.requested", approval)
    await store.decide(approval.id, record(approver="alice"), time.time())
    await wait_for(lambda: slack.threads, seconds=5)
    (reminder,) = slack.replies()
    assert reminder.startswith(":alarm_clock: *Still pending*: expires <!date^")
    assert "1 more approval needed" in reminder
    assert "<@UCAROL>" in reminder and "`dave@example.com`" in reminder
    assert "UALICE" not in reminder and "UBOB" not in reminder and "bob@" not in reminder
    assert "`&lt;!channel&gt;@example.com`" in reminder and "<!channel>" not in reminder
    assert "(or anyone in `data-owners` signing in with a token)" in reminder
    # Looked up once each; the answers (found or not) are cached.
    lookups = [c["email"] for c in slack.called("users.lookupByEmail")]
    assert sorted(lookups) == sorted(
        ["carol@example.com", "dave@example.com", "<!channel>@example.com"]
    )
    assert await notifier.slack_user("carol@example.com") == "UCAROL"
    assert await notifier.slack_user("dave@example.com") is None
    assert len(slack.called("users.lookupByEmail")) == 3
    await asyncio.sleep(0.3)
    assert len(slack.replies()) == 1, "once"
    await notifier.aclose()


async def test_no_reminder_once_decided_or_for_a_short_approval(slack: FakeSlack) -> None:
    store = MemoryStore()
    notifier = SlackNotifier(web_client(slack), CHANNEL, store, first_delay=0.05)
    decided, short = due_soon(), make_approval()  # short: 60 s, no reminder at all
    for approval in (decided, short):
        await store.create_or_join(approval)
        await notifier.notify("approval.requested", approval)
    await store.decide(decided.id, record(verdict=Verdict.DENY, reason="no"), time.time())
    await asyncio.sleep(0.8)
    assert not slack.threads
    await notifier.aclose()


class Replica:
    """One replica's view of a shared store: leases are held per replica (as Redis does)."""

    def __init__(self, store: MemoryStore, leases: dict[str, str], name: str) -> None:
        self._store, self._leases, self._name = store, leases, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._store, attr)

    async def lease(self, name: str, seconds: float) -> bool:
        holder = self._leases.setdefault(name, self._name)
        return holder == self._name


async def test_replies_the_reminder_and_the_owner_message_are_said_once_across_replicas(
    slack: FakeSlack,
) -> None:
    store, leases = MemoryStore(), {}
    a, b = (
        SlackNotifier(web_client(slack), CHANNEL, Replica(store, leases, name), first_delay=0.05)  # type: ignore[arg-type]
        for name in ("a", "b")
    )
    approval = due_soon(approver_members=("carol@example.com",))
    await store.create_or_join(approval)
    await a.notify("approval.requested", approval)  # A posts
    await b.notify("request.abandoned", approval)  # B sees it pending too
    await wait_for(lambda: slack.threads, seconds=5)
    await asyncio.sleep(0.3)
    assert len(slack.replies()) == 1 and "Still pending" in slack.replies()[0]
    decided = await store.decide(approval.id, record(approver="carol"), time.time())
    await asyncio.gather(
        a.notify("approval.decided", decided), b.notify("approval.decided", decided)
    )
    await asyncio.gather(
        a.notify("approval.decided", decided), b.notify("approval.decided", decided)
    )
    replies = slack.replies()
    assert len(replies) == 2 and "approved via `api`" in replies[1]
    assert len(slack.dms["UALICE"]) == 1  # the owner (alice@example.com), told once
    assert len(slack.posts()) == 1
    for notifier in (a, b):
        await notifier.aclose()


# -- grants chosen in Slack ------------------------------------------------------------------


async def test_approve_and_grant_from_slack_lets_the_next_request_through(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, sink = await make_proxy(with_grant(slack_settings(upstream, slack)))
    call, approval_id = await hold(client, slack)
    shown = message_text(slack)
    assert GRANT in shown and "Approve + grant" in shown
    assert "grant up to 5 more uses of `POST /cloud/exports/customers`" in shown
    assert "for up to 30 min" in shown

    await click(client, block_action("UCAROL", approval_id, GRANT))
    await wait_for(lambda: slack.called("views.open"))
    modal = slack.called("views.open")[0]["view"]
    assert modal["callback_id"] == GRANT
    uses, minutes = (b["element"] for b in modal["blocks"][1:3])
    assert (uses["initial_value"], uses["max_value"]) == ("5", "5")
    assert (minutes["initial_value"], minutes["max_value"]) == ("30", "30")
    metadata = modal["private_metadata"]

    # Beyond the rule's limits, or not a number: the modal says so, nothing is decided.
    for bad_uses, bad_minutes, block in (("6", "30", "grant_uses"), ("3", "x", "grant_time"),
                                         ("0", "10", "grant_uses"), ("²", "10", "grant_uses")):  # fmt: skip
        status, answer = await click(
            client, grant_submission("UCAROL", metadata, bad_uses, bad_minutes)
        )
        assert status == 200 and answer["response_action"] == "errors"
        assert "from 1 to" in answer["errors"][block]
    assert (await approval_state(client, approval_id))["state"] == "pending"

    status, answer = await click(client, grant_submission("UCAROL", metadata, "3", "10", "ok"))
    assert status == 200 and answer is None
    assert (await asyncio.wait_for(call, 10)).status == 200
    decided = sink.named("approval.decided")[0]
    assert decided["channel"] == "slack" and decided["grant"] == {"uses": 3, "seconds": 600}
    grant_id = (await approval_state(client, approval_id))["grant"]["grant_id"]
    assert grant_id

    # The message and the thread show the grant.
    await wait_for(lambda: "upstream answered" in message_text(slack))
    final = message_text(slack)
    assert ":ticket: *Grant*: 3 more uses until <!date^" in final
    assert "pattern `POST /cloud/exports/customers`" in final and grant_id in final
    assert GRANT not in final
    await wait_for(lambda: len(slack.replies()) == 3)
    decision, granted, outcome = slack.replies()
    assert outcome.startswith("*Executed*")
    assert "with a grant of 3 more uses for 10 min" in decision and "`ok`" in decision
    assert granted.startswith(":ticket: *Grant*: 3 more uses") and "granted by" in granted

    # The next request of that shape runs at once, under the grant.
    resp = await client.post("/cloud/exports/customers", json={"other": 1}, headers=AGENT)
    assert resp.status == 200 and resp.headers["Countersign-Grant-Id"] == grant_id
    assert len(slack.posts()) == 1, "no new approval message"


async def test_no_grant_button_where_the_rule_offers_none_and_a_forged_click_is_refused(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack)
    assert GRANT not in message_text(slack) and "Approvers may also grant" not in message_text(
        slack
    )
    await click(client, block_action("UCAROL", approval_id, GRANT))
    await wait_for(lambda: slack.called("chat.postEphemeral"))
    assert "does not offer grants" in slack.called("chat.postEphemeral")[0]["text"]
    assert not slack.called("views.open")
    # A submission crafted with bounds of its own is decided by the service's rules: refused.
    forged = json.dumps({"approval_id": approval_id, "channel": CHANNEL, "grant": [99, 99, 60]})
    await click(client, grant_submission("UCAROL", forged, "50", "50"))
    await wait_for(lambda: len(slack.called("chat.postEphemeral")) == 2)
    assert "grants are not allowed" in slack.called("chat.postEphemeral")[1]["text"]
    assert (await approval_state(client, approval_id))["state"] == "pending"
    call.cancel()


async def test_a_non_approver_gets_no_grant_modal(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(with_grant(slack_settings(upstream, slack)))
    call, approval_id = await hold(client, slack)
    await click(client, block_action("UMALLORY", approval_id, GRANT))
    await wait_for(lambda: slack.called("chat.postEphemeral"))
    assert "not an approver" in slack.called("chat.postEphemeral")[0]["text"]
    assert not slack.called("views.open")
    call.cancel()


# -- the fake answers as Slack does -----------------------------------------------------------


async def test_the_fake_answers_threads_lookups_and_dms_as_slack_does(slack: FakeSlack) -> None:
    client = web_client(slack)

    async def error_of(call: Any) -> str:
        with pytest.raises(SlackApiError) as caught:
            await call
        return str(caught.value.response["error"])

    assert await error_of(client.users_lookupByEmail(email="nobody@example.com")) == (
        "users_not_found"
    )
    found = await client.users_lookupByEmail(email="CAROL@example.com")
    assert found["user"]["id"] == "UCAROL"
    assert await error_of(client.conversations_open(users="UNOBODY")) == "user_not_found"
    assert await error_of(client.conversations_open(users="UGONE")) == "user_disabled"
    assert await error_of(client.conversations_open(users="UBOT")) == "cannot_dm_bot"
    assert (
        await error_of(client.chat_postMessage(channel=CHANNEL, thread_ts="1.000100", text="x"))
        == "thread_not_found"
    )
    parent = await client.chat_postMessage(channel=CHANNEL, text="parent")
    await client.chat_postMessage(channel=CHANNEL, thread_ts=parent["ts"], text="reply")
    assert slack.replies(parent["ts"]) == ["reply"] and len(slack.messages) == 1
    bad = {"type": "number_input", "action_id": "n", "initial_value": "9", "max_value": "5"}
    view = {
        "type": "modal",
        "title": {"type": "plain_text", "text": "t"},
        "blocks": [{"type": "input", "label": {"type": "plain_text", "text": "n"},
                    "element": bad}],
    }  # fmt: skip
    assert await error_of(client.views_open(trigger_id="t", view=view)) == "invalid_arguments"
