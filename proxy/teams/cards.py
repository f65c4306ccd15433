"""The Teams message for an approval: an Adaptive Card rendered from its current state.

Pure functions, no I/O. The card is schema 1.5 (what Teams renders, Universal Actions included):
the same context as the Slack message and the inbox (state header from `state_label`, rule,
requester and owner, method and target, upstream URL, risk and rule note, who may approve, the
decisions capped with "and N more", expiry, the inbox link), and while pending a reason field
with `Action.Execute` buttons (verbs `approve` and `deny`, data `{approval_id}`); where the rule
allows grants, uses and time inputs bounded by the rule and an "Approve + grant" button (verb
`approve_grant`).

Every value that is not ours goes through `md`: redacted, then each character shown literally
in Adaptive Card Markdown - ASCII punctuation backslash-escaped (no bold, italic, strike, heading,
list, quote, link, code, HTML entity or `{{DATE()}}` substitution of the agent's), invisible and
direction-changing characters shown as `⟨U+202E⟩` markers - and cut to its budget with `…`. Our
own text uses no Markdown (emphasis is the TextBlock's `weight`), so all Markdown in a card is
ours. The whole activity is measured in UTF-8 bytes as sent and kept within `MAX_BYTES` by
shrinking the long parts (body, tool arguments, headers, reason, decisions) step by step; if
nothing fits, or Teams refuses the card anyway, `minimal_card` says only our words and the link.
"""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime
from typing import Any

from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor
from ..model import Approval, ApprovalState, Verdict
from ..model.approval import distinct_persons, state_label
from ..notify.outcome import outcome_sentence
from ..slack.mrkdwn import CUT, EMPTY, _is_invisible, marker

CARD_CONTENT_TYPE = "application/vnd.microsoft.card.adaptive"
SCHEMA = "http://adaptivecards.io/schemas/adaptive-card.json"
VERSION = "1.5"
MAX_BYTES = 28 * 1024  # Teams refuses bigger messages (413); counted as sent, UTF-8
APPROVE = "approve"
DENY = "deny"
REASON_INPUT = "reason"
APPROVE_GRANT = "approve_grant"
GRANT_USES_INPUT = "grant_uses"
GRANT_TIME_INPUT = "grant_time"
REASON_MAX = 1000
MAX_DECISIONS_SHOWN = 10
_NAME = 200
_ESCAPED = set(string.punctuation)
# Budgets of the long parts at full size; each try shrinks them by the next factor.
_SCALES = (1.0, 0.5, 0.25, 0.1, 0.03, 0.0)


def md(text: str | None, budget: int, redactor: Redactor = DEFAULT_REDACTOR) -> str:
    """`text` redacted and shown literally in Adaptive Card Markdown, at most `budget`
    characters of rendering (the cut mark included)."""
    if text is None or text == "":
        return EMPTY
    text = str(redactor.value(text)).replace("\r\n", "\n").replace("\r", "\n")
    out: list[str] = []
    used = 0
    keep = 0
    for ch in text:
        if ch in _ESCAPED:
            piece = "\\" + ch
        elif ch == "\n" or ch == "\t":
            piece = ch
        elif _is_invisible(ch):
            piece = marker(ch)
        else:
            piece = ch
        if used + len(piece) > budget:
            return "".join(out[:keep]) + CUT
        out.append(piece)
        used += len(piece)
        if used + len(CUT) <= budget:
            keep = len(out)
    return "".join(out) or EMPTY


def ui_link(public_url: str | None, approval_id: str) -> str | None:
    if not public_url:
        return None
    return f"{public_url.rstrip('/')}/_countersign/ui/approvals/{approval_id}"


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _text(text: str, **style: Any) -> dict[str, Any]:
    return {"type": "TextBlock", "text": text or EMPTY, "wrap": True, **style}


def _section(label: str, value: str, *, mono: bool = False) -> list[dict[str, Any]]:
    block = _text(value, fontType="Monospace") if mono else _text(value)
    return [_text(label, weight="Bolder", spacing="Medium"), block]


def header_text(approval: Approval) -> str:
    """Ours alone, from the state: no text of the agent's can fake it."""
    return f"Countersign approval: {state_label(approval)}"


def _decision_line(approval: Approval, index: int, redactor: Redactor, reason: int) -> str:
    d = approval.decisions[index]
    verb = "approved" if d.verdict is Verdict.APPROVE else "denied"
    line = f"{md(d.who, _NAME, redactor)} {verb} via {md(d.channel, 40, redactor)} at {_when(d.at)}"
    if d.reason and reason:
        line += f": {md(d.reason, reason, redactor)}"
    return line


