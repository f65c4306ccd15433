"""Slack end to end in process: the real proxy, a local fake of the Slack API, signed clicks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from slack_sdk.web.async_client import AsyncWebClient
from structlog.testing import capture_logs

from proxy.config import (
    ApprovalsSettings,
    NotifySettings,
    RedactSettings,
    Settings,
    SlackSettings,
)
from proxy.notify import NotifyHub
from proxy.server.metrics import Metrics
from proxy.slack.delivery import SlackHealth, SlackNotifier
from proxy.store.memory import MemoryStore
from tests.conftest import Client, Factory
from tests.helpers import AGENT_KEY, ALICE_KEY, bearer, settings_for
from tests.slack_fake import (
    APP_TOKEN,
    BOT_TOKEN,
    CHANNEL,
    SIGNING_SECRET,
    FakeSlack,
    block_action,
    envelope,
    signed_request,
    view_submission,
)
from tests.store_conformance import make_approval
from tests.test_metrics import parse, samples

AGENT = bearer(AGENT_KEY)
EVENTS = "/_countersign/slack/events"
PUBLIC_URL = "https://countersign.example.com"
EVIL_REASON = "<!channel> @here <https://evil.example|click> <@U999> & @everyone"


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = FakeSlack()
    await fake.start()
    yield fake
    await fake.close()


def slack_settings(upstream: TestServer, fake: FakeSlack, **slack: Any) -> Settings:
    base = settings_for(str(upstream.make_url("/")))
    fields: dict[str, Any] = {
        "bot_token": BOT_TOKEN,
        "signing_secret": SIGNING_SECRET,
        "channel": CHANNEL,
        "api_url": fake.api_url,
        **slack,
    }
    return base.model_copy(
        update={
            "server": base.server.model_copy(update={"public_url": PUBLIC_URL}),
            "notify": NotifySettings(slack=SlackSettings(**fields)),
            # Slack approvers carry no token groups: the directory says who is a data owner.
            "approvals": ApprovalsSettings(
                mode="hold",
                timeout_seconds=60,
                groups={
                    "data-owners": ("carol@example.com", "alice@example.com", "bob@example.com")
                },
            ),
        }
    )


async def wait_for(predicate: Callable[[], Any], seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def hold(
    client: Client, slack: FakeSlack, path: str = "/cloud/exports/customers", **headers: str
) -> tuple[asyncio.Task[Any], str]:
    """The agent's privileged call, held; returns the waiting call and the approval id."""
    before = len(slack.posts())
    call = asyncio.create_task(
        client.post(
            path,
            json={"format": "csv", "password": "hunter2", "note": "<!everyone>"},
            headers={**AGENT, **headers},
        )
    )
    await wait_for(lambda: len(slack.posts()) > before)
    message = slack.posts()[-1]
    approval_id = message["blocks"][-1]["elements"][0]["value"]
    return call, approval_id


async def click(client: Client, payload: dict[str, Any], **kw: Any) -> tuple[int, Any]:
    body, headers = signed_request(payload, **kw)
    resp = await client.post(EVENTS, data=body, headers=headers)
    text = await resp.text()
    return resp.status, (json.loads(text) if text else None)


def message_text(slack: FakeSlack) -> str:
    """Everything the (only) approval message currently shows."""
    assert len(slack.messages) == 1
    return json.dumps(next(iter(slack.messages.values())))


async def approval_state(client: Client, approval_id: str) -> dict[str, Any]:
    resp = await client.get(f"/_countersign/api/approvals/{approval_id}", headers=bearer(ALICE_KEY))
    data: dict[str, Any] = await resp.json()
    return data


