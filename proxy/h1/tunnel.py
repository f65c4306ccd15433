"""One side of a tunnel: a connection that switched protocols (`101`, WebSocket), carried as
plain bytes both ways.

After the switch the HTTP parser is out of the way: `TunnelProtocol` becomes the transport's
protocol (`transport.set_protocol`), taking the bytes that came in the same read as the `101`
head. Reading is flow-controlled (the socket stops being read while too much waits for the other
side), writing waits while the peer is slow, and both ends of a tunnel are the same class: the
client's (the front) and the upstream's (`proxy.h1.connection`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import cast

_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


class TunnelProtocol(asyncio.Protocol):
    """Bytes in and out of one transport, for a pump that relays them to another."""

    def __init__(
        self,
        transport: asyncio.BaseTransport,
        initial: bytes = b"",
        *,
        on_lost: Callable[[Exception | None], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport = cast(asyncio.Transport, transport)
        self._on_lost = on_lost
        self._incoming: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._lost = False
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self.bytes_in = 0  # received from this side
        self.bytes_out = 0  # written to this side
        if initial:
            self.data_received(initial)

    # ------------------------------------------------------------------ for the pump

    async def read(self) -> bytes:
        """The next bytes from this side; b"" once it has closed its sending side."""
        while not self._incoming:
            if self._eof or self._lost:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._incoming.popleft()
        self._buffered -= len(data)
        if self._reading_paused and self._buffered <= _LOW_WATER:
            self._reading_paused = False
            if not self._lost:
                self._transport.resume_reading()
        return data

    async def write(self, data: bytes) -> None:
        """Send `data` to this side; waits while its socket's send buffer is full. Raises
        `ConnectionError` once the connection is gone."""
        if self._lost or self._transport.is_closing():
            raise ConnectionResetError("the tunnel's connection is closed")
        self._transport.write(data)
        self.bytes_out += len(data)
        if self._write_paused:
            self._drain = self._loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None
            if self._lost:
                raise ConnectionResetError("the tunnel's connection is closed")

    def write_eof(self) -> None:
        """The other side finished sending: finish ours (half-close), where the transport can."""
        if not self._lost and not self._transport.is_closing() and self._transport.can_write_eof():
            self._transport.write_eof()

    def close(self) -> None:
        if not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        self._transport.abort()

    @property
    def closed(self) -> bool:
        return self._lost

    # ------------------------------------------------------------------ asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self._incoming.append(data)
        self._buffered += len(data)
        self.bytes_in += len(data)
        if self._buffered > _HIGH_WATER and not self._reading_paused:
            self._reading_paused = True
            self._transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return True  # keep our sending side open until the pump has relayed everything

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self._on_lost is not None:
            on_lost, self._on_lost = self._on_lost, None
            on_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


async def pump(source: TunnelProtocol, sink: TunnelProtocol) -> None:
    """Relay bytes from `source` to `sink` until `source` stops sending, then half-close
    `sink` (a WebSocket ends with close frames both ways, then each side closes)."""
    while data := await source.read():
        await sink.write(data)
    sink.write_eof()


async def relay_both_ways(client: TunnelProtocol, upstream: TunnelProtocol) -> None:
    """Carry bytes both ways until both directions have ended, or either connection is gone;
    then close both."""
    up = asyncio.ensure_future(pump(client, upstream))
    down = asyncio.ensure_future(pump(upstream, client))
    try:
        pending: set[asyncio.Future[None]] = {up, down}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(task.exception() is not None for task in done if not task.cancelled()):
                break  # a connection broke: the other direction has nowhere to go
            if client.closed or upstream.closed:
                break
    finally:
        for task in (up, down):
            task.cancel()
        client.close()
        upstream.close()
