"""Delivering approval cards to Teams: one card per approval, posted once, updated in place.

`TeamsNotifier.notify` brings the approval's card in step with the approval as the store has it
*now*: posts it when it is not posted yet (keeping its activity id as a store note, so whichever
replica sees the next event can update it; a store lease makes one replica the one that posts),
else updates it in place. Each call goes through the shared `notify.retry.with_retries`, as
Slack's do: connection errors, timeouts, 429 and 5xx are retried, honouring `Retry-After`, with
jitter, until `retry_seconds`; then `GaveUp` to the hub, which logs and counts it
(`countersign_notify_failures_total{channel="teams"}`). When Teams refuses the card itself (413,
400) the minimal card with the inbox link is sent instead and counted (`on_fallback`).

Not built yet: the reminder before expiry and thread replies (Slack's `_follow_up`).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor
from ..model import Approval
from ..notify.retry import with_retries
from ..store.base import Store
from .cards import activity, fitted_card, minimal_card
from .connector import CALL_TIMEOUT, BotConnector, refused_payload, retry_after, retryable

log = structlog.get_logger("countersign.teams")

MESSAGE_NOTE = "teams.activity"
_LOCKS = 10_000


def describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


class TeamsNotifier:
    def __init__(
        self,
        connector: BotConnector,
        store: Store,
        *,
        service_url: str,
        conversation: str,
        public_url: str | None = None,
        redactor: Redactor = DEFAULT_REDACTOR,
        retry_seconds: float = 3600.0,
        first_delay: float = 0.5,
        call_timeout: float = CALL_TIMEOUT,
        on_fallback: Callable[[], None] | None = None,
    ) -> None:
        self._connector = connector
        self._store = store
        self._service_url = service_url
        self._conversation = conversation
        self._public_url = public_url
        self._redactor = redactor
        self._retry_seconds = retry_seconds
        self._first_delay = first_delay
        self._call_timeout = call_timeout
        self._on_fallback = on_fallback
        self._locks: OrderedDict[str, asyncio.Lock] = OrderedDict()

    def _lock(self, approval_id: str) -> asyncio.Lock:
        lock = self._locks.get(approval_id)
        if lock is None:
            lock = self._locks[approval_id] = asyncio.Lock()
            while len(self._locks) > _LOCKS:
                self._locks.popitem(last=False)
        return lock

    async def _retrying(self, what: str, call: Callable[[], Awaitable[Any]]) -> Any:
        return await with_retries(
            call,
            what=what,
            retry_seconds=self._retry_seconds,
            first_delay=self._first_delay,
            retryable=retryable,
            retry_after=retry_after,
            call_timeout=self._call_timeout,
            describe=describe,
            jitter=0.2,
        )

    async def notify(self, event: str, approval: Approval) -> None:
        async with self._lock(approval.id):
            await self._retrying(f"teams card of {approval.id}", lambda: self._sync(approval))

    async def _sync(self, approval: Approval) -> None:
        latest = await self._store.get(approval.id) or approval
        ref = await self._store.get_note(approval.id, MESSAGE_NOTE)
        if ref is None:
            if not await self._store.lease(f"teams.{approval.id}.post", self._retry_seconds + 600):
                return  # another replica is posting it; it updates it to the latest state
            ref = await self._send(latest, None)
            await self._store.set_note(approval.id, MESSAGE_NOTE, ref)
            again = await self._store.get(approval.id)
            if again is None or again == latest:
                return
            latest = again  # decided while we posted: show that
        await self._send(latest, ref)

    async def _send(self, approval: Approval, ref: str | None) -> str:
        """Post (ref None) or update the card; the minimal card when Teams refuses the full
        one. The activity id."""
        card = fitted_card(approval, self._public_url, self._redactor)
        try:
            return await self._put(ref, activity(card))
        except Exception as exc:
            if not refused_payload(exc):
                raise
            log.warning("teams.card_refused", approval_id=approval.id, error=describe(exc))
        sent = await self._put(ref, activity(minimal_card(approval, self._public_url)))
        if self._on_fallback is not None:
            self._on_fallback()
        return sent

    async def _put(self, ref: str | None, payload: dict[str, Any]) -> str:
        if ref is None:
            return await self._connector.post(self._service_url, self._conversation, payload)
        await self._connector.update(self._service_url, self._conversation, ref, payload)
        return ref

    async def aclose(self) -> None:
        return None
