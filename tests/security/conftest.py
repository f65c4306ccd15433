"""Shared pieces of the adversarial tests: a recording upstream, one config builder, helpers.

Every test runs the real `countersign run` process (tests/e2e/conftest.py) against the real test
IdP (tests/conftest.py, session fixture `idp`) and a *recording* upstream: a loopback aiohttp
server that keeps every request it receives (method, raw target, headers, body bytes). A test
asserts what the client sees and, through the recording, that nothing unapproved ran upstream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from yarl import URL

from proxy.authn.apikeys import key_digest
from tests.e2e import conftest as e2e
from tests.e2e.conftest import Process as Process
from tests.e2e.conftest import free_port
from tests.idp_fixture import TestIdP

# The e2e fixture that starts `countersign run` (stopped at the end of each test).
run_countersign = e2e.run_countersign

API = "/_countersign/api/approvals"
StartFn = Callable[[str, int], Process]
Headers = dict[str, str]

#: Everything a test waits for is bounded by this (seconds).
WAIT = 10.0


# ------------------------------------------------------------------------------------------------
# The recording upstream (also used as a webhook receiver)


@dataclass(frozen=True)
class Seen:
    """One request as the recording server received it."""

    method: str
    target: str  # raw path + query, byte for byte as sent on the request line
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]

    def json(self) -> Any:
        return json.loads(self.body)


class Recorder:
    """A loopback HTTP server that appends every request to `requests` and answers
    `200 {"ok": true}`."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._record)
        self.server = TestServer(app, host="127.0.0.1")

    async def start(self) -> None:
        # The bytes as sent: a compressed body is recorded compressed.
        await self.server.start_server(auto_decompress=False)

    async def _record(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.raw_headers
        )
        self.requests.append(Seen(request.method, request.raw_path, headers, body))
        return web.json_response({"ok": True})

    @property
    def url(self) -> str:
        return str(self.server.make_url("/"))

    async def wait_for(self, count: int, within: float = WAIT) -> list[Seen]:
        """At least `count` requests, waiting up to `within` seconds for them."""
        deadline = time.monotonic() + within
        while len(self.requests) < count:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"expected {count} request(s), got {len(self.requests)}: {self.requests}"
                )
            await asyncio.sleep(0.05)
        return list(self.requests)


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    """The upstream of route `cloud`: records what reached it."""
    rec = Recorder()
    await rec.start()
    yield rec
    await rec.server.close()


@pytest.fixture
async def webhook_receiver() -> AsyncIterator[Recorder]:
    """A second recording server, for `notify.webhooks`."""
    rec = Recorder()
    await rec.start()
    yield rec
    await rec.server.close()


# ------------------------------------------------------------------------------------------------
# Credentials


@dataclass(frozen=True)
class ApiKey:
    """A Countersign API key and its `identity.api_keys` config line."""

    key: str
    subject: str
    groups: tuple[str, ...] = ()
    email: str | None = None
    owner: str | None = None

    def entry(self) -> dict[str, Any]:
        line: dict[str, Any] = {"sha256": key_digest(self.key), "subject": self.subject}
        if self.groups:
            line["groups"] = list(self.groups)
        if self.email is not None:
            line["email"] = self.email
        if self.owner is not None:
            line["owner"] = self.owner
        return line

    @property
    def headers(self) -> Headers:
        return {"Authorization": f"Bearer {self.key}"}


class Tokens:
    """Bearer headers from the test IdP (client credentials), cached per client and owner."""

    def __init__(self, idp: TestIdP) -> None:
        self.idp = idp
        self._cache: dict[tuple[str, str | None], str] = {}

    async def __call__(self, client_id: str, *, act_for: str | None = None) -> Headers:
        key = (client_id, act_for)
        if key not in self._cache:
            self._cache[key] = await self.idp.token(client_id, act_for=act_for)
        return {"Authorization": f"Bearer {self._cache[key]}"}

    async def fresh(self, client_id: str, *, act_for: str | None = None) -> Headers:
        """A newly minted token (another jti) for the same client and owner."""
        return {"Authorization": f"Bearer {await self.idp.token(client_id, act_for=act_for)}"}


@pytest.fixture
def tokens(idp: TestIdP) -> Tokens:
    return Tokens(idp)


# ------------------------------------------------------------------------------------------------
# Configuration


