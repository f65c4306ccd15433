"""Audit events: one structured JSON line for every step of every request.

Event names are the contract of DESIGN.md section 7 (fields: docs/audit-events.md). Events pass
through a chain of plain callables (structlog processors: timestamp, schema version, redaction)
and then to sinks: stdout JSON lines, the hash-chained file, a Redis stream. Sinks batch their
I/O off the request path, so neither a slow reader of our stdout nor the disk stalls the proxy's
event loop on allowed traffic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any, Final

from .redact import DEFAULT as DEFAULT_REDACTOR
from .redact import Redactor
from .signing import SigningKey
from .sinks import AuditUnavailable, ChainPosition, Sink, StreamSink, render
from .timestamp import IsoUtcStamper

# 2: one `request.completed` per request replaced request.received, policy.decided and
# request.refused; request.forwarded is only for approved or granted executions.
SCHEMA_VERSION = 2

REQUEST_COMPLETED: Final = "request.completed"
APPROVAL_REQUESTED: Final = "approval.requested"
APPROVAL_DECIDED: Final = "approval.decided"
APPROVAL_EXPIRED: Final = "approval.expired"
APPROVAL_LAPSED: Final = "approval.lapsed"
APPROVAL_RECEIPT: Final = "approval.receipt"
REQUEST_ABANDONED: Final = "request.abandoned"
REQUEST_FORWARDED: Final = "request.forwarded"
GRANT_CREATED: Final = "grant.created"
GRANT_USED: Final = "grant.used"
GRANT_EXHAUSTED: Final = "grant.exhausted"
GRANT_EXPIRED: Final = "grant.expired"
GRANT_REVOKED: Final = "grant.revoked"
# A WebSocket (an allowed or approved upgrade) became a tunnel, and when it ended.
WEBSOCKET_OPENED: Final = "websocket.opened"
WEBSOCKET_CLOSED: Final = "websocket.closed"

Processor = Callable[[Any, str, MutableMapping[str, Any]], Any]


def _add_schema(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["v"] = SCHEMA_VERSION  # read at each call: tests pin older versions
    return event


class AuditLog:
    """Emits audit events to every sink, after timestamping and redaction.

    `emit` returns at once (sinks batch their I/O off the event loop). `emit_durable` returns
    once every sink that promises durability (the hash-chained file) has the event on disk:
    privileged steps use it before the request proceeds.
    """

    def __init__(
        self,
        sinks: list[Sink],
        redactor: Redactor | None = None,
        *,
        signing_key: SigningKey | None = None,
        after_close: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        self._sinks = sinks
        # The trail's Ed25519 key (`audit.signing_key`): checkpoints, and receipts that cite it.
        self.signing_key = signing_key
        self._after_close = list(after_close)  # the anchors: after the last checkpoint
        self._processors: list[Processor] = [
            redactor if redactor is not None else DEFAULT_REDACTOR,
            # After redaction: the proxy's own stamp holds no secret, and a value new at every
            # event would only churn the redactor's cache of the strings that recur.
            IsoUtcStamper("ts"),  # structlog's TimeStamper(fmt="iso", utc=True), cheaper
            _add_schema,
        ]
        self._soon: list[dict[str, Any]] = []  # `emit_soon`'s events of this loop turn
        self._soon_scheduled = False

    def emit_soon(self, data: dict[str, Any]) -> None:
        """Emit `data` (`{"event": name, …}`) at the end of this turn of the event loop, with
        the others of the same turn: for the one event every request has (`request.completed`),
        whose place in the chain nobody waits for. Processing events in a batch costs the
        process less than interleaving each with the request path. Order is kept: `emit`,
        `sync` and `aclose` write what is pending first."""
        if not self._sinks:
            return
        self._soon.append(data)
        if self._soon_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a CLI command): at once
            self._flush_soon()
            return
        self._soon_scheduled = True
        loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._soon_scheduled = False
        pending, self._soon = self._soon, []
        processors = self._processors
        sinks = self._sinks
        for data in pending:
            event: MutableMapping[str, Any] = data
            for processor in processors:
                event = processor(None, "info", event)
            for sink in sinks:
                sink.write(event)

    def emit(self, event: str, **fields: Any) -> ChainPosition | None:
        """Send the event to every sink; where it landed in the chained file, if there is one."""
        if not self._sinks:
            return None
        if self._soon:
            self._flush_soon()  # events emitted earlier come first in the chain
        data: MutableMapping[str, Any] = {"event": event, **fields}
        for processor in self._processors:
            data = processor(None, "info", data)
        position = None
        for sink in self._sinks:
            written = sink.write(data)
            if written is not None:
                position = written
        return position

    async def emit_durable(self, event: str, **fields: Any) -> ChainPosition | None:
        position = self.emit(event, **fields)
        await self.sync()
        return position

    async def sync(self) -> None:
        """Wait until everything emitted so far is durable."""
        if self._soon:
            self._flush_soon()
        for sink in self._sinks:
            await sink.sync()

    async def aclose(self) -> None:
        if self._soon:
            self._flush_soon()
        for sink in self._sinks:
            await sink.aclose()
        for close in self._after_close:
            await close()


__all__ = [
    "APPROVAL_DECIDED",
    "APPROVAL_EXPIRED",
    "APPROVAL_LAPSED",
    "APPROVAL_RECEIPT",
    "APPROVAL_REQUESTED",
    "GRANT_CREATED",
    "GRANT_EXHAUSTED",
    "GRANT_EXPIRED",
    "GRANT_REVOKED",
    "GRANT_USED",
    "REQUEST_ABANDONED",
    "REQUEST_COMPLETED",
    "REQUEST_FORWARDED",
    "SCHEMA_VERSION",
    "WEBSOCKET_CLOSED",
    "WEBSOCKET_OPENED",
    "AuditLog",
    "AuditUnavailable",
    "ChainPosition",
    "Sink",
    "StreamSink",
    "render",
]
