"""Serving: start the app on the configured address; reload on SIGHUP; drain on SIGTERM / SIGINT.

SIGHUP re-reads the configuration file and swaps routes, policy and identity (`proxy.app.
Reloader`); a bad file is refused and the running configuration kept. SIGTERM drains: the
listener closes, the process reports not ready, held requests are answered `503 shutting_down`
with `Retry-After` (their approvals stay open for the retry), requests being forwarded get up to
`server.drain_seconds` to finish, the audit is flushed, and the process exits 0.

With `server.workers: N > 1`, a supervisor forks N worker processes that all listen on the same
port (SO_REUSEPORT: the kernel spreads connections among them) and share the Redis store. It
forwards SIGTERM/SIGINT/SIGHUP to them and restarts a worker that dies unexpectedly.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

import structlog
from aiohttp import web

from ..app import (
    DRAINING,
    GATE,
    METRICS_KEY,
    RELOADABLE,
    RELOADER,
    StartupError,
    build_app,
    build_redactor,
)
from ..audit.chain import ChainError
from ..audit.signing import SigningKeyError
from ..config import ConfigError, Settings, load_settings
from ..front.message import Incoming
from ..front.server import FrontLimits, FrontServer
from ..logs import configure_logging
from ..policy import Policy
from ..routing import RouteTable
from .internal import ADMIN_SERVER
from .keys import PROXY
from .metrics import Metrics, multiprocess_directory, worker_exited
from .parse_errors import use_json_parse_errors

log = structlog.get_logger("countersign")
# What a held request answered `503 shutting_down` at SIGTERM is told to wait before retrying.
DRAIN_RETRY_AFTER_SECONDS = 5


class Serving:
    """What `start` started: the front on the public port (proxied traffic, with control-plane
    requests handed to the app's aiohttp server) and the app's runner."""

    def __init__(self, app: web.Application, runner: web.AppRunner, front: FrontServer) -> None:
        self.app = app
        self.runner = runner
        self.front = front

    async def stop_listening(self) -> None:
        await self.front.stop_listening()

    async def cleanup(self, drain_seconds: float = 0.0) -> None:
        """Let requests in progress finish for up to `drain_seconds`, then close everything
        (the app's parts last: the audit is flushed)."""
        await self.front.shutdown(drain_seconds)
        await self.runner.cleanup()


async def start(
    settings: Settings,
    app: web.Application | None = None,
    *,
    reuse_port: bool = False,
    worker: int | None = None,
) -> Serving:
    """Start serving `settings.server.listen`; the caller owns what is returned."""
    app = app if app is not None else build_app(settings, worker=worker)
    server = settings.server
    # handler_cancellation: a client that hangs up on a control-plane request stops it.
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        # On SIGTERM, control-plane requests in progress get this long to finish.
        shutdown_timeout=server.drain_seconds,
        handler_cancellation=True,
        max_line_size=server.max_header_bytes,
        max_field_size=server.max_header_bytes,
        # A compressed request body passes as the client sent it, with its Content-Encoding.
        auto_decompress=False,
    )
    await runner.setup()  # runs the app's start-up (store, audit, approvals, notifiers)
    assert runner.server is not None
    use_json_parse_errors(runner.server)

    request_path = app[PROXY]

    def handle(incoming: Incoming) -> Awaitable[None]:
        # Looked up per request: a reload (SIGHUP) swaps the request path in force.
        return request_path.get().handle(incoming)

    front = FrontServer(
        handle,
        limits=FrontLimits(
            header_timeout=server.header_timeout_seconds,
            idle_timeout=server.idle_timeout_seconds,
            max_header_bytes=server.max_header_bytes,
            max_connections=connection_cap(server.max_connections),
            max_body_bytes=server.max_body_bytes,
            body_timeout=server.body_timeout_seconds,
        ),
        control=runner.server,
    )
    try:
        await front.start(server.host, server.port, reuse_port=reuse_port, backlog=4096)
    except BaseException:
        await runner.cleanup()
        raise
    _export_front_metrics(app[METRICS_KEY], front)
    if ADMIN_SERVER in app:  # `server.admin_listen`: health and metrics, after the public port
        await app[ADMIN_SERVER].start(reuse_port=reuse_port)
    return Serving(app, runner, front)


def _export_front_metrics(metrics: Metrics, front: FrontServer) -> None:
    """The front counts in plain integers (nothing on its hot path); they are copied into
    Prometheus before each scrape, and every second (so that, with several workers, a scrape
    of one shows the others' too)."""

    def export() -> None:
        stats = front.stats
        metrics.front(
            front.connections,
            {
                "header_timeout": stats.head_timeouts,
                "body_timeout": stats.body_timeouts,
                "idle_timeout": stats.idle_closes,
                "max_connections": stats.refused,
                "header_too_large": stats.heads_too_large,
                "invalid_request": stats.parse_errors,
            },
        )

    loop = asyncio.get_running_loop()

    def every_second() -> None:
        export()
        if front.listening:
            loop.call_later(1.0, every_second)

    metrics.before_render.append(export)
    loop.call_later(1.0, every_second)


# File descriptors kept for what is not a client connection: upstream connections (the pool
# holds at most 1,000), Redis, the audit files, the listeners.
_NON_CLIENT_FDS = 1_100


def connection_cap(configured: int) -> int:
    """`server.max_connections`, within what the open-file limit allows.

    The soft limit is raised to the hard one first (as Go's runtime and nginx's
    `worker_rlimit_nofile` do): 1,024 descriptors, a common soft default, would let a thousand
    idle connections starve everyone else with `EMFILE` on accept. Where even the hard limit is
    too low for the configured cap, the cap is lowered, so that the front refuses connections
    cleanly (503) before the kernel refuses file descriptors, and a warning says so."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            wanted = configured + _NON_CLIENT_FDS
            target = wanted if hard == resource.RLIM_INFINITY else min(hard, max(wanted, soft))
            if target > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
    except (ValueError, OSError):  # not allowed here: keep what there is
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    allowed = max(soft - _NON_CLIENT_FDS, soft // 2)
    if configured > allowed:
        log.warning(
            "server.max_connections_lowered",
            configured=configured,
            effective=allowed,
            open_file_limit=soft,
            hint="raise the open-file limit (ulimit -n, LimitNOFILE=, or the container's "
            "nofile ulimit) to serve more connections",
        )
        return allowed
    return configured


async def serve(
    settings: Settings,
    *,
    reuse_port: bool = False,
    worker: int | None = None,
    config_path: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain; reload `config_path` on SIGHUP."""
    # One redactor for logs and every other channel: a reload adds its new secrets to it.
    redactor = build_redactor(settings)
    configure_logging(redactor=redactor)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    serving: list[web.Application] = []  # the app, once it has started
    reloads: set[asyncio.Task[bool]] = set()

    def on_hangup() -> None:
        if config_path is None or not serving or RELOADER not in serving[0]:
            reason = "no configuration file known" if config_path is None else "not serving yet"
            log.warning("config.reload_ignored", reason=reason, pid=os.getpid())
            return
        task = loop.create_task(serving[0][RELOADER].reload(config_path))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        app = build_app(settings, worker=worker, redactor=redactor)
    except (ChainError, OSError, SigningKeyError) as exc:
        # E.g. the audit file's last line is not a sound chain line: continuing would hide
        # tampering, so refuse to start and say why. Or audit.signing_key is not a usable key.
        log.error("server.start_failed", error=str(exc))
        sys.exit(1)
    try:
        serving_parts = await start(settings, app, reuse_port=reuse_port)
    except OSError as exc:
        log.error("server.listen_failed", listen=settings.server.listen, error=str(exc))
        sys.exit(1)
    except StartupError as exc:
        log.error("server.start_failed", error=str(exc))
        sys.exit(1)
    serving.append(app)
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
        log.info("server.stopping", pid=os.getpid(), drain_seconds=settings.server.drain_seconds)
        for task in reloads:
            task.cancel()
        await drain(app, serving_parts, settings.server.drain_seconds)
        log.info("server.stopped", pid=os.getpid())


async def drain(app: web.Application, serving: Serving, drain_seconds: float) -> None:
    """Stop taking work and finish what is running: close the listener, report not ready,
    answer held requests `503 shutting_down` (their approvals stay open, for a retry to join,
    on another replica with a shared store), give requests being forwarded up to
    `server.drain_seconds`, then close every part (the audit is flushed)."""
    app[DRAINING].set()  # readyz answers 503 from now on (the app's Readiness reads it)
    await serving.stop_listening()
    app[GATE].drain(retry_after=DRAIN_RETRY_AFTER_SECONDS)
    await serving.cleanup(drain_seconds)


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


def run(settings: Settings, config_path: str | None = None) -> int:
    """`countersign run`: one process, or a supervisor of `server.workers` processes.

    `config_path`: the file SIGHUP reloads (without it, SIGHUP is logged and ignored). The
    process id goes to `server.pid_file` when set (for `countersign reload`), removed at exit.
    """
    # Until the handlers are in place, a SIGHUP must not end the process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    with _pid_file(settings.server.pid_file):
        if settings.server.workers <= 1:
            _run_loop(settings, serve(settings, config_path=config_path))
            return 0
        # One metrics view across workers: their values go to files in a fresh directory.
        with multiprocess_directory():
            return _supervise(settings, config_path)


@contextlib.contextmanager
def _pid_file(path: str | None) -> Iterator[None]:
    """Write this process's id to `path` for the duration; remove it after, if still ours."""
    if path is None:
        yield
        return
    pid = str(os.getpid())
    try:
        with open(path, "w", encoding="ascii") as file:
            file.write(pid + "\n")
    except OSError as exc:
        log.error("server.pid_file_failed", pid_file=path, error=str(exc))
        sys.exit(1)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            with open(path, encoding="ascii") as file:
                ours = file.read().strip() == pid
            if ours and os.getpid() == int(pid):
                os.remove(path)


def _run_loop(settings: Settings, main: Coroutine[Any, Any, None]) -> None:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if settings.server.event_loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def _spawn(settings: Settings, worker: int, config_path: str | None = None) -> int:
    pid = os.fork()
    if pid == 0:  # the worker
        code = 0
        try:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # Not the supervisor's forwarding handler; `serve` installs the worker's own.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
            serving = serve(settings, reuse_port=True, worker=worker, config_path=config_path)
            _run_loop(settings, serving)
        except SystemExit as exc:
            code = int(exc.code or 0)
        except BaseException:
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _supervise(settings: Settings, config_path: str | None = None) -> int:
    configure_logging()
    stopping = False

    def forward_hangup(signum: int, _frame: object) -> None:
        """Each worker reloads itself; the supervisor keeps the reloaded sections too, so that
        a worker it restarts later starts from them."""
        nonlocal settings
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        log.info("supervisor.reload_forwarded", workers=sorted(workers))
        if config_path is None:
            return
        try:
            new = load_settings(config_path)
            Policy.compile(new.policy)
            RouteTable(new.routes)
        except (ConfigError, ValueError, TypeError):
            return  # the workers log and audit why they refused it
        settings = settings.model_copy(update={name: getattr(new, name) for name in RELOADABLE})

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(workers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    workers: dict[int, tuple[int, float]] = {}  # pid -> (worker number, started at)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGHUP, forward_hangup)
    for number in range(settings.server.workers):
        workers[_spawn(settings, number, config_path)] = (number, time.monotonic())
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
        worker_exited(pid)
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
        workers[_spawn(settings, number, config_path)] = (number, time.monotonic())
    log.info("supervisor.stopped")
    return exit_code
