"""The Slack message for an approval: Block Kit blocks rendered from its current state.

Pure functions, no I/O. Every value that is not ours goes through `mrkdwn.literal` (redacted,
escaped, shown literally, budgeted after escaping); every block is built within the limits of
`limits` (the strict fake in the tests enforces the same numbers). The header is ours alone: it
follows the approval's state and never contains the agent's text. The message is always
rendered from the whole approval, so rendering it twice, or late, gives the same result.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor
from ..model import Approval, ApprovalState, DecisionRecord, Outcome, Verdict
from ..model.approval import distinct_persons, state_label
from ..model.grant import Grant, GrantState, pattern_of
from ..notify.outcome import ending, outcome_sentence
from . import limits
from .mrkdwn import fit, literal, plain

APPROVE = "countersign_approve"
APPROVE_WITH_NOTE = "countersign_approve_note"
APPROVE_GRANT = "countersign_approve_grant"
DENY = "countersign_deny"
REASON_BLOCK = "reason"
REASON_INPUT = "reason"
GRANT_USES_BLOCK = "grant_uses"
GRANT_USES_INPUT = "grant_uses"
GRANT_TIME_BLOCK = "grant_time"
GRANT_TIME_INPUT = "grant_time"
DECISION_BLOCK = "countersign_decision"

# Budgets of the untrusted parts (UTF-16 units, escaping and code fences included).
_NAME = 200  # a subject, email, rule or route name
_REASON = 600  # an approver's note in the decisions list
# Decisions listed by name; the rest are counted ("and N more").
MAX_DECISIONS_SHOWN = 10

_HEADERS = {
    ApprovalState.PENDING: "Approval pending",
    ApprovalState.APPROVED: "Approved: waiting for the agent to run it",
    ApprovalState.DENIED: "Denied",
    ApprovalState.EXPIRED: "Expired",
    ApprovalState.LAPSED: "Lapsed: approved but not used in time",
}


def header_text(approval: Approval) -> str:
    """The header, from the state alone (no text of the agent's can fake it)."""
    if approval.state is ApprovalState.EXECUTED:
        if approval.outcome is Outcome.AMBIGUOUS:
            return "Ambiguous: sent, the upstream failed, it may have run"
        status = approval.upstream_status
        if status is not None and status >= 500:
            return f"Failed: the upstream answered {status}"
        return "Executed"
    return _HEADERS.get(approval.state, "Approval")


def ui_link(public_url: str | None, approval_id: str) -> str | None:
    """The approval's page in the web inbox, when `server.public_url` is set."""
    if not public_url:
        return None
    return f"{public_url.rstrip('/')}/_countersign/ui/approvals/{approval_id}"


def _when(ts: float) -> str:
    """A date Slack shows in each reader's time zone; the fallback is UTC."""
    iso = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"<!date^{int(ts)}^{{date_short_pretty}} {{time_secs}}|{iso}>"


def _mrkdwn(text: str, budget: int = limits.SECTION_TEXT) -> dict[str, Any]:
    # verbatim: no auto-linking of URLs or channel names in text we did not write.
    return {"type": "mrkdwn", "text": fit(text, budget) or "-", "verbatim": True}


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": _mrkdwn(text)}


def _labelled(label: str, value: str | None, redactor: Redactor, budget: int) -> str:
    """`*label*` then the literal value, the whole within `budget`."""
    head = f"*{label}*\n"
    return head + literal(value, budget - limits.units(head), redactor)


def _decision_line(d: DecisionRecord, redactor: Redactor) -> str:
    verb = "approved" if d.verdict is Verdict.APPROVE else "denied"
    icon = ":white_check_mark:" if d.verdict is Verdict.APPROVE else ":no_entry:"
    who = literal(d.who, _NAME, redactor)
    line = f"{icon} {who} {verb} via {literal(d.channel, 40, redactor)} at {_when(d.at)}"
    if d.grant_uses is not None and d.grant_seconds is not None:
        line += f", with a grant of {_uses(d.grant_uses)} for {_duration(d.grant_seconds)}"
    if d.reason:
        line += f"\n{literal(d.reason, _REASON, redactor)}"
    return line


def _uses(n: int) -> str:
    return f"{n} more use{'s' if n != 1 else ''}"


def _duration(seconds: int) -> str:
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


def _until(ts: float) -> str:
    """A time of day Slack shows in each reader's time zone; the fallback is UTC."""
    iso = datetime.fromtimestamp(ts, UTC).strftime("%H:%M UTC")
    return f"<!date^{int(ts)}^{{date_short_pretty}} {{time}}|{iso}>"


def grant_pattern(approval: Approval) -> str:
    """What a grant of this approval covers, as approvers read it: `POST /cloud/exports/x`."""
    return pattern_of(approval.method, approval.path, approval.actions)


def grant_text(
    approval: Approval, grant: Grant | None, redactor: Redactor = DEFAULT_REDACTOR
) -> str | None:
    """The grant this approval made ("grant: 5 more uses until 14:30 UTC, pattern `POST /x`"),
    with its uses left when the live grant is at hand; None when it made none."""
    if approval.grant_id is None or approval.grant_uses is None:
        return None
    pattern = literal(grant.pattern if grant else grant_pattern(approval), 600, redactor)
    expires = grant.expires_at if grant else approval.grant_expires_at
    left = grant.uses_left if grant else approval.grant_uses
    until = f" until {_until(expires)}" if expires is not None else ""
    line = f":ticket: *Grant*: {_uses(left)}{until}, pattern {pattern}"
    if grant is not None:
        now = time.time()
        status = grant.state(now)
        if status is GrantState.REVOKED:
            by = f" by {literal(grant.revoked_by, _NAME, redactor)}" if grant.revoked_by else ""
            line = f":ticket: *Grant revoked*{by} (pattern {pattern})"
        elif status is GrantState.EXHAUSTED:
            line = f":ticket: *Grant used up*: all {grant.uses} uses taken (pattern {pattern})"
        elif status is GrantState.EXPIRED:
            line = (
                f":ticket: *Grant expired* with {_uses(grant.uses_left)} unused (pattern {pattern})"
            )
    return line + f" · `{approval.grant_id}`"


def grant_offer_text(approval: Approval, redactor: Redactor = DEFAULT_REDACTOR) -> str | None:
    """What the rule lets approvers grant, shown while the approval is pending."""
    if approval.grant_max_uses is None or approval.grant_max_seconds is None:
        return None
    pattern = literal(grant_pattern(approval), 600, redactor)
    return (
        f"Approvers may also grant up to {_uses(approval.grant_max_uses)} of {pattern} by this "
        f"agent for up to {_duration(approval.grant_max_seconds)} (*Approve + grant…*)."
    )


def decisions_text(approval: Approval, redactor: Redactor = DEFAULT_REDACTOR) -> str:
    """Who decided, newest last, within one section: at most `MAX_DECISIONS_SHOWN` and what
    fits, then "and N more"."""
    shown: list[str] = []
    used = 0
    reserve = 80  # room for the "and N more" line
    total = len(approval.decisions)
    for d in approval.decisions[:MAX_DECISIONS_SHOWN]:
        line = _decision_line(d, redactor)
        size = limits.units(line) + 1
        if used + size > limits.SECTION_TEXT - reserve:
            break
        shown.append(line)
        used += size
    if len(shown) < total:
        more = total - len(shown)
        shown.append(f"_…and {more} more decision{'s' if more != 1 else ''}: see Countersign_")
    return "\n".join(shown)


_ENDING_ICONS = {
    "approved": ":white_check_mark:",
    "denied": ":no_entry:",
    "expired": ":hourglass:",
    "lapsed": ":hourglass:",
    "ambiguous": ":warning:",
    "executed": ":arrow_forward:",
}


def outcome_text(approval: Approval, redactor: Redactor = DEFAULT_REDACTOR) -> str:
    """What replaces the buttons once the approval is no longer pending."""
    kind = ending(approval)
    if kind is None:
        return ""
    sentence = outcome_sentence(
        approval,
        word=lambda word: f"*{word}*",
        name=lambda who: literal(who, _NAME, redactor),
        reason=lambda reason: literal(reason, 1000, redactor),
        status=lambda status: f"*{status}*",
    )
    return f"{_ENDING_ICONS[kind]} {sentence}"


def fallback_text(approval: Approval, redactor: Redactor = DEFAULT_REDACTOR) -> str:
    """The notification text (shown where blocks are not, e.g. push notifications)."""
    path = plain(approval.path, 500, redactor)
    who = plain(approval.requester.subject, _NAME, redactor)
    rule = plain(approval.rule, _NAME, redactor)
    method = plain(approval.method, 20, redactor)
    return f"{header_text(approval)}: {method} {path} (rule {rule}, requested by {who})"


def minimal_text(approval: Approval, public_url: str | None) -> str:
    """The message posted when Slack refuses the full one: only our words and the link."""
    link = ui_link(public_url, approval.id)
    where = (
        f"<{link}|Open it in Countersign>"
        if link
        else f"see `countersign approvals show {approval.id}`"
    )
    return (
        f":warning: *{header_text(approval)}* (approval `{approval.id}`, state "
        f"*{approval.state.value}*). Slack could not show its details: {where}."
    )


def approval_blocks(
    approval: Approval,
    public_url: str | None = None,
    redactor: Redactor = DEFAULT_REDACTOR,
    grant: Grant | None = None,
) -> list[dict[str, Any]]:
    """The whole message; `grant`: the grant the approval made, as the store has it now (its
    uses left)."""
    field_budget = limits.SECTION_FIELD_TEXT

    def field(label: str, value: str | None) -> str:
        return _labelled(label, value, redactor, field_budget)

    r = approval.requester
    # An email the IdP did not verify is the agent's claim, and says so.
    if r.person:
        requester = f"{r.subject} ({r.person})"
    elif r.email:
        requester = f"{r.subject} ({r.email}, unverified)"
    else:
        requester = r.subject
    target = approval.target or (approval.path + (f"?{approval.query}" if approval.query else ""))
    fields = [
        field("Requester", requester),
        field("On behalf of", r.owner),
        field("Request", f"{approval.method} {target}"),
        field("Upstream", approval.upstream_url or None),
        field("Route / rule", f"{approval.route} / {approval.rule}"),
        f"*Approvals*\n{approval.approvals_count} of {approval.quorum}",
        f"*Expires*\n{_when(approval.expires_at)}",
    ]
    if approval.risk:
        fields.append(field("Risk", approval.risk))
    if approval.approver_members:
        fields.append(field("Who may approve", ", ".join(approval.approver_members)))
    header = header_text(approval)[: limits.HEADER_TEXT]
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": header, "emoji": False}},
        {
            "type": "section",
            "fields": [_mrkdwn(f, field_budget) for f in fields[: limits.SECTION_FIELDS]],
        },
        _section(_labelled("Agent's reason", approval.reason, redactor, limits.SECTION_TEXT)),
    ]
    if approval.note:
        blocks.append(_section(_labelled("Rule note", approval.note, redactor, 1500)))
    if approval.actions:
        actions = ", ".join(approval.actions)
        blocks.append(_section(_labelled("Actions", actions, redactor, limits.SECTION_TEXT)))
    if approval.earlier_attempt is not None:
        earlier = literal(approval.earlier_attempt, _NAME, redactor)
        blocks.append(
            _section(
                f":warning: *This exact request was approved before* ({earlier}) and sent, "
                "but the upstream failed: it may already have run. Check before approving."
            )
        )
    if approval.tool_arguments is not None:
        head = "*Tool arguments*\n"
        budget = limits.SECTION_TEXT - limits.units(head)
        code = literal(approval.tool_arguments, budget, redactor, block=True)
        blocks.append(_section(head + code))
    if approval.headers:
        # Every header the approval binds: what runs carries exactly these.
        listed = "\n".join(
            f"{name}: {'[REDACTED] (secret)' if redacted else value}"
            for name, value, redacted in approval.headers
        )
        head = "*Headers*\n"
        budget = limits.SECTION_TEXT - limits.units(head)
        blocks.append(_section(head + literal(listed, budget, redactor, block=True)))
    if approval.body_preview:
        kind = f", {literal(approval.content_type, 120, redactor)}" if approval.content_type else ""
        cut = " (preview cut: the whole body is in Countersign)" if approval.body_truncated else ""
        head = f"*Body* ({approval.body_bytes} bytes{kind}, redacted){cut}\n"
        budget = limits.SECTION_TEXT - limits.units(head)
        blocks.append(_section(head + literal(approval.body_preview, budget, redactor, block=True)))
    context = [f"`{approval.id}`"]
    link = ui_link(public_url, approval.id)
    if link:
        context.append(f"<{link}|Open in Countersign>")
    blocks.append(
        {"type": "context", "elements": [_mrkdwn(" · ".join(context), limits.CONTEXT_TEXT)]}
    )
    if approval.abandoned_at is not None and approval.state is ApprovalState.PENDING:
        blocks.append(
            {
                "type": "context",
                "elements": [
                    _mrkdwn(
                        f"The agent stopped waiting at {_when(approval.abandoned_at)}; "
                        "approving lets its identical retry run.",
                        limits.CONTEXT_TEXT,
                    )
                ],
            }
        )
    if approval.decisions:
        blocks.append(_section(decisions_text(approval, redactor)))
    granted = grant_text(approval, grant, redactor)
    if granted:
        blocks.append(_section(granted))
    elif approval.state is ApprovalState.PENDING:
        offer = grant_offer_text(approval, redactor)
        if offer:
            blocks.append({"type": "context", "elements": [_mrkdwn(offer, limits.CONTEXT_TEXT)]})
    last = (
        _buttons(approval)
        if approval.state is ApprovalState.PENDING
        else _section(outcome_text(approval, redactor))
    )
    # Never more blocks than Slack takes; the buttons (or the outcome) always stay.
    return [*blocks[: limits.MESSAGE_BLOCKS - 1], last]


