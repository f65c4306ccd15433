"""Errors aiohttp raises itself (its router's 404 / 405, a body over `client_max_size`: 413) and
exceptions no handler caught (500) answered in Countersign's one JSON error shape.

What this cannot reach: a request aiohttp's HTTP parser rejects (bad request line, bad headers)
is answered by aiohttp's protocol before any application code runs, in plain text.
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

from .responses import error_response

log = logging.getLogger("countersign")

# aiohttp's status → our code; other statuses get their HTTP phrase in snake case.
_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "no_route",
    405: "method_not_allowed",
    413: "payload_too_large",
    431: "header_too_large",
}
# Headers of aiohttp's own answer that describe its (plain-text) body, not the error.
_BODY_HEADERS = frozenset({hdrs.CONTENT_TYPE.lower(), hdrs.CONTENT_LENGTH.lower()})


def _code(status: int) -> str:
    if status in _CODES:
        return _CODES[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise  # redirects, and answers already in our shape
        status, code = exc.status, _code(exc.status)
        message = exc.text if exc.text and exc.text != f"{status}: {exc.reason}" else None
        if request.method == hdrs.METH_CONNECT and status in (404, 405):
            # A CONNECT's authority-form target never reaches the proxy's route.
            status, code, message = 405, "method_not_allowed", "CONNECT is not proxied"
        headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
        return error_response(status, code, headers=headers, message=message)
    except ConnectionError:
        raise  # the client left: nobody to answer
    except Exception:
        if request.writer is not None and getattr(request.writer, "output_size", 0) > 0:
            raise  # an answer is already on its way: aiohttp closes the connection
        log.exception("request.failed", extra={"method": request.method, "path": request.path})
        return error_response(
            500, "internal_error", message="an unexpected error occurred; see the proxy's logs"
        )
