"""The one wiring point: builds every part from `Settings` and owns their lifecycles.

Nothing else chooses concrete classes. authn, policy, routing and forward never import each
other; the server handler receives them ready-made.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from .approvals.service import ApprovalService
from .audit import AuditLog, StreamSink, null_audit
from .authn import Authenticator
from .authn.apikeys import ApiKeyAuthenticator
from .authn.oidc import OIDCVerifier
from .config import Settings
from .forward import Forwarder
from .policy import Policy
from .routing import RouteTable
from .server.api import api_routes
from .server.gate import ApprovalGate
from .server.internal import internal_routes
from .server.metrics import Metrics
from .server.proxy_handler import ProxyHandler
from .store.base import Store
from .store.memory import MemoryStore

SETTINGS_KEY = web.AppKey("settings", Settings)
AUDIT_KEY = web.AppKey("audit", AuditLog)


def build_audit(settings: Settings) -> AuditLog:
    import sys

    if not settings.audit.stdout:
        return null_audit()
    return AuditLog([StreamSink(sys.stdout)])


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
    )


def build_app(settings: Settings, *, audit_log: AuditLog | None = None) -> web.Application:
    """An aiohttp application serving the proxy for `settings`.

    Parts that need a running loop (the upstream connection pool) are created on startup and
    closed on cleanup.
    """
    audit_log = audit_log if audit_log is not None else build_audit(settings)
    policy = Policy.compile(settings.policy)  # compiled once; errors surface before serving
    routes = RouteTable(settings.routes)
    metrics = Metrics()
    # client_max_size bounds only bodies the proxy itself reads (API calls); proxied bodies
    # are streamed and never read whole.
    app = web.Application(client_max_size=settings.server.max_body_bytes)
    app[SETTINGS_KEY] = settings
    app[AUDIT_KEY] = audit_log
    store = build_store(settings)
    approvals = ApprovalService(store, settings.approvals, audit_log)
    gate = ApprovalGate(approvals, settings.server.max_body_bytes)
    # Parts that need the running loop are made on startup; handlers find them here.
    holder: dict[str, Any] = {}

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        forwarder = Forwarder(
            connect_timeout=settings.server.upstream_connect_timeout_seconds,
            read_timeout=settings.server.upstream_timeout_seconds,
        )
        oidc = OIDCVerifier(
            settings.identity.issuers,
            settings.identity.claims,
            forwarder.session,
            cache_size=settings.identity.token_cache_size,
            refresh_cooldown=settings.identity.jwks_refresh_cooldown_seconds,
        )
        authenticator = Authenticator(ApiKeyAuthenticator(settings.identity.api_keys), oidc)
        holder["authenticator"] = authenticator
        holder["proxy"] = ProxyHandler(
            server=settings.server,
            authenticator=authenticator,
            routes=routes,
            policy=policy,
            forwarder=forwarder,
            audit_log=audit_log,
            metrics=metrics,
            gate=gate,
        )
        warm_up = asyncio.create_task(oidc.prefetch())
        approvals.start()
        try:
            yield
        finally:
            warm_up.cancel()
            await approvals.aclose()
            await store.aclose()
            await forwarder.aclose()
            await audit_log.aclose()

    async def proxy(request: web.Request) -> web.StreamResponse:
        handler: ProxyHandler = holder["proxy"]
        return await handler.handle(request)

    app.cleanup_ctx.append(lifecycle)

    async def ready() -> dict[str, bool]:
        try:
            store_ok = await asyncio.wait_for(store.ping(), 2)
        except Exception:
            store_ok = False
        return {"proxy": "proxy" in holder, "store": store_ok}

    app.router.add_routes(internal_routes(metrics, ready=ready))
    app.router.add_routes(api_routes(lambda: holder["authenticator"], approvals))
    # [\s\S] and not ".": a decoded path may hold a newline, and such a request must still reach
    # the proxy handler to be refused with a clear 400 rather than aiohttp's plain-text 404.
    app.router.add_route("*", r"/{tail:[\s\S]*}", proxy)
    return app