def _button(text: str, action_id: str, value: str, style: str | None = None) -> dict[str, Any]:
    button: dict[str, Any] = {
        "type": "button",
        "text": {"type": "plain_text", "text": text[: limits.BUTTON_TEXT]},
        "action_id": action_id,
        "value": value[: limits.BUTTON_VALUE],
    }
    if style:
        button["style"] = style
    return button


def _buttons(approval: Approval) -> dict[str, Any]:
    approval_id = approval.id
    elements = [
        _button("Approve", APPROVE, approval_id, "primary"),
        _button("Approve with note…", APPROVE_WITH_NOTE, approval_id),
    ]
    if approval.grant_max_uses is not None and approval.grant_max_seconds is not None:
        elements.append(_button("Approve + grant…", APPROVE_GRANT, approval_id))
    elements.append(_button("Deny", DENY, approval_id, "danger"))
    return {"type": "actions", "block_id": DECISION_BLOCK, "elements": elements}


def reason_modal(
    action_id: str, approval: Approval, metadata: str, redactor: Redactor = DEFAULT_REDACTOR
) -> dict[str, Any]:
    """The modal behind "Approve with note…" (optional reason) and "Deny" (required reason)."""
    deny = action_id == DENY
    target = literal(approval.method + " " + approval.path, 1500, redactor)
    who = literal(approval.requester.subject, _NAME, redactor)
    rule = literal(approval.rule, _NAME, redactor)
    return {
        "type": "modal",
        "callback_id": action_id,
        "private_metadata": metadata[: limits.VIEW_PRIVATE_METADATA],
        "title": {"type": "plain_text", "text": "Deny request" if deny else "Approve request"},
        "submit": {"type": "plain_text", "text": "Deny" if deny else "Approve"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            _section(f"{target}\nrequested by {who} (rule {rule})"),
            {
                "type": "input",
                "block_id": REASON_BLOCK,
                "optional": not deny,
                "label": {
                    "type": "plain_text",
                    "text": "Why do you deny it?" if deny else "Note (optional)",
                },
                "element": {
                    "type": "plain_text_input",
                    "action_id": REASON_INPUT,
                    "multiline": True,
                    "max_length": 1000,
                },
            },
        ],
    }


