"""Messages Slack always accepts, showing the agent's text literally.

A seeded generator of adversarial approvals (huge `&<>` bodies, bidi overrides, zero-width
characters, mrkdwn, mentions, emoji codes, long everything, many decisions with long notes, astral
unicode) feeds the real formatter; the strict fake's Block Kit checks (`block_errors`) must accept
every message and modal, and nothing the agent wrote may be rendered as formatting: all of it sits
inside code spans or blocks that it cannot close, with no raw `<`, `>` and no invisible character.
A sample goes through the real notifier into the running fake.
"""

from __future__ import annotations

import json
import random
import re
import time
import unicodedata
from collections.abc import AsyncIterator
from typing import Any

import pytest
from slack_sdk.web.async_client import AsyncWebClient

from proxy.model import Approval, ApprovalState, Outcome, Requester, Verdict
from proxy.notify import NotifyHub
from proxy.server.metrics import Metrics
from proxy.slack import limits
from proxy.slack.blocks import (
    MAX_DECISIONS_SHOWN,
    approval_blocks,
    decision_reply,
    decisions_text,
    fallback_text,
    grant_modal,
    grant_reply,
    header_text,
    minimal_text,
    outcome_reply,
    owner_message,
    reason_modal,
    reminder_reply,
)
from proxy.slack.delivery import SlackNotifier
from proxy.slack.mrkdwn import literal, render
from proxy.store.memory import MemoryStore
from tests.slack_fake import BOT_TOKEN, CHANNEL, FakeSlack, block_errors, view_errors
from tests.store_conformance import make_approval, record
from tests.test_metrics import parse, samples

PUBLIC_URL = "https://countersign.example.com"
# Every piece of agent text carries this mark, so a leak out of code is visible.
MARK = "zqx"
PIECES = [
    "&<>" * 50,
    "&amp;&lt;",
    "\u202egpj.exe",  # right-to-left override: …cod.exe reads …exe.doc
    "\u2066isolate\u2069",
    "a\u200bb\u200cc\u200dd\ufeffe\u2060f",
    "*zqxbold*",
    "_zqxitalic_",
    "~zqxstrike~",
    "`zqxcode`",
    "```zqxblock```",
    "\n> zqxquote\n",
    "<!channel>",
    "<!here|here>",
    "<@U999>",
    "<#C999>",
    "<https://evil.example|zqxclick>",
    ":white_check_mark: approved by ciso",
    ":zqx_emoji:",
    "@here @everyone @channel",
    "👩\u200d👩\u200d👧 " + "".join(chr(0x1D518 + i) for i in range(6)),  # astral
    "日本語のテキスト",
    "e\u0301\u0301\u0301",
    "\r\n",
    "\x00\x07\x1b[31m",
    "\u2028\u2029",
    " ",
    "\t",
]


def nasty(rng: random.Random, longest: int) -> str:
    parts: list[str] = []
    size = 0
    target = rng.choice([1, 10, 100, 1000, longest])
    while size < target:
        piece = rng.choice(PIECES)
        if rng.random() < 0.1:
            piece = piece * rng.randint(2, 200)
        parts.append(piece + MARK)
        size += len(piece) + len(MARK)
    return "".join(parts)[: max(target, len(MARK))] + MARK


