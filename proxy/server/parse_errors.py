"""Requests aiohttp's HTTP parser rejects, answered in Countersign's one JSON error shape.

aiohttp answers a malformed request (a bad request line, bad headers, a header line over its
limit) inside its protocol, before any application code or middleware runs, in plain text that
echoes the offending bytes — a bearer token among them. `use_json_parse_errors` makes the
server's connections answer `400 invalid_request` or `431 header_too_large` in JSON instead,
without echoing anything. (The front server of issue "A data plane of its own" replaces this.)
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from .responses import error_response


class _JsonErrorHandler(RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:  # an answer is on its way: nothing more to say
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong):
            response = error_response(
                431, "header_too_large", message="a request header line is too long"
            )
        elif status == 500:
            self.log_exception("Error handling request", exc_info=exc)
            response = error_response(500, "internal_error")
        else:
            # The parser's own message quotes the request's bytes: never echo them.
            response = error_response(
                status, "invalid_request", message="the request is not valid HTTP/1.1"
            )
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


def use_json_parse_errors(server: web.Server) -> None:
    """Make every new connection of `server` answer parse errors in JSON."""
    server.__class__ = _JsonErrorServer
