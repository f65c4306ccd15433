"""Slack across two `countersign run` replicas on one Redis: held on A, clicked on B.

The fake Slack API runs in the test process; both replicas talk to it. The message reference
lives in the shared store, so whichever replica sees an event can update the one message.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.authn.apikeys import key_digest
from tests.e2e.conftest import Process, free_port
from tests.e2e.test_replicas_e2e import events
from tests.redis_fixture import RedisServer
from tests.slack_fake import (
    BOT_TOKEN,
    CHANNEL,
    SIGNING_SECRET,
    FakeSlack,
    block_action,
    grant_submission,
    signed_request,
)

StartFn = Callable[[str, int], Process]
AGENT_KEY = "cs_slack_e2e_agent_000000000000000000000000"
AGENT = {"Authorization": f"Bearer {AGENT_KEY}"}


def config(
    port: int, upstream: str, redis_url: str, prefix: str, slack_api: str, grant: str = ""
) -> str:
    return f"""
server: {{listen: "127.0.0.1:{port}"}}
identity:
  api_keys:
    - {{sha256: "{key_digest(AGENT_KEY)}", subject: agent-7, groups: [agents], owner: "bob@example.com"}}
store: {{url: "{redis_url}", key_prefix: "{prefix}", timeout_seconds: 1}}
routes:
  - {{name: cloud, prefix: /cloud/, upstream: "{upstream}"}}
approvals:
  timeout_seconds: 60
  groups: {{data-owners: ["carol@example.com"]}}
notify:
  slack:
    bot_token: "{BOT_TOKEN}"
    signing_secret: "{SIGNING_SECRET}"
    channel: "{CHANNEL}"
    api_url: "{slack_api}"
policy:
  rules:
    - name: exports
      methods: [POST]
      paths: ["/cloud/exports/**"]
      action: approve
      approvers: {{groups: [data-owners]}}
      {grant}
