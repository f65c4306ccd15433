"""A real upstream HTTP server for the tests: echoes what it received, plus a few special paths.

- any path: JSON {method, path (raw), query, headers (lower-case names), body_bytes, body_sha256}
- /sse: three server-sent events, 0.2 s apart
- /slow: answers after 5 s
- /gzip: a gzip-encoded body with Content-Encoding: gzip
- /cookie: sets a cookie
- /truncate: promises 1 MiB, sends 10 bytes and drops the connection
- /download/{n}: n bytes of zeros, streamed
- /request-id: the echo, answered with the upstream's own `X-Request-Id: req_upstream_123` (and a
  `Countersign-Request-Id` of its own, which the proxy must replace)
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib

from aiohttp import web

GZIP_BODY = gzip.compress(b'{"compressed": true}')


async def _echo(request: web.Request) -> web.StreamResponse:
    digest = hashlib.sha256()
    size = 0
    head = bytearray()  # the first 64 KiB, echoed back as text
    async for chunk in request.content.iter_any():
        digest.update(chunk)
        size += len(chunk)
        if len(head) < 65536:
            head += chunk[: 65536 - len(head)]
    raw_path, _, query = request.raw_path.partition("?")
    return web.json_response(
        {
            "method": request.method,
            "path": raw_path,
            "query": query,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "header_list": [[k, v] for k, v in request.headers.items()],
            "body_bytes": size,
            "body": head.decode("utf-8", "replace"),
            "body_sha256": digest.hexdigest(),
        },
        headers={"Connection": "keep-alive, X-Upstream-Secret", "X-Upstream-Secret": "hop"},
    )


async def _request_id(request: web.Request) -> web.StreamResponse:
    response = await _echo(request)
    response.headers["X-Request-Id"] = "req_upstream_123"
    response.headers["Countersign-Request-Id"] = "forged-by-the-upstream"
    response.headers["Countersign-Approval-Id"] = "apr_forged_by_the_upstream"
    return response


async def _sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(3):
        await response.write(f"data: event {i}\n\n".encode())
        await asyncio.sleep(0.2)
    await response.write_eof()
    return response


async def _slow(_: web.Request) -> web.Response:
    await asyncio.sleep(5)
    return web.json_response({"slow": True})


async def _gzip(_: web.Request) -> web.Response:
    return web.Response(
        body=GZIP_BODY, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )


async def _cookie(_: web.Request) -> web.Response:
    response = web.json_response({"cookie": "set"})
    response.set_cookie("session", "upstream-cookie")
    return response


async def _truncate(request: web.Request) -> web.StreamResponse:
    """Promises 1 MiB, sends 10 bytes, then drops the connection."""
    response = web.StreamResponse()
    response.content_length = 1 << 20
    await response.prepare(request)
    await response.write(b"0123456789")
    await asyncio.sleep(0.05)
    assert request.transport is not None
    request.transport.abort()
    return response


async def _download(request: web.Request) -> web.StreamResponse:
    total = int(request.match_info["n"])
    response = web.StreamResponse()
    response.content_length = total
    await response.prepare(request)
    chunk = b"\0" * 65536
    left = total
    while left > 0:
        piece = chunk[: min(left, len(chunk))]
        await response.write(piece)
        left -= len(piece)
    await response.write_eof()
    return response


def upstream_app() -> web.Application:
    app = web.Application(client_max_size=2**40)
    # Each special path also answers under the prefixes the test routes forward to.
    for base in ("", "/api", "/raw"):
        app.router.add_get(base + "/sse", _sse)
        app.router.add_get(base + "/slow", _slow)
        app.router.add_get(base + "/gzip", _gzip)
        app.router.add_get(base + "/cookie", _cookie)
        app.router.add_get(base + "/truncate", _truncate)
        app.router.add_get(base + "/download/{n}", _download)
        app.router.add_get(base + "/request-id", _request_id)
    app.router.add_route("*", "/{tail:.*}", _echo)
    return app
