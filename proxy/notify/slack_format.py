"""The Slack message for an approval: Block Kit blocks rendered from its current state.

Pure functions, no I/O. Every value that is not ours (the agent's reason, path, query and body,
the requester's names, approvers' reasons) goes through `escape`, so it is redacted (a `Redactor`:
secret-named query, form and JSON values, keys and tokens in free text) and shown as text: it
cannot ping (`<!channel>`, `@here`, `<@U123>`) or forge links (`<https://evil|click>`). The message
is always rendered from the whole approval, so rendering it twice, or late, gives the same result.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor
from ..model import Approval, ApprovalState, DecisionRecord, Outcome, Verdict

APPROVE = "countersign_approve"
APPROVE_WITH_NOTE = "countersign_approve_note"
DENY = "countersign_deny"
REASON_BLOCK = "reason"
REASON_INPUT = "reason"

# Section texts are limited to 3000 characters by Slack.
_PREVIEW_CHARS = 2500
_FIELD_CHARS = 500
_BROADCASTS = re.compile(r"@(channel|here|everyone)\b", re.IGNORECASE)


def escape(
    text: str | None, limit: int = _FIELD_CHARS, redactor: Redactor = DEFAULT_REDACTOR
) -> str:
    """Make untrusted text secret-free and inert in mrkdwn: redacted (before it is cut, so a
    secret cut in two is still found), then `&`, `<`, `>` as Slack documents, and a word joiner
    after `@` of `@channel`/`@here`/`@everyone` (Slack turns those into pings in some clients
    and with `link_names`)."""
    if not text:
        return "-"
    text = str(redactor.value(text))
    if len(text) > limit:
        text = text[:limit] + "…"
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _BROADCASTS.sub("@\u2060\\1", text)


def _code(text: str, redactor: Redactor) -> str:
    # A ``` inside the preview would end the code block early and let the rest format.
    shown = escape(text, _PREVIEW_CHARS, redactor)
    return "```" + shown.replace("```", "`\u200b`\u200b`") + "```"


def _when(ts: float) -> str:
    """A date Slack shows in each reader's time zone; the fallback is UTC."""
    iso = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"<!date^{int(ts)}^{{date_short_pretty}} {{time_secs}}|{iso}>"


def _mrkdwn(text: str) -> dict[str, Any]:
    # verbatim: no auto-linking of URLs or channel names in text we did not write.
    return {"type": "mrkdwn", "text": text, "verbatim": True}


def _who(d: DecisionRecord, redactor: Redactor) -> str:
    return escape(d.who, redactor=redactor)


def _decision_line(d: DecisionRecord, redactor: Redactor) -> str:
    verb = "approved" if d.verdict is Verdict.APPROVE else "denied"
    icon = ":white_check_mark:" if d.verdict is Verdict.APPROVE else ":no_entry:"
    channel = escape(d.channel, redactor=redactor)
    line = f"{icon} *{_who(d, redactor)}* {verb} via {channel} at {_when(d.at)}"
    if d.reason:
        line += f"\n> {escape(d.reason, redactor=redactor)}"
    return line


def outcome_text(approval: Approval, redactor: Redactor = DEFAULT_REDACTOR) -> str:
    """What replaces the buttons once the approval is no longer pending."""
    final = approval.final_decision
    by = f" by *{_who(final, redactor)}*" if final else ""
    if approval.state is ApprovalState.APPROVED:
        return f":white_check_mark: *Approved*{by}: waiting for the agent to run it"
    if approval.state is ApprovalState.DENIED:
        reason = f": {escape(final.reason, redactor=redactor)}" if final and final.reason else ""
        return f":no_entry: *Denied*{by}{reason}"
    if approval.state is ApprovalState.EXPIRED:
        return ":hourglass: *Expired*: not decided in time"
    if approval.state is ApprovalState.LAPSED:
        return f":hourglass: *Lapsed*: approved{by}, but not used in time"
    if approval.state is ApprovalState.EXECUTED and approval.outcome is Outcome.AMBIGUOUS:
        return (
            f":warning: *Sent*{by}, but the upstream failed before answering: it may or may not "
            "have run"
        )
    if approval.state is ApprovalState.EXECUTED:
        status = approval.upstream_status
        answered = f", upstream answered *{status}*" if status is not None else ""
        return f":arrow_forward: *Executed*{by}{answered}"
    return ""


def fallback_text(approval: Approval, redactor: Redactor = DEFAULT_REDACTOR) -> str:
    """The notification text (shown where blocks are not, e.g. push notifications)."""
    path = escape(approval.path, redactor=redactor)
    head = f"Approval {approval.state.value}: {approval.method} {path}"
    who = escape(approval.requester.subject, redactor=redactor)
    return f"{head} (rule {escape(approval.rule, redactor=redactor)}, requested by {who})"


