"""`FrontServer`: the data plane's listener (DESIGN §1 "front") over `FrontProtocol`.

Per request the front runs `await handler(incoming)` in a task of its own; the handler answers
through the `Incoming` (`respond`, or `start`/`write`/`finish`). A handler that returns without
answering gets a `500` sent for it; one that raises gets a `500` if nothing was sent yet, or its
connection cut if an answer had begun. When the client goes away before the answer is complete,
the handler's task is cancelled (that is how a disconnect cancels an upstream exchange, or
abandons a held request).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable

from .message import Incoming, RequestBodyError, RequestBodyTimeout
from .protocol import FrontContext, FrontLimits, FrontProtocol, FrontStats

__all__ = ["FrontLimits", "FrontServer", "FrontStats", "RequestBodyError", "RequestBodyTimeout"]


class FrontServer:
    """One listening socket serving HTTP/1.1 to `handler`; `/_countersign…` goes to `control`
    (aiohttp's `web.Server`) when one is given."""

    def __init__(
        self,
        handler: Callable[[Incoming], Awaitable[None]],
        *,
        limits: FrontLimits,
        control: Callable[[], asyncio.Protocol] | None = None,
        control_prefix: str = "/_countersign",
    ) -> None:
        self._ctx = FrontContext(handler, limits, control, control_prefix)
        self._server: asyncio.Server | None = None

    @property
    def stats(self) -> FrontStats:
        return self._ctx.stats

    @property
    def connections(self) -> int:
        return len(self._ctx.connections)

    @property
    def listening(self) -> bool:
        """Started, and not yet told to stop."""
        return self._server is not None and self._server.is_serving()

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            raise RuntimeError("the front is not listening")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(
        self, host: str, port: int, *, reuse_port: bool = False, backlog: int = 4096
    ) -> None:
        loop = asyncio.get_running_loop()
        ctx = self._ctx
        self._server = await loop.create_server(
            lambda: FrontProtocol(ctx),
            host,
            port,
            reuse_port=reuse_port or None,
            backlog=backlog,
        )
        for sock in self._server.sockets:
            # Answers are written whole (head and body together): no reason to wait for more.
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def stop_listening(self) -> None:
        """Accept no more connections; those open go on."""
        if self._server is not None:
            self._server.close()

    async def shutdown(self, timeout: float) -> None:  # noqa: ASYNC109 - a grace period, not a deadline
        """Close idle connections now; requests in progress get up to `timeout` to finish (their
        answers close their connections), then their handlers are cancelled and connections cut."""
        await self.stop_listening()
        ctx = self._ctx
        ctx.closing = True
        for conn in list(ctx.connections):
            if conn.idle:
                conn.close_gracefully()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if ctx.connections:
            ctx.all_closed = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ctx.all_closed), timeout)
        # Handlers still at work after their answer (an audit record, say) get what is left.
        left = deadline - loop.time()
        if ctx.tasks and left > 0:
            await asyncio.wait(set(ctx.tasks), timeout=left)
        tasks = set(ctx.tasks)
        for task in tasks:
            task.cancel()
        for conn in list(ctx.connections):
            conn.close_now()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        if self._server is not None:
            # Every connection is closed by now, so this returns at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
