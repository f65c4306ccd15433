"""Every error Countersign answers itself has one JSON shape:
`{"error": {"code", "message", ...context, "request_id"}}`, with `Countersign-Request-Id` and
`X-Request-Id` alongside."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.model import Action
from proxy.server.errors_middleware import json_errors
from proxy.server.responses import DEFAULT_MESSAGES, default_message, error_response
from tests.conftest import Client, Factory
from tests.helpers import AGENT_KEY, ALICE_KEY, bearer

AGENT = bearer(AGENT_KEY)
ALICE = bearer(ALICE_KEY)
# An issuer is configured (nothing listens there) so that bearer JWTs reach the verifier.
ISSUERS = json.dumps([{"issuer": "http://127.0.0.1:9", "audiences": ["countersign"]}])


def assert_error(body: Any, code: str) -> dict[str, Any]:
    """The one shape: an `error` object with a code and a non-empty message, nothing else."""
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and error["code"] == code, body
    assert isinstance(error["message"], str) and error["message"], body
    assert None not in error.values(), body
    return dict(error)


async def raw(client: Client, head: str) -> tuple[int, dict[str, str], bytes]:
    """One request written byte for byte; the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(head.encode() + b"\r\n\r\n")
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head_bytes, _, body = data.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def test_message_is_always_present_and_none_fields_are_dropped() -> None:
    body = json.loads(error_response(403, "policy_denied", rule=None).body)  # type: ignore[arg-type]
    assert body == {
        "error": {"code": "policy_denied", "message": DEFAULT_MESSAGES["policy_denied"]}
    }
    assert default_message("approval_denied", 403, {"decided_by": "carol@example.com"}) == (
        "Denied by carol@example.com. Do not retry this request; it will be denied again "
        "unless something changes."
    )
    assert default_message("some_new_code", 418) == "I'm a Teapot"
    resp = error_response(503, "shutting_down", request_id="r1")
    assert resp.headers["Retry-After"] and resp.headers["X-Request-Id"] == "r1"
    assert resp.headers["Countersign-Request-Id"] == "r1"
    assert json.loads(resp.body)["error"]["request_id"] == "r1"  # type: ignore[arg-type]


async def test_401_without_a_credential(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    resp = await client.get("/cloud/buckets")
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    assert resp.content_type == "application/json"
    error = assert_error(await resp.json(), "unauthorized")
    assert error["message"] == "missing credential: expected Authorization: Bearer <token>"
    assert error["request_id"] == resp.headers["X-Request-Id"]
    assert sink.named("request.completed")[0]["request_id"] == error["request_id"]


async def test_404_no_route(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    resp = await client.get("/nowhere/x", headers=AGENT)
    assert resp.status == 404
    error = assert_error(await resp.json(), "no_route")
    assert error["path"] == "/nowhere/x" and error["message"] == "no route matches /nowhere/x"
    assert error["request_id"] == resp.headers["X-Request-Id"]


async def test_403_policy_denied(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    resp = await client.delete("/cloud/buckets/reports", headers=AGENT)
    assert resp.status == 403
    error = assert_error(await resp.json(), "policy_denied")
    assert error == {
        "code": "policy_denied",
        "message": "the policy denies this request (rule no-deletes)",
        "rule": "no-deletes",
        "route": "cloud",
        "request_id": resp.headers["X-Request-Id"],
    }


async def test_405_connect(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    status, headers, body = await raw(
        client, "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close"
    )
    assert status == 405
    assert headers["content-type"].startswith("application/json")
    error = assert_error(json.loads(body), "method_not_allowed")
    assert "CONNECT" in error["message"]


async def test_api_400_invalid_request_for_a_bad_json_body(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    resp = await client.post(
        "/_countersign/api/approvals/apr_x/decision",
        data=b"{not json",
        headers={**ALICE, "Content-Type": "application/json"},
    )
    assert resp.status == 400
    error = assert_error(await resp.json(), "invalid_request")
    assert "JSON" in error["message"]
    resp = await client.post(
        "/_countersign/api/approvals/apr_x/decision",
        json={"verdict": "approve", "grant": 1, "extra": 2},
        headers=ALICE,
    )
    error = assert_error(await resp.json(), "invalid_request")
    assert resp.status == 400 and "extra" in error["message"]


async def test_api_413_for_a_body_over_the_limit(make_proxy: Factory) -> None:
    client, _ = await make_proxy(max_body=1000)
    resp = await client.post(
        "/_countersign/api/approvals/apr_x/decision",
        data=b'{"verdict": "' + b"x" * 2000 + b'"}',
        headers={**ALICE, "Content-Type": "application/json"},
    )
    assert resp.status == 413
    assert_error(await resp.json(), "payload_too_large")


async def test_unknown_internal_endpoint(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    resp = await client.get("/_countersign/nope")
    assert resp.status == 404
    assert_error(await resp.json(), "no_route")


async def test_middleware_answers_aiohttps_own_errors_and_faults_in_the_shape() -> None:
    async def boom(_: web.Request) -> web.Response:
        raise RuntimeError("boom")

    async def moved(_: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    app = web.Application(middlewares=[json_errors])
    app.router.add_get("/boom", boom)
    app.router.add_get("/moved", moved)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/boom")
        assert resp.status == 500
        assert_error(await resp.json(), "internal_error")
        resp = await client.get("/nowhere")
        assert resp.status == 404
        assert_error(await resp.json(), "no_route")
        resp = await client.post("/boom")
        assert resp.status == 405 and resp.headers["Allow"] == "GET,HEAD"
        assert_error(await resp.json(), "method_not_allowed")
        resp = await client.get("/moved", allow_redirects=False)
        assert resp.status == 302 and resp.headers["Location"] == "/elsewhere"


def _token(header: Any) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = {"iss": "http://127.0.0.1:9", "aud": "countersign", "sub": "a", "exp": 2**31}
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(b'sig')}"


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "RS256", "kid": 123},
        {"alg": "RS256", "kid": ["a"]},
        {"alg": "RS256", "crit": ["x"]},
        {"alg": "RS256", "crit": "x"},
        {"alg": 7},
        [1, 2],
    ],
)
async def test_malformed_jwt_headers_are_401(make_proxy: Factory, header: Any) -> None:
    client, sink = await make_proxy(issuers=ISSUERS)
    resp = await client.get("/cloud/buckets", headers=bearer(_token(header)))
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    error = assert_error(await resp.json(), "unauthorized")
    assert error["request_id"] == resp.headers["X-Request-Id"]
    assert [e["status"] for e in sink.named("request.completed")] == [401]


async def test_default_approve_says_why_nothing_can_decide(
    make_proxy: Factory, upstream: TestServer
) -> None:
    """`policy.default: approve` holds what no rule matches, but names no approvers: the agent
    is told so (not that the store is down), and nothing is forwarded."""
    from tests.helpers import settings_for

    base = settings_for(str(upstream.make_url("/")))
    settings = base.model_copy(
        update={"policy": base.policy.model_copy(update={"default": Action.APPROVE})}
    )
    client, _ = await make_proxy(settings)
    resp = await client.post("/cloud/unlisted", json={}, headers=bearer(AGENT_KEY))
    assert resp.status == 503
    error = (await resp.json())["error"]
    assert error["code"] == "approvals_unavailable"
    assert "policy.default is approve" in error["message"]