async def test_message_has_every_field_and_agent_text_is_inert(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack, **{"Countersign-Reason": EVIL_REASON})
    message = slack.called("chat.postMessage")[0]
    assert message["channel"] == CHANNEL
    assert message["_token"] == f"Bearer {BOT_TOKEN}"
    shown = json.dumps(message["blocks"]) + message["text"]
    for expected in (
        "agent-key",  # requester subject
        "bob@example.com",  # the owner it acts for
        "POST",
        "/cloud/exports/customers",
        "cloud / exports",  # route / rule
        "0 of 1",  # quorum progress
        "<!date^",  # expiry, in the reader's time zone
        f"<{PUBLIC_URL}/_countersign/ui/approvals/{approval_id}|Open in Countersign>",
        '\\"format\\": \\"csv\\"',  # the body preview
        "countersign_approve",
        "countersign_approve_note",
        "countersign_deny",
    ):
        assert expected in shown, expected
    assert "hunter2" not in shown, "the body preview is redacted"
    # The agent's text is shown, inert: no broadcast, no mention, no link of its own.
    assert "&lt;!channel&gt;" in shown and "&lt;https://evil.example|click&gt;" in shown
    assert "&lt;@U999&gt;" in shown and "&amp;" in shown
    for live in ("<!channel>", "<!everyone>", "<https://evil", "<@U999>", "@here", "@everyone"):
        assert live not in shown, live
    call.cancel()


async def test_approve_click_forwards_the_held_request_and_updates_the_message(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, sink = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack)
    status, _ = await click(client, block_action("UCAROL", approval_id, "countersign_approve"))
    assert status == 200
    resp = await asyncio.wait_for(call, 10)
    assert resp.status == 200
    assert resp.headers["Countersign-Approval-Id"] == approval_id
    decided = sink.named("approval.decided")
    assert decided[0]["channel"] == "slack"
    assert decided[0]["approver"] == {
        "subject": "carol@example.com",
        "issuer": "slack",
        "email": "carol@example.com",
        "person": "carol@example.com",
    }
    await wait_for(lambda: "upstream answered *200*" in message_text(slack))
    final = message_text(slack)
    assert "carol@example.com" in final and "upstream answered *200*" in final
    assert "countersign_approve" not in final, "the buttons are replaced by the outcome"
    assert len(slack.posts()) == 1


async def test_quorum_progress_is_shown_after_each_approval(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack, path="/cloud/iam/roles")
    assert "0 of 2" in message_text(slack)
    await click(client, block_action("UCAROL", approval_id, "countersign_approve"))
    await wait_for(lambda: "1 of 2" in message_text(slack))
    assert "countersign_approve" in message_text(slack), "still pending: buttons stay"
    await click(client, block_action("UALICE", approval_id, "countersign_approve"))
    assert (await asyncio.wait_for(call, 10)).status == 200
    await wait_for(lambda: "upstream answered" in message_text(slack))


async def test_deny_opens_a_modal_that_requires_a_reason(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack)
    status, _ = await click(client, block_action("UCAROL", approval_id, "countersign_deny"))
    assert status == 200
    modal = slack.called("views.open")[0]["view"]
    assert modal["callback_id"] == "countersign_deny"
    assert modal["blocks"][-1]["optional"] is False
    status, answer = await click(
        client, view_submission("UCAROL", "countersign_deny", approval_id, "  ")
    )
    assert status == 200
    assert answer == {"response_action": "errors", "errors": {"reason": "A denial needs a reason."}}
    assert (await approval_state(client, approval_id))["state"] == "pending"
    status, answer = await click(
        client, view_submission("UCAROL", "countersign_deny", approval_id, "not this quarter")
    )
    assert status == 200 and answer is None
    resp = await asyncio.wait_for(call, 10)
    assert resp.status == 403
    body = await resp.json()
    error = body["error"]
    assert error["code"] == "approval_denied" and error["reason"] == "not this quarter"
    assert error["decided_by"] == "carol@example.com"
    assert error["message"].startswith("Denied by carol@example.com: not this quarter. ")
    await wait_for(lambda: "Denied" in message_text(slack))
    assert "not this quarter" in message_text(slack)