"""


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = FakeSlack()
    await fake.start()
    yield fake
    await fake.close()


async def wait_for(predicate: Callable[[], object], seconds: float = 15) -> None:
    for _ in range(int(seconds / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


async def test_held_on_a_clicked_on_b_forwarded_by_a_and_the_message_updated(
    run_countersign: StartFn, upstream: TestServer, fresh_redis: RedisServer, slack: FakeSlack
) -> None:
    prefix = "e2e-slack-" + secrets.token_hex(6)
    a, b = (
        run_countersign(
            config(port, str(upstream.make_url("/")), fresh_redis.url, prefix, slack.api_url),
            port,
        )
        for port in (free_port(), free_port())
    )
    async with aiohttp.ClientSession() as session:

        async def agent_call() -> int:
            async with session.post(f"{a.url}/cloud/exports/x", json={"n": 1}, headers=AGENT) as r:
                return r.status

        held = asyncio.create_task(agent_call())
        await wait_for(lambda: slack.messages)
        message = next(iter(slack.messages.values()))
        approval_id = message["blocks"][-1]["elements"][0]["value"]

        body, headers = signed_request(block_action("UCAROL", approval_id, "countersign_approve"))
        async with session.post(
            f"{b.url}/_countersign/slack/events", data=body, headers=headers
        ) as resp:
            assert resp.status == 200
        assert await asyncio.wait_for(held, 10) == 200

    await wait_for(lambda: "upstream answered *200*" in json.dumps(slack.messages))
    assert len(slack.posts()) == 1
    forwarded = events(a, name="request.forwarded")
    assert [e["approval_id"] for e in forwarded] == [approval_id]
    decided = events(b, name="approval.decided")
    assert decided[0]["channel"] == "slack"
    assert decided[0]["approver"]["email"] == "carol@example.com"


async def test_an_outage_during_the_decision_is_caught_up_once_slack_is_back(
    run_countersign: StartFn, upstream: TestServer, fresh_redis: RedisServer, slack: FakeSlack
) -> None:
    """Held on A, clicked on B while chat.update fails on both: once Slack answers again, the
    message shows the final state (not live buttons for a request that already ran)."""
    prefix = "e2e-slack-" + secrets.token_hex(6)
    a, b = (
        run_countersign(
            config(port, str(upstream.make_url("/")), fresh_redis.url, prefix, slack.api_url),
            port,
        )
        for port in (free_port(), free_port())
    )
    async with aiohttp.ClientSession() as session:

        async def agent_call() -> int:
            async with session.post(f"{a.url}/cloud/exports/x", json={"n": 1}, headers=AGENT) as r:
                return r.status

        held = asyncio.create_task(agent_call())
        await wait_for(lambda: slack.messages)
        message = next(iter(slack.messages.values()))
        approval_id = message["blocks"][-1]["elements"][0]["value"]
        slack.fail_status, slack.fail_methods = 503, {"chat.update"}
        body, headers = signed_request(block_action("UCAROL", approval_id, "countersign_approve"))
        async with session.post(
            f"{b.url}/_countersign/slack/events", data=body, headers=headers
        ) as resp:
            assert resp.status == 200
        assert await asyncio.wait_for(held, 10) == 200
        await wait_for(lambda: len(slack.called("chat.update")) >= 2)
        assert "countersign_approve" in json.dumps(slack.messages), "not updated yet"
        slack.fail_status = None

    await wait_for(lambda: "upstream answered *200*" in json.dumps(slack.messages), seconds=40)
    assert "countersign_approve" not in json.dumps(slack.messages)
    assert len(slack.posts()) == 1


async def test_the_bot_missing_from_its_channel_is_said_at_start_in_one_line(
    run_countersign: StartFn, upstream: TestServer, fresh_redis: RedisServer, slack: FakeSlack
) -> None:
    slack.channels[CHANNEL]["is_member"] = False
    prefix = "e2e-slack-" + secrets.token_hex(6)
    port = free_port()
    proc = run_countersign(
        config(port, str(upstream.make_url("/")), fresh_redis.url, prefix, slack.api_url), port
    )
    await wait_for(lambda: "slack.setup_problem" in proc.stderr())
    lines = [line for line in proc.stderr().splitlines() if "slack.setup_problem" in line]
    assert len(lines) == 1
    assert f"the bot is not in channel {CHANNEL}: /invite @countersign" in lines[0]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{proc.url}/_countersign/readyz") as resp,
    ):
        assert resp.status == 200, "said, not fatal"


async def test_a_grant_chosen_in_slack_is_replied_the_owner_told_and_the_next_request_runs(
    run_countersign: StartFn, upstream: TestServer, fresh_redis: RedisServer, slack: FakeSlack
) -> None:
    """Through the real `countersign run`: "Approve + grant…" opens the modal, its submission
    approves with a grant; the decision, the grant and the outcome are replied in the message's
    thread, the agent's owner gets a direct message, and the next request of that shape runs
    at once with `Countersign-Grant-Id`."""
    prefix = "e2e-slack-" + secrets.token_hex(6)
    port = free_port()
    proc = run_countersign(
        config(
            port,
            str(upstream.make_url("/")),
            fresh_redis.url,
            prefix,
            slack.api_url,
            grant="grant: {max_uses: 3, max_seconds: 600}",
        ),
        port,
    )
    events_url = f"{proc.url}/_countersign/slack/events"
    async with aiohttp.ClientSession() as session:

        async def agent_call(n: int) -> tuple[int, str | None]:
            async with session.post(
                f"{proc.url}/cloud/exports/x", json={"n": n}, headers=AGENT
            ) as r:
                return r.status, r.headers.get("Countersign-Grant-Id")

        async def post(payload: dict[str, object]) -> str:
            body, headers = signed_request(payload)
            async with session.post(events_url, data=body, headers=headers) as resp:
                assert resp.status == 200
                return await resp.text()

        held = asyncio.create_task(agent_call(1))
        await wait_for(lambda: slack.messages)
        message = next(iter(slack.messages.values()))
        buttons = message["blocks"][-1]["elements"]
        assert [b["action_id"] for b in buttons][2] == "countersign_approve_grant"
        approval_id = buttons[0]["value"]

        await post(block_action("UCAROL", approval_id, "countersign_approve_grant"))
        await wait_for(lambda: slack.called("views.open"))
        metadata = slack.called("views.open")[0]["view"]["private_metadata"]
        refused = await post(grant_submission("UCAROL", metadata, "4", "10"))
        assert json.loads(refused)["response_action"] == "errors", "4 uses: beyond the rule"
        assert await post(grant_submission("UCAROL", metadata, "2", "5")) == ""
        assert await asyncio.wait_for(held, 10) == (200, None)

        await wait_for(lambda: len(slack.replies()) == 3)
        decision, granted, outcome = slack.replies()
        assert "`carol@example.com` approved via `slack`" in decision
        assert "with a grant of 2 more uses for 5 min" in decision
        assert granted.startswith(":ticket: *Grant*: 2 more uses until")
        assert "pattern `POST /cloud/exports/x`" in granted
        assert outcome.startswith("*Executed*")
        await wait_for(lambda: slack.dms.get("UBOB"))
        assert "*approved* by `carol@example.com`" in slack.dms["UBOB"][0]["text"]

        status, grant_id = await agent_call(2)
        assert status == 200 and grant_id is not None and grant_id.startswith("grt_")
    assert len(slack.posts()) == 1, "the grant's use asks nobody"
    assert "2 more uses until" in json.dumps(slack.messages)
    used = events(proc, name="grant.used")
    assert [e["grant_id"] for e in used] == [grant_id]
