"""The data plane's HTTP/1.1 connection: llhttp (through httptools) parsing, one request at a time.

One `FrontProtocol` per client connection. Bytes are fed to llhttp in its strict mode (no lenient
flag is ever set): a request with both Content-Length and Transfer-Encoding, a duplicate length,
bad chunking, obs-fold or an invalid header token is answered `400` and the connection closed.
So are a request target with raw non-ASCII bytes (llhttp's strict URL rule), two `Host` headers,
and an HTTP/1.1 request without one (RFC 9112 §3.2). The parser's own message is never echoed.

Requests are answered strictly in order. The handler of a request (`FrontContext.handler`, the
request path) runs in its own task and answers through its `FrontRequest` (the `Incoming`);
the next pipelined request starts only once that answer is complete. While a request is being
answered, parsing goes on only until the next head is complete, then the socket stops being read:
a client cannot make the front buffer an unbounded pipeline. Request bodies are flow-controlled
the same way: past `_BODY_HIGH_WATER` unread bytes the socket stops being read until the handler
has taken them.

Time limits use one timer per connection at most (`loop.call_at`, re-armed lazily): a head must be
complete within `header_timeout` of its first byte (of the connection's start, for the first
request), and a connection with no request in progress closes after `idle_timeout`.

A handler's answer ends the connection when the request body was not received whole (it is not
drained: the client may be sending megabytes, or waiting for a `100 Continue` never sent). The
front then closes "lingering": it shuts its sending side and drops what still arrives for a
moment, so that the answer is not lost to a reset caused by unread input.

An `Upgrade` (or CONNECT) head stops the parser: what follows is kept (`upgrade_tail`) for
`FrontRequest.switch`, which answers `101` and hands the transport to a `TunnelProtocol`. If the
handler answers anything else, the connection ends with that answer.

Requests under the control-plane prefix (`/_countersign`) are handed to aiohttp's server
(`proxy.front.handoff`), one request at a time, and the connection comes back afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import cast

import httptools
import structlog
from multidict import CIMultiDict, CIMultiDictProxy

from ..h1.tunnel import TunnelProtocol
from ..server.responses import error_answer
from .handoff import ControlSession, serve_control
from .message import Answer, Incoming, RequestBodyError, RequestBodyTimeout

log = structlog.get_logger("countersign.front")

# Unread request body kept per connection before the socket stops being read, and the level it
# must fall back to before reading resumes.
_BODY_HIGH_WATER = 256 * 1024
_BODY_LOW_WATER = 64 * 1024

# After an answer that leaves input unread: how long, and how much, to keep dropping it.
_LINGER_SECONDS = 2.0
_LINGER_BYTES = 16 * 1024 * 1024

_VERSIONS = {"1.1": (1, 1), "1.0": (1, 0)}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
# Per header line: ": " and CRLF; per head: the request line's spaces, "HTTP/1.1", CRLFs.
_HEADER_LINE_OVERHEAD = 4
_HEAD_OVERHEAD = 14


def _status_line(status: int, reason: str | None) -> str:
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    return f"HTTP/1.1 {status} {reason}\r\n"


# Shared empty deques, never appended to: a request without a body, or whose body has been read
# whole, has no chunks; a connection whose client does not pipeline has no queue. A deque costs
# ~760 bytes even empty, and 10,000 held requests are 10,000 connections.
_NO_CHUNKS: deque[bytes] = deque()
_NO_QUEUE: deque[FrontRequest | Answer] = deque()
_STATUS_LINES = {int(s): _status_line(int(s), None) for s in HTTPStatus}


def _invalid_request() -> Answer:
    # Never the parser's message: it may quote the request's bytes, and tokens travel in them.
    return error_answer(400, "invalid_request", message=RequestBodyError.sentence)


def _unknown_method() -> Answer:
    # llhttp knows every registered method (RFC 9110, WebDAV, …); anything else, a lower-case
    # `get` included, is no method any upstream would agree on.
    return error_answer(
        405,
        "method_not_allowed",
        message="the method is not a known HTTP method (methods are case-sensitive)",
    )


def _head_too_large() -> Answer:
    return error_answer(
        431,
        "header_too_large",
        message="the request head is too large (server.max_header_bytes)",
    )


def _internal_error() -> Answer:
    return error_answer(500, "internal_error")


@dataclass(frozen=True, slots=True)
class FrontLimits:
    header_timeout: float = 10.0  # a request head must be complete this long after it began
    idle_timeout: float = 60.0  # a connection with no request in progress closes after this
    max_header_bytes: int = 65536  # request line + headers; over it: 431
    max_connections: int = 10000  # more concurrent connections are refused
    max_body_bytes: int = 10485760  # control-plane bodies buffered for the hand-off; over: 413
    body_timeout: float = 60.0  # a body being read must make progress this often; else 408


@dataclass(slots=True)
class FrontStats:
    """Counters for metrics (monotonic)."""

    accepted: int = 0
    refused: int = 0  # connections over max_connections
    requests: int = 0
    head_timeouts: int = 0
    body_timeouts: int = 0  # uploads cut for stalling (408)
    idle_closes: int = 0
    parse_errors: int = 0  # 400 answered by the front
    heads_too_large: int = 0  # 431
    handler_errors: int = 0  # 500 answered by the front, or an aborted answer


class _Refuse(Exception):
    """Raised inside a parser callback to stop parsing and answer `answer`."""

    def __init__(self, answer: Answer, *, parse_error: bool = False) -> None:
        super().__init__(answer.status)
        self.answer = answer
        self.parse_error = parse_error


class FrontContext:
    """What every connection of one listener shares: the handler, limits, counters, the set of
    live connections and handler tasks (for the connection cap and shutdown)."""

    def __init__(
        self,
        handler: Callable[[Incoming], Awaitable[None]],
        limits: FrontLimits,
        control: Callable[[], asyncio.Protocol] | None,
        control_prefix: str,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.control = control
        prefix = control_prefix.rstrip("/").encode()
        self.control_prefix = prefix
        self.control_prefixes = (prefix + b"/", prefix + b"?")
        self.stats = FrontStats()
        self.connections: set[FrontProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.closing = False  # shutting down: every answer closes its connection
        self.all_closed: asyncio.Future[None] | None = None
        self._date_second = 0
        self._date_line = ""

    def date_line(self) -> str:
        """`Date: …\\r\\n`, formatted once per second."""
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date_line = f"Date: {formatdate(now, usegmt=True)}\r\n"
        return self._date_line

    def is_control(self, url: bytes) -> bool:
        return url == self.control_prefix or url.startswith(self.control_prefixes)

    def forget(self, conn: FrontProtocol) -> None:
        self.connections.discard(conn)
        if not self.connections and self.all_closed is not None and not self.all_closed.done():
            self.all_closed.set_result(None)


class _BodyReader:
    """`Incoming.body()`: the chunks llhttp decoded, as they arrive."""

    __slots__ = ("_request",)

    def __init__(self, request: FrontRequest) -> None:
        self._request = request

    def __aiter__(self) -> _BodyReader:
        return self

    async def __anext__(self) -> bytes:
        request = self._request
        while True:
            chunks = request._chunks
            if chunks:
                chunk = chunks.popleft()
                request._buffered -= len(chunk)
                conn = request._conn
                if conn._reading_paused and request._buffered <= _BODY_LOW_WATER:
                    conn._update_reading()
                return chunk
            if request._body_error is not None:
                raise request._body_error
            if request._complete:
                request._chunks = _NO_CHUNKS  # read whole: nothing more is appended (on_body)
                raise StopAsyncIteration
            if request._conn._lost:
                raise RequestBodyError("the client closed the connection")
            if request.expects_continue:
                # Reading the body is the handler's consent: a client waiting for `100 Continue`
                # would otherwise wait for its own timeout before sending.
                await request.send_continue()
            conn = request._conn
            waiter = conn._loop.create_future()
            request._waiter = waiter
            # Waiting on the client (nothing buffered, reading not paused): it must send some
            # of the body within body_timeout, or the upload is cut (slow-body attacks).
            timer = conn._loop.call_later(conn._ctx.limits.body_timeout, _stalled, waiter)
            try:
                await waiter
            finally:
                request._waiter = None
                timer.cancel()


def _stalled(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(RequestBodyTimeout("no byte of the request body arrived in time"))


class FrontRequest:
    """One request as received (the `Incoming` of `proxy.front.message`) and its answer."""

    __slots__ = (
        "_body_error",
        "_body_taken",
        "_buffered",
        "_chunked_out",
        "_chunks",
        "_close",
        "_complete",
        "_conn",
        "_discard",
        "_finished",
        "_head_only",
        "_http10",
        "_keep_alive",
        "_left",
        "_started",
        "_tail_follows",
        "_waiter",
        "body_exists",
        "content_length",
        "control",
        "expects_continue",
        "headers",
        "host",
        "method",
        "raw_headers",
        "remote",
        "scheme",
        "target",
        "upgrade",
        "version",
    )

    def __init__(
        self,
        conn: FrontProtocol,
        method: str,
        target: str,
        version: tuple[int, int],
        raw_headers: tuple[tuple[bytes, bytes], ...],
        host: str,
        content_length: int | None,
        chunked: bool,
        expects_continue: bool,
        keep_alive: bool,
        upgrade: str | None,
        tail_follows: bool,
        control: bool,
    ) -> None:
        self._conn = conn
        self.method = method
        self.target = target
        self.version = version
        self.raw_headers = raw_headers
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(
            CIMultiDict(
                [
                    (n.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                    for n, v in raw_headers
                ]
            )
        )
        self.remote = conn._remote
        self.scheme = "http"
        self.host = host
        self.content_length = content_length
        self.body_exists = chunked or bool(content_length)
        self.expects_continue = expects_continue
        self.upgrade = upgrade  # the protocol asked for (`Upgrade`), lower-case
        # Upgrade or CONNECT: llhttp stopped at the end of the head; unless the connection is
        # handed over (`switch`), it ends with the answer.
        self._tail_follows = tail_follows
        self.control = control  # under the control-plane prefix: handed to aiohttp
        self._keep_alive = keep_alive
        self._head_only = method == "HEAD"
        self._http10 = version == (1, 0)  # keep-alive must then be said (`Connection`)
        # Never appended to without a body: those requests share one empty deque.
        self._chunks: deque[bytes] = deque() if self.body_exists else _NO_CHUNKS
        self._buffered = 0
        self._complete = not self.body_exists
        self._body_error: BaseException | None = None
        self._body_taken = False
        self._waiter: asyncio.Future[None] | None = None
        self._started = False
        self._finished = False
        self._close = False
        self._chunked_out = False
        self._discard = False  # a streamed answer that may carry no body (HEAD, 204, 304)
        self._left: int | None = None  # bytes still owed by a fixed-length streamed answer

    def __repr__(self) -> str:
        return f"<FrontRequest {self.method} {self.target!r}>"

    # ------------------------------------------------------------------ the request

    def body(self) -> AsyncIterator[bytes]:
        if self._body_taken:
            raise RuntimeError("the request body can be read only once")
        self._body_taken = True
        return _BodyReader(self)

    async def send_continue(self) -> None:
        if self.expects_continue and not self._started:
            self.expects_continue = False
            self._conn._write(_CONTINUE)

    # ------------------------------------------------------------------ the answer

    @property
    def response_started(self) -> bool:
        return self._started

    def close_after(self) -> None:
        self._close = True

    def abort(self) -> None:
        self._conn._abort()

    def _lend(self) -> None:
        """The answer is another server's to give (the control plane's aiohttp)."""
        self._started = True

    def _lent_done(self, keep: bool) -> None:
        """That answer is complete; `keep`: it left the connection open for more requests."""
        self._finished = True
        self._conn._answer_done(self, not keep or self._will_close(False))

    def _will_close(self, asked: bool) -> bool:
        # The connection cannot carry another request when the client or the handler said so,
        # when shutting down, or when the body was not received whole (the client never sent it
        # after no `100 Continue`, or it is still coming: it is not drained).
        conn = self._conn
        return (
            asked
            or self._close
            or not self._keep_alive
            or not self._complete
            or self._tail_follows
            or conn._ctx.closing
            or conn._eof
        )

    async def respond(self, answer: Answer) -> None:
        if self._started:
            raise RuntimeError("the answer has already started")
        conn = self._conn
        if conn._lost:
            raise ConnectionResetError("the client closed the connection")
        close = self._will_close(answer.close)
        status = answer.status
        body = answer.body
        if status < 200 or status == 204 or status == 304:
            head = conn._render_head(
                status, answer.reason, answer.headers, None, False, close, http10=self._http10
            )
            body = b""
        elif self._head_only:
            # A HEAD answer may state the length a GET would have: keep the handler's own.
            length = len(body) if body else None
            head = conn._render_head(
                status, answer.reason, answer.headers, length, True, close, http10=self._http10
            )
            body = b""
        else:
            head = conn._render_head(
                status, answer.reason, answer.headers, len(body), False, close, http10=self._http10
            )
        self._started = True  # (only now: a head that could not be rendered sent nothing)
        conn._write(head + body if body else head)
        self._finished = True
        conn._answer_done(self, close)
        if conn._write_paused and not conn._closing:
            await conn._drain()

    async def switch(self, headers: Sequence[tuple[str, str]]) -> TunnelProtocol:
        if self._started:
            raise RuntimeError("the answer has already started")
        if self.upgrade is None:
            raise RuntimeError("the request asked for no protocol switch")
        conn = self._conn
        if conn._lost:
            raise ConnectionResetError("the client closed the connection")
        lines = ["HTTP/1.1 101 Switching Protocols\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers)
        lines.append("\r\n")
        head = _encode_head(lines, 0)
        self._started = True
        self._finished = True
        conn._write(head)
        return conn._hand_over(self)

    async def start(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        *,
        reason: str | None = None,
        content_length: int | None = None,
    ) -> None:
        if self._started:
            raise RuntimeError("the answer has already started")
        conn = self._conn
        if conn._lost:
            raise ConnectionResetError("the client closed the connection")
        close = self._will_close(False)
        if status < 200 or status == 204 or status == 304:
            self._left = 0
            self._discard = True
            head = conn._render_head(
                status, reason, headers, None, False, close, http10=self._http10
            )
        elif self._head_only:
            self._left = 0
            self._discard = True
            head = conn._render_head(
                status, reason, headers, content_length, True, close, http10=self._http10
            )
        elif content_length is not None:
            self._left = content_length
            head = conn._render_head(
                status, reason, headers, content_length, False, close, http10=self._http10
            )
        elif self.version >= (1, 1):
            self._chunked_out = True
            head = conn._render_head(
                status, reason, headers, None, False, close, chunked=True, http10=self._http10
            )
        else:
            # HTTP/1.0 knows no chunks: the body ends when the connection does.
            close = True
            head = conn._render_head(
                status, reason, headers, None, False, close, http10=self._http10
            )
        self._started = True
        self._close = close
        conn._write(head)
        if conn._write_paused:
            await conn._drain()

    async def write(self, data: bytes) -> None:
        if not self._started or self._finished:
            raise RuntimeError("write() outside a streamed answer")
        conn = self._conn
        if conn._lost:
            raise ConnectionResetError("the client closed the connection")
        if not data:
            return
        if self._chunked_out:
            conn._write(b"%x\r\n%b\r\n" % (len(data), data))
        elif self._left is None:
            conn._write(data)
        else:
            if self._discard:
                return  # HEAD, 1xx, 204, 304: no body goes out
            if len(data) > self._left:
                raise RuntimeError("more body than the Content-Length announced")
            self._left -= len(data)
            conn._write(data)
        if conn._write_paused:
            await conn._drain()

    async def finish(self) -> None:
        if not self._started:
            raise RuntimeError("finish() before start()")
        if self._finished:
            return
        conn = self._conn
        if conn._lost:
            raise ConnectionResetError("the client closed the connection")
        if self._chunked_out:
            conn._write(_LAST_CHUNK)
        elif self._left:
            # A fixed-length answer cut short must not look complete to the client.
            self._finished = True
            conn._abort()
            raise RuntimeError("the answer ended before its Content-Length")
        self._finished = True
        conn._answer_done(self, self._close)
        if conn._write_paused and not conn._closing:
            await conn._drain()


class FrontProtocol(asyncio.Protocol):
    """One client connection."""

    # Slots, not an instance dict: a connection has ~40 fields, and a dict that size is ~2 KiB
    # more per connection (10,000 held requests hold 10,000 connections open).
    __slots__ = (
        "_active",
        "_broken",
        "_chunked",
        "_closing",
        "_counted",
        "_ctx",
        "_cur",
        "_deadline",
        "_deadline_is_head",
        "_drain_waiter",
        "_eof",
        "_expect",
        "_head_bytes",
        "_head_seen",
        "_host",
        "_in_head",
        "_length",
        "_lingered",
        "_lingering",
        "_loop",
        "_lost",
        "_parser",
        "_queue",
        "_raw",
        "_reading_paused",
        "_remote",
        "_tail_open",
        "_task",
        "_timer",
        "_timer_at",
        "_transport",
        "_upgrade_value",
        "_url",
        "_write_paused",
        "control_session",
        "upgrade_tail",
    )

    def __init__(self, ctx: FrontContext) -> None:
        self._ctx = ctx
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._remote: str | None = None
        self._lost = False
        self._counted = False  # in the context's connections (not a refused one)
        self._closing = False
        self._lingering = False  # our side is shut; the client's late bytes are dropped
        self._lingered = 0
        self._eof = False
        # Parsing: the head being received, and the request whose body is being received.
        self._in_head = True
        self._head_bytes = 0  # raw bytes of an incomplete head, counted as they arrive
        self._head_seen = False  # any byte of the next head has arrived
        self._url = b""
        self._raw: list[tuple[bytes, bytes]] = []
        self._host: str | None = None
        self._length: int | None = None
        self._chunked = False
        self._expect = False
        self._cur: FrontRequest | None = None  # receiving its body
        self._broken = False  # parsing stopped (an error, an upgrade): no request after these
        self._upgrade_value = b""
        self._tail_open = False  # bytes after an Upgrade / CONNECT head go to `upgrade_tail`
        self.upgrade_tail = b""  # kept for a tunnel (`FrontRequest.switch`)
        # Answering: the request being handled, and those parsed behind it (or a refusal).
        self._active: FrontRequest | None = None
        self._queue = _NO_QUEUE  # a deque of its own once a request or refusal waits (`_enqueue`)
        self._task: asyncio.Task[None] | None = None  # the active request's handler
        self.control_session: ControlSession | None = None
        # Flow control.
        self._reading_paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # The one timer: `_deadline` is when the connection closes unless something happens.
        self._deadline = 0.0
        self._deadline_is_head = True
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses, but behave as one.)
        self._transport = transport = cast(asyncio.Transport, transport)
        ctx = self._ctx
        if len(ctx.connections) >= ctx.limits.max_connections or ctx.closing:
            ctx.stats.refused += 1
            self._lost = True
            answer = (
                error_answer(503, "shutting_down")
                if ctx.closing
                else error_answer(503, "too_many_connections", message="too many connections")
            )
            try:
                transport.write(
                    self._render_head(503, None, answer.headers, len(answer.body), False, True)
                    + answer.body
                )
            finally:
                transport.close()
            return
        ctx.connections.add(self)
        self._counted = True
        ctx.stats.accepted += 1
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._remote = str(peer[0])
        # A new connection must send its whole first head within header_timeout.
        self._set_deadline(self._loop.time() + ctx.limits.header_timeout, head=True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is None:
            return
        self._lost = True
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        session = self.control_session
        if session is not None:
            session.client_lost(exc)
        for request in (self._active, self._cur):
            if request is not None and request._waiter is not None:
                waiter = request._waiter
                if not waiter.done():
                    waiter.set_result(None)
        if self._drain_waiter is not None and not self._drain_waiter.done():
            # A writer waiting here learns of the loss at its next write (or is cancelled).
            self._drain_waiter.set_result(None)
        self._cancel_active()
        if self._counted:
            self._ctx.forget(self)

    def eof_received(self) -> bool | None:
        # The client has closed its side: HTTP clients do that when they give up (a held
        # request abandoned), not to wait for an answer. The transport closes, and a handler
        # still answering is cancelled (`connection_lost`).
        self._eof = True
        return None

    def pause_writing(self) -> None:
        self._write_paused = True
        session = self.control_session
        if session is not None:
            session.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        session = self.control_session
        if session is not None:
            session.resume_writing()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._lingered += len(data)
            if self._lingered > _LINGER_BYTES and self._transport is not None:
                self._transport.close()
            return
        if self._broken or self._closing:
            if self._tail_open and not self._closing:
                self.upgrade_tail += data  # (reading is paused: at most one read in flight)
            return
        if self._in_head:
            if not self._head_seen:
                self._head_seen = True
                if self._active is None and not self._deadline_is_head:
                    # The first byte of a head on an idle connection: the head must now be
                    # complete within header_timeout.
                    self._set_deadline(
                        self._loop.time() + self._ctx.limits.header_timeout, head=True
                    )
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            # Parsing stops at the end of the head; what follows belongs to the protocol the
            # client asked for, and is kept for a tunnel that may take the connection over.
            self.upgrade_tail = data[upgrade.args[0] :]
            self._broken = True
            self._tail_open = True
        except httptools.HttpParserCallbackError as error:
            refuse = error.__context__
            if isinstance(refuse, _Refuse):
                self._refuse(refuse.answer, parse_error=refuse.parse_error)
            else:
                log.error("front_parser_callback_failed", exc_info=refuse)
                self._refuse(_internal_error(), parse_error=False)
        except httptools.HttpParserInvalidMethodError:
            self._refuse(_unknown_method(), parse_error=True)
        except httptools.HttpParserError:
            self._refuse(_invalid_request(), parse_error=True)
        else:
            if self._in_head and self._head_bytes > self._ctx.limits.max_header_bytes:
                self._refuse(_head_too_large(), parse_error=False)
        self._update_reading()

    # ------------------------------------------------------------------ llhttp callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._raw = []
        self._host = None
        self._length = None
        self._chunked = False
        self._expect = False
        self._upgrade_value = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer field after a chunked body: not part of the request's head
        self._raw.append((name, value))
        # The few headers the front itself reads, found by length before case-folding.
        n = len(name)
        if n == 4:
            if name.lower() == b"host":
                if self._host is not None:
                    # Two Hosts: which one a check reads and which one an upstream uses could
                    # differ (RFC 9112 §3.2: 400).
                    raise _Refuse(_invalid_request(), parse_error=True)
                self._host = value.decode("utf-8", "surrogateescape")
        elif n == 14:
            if name.lower() == b"content-length":
                self._length = int(value)  # llhttp has checked it is digits, and only one
        elif n == 17:
            if name.lower() == b"transfer-encoding":
                self._chunked = True  # llhttp refuses a request TE that does not end in chunked
        elif n == 7:
            if name.lower() == b"upgrade":
                self._upgrade_value = value
        elif n == 6 and name.lower() == b"expect" and value.lower().strip() == b"100-continue":
            self._expect = True

    def on_headers_complete(self) -> None:
        ctx = self._ctx
        parser = self._parser
        raw = self._raw
        url = self._url
        method = parser.get_method().decode("ascii")
        size = len(method) + len(url) + _HEAD_OVERHEAD
        for name, value in raw:
            size += len(name) + len(value) + _HEADER_LINE_OVERHEAD
        self._in_head = False
        self._head_bytes = 0
        self._head_seen = False
        if self._active is None:
            self._deadline = 0.0  # the head is in: no time limit while it is handled
        if size > ctx.limits.max_header_bytes:
            raise _Refuse(_head_too_large())
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            raise _Refuse(_invalid_request(), parse_error=True)
        host = self._host
        if host is None:
            if version == (1, 1):
                raise _Refuse(_invalid_request(), parse_error=True)  # RFC 9112 §3.2
            host = self._listener_address()
        tail_follows = parser.should_upgrade()  # Upgrade, or CONNECT
        length = self._length
        chunked = self._chunked
        upgrade: str | None = None
        if tail_follows and method != "CONNECT":
            upgrade = self._upgrade_value.decode("utf-8", "surrogateescape").strip().lower()
        if tail_follows and (chunked or length):
            # llhttp would treat the body as the upgraded protocol's bytes: what the handler
            # judged and what a tunnel would carry must not differ.
            raise _Refuse(_invalid_request(), parse_error=True)
        body = chunked or bool(length)
        ctx.stats.requests += 1
        request = FrontRequest(
            self,
            method,
            url.decode("utf-8", "surrogateescape"),
            version,
            tuple(raw),
            host,
            length,
            chunked,
            self._expect and body and version == (1, 1),
            parser.should_keep_alive(),
            upgrade,
            tail_follows,
            ctx.control is not None and ctx.is_control(url),
        )
        self._cur = request if body else None
        if self._active is None and not self._queue:
            self._begin(request)
        else:
            self._enqueue(request)

    def _listener_address(self) -> str:
        """The host an HTTP/1.0 request without `Host` reached: this listener's address."""
        transport = self._transport
        sockname = None if transport is None else transport.get_extra_info("sockname")
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            host = str(sockname[0])
            return f"[{host}]:{sockname[1]}" if ":" in host else f"{host}:{sockname[1]}"
        return ""

    def on_body(self, body: bytes) -> None:
        request = self._cur
        if request is None:  # pragma: no cover - llhttp sends a body only after a head
            return
        request._chunks.append(body)
        request._buffered += len(body)
        waiter = request._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        request = self._cur
        if request is not None:
            request._complete = True
            waiter = request._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            self._cur = None
        self._in_head = True
        self._head_bytes = 0

    # ------------------------------------------------------------------ requests and answers

    def _begin(self, request: FrontRequest) -> None:
        self._active = request
        ctx = self._ctx
        handler: Callable[[FrontRequest], Awaitable[None]] = (
            serve_control if request.control else ctx.handler
        )
        task = self._loop.create_task(self._run(request, handler))
        ctx.tasks.add(task)
        task.add_done_callback(ctx.tasks.discard)
        self._task = task

    async def _run(
        self, request: FrontRequest, handler: Callable[[FrontRequest], Awaitable[None]]
    ) -> None:
        fallback: Answer | None = None
        try:
            await handler(request)
        except asyncio.CancelledError:
            raise
        except RequestBodyError as error:
            if isinstance(error, RequestBodyTimeout):
                self._ctx.stats.body_timeouts += 1
            fallback = error_answer(error.status, error.code, message=error.sentence)
            fallback.close = True
        except ConnectionError:
            if not self._lost:  # not the client leaving: something the handler did failed
                self._ctx.stats.handler_errors += 1
                log.exception("front_handler_failed", method=request.method)
                fallback = _internal_error()
        except Exception:
            self._ctx.stats.handler_errors += 1
            log.exception("front_handler_failed", method=request.method)
            fallback = _internal_error()
        else:
            if not request._started:
                self._ctx.stats.handler_errors += 1
                log.error("front_handler_no_answer", method=request.method)
                fallback = _internal_error()
            elif not request._finished:
                # Streamed but never finished: the client must not take it for complete.
                self._abort()
        if fallback is not None and not self._lost:
            if request._started:
                if not request._finished:
                    self._abort()  # the answer began: only cutting it short is left
            else:
                with contextlib.suppress(ConnectionError):
                    await request.respond(fallback)

    def _cancel_active(self) -> None:
        active = self._active
        if active is not None and not active._finished:
            task = self._task
            if task is not None and not task.done():
                task.cancel()

    def _answer_done(self, request: FrontRequest, close: bool) -> None:
        """The answer to the active request is complete: on to the next one, or close."""
        if self._active is request:
            self._active = None
            self._task = None
        if close or self._lost or (self._eof and not self._queue):
            # A client still sending a body it was not asked for would have the answer lost
            # to a reset if the socket closed on unread bytes.
            self._close(linger=not request._complete)
            return
        queue = self._queue
        if queue:
            item = queue.popleft()
            if isinstance(item, Answer):
                self._send_refusal(item)
                return
            self._begin(item)
            self._update_reading()
            return
        if self._broken:
            self._close(linger=True)
            return
        self._update_reading()
        now = self._loop.time()
        limits = self._ctx.limits
        if self._head_seen:
            self._set_deadline(now + limits.header_timeout, head=True)
        else:
            self._set_deadline(now + limits.idle_timeout, head=False)

    def _refuse(self, answer: Answer, *, parse_error: bool) -> None:
        """Stop parsing; answer `answer` once the requests before it are answered, then close."""
        self._broken = True
        stats = self._ctx.stats
        if answer.status == 431:
            stats.heads_too_large += 1
        elif parse_error:
            stats.parse_errors += 1
        cur = self._cur
        if cur is not None and not self._in_head:
            # The error is in the body of a request already handed over: its reader fails, and
            # a handler that lets that propagate gets the 400 (see `_run`).
            self._cur = None
            self._body_failed(cur, RequestBodyError("the request body is not valid HTTP/1.1"))
            return
        if self._active is None and not self._queue:
            self._send_refusal(answer)
        else:
            self._enqueue(answer)

    def _enqueue(self, item: FrontRequest | Answer) -> None:
        """Behind the active request: answered in order (pipelining)."""
        if self._queue is _NO_QUEUE:
            self._queue = deque()
        self._queue.append(item)

    def _body_failed(self, request: FrontRequest, error: RequestBodyError) -> None:
        request._body_error = error
        waiter = request._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _send_refusal(self, answer: Answer) -> None:
        self._active = None
        if not self._lost:
            self._write(
                self._render_head(
                    answer.status, None, answer.headers, len(answer.body), False, True
                )
                + answer.body
            )
        self._close(linger=True)

    # ------------------------------------------------------------------ writing

    def _render_head(
        self,
        status: int,
        reason: str | None,
        headers: Sequence[tuple[str, str]],
        length: int | None,
        keep_given_length: bool,
        close: bool,
        *,
        chunked: bool = False,
        http10: bool = False,
    ) -> bytes:
        """The status line and headers: the handler's in order, its framing replaced by ours."""
        if reason is None:
            lines = [_STATUS_LINES.get(status) or _status_line(status, None)]
        else:
            lines = [_status_line(status, reason)]
        has_date = False
        has_length = False
        for name, value in headers:
            n = len(name)
            if n == 14 or n == 17 or n == 10:
                lowered = name.lower()
                if lowered == "content-length":
                    if not keep_given_length or has_length:
                        continue
                    has_length = True
                elif lowered in ("transfer-encoding", "connection"):
                    continue  # framing and the connection's fate are the front's
            elif n == 4 and not has_date and name.lower() == "date":
                has_date = True
            lines.append(f"{name}: {value}\r\n")
        if length is not None and not has_length:
            lines.append(f"Content-Length: {length}\r\n")
        if chunked:
            lines.append("Transfer-Encoding: chunked\r\n")
        if not has_date:
            lines.append(self._ctx.date_line())
        if close:
            lines.append("Connection: close\r\n\r\n")
        elif http10:
            lines.append("Connection: keep-alive\r\n\r\n")
        else:
            lines.append("\r\n")
        return _encode_head(lines, close or http10)

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not self._lost:
            transport.write(data)

    async def _drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("the client closed the connection")
        if self._write_paused:
            waiter = self._drain_waiter
            if waiter is None:
                waiter = self._drain_waiter = self._loop.create_future()
            await waiter

    def _close(self, *, linger: bool = False) -> None:
        """Close once what was written is sent. `linger`: the client may still be sending (a
        body, a refused head): send our FIN, then read and drop its bytes for a while, so that
        unread input does not make the kernel reset the connection before the answer is read."""
        if self._closing and not linger:
            return
        self._closing = True
        transport = self._transport
        if transport is None or self._lost or self._lingering:
            return
        if not linger or not transport.can_write_eof():
            transport.close()
            return
        self._lingering = True
        self._broken = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_later(_LINGER_SECONDS, transport.close)
        transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()

    def _hand_over(self, request: FrontRequest) -> TunnelProtocol:
        """After a `101`: the transport's bytes, both ways, are the tunnel's from now on. The
        connection still counts (max_connections, shutdown) until the tunnel's side closes."""
        transport = self._transport
        assert transport is not None
        self._tail_open = False
        self._closing = True  # the front writes and reads no more here
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._active is request:
            self._active = None
            self._task = None
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        tunnel = TunnelProtocol(transport, self.upgrade_tail, on_lost=self._tunnel_lost)
        self.upgrade_tail = b""
        if self._write_paused:
            tunnel.pause_writing()
        transport.set_protocol(tunnel)
        return tunnel

    def _tunnel_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._counted:
            self._counted = False
            self._ctx.forget(self)

    def close_gracefully(self) -> None:
        """Shutdown, for an idle connection: close once what was written is sent."""
        if self._lingering and self._transport is not None:
            self._transport.close()
        else:
            self._close()

    def close_now(self) -> None:
        """Shutdown: close at once, whatever is in progress."""
        self._abort()

    @property
    def idle(self) -> bool:
        """No request in progress and none queued (shutdown closes these at once)."""
        return self._lingering or (self._active is None and not self._queue and not self._head_seen)

    # ------------------------------------------------------------------ flow control, time

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        pause = self._broken or bool(self._queue)
        if not pause:
            cur = self._cur
            if cur is not None:
                if cur is not self._active:
                    pause = True  # a pipelined request waits its turn: parse no further
                elif self._reading_paused:
                    pause = cur._buffered > _BODY_LOW_WATER
                else:
                    pause = cur._buffered > _BODY_HIGH_WATER
        if pause != self._reading_paused:
            self._reading_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _set_deadline(self, when: float, *, head: bool) -> None:
        self._deadline = when
        self._deadline_is_head = head
        if self._timer is None or self._timer_at > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = when
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline == 0.0 or self._closing:
            return
        if self._active is not None or self._queue:
            return  # a request is being handled: its own deadline is re-armed after it
        if self._loop.time() < deadline:
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        stats = self._ctx.stats
        if self._deadline_is_head and self._head_seen:
            stats.head_timeouts += 1
            self._broken = True
            answer = error_answer(
                408, "request_timeout", message="the request head did not arrive in time"
            )
            self._send_refusal(answer)
        else:
            if self._deadline_is_head:
                stats.head_timeouts += 1
            else:
                stats.idle_closes += 1
            self._close()


def _encode_head(lines: list[str], extra_crlf: int) -> bytes:
    text = "".join(lines)
    # Each line was built to end with one CRLF (`extra_crlf`: lines that end with two): any
    # other CR or LF came from a header name or value, and would split the answer.
    expected = len(lines) + extra_crlf
    if text.count("\n") != expected or text.count("\r") != expected:
        raise ValueError("a header name or value contains CR or LF")
    return text.encode("utf-8", "surrogateescape")