def grant_bounds(approval: Approval) -> tuple[int, int, int] | None:
    """The rule's grant limits as the modal asks for them: (most uses, most time, seconds per
    unit of time: 60 when the rule allows at least a minute, else 1). None: no grants."""
    if approval.grant_max_uses is None or approval.grant_max_seconds is None:
        return None
    unit = 60 if approval.grant_max_seconds >= 60 else 1
    return approval.grant_max_uses, approval.grant_max_seconds // unit, unit


def _number_input(
    block_id: str, action_id: str, label: str, most: int, initial: int
) -> dict[str, Any]:
    return {
        "type": "input",
        "block_id": block_id,
        "label": {"type": "plain_text", "text": label},
        "element": {
            "type": "number_input",
            "action_id": action_id,
            "is_decimal_allowed": False,
            "initial_value": str(initial),
            "min_value": "1",
            "max_value": str(most),
        },
    }


def grant_modal(
    approval: Approval, metadata: str, redactor: Redactor = DEFAULT_REDACTOR
) -> dict[str, Any]:
    """The modal behind "Approve + grant…": approve this request and let the next N like it
    through for T minutes, pre-filled with (and bounded by) the rule's maxima."""
    bounds = grant_bounds(approval)
    if bounds is None:
        raise ValueError("the approval's rule offers no grants")
    most_uses, most_time, unit = bounds
    unit_name = "minutes" if unit == 60 else "seconds"
    target = literal(approval.method + " " + approval.path, 1500, redactor)
    who = literal(approval.requester.subject, _NAME, redactor)
    rule = literal(approval.rule, _NAME, redactor)
    pattern = literal(grant_pattern(approval), 600, redactor)
    return {
        "type": "modal",
        "callback_id": APPROVE_GRANT,
        "private_metadata": metadata[: limits.VIEW_PRIVATE_METADATA],
        "title": {"type": "plain_text", "text": "Approve and grant"},
        "submit": {"type": "plain_text", "text": "Approve + grant"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            _section(
                f"{target}\nrequested by {who} (rule {rule})\n\nApprove this request *and the "
                f"next requests like it*: the same agent, rule and route, pattern {pattern} "
                "(query, headers and body may differ). Each use is audited; any approver can "
                "revoke the grant."
            ),
            _number_input(
                GRANT_USES_BLOCK,
                GRANT_USES_INPUT,
                f"How many more requests (1 to {most_uses})",
                most_uses,
                most_uses,
            ),
            _number_input(
                GRANT_TIME_BLOCK,
                GRANT_TIME_INPUT,
                f"For how many {unit_name} (1 to {most_time})",
                most_time,
                most_time,
            ),
            {
                "type": "input",
                "block_id": REASON_BLOCK,
                "optional": True,
                "label": {"type": "plain_text", "text": "Note (optional)"},
                "element": {
                    "type": "plain_text_input",
                    "action_id": REASON_INPUT,
                    "multiline": True,
                    "max_length": 1000,
                },
            },
        ],
    }


