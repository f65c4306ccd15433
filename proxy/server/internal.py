"""Endpoints of the proxy itself, under the reserved prefix `/_countersign/`: health and metrics.

`healthz`: the process lives (it answered). `readyz`: this process can serve (configuration
loaded, handler started, not draining) - 200 or 503. Shared dependencies (the store, identity
providers) are reported in its body and never make it 503: every replica shares them, so failing
readiness on them would pull every replica out of a load balancer at once, allowed traffic too.

With `server.admin_listen` set, these are served by a second, small application on that address
(`AdminServer`) and the public port answers them 404 like any unknown reserved path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from .metrics import CONTENT_TYPE, Metrics
from .responses import error_response

PREFIX = "/_countersign/"


@dataclass(slots=True)
class Readiness:
    """Whether this process should receive traffic; shared by every app that serves readyz.

    `started`: the handler is built (set by the app's start-up). `drain`: set by the SIGTERM
    drain (it is the app's `DRAINING` event), so that load balancers stop sending new requests
    while in-flight ones end.
    """

    started: bool = False
    drain: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def draining(self) -> bool:
        return self.drain.is_set()

    @property
    def ready(self) -> bool:
        return self.started and not self.draining

    def checks(self) -> dict[str, bool]:
        return {"config": True, "started": self.started, "draining": self.draining}


READINESS = web.AppKey("readiness", Readiness)

# Each reports a shared dependency: "ok", "down", or another word it chooses; never raises.
DependencyCheck = Callable[[], Awaitable[str]]


def health_routes(
    metrics: Metrics,
    readiness: Readiness,
    dependencies: Mapping[str, DependencyCheck],
    *,
    timeout: float = 2.0,
) -> web.RouteTableDef:
    """`healthz`, `readyz` and `metrics`, on whichever app serves them."""
    routes = web.RouteTableDef()

    @routes.get(PREFIX + "healthz")
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    @routes.get(PREFIX + "readyz")
    async def readyz(_: web.Request) -> web.Response:
        names = list(dependencies)
        results = await asyncio.gather(*(_bounded(dependencies[name], timeout) for name in names))
        ok = readiness.ready
        status = "ready" if ok else ("draining" if readiness.draining else "not_ready")
        return web.json_response(
            {
                "status": status,
                "checks": readiness.checks(),
                "dependencies": dict(zip(names, results, strict=True)),
            },
            status=200 if ok else 503,
        )

    @routes.get(PREFIX + "metrics")
    async def metrics_endpoint(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    return routes


async def _bounded(check: DependencyCheck, seconds: float) -> str:
    """The check's word, or "down" when it fails or takes longer than `seconds`."""
    try:
        async with asyncio.timeout(seconds):
            return await check()
    except Exception:
        return "down"


def reserved_routes() -> web.RouteTableDef:
    """Any other path under the reserved prefix: a JSON 404, never the upstream's."""
    routes = web.RouteTableDef()

    @routes.route("*", PREFIX + "{tail:.*}")
    async def unknown(_: web.Request) -> web.Response:
        return error_response(404, "no_route", message="unknown /_countersign/ endpoint")

    return routes


class AdminServer:
    """The `server.admin_listen` listener: an app of its own serving health and metrics.

    Started by the runner right after the public listener (so an answering readyz there also
    means the public port is up) and stopped on the main app's cleanup, after the drain (so
    probes and scrapes keep answering while it runs)."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self, *, reuse_port: bool = False) -> None:
        runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1)
        await runner.setup()
        self._runner = runner
        site = web.TCPSite(runner, self.host, self.port, reuse_port=reuse_port or None)
        try:
            await site.start()
        except OSError:
            await self.stop()
            raise

    @property
    def bound_port(self) -> int | None:
        """The port actually listened on (`admin_listen` may say port 0)."""
        if self._runner is None:
            return None
        for address in self._runner.addresses:
            return int(address[1])
        return None

    async def stop(self, _: web.Application | None = None) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()


ADMIN_SERVER = web.AppKey("admin_server", AdminServer)
