"""Audit events: one structured JSON line for every step of every request.

Event names are the contract of DESIGN.md section 7. Events pass through a chain of plain
callables (structlog processors: timestamp, redaction, JSON rendering) and then to sinks. The
stdout sink batches lines and writes them off the request path, so a slow reader of our stdout
never stalls the proxy's event loop.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, MutableMapping
from typing import Any, Final, TextIO

import structlog

from .redact import redact_event

SCHEMA_VERSION: Final = 1

REQUEST_RECEIVED: Final = "request.received"
POLICY_DECIDED: Final = "policy.decided"
APPROVAL_REQUESTED: Final = "approval.requested"
APPROVAL_DECIDED: Final = "approval.decided"
APPROVAL_EXPIRED: Final = "approval.expired"
REQUEST_FORWARDED: Final = "request.forwarded"
REQUEST_REFUSED: Final = "request.refused"

Processor = Callable[[Any, str, MutableMapping[str, Any]], Any]


def _add_schema(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event["v"] = SCHEMA_VERSION
    return event


class Sink:
    """Where rendered lines go. `write` must not block; `aclose` flushes what is pending."""

    def write(self, line: str) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


class StreamSink(Sink):
    """Buffers lines and flushes them to a text stream in batches, from a worker thread.

    A flush is scheduled at most every `interval` seconds, or at once when `max_lines` are
    waiting. Outside a running loop (CLI commands) lines are written straight away.
    """

    def __init__(self, stream: TextIO, interval: float = 0.05, max_lines: int = 512) -> None:
        self._stream = stream
        self._interval = interval
        self._max_lines = max_lines
        self._pending: list[str] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._writing: asyncio.Future[None] | None = None

    def write(self, line: str) -> None:
        self._pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_now(self._take())
            return
        if len(self._pending) >= self._max_lines:
            self._schedule(loop, 0)
        elif self._flush_handle is None:
            self._schedule(loop, self._interval)

    def _schedule(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self._flush_handle = loop.call_later(delay, self._start_flush, loop)

    def _take(self) -> list[str]:
        lines, self._pending = self._pending, []
        return lines

    def _start_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_handle = None
        if not self._pending:
            return
        if self._writing is not None and not self._writing.done():
            self._schedule(loop, self._interval)  # one writer at a time keeps lines in order
            return
        self._writing = loop.run_in_executor(None, self._write_now, self._take())

    def _write_now(self, lines: list[str]) -> None:
        if not lines:
            return
        text = "\n".join(lines) + "\n"
        try:
            fd = self._stream.fileno()
        except (AttributeError, OSError, ValueError):
            self._stream.write(text)
            self._stream.flush()
            return
        self._stream.flush()  # keep order with anything printed through the stream itself
        _write_whole_lines(fd, text.encode("utf-8"))

    async def aclose(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._writing is not None:
            await self._writing
        self._write_now(self._take())


# POSIX makes a pipe write of at most PIPE_BUF bytes atomic: with several worker processes on
# one stdout, writing whole lines in chunks no larger than that keeps lines from interleaving.
_PIPE_BUF = 4096


def _write_whole_lines(fd: int, data: bytes) -> None:
    start = 0
    while start < len(data):
        end = min(start + _PIPE_BUF, len(data))
        if end < len(data):
            cut = data.rfind(b"\n", start, end)
            # A single line longer than PIPE_BUF goes out whole (it cannot be atomic anyway).
            end = cut + 1 if cut >= start else data.index(b"\n", end) + 1
        view = memoryview(data)[start:end]
        while view:
            written = os.write(fd, view)
            view = view[written:]
        start = end


class AuditLog:
    """Emits audit events to every sink."""

    def __init__(self, sinks: list[Sink], extra_processors: list[Processor] | None = None) -> None:
        self._sinks = sinks
        processors: list[Processor] = [
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            _add_schema,
            redact_event,
            *(extra_processors or []),
            structlog.processors.JSONRenderer(sort_keys=False),
        ]
        self._processors = processors

    def emit(self, event: str, **fields: Any) -> None:
        if not self._sinks:
            return
        data: MutableMapping[str, Any] = {"event": event, **fields}
        rendered: Any = data
        for processor in self._processors:
            rendered = processor(None, "info", rendered)
        for sink in self._sinks:
            sink.write(rendered)

    async def aclose(self) -> None:
        for sink in self._sinks:
            await sink.aclose()


def stdout_audit() -> AuditLog:
    return AuditLog([StreamSink(sys.stdout)])


def null_audit() -> AuditLog:
    return AuditLog([])
