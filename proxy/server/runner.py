"""Serving: start the app on the configured address and stop cleanly on SIGTERM / SIGINT.

With `server.workers: N > 1`, a supervisor forks N worker processes that all listen on the same
port (SO_REUSEPORT: the kernel spreads connections among them) and share the Redis store. It
forwards SIGTERM/SIGINT to them and restarts a worker that dies unexpectedly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from aiohttp import web

from ..app import StartupError, build_app, build_redactor
from ..audit.chain import ChainError
from ..config import Settings
from ..logs import configure_logging
from .parse_errors import use_json_parse_errors

log = structlog.get_logger("countersign")


async def start(
    settings: Settings,
    app: web.Application | None = None,
    *,
    reuse_port: bool = False,
    worker: int | None = None,
) -> web.AppRunner:
    """Start serving `settings.server.listen`; the caller owns the returned runner."""
    app = app if app is not None else build_app(settings, worker=worker)
    # handler_cancellation: a client that hangs up while its request is held for approval
    # stops waiting at once (the approval stays pending for its retry to join).
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=10,
        handler_cancellation=True,
        # A header line may be as long as the whole head may be (a large bearer token still
        # gets a 401, not the parser's 400).
        max_line_size=settings.server.max_header_bytes,
        max_field_size=settings.server.max_header_bytes,
        # A compressed request body passes as the client sent it, with its Content-Encoding:
        # what an approval binds (and approvers download) is what the upstream receives.
        auto_decompress=False,
    )
    await runner.setup()
    assert runner.server is not None
    use_json_parse_errors(runner.server)
    site = web.TCPSite(
        runner,
        settings.server.host,
        settings.server.port,
        backlog=4096,
        reuse_port=reuse_port or None,
    )
    await site.start()
    return runner


async def serve(settings: Settings, *, reuse_port: bool = False, worker: int | None = None) -> None:
    configure_logging(redactor=build_redactor(settings))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        app = build_app(settings, worker=worker)
    except (ChainError, OSError) as exc:
        # E.g. the audit file's last line is not a sound chain line: continuing would hide
        # tampering, so refuse to start and say why.
        log.error("server.start_failed", error=str(exc))
        sys.exit(1)
    try:
        runner = await start(settings, app, reuse_port=reuse_port)
    except OSError as exc:
        log.error("server.listen_failed", listen=settings.server.listen, error=str(exc))
        sys.exit(1)
    except StartupError as exc:
        log.error("server.start_failed", error=str(exc))
        sys.exit(1)
    _tune_garbage_collector()
    log.info(
        "server.started",
        listen=settings.server.listen,
        routes=len(settings.routes),
        rules=len(settings.policy.rules),
        pid=os.getpid(),
    )
    try:
        await stop.wait()
    finally:
        log.info("server.stopping", pid=os.getpid())
        await runner.cleanup()


# Collect young objects every this many net allocations (Python's default: 700), gen-1 every
# this many gen-0 runs, gen-2 (everything) every this many gen-1 runs (and then only when the
# heap has grown by a quarter since). Thousands of held requests are thousands of live objects
# that every full collection walks: with the defaults, releasing 10,000 held requests took
# 5.8 s and 5.2 CPU-s of the proxy; with these, 4.0 s and 3.1 CPU-s (bench/bench_replicas.py).
GC_THRESHOLDS = (50_000, 20, 10)


def _tune_garbage_collector() -> None:
    """Once serving: move everything built at start-up (config, compiled policy, modules) out
    of the collector's sight, and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(settings: Settings) -> int:
    """`countersign run`: one process, or a supervisor of `server.workers` processes."""
    if settings.server.workers <= 1:
        _run_loop(settings, serve(settings))
        return 0
    return _supervise(settings)


def _run_loop(settings: Settings, main: Coroutine[Any, Any, None]) -> None:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if settings.server.event_loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def _spawn(settings: Settings, worker: int) -> int:
    pid = os.fork()
    if pid == 0:  # the worker
        code = 0
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            _run_loop(settings, serve(settings, reuse_port=True, worker=worker))
        except SystemExit as exc:
            code = int(exc.code or 0)
        except BaseException:
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _supervise(settings: Settings) -> int:
    configure_logging()
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    workers: dict[int, tuple[int, float]] = {}  # pid -> (worker number, started at)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    for number in range(settings.server.workers):
        workers[_spawn(settings, number)] = (number, time.monotonic())
    log.info("supervisor.started", workers=sorted(workers), listen=settings.server.listen)
    exit_code = 0
    while workers:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        entry = workers.pop(pid, None)
        if entry is None:
            continue
        number, started = entry
        code = os.waitstatus_to_exitcode(status)
        if stopping:
            continue
        log.warning("supervisor.worker_died", pid=pid, exit_code=code)
        if code == 1 and time.monotonic() - started < 2:
            # Died at start (port taken, bad environment): restarting would only loop.
            exit_code = 1
            request_stop(signal.SIGTERM, None)
            continue
        time.sleep(0.5)
        workers[_spawn(settings, number)] = (number, time.monotonic())
    log.info("supervisor.stopped")
    return exit_code
