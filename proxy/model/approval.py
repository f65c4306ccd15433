"""An approval and its parts: plain, immutable data that stores keep and views render.

Every transition (`proxy.model.state`) returns a new value, which a store swaps in atomically.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from .identity import Identity
from .persons import mailbox


class ApprovalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"  # not decided in time
    EXECUTED = "executed"
    LAPSED = "lapsed"  # approved, but not used within `approvals.claim_seconds`


class Verdict(StrEnum):
    APPROVE = "approve"
    DENY = "deny"


class Outcome(StrEnum):
    """What happened to an executed approval's request."""

    COMPLETED = "completed"  # the upstream answered (with `upstream_status`)
    AMBIGUOUS = "ambiguous"  # sent, then the upstream failed: it may or may not have run


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asked for an approval: the parts of an `Identity` an approval keeps."""

    subject: str
    issuer: str
    client_id: str | None = None
    email: str | None = None
    owner: str | None = None
    groups: tuple[str, ...] = ()
    person: str | None = None  # the verified, canonical email (see `Identity.person`)

    @classmethod
    def of(cls, identity: Identity) -> Requester:
        return cls(
            subject=identity.subject,
            issuer=identity.issuer,
            client_id=identity.client_id,
            email=identity.email,
            owner=identity.owner,
            groups=tuple(sorted(identity.groups)),
            person=identity.person,
        )


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    """One approver's verdict on an approval."""

    verdict: Verdict
    approver_subject: str
    approver_email: str | None
    channel: str  # "api", "slack", "web"
    reason: str | None
    at: float  # unix time
    approver_issuer: str = ""
    person: str | None = None  # the approver's canonical email: who decided
    # A grant this approver asked for with an approving verdict ("and the next N like it for T
    # seconds"); both set or both None. See `proxy.model.grant` and `state.decide`.
    grant_uses: int | None = None
    grant_seconds: int | None = None

    @property
    def who(self) -> str:
        """The decider as people read it."""
        return self.person or self.approver_email or self.approver_subject

    def same_person(self, other: DecisionRecord) -> bool:
        """One human: the same credential (issuer and subject), or the same mailbox."""
        if (self.approver_issuer, self.approver_subject) == (
            other.approver_issuer,
            other.approver_subject,
        ):
            return True
        return (
            self.person is not None
            and other.person is not None
            and mailbox(self.person) == mailbox(other.person)
        )


def distinct_persons(records: tuple[DecisionRecord, ...]) -> int:
    """How many different people made `records` (same subject or same email counts once)."""
    counted: list[DecisionRecord] = []
    for record in records:
        if not any(record.same_person(seen) for seen in counted):
            counted.append(record)
    return len(counted)


@dataclass(frozen=True, slots=True)
class Approval:
    """Permission for one execution of one exact request by one identity.

    `fingerprint` binds it (`proxy.model.binding`); the rest is what approvers are shown:
    `headers` are the bound headers as (name, value, redacted) with secret values already
    replaced, `body_preview` the raw text of the body (redacted by pattern, cut where marked).
    """

    id: str
    fingerprint: str
    state: ApprovalState
    created_at: float
    expires_at: float
    rule: str
    route: str
    method: str
    path: str
    query: str
    requester: Requester
    approver_groups: tuple[str, ...]
    approver_users: tuple[str, ...]
    quorum: int
    reason: str | None = None  # the agent's stated intent (Countersign-Reason)
    body_preview: str = ""
    body_bytes: int = 0
    content_type: str | None = None
    request_id: str | None = None
    decisions: tuple[DecisionRecord, ...] = ()
    executed_at: float | None = None
    upstream_status: int | None = None
    target: str = ""  # path and query exactly as forwarded upstream
    upstream_url: str = ""
    headers: tuple[tuple[str, str, bool], ...] = ()
    actions: tuple[str, ...] = ()
    body_sha256: str = ""
    body_truncated: bool = False
    claim_seconds: float = 600.0
    outcome: Outcome | None = None
    abandoned_at: float | None = None
    # An MCP tools/call's arguments, pretty-printed and redacted, for approvers.
    tool_arguments: str | None = None
    # An earlier approval of this same request that was sent upstream and failed there: it may
    # have run, and approvers must know before they approve a retry.
    earlier_attempt: str | None = None
    # What approvers see besides the request (the rule's `risk` and `note`), and who may decide:
    # the members of the rule's groups that `approvals.groups` lists (a token's groups claim may
    # add others nobody can list in advance).
    risk: str | None = None
    note: str | None = None
    approver_members: tuple[str, ...] = ()
    # The rule's `grant` limits when the approval was opened (None: the rule offers no grants);
    # once approved with a grant, the grant's id and its uses and seconds (the smallest every
    # approving decision asked for).
    grant_max_uses: int | None = None
    grant_max_seconds: int | None = None
    grant_id: str | None = None
    grant_uses: int | None = None
    grant_seconds: int | None = None

    @property
    def grant_expires_at(self) -> float | None:
        """When the grant this approval created runs out: `grant_seconds` after the decision
        that approved it."""
        final = self.final_decision
        if self.grant_id is None or self.grant_seconds is None or final is None:
            return None
        return final.at + self.grant_seconds

    @property
    def approvals_count(self) -> int:
        """Distinct people who approved (one person counts once, whatever token they used)."""
        decisions = self.decisions
        if len(decisions) == 1:  # the usual case, and a bulk decision's 10,000 times
            return 1 if decisions[0].verdict is Verdict.APPROVE else 0
        return distinct_persons(tuple(d for d in self.decisions if d.verdict is Verdict.APPROVE))

    @property
    def requester_key(self) -> str:
        """The identity limits count against: issuer and subject."""
        return f"{self.requester.issuer} {self.requester.subject}"

    @property
    def final_decision(self) -> DecisionRecord | None:
        """The decision that ended the approval (the denial, or the approval reaching quorum)."""
        if self.state in (
            ApprovalState.DENIED,
            ApprovalState.APPROVED,
            ApprovalState.EXECUTED,
            ApprovalState.LAPSED,
        ):
            return self.decisions[-1] if self.decisions else None
        return None


