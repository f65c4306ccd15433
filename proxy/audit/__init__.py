"""Audit events: one structured JSON line for every step of every request.

Event names are the contract of DESIGN.md section 7 (fields: docs/audit-events.md). Events pass
through a chain of plain callables (structlog processors: timestamp, schema version, redaction)
and then to sinks: stdout JSON lines, the hash-chained file, a Redis stream. Sinks batch their
I/O off the request path, so neither a slow reader of our stdout nor the disk stalls the proxy's
event loop on allowed traffic.
"""

from __future__ import annotations

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
            IsoUtcStamper("ts"),  # structlog's TimeStamper(fmt="iso", utc=True), cheaper
            _add_schema,
            redactor if redactor is not None else DEFAULT_REDACTOR,
        ]

    def emit(self, event: str, **fields: Any) -> ChainPosition | None:
        """Send the event to every sink; where it landed in the chained file, if there is one."""
        if not self._sinks:
            return None
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
        for sink in self._sinks:
            await sink.sync()

    async def aclose(self) -> None:
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
