"""Saying something once per approval across replicas (a thread reply, the reminder, the owner's
message), for every chat channel.

What was said is kept as the approval's note `<channel>.once.<key>` (the message id, or why it
was skipped or failed), so no replica says it again; a store lease makes one replica the one that
tries. A failure that will not get better is recorded too (said as failed, never tried again)
and raised, so the channel's hub counts it.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable

import structlog

from ..store.base import Store

log = structlog.get_logger("countersign.notify")

_KNOWN = 10_000  # approvals whose said keys this process remembers


class SaidOnce:
    def __init__(
        self,
        store: Store,
        *,
        channel: str,
        lease_seconds: float,
        retryable: Callable[[Exception], bool],
        describe: Callable[[Exception], str],
    ) -> None:
        self._store = store
        self._channel = channel
        # Held for longer than the channel keeps trying; if the replica holding it dies
        # meanwhile, that one message is lost rather than said twice.
        self._lease_seconds = lease_seconds
        self._retryable = retryable
        self._describe = describe
        self._said: OrderedDict[str, set[str]] = OrderedDict()  # approval id -> keys said
        self.note_prefix = f"{channel}.once."

    def known(self, approval_id: str, key: str) -> bool:
        """Whether this process knows `key` was said for the approval."""
        return key in self._said.get(approval_id, ())

    async def say(self, approval_id: str, key: str, act: Callable[[], Awaitable[str]]) -> None:
        """Run `act` (which answers what to record: a message id, or why it was skipped) unless
        it already ran for this approval, here or on another replica."""
        said = self._said.setdefault(approval_id, set())
        self._said.move_to_end(approval_id)
        while len(self._said) > _KNOWN:
            self._said.popitem(last=False)
        if key in said:
            return
        note = self.note_prefix + key
        if await self._store.get_note(approval_id, note) is not None:
            said.add(key)
            return
        lease = f"{self._channel}.{approval_id}.{key}"
        if not await self._store.lease(lease, self._lease_seconds):
            return  # another replica is saying it
        try:
            result = await act()
        except Exception as exc:
            if self._retryable(exc):
                raise
            log.warning(
                f"{self._channel}.follow_up_failed",
                approval_id=approval_id,
                what=key,
                error=self._describe(exc),
            )
            await self._remember(approval_id, note, f"failed: {self._describe(exc)}")
            said.add(key)
            raise
        await self._remember(approval_id, note, result)
        said.add(key)

    async def _remember(self, approval_id: str, note: str, value: str) -> None:
        with contextlib.suppress(KeyError):  # the approval is gone: nothing will ask again
            await self._store.set_note(approval_id, note, value)
