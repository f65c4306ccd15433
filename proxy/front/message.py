"""What a front hands the request path, and how the path answers through it.

A front is the HTTP server a request arrived on: `proxy.front.protocol` (the data plane's own,
on httptools) or `proxy.front.aiohttp_front` (aiohttp's, kept for the control-plane app and for
tests that drive the app in-process). The pipeline sees only `Incoming`: the request as received
(the raw target and header bytes kept) and the way back to its client, either one whole `Answer`
or a streamed one (`start`, `write`, `finish`). Status codes are chosen by the pipeline; framing
(Content-Length, chunked, keep-alive or close) by the front.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDictProxy

from ..h1.tunnel import TunnelProtocol


@dataclass(slots=True)
class Answer:
    """A whole answer the proxy composes itself (a refusal, a 202, a relayed small body).

    `headers` are sent as given, in order, duplicates kept; the front adds the framing
    (`Content-Length`) and `Connection`. `close`: the connection carries no further request
    after this answer."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    reason: str | None = None
    close: bool = False


class RequestBodyError(Exception):
    """The request body cannot be read to its end: its framing was invalid, or the client closed
    the connection before sending all of it. Raised by `Incoming.body()`; a handler that lets it
    propagate before answering gets the answer below from the front (which then closes), and the
    pipeline audits the same status and code."""

    status = 400
    code = "invalid_request"
    sentence = "the request is not valid HTTP/1.1"


class RequestBodyTimeout(RequestBodyError):
    """No byte of the request body arrived for `server.body_timeout_seconds` while it was being
    read (a stalled or deliberately slow upload)."""

    status = 408
    code = "request_timeout"
    sentence = "the request body stopped arriving (server.body_timeout_seconds)"


class Streamed:
    """The answer went out streamed (`Incoming.start` … `finish`): nothing is left to send."""

    __slots__ = ()


STREAMED = Streamed()
# What a stage of the request path answers with: a whole answer to send, or one already sent.
Reply = Answer | Streamed


class Incoming(Protocol):
    """One request as a front received it, and the way back to its client."""

    method: str
    # The request target exactly as received (decoded as UTF-8 with surrogateescape, so the
    # original bytes come back with `.encode("utf-8", "surrogateescape")`).
    target: str
    version: tuple[int, int]
    headers: CIMultiDictProxy[str]
    # The header lines as received: names and values in their original bytes and order.
    raw_headers: tuple[tuple[bytes, bytes], ...]
    remote: str | None  # the peer's address
    scheme: str  # "http" or "https", as this listener speaks
    host: str  # the Host header, or this listener's address without one
    body_exists: bool  # Content-Length > 0 or a chunked body
    content_length: int | None
    # `Expect: 100-continue` (HTTP/1.1, with a body): the client waits for `send_continue`.
    expects_continue: bool
    # The protocol the client asks to switch to (`Upgrade`, named in `Connection`), lower-case,
    # when this front can hand its connection over (`switch`); else None.
    upgrade: str | None

    def body(self) -> AsyncIterator[bytes]:
        """The request body as it arrives (flow-controlled: a reader that stops reading stops
        the client). Read at most once."""
        ...

    async def send_continue(self) -> None:
        """`100 Continue`, when the client waits for it and it has not been sent yet."""
        ...

    async def respond(self, answer: Answer) -> None:
        """Send a whole answer (status, headers and body in one write where possible)."""
        ...

    async def start(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        *,
        reason: str | None = None,
        content_length: int | None = None,
    ) -> None:
        """Begin a streamed answer: the status line and headers. Without `content_length`, a
        body is sent chunked (or until the connection closes, to an HTTP/1.0 client)."""
        ...

    async def write(self, data: bytes) -> None:
        """A piece of a streamed answer's body; waits while the client is slow to read."""
        ...

    async def finish(self) -> None:
        """End a streamed answer."""
        ...

    async def switch(self, headers: Sequence[tuple[str, str]]) -> TunnelProtocol:
        """Answer `101 Switching Protocols` with `headers` (sent as given: `Connection` and
        `Upgrade` included) and hand over the connection: its bytes, both ways, are the
        returned tunnel end's from now on."""
        ...

    @property
    def response_started(self) -> bool:
        """Whether the status line has gone to the client (nothing else can be said after)."""
        ...

    def close_after(self) -> None:
        """No further request on this connection once the answer is sent."""
        ...

    def abort(self) -> None:
        """Cut the client's connection now: a truncated answer must not look complete."""
        ...
