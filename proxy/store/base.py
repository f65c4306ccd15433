"""The `Store` protocol: every approval store (memory, Redis) offers exactly these operations,
each atomic, and passes the shared conformance suite in `tests/store_conformance.py`.

Transitions apply the pure functions of `proxy.approvals.state`; a store only makes them atomic
and durable and wakes whoever waits on an approval.
"""

from __future__ import annotations

from typing import Protocol

from ..types import Approval, ApprovalState, DecisionRecord


class StoreUnavailable(Exception):
    """The store cannot be reached: privileged requests fail closed with 503."""


class Store(Protocol):
    async def create_or_join(self, approval: Approval) -> tuple[Approval, bool]:
        """Store `approval`, or return the joinable one (pending or approved, not yet executed)
        that has the same fingerprint. The bool is True when `approval` was created."""
        ...

    async def get(self, approval_id: str) -> Approval | None: ...

    async def decide(self, approval_id: str, record: DecisionRecord, now: float) -> Approval:
        """Apply `state.decide` atomically; raises its errors, or KeyError for an unknown id.
        Past the deadline it raises `NotPending` and stores nothing (`expire` does that)."""
        ...

    async def claim(self, approval_id: str, now: float) -> Approval:
        """approved → executed atomically; exactly one caller ever succeeds per approval."""
        ...

    async def record_outcome(self, approval_id: str, upstream_status: int) -> Approval: ...

    async def expire(self, approval_id: str, now: float) -> Approval | None:
        """pending or approved (unused) → expired if its deadline has passed. Returns the
        approval only when this call made the transition (so exactly one caller audits it)."""
        ...

    async def due(self, now: float, limit: int = 100) -> list[str]:
        """Ids of pending or approved (unused) approvals whose deadline has passed."""
        ...

    async def list(self, state: ApprovalState | None = None, limit: int = 100) -> list[Approval]:
        """Newest first."""
        ...

    async def wait(self, approval_id: str, seconds: float) -> Approval | None:
        """Return the approval as soon as it is no longer pending, or as it is after `seconds`
        (a store may also return early on any change; callers loop). None for an unknown id."""
        ...

    async def lease(self, name: str, seconds: float) -> bool:
        """Take or renew the named lease for `seconds`: True while this process holds it.
        Replicas use it so that one of them at a time sweeps expiries."""
        ...

    async def set_note(self, approval_id: str, name: str, value: str) -> None:
        """Keep a small named value with an approval, for as long as the approval is kept
        (e.g. where its Slack message is, so any replica can update it). KeyError for an
        unknown approval."""
        ...

    async def get_note(self, approval_id: str, name: str) -> str | None:
        """The value `set_note` kept, or None (unknown approval or name)."""
        ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...