def decisions_text(approval: Approval, redactor: Redactor, reason: int = 600) -> str:
    total = len(approval.decisions)
    shown = [
        _decision_line(approval, i, redactor, reason)
        for i in range(min(total, MAX_DECISIONS_SHOWN))
    ]
    if total > len(shown):
        more = total - len(shown)
        shown.append(f"and {more} more decision{'s' if more != 1 else ''}: see the inbox")
    return "\n\n".join(shown)


def outcome_text(approval: Approval, redactor: Redactor = DEFAULT_REDACTOR) -> str:
    """How the approval ended ("" while pending), in the words Slack uses."""
    return outcome_sentence(
        approval,
        word=str,
        name=lambda who: md(who, _NAME, redactor),
        reason=lambda reason: md(reason, 1000, redactor),
        status=str,
    )


def _card(body: list[dict[str, Any]], actions: list[dict[str, Any]]) -> dict[str, Any]:
    card: dict[str, Any] = {
        "type": "AdaptiveCard",
        "$schema": SCHEMA,
        "version": VERSION,
        "msteams": {"width": "Full"},
        "body": body,
    }
    if actions:
        card["actions"] = actions
    return card


def _link_action(public_url: str | None, approval_id: str) -> list[dict[str, Any]]:
    link = ui_link(public_url, approval_id)
    return [{"type": "Action.OpenUrl", "title": "Open in Countersign", "url": link}] if link else []


def approval_card(
    approval: Approval,
    public_url: str | None = None,
    redactor: Redactor = DEFAULT_REDACTOR,
    *,
    scale: float = 1.0,
    notice: str | None = None,
) -> dict[str, Any]:
    """The whole card; `scale` shrinks the long parts (see `fitted_card`); `notice`: a line of
    ours on top (e.g. why a click was refused)."""

    def long(n: int) -> int:
        return max(int(n * scale), 0)

    r = approval.requester
    if r.person:
        requester = f"{r.subject} ({r.person})"
    elif r.email:
        requester = f"{r.subject} ({r.email}, unverified)"
    else:
        requester = r.subject
    target = approval.target or (approval.path + (f"?{approval.query}" if approval.query else ""))
    facts = [
        ("Requester", md(requester, 400, redactor)),
        ("On behalf of", md(r.owner, _NAME, redactor)),
        ("Request", md(f"{approval.method} {target}", 200 + long(3000), redactor)),
        ("Upstream", md(approval.upstream_url or None, 100 + long(1000), redactor)),
        ("Rule", md(approval.rule, _NAME, redactor)),
        ("Route", md(approval.route, _NAME, redactor)),
        ("Approvals", f"{approval.approvals_count} of {approval.quorum}"),
        ("Expires", _when(approval.expires_at)),
    ]
    if approval.risk:
        facts.append(("Risk", md(approval.risk, 300, redactor)))
    if approval.approver_members or approval.approver_users or approval.approver_groups:
        who = ", ".join(approval.approver_members or approval.approver_users)
        groups = ", ".join(approval.approver_groups)
        named = who or (f"groups {groups}" if groups else "")
        facts.append(("Who may approve", md(named, 100 + long(1000), redactor)))
    body: list[dict[str, Any]] = []
    if notice:
        body.append(_text(notice, color="Attention", weight="Bolder"))
    body += [
        _text(header_text(approval), size="Large", weight="Bolder"),
        {"type": "FactSet", "facts": [{"title": t, "value": v} for t, v in facts]},
        *_section("Agent's reason", md(approval.reason, 100 + long(4000), redactor)),
    ]
    if approval.note:
        body += _section("Rule note", md(approval.note, 100 + long(1500), redactor))
    if approval.actions:
        body += _section("Actions", md(", ".join(approval.actions), 100 + long(2000), redactor))
    if approval.earlier_attempt is not None:
        earlier = md(approval.earlier_attempt, _NAME, redactor)
        body.append(
            _text(
                f"This exact request was approved before, {earlier}, and sent, but the upstream "
                "failed: it may already have run. Check before approving.",
                color="Warning",
            )
        )
    if approval.tool_arguments is not None:
        args = md(approval.tool_arguments, long(4000), redactor)
        body += _section("Tool arguments", args, mono=True)
    if approval.headers:
        listed = "\n".join(
            f"{name}: {'[REDACTED] (secret)' if secret else value}"
            for name, value, secret in approval.headers
        )
        body += _section("Headers", md(listed, long(4000), redactor), mono=True)
    if approval.body_preview:
        kind = f", {md(approval.content_type, 120, redactor)}" if approval.content_type else ""
        budget = long(8000)
        cut = approval.body_truncated or len(approval.body_preview) > budget
        where = "; the whole body is in the inbox" if cut else ""
        label = f"Body: {approval.body_bytes} bytes{kind}, redacted{where}"
        body += _section(label, md(approval.body_preview, budget, redactor), mono=True)
    if approval.abandoned_at is not None and approval.state is ApprovalState.PENDING:
        body.append(
            _text(
                f"The agent stopped waiting at {_when(approval.abandoned_at)}; approving lets "
                "its identical retry run.",
                isSubtle=True,
            )
        )
    if approval.decisions:
        body += _section("Decisions", decisions_text(approval, redactor, long(600)))
    body.append(_text(f"Approval {md(approval.id, 100)}", isSubtle=True, size="Small"))
    actions = _link_action(public_url, approval.id)
    if approval.state is ApprovalState.PENDING:
        body.append(
            {
                "type": "Input.Text",
                "id": REASON_INPUT,
                "label": "Reason (required to deny)",
                "isMultiline": True,
                "maxLength": REASON_MAX,
            }
        )
        data = {"approval_id": approval.id}
        bounds = grant_bounds(approval)
        granting: list[dict[str, Any]] = []
        if bounds is not None:
            body += _grant_inputs(bounds)
            granting = [
                {
                    "type": "Action.Execute",
                    "title": "Approve + grant",
                    "verb": APPROVE_GRANT,
                    "data": data,
                }
            ]
        actions = [
            {
                "type": "Action.Execute",
                "title": "Approve",
                "verb": APPROVE,
                "data": data,
                "style": "positive",
            },
            {
                "type": "Action.Execute",
                "title": "Deny",
                "verb": DENY,
                "data": data,
                "style": "destructive",
            },
            *granting,
            *actions,
        ]
    else:
        body.append(_text(outcome_text(approval, redactor), weight="Bolder", spacing="Medium"))
    return _card(body, actions)


