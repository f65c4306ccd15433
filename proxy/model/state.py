"""The approval state machine and who may decide: pure functions from one `Approval` to the next.

    pending ──approve (quorum reached)──▶ approved ──claim──▶ executed (completed | ambiguous)
       │ └──deny──▶ denied                     │
       └──deadline passed──▶ expired            └──not used within claim_seconds──▶ lapsed

Every store applies exactly these functions inside its own atomic step (a Python critical
section for `MemoryStore`, compare-and-set for Redis), so the rules live in one place. No I/O,
and no HTTP: errors carry a `code` (DESIGN §2's error codes) that the edge maps to a status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from .approval import (
    Approval,
    ApprovalState,
    DecisionRecord,
    Outcome,
    Verdict,
    distinct_persons,
    evolve,
)
from .grant import grant_id_for
from .identity import Identity
from .persons import canonical_email, same_person


class ApprovalError(Exception):
    """A transition or authorization was refused; `code` names it for the outside world."""

    code = "approval_error"

    def __init__(self, message: str, approval: Approval | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.approval = approval


class NotPending(ApprovalError):
    """The approval was already decided, expired or executed."""

    code = "approval_not_pending"


class DuplicateApprover(ApprovalError):
    """This person already approved; the same person counts once towards the quorum."""

    code = "already_approved"


class NotClaimable(ApprovalError):
    """The approval cannot be executed (not approved, or already executed)."""

    code = "approval_used"


class SelfApproval(ApprovalError):
    code = "self_approval"


class NotAnApprover(ApprovalError):
    code = "not_an_approver"


class ApproverUnidentified(ApprovalError):
    """The credential names no person (no verified email), so it cannot decide."""

    code = "approver_unidentified"


class ApprovalNotFound(ApprovalError):
    code = "approval_not_found"


class ReasonRequired(ApprovalError):
    code = "reason_required"


class InvalidGrant(ApprovalError):
    """A grant asked for that the rule does not allow (none at all, or more than its limits)."""

    code = "invalid_request"


class TooManyPending(ApprovalError):
    """The identity has too many pending approvals, or the process holds too many bytes."""

    code = "too_many_pending"

    def __init__(self, message: str, retry_after: int = 30) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def check_person(approver: Identity) -> str:
    """The approver's person, or `ApproverUnidentified`."""
    person = approver.person
    if person is None:
        raise ApproverUnidentified(
            "this credential names no person (no verified email), so it cannot decide approvals"
        )
    return person


def check_not_self(approval: Approval, approver: Identity) -> None:
    """Zero self-approval, no exemption: the requester, and the human the requesting agent acts
    for, never decide their request. An owner that cannot be compared with a person (it is not
    an email) fails closed: nobody can be shown not to be them."""
    requester = approval.requester
    if (approver.issuer, approver.subject) == (requester.issuer, requester.subject):
        raise SelfApproval("you cannot decide a request you made")
    person = approver.person
    # The requester's email counts even unverified: erring towards "the same person" only
    # ever refuses a decision.
    if same_person(person, requester.person) or same_person(
        person, canonical_email(requester.email)
    ):
        raise SelfApproval("you cannot decide a request you made")
    if requester.owner is not None:
        owner = canonical_email(requester.owner)
        if owner is None:
            raise SelfApproval(
                f"the agent acts for {requester.owner!r}, which is not an email address, so "
                "no approver can be told apart from them; map identity.claims.owner to an "
                "email claim"
            )
        if same_person(person, owner):
            raise SelfApproval("you cannot decide a request made on your behalf")


def is_listed_approver(
    approval: Approval, approver: Identity, directory: Mapping[str, Sequence[str]]
) -> bool:
    """Whether the approver's person is one of the rule's users (by canonical email) or in one
    of its groups, through the token's groups claim or the `approvals.groups` directory."""
    return listed_in(approval.approver_groups, approval.approver_users, approver, directory)


def listed_in(
    groups: Sequence[str],
    users: Sequence[str],
    approver: Identity,
    directory: Mapping[str, Sequence[str]],
) -> bool:
    """`is_listed_approver` for any approvers list (an approval's, a grant's)."""
    person = approver.person
    if person is None:
        return False
    if any(canonical_email(u) == person for u in users):
        return True
    if approver.groups.intersection(groups):
        return True
    return any(
        canonical_email(member) == person for group in groups for member in directory.get(group, ())
    )


def check_grant_request(
    approval: Approval, verdict: Verdict, uses: int | None, seconds: int | None
) -> None:
    """Raise `InvalidGrant` unless a decision may ask for this grant: only with an approving
    verdict, only where the approval's rule allows grants, and within its limits."""
    if uses is None and seconds is None:
        return
    if uses is None or seconds is None:
        raise InvalidGrant("a grant needs both a number of uses and a number of seconds")
    if verdict is not Verdict.APPROVE:
        raise InvalidGrant("a grant goes with an approval, not with a denial")
    if approval.grant_max_uses is None or approval.grant_max_seconds is None:
        raise InvalidGrant(f"grants are not allowed for rule {approval.rule!r}")
    if uses < 1 or seconds < 1:
        raise InvalidGrant("a grant needs at least 1 use and at least 1 second")
    if uses > approval.grant_max_uses or seconds > approval.grant_max_seconds:
        raise InvalidGrant(
            f"rule {approval.rule!r} allows a grant of at most {approval.grant_max_uses} uses "
            f"for at most {approval.grant_max_seconds} seconds "
            f"({approval.grant_max_seconds // 60} minutes); asked for {uses} uses for "
            f"{seconds} seconds"
        )


