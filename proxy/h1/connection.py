"""One keep-alive HTTP/1.1 connection to an upstream, carrying one exchange at a time.

The response is parsed by llhttp (through httptools) in its strict mode: no lenient flags are
ever set, so a response with both Content-Length and Transfer-Encoding, a duplicate
Content-Length or malformed chunking fails the exchange (502) instead of being guessed at.

Reading is flow-controlled: when more than `_HIGH_WATER` bytes of body wait for the client, the
socket stops being read until the client has taken them. The read timeout is the time without a
byte from the upstream (aiohttp's `sock_read`), kept with one timer per connection that re-arms
itself lazily rather than one timer per read or per exchange: an exchange that ends leaves it
armed (when it fires with nothing in progress it just lapses), and the next one moves it only
when its own deadline comes sooner. The response parser, likewise, carries on from one
keep-alive exchange to the next instead of being made anew for each.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import httptools

from .errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from .tunnel import TunnelProtocol

_HIGH_WATER = 256 * 1024
# The most a response head may take (status line, headers, interim answers): as a browser or
# nginx would, refuse an upstream that streams headers without end.
MAX_HEAD_BYTES = 64 * 1024
_LOW_WATER = 64 * 1024
_NO_BODY_STATUSES = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: list[tuple[str, str]]  # as received, names in their original case
    content_length: int | None


class UpstreamConnection(asyncio.Protocol):
    """The protocol object of one upstream socket; the pool owns its life."""

    def __init__(self, on_lost: Callable[[UpstreamConnection], None]) -> None:
        self._on_lost = on_lost
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        # The exchange in progress, if any.
        self._busy = False
        self._parser: httptools.HttpResponseParser | None = None
        # The parser of the last exchange, when it ended cleanly at a message boundary: the next
        # exchange goes on with it (llhttp starts a new message after a complete one).
        self._spare_parser: httptools.HttpResponseParser | None = None
        self._head: asyncio.Future[ResponseHead] | None = None
        self._head_only = False
        self._informational = False
        # The request asked to switch protocols (WebSocket): a `101` ends HTTP on this
        # connection, and what follows its head belongs to the tunnel.
        self._upgrade = False
        self._switched = False
        self._after_switch = bytearray()
        self._reason = ""
        self._head_bytes = 0  # received while the head is incomplete (bounded)
        self._header_list: list[tuple[str, str]] = []
        self._content_length: int | None = None
        self._eof_delimited = False
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._complete = False
        self._keep_alive = False
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.received_any = False
        # Flow control, both ways.
        self._reading_paused = False
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        # Read timeout: no progress (a byte received, or a piece of the request body written)
        # for this long.
        self._read_timeout = 0.0
        self._last_progress = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # ------------------------------------------------------------------ used by the client

    def begin(
        self, *, head_only: bool, read_timeout: float, upgrade: bool = False
    ) -> asyncio.Future[ResponseHead]:
        """Start an exchange: the returned future resolves when the response head is in.
        `upgrade`: the request asks to switch protocols, and a `101` answer is accepted."""
        self._busy = True
        parser, self._spare_parser = self._spare_parser, None
        self._parser = parser if parser is not None else httptools.HttpResponseParser(self)
        self._head = self._loop.create_future()
        self._head_only = head_only
        self._upgrade = upgrade
        self._informational = False
        self._header_list = []
        self._content_length = None
        self._eof_delimited = False
        self._body.clear()
        self._buffered = 0
        self._complete = False
        self._keep_alive = False
        self._error = None
        self.received_any = False
        self._head_bytes = 0
        self._read_timeout = read_timeout
        self._last_progress = self._loop.time()
        self._arm(self._last_progress + read_timeout)
        return self._head

    def write(self, data: bytes) -> None:
        if self._transport is None or self.closed:
            raise UpstreamUnavailable("upstream connection closed")
        self._transport.write(data)
        # An upload in progress is progress: a large body sent steadily for longer than the
        # timeout is not a silent upstream.
        self._last_progress = self._loop.time()

    async def drain(self) -> None:
        """Wait while the socket's send buffer is full (a slow upstream slows the upload)."""
        if self._write_paused and not self.closed:
            self._drain = self._loop.create_future()
            await self._drain
        if self._error is not None:
            raise self._error

    async def read_chunk(self) -> bytes:
        """The next piece of the response body; b"" once it is complete."""
        while True:
            if self._body:
                chunk = self._body.popleft()
                self._taken(len(chunk))
                return chunk
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._waiter = self._loop.create_future()
            await self._waiter

    @property
    def message_complete(self) -> bool:
        """The whole response has arrived (some of its body may still wait to be read)."""
        return self._complete and self._error is None

    def take_body(self) -> bytes:
        """All of the body still buffered, at once (for a complete message)."""
        body = b"".join(self._body)
        self._body.clear()
        self._taken(self._buffered)
        return body

    def _taken(self, size: int) -> None:
        """`size` bytes of body went to the caller: resume reading once few are left.

        Every way of taking the body must come through here: a body just over _HIGH_WATER
        completes in the read that paused the socket, and a connection left paused goes back
        to the pool where the next exchange never sees its answer (nor times out: the timer
        counts a paused socket as waiting on our client)."""
        self._buffered -= size
        if self._reading_paused and self._buffered <= _LOW_WATER:
            self._reading_paused = False
            # The wait on the upstream starts again now: until here it was our client's (a
            # timer due right after this would otherwise count the client's pause against the
            # upstream and fail a healthy exchange with a read timeout).
            self._last_progress = self._loop.time()
            if self._transport is not None and not self.closed:
                self._transport.resume_reading()

    @property
    def response_complete(self) -> bool:
        return self._complete and not self._body

    @property
    def reusable(self) -> bool:
        """The last exchange ended cleanly and both sides keep the connection open."""
        return self._complete and self._keep_alive and self._error is None and not self.closed

    def finish(self) -> None:
        """The exchange is over (whether the pool keeps the connection is its decision)."""
        self._busy = False
        if self.reusable and not self._head_only and not self._upgrade:
            self._spare_parser = self._parser
        self._parser = None
        if self._head is not None and not self._head.done():
            self._head.cancel()
        self._head = None

    def abort(self) -> None:
        self.closed = True
        self._cancel_timer()
        if self._transport is not None:
            self._transport.abort()

    def fail(self, error: UpstreamError) -> None:
        """End the exchange with `error` and drop the connection."""
        if self._error is None and not self._complete:
            self._error = error
            if self._head is not None and not self._head.done():
                self._head.set_exception(error)
            self._wake()
        self.abort()

    def detach(self) -> TunnelProtocol:
        """After a `101`: the connection leaves HTTP (and the pool's reuse) and becomes one
        end of a tunnel; the pool still counts it until it closes."""
        assert self._switched and self._transport is not None
        self._busy = False
        self._parser = None
        self._cancel_timer()
        lost_already = self.closed  # (then the pool has counted it gone)
        tunnel = TunnelProtocol(
            self._transport,
            bytes(self._after_switch),
            on_lost=None if lost_already else self.connection_lost,
        )
        self._after_switch.clear()
        self._transport.set_protocol(tunnel)
        if lost_already:  # lost before the switch was taken: the tunnel starts at its end
            tunnel.connection_lost(None)
        return tunnel

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not subclass asyncio.Transport, but behave as one.)
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._switched:  # the tunnel's, until it takes the transport over
            self._after_switch += data
            return
        parser = self._parser
        if parser is None or self._complete:
            # Bytes nobody asked for (a body after a HEAD answer, a stray response): the
            # connection's framing can no longer be trusted.
            self.abort()
            return
        self.received_any = True
        self._last_progress = self._loop.time()
        try:
            parser.feed_data(data)
            if self._head is not None and not self._head.done() and self._error is None:
                # Still no complete head (what came was headers, or interim answers).
                self._head_bytes += len(data)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self.fail(UpstreamUnavailable("the upstream's response head is too large"))
        except httptools.HttpParserUpgrade as exc:
            if self._switched:
                self._after_switch += data[exc.args[0] :]
                self._cancel_timer()  # the tunnel has its own life
            else:
                self.fail(UpstreamUnavailable("the upstream switched protocols; not proxied"))
        except httptools.HttpParserError as exc:
            self.fail(UpstreamUnavailable(f"invalid response from the upstream: {exc}"))

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_timer()
        if self._busy and not self._complete and self._error is None:
            if self._head is not None and self._head.done() and self._eof_delimited and exc is None:
                self._complete = True  # a body without framing ends where the connection does
                self._keep_alive = False
                self._wake()
            else:
                detail = f": {exc}" if exc else ""
                self.fail(UpstreamUnavailable(f"the upstream closed the connection{detail}"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._on_lost(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # ------------------------------------------------------------------ httptools callbacks

    def on_status(self, status: bytes) -> None:
        self._reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head is not None and self._head.done():
            # Trailer fields after a chunked body: not forwarded. Appended here they would turn
            # into response headers whenever they arrived in the same read as the head.
            return
        self._header_list.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # 100 Continue, 103 Early Hints: interim answers, the real one follows.
            self._informational = True
            self._header_list = []
            return
        self._informational = False
        if status == 101:
            if self._upgrade:
                self._switched = True
                assert self._head is not None
                if not self._head.done():
                    self._head.set_result(ResponseHead(101, self._reason, self._header_list, None))
                return
            # llhttp reports the switch (HttpParserUpgrade) only after ending the message, when
            # the answer already passes for a complete, bodiless 101 and fail() no longer
            # applies: refuse it here, when the request asked for no switch.
            self.fail(UpstreamUnavailable("the upstream switched protocols; not proxied"))
            return
        chunked = False
        for name, value in self._header_list:
            lower = name.lower()
            if lower == "content-length":
                self._content_length = int(value)  # llhttp has checked it is one number
            elif lower == "transfer-encoding":
                if value.rpartition(",")[2].strip().lower() != "chunked":
                    # (llhttp would read such a body to the connection's end; its coding could
                    # not be passed on anyway, the header being hop-by-hop.)
                    self.fail(UpstreamUnavailable(f"unsupported Transfer-Encoding: {value}"))
                    return
                chunked = True
        bodyless = self._head_only or status in _NO_BODY_STATUSES
        if status in _NO_BODY_STATUSES:
            self._content_length = None
        # (A HEAD answer keeps its Content-Length: it is the length a GET would have.)
        self._eof_delimited = not bodyless and not chunked and self._content_length is None
        assert self._head is not None
        if not self._head.done():
            self._head.set_result(
                ResponseHead(status, self._reason, self._header_list, self._content_length)
            )
        if self._head_only:
            # llhttp cannot be told a HEAD answer has no body: the message ends here, and the
            # next exchange gets a fresh parser.
            self._end_message()

    def on_message_begin(self) -> None:
        if self._complete:
            # Another answer after this one, in the same read (a later read is refused in
            # data_received): the framing cannot be trusted, the connection is not reused.
            self._keep_alive = False

    def on_body(self, body: bytes) -> None:
        if self._complete:
            # Body bytes after a HEAD answer, in the same read as its head: likewise.
            self._keep_alive = False
            return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            if self._transport is not None:
                self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._switched:
            return
        if self._informational:
            self._informational = False
            return
        if not self._complete:
            self._end_message()

    # ------------------------------------------------------------------ internals

    def _end_message(self) -> None:
        assert self._parser is not None
        self._keep_alive = self._parser.should_keep_alive()
        self._complete = True
        self._parser = None if self._head_only else self._parser
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _arm(self, when: float) -> None:
        """Have the timer fire at `when` at the latest (an earlier one stays: it re-arms)."""
        if self._timer is None or self._timer_at > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self._loop.call_at(when, self._on_timer)
            self._timer_at = when

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        if not self._busy or self._complete or self._error is not None:
            return
        now = self._loop.time()
        if self._reading_paused:
            # Waiting on our client, not on the upstream.
            self._last_progress = now
        deadline = self._last_progress + self._read_timeout
        if now >= deadline:
            self.fail(UpstreamTimeout(f"no data from the upstream for {self._read_timeout:g} s"))
        else:
            self._arm(deadline)