def grant_bounds(approval: Approval) -> tuple[int, int, int] | None:
    """The rule's grant limits as the card asks for them (Slack's modal's): (most uses, most
    time, seconds per unit of time: 60 when the rule allows at least a minute, else 1). None:
    the rule offers no grants."""
    if approval.grant_max_uses is None or approval.grant_max_seconds is None:
        return None
    unit = 60 if approval.grant_max_seconds >= 60 else 1
    return approval.grant_max_uses, approval.grant_max_seconds // unit, unit


def _grant_inputs(bounds: tuple[int, int, int]) -> list[dict[str, Any]]:
    most_uses, most_time, unit = bounds
    unit_name = "minutes" if unit == 60 else "seconds"
    return [
        _text(
            "Approve + grant also approves the agent's next requests of the same shape, "
            "up to the uses and time below.",
            isSubtle=True,
            spacing="Medium",
        ),
        {
            "type": "Input.Number",
            "id": GRANT_USES_INPUT,
            "label": f"Grant: further uses (1 to {most_uses})",
            "min": 1,
            "max": most_uses,
            "value": 1,
        },
        {
            "type": "Input.Number",
            "id": GRANT_TIME_INPUT,
            "label": f"Grant: for how many {unit_name} (1 to {most_time})",
            "min": 1,
            "max": most_time,
            "value": min(most_time, 60 if unit == 60 else most_time),
        },
    ]


def minimal_card(
    approval: Approval, public_url: str | None, notice: str | None = None
) -> dict[str, Any]:
    """Only our words and the link: what is sent when the full card does not fit or is
    refused."""
    where = (
        "open it in the inbox"
        if public_url
        else f"see countersign approvals show {md(approval.id, 100)}"
    )
    body = [_text(notice, color="Attention", weight="Bolder")] if notice else []
    body += [
        _text(header_text(approval), size="Large", weight="Bolder"),
        _text(
            f"Approval {md(approval.id, 100)}, state {approval.state.value}. Teams could not "
            f"show its details: {where}."
        ),
    ]
    return _card(body, _link_action(public_url, approval.id))


def activity(card: dict[str, Any]) -> dict[str, Any]:
    """The message activity carrying `card`."""
    return {
        "type": "message",
        "attachments": [{"contentType": CARD_CONTENT_TYPE, "content": card}],
    }


