"""How an approval that is no longer pending ended, in the same words on every chat channel.

Each channel formats the pieces its own way (Slack bolds the state and escapes for mrkdwn, Teams
escapes for Adaptive Card Markdown); the sentence around them is shared, so Slack, Teams and
whatever comes next never drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from ..model import Approval, ApprovalState, Outcome

# The sentence for each ending; `{word}` is the state, `{by}` " by <who decided>" (or nothing),
# `{reason}` ": <a denial's reason>" (or nothing), `{status}` the upstream's answer (or nothing).
_SENTENCES: Final = {
    "approved": ("Approved", "{word}{by}: waiting for the agent to run it"),
    "denied": ("Denied", "{word}{by}{reason}"),
    "expired": ("Expired", "{word}: not decided in time"),
    "lapsed": ("Lapsed", "{word}: approved{by}, but not used in time"),
    "ambiguous": (
        "Sent",
        "{word}{by}, but the upstream failed before answering: it may or may not have run",
    ),
    "executed": ("Executed", "{word}{by}{status}"),
}


def ending(approval: Approval) -> str | None:
    """Which ending the approval has come to (a key of the sentences), or None while pending."""
    state = approval.state
    if state is ApprovalState.EXECUTED:
        return "ambiguous" if approval.outcome is Outcome.AMBIGUOUS else "executed"
    if state is ApprovalState.PENDING:
        return None
    return state.value


def outcome_sentence(
    approval: Approval,
    *,
    word: Callable[[str], str],
    name: Callable[[str], str],
    reason: Callable[[str], str],
    status: Callable[[int], str],
) -> str:
    """The ending in words ("" while pending), each piece formatted by the channel: `word` the
    state, `name` who decided, `reason` a denial's reason, `status` the upstream's status."""
    kind = ending(approval)
    if kind is None:
        return ""
    label, sentence = _SENTENCES[kind]
    final = approval.final_decision
    return sentence.format(
        word=word(label),
        by=f" by {name(final.who)}" if final else "",
        reason=f": {reason(final.reason)}" if final and final.reason else "",
        status=(
            f", upstream answered {status(approval.upstream_status)}"
            if approval.upstream_status is not None
            else ""
        ),
    )