def approval_blocks(
    approval: Approval, public_url: str | None = None, redactor: Redactor = DEFAULT_REDACTOR
) -> list[dict[str, Any]]:
    def shown(text: str | None) -> str:
        return escape(text, redactor=redactor)

    r = approval.requester
    # An email the IdP did not verify is the agent's claim, and says so.
    if r.person:
        requester = f"{shown(r.subject)} ({shown(r.person)})"
    elif r.email:
        requester = f"{shown(r.subject)} ({shown(r.email)}, unverified)"
    else:
        requester = shown(r.subject)
    fields = [
        f"*Requester*\n{requester}",
        f"*On behalf of*\n{shown(r.owner)}",
        f"*Request*\n`{shown(approval.method)}` {shown(approval.target or approval.path)}"
        + ("" if approval.target or not approval.query else f"?{shown(approval.query)}"),
        f"*Upstream*\n{shown(approval.upstream_url or None)}",
        f"*Route / rule*\n{shown(approval.route)} / {shown(approval.rule)}",
        f"*Approvals*\n{approval.approvals_count} of {approval.quorum}",
        f"*Expires*\n{_when(approval.expires_at)}",
    ]
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": "Approval requested", "emoji": True},
        },
        {"type": "section", "fields": [_mrkdwn(f) for f in fields]},
        {"type": "section", "text": _mrkdwn(f"*Agent's reason*\n{shown(approval.reason)}")},
    ]
    if approval.actions:
        actions = shown(", ".join(approval.actions))
        blocks.append({"type": "section", "text": _mrkdwn(f"*Actions*\n{actions}")})
    if approval.earlier_attempt is not None:
        earlier = shown(approval.earlier_attempt)
        blocks.append(
            {
                "type": "section",
                "text": _mrkdwn(
                    f":warning: *This exact request was approved before* ({earlier}) and sent, "
                    "but the upstream failed: it may already have run. Check before approving."
                ),
            }
        )
    if approval.tool_arguments is not None:
        blocks.append(
            {
                "type": "section",
                "text": _mrkdwn(f"*Tool arguments*\n{_code(approval.tool_arguments, redactor)}"),
            }
        )
    if approval.headers:
        # Every header the approval binds: what runs carries exactly these.
        listed = "\n".join(
            f"{name}: {'[REDACTED] (secret)' if redacted else value}"
            for name, value, redacted in approval.headers
        )
        blocks.append(
            {
                "type": "section",
                "text": _mrkdwn(f"*Headers*\n{escape(listed, _PREVIEW_CHARS, redactor=redactor)}"),
            }
        )
    if approval.body_preview:
        size = f"{approval.body_bytes} bytes" + (
            f", {shown(approval.content_type)}" if approval.content_type else ""
        )
        blocks.append(
            {
                "type": "section",
                "text": _mrkdwn(
                    f"*Body* ({size}, redacted)\n{_code(approval.body_preview, redactor)}"
                ),
            }
        )
    context = [f"`{approval.id}`"]
    if public_url:
        link = f"{public_url.rstrip('/')}/_countersign/api/approvals/{approval.id}"
        context.append(f"<{link}|Open in Countersign>")
    blocks.append({"type": "context", "elements": [_mrkdwn(" · ".join(context))]})
    if approval.abandoned_at is not None and approval.state is ApprovalState.PENDING:
        blocks.append(
            {
                "type": "context",
                "elements": [
                    _mrkdwn(
                        f"The agent stopped waiting at {_when(approval.abandoned_at)}; "
                        "approving lets its identical retry run."
                    )
                ],
            }
        )
    if approval.decisions:
        lines = "\n".join(_decision_line(d, redactor) for d in approval.decisions)
        blocks.append({"type": "section", "text": _mrkdwn(lines)})
    if approval.state is ApprovalState.PENDING:
        blocks.append(_buttons(approval.id))
    else:
        blocks.append({"type": "section", "text": _mrkdwn(outcome_text(approval, redactor))})
    return blocks


def _button(text: str, action_id: str, value: str, style: str | None = None) -> dict[str, Any]:
    button: dict[str, Any] = {
        "type": "button",
        "text": {"type": "plain_text", "text": text},
        "action_id": action_id,
        "value": value,
    }
    if style:
        button["style"] = style
    return button


def _buttons(approval_id: str) -> dict[str, Any]:
    return {
        "type": "actions",
        "block_id": "countersign_decision",
        "elements": [
            _button("Approve", APPROVE, approval_id, "primary"),
            _button("Approve with note…", APPROVE_WITH_NOTE, approval_id),
            _button("Deny", DENY, approval_id, "danger"),
        ],
    }


def reason_modal(
    action_id: str, approval: Approval, metadata: str, redactor: Redactor = DEFAULT_REDACTOR
) -> dict[str, Any]:
    """The modal behind "Approve with note…" (optional reason) and "Deny" (required reason)."""
    deny = action_id == DENY
    return {
        "type": "modal",
        "callback_id": action_id,
        "private_metadata": metadata,
        "title": {"type": "plain_text", "text": "Deny request" if deny else "Approve request"},
        "submit": {"type": "plain_text", "text": "Deny" if deny else "Approve"},
        "close": {"type": "plain_text", "text": "Cancel"},
        "blocks": [
            {
                "type": "section",
                "text": _mrkdwn(
                    f"`{escape(approval.method)}` {escape(approval.path, redactor=redactor)}\n"
                    f"requested by {escape(approval.requester.subject, redactor=redactor)}"
                    f" (rule {escape(approval.rule, redactor=redactor)})"
                ),
            },
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
