"""The `Store` protocol: every approval store (memory, Redis) offers exactly these operations,
each atomic, and passes the shared conformance suite in `tests/store_conformance.py`.

Transitions apply the pure functions of `proxy.model.state`; a store only makes them atomic
and durable and wakes whoever waits on an approval.
"""

from __future__ import annotations

import asyncio
import base64
import math
from collections.abc import Sequence
from typing import Protocol

from ..model import Approval, ApprovalState, DecisionRecord, Outcome
from ..model.grant import Grant
from ..model.state import ApprovalError


class StoreUnavailable(Exception):
    """The store cannot be reached: privileged requests fail closed with 503."""


class InvalidCursor(ValueError):
    """A listing cursor that no store handed out."""


def settle(waiter: asyncio.Future[None]) -> None:
    """Let a waiter go (a change, or its time is up), unless it has gone already."""
    if not waiter.done():
        waiter.set_result(None)


def cursor_after(approval: Approval) -> str:
    """The listing cursor of the page that follows `approval` (newer ones excluded): opaque to
    clients, the same for every store. It is a position, (created_at, id), so it stays valid
    when that approval changes state or is gone."""
    return encode_cursor(approval.created_at, approval.id)


def encode_cursor(created_at: float, approval_id: str) -> str:
    """The cursor of the position (created_at, id): what `cursor_after` makes."""
    position = f"{created_at!r} {approval_id}".encode("utf-8", "surrogateescape")
    return base64.urlsafe_b64encode(position).decode("ascii").rstrip("=")


def parse_cursor(cursor: str) -> tuple[float, str]:
    """(created_at, id) of a cursor from `cursor_after`; `InvalidCursor` for anything else."""
    if len(cursor) > 1024:
        raise InvalidCursor("not a listing cursor")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, _, approval_id = raw.decode("utf-8", "surrogateescape").partition(" ")
        created_at = float(created)
    except (ValueError, UnicodeError) as exc:
        raise InvalidCursor("not a listing cursor") from exc
    if not approval_id or not math.isfinite(created_at):
        raise InvalidCursor("not a listing cursor")
    return created_at, approval_id


class Store(Protocol):
    async def create_or_join(
        self, approval: Approval, max_pending: int | None = None
    ) -> tuple[Approval, bool]:
        """Store `approval`, or return the joinable one (pending or approved, not yet executed)
        that has the same fingerprint. The bool is True when `approval` was created.

        With `max_pending`, creating raises `TooManyPending` (and stores nothing) when the
        requester (`approval.requester_key`) already has that many pending approvals; joining
        is always allowed. The check and the creation are one atomic step."""
        ...

    async def get(self, approval_id: str) -> Approval | None: ...

    async def decide(self, approval_id: str, record: DecisionRecord, now: float) -> Approval:
        """Apply `state.decide` atomically; raises its errors, or KeyError for an unknown id.
        Past the deadline it raises `NotPending` and stores nothing (`expire` does that)."""
        ...

    async def decide_many(
        self, approval_ids: Sequence[str], record: DecisionRecord, now: float
    ) -> list[Approval | ApprovalError | StoreUnavailable]:
        """`decide` with the same `record` for every id, in as few round trips as the store
        can (a bulk decision: Redis sends one script per chunk of ids). Each approval's
        transition is atomic on its own, and wakes its waiters as `decide` does; the batch is
        not all-or-nothing. Per id, in order: the approval as decided, or the error that
        refused it (`NotPending`, `DuplicateApprover`, `ApprovalNotFound` for an unknown id),
        with nothing stored for it; or `StoreUnavailable` where the store failed part way
        (that approval may or may not be decided). Raises nothing for one id alone."""
        ...

    async def claim(self, approval_id: str, now: float) -> Approval:
        """approved → executed atomically; exactly one caller ever succeeds per approval."""
        ...

    async def record_outcome(
        self, approval_id: str, outcome: Outcome, upstream_status: int | None
    ) -> Approval: ...

    async def abandon(self, approval_id: str, now: float) -> Approval | None:
        """Apply `state.abandon` atomically. Returns the approval only when this call noted the
        abandonment (so it is audited once); KeyError for an unknown id."""
        ...

    async def expire(self, approval_id: str, now: float) -> Approval | None:
        """pending → expired, approved (unused) → lapsed, if its deadline has passed. Returns the
        approval only when this call made the transition (so exactly one caller audits it)."""
        ...

    async def due(self, now: float, limit: int = 100) -> list[str]:
        """Ids of pending or approved (unused) approvals whose deadline has passed."""
        ...

    async def list(
        self, state: ApprovalState | None = None, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[Approval], str | None]:
        """One page of at most `limit` approvals (all, or those in `state`), newest first
        (`created_at`, then id, both descending), and the cursor of the next page: None when
        there is nothing more. Pass that cursor back to read on from where the page ended;
        `cursor_after(approval)` makes the same cursor from any approval. A page may hold fewer
        than `limit` approvals and still have a cursor (e.g. entries whose retention ran out
        were skipped); an invalid cursor raises `InvalidCursor`.

        Each state has its own index, so a page costs the same however much history the store
        holds (and however many approvals are in other states)."""
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

    async def remember_ambiguous(self, fingerprint: str, approval_id: str) -> None:
        """Remember, for the retention period, that the approved request with `fingerprint`
        went upstream and its outcome is unknown (`approval_id`): an identical request's new
        approval shows it to approvers."""
        ...

    async def last_ambiguous(self, fingerprint: str) -> str | None:
        """The approval `remember_ambiguous` kept for `fingerprint`, or None."""
        ...

    # -- grants (`proxy.model.grant`) ------------------------------------------------------
    # A grant is kept (listed, readable) until `retention` after it expires; it can only be
    # used while it has uses left, is not revoked and has not expired.

    async def add_grant(self, grant: Grant) -> bool:
        """Store a new grant (indexed by its scope); False, storing nothing, when a grant with
        its id exists already."""
        ...

    async def use_grant(self, scope: str, now: float) -> Grant | None:
        """Take one use of a usable grant of `scope` (uses left, not revoked, `now` before its
        expiry), atomically: a grant of N uses is never used N+1 times, whatever the
        concurrency and however many replicas. The grant as it is after this use (its
        `uses_left`), or None when no grant of that scope is usable."""
        ...

    async def get_grant(self, grant_id: str) -> Grant | None: ...

    async def list_grants(self, limit: int = 100) -> Sequence[Grant]:
        """Up to `limit` kept grants, newest first."""
        ...

    async def revoke_grant(self, grant_id: str, by: str, now: float) -> tuple[Grant, bool]:
        """Revoke a grant: no further use. The grant, and True when this call revoked it (False:
        it was revoked already). KeyError for an unknown grant."""
        ...

    async def expire_grants(self, now: float, limit: int = 100) -> Sequence[Grant]:
        """The grants whose time ran out (at or before `now`) with uses left and not revoked,
        each returned by exactly one call, ever (so its expiry is audited once)."""
        ...

    async def ping(self) -> bool: ...

    async def aclose(self) -> None: ...
