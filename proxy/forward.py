"""The upstream client: one small transport interface, errors mapped at the boundary.

`Forwarder.send()` sends the request upstream (its body streamed, or the exact bytes of an
approved request) and returns the response with its body still unread, so the server can stream
it back chunk by chunk. Connection failures and invalid answers become `UpstreamUnavailable`
(502), timeouts `UpstreamTimeout` (504); nothing else leaks out.

The client keeps no cookies, does not decompress (bytes pass through as the upstream sent them)
and pools keep-alive connections across all routes (proxy/h1/).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterable, Awaitable, Callable, Iterable
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from .h1.connection import UpstreamConnection
from .h1.errors import RequestBodyFailed, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from .h1.pool import ConnectionPool, Origin
from .h1.tunnel import TunnelProtocol
from .model.binding import connection_tokens

__all__ = [
    "HOP_BY_HOP",
    "Forwarder",
    "RequestBodyFailed",
    "UpstreamError",
    "UpstreamResponse",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "connection_named",
    "strip_hop_by_hop",
]

# RFC 9110 section 7.6.1 plus the de facto ones; never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Methods a stale pooled connection may be retried for: safe, and sent without a body.
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS"})
_EMPTY_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_COALESCE_BELOW = 64 * 1024  # a body smaller than this leaves in the same write as the head


# `Connection` values seen, each with the names it declares, all of them and those beyond
# HOP_BY_HOP: nearly every request and answer carries one of a handful (`keep-alive`, `close`),
# read once each. Bounded: a peer sending ever-new values only refills it.
_TOKENS_OF: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
_TOKENS_OF_MAX = 256


def _tokens_of(value: str) -> tuple[frozenset[str], frozenset[str]]:
    # The binding's own reading (proxy.model.binding): what it binds is exactly what is kept.
    tokens = _TOKENS_OF.get(value)
    if tokens is None:
        named = frozenset(connection_tokens(value))
        tokens = (named, named - HOP_BY_HOP)
        if len(_TOKENS_OF) >= _TOKENS_OF_MAX:
            _TOKENS_OF.clear()
        _TOKENS_OF[value] = tokens
    return tokens


def connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[str]:
    """The (lower-case) header names a `Connection` header declares hop-by-hop."""
    values = headers.getall("Connection", ())
    if len(values) == 1:
        return _tokens_of(values[0])[0]
    return frozenset().union(*(_tokens_of(value)[0] for value in values))


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The headers without hop-by-hop ones, including those named in `Connection` (before or
    after it)."""
    kept: list[tuple[str, str]] = []
    named: frozenset[str] = frozenset()
    for key, value in headers:
        lower = key.lower()
        if lower in HOP_BY_HOP:
            if lower == "connection":
                named |= _tokens_of(value)[1]
            continue
        kept.append((key, value))
    if named:
        kept = [(key, value) for key, value in kept if key.lower() not in named]
    return kept