# -- thread replies and the owner's direct message ------------------------------------------------

# Budget of one reply's text (a thread reply is plain `text`, which Slack renders as mrkdwn).
REPLY_TEXT = limits.SECTION_TEXT


def decision_reply(approval: Approval, index: int, redactor: Redactor = DEFAULT_REDACTOR) -> str:
    """The thread reply for the approval's `index`-th decision: who, how, through which
    channel, when, the note and any grant asked for, and the quorum progress after it."""
    d = approval.decisions[index]
    approving = distinct_approvers(approval, index + 1)
    progress = (
        f" ({approving} of {approval.quorum} approvals)"
        if d.verdict is Verdict.APPROVE and approval.quorum > 1
        else ""
    )
    return fit(_decision_line(d, redactor) + progress, REPLY_TEXT)


def distinct_approvers(approval: Approval, first: int) -> int:
    """Distinct people approving among the first `first` decisions."""
    approving = tuple(d for d in approval.decisions[:first] if d.verdict is Verdict.APPROVE)
    return distinct_persons(approving)


def outcome_reply(approval: Approval, redactor: Redactor = DEFAULT_REDACTOR) -> str | None:
    """The thread reply for how the approval ended, once it has (None until then: approved
    and waiting, or executed with no outcome recorded yet)."""
    label = state_label(approval)
    if approval.state is ApprovalState.PENDING or approval.state is ApprovalState.APPROVED:
        return None
    if approval.state is ApprovalState.EXECUTED and approval.outcome is None:
        return None
    return fit(f"*{label}*. {outcome_text(approval, redactor)}", REPLY_TEXT)


