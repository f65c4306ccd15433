"""Cards Teams accepts, showing the agent's text literally: the seeded adversarial approvals of
the Slack tests, rendered as Adaptive Cards, stay within Teams' 28 KB (in bytes, as sent), keep
every Markdown character of the agent's escaped, show invisible characters as markers, and keep
the buttons while pending and the outcome once decided."""

from __future__ import annotations

import random
import unicodedata
from typing import Any

import pytest

from proxy.model import ApprovalState, Verdict
from proxy.teams.cards import (
    APPROVE,
    DENY,
    MAX_BYTES,
    activity,
    approval_card,
    encoded,
    fitted_card,
    md,
    minimal_card,
)
from tests.store_conformance import make_approval, record
from tests.test_slack_messages import MARK, adversarial

PUBLIC_URL = "https://countersign.example.com"
# Characters Adaptive Card Markdown (or Teams' {{DATE()}} substitution) would act on.
_ACTIVE = set("*_~#[]()>`<{}&!|")


def texts(card: dict[str, Any]) -> list[str]:
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "TextBlock":
                found.append(node["text"])
            if "title" in node and "value" in node:  # a fact
                found.extend([node["title"], node["value"]])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(card)
    return found


def assert_inert(text: str) -> None:
    escaped = False
    for ch in text:
        if escaped:
            escaped = False
            continue
        if ch == "\\":
            escaped = True
            continue
        assert ch not in _ACTIVE, f"unescaped {ch!r} in {text[:300]!r}"
        if ch not in "\n\t":
            assert unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp"), f"U+{ord(ch):04X}"


def test_md_escapes_markdown_and_shows_invisible_characters() -> None:
    shown = md("**bold** _i_ ~s~ # h [x](https://evil) > q `c` <b> &amp; {{DATE(x)}}", 500)
    assert_inert(shown)
    assert "\\*\\*bold\\*\\*" in shown and "\\{\\{DATE" in shown
    assert md("a\u202eb\u200bc", 100) == "a⟨U+202E⟩b⟨U+200B⟩c"
    cut = md("x" * 100, 10)
    assert cut.endswith("…") and len(cut) <= 10
    assert md("a" * 9 + "*", 10) == "a" * 9 + "…"  # never half an escape


@pytest.mark.parametrize("seed", range(8))
def test_adversarial_approvals_render_to_cards_teams_accepts(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(20):
        approval = adversarial(rng)
        card = fitted_card(approval, PUBLIC_URL)
        size = len(encoded(activity(card)))
        assert size <= MAX_BYTES, size
        assert card["version"] == "1.5" and card["type"] == "AdaptiveCard"
        for text in texts(card):
            assert_inert(text)
        verbs = [a.get("verb") for a in card.get("actions", ())]
        if approval.state is ApprovalState.PENDING and "Input.Text" in str(card):
            assert verbs[:2] == [APPROVE, DENY]
            assert card["actions"][0]["data"] == {"approval_id": approval.id}
        if approval.state is not ApprovalState.PENDING:
            assert APPROVE not in verbs and DENY not in verbs
        assert any(a.get("url", "").endswith(approval.id) for a in card.get("actions", ()))


def test_a_huge_body_is_cut_with_the_inbox_named() -> None:
    approval = make_approval(body_preview="&*" * 40_000, body_bytes=80_000, reason="x" * 9000)
    card = fitted_card(approval, PUBLIC_URL)
    assert len(encoded(activity(card))) <= MAX_BYTES
    shown = texts(card)
    assert any("the whole body is in the inbox" in t for t in shown)
    assert any(t.endswith("…") for t in shown)
    assert card["actions"][0]["verb"] == APPROVE  # the buttons stay


def test_state_header_outcome_and_capped_decisions() -> None:
    decisions = tuple(
        record(Verdict.APPROVE, approver=f"p{i}@example.com", reason="ok") for i in range(14)
    )
    card = approval_card(
        make_approval(state=ApprovalState.DENIED, decisions=decisions, risk="high", note="n"),
        PUBLIC_URL,
    )
    shown = texts(card)
    assert shown[0] == "Countersign approval: Denied"
    assert any("and 4 more decisions" in t for t in shown)
    assert "Risk" in shown and "Rule note" in shown
    assert "Input.Text" not in str(card)
    minimal = minimal_card(make_approval(), PUBLIC_URL)
    assert len(encoded(activity(minimal))) < 2000
    for text in texts(minimal):
        assert_inert(text)
    assert MARK not in str(minimal)