def adversarial(rng: random.Random) -> Approval:
    def text(longest: int = 3000) -> str:
        return nasty(rng, longest)

    state = rng.choice(list(ApprovalState))
    decisions = tuple(
        record(
            rng.choice([Verdict.APPROVE, Verdict.DENY]),
            approver=text(300),
            channel=rng.choice(["api", "slack", "web", text(50)]),
            reason=text(2000) if rng.random() < 0.8 else None,
            person=text(200) if rng.random() < 0.5 else None,
        )
        for _ in range(rng.choice([0, 1, 2, 5, 12, 40]))
    )
    granting = rng.random() < 0.4
    return make_approval(
        # An id of letters the mark cannot spell (it is shown outside code, in the link).
        id="apr_" + "".join(rng.choice("ABCDEFGHJK0123456789") for _ in range(24)),
        state=state,
        method=rng.choice(["POST", "DELETE", text(40)]),
        path="/" + text(5000),
        query=text(3000) if rng.random() < 0.5 else "",
        target="/" + text(8000) if rng.random() < 0.5 else "",
        upstream_url=text(3000),
        rule=text(300),
        route=text(300),
        reason=text(10_000) if rng.random() < 0.9 else None,
        requester=Requester(
            subject=text(500),
            issuer="https://idp",
            email=text(300) if rng.random() < 0.5 else None,
            owner=text(300) if rng.random() < 0.5 else None,
            person=text(300) if rng.random() < 0.3 else None,
        ),
        body_preview=text(64_000) if rng.random() < 0.8 else "",
        body_bytes=rng.randint(0, 10**9),
        content_type=text(200) if rng.random() < 0.5 else None,
        body_truncated=rng.random() < 0.5,
        headers=tuple(
            (text(100), text(4000), rng.random() < 0.2) for _ in range(rng.randint(0, 30))
        ),
        actions=tuple(text(200) for _ in range(rng.randint(0, 60))),
        tool_arguments=text(20_000) if rng.random() < 0.3 else None,
        earlier_attempt=text(100) if rng.random() < 0.2 else None,
        abandoned_at=time.time() if rng.random() < 0.2 else None,
        decisions=decisions,
        quorum=rng.choice([1, 2, 5, 50]),
        outcome=rng.choice([None, Outcome.COMPLETED, Outcome.AMBIGUOUS]),
        upstream_status=rng.choice([None, 200, 502]),
        risk=text(100) if rng.random() < 0.3 else None,
        note=text(3000) if rng.random() < 0.3 else None,
        approver_members=tuple(text(100) for _ in range(rng.randint(0, 20))),
        approver_users=tuple(text(100) for _ in range(rng.randint(0, 5))),
        grant_max_uses=rng.choice([1, 5, 1000]) if granting else None,
        grant_max_seconds=rng.choice([30, 60, 1800, 604800]) if granting else None,
        grant_id="grt_" + "A" * 24 if granting and rng.random() < 0.5 else None,
        grant_uses=rng.choice([1, 1000]) if granting else None,
        grant_seconds=rng.choice([30, 604800]) if granting else None,
    )


_CODE = re.compile(r"```.*?```|`[^`]*`", re.DOTALL)
_ALLOWED_INVISIBLE = {"\n", "\t"}