async def test_approve_with_note_records_the_note(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack)
    await click(client, block_action("UCAROL", approval_id, "countersign_approve_note"))
    modal = slack.called("views.open")[0]["view"]
    assert modal["callback_id"] == "countersign_approve_note" and modal["blocks"][-1]["optional"]
    await click(
        client,
        view_submission("UCAROL", "countersign_approve_note", approval_id, "ok for Q3 @channel"),
    )
    assert (await asyncio.wait_for(call, 10)).status == 200
    decisions = (await approval_state(client, approval_id))["decisions"]
    assert decisions[0]["reason"] == "ok for Q3 @channel" and decisions[0]["channel"] == "slack"
    await wait_for(lambda: "upstream answered" in message_text(slack))
    assert "ok for Q3 @\\u2060channel" in message_text(slack), "approvers' text is inert too"


@pytest.mark.parametrize("how", ["forged", "stale", "unsigned"])
async def test_bad_signatures_get_401_and_change_nothing(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack, how: str
) -> None:
    client, _ = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack)
    payload = block_action("UCAROL", approval_id, "countersign_approve")
    if how == "forged":
        body, headers = signed_request(payload, secret="not-the-secret")
    elif how == "stale":
        body, headers = signed_request(payload, timestamp=int(time.time()) - 6 * 60)
    else:
        body, headers = signed_request(payload)
        del headers["X-Slack-Signature"]
    resp = await client.post(EVENTS, data=body, headers=headers)
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "unauthorized"
    await asyncio.sleep(0.2)
    assert (await approval_state(client, approval_id))["state"] == "pending"
    assert not slack.called("users.info") and not slack.called("chat.update")
    assert not call.done()
    call.cancel()


async def test_a_replayed_delivery_decides_once_and_says_nothing_twice(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, sink = await make_proxy(slack_settings(upstream, slack, channel=None))
    call = asyncio.create_task(client.post("/cloud/iam/roles", json={}, headers=AGENT))
    await wait_for(lambda: sink.named("approval.requested"))
    approval_id = sink.named("approval.requested")[0]["approval_id"]
    payload = block_action("UCAROL", approval_id, "countersign_approve")
    for _ in range(3):  # Slack retrying the same delivery
        status, _ = await click(client, payload)
        assert status == 200
    await asyncio.sleep(0.3)
    state = await approval_state(client, approval_id)
    assert state["approvals"] == 1 and len(state["decisions"]) == 1
    assert len(sink.named("approval.decided")) == 1
    assert not slack.called("chat.postEphemeral")
    assert not slack.called("chat.postMessage"), "no channel configured: no message"
    call.cancel()


@pytest.mark.parametrize(
    ("user_id", "explanation"),
    [
        ("UMALLORY", "not an approver"),
        ("UBOB", "acting for you"),  # the agent's owner: zero self-approval
        ("UBOT", "bots cannot"),
        ("UGONE", "deactivated"),
        ("UNOMAIL", "no email"),
        ("UGUEST", "only members of this workspace"),
        ("UNKNOWN", "could not tell who you are (user_not_found)"),
    ],
)
async def test_refused_clickers_get_an_ephemeral_note_and_change_nothing(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack, user_id: str, explanation: str
) -> None:
    client, sink = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack)
    for action in ("countersign_approve", "countersign_deny"):
        status, _ = await click(client, block_action(user_id, approval_id, action))
        assert status == 200
    await wait_for(lambda: len(slack.called("chat.postEphemeral")) == 2)
    for note in slack.called("chat.postEphemeral"):
        assert note["user"] == user_id and note["channel"] == CHANNEL
        assert explanation in note["text"], note["text"]
    assert not slack.called("views.open"), "no modal for someone who cannot decide"
    assert (await approval_state(client, approval_id))["state"] == "pending"
    assert not sink.named("approval.decided") and not call.done()
    call.cancel()


async def test_a_decision_on_a_finished_approval_is_explained(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack)
    await click(client, block_action("UCAROL", approval_id, "countersign_approve"))
    assert (await asyncio.wait_for(call, 10)).status == 200
    await click(client, block_action("UALICE", approval_id, "countersign_approve"))
    await wait_for(lambda: slack.called("chat.postEphemeral"))
    assert "approval is executed" in slack.called("chat.postEphemeral")[0]["text"]


