"""Serving: start the app on the configured address and stop cleanly on SIGTERM / SIGINT."""

from __future__ import annotations

import asyncio
import signal
import sys

import structlog
from aiohttp import web

from ..app import build_app
from ..config import Settings
from ..logs import configure_logging

log = structlog.get_logger("countersign")


async def start(settings: Settings, app: web.Application | None = None) -> web.AppRunner:
    """Start serving `settings.server.listen`; the caller owns the returned runner."""
    app = app if app is not None else build_app(settings)
    # handler_cancellation: a client that hangs up while its request is held for approval
    # stops waiting at once (the approval stays pending for its retry to join).
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=10,
        handler_cancellation=True,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port, backlog=1024)
    await site.start()
    return runner


async def serve(settings: Settings) -> None:
    configure_logging()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        runner = await start(settings)
    except OSError as exc:
        log.error("server.listen_failed", listen=settings.server.listen, error=str(exc))
        sys.exit(1)
    log.info(
        "server.started",
        listen=settings.server.listen,
        routes=len(settings.routes),
        rules=len(settings.policy.rules),
    )
    try:
        await stop.wait()
    finally:
        log.info("server.stopping")
        await runner.cleanup()
