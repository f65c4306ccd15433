"""Who is calling, and what the policy judges: plain data, no I/O.

authn produces an `Identity`, the server turns a request into a `RequestInfo`, policy returns a
`Decision`. Keeping these dumb lets the pure parts (policy, approvals) be tested and benchmarked
without a server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from .persons import canonical_email


class Action(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    APPROVE = "approve"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling, as established by authn.

    `owner` is the human an agent acts for (the `act.sub` claim by default); approvals use it to
    refuse self-approval by the agent's own operator. `email_verified` says whether `email`
    names a person (a verified token claim, or an API key's configured email): only then does
    the identity have a `person`, and only a person may decide an approval.
    """

    subject: str
    issuer: str  # the OIDC issuer URL, or "api-key" for static keys
    client_id: str | None = None
    email: str | None = None
    groups: frozenset[str] = frozenset()
    owner: str | None = None
    claims: Mapping[str, Any] = field(default_factory=dict)
    email_verified: bool = False
    # `to_log`'s fields, built once: authn's caches hand the same Identity to every request of
    # a credential, and each of those requests has an audit line naming it.
    _log: dict[str, Any] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def person(self) -> str | None:
        """The one canonical email of the human behind this credential, or None."""
        return canonical_email(self.email) if self.email_verified else None

    def to_log(self) -> dict[str, Any]:
        """The fields worth putting in an audit event (never the raw claims: they may hold PII).
        A new dict each call: the caller may change its own."""
        log = self._log
        if log is None:
            log = {
                "subject": self.subject,
                "issuer": self.issuer,
                "client_id": self.client_id,
                "email": self.email,
                "groups": sorted(self.groups),
                "owner": self.owner,
            }
            object.__setattr__(self, "_log", log)  # (frozen: set once, the same every time)
        return {**log, "groups": list(log["groups"])}


@dataclass(frozen=True, slots=True)
class Decision:
    """The policy's verdict and why (`reason` is human-readable, used by `countersign explain`)."""

    action: Action
    rule: str | None  # rule name; None when the default applied
    reason: str
