"""Plain data passed between the parts of the request path.

Nothing here imports aiohttp, redis or slack: authn produces an `Identity`, the server turns a
request into a `RequestInfo`, policy returns a `Decision`. Keeping these dumb lets the pure parts
(policy, approvals) be tested and benchmarked without a server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    APPROVE = "approve"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as established by authn.

    `owner` is the human an agent acts for (the `act.sub` claim by default); approvals use it to
    refuse self-approval by the agent's own operator.
    """

    subject: str
    issuer: str  # the OIDC issuer URL, or "api-key" for static keys
    client_id: str | None = None
    email: str | None = None
    groups: frozenset[str] = frozenset()
    owner: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)

    def to_log(self) -> dict[str, Any]:
        """The fields worth putting in an audit event (never the raw claims: they may hold PII)."""
        return {
            "subject": self.subject,
            "issuer": self.issuer,
            "client_id": self.client_id,
            "email": self.email,
            "groups": sorted(self.groups),
            "owner": self.owner,
        }


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What the policy judges: the method and the normalized path that will be forwarded."""

    method: str
    path: str  # percent-decoded, normalized; exactly what is forwarded upstream
    route: str | None  # route name, None when no route matched


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's verdict and why (`reason` is human-readable, used by `countersign explain`)."""

    action: Action
    rule: str | None  # rule name; None when the default applied
    reason: str


class ApprovalState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    EXECUTED = "executed"


class Verdict(StrEnum):
    APPROVE = "approve"
    DENY = "deny"


@dataclass(frozen=True, slots=True)
class Requester:
    """Who asked for an approval: the parts of an `Identity` an approval keeps."""

    subject: str
    issuer: str
    client_id: str | None = None
    email: str | None = None
    owner: str | None = None
    groups: tuple[str, ...] = ()

    @classmethod
    def of(cls, identity: Identity) -> Requester:
        return cls(
            subject=identity.subject,
            issuer=identity.issuer,
            client_id=identity.client_id,
            email=identity.email,
            owner=identity.owner,
            groups=tuple(sorted(identity.groups)),
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

    @property
    def person(self) -> str:
        """Who decided, for counting: the email when known (one human may hold several
        tokens with different subjects), else the subject."""
        return (self.approver_email or self.approver_subject).casefold()


@dataclass(frozen=True, slots=True)
class Approval:
    """Permission for one execution of one exact request by one identity.

    Immutable: every transition (see `proxy.approvals.state`) returns a new value, which a store
    swaps in atomically.
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

    @property
    def approvals_count(self) -> int:
        """Distinct people who approved (one person counts once, whatever token they used)."""
        return len({d.person for d in self.decisions if d.verdict is Verdict.APPROVE})

    @property
    def final_decision(self) -> DecisionRecord | None:
        """The decision that ended the approval (the denial, or the approval reaching quorum)."""
        if self.state in (ApprovalState.DENIED, ApprovalState.APPROVED, ApprovalState.EXECUTED):
            return self.decisions[-1] if self.decisions else None
        return None
