"""`MemoryStore`: the embedded default (`store.url: memory://`), for one process.

Each operation runs without an `await` between reading and writing an approval, so on one event
loop it is atomic. Waiters park on an `asyncio.Event` per approval, set on every transition.
Finished approvals are kept for `retention_seconds` for lookups, then dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from ..approvals import state as transitions
from ..types import Approval, ApprovalState, DecisionRecord

_FINISHED = (ApprovalState.DENIED, ApprovalState.EXPIRED, ApprovalState.EXECUTED)


class MemoryStore:
    def __init__(self, retention_seconds: float = 24 * 3600, max_finished: int = 100_000) -> None:
        self._approvals: dict[str, Approval] = {}
        self._by_fingerprint: dict[str, str] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._retention = retention_seconds
        self._max_finished = max_finished
        self._finished: dict[str, float] = {}  # id -> when it finished (insertion ordered)
        self._notes: dict[str, dict[str, str]] = {}

    def _save(self, approval: Approval) -> Approval:
        self._approvals[approval.id] = approval
        if transitions.joinable(approval):
            self._by_fingerprint[approval.fingerprint] = approval.id
        elif self._by_fingerprint.get(approval.fingerprint) == approval.id:
            del self._by_fingerprint[approval.fingerprint]
        if approval.state in _FINISHED and approval.id not in self._finished:
            self._finished[approval.id] = time.time()
            self._prune()
        event = self._changed.pop(approval.id, None)
        if event is not None:
            event.set()  # wake every waiter; the next wait() makes a fresh event
        return approval

    def _prune(self) -> None:
        cutoff = time.time() - self._retention
        while self._finished:
            oldest_id, finished_at = next(iter(self._finished.items()))
            if finished_at > cutoff and len(self._finished) <= self._max_finished:
                break
            del self._finished[oldest_id]
            self._approvals.pop(oldest_id, None)
            self._notes.pop(oldest_id, None)

    def _require(self, approval_id: str) -> Approval:
        approval = self._approvals.get(approval_id)
        if approval is None:
            raise KeyError(approval_id)
        return approval

    async def create_or_join(self, approval: Approval) -> tuple[Approval, bool]:
        existing_id = self._by_fingerprint.get(approval.fingerprint)
        if existing_id is not None:
            existing = self._approvals[existing_id]
            now = approval.created_at
            if transitions.joinable(existing) and not transitions.is_due(existing, now):
                return existing, False
        return self._save(approval), True

    async def get(self, approval_id: str) -> Approval | None:
        return self._approvals.get(approval_id)

    async def decide(self, approval_id: str, record: DecisionRecord, now: float) -> Approval:
        # Past its deadline, decide() raises and saves nothing: expire() makes that transition.
        return self._save(transitions.decide(self._require(approval_id), record, now))

    async def claim(self, approval_id: str, now: float) -> Approval:
        return self._save(transitions.claim(self._require(approval_id), now))

    async def record_outcome(self, approval_id: str, upstream_status: int) -> Approval:
        return self._save(transitions.record_outcome(self._require(approval_id), upstream_status))

    async def expire(self, approval_id: str, now: float) -> Approval | None:
        approval = self._approvals.get(approval_id)
        if approval is None or not transitions.is_due(approval, now):
            return None
        return self._save(transitions.expire(approval, now))

    async def due(self, now: float, limit: int = 100) -> list[str]:
        ids = [a.id for a in self._approvals.values() if transitions.is_due(a, now)]
        return ids[:limit]

    async def list(self, state: ApprovalState | None = None, limit: int = 100) -> list[Approval]:
        found = [a for a in self._approvals.values() if state is None or a.state is state]
        found.sort(key=lambda a: a.created_at, reverse=True)
        return found[:limit]

    async def wait(self, approval_id: str, seconds: float) -> Approval | None:
        approval = self._approvals.get(approval_id)
        if approval is None or approval.state is not ApprovalState.PENDING:
            return approval
        event = self._changed.setdefault(approval_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        return self._approvals.get(approval_id)

    async def set_note(self, approval_id: str, name: str, value: str) -> None:
        self._require(approval_id)
        self._notes.setdefault(approval_id, {})[name] = value

    async def get_note(self, approval_id: str, name: str) -> str | None:
        return self._notes.get(approval_id, {}).get(name)

    async def lease(self, name: str, seconds: float) -> bool:
        return True  # one process: always ours

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        for event in self._changed.values():
            event.set()
        self._changed.clear()