def grant_reply(
    approval: Approval, grant: Grant | None, redactor: Redactor = DEFAULT_REDACTOR
) -> str | None:
    """The thread reply saying that a grant was made, once it was."""
    text = grant_text(approval, grant, redactor)
    if text is None:
        return None
    by = ", ".join(literal(p, _NAME, redactor) for p in (grant.granted_by if grant else ()))
    made = f" (granted by {by})" if by else ""
    return fit(
        f"{text}{made}. Requests of this pattern by this agent now run without asking; any "
        f"approver can revoke it (`DELETE /_countersign/api/grants/{approval.grant_id}`).",
        REPLY_TEXT,
    )


def reminder_reply(
    approval: Approval,
    mentions: list[str],
    groups: list[str],
    redactor: Redactor = DEFAULT_REDACTOR,
) -> str:
    """The reminder in the thread before expiry. `mentions`: who may still approve, each
    already rendered (`<@U…>` for people found on Slack, a literal email otherwise)."""
    needed = approval.quorum - approval.approvals_count
    who = ", ".join(mentions) if mentions else "nobody listed by name"
    if groups:
        listed = ", ".join(literal(g, _NAME, redactor) for g in groups)
        who += f" (or anyone in {listed} signing in with a token)"
    return fit(
        f":alarm_clock: *Still pending*: expires {_when(approval.expires_at)}, "
        f"{needed} more approval{'s' if needed != 1 else ''} needed.\nMay still decide: {who}",
        REPLY_TEXT,
    )


def owner_message(
    approval: Approval, public_url: str | None, redactor: Redactor = DEFAULT_REDACTOR
) -> str:
    """The direct message to the agent's owner once its request is decided."""
    final = approval.final_decision
    by = f" by {literal(final.who, _NAME, redactor)}" if final else ""
    agent = literal(approval.requester.subject, _NAME, redactor)
    request = literal(f"{approval.method} {approval.target or approval.path}", 1000, redactor)
    rule = literal(approval.rule, _NAME, redactor)
    if approval.state is ApprovalState.DENIED:
        reason = f": {literal(final.reason, 1000, redactor)}" if final and final.reason else ""
        what = f":no_entry: *denied*{by}{reason}"
    elif approval.state is ApprovalState.EXPIRED:
        what = ":hourglass: *expired*: nobody decided it in time"
    else:
        what = f":white_check_mark: *approved*{by}"
        if approval.state is ApprovalState.LAPSED:
            what += ", but not used in time"
    link = ui_link(public_url, approval.id)
    where = f"\n<{link}|Open in Countersign>" if link else f" (`{approval.id}`)"
    return fit(
        f"Your agent {agent}'s request {request} (rule {rule}) was {what}.{where}", REPLY_TEXT
    )
