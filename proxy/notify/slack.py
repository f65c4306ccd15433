"""Slack notifier: one Block Kit message per approval, updated in place as it is decided.

`approval.requested` posts the message (chat.postMessage) and keeps where it is (channel, ts) as
a store note, so whichever replica sees the next event can update it (chat.update). Every post and
update renders the approval as the store has it *now*, and checks again afterwards: events that
race (two decisions on two replicas, a decision made while Slack was down) converge on the latest
state instead of leaving a stale message. Calls are retried with backoff on connection errors,
429 and 5xx, in the background (the hub never waits): Slack being down never blocks an approval.
Every text the message shows passes through the notifier's `Redactor` (see `slack_format`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor
from ..model import Approval
from ..store.base import Store, StoreUnavailable
from . import REQUESTED
from .retry import GaveUp
from .retry import with_retries as _with_retries
from .slack_format import approval_blocks, fallback_text

MESSAGE_NOTE = "slack.message"
# Re-renders after a post or update when the approval changed meanwhile; a bound, not a loop.
_MAX_CONVERGE = 5


def retryable(exc: Exception) -> bool:
    if isinstance(exc, SlackApiError):
        status: int = exc.response.status_code
        return status == 429 or status >= 500
    return isinstance(exc, aiohttp.ClientError | TimeoutError | StoreUnavailable)


async def with_retries(
    call: Callable[[], Awaitable[Any]], *, what: str, retry_seconds: float, first_delay: float
) -> Any:
    """`retry.with_retries` with Slack's idea of a retryable error."""
    return await _with_retries(
        call,
        what=what,
        retry_seconds=retry_seconds,
        first_delay=first_delay,
        retryable=retryable,
    )


# Causes of a `GaveUp` that say Slack itself did not answer usefully (not the store).
_SLACK_UNREACHABLE = (SlackApiError, aiohttp.ClientError, TimeoutError)


class SlackHealth:
    """What readyz reports for Slack: "ok" or "down", from the freshest evidence - the last
    delivery's outcome or an `auth.test` call. `auth.test` runs only when nothing newer than
    `ttl` seconds is known, bounded by `timeout`: probes stay cheap and never hammer Slack."""

    def __init__(self, client: AsyncWebClient, *, ttl: float = 30.0, timeout: float = 1.5):
        self._client = client
        self._ttl = ttl
        self._timeout = timeout
        self._seen: tuple[float, bool] | None = None  # (monotonic time, reachable)
        self._lock = asyncio.Lock()

    def record(self, ok: bool) -> None:
        self._seen = (time.monotonic(), ok)

    def _stale(self) -> bool:
        return self._seen is None or time.monotonic() - self._seen[0] >= self._ttl

    async def state(self) -> str:
        if self._stale():
            async with self._lock:  # concurrent probes share one auth.test
                if self._stale():
                    try:
                        async with asyncio.timeout(self._timeout):
                            await self._client.auth_test()
                    except Exception:
                        self.record(False)
                    else:
                        self.record(True)
        return "ok" if self._seen is not None and self._seen[1] else "down"


class SlackNotifier:
    def __init__(
        self,
        client: AsyncWebClient,
        channel: str,
        store: Store,
        *,
        public_url: str | None = None,
        redactor: Redactor = DEFAULT_REDACTOR,
        retry_seconds: float = 300.0,
        first_delay: float = 0.5,
        health: SlackHealth | None = None,
    ) -> None:
        self._client = client
        self._channel = channel
        self._store = store
        self._public_url = public_url
        self._redactor = redactor
        self._retry = {"retry_seconds": retry_seconds, "first_delay": first_delay}
        self._health = health

    async def notify(self, event: str, approval: Approval) -> None:
        """Post or update the approval's message. A call that gives up raises `GaveUp`: the hub
        logs it once and counts it (`countersign_notify_failures_total{channel="slack"}`)."""
        try:
            if event == REQUESTED:
                await self._post(approval)
            else:
                await self._update(approval)
        except GaveUp as exc:
            if self._health is not None and isinstance(exc.__cause__, _SLACK_UNREACHABLE):
                self._health.record(False)
            raise
        if self._health is not None:
            self._health.record(True)

    async def _latest(self, approval: Approval) -> Approval:
        """The approval as stored now; what we were told if the store cannot say."""
        try:
            return await self._store.get(approval.id) or approval
        except StoreUnavailable:
            return approval

    async def _message_ref(self, approval_id: str) -> tuple[str, str] | None:
        raw = await with_retries(
            lambda: self._store.get_note(approval_id, MESSAGE_NOTE), what="read note", **self._retry
        )
        if raw is None:
            return None
        ref = json.loads(raw)
        return str(ref["channel"]), str(ref["ts"])

    async def _post(self, approval: Approval) -> None:
        if await self._message_ref(approval.id) is not None:
            return  # already posted (a duplicate event): one message per approval
        shown = await self._latest(approval)

        async def post() -> Any:
            nonlocal shown
            shown = await self._latest(shown)
            return await self._client.chat_postMessage(
                channel=self._channel,
                text=fallback_text(shown, self._redactor),
                blocks=approval_blocks(shown, self._public_url, self._redactor),
                unfurl_links=False,
                unfurl_media=False,
            )

        resp = await with_retries(post, what="chat.postMessage", **self._retry)
        ref = json.dumps({"channel": resp["channel"], "ts": resp["ts"]})
        try:
            await with_retries(
                lambda: self._store.set_note(approval.id, MESSAGE_NOTE, ref),
                what="save message ref",
                **self._retry,
            )
        except GaveUp as exc:
            if isinstance(exc.__cause__, KeyError):
                return  # the approval is gone from the store: nothing will update it
            raise
        # A decision made before the note was saved found no message to update: catch up.
        await self._converge(approval.id, str(resp["channel"]), str(resp["ts"]), shown)

    async def _update(self, approval: Approval) -> None:
        ref = await self._message_ref(approval.id)
        if ref is None:
            # Not posted yet; the poster re-reads the approval once it has saved the
            # reference, so this event is not lost.
            return
        await self._converge(approval.id, *ref, shown=None)

    async def _converge(
        self, approval_id: str, channel: str, ts: str, shown: Approval | None
    ) -> None:
        """chat.update until the message shows the approval as currently stored (`shown` is
        what it shows now, None when unknown)."""
        for _ in range(_MAX_CONVERGE):
            current: Approval | None = await with_retries(
                lambda: self._store.get(approval_id), what="read approval", **self._retry
            )
            if current is None or current == shown:
                return

            async def update(a: Approval = current) -> Any:
                return await self._client.chat_update(
                    channel=channel,
                    ts=ts,
                    text=fallback_text(a, self._redactor),
                    blocks=approval_blocks(a, self._public_url, self._redactor),
                )

            await with_retries(update, what="chat.update", **self._retry)
            shown = current

    async def aclose(self) -> None:
        return None
