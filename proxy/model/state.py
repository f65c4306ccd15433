"""The approval state machine: pure functions from one `Approval` to the next.

    pending ──approve (quorum reached)──▶ approved ──claim──▶ executed
       │ └──deny──▶ denied                     │
       └──deadline passed──▶ expired ◀──────────┘ not used within the window

An approval has one window (`expires_at - created_at`) to be decided and, once approved, the
same window again to be used: an unused approval does not stay valid forever.

Every store applies exactly these functions inside its own atomic step (a Python critical
section for `MemoryStore`, a Lua script for Redis), so the rules live in one place. No I/O here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from ..types import Approval, ApprovalState, DecisionRecord, Identity, Verdict


class ApprovalError(Exception):
    """A transition or authorization was refused; `code` is the API's `error` value."""

    code = "approval_error"
    status = 409

    def __init__(self, message: str, approval: Approval | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.approval = approval


class NotPending(ApprovalError):
    """The approval was already decided, expired or executed."""

    code = "approval_not_pending"
    status = 409


class DuplicateApprover(ApprovalError):
    """This approver already approved; the same person counts once towards the quorum."""

    code = "already_approved"
    status = 409


class NotClaimable(ApprovalError):
    """The approval cannot be executed (not approved, or already executed)."""

    code = "approval_not_approved"
    status = 403


class SelfApproval(ApprovalError):
    code = "self_approval"
    status = 403


class NotAnApprover(ApprovalError):
    code = "not_an_approver"
    status = 403


def _same(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.casefold() == b.casefold()


def check_approver(
    approval: Approval,
    approver: Identity,
    directory: Mapping[str, Sequence[str]],
) -> None:
    """Raise unless `approver` may decide `approval`.

    Zero self-approval comes first and has no exemption: the requester, and the human the
    requesting agent acts for, can never decide their own request, whatever groups they hold.
    Then the approver must be one of the rule's users (by email) or in one of its groups, either
    through the token's groups claim or through the `approvals.groups` directory (by email).
    """
    requester = approval.requester
    mine = (approver.subject, approver.email)
    theirs = (requester.subject, requester.email, requester.owner)
    if any(_same(m, t) for m in mine for t in theirs):
        raise SelfApproval("you cannot decide an approval you requested or that acts for you")
    if approver.email and any(_same(approver.email, u) for u in approval.approver_users):
        return
    if approver.groups.intersection(approval.approver_groups):
        return
    for group in approval.approver_groups:
        members = directory.get(group, ())
        if any(_same(approver.email, m) or _same(approver.subject, m) for m in members):
            return
    raise NotAnApprover(
        f"you are not an approver of rule {approval.rule!r} "
        f"(groups: {', '.join(approval.approver_groups) or '-'}; "
        f"users: {', '.join(approval.approver_users) or '-'})"
    )


_EXPIRABLE = (ApprovalState.PENDING, ApprovalState.APPROVED)


def is_due(approval: Approval, now: float) -> bool:
    """Pending and undecided, or approved and unused, past the deadline."""
    return approval.state in _EXPIRABLE and now >= approval.expires_at


def decide(approval: Approval, record: DecisionRecord, now: float) -> Approval:
    """Apply one decision. A denial is final; approvals accumulate until the quorum.

    Raises `NotPending` when the approval is no longer pending (including past its deadline:
    the caller should then `expire` it) and `DuplicateApprover` for a second approval by the
    same person.
    """
    if approval.state is not ApprovalState.PENDING:
        raise NotPending(f"approval is {approval.state.value}", approval)
    if now >= approval.expires_at:
        raise NotPending("approval is expired", expire(approval, now))
    if record.verdict is Verdict.DENY:
        return replace(
            approval, state=ApprovalState.DENIED, decisions=(*approval.decisions, record)
        )
    if any(d.person == record.person and d.verdict is Verdict.APPROVE for d in approval.decisions):
        raise DuplicateApprover("you already approved this request", approval)
    updated = replace(approval, decisions=(*approval.decisions, record))
    if updated.approvals_count >= approval.quorum:
        window = approval.expires_at - approval.created_at
        updated = replace(updated, state=ApprovalState.APPROVED, expires_at=now + window)
    return updated


def claim(approval: Approval, now: float) -> Approval:
    """approved → executed: the one permission to forward the request, taken at most once."""
    if approval.state is not ApprovalState.APPROVED:
        raise NotClaimable(f"approval is {approval.state.value}", approval)
    if is_due(approval, now):
        # Not saved here: `expire` makes that transition, so exactly one caller audits it.
        raise NotClaimable("approval expired before it was used", expire(approval, now))
    return replace(approval, state=ApprovalState.EXECUTED, executed_at=now)


def expire(approval: Approval, now: float) -> Approval:
    """pending or approved → expired once the deadline has passed; else returned unchanged."""
    if is_due(approval, now):
        return replace(approval, state=ApprovalState.EXPIRED)
    return approval


def record_outcome(approval: Approval, upstream_status: int) -> Approval:
    """Note what the upstream answered to the executed request."""
    if approval.state is not ApprovalState.EXECUTED:
        raise NotClaimable(f"approval is {approval.state.value}", approval)
    return replace(approval, upstream_status=upstream_status)


def joinable(approval: Approval) -> bool:
    """An identical request may join an approval that has not run or ended yet."""
    return approval.state in (ApprovalState.PENDING, ApprovalState.APPROVED)
