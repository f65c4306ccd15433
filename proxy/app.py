"""The one wiring point: builds every part from `Settings` and owns their lifecycles.

Nothing else chooses concrete classes. authn, policy, routing and forward never import each
other; the server handler receives them ready-made.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from .approvals.service import ApprovalService
from .audit import AuditLog, Sink, StreamSink
from .audit.file_sink import ChainedFileSink
from .audit.redact import Redactor
from .authn import Authenticator, SigV4Verifier
from .authn.apikeys import ApiKeyAuthenticator
from .authn.oidc import OIDCVerifier
from .aws_resign import AwsUpstreamSigner
from .config import Settings
from .forward import Forwarder
from .notify import NotifyHub
from .notify.webhook import WebhookNotifier
from .policy import Policy
from .routing import RouteTable
from .server.api import api_routes
from .server.errors_middleware import json_errors
from .server.gate import ApprovalGate
from .server.internal import internal_routes
from .server.keys import AUTHENTICATOR, PROXY, SLACK_ACTIONS
from .server.metrics import Metrics
from .server.proxy_handler import ProxyHandler
from .store.base import Store
from .store.memory import MemoryStore


class StartupError(RuntimeError):
    """A part the configuration names cannot be made to work (e.g. no AWS credentials)."""


SETTINGS_KEY = web.AppKey("settings", Settings)
AUDIT_KEY = web.AppKey("audit", AuditLog)


def build_redactor(settings: Settings) -> Redactor:
    """Redaction rules, plus every secret value the configuration itself holds."""
    known = [value for route in settings.routes for value in route.inject_headers.values()]
    # Header values like "Bearer abc": the credential part alone must go too.
    known += [part for value in list(known) for part in value.split()[1:]]
    slack = settings.notify.slack
    if slack is not None:
        known += [s for s in (slack.bot_token, slack.signing_secret, slack.app_token) if s]
    known += [w.secret for w in settings.notify.webhooks if w.secret]
    for url in (settings.store.url, settings.audit.redis_url):
        password = urlsplit(url).password if url else None
        if password:
            known.append(password)
    return Redactor(
        extra_patterns=settings.audit.redact.patterns,
        extra_fields=settings.audit.redact.fields,
        known_secrets=known,
    )


def build_audit(
    settings: Settings, redactor: Redactor | None = None, *, worker: int | None = None
) -> AuditLog:
    """The configured sinks. Opening the chained file reads its tail: call at start-up."""
    audit = settings.audit
    sinks: list[Sink] = []
    if audit.stdout:
        sinks.append(StreamSink(sys.stdout))
    if audit.file:
        path = Path(audit.file)
        if worker is not None:
            # One chain per worker process: a chain has exactly one writer.
            path = path.with_name(f"{path.stem}.worker-{worker}{path.suffix}")
        file_sink = ChainedFileSink(
            path,
            commit_interval=audit.commit_interval_ms / 1000,
            commit_lines=audit.commit_max_events,
            max_bytes=audit.file_max_bytes,
        )
        file_sink.open()
        sinks.append(file_sink)
    if audit.redis_stream:
        from .audit.redis_stream import RedisStreamSink

        url = audit.redis_url or settings.store.url
        sinks.append(RedisStreamSink(url, audit.redis_stream, maxlen=audit.redis_stream_maxlen))
    return AuditLog(sinks, redactor or build_redactor(settings))


def build_store(settings: Settings) -> Store:
    store = settings.store
    if store.url == "memory://":
        return MemoryStore(retention_seconds=store.retention_seconds)
    from .store.redis import RedisStore  # only deployments with Redis import redis-py

    return RedisStore(
        store.url,
        key_prefix=store.key_prefix,
        retention_seconds=store.retention_seconds,
        timeout_seconds=store.timeout_seconds,
        max_connections=store.max_connections,
    )


async def start_slack(
    settings: Settings,
    approvals: ApprovalService,
    store: Store,
    notify: NotifyHub,
    session: aiohttp.ClientSession,
    app: web.Application,
) -> list[Any]:
    """The Slack notifier and interaction handlers, when `notify.slack` has a bot token.

    Returns the parts to close on shutdown."""
    slack = settings.notify.slack
    if slack is None or not slack.bot_token:
        return []
    from slack_sdk.web.async_client import AsyncWebClient

    from .notify.slack import SlackNotifier
    from .server.slack_actions import SlackActions

    # retry_handlers=[]: our own backoff (notify/slack.py) decides what is retried and how long.
    client = AsyncWebClient(
        token=slack.bot_token, base_url=slack.api_url, session=session, retry_handlers=[]
    )
    if slack.channel:
        notify.add(
            SlackNotifier(
                client,
                slack.channel,
                store,
                public_url=settings.server.public_url,
                redactor=approvals.redactor,
            )
        )
    actions = SlackActions(client, approvals, settings.approvals.groups)
    app[SLACK_ACTIONS] = actions
    parts: list[Any] = [actions]
    if slack.app_token:
        from .server.slack_socket import SlackSocket

        socket = SlackSocket(slack.app_token, client, actions)
        socket.start()
        parts.insert(0, socket)
    return parts


def check_buildable(settings: Settings) -> list[str]:
    """Build what `run` builds before it serves, without opening sockets or sinks and without an
    event loop: an error `run` would hit at start-up is raised here, so `countersign check`
    finds it. Returns problems that are not errors of the configuration itself but would stop
    `run` on this machine (the audit file's directory, its last line)."""
    build_app(settings, audit_log=AuditLog([]))
    problems: list[str] = []
    if settings.audit.file:
        path = Path(settings.audit.file)
        directory = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
        if directory is None or not os.access(directory, os.W_OK):
            problems.append(f"audit.file: cannot create or write {path}")
        elif path.exists():
            from .audit.chain import ChainError, last_head_of

            try:
                last_head_of(path)
            except (ChainError, OSError) as exc:
                problems.append(f"audit.file: {exc}")
    return problems


def build_app(
    settings: Settings, *, audit_log: AuditLog | None = None, worker: int | None = None
) -> web.Application:
    """An aiohttp application serving the proxy for `settings`.

    Parts that need a running loop (the upstream connection pool) are created on startup and
    closed on cleanup.
    """
    redactor = build_redactor(settings)
    if audit_log is None:
        audit_log = build_audit(settings, redactor, worker=worker)
    policy = Policy.compile(settings.policy)  # compiled once; errors surface before serving
    routes = RouteTable(settings.routes)
    metrics = Metrics()
    # client_max_size bounds only bodies the proxy itself reads (API calls); proxied bodies
    # are streamed and never read whole.
    app = web.Application(client_max_size=settings.server.max_body_bytes, middlewares=[json_errors])
    app[SETTINGS_KEY] = settings
    app[AUDIT_KEY] = audit_log
    store = build_store(settings)
    notify = NotifyHub()
    approvals = ApprovalService(
        store, settings.approvals, audit_log, redactor=redactor, notify=notify
    )
    gate = ApprovalGate(
        approvals, settings.server.max_body_bytes, settings.approvals.max_held_bytes
    )

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # AWS routes sign what they forward with real credentials, found before serving (and
        # before anything that would need closing): a route that could never sign is a startup
        # error, not a 502 on the first request.
        signers = {
            route.name: AwsUpstreamSigner(route.aws) for route in settings.routes if route.aws
        }
        for name, signer in signers.items():
            try:
                await signer.start()
            except RuntimeError as exc:
                raise StartupError(f"route {name}: {exc}") from None
        forwarder = Forwarder(
            connect_timeout=settings.server.upstream_connect_timeout_seconds,
            read_timeout=settings.server.upstream_timeout_seconds,
        )
        # Discovery, JWKS, webhooks and Slack share one general-purpose client; proxied traffic
        # has its own lean one (the forwarder).
        session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        oidc = OIDCVerifier(
            settings.identity.issuers,
            settings.identity.claims,
            session,
            cache_size=settings.identity.token_cache_size,
            refresh_cooldown=settings.identity.jwks_refresh_cooldown_seconds,
        )
        authenticator = Authenticator(
            ApiKeyAuthenticator(settings.identity.api_keys),
            oidc,
            SigV4Verifier(settings.identity.aws_keys),
        )
        app[AUTHENTICATOR] = authenticator
        app[PROXY] = ProxyHandler(
            server=settings.server,
            authenticator=authenticator,
            routes=routes,
            policy=policy,
            forwarder=forwarder,
            audit_log=audit_log,
            metrics=metrics,
            gate=gate,
            signers=signers,
        )
        for hook in settings.notify.webhooks:
            notify.add(
                WebhookNotifier(
                    hook.url,
                    hook.secret,
                    session,
                    redactor,
                    public_url=settings.server.public_url,
                )
            )
        slack = await start_slack(settings, approvals, store, notify, session, app)
        warm_up = asyncio.create_task(oidc.prefetch())
        approvals.start()
        try:
            yield
        finally:
            warm_up.cancel()
            for part in slack:
                await part.aclose()
            await approvals.aclose()
            await notify.aclose()
            await session.close()
            await store.aclose()
            await forwarder.aclose()
            await audit_log.aclose()

    async def proxy(request: web.Request) -> web.StreamResponse:
        return await request.app[PROXY].handle(request)

    app.cleanup_ctx.append(lifecycle)

    async def ready() -> dict[str, bool]:
        try:
            store_ok = await asyncio.wait_for(store.ping(), 2)
        except Exception:
            store_ok = False
        return {"proxy": PROXY in app, "store": store_ok}

    app.router.add_routes(internal_routes(metrics, ready=ready))
    app.router.add_routes(api_routes(approvals))
    slack_settings = settings.notify.slack
    if slack_settings is not None and slack_settings.signing_secret:
        from .server.slack import slack_routes

        app.router.add_routes(slack_routes(slack_settings.signing_secret))
    # [\s\S] and not ".": a decoded path may hold a newline, and such a request must still reach
    # the proxy handler to be refused with a clear 400 rather than aiohttp's plain-text 404.
    app.router.add_route("*", r"/{tail:[\s\S]*}", proxy)
    return app