def mrkdwn_texts(blocks: list[dict[str, Any]]) -> list[str]:
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "mrkdwn":
                found.append(node["text"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(blocks)
    return found


def assert_inert(text: str) -> None:
    """Agent text only inside code it cannot close; no raw `<`/`>` or invisible character in
    it; nothing of it outside (the mark never leaks)."""
    codes = _CODE.findall(text)
    outside = _CODE.sub("", text)
    assert "`" not in outside, f"an unbalanced code fence: {text[:300]!r}"
    assert MARK not in outside.lower(), f"agent text outside code: {outside[:300]!r}"
    for code in codes:
        inner = code.strip("`")
        assert "<" not in inner and ">" not in inner, inner[:200]
        for i, ch in enumerate(inner):
            if ch in _ALLOWED_INVISIBLE or (ch == "\u2060" and inner[i - 1] == "@"):
                continue
            category = unicodedata.category(ch)
            assert category not in ("Cc", "Cf", "Zl", "Zp"), f"invisible U+{ord(ch):04X}"


@pytest.mark.parametrize("seed", range(12))
def test_adversarial_approvals_render_to_messages_slack_accepts(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(25):
        approval = adversarial(rng)
        blocks = approval_blocks(approval, PUBLIC_URL)
        assert block_errors(blocks, limits.MESSAGE_BLOCKS) == [], approval.id
        text = fallback_text(approval)
        assert limits.units(text) <= limits.MESSAGE_TEXT
        assert "<" not in text, "the notification text links and mentions nothing"
        for mrkdwn in mrkdwn_texts(blocks):
            assert_inert(mrkdwn)
        header = blocks[0]["text"]["text"]
        assert header == header_text(approval) and MARK not in header.lower()
        if approval.state is ApprovalState.PENDING:
            assert blocks[-1]["type"] == "actions", "the buttons always stay"
        modal = reason_modal("countersign_deny", approval, json.dumps({"approval_id": "x"}))
        assert view_errors(modal) == []
        for mrkdwn in mrkdwn_texts(modal["blocks"]):
            assert_inert(mrkdwn)
        if approval.grant_max_uses is not None:
            modal = grant_modal(approval, json.dumps({"approval_id": "x"}))
            assert view_errors(modal) == []
            for mrkdwn in mrkdwn_texts(modal["blocks"]):
                assert_inert(mrkdwn)
        # The thread replies and the owner's message: within budget, agent text inert.
        replies = [decision_reply(approval, i) for i in range(len(approval.decisions))]
        mentions = [literal(m, 200) for m in approval.approver_members]
        replies += [
            outcome_reply(approval),
            grant_reply(approval, None),
            reminder_reply(approval, mentions, [nasty(rng, 100)]),
            owner_message(approval, PUBLIC_URL),
        ]
        for reply in replies:
            if reply is not None:
                assert limits.units(reply) <= limits.SECTION_TEXT
                assert_inert(reply)


def test_budgets_are_counted_after_escaping() -> None:
    body = "&<>" * 5000  # 15,000 characters, 39,000 once escaped
    shown = literal(body, 2000, block=True)
    assert limits.units(shown) <= 2000
    assert shown.startswith("```&amp;&lt;&gt;") and shown.endswith("…```")
    inner = shown.removeprefix("```").removesuffix("…```")
    assert re.fullmatch(r"(&amp;&lt;&gt;)*(&amp;|&amp;&lt;)?", inner), "never cut in an entity"
    # Astral characters count twice (UTF-16), as Slack may count them.
    assert limits.units(render("\U0001d518" * 100, 50)[0]) <= 50


def test_bidi_and_zero_width_characters_are_shown() -> None:
    shown = literal("invoice\u202egpj.exe and a\u200bb", 200)
    assert shown == "`invoice⟨U+202E⟩gpj.exe and a⟨U+200B⟩b`"


def test_agent_formatting_emoji_and_mentions_stay_literal() -> None:
    reason = "*bold* _it_ ~s~ `x` :white_check_mark: approved by ciso <!channel>\n> quoted"
    approval = make_approval(reason=reason)
    blocks = approval_blocks(approval, PUBLIC_URL)
    section = blocks[2]["text"]["text"]
    assert section == (
        "*Agent's reason*\n```*bold* _it_ ~s~ \u02cbx\u02cb :white_check_mark: approved by ciso "
        "&lt;!channel&gt;\n&gt; quoted```"
    )


def test_quorum_five_with_long_notes_fits_and_says_how_many_more() -> None:
    decisions = tuple(
        record(approver=f"approver-{i}@example.com", reason="&<>" * 700) for i in range(5)
    )
    approval = make_approval(quorum=5, decisions=decisions, state=ApprovalState.EXECUTED)
    blocks = approval_blocks(approval, PUBLIC_URL)
    assert block_errors(blocks, limits.MESSAGE_BLOCKS) == []
    text = decisions_text(approval)
    assert limits.units(text) <= limits.SECTION_TEXT
    assert "more decision" in text
    many = make_approval(decisions=tuple(record(approver=f"a{i}") for i in range(30)))
    assert f"and {30 - MAX_DECISIONS_SHOWN} more decisions" in decisions_text(many)


def test_the_minimal_message_has_only_our_words_and_the_link() -> None:
    approval = make_approval(reason="<!channel> *x*")
    text = minimal_text(approval, PUBLIC_URL)
    assert f"<{PUBLIC_URL}/_countersign/ui/approvals/{approval.id}|" in text
    assert "channel" not in text


# -- through the real notifier, into the strict fake ----------------------------------------------


@pytest.fixture
async def slack() -> AsyncIterator[FakeSlack]:
    fake = FakeSlack()
    await fake.start()
    yield fake
    await fake.close()


async def deliver(slack: FakeSlack, approvals: list[Approval]) -> dict[str, float]:
    metrics = Metrics()
    hub = NotifyHub(on_failure=metrics.notify_failure)
    client = AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url, retry_handlers=[])
    hub.add(
        SlackNotifier(
            client,
            CHANNEL,
            MemoryStore(),
            public_url=PUBLIC_URL,
            retry_seconds=0.5,
            first_delay=0.05,
            on_fallback=metrics.slack_fallback,
        )
    )
    for approval in approvals:
        hub("approval.requested", approval)
    await hub.aclose(grace_seconds=30)
    parsed = parse(metrics.render().decode())
    return {
        "fallbacks": sum(samples(parsed, "countersign_slack_fallback_messages_total").values()),
        "failures": sum(samples(parsed, "countersign_notify_failures_total").values()),
    }


async def test_adversarial_messages_are_accepted_by_the_strict_fake(slack: FakeSlack) -> None:
    rng = random.Random(2026)
    approvals = [adversarial(rng) for _ in range(20)]
    counted = await deliver(slack, approvals)
    assert slack.refusals == [] and counted == {"fallbacks": 0.0, "failures": 0.0}
    assert len(slack.messages) == len(approvals)


async def test_a_refused_message_is_replaced_by_the_minimal_one_and_counted(
    slack: FakeSlack,
) -> None:
    slack.refuse_blocks = True
    approval = make_approval(reason="fine")
    counted = await deliver(slack, [approval])
    assert counted == {"fallbacks": 1.0, "failures": 0.0}
    assert slack.refusals == [("chat.postMessage", "invalid_blocks")]
    (message,) = slack.messages.values()
    assert "blocks" not in message
    assert f"{PUBLIC_URL}/_countersign/ui/approvals/{approval.id}" in message["text"]


async def test_the_fake_is_strict(slack: FakeSlack) -> None:
    client = AsyncWebClient(token=BOT_TOKEN, base_url=slack.api_url, retry_handlers=[])
    from slack_sdk.errors import SlackApiError

    header = [{"type": "header", "text": {"type": "plain_text", "text": "x" * 151}}]
    with pytest.raises(SlackApiError) as refused:
        await client.chat_postMessage(channel=CHANNEL, text="t", blocks=header)
    assert refused.value.response.status_code == 200
    assert refused.value.response["error"] == "invalid_blocks"
    with pytest.raises(SlackApiError) as refused:
        await client.chat_postMessage(channel=CHANNEL, text="x" * 40_001)
    assert refused.value.response["error"] == "msg_too_long"
    with pytest.raises(SlackApiError) as refused:
        await client.chat_postMessage(channel="C0NOPE", text="x")
    assert refused.value.response["error"] == "channel_not_found"
    slack.rate_limited, slack.retry_after = 1, 7
    with pytest.raises(SlackApiError) as refused:
        await client.chat_postMessage(channel=CHANNEL, text="x")
    assert refused.value.response.status_code == 429
    assert refused.value.response.headers["Retry-After"] == "7"
    bad = AsyncWebClient(token="xoxb-wrong", base_url=slack.api_url, retry_handlers=[])
    with pytest.raises(SlackApiError) as refused:
        await bad.auth_test()
    assert refused.value.response["error"] == "invalid_auth"
