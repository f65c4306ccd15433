"""The request path behind aiohttp's server: an `Incoming` over `aiohttp.web.Request`.

`countersign run` serves proxied traffic on its own front (`proxy.front.protocol`); aiohttp's
server carries the control plane (`/_countersign/`). The app keeps a catch-all route through
this adapter so that the app alone — as tests and embedders drive it in-process — proxies too.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from aiohttp import web

from ..h1.tunnel import TunnelProtocol
from ..server.responses import error_response, to_web
from .message import Answer, Incoming


def _expects_continue(request: web.Request) -> bool:
    expect = request.headers.get("Expect")
    return (
        expect is not None
        and expect.strip().lower() == "100-continue"
        and request.version >= (1, 1)
        and request.body_exists
    )


async def defer_continue(request: web.Request) -> web.StreamResponse | None:
    """aiohttp's expect handler for proxied routes: nothing is answered here, before anything
    is checked. `100 Continue` is sent by `Incoming.send_continue` once the request is judged (a
    refused upload is never sent), and any other expectation is refused by the pipeline's first
    stage (417), as on every front."""
    return None


class AiohttpIncoming:
    """`Incoming` over one aiohttp request; `response` is what the route handler returns."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.method = request.method
        self.target = request.raw_path
        self.version = (request.version.major, request.version.minor)
        self.headers = request.headers
        self.raw_headers = request.raw_headers
        self.remote = request.remote
        self.scheme = request.scheme
        self.host = request.host
        self.body_exists = request.body_exists
        self.content_length = request.content_length
        self.expects_continue = _expects_continue(request)
        # aiohttp's server keeps its connections: no tunnel (upgrades go as plain requests).
        self.upgrade: str | None = None
        self.response: web.StreamResponse | None = None
        self._close = False

    def body(self) -> AsyncIterator[bytes]:
        return self.request.content.iter_any()

    async def send_continue(self) -> None:
        if self.expects_continue:
            self.expects_continue = False
            writer = self.request.writer
            await writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            writer.output_size = 0  # (as aiohttp does) the answer itself has not begun

    def _closing(self, response: web.StreamResponse) -> None:
        # A client still waiting for `100 Continue` will not send its body: the connection
        # cannot carry another request.
        if self._close or self.expects_continue:
            response.force_close()

    async def respond(self, answer: Answer) -> None:
        response = to_web(answer)
        self._closing(response)
        self.response = response
        await response.prepare(self.request)
        await response.write_eof()

    async def start(
        self,
        status: int,
        headers: Sequence[tuple[str, str]],
        *,
        reason: str | None = None,
        content_length: int | None = None,
    ) -> None:
        response = web.StreamResponse(status=status, reason=reason)
        response.headers.extend(headers)
        if content_length is not None:
            response.content_length = content_length
        self._closing(response)
        self.response = response
        await response.prepare(self.request)

    async def write(self, data: bytes) -> None:
        assert self.response is not None
        await self.response.write(data)

    async def finish(self) -> None:
        assert self.response is not None
        await self.response.write_eof()

    async def switch(self, headers: Sequence[tuple[str, str]]) -> TunnelProtocol:
        raise NotImplementedError("aiohttp's server does not hand its connections over")

    @property
    def response_started(self) -> bool:
        return self.response is not None and self.response.prepared

    def close_after(self) -> None:
        self._close = True
        if self.response is not None:
            self.response.force_close()

    def abort(self) -> None:
        if self.request.transport is not None:
            self.request.transport.abort()


def aiohttp_handler(
    pipeline: Callable[[web.Request], Callable[[Incoming], Awaitable[None]]],
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp route handler running `pipeline(request)` (the request path in force for
    that request's app) over the request."""

    async def handle(request: web.Request) -> web.StreamResponse:
        incoming = AiohttpIncoming(request)
        await pipeline(request)(incoming)
        if incoming.response is None:
            return error_response(500, "internal_error")
        return incoming.response

    return handle
