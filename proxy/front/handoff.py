"""Control-plane requests (`/_countersign…`) lent by the front to aiohttp's server, one at a time.

An agent's HTTP client pools one connection for its proxied requests and its approval polling, so
the control plane cannot own a connection: each control-plane request is lent to a fresh aiohttp
`RequestHandler` and the connection comes back to the front afterwards.

1. The front reads the whole request body (bounded by `max_body_bytes`: 413 beyond it).
2. A `RequestHandler` from aiohttp's `web.Server` is connected to a `_LentTransport`: its writes go
   to the client's socket; its `close()` means "aiohttp is done with this request".
3. It is fed one clean message: the request line and header lines as received, the framing
   replaced by `Content-Length` of the body read, and the body. aiohttp parses exactly that.
4. `RequestHandler.close()` right after the feed makes aiohttp stop after that one message; it
   answers with the client's keep-alive semantics (`close()` only ends its read loop) and then
   closes the lent transport. If aiohttp decided to close (its answer said `Connection: close`,
   or it aborted), the client's connection is closed; otherwise the front reads the next request.
5. Write flow control of the real socket is forwarded to the handler while it is lent; a client
   that disconnects reaches the handler as `connection_lost(exc)`, which cancels its handler.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp.web_protocol import RequestHandler

from ..server.responses import error_answer
from .message import Answer

if TYPE_CHECKING:
    from .protocol import FrontProtocol, FrontRequest

# Header lines not passed to aiohttp: the framing is rewritten (the body is read whole). An
# `Expect: 100-continue` was dealt with by the front too (aiohttp would send its own `100`);
# any other expectation goes on, for aiohttp to refuse (417).
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})


async def serve_control(request: FrontRequest) -> None:
    """Answer one control-plane request through aiohttp (the front's handler for them)."""
    conn = request._conn
    ctx = conn._ctx
    assert ctx.control is not None
    limit = ctx.limits.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        await request.respond(_too_large())
        return
    body = b""
    if request.body_exists:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.body():
            size += len(chunk)
            if size > limit:
                await request.respond(_too_large())
                return
            chunks.append(chunk)
        body = b"".join(chunks)
    session = ControlSession(conn, ctx.control())
    request._lend()  # aiohttp answers from here on, errors included
    conn.control_session = session
    try:
        keep = await session.run(_message(request, body))
    finally:
        conn.control_session = None
    request._lent_done(keep)


def _too_large() -> Answer:
    answer = error_answer(
        413,
        "payload_too_large",
        message="the request body is too large (server.max_body_bytes)",
    )
    answer.close = True
    return answer


def _message(request: FrontRequest, body: bytes) -> bytes:
    major, minor = request.version
    lines = [
        b"%s %s HTTP/%d.%d\r\n"
        % (
            request.method.encode("ascii"),
            request.target.encode("utf-8", "surrogateescape"),
            major,
            minor,
        )
    ]
    for name, value in request.raw_headers:
        lowered = name.lower()
        if lowered in _FRAMING or (
            lowered == b"expect" and value.strip().lower() == b"100-continue"
        ):
            continue
        lines.append(b"%s: %s\r\n" % (name, value))
    lines.append(b"Content-Length: %d\r\n\r\n" % len(body))
    lines.append(body)
    return b"".join(lines)


class ControlSession:
    """One control-plane request lent to one aiohttp `RequestHandler`."""

    def __init__(self, conn: FrontProtocol, handler: asyncio.Protocol) -> None:
        if not isinstance(handler, RequestHandler):
            raise TypeError("the control plane must be aiohttp's web.Server")
        self._conn = conn
        self._handler = handler
        self._loop = conn._loop
        self._done: asyncio.Future[bool] = self._loop.create_future()
        self._paused = False  # as the handler was last told
        self._lost = False  # the handler's connection_lost has been called (or scheduled)

    async def run(self, message: bytes) -> bool:
        """Feed `message`; True once aiohttp has answered and the connection may be reused."""
        handler = self._handler
        transport = _LentTransport(self)
        handler.connection_made(transport)
        if self._conn._write_paused:
            self.pause_writing()
        handler.data_received(message)
        # One message only: aiohttp answers it, then closes the lent transport instead of
        # waiting for another request that will never come through it.
        handler.close()
        try:
            return await asyncio.shield(self._done)
        finally:
            if not self._lost:
                # Cancelled (the client left, or shutdown): aiohttp's handler is cancelled too.
                self._lost = True
                handler.connection_lost(ConnectionResetError("the request was abandoned"))

    # -------------------------------------------------------------- from the front's protocol

    def pause_writing(self) -> None:
        if not self._paused and not self._lost:
            self._paused = True
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._paused and not self._lost:
            self._paused = False
            self._handler.resume_writing()

    def client_lost(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self._handler.connection_lost(exc)
        if not self._done.done():
            self._done.set_result(False)

    # -------------------------------------------------------------- from the lent transport

    def write(self, data: bytes) -> None:
        self._conn._write(data)

    def finished(self, *, abort: bool) -> None:
        """aiohttp closed (or aborted) the lent transport: its answer is complete."""
        if self._done.done():
            return
        handler = self._handler
        # aiohttp records whether its answer kept the connection alive (`_keepalive`) and
        # whether it gave up on the connection (`_force_close`); nothing public says either.
        keep = (
            not abort
            and bool(getattr(handler, "_keepalive", False))
            and not bool(getattr(handler, "_force_close", True))
        )
        if abort:
            self._conn._abort()
        self._done.set_result(keep)
        if not self._lost:
            # As a real transport does: connection_lost follows close() on a later iteration.
            self._lost = True
            self._loop.call_soon(handler.connection_lost, None)

    def extra(self, name: str, default: Any) -> Any:
        transport = self._conn._transport
        return default if transport is None else transport.get_extra_info(name, default)

    @property
    def closing(self) -> bool:
        return self._done.done() or self._conn._lost

    def buffer_size(self) -> int:
        transport = self._conn._transport
        return 0 if transport is None else transport.get_write_buffer_size()


class _LentTransport(asyncio.Transport):
    """The client's connection as aiohttp sees it for one request."""

    def __init__(self, session: ControlSession) -> None:
        super().__init__()
        self._session = session

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._session.write(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        self._session.write(b"".join(list_of_data))

    def close(self) -> None:
        self._session.finished(abort=False)

    def abort(self) -> None:
        self._session.finished(abort=True)

    def is_closing(self) -> bool:
        return self._session.closing

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._session.extra(name, default)

    def get_write_buffer_size(self) -> int:
        return self._session.buffer_size()

    # The front has already read the whole message: there is nothing for aiohttp to pause.
    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_reading(self) -> bool:
        return False

    def can_write_eof(self) -> bool:
        return False
