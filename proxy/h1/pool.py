"""Keep-alive connections to upstream origins, bounded in number.

Idle connections are reused most-recent-first (the likeliest to still be open) and closed after
`idle_timeout`. At the limit, a request waits its turn (first come, first served) for a
connection to be released, or takes the place of an idle connection to another origin.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from dataclasses import dataclass, field

from .connection import UpstreamConnection
from .errors import UpstreamTimeout, UpstreamUnavailable


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str
    host: str
    port: int
    host_header: str = field(compare=False)


class ConnectionPool:
    def __init__(
        self,
        *,
        connect_timeout: float,
        limit: int = 1000,
        idle_timeout: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._limit = limit
        self._idle_timeout = idle_timeout
        self._ssl_context = ssl_context
        self._idle: dict[Origin, list[UpstreamConnection]] = {}
        self._origin_of: dict[UpstreamConnection, Origin] = {}
        self._open = 0  # connected or connecting
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def open_connections(self) -> int:
        return self._open

    async def acquire(self, origin: Origin) -> tuple[UpstreamConnection, bool]:
        """A connection to `origin`, and whether it was reused from the pool."""
        while True:
            if self._closed:
                raise UpstreamUnavailable("the proxy is shutting down")
            idle = self._idle.get(origin)
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    return conn, True
            if self._open < self._limit or self._evict_idle():
                return await self._connect(origin), False
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake_one()  # pass the turn on
                raise

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool if it can carry another exchange, else closed."""
        conn.finish()
        origin = self._origin_of.get(conn)
        if origin is None or not conn.reusable or self._closed:
            conn.abort()
            return
        conn.idle_since = asyncio.get_running_loop().time()
        self._idle.setdefault(origin, []).append(conn)
        if self._sweeper is None:
            self._schedule_sweep()
        self._wake_one()

    def discard(self, conn: UpstreamConnection) -> None:
        conn.finish()
        conn.abort()

    async def aclose(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._origin_of):
            conn.abort()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        await asyncio.sleep(0)  # let the transports finish closing

    # ------------------------------------------------------------------ internals

    async def _connect(self, origin: Origin) -> UpstreamConnection:
        self._open += 1
        loop = asyncio.get_running_loop()
        tls = self._ssl_context if origin.scheme == "https" else None
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: UpstreamConnection(self._lost),
                    origin.host,
                    origin.port,
                    ssl=tls,
                    server_hostname=origin.host if tls is not None else None,
                )
        except BaseException as exc:
            self._connection_gone()
            if isinstance(exc, TimeoutError):
                raise UpstreamTimeout(
                    f"connecting to {origin.host}:{origin.port} timed out "
                    f"after {self._connect_timeout:g} s"
                ) from exc
            if isinstance(exc, OSError):  # ssl.SSLError included
                reason = exc.strerror or str(exc)
                raise UpstreamUnavailable(
                    f"cannot connect to {origin.host}:{origin.port}: {reason}"
                ) from exc
            raise
        if conn.closed:  # lost before it was registered: _lost() could not count it down
            self._connection_gone()
            raise UpstreamUnavailable(f"{origin.host}:{origin.port} closed the connection at once")
        self._origin_of[conn] = origin
        return conn

    def _lost(self, conn: UpstreamConnection) -> None:
        origin = self._origin_of.pop(conn, None)
        if origin is None:
            return
        idle = self._idle.get(origin)
        if idle is not None and conn in idle:
            idle.remove(conn)
        self._connection_gone()

    def _connection_gone(self) -> None:
        self._open -= 1
        self._wake_one()

    def _wake_one(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _evict_idle(self) -> bool:
        """At the limit: close the longest-idle connection (to any origin) to make room."""
        oldest: UpstreamConnection | None = None
        for conns in self._idle.values():
            if conns and (oldest is None or conns[0].idle_since < oldest.idle_since):
                oldest = conns[0]
        if oldest is None:
            return False
        origin = self._origin_of.pop(oldest)
        self._idle[origin].remove(oldest)
        oldest.abort()
        self._open -= 1  # its connection_lost will find it forgotten already
        return True

    def _schedule_sweep(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(self._idle_timeout / 2, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = asyncio.get_running_loop().time() - self._idle_timeout
        remaining = 0
        for conns in self._idle.values():
            while conns and conns[0].idle_since <= cutoff:
                conns.pop(0).abort()  # connection_lost forgets it
            remaining += len(conns)
        if remaining and not self._closed:
            self._schedule_sweep()
