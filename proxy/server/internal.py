"""Endpoints of the proxy itself, under the reserved prefix `/_countersign/`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from .metrics import Metrics
from .responses import error_response

PREFIX = "/_countersign/"


def internal_routes(
    metrics: Metrics, ready: Callable[[], Awaitable[dict[str, bool]]]
) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.get(PREFIX + "healthz")
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @routes.get(PREFIX + "readyz")
    async def readyz(_: web.Request) -> web.Response:
        checks = await ready()
        ok = all(checks.values())
        return web.json_response(
            {"status": "ready" if ok else "not_ready", "checks": checks}, status=200 if ok else 503
        )

    @routes.get(PREFIX + "metrics")
    async def metrics_endpoint(_: web.Request) -> web.Response:
        return web.Response(text=metrics.render(), content_type="text/plain", charset="utf-8")

    @routes.route("*", PREFIX + "{tail:.*}")
    async def unknown(_: web.Request) -> web.Response:
        return error_response(404, "no_route", message="unknown /_countersign/ endpoint")

    return routes