def encoded(payload: dict[str, Any]) -> bytes:
    """The bytes sent (and measured against `MAX_BYTES`)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()


def fitted_card(
    approval: Approval,
    public_url: str | None = None,
    redactor: Redactor = DEFAULT_REDACTOR,
    *,
    notice: str | None = None,
    limit: int = MAX_BYTES,
) -> dict[str, Any]:
    """The fullest card whose activity fits in `limit` bytes; the minimal one if none does."""
    for scale in _SCALES:
        card = approval_card(approval, public_url, redactor, scale=scale, notice=notice)
        if len(encoded(activity(card))) <= limit:
            return card
    return minimal_card(approval, public_url, notice)


# -- thread replies: our words, the agent's values through `md` -------------------------------

REPLY_NAMES = 20  # people named in a reminder, then "and N more"


def reply_card(text: str) -> dict[str, Any]:
    """A thread reply: one TextBlock (no actions)."""
    return _card([_text(text)], [])


def decision_reply(approval: Approval, index: int, redactor: Redactor = DEFAULT_REDACTOR) -> str:
    """The reply for the approval's `index`-th decision, with the quorum progress after it."""
    d = approval.decisions[index]
    approving = distinct_persons(
        tuple(x for x in approval.decisions[: index + 1] if x.verdict is Verdict.APPROVE)
    )
    progress = (
        f" ({approving} of {approval.quorum} approvals)"
        if d.verdict is Verdict.APPROVE and approval.quorum > 1
        else ""
    )
    return _decision_line(approval, index, redactor, REASON_MAX) + progress


def outcome_reply(approval: Approval, redactor: Redactor = DEFAULT_REDACTOR) -> str | None:
    """The reply for how the approval ended, once it has (None while pending, approved and
    waiting, or executed with no outcome recorded yet)."""
    if approval.state in (ApprovalState.PENDING, ApprovalState.APPROVED):
        return None
    if approval.state is ApprovalState.EXECUTED and approval.outcome is None:
        return None
    return f"{state_label(approval)}. {outcome_text(approval, redactor)}"


def reminder_reply(
    approval: Approval, people: list[str], redactor: Redactor = DEFAULT_REDACTOR
) -> str:
    """The reminder before expiry: when it expires, how many approvals are still needed, who
    may still decide (`people`: emails, shown literally; groups by name)."""
    needed = max(approval.quorum - approval.approvals_count, 1)
    named = [md(p, _NAME, redactor) for p in people[:REPLY_NAMES]]
    if len(people) > REPLY_NAMES:
        named.append(f"and {len(people) - REPLY_NAMES} more")
    who = ", ".join(named) if named else "nobody listed by name"
    if approval.approver_groups:
        groups = ", ".join(md(g, _NAME, redactor) for g in approval.approver_groups)
        who += f" (or anyone in {groups})"
    return (
        f"Still pending: expires {_when(approval.expires_at)}, {needed} more "
        f"approval{'s' if needed != 1 else ''} needed. May still decide: {who}"
    )


def owner_text(approval: Approval, redactor: Redactor = DEFAULT_REDACTOR) -> str:
    """The direct message to the agent's owner once its request is decided."""
    final = approval.final_decision
    by = f" by {md(final.who, _NAME, redactor)}" if final else ""
    agent = md(approval.requester.subject, _NAME, redactor)
    request = md(f"{approval.method} {approval.target or approval.path}", 1000, redactor)
    rule = md(approval.rule, _NAME, redactor)
    if approval.state is ApprovalState.DENIED:
        reason = f": {md(final.reason, REASON_MAX, redactor)}" if final and final.reason else ""
        what = f"denied{by}{reason}"
    elif approval.state is ApprovalState.EXPIRED:
        what = "expired: nobody decided it in time"
    else:
        what = f"approved{by}"
        if approval.state is ApprovalState.LAPSED:
            what += ", but not used in time"
    return f"Your agent {agent}'s request {request} (rule {rule}) was {what}."


def owner_card(
    approval: Approval, public_url: str | None, redactor: Redactor = DEFAULT_REDACTOR
) -> dict[str, Any]:
    """The owner's direct message: one TextBlock of `owner_text`, the inbox link or the id."""
    body = [_text(owner_text(approval, redactor))]
    if not public_url:
        body.append(_text(f"Approval {md(approval.id, 100)}", isSubtle=True, size="Small"))
    return _card(body, _link_action(public_url, approval.id))