def _granted(approval: Approval) -> Approval:
    """An approval that just reached its quorum, with the grant its approvers asked for: only
    when the rule allows grants and every approving decision asked for one; the smallest uses
    and the smallest seconds win (and never beyond the rule's limits)."""
    if approval.grant_max_uses is None or approval.grant_max_seconds is None:
        return approval  # the rule offers no grants (the usual case): nothing to look at
    approving = [d for d in approval.decisions if d.verdict is Verdict.APPROVE]
    if not approving or any(d.grant_uses is None or d.grant_seconds is None for d in approving):
        return approval
    uses = min(min(d.grant_uses or 0 for d in approving), approval.grant_max_uses)
    seconds = min(min(d.grant_seconds or 0 for d in approving), approval.grant_max_seconds)
    if uses < 1 or seconds < 1:
        return approval
    return evolve(
        approval, grant_id=grant_id_for(approval.id), grant_uses=uses, grant_seconds=seconds
    )


def check_approver(
    approval: Approval,
    approver: Identity,
    directory: Mapping[str, Sequence[str]],
) -> str:
    """Raise unless `approver` may decide `approval`; return their person.

    Order: the requester's own credential (`self_approval`), a person (`approver_unidentified`),
    zero self-approval by person or owner, then the rule's approvers (`not_an_approver`).
    """
    requester = approval.requester
    if (approver.issuer, approver.subject) == (requester.issuer, requester.subject):
        raise SelfApproval("you cannot decide a request you made")
    person = check_person(approver)
    check_not_self(approval, approver)
    if is_listed_approver(approval, approver, directory):
        return person
    raise NotAnApprover(
        f"you are not an approver of rule {approval.rule!r} "
        f"(groups: {', '.join(approval.approver_groups) or '-'}; "
        f"users: {', '.join(approval.approver_users) or '-'})"
    )


_EXPIRABLE = (ApprovalState.PENDING, ApprovalState.APPROVED)


def is_due(approval: Approval, now: float) -> bool:
    """Pending and undecided, or approved and unused, past its deadline."""
    return approval.state in _EXPIRABLE and now >= approval.expires_at


def decide(approval: Approval, record: DecisionRecord, now: float) -> Approval:
    """Apply one decision. A denial is final; approvals accumulate until the quorum.

    Raises `NotPending` when the approval is no longer pending (including past its deadline:
    the caller should then `expire` it) and `DuplicateApprover` for a second approval by the
    same person (same credential, or the same mailbox).
    """
    if approval.state is not ApprovalState.PENDING:
        raise NotPending(f"approval is {approval.state.value}", approval)
    if now >= approval.expires_at:
        raise NotPending("approval is expired", expire(approval, now))
    earlier = approval.decisions
    decisions = (*earlier, record)
    if record.verdict is Verdict.DENY:
        return evolve(approval, state=ApprovalState.DENIED, decisions=decisions)
    # One copy per decision (a bulk release makes 10,000 at once): the quorum is counted on
    # the decisions before the new approval is built. The first decision (the usual case)
    # is one person and nobody's duplicate.
    if earlier:
        if any(d.verdict is Verdict.APPROVE and d.same_person(record) for d in earlier):
            raise DuplicateApprover("you already approved this request", approval)
        approvals = distinct_persons(tuple(d for d in decisions if d.verdict is Verdict.APPROVE))
    else:
        approvals = 1
    if approvals < approval.quorum:
        return evolve(approval, decisions=decisions)
    # From now on the deadline is the claim window: use it, or it lapses.
    return _granted(
        evolve(
            approval,
            decisions=decisions,
            state=ApprovalState.APPROVED,
            expires_at=now + approval.claim_seconds,
        )
    )


def claim(approval: Approval, now: float) -> Approval:
    """approved → executed: the one permission to forward the request, taken at most once."""
    if approval.state is not ApprovalState.APPROVED:
        raise NotClaimable(f"approval is {approval.state.value}", approval)
    if is_due(approval, now):
        # Not saved here: `expire` makes that transition, so exactly one caller audits it.
        raise NotClaimable("approval lapsed before it was used", expire(approval, now))
    return evolve(approval, state=ApprovalState.EXECUTED, executed_at=now)


def expire(approval: Approval, now: float) -> Approval:
    """Past the deadline: pending → expired, approved → lapsed; else returned unchanged."""
    if not is_due(approval, now):
        return approval
    if approval.state is ApprovalState.APPROVED:
        return evolve(approval, state=ApprovalState.LAPSED)
    return evolve(approval, state=ApprovalState.EXPIRED)


def abandon(approval: Approval, now: float) -> Approval:
    """Note that a held client went away (shown to approvers); the approval stays open, and an
    identical request joins it. Unchanged when it is not pending or already noted."""
    if approval.state is not ApprovalState.PENDING or approval.abandoned_at is not None:
        return approval
    return evolve(approval, abandoned_at=now)


def record_outcome(approval: Approval, outcome: Outcome, upstream_status: int | None) -> Approval:
    """Note what became of the executed request."""
    if approval.state is not ApprovalState.EXECUTED:
        raise NotClaimable(f"approval is {approval.state.value}", approval)
    return evolve(approval, outcome=outcome, upstream_status=upstream_status)


def joinable(approval: Approval) -> bool:
    """An identical request may join an approval that has not run or ended yet."""
    return approval.state in (ApprovalState.PENDING, ApprovalState.APPROVED)
