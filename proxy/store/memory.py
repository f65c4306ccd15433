"""`MemoryStore`: the embedded default (`store.url: memory://`), for one process.

Each operation runs without an `await` between reading and writing an approval, so on one event
loop it is atomic. Waiters park on an `asyncio.Event` per approval, set on every transition.
Finished approvals are kept for `retention_seconds` for lookups, then dropped.

Indexes, kept by `_save` and pruned with the approvals: fingerprint → open approval, requester →
ids of its pending approvals (so the `max_pending` check counts in O(1)), and per state (and one
for all) a sorted list of (created_at, id) that pages in O(log n + page) from a cursor.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import time
from collections.abc import Sequence
from dataclasses import replace

from ..model import Approval, ApprovalState, DecisionRecord, Outcome
from ..model import state as transitions
from ..model.grant import Grant
from .base import StoreUnavailable, cursor_after, parse_cursor, settle

_EXPIRABLE = (ApprovalState.PENDING, ApprovalState.APPROVED)
_FINISHED = (
    ApprovalState.DENIED,
    ApprovalState.EXPIRED,
    ApprovalState.EXECUTED,
    ApprovalState.LAPSED,
)


class MemoryStore:
    def __init__(self, retention_seconds: float = 24 * 3600, max_finished: int = 100_000) -> None:
        self._approvals: dict[str, Approval] = {}
        self._by_fingerprint: dict[str, str] = {}
        # approval id -> futures of its waiters, settled (and dropped) on its next change: one
        # future each, no task and no Event, since a bulk release wakes 10,000 at once.
        self._changed: dict[str, list[asyncio.Future[None]]] = {}
        self._retention = retention_seconds
        self._max_finished = max_finished
        self._finished: dict[str, float] = {}  # id -> when it finished (insertion ordered)
        self._notes: dict[str, dict[str, str]] = {}
        # fingerprint -> (approval id, until when): approved requests whose outcome is unknown
        self._ambiguous: dict[str, tuple[str, float]] = {}
        # requester_key -> ids of its pending approvals
        self._pending: dict[str, set[str]] = {}
        # (created_at, id) ascending: every approval, and those in each state
        self._created: list[tuple[float, str]] = []
        self._by_state: dict[ApprovalState, list[tuple[float, str]]] = {
            s: [] for s in ApprovalState
        }
        # (expires_at, id) of pending and approved approvals, a heap, so `due` (the sweeper,
        # twice a second) reads only what is due rather than every approval kept. An entry
        # whose approval has moved on (another state or deadline, or gone) is stale: skipped
        # when reached, and dropped for good when the heap is rebuilt.
        self._deadlines: list[tuple[float, str]] = []
        # Grants (insertion ordered: oldest first), their scope index, and the usable ones'
        # deadlines (left when exhausted, revoked or reported expired).
        self._grants: dict[str, Grant] = {}
        self._grant_scopes: dict[str, list[str]] = {}
        self._grant_deadlines: dict[str, float] = {}

    def _save(self, approval: Approval) -> Approval:
        # Runs for every transition (three per released request): attributes read once.
        approval_id = approval.id
        state = approval.state
        previous = self._approvals.get(approval_id)
        self._approvals[approval_id] = approval
        before = None if previous is None else previous.state
        if before is not state:
            position = (approval.created_at, approval_id)
            if previous is None:
                bisect.insort(self._created, position)
            else:
                _discard(self._by_state[previous.state], (previous.created_at, approval_id))
            bisect.insort(self._by_state[state], position)
            if state is ApprovalState.PENDING:
                self._pending.setdefault(approval.requester_key, set()).add(approval_id)
            elif before is ApprovalState.PENDING:
                self._unpend(approval.requester_key, approval_id)
        if state in _EXPIRABLE and (
            previous is None
            or before not in _EXPIRABLE
            or previous.expires_at != approval.expires_at
        ):
            self._add_deadline(approval)
        if transitions.joinable(approval):
            self._by_fingerprint[approval.fingerprint] = approval_id
        elif self._by_fingerprint.get(approval.fingerprint) == approval_id:
            del self._by_fingerprint[approval.fingerprint]
        if state in _FINISHED and approval_id not in self._finished:
            self._finished[approval_id] = time.time()
            self._prune()
        waiters = self._changed.pop(approval_id, None)
        if waiters is not None:
            _wake(waiters)  # every waiter; the next wait() registers afresh
        return approval

    def _add_deadline(self, approval: Approval) -> None:
        heapq.heappush(self._deadlines, (approval.expires_at, approval.id))
        live = len(self._by_state[ApprovalState.PENDING]) + len(
            self._by_state[ApprovalState.APPROVED]
        )
        if len(self._deadlines) > 2 * live + 1024:  # mostly stale: keep the live ones only
            self._deadlines = [
                (self._approvals[approval_id].expires_at, approval_id)
                for state in _EXPIRABLE
                for _, approval_id in self._by_state[state]
            ]
            heapq.heapify(self._deadlines)

    def _live_deadline(self, entry: tuple[float, str]) -> bool:
        approval = self._approvals.get(entry[1])
        return (
            approval is not None
            and approval.state in _EXPIRABLE
            and approval.expires_at == entry[0]
        )

    def _prune(self) -> None:
        cutoff = time.time() - self._retention
        while self._finished:
            oldest_id, finished_at = next(iter(self._finished.items()))
            if finished_at > cutoff and len(self._finished) <= self._max_finished:
                break
            del self._finished[oldest_id]
            self._notes.pop(oldest_id, None)
            gone = self._approvals.pop(oldest_id, None)
            if gone is not None:
                position = (gone.created_at, gone.id)
                _discard(self._created, position)
                _discard(self._by_state[gone.state], position)
                self._unpend(gone.requester_key, gone.id)

    def _unpend(self, requester_key: str, approval_id: str) -> None:
        ids = self._pending.get(requester_key)
        if ids is not None:
            ids.discard(approval_id)
            if not ids:
                del self._pending[requester_key]

    def _require(self, approval_id: str) -> Approval:
        approval = self._approvals.get(approval_id)
        if approval is None:
            raise KeyError(approval_id)
        return approval

    async def create_or_join(
        self, approval: Approval, max_pending: int | None = None
    ) -> tuple[Approval, bool]:
        existing_id = self._by_fingerprint.get(approval.fingerprint)
        if existing_id is not None:
            existing = self._approvals[existing_id]
            now = approval.created_at
            if transitions.joinable(existing) and not transitions.is_due(existing, now):
                return existing, False
        if max_pending is not None:
            pending = len(self._pending.get(approval.requester_key, ()))
            if pending >= max_pending:
                raise transitions.TooManyPending(
                    f"this identity already has {pending} pending approvals "
                    f"(approvals.max_pending_per_identity is {max_pending})"
                )
        return self._save(approval), True

    async def get(self, approval_id: str) -> Approval | None:
        return self._approvals.get(approval_id)

    async def decide(self, approval_id: str, record: DecisionRecord, now: float) -> Approval:
        # Past its deadline, decide() raises and saves nothing: expire() makes that transition.
        return self._save(transitions.decide(self._require(approval_id), record, now))

    async def decide_many(
        self, approval_ids: Sequence[str], record: DecisionRecord, now: float
    ) -> list[Approval | transitions.ApprovalError | StoreUnavailable]:
        # One loop without an await: each waiter's event is set once, O(1) per approval.
        results: list[Approval | transitions.ApprovalError | StoreUnavailable] = []
        for approval_id in approval_ids:
            approval = self._approvals.get(approval_id)
            if approval is None:
                results.append(transitions.ApprovalNotFound("approval not found"))
                continue
            try:
                results.append(self._save(transitions.decide(approval, record, now)))
            except transitions.ApprovalError as exc:
                results.append(exc)
        return results

    async def claim(self, approval_id: str, now: float) -> Approval:
        return self._save(transitions.claim(self._require(approval_id), now))

    async def record_outcome(
        self, approval_id: str, outcome: Outcome, upstream_status: int | None
    ) -> Approval:
        return self._save(
            transitions.record_outcome(self._require(approval_id), outcome, upstream_status)
        )

    async def abandon(self, approval_id: str, now: float) -> Approval | None:
        approval = self._require(approval_id)
        abandoned = transitions.abandon(approval, now)
        return None if abandoned is approval else self._save(abandoned)

    async def expire(self, approval_id: str, now: float) -> Approval | None:
        approval = self._approvals.get(approval_id)
        if approval is None or not transitions.is_due(approval, now):
            return None
        return self._save(transitions.expire(approval, now))

    async def due(self, now: float, limit: int = 100) -> list[str]:
        # Soonest deadline first. The live entries read are put back: they leave the heap as
        # stale once `expire` has moved their approval on.
        heap = self._deadlines
        found: dict[str, None] = {}
        live: list[tuple[float, str]] = []
        while heap and heap[0][0] <= now and len(found) < limit:
            entry = heapq.heappop(heap)
            if self._live_deadline(entry) and entry[1] not in found:
                found[entry[1]] = None
                live.append(entry)
        for entry in live:
            heapq.heappush(heap, entry)
        return list(found)

    async def list(
        self, state: ApprovalState | None = None, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[Approval], str | None]:
        index = self._created if state is None else self._by_state[state]
        end = len(index) if cursor is None else bisect.bisect_left(index, parse_cursor(cursor))
        start = max(end - max(limit, 1), 0)
        page = [self._approvals[approval_id] for _, approval_id in reversed(index[start:end])]
        return page, (cursor_after(page[-1]) if start > 0 else None)

    async def wait(self, approval_id: str, seconds: float) -> Approval | None:
        approval = self._approvals.get(approval_id)
        if approval is None or approval.state is not ApprovalState.PENDING:
            return approval
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        waiters = self._changed.setdefault(approval_id, [])
        waiters.append(waiter)
        timer = loop.call_later(seconds, settle, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            if not waiter.done():  # cancelled from outside: forget it
                waiter.cancel()
            if self._changed.get(approval_id) is waiters:
                with contextlib.suppress(ValueError):
                    waiters.remove(waiter)
                if not waiters:
                    del self._changed[approval_id]
        return self._approvals.get(approval_id)

    async def set_note(self, approval_id: str, name: str, value: str) -> None:
        self._require(approval_id)
        self._notes.setdefault(approval_id, {})[name] = value

    async def get_note(self, approval_id: str, name: str) -> str | None:
        return self._notes.get(approval_id, {}).get(name)

    async def lease(self, name: str, seconds: float) -> bool:
        return True  # one process: always ours

    async def remember_ambiguous(self, fingerprint: str, approval_id: str) -> None:
        self._ambiguous.pop(fingerprint, None)  # re-inserted last: the oldest go first
        self._ambiguous[fingerprint] = (approval_id, time.time() + self._retention)
        while len(self._ambiguous) > self._max_finished:
            del self._ambiguous[next(iter(self._ambiguous))]

    async def last_ambiguous(self, fingerprint: str) -> str | None:
        entry = self._ambiguous.get(fingerprint)
        if entry is None:
            return None
        if entry[1] < time.time():
            del self._ambiguous[fingerprint]
            return None
        return entry[0]

    # -- grants: no await between reading and writing, so each is atomic ---------------------

    def _prune_grants(self) -> None:
        cutoff = time.time() - self._retention
        for grant in [g for g in self._grants.values() if g.expires_at < cutoff]:
            del self._grants[grant.id]
            self._grant_deadlines.pop(grant.id, None)
            ids = self._grant_scopes.get(grant.scope, [])
            if grant.id in ids:
                ids.remove(grant.id)
            if not ids:
                self._grant_scopes.pop(grant.scope, None)

    async def add_grant(self, grant: Grant) -> bool:
        self._prune_grants()
        if grant.id in self._grants:
            return False
        self._grants[grant.id] = grant
        self._grant_scopes.setdefault(grant.scope, []).append(grant.id)
        if grant.usable(grant.created_at):
            self._grant_deadlines[grant.id] = grant.expires_at
        return True

    async def use_grant(self, scope: str, now: float) -> Grant | None:
        for grant_id in self._grant_scopes.get(scope, ()):
            grant = self._grants[grant_id]
            if grant.scope == scope and grant.usable(now):
                used = replace(grant, uses_left=grant.uses_left - 1)
                self._grants[grant_id] = used
                if used.uses_left <= 0:
                    self._grant_deadlines.pop(grant_id, None)
                return used
        return None

    async def get_grant(self, grant_id: str) -> Grant | None:
        return self._grants.get(grant_id)

    async def list_grants(self, limit: int = 100) -> Sequence[Grant]:
        self._prune_grants()
        return list(reversed(self._grants.values()))[: max(limit, 1)]

    async def revoke_grant(self, grant_id: str, by: str, now: float) -> tuple[Grant, bool]:
        grant = self._grants.get(grant_id)
        if grant is None:
            raise KeyError(grant_id)
        if grant.revoked_at is not None:
            return grant, False
        revoked = replace(grant, revoked_at=now, revoked_by=by)
        self._grants[grant_id] = revoked
        self._grant_deadlines.pop(grant_id, None)
        return revoked, True

    async def expire_grants(self, now: float, limit: int = 100) -> Sequence[Grant]:
        ended = [g for g, at in self._grant_deadlines.items() if at <= now][:limit]
        for grant_id in ended:
            del self._grant_deadlines[grant_id]
        return [self._grants[grant_id] for grant_id in ended]

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        for waiters in self._changed.values():
            _wake(waiters)
        self._changed.clear()


def _discard(index: list[tuple[float, str]], position: tuple[float, str]) -> None:
    """Remove `position` from a sorted index, if it is there."""
    at = bisect.bisect_left(index, position)
    if at < len(index) and index[at] == position:
        del index[at]


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        settle(waiter)
