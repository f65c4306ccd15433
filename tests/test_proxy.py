"""The request path end to end, in process: a real upstream server, the real app, real HTTP."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tests.conftest import Factory
from tests.helpers import AGENT_KEY, CI_KEY, bearer
from tests.upstream import GZIP_BODY

AGENT = bearer(AGENT_KEY)


async def test_allowed_read_is_forwarded_with_injected_credentials(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    resp = await client.get("/cloud/buckets/reports?limit=5&b=2", headers=AGENT)
    assert resp.status == 200
    echo = await resp.json()
    assert echo["path"] == "/api/buckets/reports"
    assert echo["query"] == "limit=5&b=2"
    assert echo["headers"]["x-cloud-token"] == "upstream-secret-123"
    assert "authorization" not in echo["headers"], "the agent's credential must never be forwarded"
    request_id = resp.headers["Countersign-Request-Id"]
    assert echo["headers"]["countersign-request-id"] == request_id
    assert "x-request-id" not in echo["headers"] and "X-Request-Id" not in resp.headers
    # One event for an allowed request, with all the three steps' fields.
    names = [e["event"] for e in sink.events]
    assert names == ["request.completed"]
    completed = sink.named("request.completed")[0]
    assert completed["request_id"] == request_id
    assert completed["identity"]["subject"] == "agent-key"
    assert completed["rule"] == "reads" and completed["route"] == "cloud"
    assert completed["action"] == "allow" and completed["error"] is None
    assert (completed["method"], completed["path"]) == ("GET", "/cloud/buckets/reports")
    assert "raw_path" not in completed  # the same as received
    assert completed["remote"] == "127.0.0.1"
    assert completed["status"] == 200 and completed["bytes_sent"] == len(await resp.read())
    assert completed["duration_ms"] > 0
    assert "approval_id" not in completed
    assert "upstream-secret-123" not in json.dumps(sink.events)


async def test_request_ids_the_clients_go_up_the_upstreams_come_back(
    make_proxy: Factory,
) -> None:
    client, sink = await make_proxy()
    resp = await client.get(
        "/cloud/request-id",
        headers={**AGENT, "X-Request-Id": "client-1", "Countersign-Request-Id": "forged"},
    )
    assert resp.status == 200
    echo = await resp.json()
    # Up: the client's X-Request-Id as sent; ours under our own name, never the client's.
    assert echo["headers"]["x-request-id"] == "client-1"
    sent = [v for k, v in echo["header_list"] if k.lower() == "countersign-request-id"]
    request_id = resp.headers["Countersign-Request-Id"]
    assert sent == [request_id] and "forged" not in sent
    # Back: the upstream's own X-Request-Id unchanged; ours replaces any the upstream sent.
    assert resp.headers.getall("X-Request-Id") == ["req_upstream_123"]
    assert resp.headers.getall("Countersign-Request-Id") == [request_id]
    assert request_id != "forged-by-the-upstream"
    # No approval ran this: the upstream cannot make it look as if one did.
    assert "Countersign-Approval-Id" not in resp.headers
    assert {e["request_id"] for e in sink.events} == {request_id}
    assert [e["event"] for e in sink.events] == ["request.completed"]


async def test_own_answers_carry_our_request_id_under_both_names(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    resp = await client.delete("/cloud/buckets/reports", headers={**AGENT, "X-Request-Id": "c-2"})
    assert resp.status == 403
    request_id = resp.headers["Countersign-Request-Id"]
    assert resp.headers["X-Request-Id"] == request_id != "c-2"
    assert (await resp.json())["error"]["request_id"] == request_id
    assert sink.named("request.completed")[0]["request_id"] == request_id


async def test_injected_credentials_replace_the_clients_own(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    resp = await client.get(
        "/cloud/buckets", headers={**AGENT, "X-Cloud-Token": "forged-by-the-agent"}
    )
    sent = [v for k, v in (await resp.json())["header_list"] if k.lower() == "x-cloud-token"]
    assert sent == ["upstream-secret-123"]


async def test_forbidden_call_gets_403_policy_denied(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    resp = await client.delete("/cloud/buckets/reports", headers=AGENT)
    assert resp.status == 403
    body = await resp.json()
    assert body["error"]["code"] == "policy_denied" and body["error"]["rule"] == "no-deletes"
    assert [e["event"] for e in sink.events] == ["request.completed"]
    refused = sink.named("request.completed")[0]
    assert refused["rule"] == "no-deletes" and refused["status"] == 403
    assert (refused["action"], refused["error"]) == ("deny", "policy_denied")
    assert refused["identity"]["subject"] == "agent-key"
    assert refused["bytes_sent"] == len(await resp.read())


async def test_default_deny_when_no_rule_matches(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    resp = await client.patch("/cloud/buckets/reports", headers=AGENT)
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "policy_denied"
    assert (await resp.json())["error"].get("rule") is None


@pytest.mark.parametrize(
    ("headers", "description"),
    [
        ({}, "missing credential: expected Authorization: Bearer <token>"),
        (
            {"Authorization": "Basic YWxhZGRpbjpvcGVu"},
            "Authorization uses the Basic scheme; expected Authorization: Bearer <token>",
        ),
        ({"Authorization": "Bearer cs_not_a_real_key_00000000000000000"}, "unknown API key"),
        ({"Authorization": "Bearer not-a-jwt"}, "no OIDC issuer is configured"),
    ],
)
async def test_missing_or_bad_credentials_get_401(
    make_proxy: Factory, headers: dict[str, str], description: str
) -> None:
    client, _ = await make_proxy()
    resp = await client.get("/cloud/buckets", headers=headers)
    assert resp.status == 401
    assert resp.headers["www-authenticate"].startswith('Bearer error="invalid_token"')
    body = await resp.json()
    assert body["error"]["code"] == "unauthorized" and body["error"]["message"] == description


async def test_unknown_route_is_404(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    resp = await client.get("/nowhere/x", headers=AGENT)
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "no_route"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("/cloud/buckets/..%2f..%2fadmin", "encoded_slash"),
        ("/cloud/buckets/%2e%2e/admin", "encoded_dot"),
        ("/cloud/buckets/../admin", "dot_segment"),
        ("/cloud/buckets/./x", "dot_segment"),
        ("/cloud/buckets\\admin", "backslash"),
        ("/cloud/buckets/%5cadmin", "encoded_backslash"),
        ("/cloud/buckets/%00", "nul"),
        ("/cloud/buckets/%0a", "control_character"),
        ("/cloud/buckets/%252f", "double_encoding"),
        ("/cloud/admin;/buckets", "path_parameter"),
        ("/cloud/buckets/%zz", "invalid_percent_encoding"),
        ("/cloud/buckets/%ff", "invalid_utf8"),
    ],
)
async def test_ambiguous_paths_are_refused_with_400(
    make_proxy: Factory, upstream: TestServer, raw: str, reason: str
) -> None:
    client, _ = await make_proxy()
    # Raw socket-level request so no client library normalizes the path first.
    resp = await _raw_request(client, f"GET {raw} HTTP/1.1", AGENT)
    assert resp["status"] == 400, resp
    assert resp["json"]["error"]["code"] == "ambiguous_request"
    assert resp["json"]["error"]["reason"] == reason


async def test_lower_case_methods_are_refused(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    # aiohttp's parser refuses these itself; `paths.check_method` stands behind it.
    resp = await _raw_request(client, "delete /cloud/buckets/reports HTTP/1.1", AGENT)
    assert resp["status"] == 400
    assert not [e for e in sink.named("request.completed") if e["error"] is None]


async def test_method_override_headers_are_refused(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    resp = await client.get("/cloud/buckets", headers={**AGENT, "X-HTTP-Method-Override": "DELETE"})
    assert resp.status == 400
    body = await resp.json()
    error = body["error"]
    assert error == {**error, "code": "ambiguous_request", "reason": "method_override"}


async def test_normalized_path_is_what_is_judged_and_forwarded(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    # "//" collapses and %20 decodes: the upstream sees the canonical form of the same path.
    resp = await _raw_request(client, "GET /cloud//buckets/my%20bucket HTTP/1.1", AGENT)
    assert resp["status"] == 200
    assert resp["json"]["path"] == "/api/buckets/my%20bucket"


async def test_encoded_path_cannot_dodge_a_deny_rule(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    # An encoded letter decodes before judging, so it cannot slip a path past a rule.
    resp = await _raw_request(client, "DELETE /cloud/%62uckets/reports HTTP/1.1", AGENT)
    assert resp["status"] == 403
    assert resp["json"]["error"]["rule"] == "no-deletes"


async def test_hop_by_hop_headers_are_stripped_both_ways(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    resp = await client.get(
        "/cloud/echo",
        headers={
            **AGENT,
            "Connection": "keep-alive, X-Secret-Hop",
            "X-Secret-Hop": "must-not-pass",
            "Proxy-Authorization": "Basic abc",
            "TE": "trailers",
            "Countersign-Reason": "testing",
            "X-Custom": "kept",
        },
    )
    echo = await resp.json()
    sent = {k.lower() for k in echo["headers"]}
    assert "x-secret-hop" not in sent
    assert "proxy-authorization" not in sent
    assert "te" not in sent
    assert "countersign-reason" not in sent
    assert echo["headers"]["x-custom"] == "kept"
    # The upstream's Connection-named header does not come back either.
    assert "X-Upstream-Secret" not in resp.headers


async def test_x_forwarded_headers_from_untrusted_clients_are_replaced(
    make_proxy: Factory,
) -> None:
    client, _ = await make_proxy()
    resp = await client.get(
        "/cloud/echo",
        headers={
            **AGENT,
            "X-Forwarded-For": "6.6.6.6",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "evil.example",
            "Forwarded": "for=6.6.6.6",
        },
    )
    headers = (await resp.json())["headers"]
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"].startswith("127.0.0.1:")
    assert "forwarded" not in headers


async def test_x_forwarded_headers_from_trusted_proxies_are_extended(
    make_proxy: Factory,
) -> None:
    client, _ = await make_proxy(trusted='["127.0.0.0/8"]')
    resp = await client.get(
        "/cloud/echo",
        headers={
            **AGENT,
            "X-Forwarded-For": "203.0.113.9",
            "X-Forwarded-Proto": "https",
            "X-Forwarded-Host": "api.example.com",
        },
    )
    headers = (await resp.json())["headers"]
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert headers["x-forwarded-host"] == "api.example.com"


async def test_no_decompression_and_no_cookie_jar(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    async with aiohttp.ClientSession(auto_decompress=False) as raw_client:
        url = client.make_url("/cloud/gzip")
        async with raw_client.get(url, headers=AGENT) as resp:
            assert resp.headers["content-encoding"] == "gzip"
            assert await resp.read() == GZIP_BODY
            assert gzip.decompress(GZIP_BODY) == b'{"compressed": true}'
    resp = await client.get("/cloud/cookie", headers=AGENT)
    assert "session=upstream-cookie" in resp.headers["set-cookie"]
    # The proxy must not remember the upstream's cookie for the next caller.
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as fresh,
        fresh.get(client.make_url("/cloud/echo"), headers=AGENT) as resp,
    ):
        assert "cookie" not in (await resp.json())["headers"]


async def test_upload_streams_through(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    import hashlib

    chunk = b"x" * 65536
    count = 160  # 10 MiB, sent chunked
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            digest.update(chunk)
            yield chunk

    resp = await client.put("/cloud/uploads/big.bin", headers=AGENT, data=body())
    assert resp.status == 200
    echo = await resp.json()
    assert echo["body_bytes"] == len(chunk) * count
    assert echo["body_sha256"] == digest.hexdigest()


async def test_sized_upload_keeps_its_content_length(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    body = b"y" * 100_000
    resp = await client.put("/cloud/uploads/sized.bin", headers=AGENT, data=body)
    echo = await resp.json()
    assert echo["body_bytes"] == len(body)
    assert echo["headers"]["content-length"] == str(len(body))
    assert "transfer-encoding" not in echo["headers"]


async def test_sse_events_arrive_before_the_stream_ends(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    loop = asyncio.get_running_loop()
    resp = await client.get("/cloud/sse", headers=AGENT)
    assert resp.status == 200
    started = loop.time()
    first = await resp.content.readuntil(b"\n\n")
    first_after = loop.time() - started
    rest = await resp.read()
    assert first == b"data: event 0\n\n"
    assert rest == b"data: event 1\n\ndata: event 2\n\n"
    # The whole stream takes ~0.4 s more; the first event must not wait for it.
    assert first_after < 0.3


async def test_large_download_streams(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    size = 20 * 1024 * 1024
    resp = await client.get(f"/cloud/download/{size}", headers=AGENT)
    assert resp.status == 200
    assert int(resp.headers["content-length"]) == size
    total = 0
    async for piece in resp.content.iter_chunked(1 << 20):
        total += len(piece)
    assert total == size


async def test_upstream_unreachable_is_502(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    resp = await client.get("/dead/x", headers=AGENT)
    assert resp.status == 502
    body = await resp.json()
    assert body["error"]["code"] == "upstream_unavailable" and body["error"]["route"] == "dead"
    completed = sink.named("request.completed")[0]
    assert (completed["status"], completed["error"]) == (502, "upstream_unavailable")
    assert completed["action"] == "allow" and completed["route"] == "dead"


async def test_upstream_failing_mid_body_cuts_the_client_off(make_proxy: Factory) -> None:
    client, sink = await make_proxy()
    resp = await client.get("/cloud/truncate", headers=AGENT)
    assert resp.status == 200  # the status line had already been relayed
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()  # ... but the body is visibly truncated, never complete-looking
    completed = sink.named("request.completed")[0]
    assert completed["error"] == "upstream_unavailable" and completed["bytes_sent"] == 10
    assert completed["status"] == 200


async def test_upstream_connections_are_reused(make_proxy: Factory, upstream: TestServer) -> None:
    client, _ = await make_proxy()
    for _ in range(10):
        resp = await client.get("/cloud/echo", headers=AGENT)
        assert resp.status == 200
        await resp.read()
    # Ten sequential requests, one pooled keep-alive connection to the upstream.
    assert upstream.runner is not None and upstream.runner.server is not None
    assert len(upstream.runner.server.connections) == 1


async def test_upstream_timeout_is_504(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    resp = await client.get("/raw/slow", headers=AGENT)  # route timeout 0.5 s
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "upstream_timeout"


async def test_strip_prefix_false_keeps_the_path(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    resp = await client.get("/raw/a/b", headers=bearer(CI_KEY))
    assert (await resp.json())["path"] == "/raw/a/b"


async def test_internal_endpoints(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    assert (await client.get("/_countersign/healthz")).status == 200
    ready = await client.get("/_countersign/readyz")
    assert ready.status == 200 and (await ready.json())["status"] == "ready"
    await client.get("/cloud/buckets", headers=AGENT)
    metrics = await (await client.get("/_countersign/metrics")).text()
    assert 'countersign_requests_total{decision="allow",route="cloud",status="200"} 1.0' in metrics
    unknown = await client.get("/_countersign/nope")
    assert unknown.status == 404 and (await unknown.json())["error"]["code"] == "no_route"


async def _raw_request(
    client: TestClient[web.Request, web.Application], request_line: str, headers: dict[str, str]
) -> dict[str, Any]:
    """Send one request byte for byte over a socket and parse the JSON answer."""
    host, port = client.host, client.port
    reader, writer = await asyncio.open_connection(host, port)
    lines = [request_line, f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        parsed = json.loads(body) if body else None
    except ValueError:
        parsed = None
    return {"status": status, "json": parsed, "raw": data}


async def test_head_is_forwarded_without_a_body(make_proxy: Factory) -> None:
    client, _ = await make_proxy()
    resp = await client.head("/cloud/echo", headers=AGENT)
    assert resp.status == 200
    assert int(resp.headers["Content-Length"]) > 0
    assert await resp.read() == b""


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        "Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    ],
    ids=["cl-and-te", "duplicate-cl", "malformed-chunk"],
)
async def test_request_smuggling_framings_are_refused(make_proxy: Factory, framing: str) -> None:
    client, sink = await make_proxy()
    reader, writer = await asyncio.open_connection(client.host, client.port)
    writer.write(
        (
            f"POST /cloud/uploads/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {AGENT_KEY}\r\n"
            f"Connection: close\r\n{framing}"
        ).encode()
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.split(b"\r\n", 1)[0].endswith(b"400 Bad Request")
    # Nothing reached the upstream: no request completed without an error.
    assert not [e for e in sink.named("request.completed") if e["error"] is None]


async def test_an_unknown_expectation_is_refused_by_the_pipeline_on_aiohttps_front_too(
    make_proxy: Factory,
) -> None:
    """The pipeline's first stage refuses what it does not understand in `Expect`, whichever
    front carries the request (here aiohttp's, in process)."""
    client, sink = await make_proxy()
    resp = await client.post("/cloud/uploads/x", headers={**AGENT, "Expect": "teapot"}, data=b"abc")
    assert resp.status == 417
    assert (await resp.json())["error"]["code"] == "expectation_failed"
    completed = sink.named("request.completed")
    assert completed[-1]["status"] == 417 and completed[-1]["error"] == "expectation_failed"
