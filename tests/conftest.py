"""Shared pytest fixtures."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import build_app
from proxy.audit import AuditLog
from proxy.config import Settings
from proxy.store.base import Store
from proxy.store.memory import MemoryStore
from proxy.store.redis import RedisStore
from tests.helpers import ListSink, settings_for
from tests.idp_fixture import DEFAULT_CLIENTS, TestIdP, start_idp
from tests.redis_fixture import RedisServer
from tests.upstream import upstream_app

Client = TestClient[web.Request, web.Application]
Factory = Callable[..., Awaitable[tuple[Client, ListSink]]]


@pytest.fixture(scope="session")
def idp() -> Iterator[TestIdP]:
    """A real OpenID Connect provider (oidc-provider on Node.js) with DEFAULT_CLIENTS.

    Shared by the whole session: don't rotate its keys; use ``start_idp`` for that.
    """
    server = start_idp(DEFAULT_CLIENTS)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    """A real upstream HTTP server on loopback (see tests/upstream.py)."""
    server = TestServer(upstream_app())
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def make_proxy(upstream: TestServer) -> AsyncIterator[Factory]:
    """Start the real proxy app in process; returns (client, audit sink)."""
    clients: list[Client] = []

    async def factory(settings: Settings | None = None, **kwargs: Any) -> tuple[Client, ListSink]:
        sink = ListSink()
        settings = settings or settings_for(str(upstream.make_url("/")), **kwargs)
        server = TestServer(
            build_app(settings, audit_log=AuditLog([sink])), handler_cancellation=True
        )
        client = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client, sink

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free port, shared by the session; tests isolate themselves by
    key prefix. Tests that stop it must restart it (`redis_server.restart()`)."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def fresh_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """The session's redis-server, guaranteed running before and after the test."""
    if redis_server.proc is None:
        redis_server.start()
    yield redis_server
    if redis_server.proc is None:
        redis_server.start()


@pytest.fixture(params=["memory", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """The memory store, then a Redis store on a fresh redis-server (a test module with a
    `store` of its own, as the store conformance suites have, uses that one)."""
    if request.param == "memory":
        memory = MemoryStore()
        yield memory
        await memory.aclose()
        return
    server: RedisServer = request.getfixturevalue("fresh_redis")
    redis = RedisStore(server.url, key_prefix="test-" + secrets.token_hex(6))
    yield redis
    await redis.aclose()