async def test_slack_down_never_blocks_and_the_message_is_posted_when_it_is_back(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, sink = await make_proxy(slack_settings(upstream, slack))
    slack.fail_status = 500
    call = asyncio.create_task(client.post("/cloud/exports/x", json={"n": 1}, headers=AGENT))
    await wait_for(lambda: sink.named("approval.requested"))
    approval_id = sink.named("approval.requested")[0]["approval_id"]
    started = time.monotonic()
    resp = await client.post(
        f"/_countersign/api/approvals/{approval_id}/decision",
        json={"verdict": "approve"},
        headers=bearer(ALICE_KEY),
    )
    assert resp.status == 200 and time.monotonic() - started < 1
    assert (await asyncio.wait_for(call, 10)).status == 200
    await wait_for(lambda: slack.called("chat.postMessage"))  # tried, and failed
    assert not slack.messages
    slack.fail_status = None  # Slack is back: the retry posts it, showing the outcome
    await wait_for(lambda: slack.messages, seconds=15)
    await wait_for(lambda: "upstream answered" in message_text(slack), seconds=15)
    assert len(slack.messages) == 1


async def test_socket_mode_interactive_envelope_approves_and_is_acked(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    settings = slack_settings(upstream, slack, signing_secret=None, app_token=APP_TOKEN)
    client, _ = await make_proxy(settings)
    await wait_for(lambda: slack.sockets)
    assert slack.called("apps.connections.open")[0]["_token"] == f"Bearer {APP_TOKEN}"
    call, approval_id = await hold(client, slack)
    # HTTP mode is off without a signing secret.
    assert (await client.post(EVENTS, data=b"")).status != 200

    deny = envelope(view_submission("UCAROL", "countersign_deny", approval_id, ""))
    await slack.push(deny)
    await wait_for(lambda: slack.acks)
    assert slack.acks[0]["envelope_id"] == deny["envelope_id"]
    assert slack.acks[0]["payload"]["response_action"] == "errors"

    approve = envelope(block_action("UCAROL", approval_id, "countersign_approve"))
    await slack.push(approve)
    assert (await asyncio.wait_for(call, 10)).status == 200
    await wait_for(lambda: len(slack.acks) == 2)
    assert slack.acks[1]["envelope_id"] == approve["envelope_id"]
    await wait_for(lambda: "upstream answered" in message_text(slack))


async def test_expiry_replaces_the_buttons(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    settings = slack_settings(upstream, slack)
    settings = settings.model_copy(
        update={"approvals": settings.approvals.model_copy(update={"timeout_seconds": 1})}
    )
    client, _ = await make_proxy(settings)
    call, _ = await hold(client, slack)
    resp = await asyncio.wait_for(call, 10)
    assert resp.status == 403 and (await resp.json())["error"]["code"] == "approval_expired"
    await wait_for(lambda: "Expired" in message_text(slack))
    assert "countersign_approve" not in message_text(slack)


def test_slack_settings_blank_values_turn_it_off_and_a_bot_token_is_required() -> None:
    from proxy.config import ConfigError, load_settings_text

    text = 'notify:\n  slack: {bot_token: "${T:-}", signing_secret: "${S:-}", channel: "C1"}\n'
    with pytest.raises(ConfigError, match="bot_token is required"):
        load_settings_text(text, "x.yaml", env={})
    off = load_settings_text(text.replace('"C1"', '"${C:-}"'), "x.yaml", env={})
    assert off.notify.slack is not None and off.notify.slack.bot_token is None
    on = load_settings_text(text, "x.yaml", env={"T": "xoxb-1", "S": "s"})
    assert on.notify.slack is not None and on.notify.slack.api_url == "https://slack.com/api/"


async def test_secrets_in_the_request_and_in_notes_never_reach_slack(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    base = slack_settings(upstream, slack)
    redact = RedactSettings(fields=("ssn",), patterns=(r"ACME-[0-9]{6}",))
    settings = base.model_copy(update={"audit": base.audit.model_copy(update={"redact": redact})})
    client, _ = await make_proxy(settings)
    key = "sk-" + "proj-" + "Ab3dE6fG9h" * 3  # made up, built so no scanner flags it
    call, approval_id = await hold(
        client,
        slack,
        path="/cloud/exports/customers?format=csv&token=tok-0123456789&ssn=123-45-6789",
        **{"Countersign-Reason": f"ACME-123456: my password is: hunter2, use key {key}"},
    )
    shown = message_text(slack)
    for secret in ("tok-0123456789", "123-45-6789", "ACME-123456", "hunter2", key):
        assert secret not in shown, secret
    assert "format=csv&amp;token=[REDACTED]&amp;ssn=[REDACTED]" in shown, "names stay visible"
    assert "my password is: [REDACTED]" in shown
    await click(client, block_action("UCAROL", approval_id, "countersign_approve_note"))
    note = "ok, then rotate api_key=abc123xyz and ACME-654321"
    await click(client, view_submission("UCAROL", "countersign_approve_note", approval_id, note))
    assert (await asyncio.wait_for(call, 10)).status == 200
    await wait_for(lambda: "upstream answered" in message_text(slack))
    final = message_text(slack)
    assert "abc123xyz" not in final and "ACME-654321" not in final
    assert "ok, then rotate api_key=[REDACTED] and [REDACTED]" in final


async def test_message_shows_what_will_run_target_upstream_and_bound_headers(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(slack_settings(upstream, slack))
    call, _ = await hold(
        client,
        slack,
        "/cloud/exports/customers?region=eu&limit=10",
        **{"X-Env": "prod", "X-Api-Key": "sk-live-very-secret-value-123"},
    )
    text = message_text(slack)
    # The target as forwarded and where to (`&` as Slack's mrkdwn escapes it).
    assert "/api/exports/customers?region=eu&amp;limit=10" in text
    assert str(upstream.make_url("/api/exports/customers")) + "?region=eu&amp;limit=10" in text
    assert "x-env: prod" in text
    assert "x-api-key: [REDACTED] (secret)" in text
    assert "very-secret" not in text
    call.cancel()


async def test_a_slack_delivery_that_gives_up_is_counted_and_shown_on_readyz(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    """Slack refusing (400: not retried) fails the delivery at once: counted on /metrics,
    reported `"slack": "down"` on readyz (from the delivery, without an auth.test), and the
    approval goes on."""
    client, sink = await make_proxy(slack_settings(upstream, slack))
    await wait_for(lambda: slack.called("conversations.info"))  # the start-up check is done
    probes = len(slack.called("auth.test"))
    slack.fail_status = 400
    call = asyncio.create_task(client.post("/cloud/exports/x", json={"n": 1}, headers=AGENT))
    await wait_for(lambda: sink.named("approval.requested"))

    async def failures() -> float:
        text = await (await client.get("/_countersign/metrics")).text()
        counted = samples(parse(text), "countersign_notify_failures_total")
        return counted.get((("channel", "slack"),), 0.0)

    for _ in range(100):
        if await failures():
            break
        await asyncio.sleep(0.05)
    assert await failures() == 1
    resp = await client.get("/_countersign/readyz")
    assert resp.status == 200
    assert (await resp.json())["dependencies"]["slack"] == "down"
    assert len(slack.called("auth.test")) == probes, "readyz used the delivery's outcome"
    approval_id = sink.named("approval.requested")[0]["approval_id"]
    resp = await client.post(
        f"/_countersign/api/approvals/{approval_id}/decision",
        json={"verdict": "approve"},
        headers=bearer(ALICE_KEY),
    )
    assert resp.status == 200
    assert (await asyncio.wait_for(call, 10)).status == 200


async def test_slack_down_past_the_retry_window_is_counted_once_per_delivery(
    slack: FakeSlack,
) -> None:
    """Answering 500 (retried) until `retry_seconds` runs out once the approval is no longer
    pending (here: it expired): one failure counted, one warning logged, and the notifier's
    health says "down"."""
    slack.fail_status = 500
    metrics = Metrics()
    hub = NotifyHub(on_failure=metrics.notify_failure)
    client = AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url, retry_handlers=[])
    health = SlackHealth(client)
    hub.add(
        SlackNotifier(
            client, CHANNEL, MemoryStore(), retry_seconds=0.3, first_delay=0.05, health=health
        )
    )
    with capture_logs() as logs:
        hub("approval.requested", make_approval(expires_at=time.time() - 1))
        await hub.aclose()
    counted = samples(parse(metrics.render().decode()), "countersign_notify_failures_total")
    assert counted == {(("channel", "slack"),): 1.0}
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["notify.failed"]
    assert len(slack.called("chat.postMessage")) > 1, "retried before giving up"
    assert await health.state() == "down"
    assert not slack.called("auth.test")


# -- delivery that outlasts outages ------------------------------------------------------------


def web_client(slack: FakeSlack) -> AsyncWebClient:
    return AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url, retry_handlers=[])


async def test_a_rate_limit_is_waited_out_as_long_as_slack_asks(slack: FakeSlack) -> None:
    slack.rate_limited, slack.retry_after = 1, 1
    notifier = SlackNotifier(web_client(slack), CHANNEL, MemoryStore(), first_delay=0.01)
    await asyncio.wait_for(notifier.notify("approval.requested", make_approval()), 10)
    times = [at for method, at in slack.call_times if method == "chat.postMessage"]
    assert len(times) == 2, "refused once (429), then posted"
    assert times[1] - times[0] >= 0.95, "Retry-After: 1 honoured (not the 10 ms backoff)"
    assert len(slack.messages) == 1
    await notifier.aclose()


async def test_a_hung_slack_call_times_out_and_is_retried(slack: FakeSlack) -> None:
    slack.delays["chat.postMessage"] = 3  # far longer than the call timeout
    notifier = SlackNotifier(
        web_client(slack), CHANNEL, MemoryStore(), call_timeout=0.5, first_delay=0.05
    )
    started = time.monotonic()
    delivery = asyncio.create_task(notifier.notify("approval.requested", make_approval()))
    await wait_for(lambda: len(slack.called("chat.postMessage")) >= 2, seconds=5)
    assert time.monotonic() - started < 2.5, "the first call gave up after ~0.5 s"
    del slack.delays["chat.postMessage"]
    await asyncio.wait_for(delivery, 10)
    assert slack.messages
    await notifier.aclose()


async def test_a_pending_approval_is_retried_past_the_retry_window(slack: FakeSlack) -> None:
    """While it can still be decided, a message is never given up (retry_seconds counts only
    once the approval has left `pending`)."""
    slack.fail_status = 503
    notifier = SlackNotifier(
        web_client(slack), CHANNEL, MemoryStore(), retry_seconds=0.1, first_delay=0.05,
        max_delay=0.1,
    )  # fmt: skip
    delivery = asyncio.create_task(notifier.notify("approval.requested", make_approval()))
    await asyncio.sleep(1.0)
    assert not delivery.done() and len(slack.called("chat.postMessage")) > 3
    slack.fail_status = None
    await asyncio.wait_for(delivery, 5)
    assert len(slack.messages) == 1
    await notifier.aclose()


async def test_an_outage_during_the_decision_shows_the_final_state_once_slack_is_back(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, _ = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack)
    slack.fail_status = 503
    resp = await client.post(
        f"/_countersign/api/approvals/{approval_id}/decision",
        json={"verdict": "approve"},
        headers=bearer(ALICE_KEY),
    )
    assert resp.status == 200
    assert (await asyncio.wait_for(call, 10)).status == 200
    await wait_for(lambda: slack.called("chat.update"))  # tried during the outage
    await asyncio.sleep(0.5)
    assert "countersign_approve" in message_text(slack), "still the old message"
    slack.fail_status = None
    await wait_for(lambda: "upstream answered *200*" in message_text(slack), seconds=20)
    assert "countersign_approve" not in message_text(slack)
    assert len(slack.messages) == 1


async def test_a_refused_message_is_posted_as_the_minimal_one_and_counted(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    client, sink = await make_proxy(slack_settings(upstream, slack))
    slack.refuse_blocks = True
    call = asyncio.create_task(client.post("/cloud/exports/x", json={"n": 1}, headers=AGENT))
    await wait_for(lambda: slack.messages)
    approval_id = sink.named("approval.requested")[0]["approval_id"]
    message = next(iter(slack.messages.values()))
    assert "blocks" not in message
    assert f"<{PUBLIC_URL}/_countersign/ui/approvals/{approval_id}|" in message["text"]
    assert ("chat.postMessage", "invalid_blocks") in slack.refusals

    async def fallbacks() -> dict[Any, float]:
        text = await (await client.get("/_countersign/metrics")).text()
        return samples(parse(text), "countersign_slack_fallback_messages_total")

    await asyncio.sleep(0.1)
    assert await fallbacks() == {(): 1.0}
    call.cancel()


async def test_a_slow_users_info_never_fails_a_click(
    make_proxy: Factory, upstream: TestServer, slack: FakeSlack
) -> None:
    """users.info takes 4 s; Slack wants an answer within 3 s: the click is acknowledged at
    once and decided when the lookup returns. A Deny click still opens its modal in time."""
    client, sink = await make_proxy(slack_settings(upstream, slack))
    call, approval_id = await hold(client, slack)
    slack.delays["users.info"] = 4
    started = time.monotonic()
    status, _ = await click(client, block_action("UALICE", approval_id, "countersign_deny"))
    assert status == 200 and time.monotonic() - started < 3
    await wait_for(lambda: slack.called("views.open"), seconds=5)
    opened = next(at for method, at in slack.call_times if method == "views.open")
    assert opened - started < 3, "the modal opens within Slack's trigger window"

    started = time.monotonic()
    status, _ = await click(client, block_action("UCAROL", approval_id, "countersign_approve"))
    assert status == 200 and time.monotonic() - started < 3
    assert (await asyncio.wait_for(call, 15)).status == 200
    decided = sink.named("approval.decided")
    assert [d["approver"]["email"] for d in decided] == ["carol@example.com"]


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        ({"is_member": False}, "the bot is not in channel C0APPROVALS: /invite @countersign"),
        (None, "channel C0APPROVALS does not exist or the bot cannot see it"),
    ],
)
async def test_the_setup_is_checked_at_start_and_a_problem_logged_in_one_line(
    make_proxy: Factory,
    upstream: TestServer,
    slack: FakeSlack,
    channel: dict[str, Any] | None,
    expected: str,
) -> None:
    if channel is None:
        del slack.channels[CHANNEL]
    else:
        slack.channels[CHANNEL].update(channel)
    with capture_logs() as logs:
        client, _ = await make_proxy(slack_settings(upstream, slack))
        await wait_for(lambda: any(e["event"] == "slack.setup_problem" for e in logs))
    problems = [e["problem"] for e in logs if e["event"] == "slack.setup_problem"]
    assert len(problems) == 1 and expected in problems[0], problems
    assert (await client.get("/_countersign/readyz")).status == 200, "said, not fatal"


async def test_a_channel_the_bot_is_not_in_gives_up_at_once_and_is_counted(
    slack: FakeSlack,
) -> None:
    slack.channels[CHANNEL]["is_member"] = False
    metrics = Metrics()
    hub = NotifyHub(on_failure=metrics.notify_failure)
    hub.add(SlackNotifier(web_client(slack), CHANNEL, MemoryStore(), first_delay=0.05))
    with capture_logs() as logs:
        hub("approval.requested", make_approval())
        await hub.aclose()
    counted = samples(parse(metrics.render().decode()), "countersign_notify_failures_total")
    assert counted == {(("channel", "slack"),): 1.0}
    (failed,) = [e for e in logs if e["event"] == "notify.failed"]
    assert "the bot is not in channel C0APPROVALS" in failed["error"]
    assert len(slack.called("chat.postMessage")) == 1, "not retried: it needs a person"