def _make_evolve() -> Any:
    """Build `evolve`: straight-line code that copies every slot of an `Approval` through its
    slot descriptor (as `dataclasses` itself generates `__init__`), taking the changed ones
    from keyword arguments. About 4x cheaper than `dataclasses.replace`, which loops over the
    fields, builds a dict and calls the frozen `__init__` (one `object.__setattr__` per
    field): a bulk release makes three transitions per approval, 10,000 approvals at once."""
    names = [f.name for f in fields(Approval)]
    namespace: dict[str, Any] = {"_KEEP": object(), "_new": object.__new__, "_cls": Approval}
    lines = ["def evolve(approval, /, *, " + ", ".join(f"{n}=_KEEP" for n in names) + "):"]
    lines.append("    new = _new(_cls)")
    for name in names:
        namespace[f"_set_{name}"] = getattr(Approval, name).__set__
        lines.append(f"    _set_{name}(new, approval.{name} if {name} is _KEEP else {name})")
    lines.append("    return new")
    exec("\n".join(lines), namespace)  # our own field names only, nothing from outside
    made = namespace["evolve"]
    made.__doc__ = "`dataclasses.replace(approval, **changes)` for an `Approval`, faster."
    return made


if TYPE_CHECKING:

    def evolve(
        approval: Approval,
        /,
        *,
        state: ApprovalState = ...,
        expires_at: float = ...,
        decisions: tuple[DecisionRecord, ...] = ...,
        executed_at: float | None = ...,
        upstream_status: int | None = ...,
        outcome: Outcome | None = ...,
        abandoned_at: float | None = ...,
        grant_id: str | None = ...,
        grant_uses: int | None = ...,
        grant_seconds: int | None = ...,
    ) -> Approval:
        """`dataclasses.replace(approval, **changes)`, faster. Typed here for the fields the
        state machine changes (the function itself accepts every field)."""
else:
    evolve = _make_evolve()


_LABELS = {
    ApprovalState.PENDING: "Pending",
    ApprovalState.APPROVED: "Approved",
    ApprovalState.DENIED: "Denied",
    ApprovalState.EXPIRED: "Expired",
    ApprovalState.LAPSED: "Lapsed",
}


def state_label(approval: Approval) -> str:
    """The header every channel (Slack, the inbox, Teams, webhooks) shows for an approval.

    Pending, Approved, Denied, Expired, Lapsed follow the state. An executed approval reads
    Executed, or Failed when the upstream answered with a 5xx status (it ran, and the upstream
    reported a failure), or Ambiguous when the upstream failed after the request was sent (it
    may or may not have run). Executed with no outcome recorded yet reads Executed.
    """
    if approval.state is not ApprovalState.EXECUTED:
        return _LABELS[approval.state]
    if approval.outcome is Outcome.AMBIGUOUS:
        return "Ambiguous"
    if approval.upstream_status is not None and approval.upstream_status >= 500:
        return "Failed"
    return "Executed"
