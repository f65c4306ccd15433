"""Attack: crash or confuse authentication with malformed bearer tokens.

Every malformed credential is a plain `401 unauthorized` with `WWW-Authenticate` (DESIGN §1.2),
audited as a `request.completed` with that error, never a 500 or a traceback, and nothing
reaches the upstream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import aiohttp
import pytest

from tests.idp_fixture import TestIdP
from tests.security.conftest import (
    API,
    JSON,
    Process,
    Recorder,
    StartProxy,
    Tokens,
    audit_events,
    send,
    wait_audit,
)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_with_header(header: Any, issuer: str) -> str:
    """A token for `issuer` whose header is `header` (any JSON), with a signature of junk."""
    now = int(time.time())
    payload = {
        "iss": issuer,
        "sub": "agent-7",
        "aud": "countersign",
        "iat": now,
        "exp": now + 600,
        "groups": ["agents"],
    }
    return ".".join(
        (b64(json.dumps(header).encode()), b64(json.dumps(payload).encode()), b64(b"x" * 256))
    )


HEADERS: dict[str, Any] = {
    "kid-int": {"alg": "RS256", "kid": 123},
    "kid-list": {"alg": "RS256", "kid": ["a"]},
    "kid-object": {"alg": "RS256", "kid": {"a": 1}},
    "crit-exp": {"alg": "RS256", "crit": ["exp"]},
    "crit-string": {"alg": "RS256", "crit": "x"},
    "crit-empty": {"alg": "RS256", "crit": []},
    "alg-int": {"alg": 123},
    "alg-none": {"alg": "none"},
    "alg-hs256": {"alg": "HS256"},
    "alg-missing": {"typ": "JWT"},
    "header-list": ["RS256"],
    "header-null": None,
    "jku": {"alg": "RS256", "jku": "http://127.0.0.1:9/jwks", "kid": "evil"},
}

RAW: dict[str, str] = {
    "not-base64": "%%%.^^^.***",
    "three-dots": "eyJhbGciOiJSUzI1NiJ9.e30.c2ln.extra",
    "two-parts": "eyJhbGciOiJSUzI1NiJ9.e30",
    "empty-parts": "..",
    "header-not-json": b64(b"{not json") + "." + b64(b"{}") + "." + b64(b"sig"),
    "header-not-utf8": b64(b"\xff\xfe\xfd") + "." + b64(b"{}") + "." + b64(b"sig"),
    "payload-not-json": b64(b'{"alg":"RS256"}') + "." + b64(b"[1,") + "." + b64(b"sig"),
    "huge-header": b64(json.dumps({"alg": "RS256", "x": "a" * 20000}).encode()) + ".e30.c2ln",
}


def token_for(case: str, issuer: str) -> str:
    if case in HEADERS:
        return jwt_with_header(HEADERS[case], issuer)
    return RAW[case]


async def refused(
    session: aiohttp.ClientSession, proc: Process, method: str, path: str, bearer: str
) -> None:
    reply = await send(
        session,
        method,
        f"{proc.url}{path}",
        headers={"Authorization": f"Bearer {bearer}", **JSON},
        data=b"{}" if method == "POST" else None,
    )
    assert (reply.status, reply.code) == (401, "unauthorized"), (method, path, str(reply))
    challenge = reply.headers.get("WWW-Authenticate")
    assert challenge is not None and challenge.startswith("Bearer"), challenge
    assert reply.json()["error"]["message"]


@pytest.mark.parametrize("case", [*HEADERS, *RAW])
async def test_malformed_bearer_is_401_audited_and_never_forwarded(
    start_proxy: StartProxy,
    recorder: Recorder,
    idp: TestIdP,
    tokens: Tokens,
    session: aiohttp.ClientSession,
    case: str,
) -> None:
    proc = start_proxy()
    bearer = token_for(case, idp.issuer)
    await refused(session, proc, "POST", "/cloud/exports/x", bearer)  # privileged
    await refused(session, proc, "GET", "/cloud/tables", bearer)  # allowed by policy
    await refused(session, proc, "GET", f"{API}?state=pending", bearer)  # the approvals API
    await refused(session, proc, "POST", f"{API}/apr_x/decision", bearer)

    event = await wait_audit(proc, "request.completed", status=401)
    assert event["error"] == "unauthorized", event
    await asyncio.sleep(0.3)
    refusals = [
        e
        for e in audit_events(proc)
        if e.get("event") == "request.completed" and e.get("status") == 401
    ]
    assert len(refusals) >= 2, refusals  # both proxied requests
    assert all(e["error"] == "unauthorized" for e in refusals)
    assert bearer not in proc.stdout() or len(bearer) < 8  # the credential is not audited
    stderr = proc.stderr()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert recorder.requests == []

    # The process survived: a good caller is still served.
    reply = await send(session, "GET", f"{proc.url}/cloud/tables", headers=await tokens("agent-7"))
    assert reply.status == 200, str(reply)
    assert [r.target for r in recorder.requests] == ["/tables"]


async def test_bearer_beyond_the_head_limit_is_431_json(
    start_proxy: StartProxy, recorder: Recorder, session: aiohttp.ClientSession
) -> None:
    """A head over `server.max_header_bytes` (64 KiB by default) is `431 header_too_large`, in
    the one JSON error shape, and does not echo the credential back."""
    proc = start_proxy()
    bearer = "eyJhbGciOiJSUzI1NiJ9." + "A" * 70_000 + ".c2ln"
    reply = await send(
        session,
        "POST",
        f"{proc.url}/cloud/exports/x",
        headers={"Authorization": f"Bearer {bearer}", **JSON},
        data=b"{}",
    )
    assert (reply.status, reply.code) == (431, "header_too_large"), str(reply)
    assert b"A" * 100 not in reply.body
    await asyncio.sleep(0.3)
    assert "Traceback" not in proc.stderr()
    assert "A" * 100 not in proc.stdout() + proc.stderr()
    assert recorder.requests == []