class UpstreamResponse:
    """The upstream's answer: status and headers read, the body still on its way."""

    __slots__ = (
        "_conn",
        "_done",
        "_pool",
        "_writer",
        "content_length",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        content_length: int | None,
        conn: UpstreamConnection,
        pool: ConnectionPool,
        writer: asyncio.Task[None] | None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content_length = content_length
        self._conn = conn
        self._pool = pool
        self._writer = writer
        self._done = False

    async def read(self) -> bytes:
        """The next piece of the body as it arrives; b"" at its end. A failure mid-body raises
        `UpstreamError` like `send` does."""
        return await self._conn.read_chunk()

    @property
    def body_complete(self) -> bool:
        """Whether the whole body has arrived already (typical of small answers)."""
        return self._conn.message_complete

    def read_all(self) -> bytes:
        """The rest of the body at once; only when `body_complete`."""
        assert self._conn.message_complete
        return self._conn.take_body()

    def tunnel(self) -> TunnelProtocol:
        """After a `101 Switching Protocols`: the upstream's end of the tunnel (the connection
        leaves the pool)."""
        assert self.status == 101 and not self._done
        self._done = True
        return self._conn.detach()

    def release(self) -> None:
        """The body was read to its end: the connection goes back to the pool if it can."""
        if self._done:
            return
        self._done = True
        if self._writer is not None and not self._writer.done():
            # The upstream answered before taking the whole request body: the connection is
            # mid-request and cannot carry another.
            self._writer.cancel()
            self._pool.discard(self._conn)
        elif self._conn.response_complete:
            self._pool.release(self._conn)
        else:
            self._pool.discard(self._conn)

    def close(self) -> None:
        """Drop the connection (the body was not read to the end; it cannot be reused)."""
        if self._done:
            return
        self._done = True
        if self._writer is not None:
            self._writer.cancel()
        self._pool.discard(self._conn)


class Forwarder:
    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        pool_size: int = 1000,
        idle_timeout: float = 30.0,
    ) -> None:
        self._read_timeout = read_timeout
        self._pool = ConnectionPool(
            connect_timeout=connect_timeout,
            limit=pool_size,
            idle_timeout=idle_timeout,
            ssl_context=ssl.create_default_context(),
        )
        self._origins: dict[str, Origin] = {}

    @property
    def open_connections(self) -> int:
        return self._pool.open_connections

    async def send(
        self,
        method: str,
        url: str,
        headers: Iterable[tuple[str, str]],
        body: AsyncIterable[bytes] | bytes | None,
        *,
        read_timeout: float | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
        upgrade: str | None = None,
    ) -> UpstreamResponse:
        """Send a request to `url` (already normalized and encoded: sent as is).

        `upgrade`: the protocol the client asks to switch to (`websocket`); the request goes
        with `Connection: Upgrade` and `Upgrade`, and a `101` answer's connection becomes a
        tunnel (`UpstreamResponse.tunnel`).

        `before_send` runs once a connection is open and before a byte is written: an
        approval is used (claimed) only when its request can actually leave, so a refused
        connection leaves it unused. What it raises is raised, nothing sent."""
        origin, target = self._split(url)
        if upgrade is not None:
            headers = [*headers, ("Connection", "Upgrade"), ("Upgrade", upgrade)]
        head, chunked = _request_head(method, target, origin.host_header, headers, body)
        timeout = read_timeout or self._read_timeout
        retry = body is None and method in _RETRYABLE and upgrade is None
        while True:
            conn, reused = await self._pool.acquire(origin)
            if before_send is not None:
                try:
                    await before_send()
                except BaseException:
                    self._pool.discard(conn)
                    raise
                before_send = None
            response_head = conn.begin(
                head_only=method == "HEAD", read_timeout=timeout, upgrade=upgrade is not None
            )
            writer: asyncio.Task[None] | None = None
            try:
                if body is None:
                    conn.write(head)
                elif isinstance(body, bytes):
                    if len(body) < _COALESCE_BELOW:
                        conn.write(head + body)
                    else:
                        conn.write(head)
                        conn.write(body)
                else:
                    conn.write(head)
                    writer = asyncio.create_task(_stream_body(conn, body, chunked))
                answer = await response_head
            except BaseException as exc:
                if writer is not None:
                    writer.cancel()
                self._pool.discard(conn)
                if (
                    isinstance(exc, UpstreamError)
                    and retry
                    and reused
                    and not conn.received_any
                    and not isinstance(exc, UpstreamTimeout)
                ):
                    # The upstream closed an idle keep-alive connection as we reused it: the
                    # request never arrived, and a safe one can go again on a fresh connection.
                    # Not after a read timeout, though: then the upstream most likely has the
                    # request and is slow, and a second try would double the caller's wait and
                    # the upstream's work.
                    retry = False
                    continue
                raise
            return UpstreamResponse(
                answer.status,
                answer.reason,
                strip_hop_by_hop(answer.headers),
                answer.content_length,
                conn,
                self._pool,
                writer,
            )

    def _split(self, url: str) -> tuple[Origin, str]:
        slash = url.find("/", url.find("//") + 2)
        if slash < 0:
            base, target = url, "/"
        else:
            base, target = url[:slash], url[slash:]
        origin = self._origins.get(base)
        if origin is None:
            parts = urlsplit(base)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UpstreamUnavailable(f"not an http(s) upstream: {base}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            origin = self._origins[base] = Origin(
                parts.scheme, parts.hostname, port, parts.netloc.rpartition("@")[2]
            )
        return origin, target

    async def aclose(self) -> None:
        await self._pool.aclose()


def _request_head(
    method: str,
    target: str,
    host: str,
    headers: Iterable[tuple[str, str]],
    body: AsyncIterable[bytes] | bytes | None,
) -> tuple[bytes, bool]:
    """The request line and headers, with framing set by the body actually sent."""
    lines = [f"{method} {target} HTTP/1.1", ""]  # the Host line is filled in below
    streamed = body is not None and not isinstance(body, bytes)
    has_length = False
    for name, value in headers:
        lower = name.lower()
        if lower == "content-length":
            if not streamed:
                continue  # set below from the bytes actually sent
            has_length = True
        elif lower == "transfer-encoding":
            continue
        elif lower == "host":
            host = value  # a route's injected Host (a virtual host behind an address)
            continue
        lines.append(f"{name}: {value}")
    lines[1] = f"Host: {host}"
    chunked = False
    if isinstance(body, bytes):
        lines.append(f"Content-Length: {len(body)}")
    elif body is None:
        if method in _EMPTY_BODY_METHODS:
            lines.append("Content-Length: 0")
    elif not has_length:
        lines.append("Transfer-Encoding: chunked")
        chunked = True
    text = "\r\n".join(lines)
    # Header names and values come from a parsed request or from the config; neither may hold
    # a line break, but one would let a header smuggle a second request: check, cheaply.
    if text.count("\n") != len(lines) - 1 or text.count("\r") != len(lines) - 1:
        raise UpstreamUnavailable("a header holds a line break; not forwarded")
    return (text + "\r\n\r\n").encode("utf-8", "surrogateescape"), chunked


async def _stream_body(conn: UpstreamConnection, body: AsyncIterable[bytes], chunked: bool) -> None:
    try:
        async for chunk in body:
            if not chunk:
                continue
            conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            await conn.drain()
        if chunked:
            conn.write(b"0\r\n\r\n")
    except UpstreamError:
        pass  # the exchange has failed already, and says so to whoever reads the response
    except Exception as exc:  # the client's upload broke off
        conn.fail(RequestBodyFailed(f"the request body could not be read: {exc}", exc))
