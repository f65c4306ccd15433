"""Grants: "approve this and the next N requests of the same shape for T seconds".

An approver may attach a grant to an approval where the rule allows it (`grant: {max_uses,
max_seconds}`). Once the approval is approved, the grant lets the **same identity** send up to N
more requests of the **same shape** within T seconds without a human, each use taken atomically
by the store and audited. The shape is deliberately narrow (`scope_of`): the same identity
(issuer, subject, client id and owner: the identity parts the binding fingerprint uses), the same
rule, the same route, the same method, the same normalized path exactly, and the same set of
actions. Query, headers and body may differ (that is the point), but a request only ever reaches
a grant after the policy judged it `approve` under that same rule: a grant replaces the human
step, never the policy. `docs/security.md` says what a grant covers and what it does not.

Pure code, no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from .approval import Requester

GRANT_ID_PREFIX = "grt_"
_SCOPE_VERSION = b"countersign-grant-scope-1"

# The largest grant any rule may allow (config validation): a grant is a standing permission,
# so it stays small and short.
MAX_GRANT_USES = 1000
MAX_GRANT_SECONDS = 7 * 24 * 3600


class GrantState(StrEnum):
    ACTIVE = "active"  # uses left, not expired, not revoked
    EXHAUSTED = "exhausted"  # every use taken
    EXPIRED = "expired"  # its time ran out with uses left
    REVOKED = "revoked"  # an approver ended it


def grant_id_for(approval_id: str) -> str:
    """The id of the grant an approval creates: one approval creates at most one grant."""
    return GRANT_ID_PREFIX + approval_id.removeprefix("apr_")


def _part(digest: hashlib._Hash, value: str | None) -> None:
    data = b"\x00" if value is None else b"\x01" + value.encode("utf-8", "surrogateescape")
    digest.update(len(data).to_bytes(8, "big"))
    digest.update(data)


def scope_of(
    *,
    issuer: str,
    subject: str,
    client_id: str | None,
    owner: str | None,
    rule: str,
    route: str,
    method: str,
    path: str,
    actions: Iterable[str],
) -> str:
    """The shape a grant covers, as one SHA-256 (hex): equal only for requests by the same
    identity, under the same rule and route, with the same method, the same path exactly and
    the same set of actions (order and repeats ignored)."""
    digest = hashlib.sha256(_SCOPE_VERSION)
    for value in (issuer, subject, client_id, owner, rule, route, method.upper(), path):
        _part(digest, value)
    names = sorted(set(actions))
    digest.update(len(names).to_bytes(8, "big"))
    for name in names:
        _part(digest, name)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class Grant:
    """A standing permission made by an approval: up to `uses` more requests of one shape
    (`scope`) by one identity until `expires_at`. `uses_left` is what the store has left."""

    id: str
    approval_id: str  # the approval that created it
    scope: str  # `scope_of` the approved request
    rule: str
    route: str
    method: str
    path: str  # the exact normalized path covered
    actions: tuple[str, ...]
    requester: Requester
    approver_groups: tuple[str, ...]
    approver_users: tuple[str, ...]
    uses: int
    uses_left: int
    created_at: float
    expires_at: float
    granted_by: tuple[str, ...] = ()  # the persons whose approvals made it
    revoked_at: float | None = None
    revoked_by: str | None = None

    @property
    def pattern(self) -> str:
        """What it covers, as approvers read it: `POST /cloud/exports [tool:x]`."""
        shown = f"{self.method} {self.path}"
        if self.actions:
            shown += f" [{', '.join(sorted(set(self.actions)))}]"
        return shown

    def state(self, now: float) -> GrantState:
        if self.revoked_at is not None:
            return GrantState.REVOKED
        if self.uses_left <= 0:
            return GrantState.EXHAUSTED
        if now >= self.expires_at:
            return GrantState.EXPIRED
        return GrantState.ACTIVE

    def usable(self, now: float) -> bool:
        return self.state(now) is GrantState.ACTIVE


def pattern_of(method: str, path: str, actions: Iterable[str]) -> str:
    """`Grant.pattern` for a request not yet granted (what an approval offers)."""
    names = sorted(set(actions))
    return f"{method} {path}" + (f" [{', '.join(names)}]" if names else "")