def config(
    *,
    port: int,
    upstream: str,
    issuer: str,
    mode: str = "hold",
    timeout_seconds: int = 30,
    claim_seconds: int | None = None,
    max_pending_per_identity: int | None = None,
    max_held_bytes: int | None = None,
    max_body_bytes: int = 64 * 1024,
    api_keys: Iterable[ApiKey] = (),
    webhooks: Iterable[Mapping[str, str]] = (),
    trusted_proxies: Iterable[str] = (),
    extra_routes: Iterable[Mapping[str, Any]] = (),
    extra_rules: Iterable[Mapping[str, Any]] = (),
) -> str:
    """The one config of these tests: route `cloud` (`/cloud/` → `upstream`), reads allowed,
    `exports` (POST /cloud/exports/** by group agents) and `iam` (POST /cloud/iam/**, quorum 2)
    approved by group data-owners. `extra_routes` are added after `cloud`, `extra_rules` before
    the others (first match wins); `{upstream}` in a route's upstream is the recorder's URL."""
    approvals: dict[str, Any] = {"mode": mode, "timeout_seconds": timeout_seconds}
    if claim_seconds is not None:
        approvals["claim_seconds"] = claim_seconds
    if max_pending_per_identity is not None:
        approvals["max_pending_per_identity"] = max_pending_per_identity
    if max_held_bytes is not None:
        approvals["max_held_bytes"] = max_held_bytes
    doc: dict[str, Any] = {
        "server": {
            "listen": f"127.0.0.1:{port}",
            "max_body_bytes": max_body_bytes,
            "trusted_proxies": list(trusted_proxies),
        },
        "identity": {
            "issuers": [{"issuer": issuer, "audiences": ["countersign"]}],
            "api_keys": [key.entry() for key in api_keys],
        },
        "routes": [
            {"name": "cloud", "prefix": "/cloud/", "upstream": upstream},
            *(
                {**route, "upstream": str(route["upstream"]).format(upstream=upstream.rstrip("/"))}
                for route in extra_routes
            ),
        ],
        "approvals": approvals,
        "policy": {
            "default": "deny",
            "rules": [
                *(dict(rule) for rule in extra_rules),
                {"name": "reads", "methods": ["GET", "HEAD"], "action": "allow"},
                {
                    "name": "exports",
                    "route": "cloud",
                    "methods": ["POST"],
                    "paths": ["/cloud/exports/**"],
                    "when": {"groups": ["agents"]},
                    "action": "approve",
                    "approvers": {"groups": ["data-owners"]},
                },
                {
                    "name": "iam",
                    "route": "cloud",
                    "methods": ["POST"],
                    "paths": ["/cloud/iam/**"],
                    "action": "approve",
                    "approvers": {"groups": ["data-owners"]},
                    "quorum": 2,
                },
            ],
        },
    }
    hooks = [dict(h) for h in webhooks]
    if hooks:
        doc["notify"] = {"webhooks": hooks}
    return str(yaml.safe_dump(doc, sort_keys=False))


StartProxy = Callable[..., Process]


@pytest.fixture
def start_proxy(run_countersign: StartFn, recorder: Recorder, idp: TestIdP) -> StartProxy:
    """`start_proxy(**config_options)`: a running `countersign run` in front of `recorder`."""

    def start(**options: Any) -> Process:
        port = free_port()
        text = config(port=port, upstream=recorder.url, issuer=idp.issuer, **options)
        return run_countersign(text, port)

    return start


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as s:
        yield s


# ------------------------------------------------------------------------------------------------
# Requests


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes
    _json: Any = field(default=None, repr=False)

    def json(self) -> Any:
        if self._json is None:
            self._json = json.loads(self.body)
        return self._json

    @property
    def code(self) -> str | None:
        """The error code of a Countersign error answer, else None."""
        try:
            data = self.json()
        except ValueError:
            return None
        error = data.get("error") if isinstance(data, dict) else None
        return error.get("code") if isinstance(error, dict) else None

    def __str__(self) -> str:
        return f"{self.status} {self.body[:500]!r}"


async def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
) -> Reply:
    """One request; `url` is sent as written (no re-encoding, no reordering of the query)."""
    async with session.request(
        method, URL(url, encoded=True), headers=dict(headers or {}), data=data
    ) as resp:
        body = await resp.read()
        return Reply(resp.status, dict(resp.headers), body)


def start(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
) -> asyncio.Task[Reply]:
    """`send` in the background (a request held for approval)."""
    return asyncio.create_task(send(session, method, url, headers=headers, data=data))


def jbody(value: Any) -> bytes:
    return json.dumps(value).encode()


JSON = {"Content-Type": "application/json"}
ASYNC = {"Prefer": "respond-async"}


# ------------------------------------------------------------------------------------------------
# The approvals API


async def list_approvals(
    session: aiohttp.ClientSession, base: str, who: Headers, state: str | None = "pending"
) -> list[dict[str, Any]]:
    query = f"?state={state}" if state else ""
    reply = await send(session, "GET", f"{base}{API}{query}", headers=who)
    assert reply.status == 200, str(reply)
    approvals: list[dict[str, Any]] = reply.json()["approvals"]
    return approvals


async def wait_pending(
    session: aiohttp.ClientSession, base: str, who: Headers, count: int = 1
) -> list[dict[str, Any]]:
    """The pending approvals `who` may see, once there are at least `count` of them."""
    deadline = time.monotonic() + WAIT
    while True:
        approvals = await list_approvals(session, base, who)
        if len(approvals) >= count:
            return approvals
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} pending approval(s), got {approvals}")
        await asyncio.sleep(0.05)


async def get_approval(
    session: aiohttp.ClientSession, base: str, who: Headers, approval_id: str
) -> dict[str, Any]:
    reply = await send(session, "GET", f"{base}{API}/{approval_id}", headers=who)
    assert reply.status == 200, str(reply)
    shown: dict[str, Any] = reply.json()
    return shown


async def decide(
    session: aiohttp.ClientSession,
    base: str,
    approval_id: str,
    who: Headers,
    verdict: str,
    reason: str | None = None,
) -> Reply:
    payload: dict[str, Any] = {"verdict": verdict}
    if reason is not None:
        payload["reason"] = reason
    return await send(
        session,
        "POST",
        f"{base}{API}/{approval_id}/decision",
        headers={**who, **JSON},
        data=jbody(payload),
    )


# ------------------------------------------------------------------------------------------------
# Audit (the process's stdout)


def audit_events(proc: Process) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stdout().splitlines() if line.startswith("{")]


async def wait_audit(
    proc: Process, event: str, within: float = WAIT, **match: Any
) -> dict[str, Any]:
    """The first audit event named `event` whose fields equal `match`, waiting for it."""
    deadline = time.monotonic() + within
    while True:
        for e in audit_events(proc):
            if e.get("event") == event and all(e.get(k) == v for k, v in match.items()):
                return e
        if time.monotonic() > deadline:
            names = [e.get("event") for e in audit_events(proc)]
            raise AssertionError(f"no audit event {event} {match}; saw {names}")
        await asyncio.sleep(0.05)
