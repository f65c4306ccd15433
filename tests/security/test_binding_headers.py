"""Attack: reuse an approval for a request that differs in its headers, query or multipart body.

An approval covers one exact request (DESIGN §2, Binding): every end-to-end header except the
credential, framing, hop-by-hop, `Countersign-*` and the route's volatile headers; the target
byte for byte; the multipart parts but not the boundary.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.security.conftest import (
    ASYNC,
    JSON,
    Recorder,
    StartProxy,
    Tokens,
    decide,
    get_approval,
    jbody,
    list_approvals,
    send,
    start,
    wait_pending,
)

DESCRIBE = "DynamoDB_20120810.DescribeTable"
DELETE = "DynamoDB_20120810.DeleteTable"
AMZ_JSON = {"Content-Type": "application/x-amz-json-1.0"}


async def test_async_approval_does_not_cover_another_x_amz_target(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy(mode="async")
    url = f"{proc.url}/cloud/exports/ddb"
    agent = await tokens("agent-7")
    body = jbody({"TableName": "customers"})
    describe = {**agent, **AMZ_JSON, "X-Amz-Target": DESCRIBE}

    held = await send(session, "POST", url, headers=describe, data=body)
    assert held.status == 202, str(held)
    approval_id = held.json()["approval_id"]
    shown = await get_approval(session, proc.url, await tokens("bob"), approval_id)
    assert {"name": "x-amz-target", "value": DESCRIBE, "redacted": False} in [
        {**h, "name": h["name"].lower()} for h in shown["headers"]
    ]
    approved = await decide(session, proc.url, approval_id, await tokens("bob"), "approve")
    assert approved.status == 200 and approved.json()["state"] == "approved", str(approved)

    swapped = {**describe, "X-Amz-Target": DELETE, "Countersign-Approval": approval_id}
    reply = await send(session, "POST", url, headers=swapped, data=body)
    assert (reply.status, reply.code) == (403, "approval_mismatch"), str(reply)
    # The header added next to the approved one is a different request too.
    doubled = {**describe, "Countersign-Approval": approval_id}
    async with session.post(
        url, data=body, headers=[*doubled.items(), ("X-Amz-Target", DELETE)]
    ) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "approval_mismatch"
    assert recorder.requests == []

    # The approval was not spent by the refused attempts: the exact request runs, once.
    exact = {**describe, "Countersign-Approval": approval_id}
    reply = await send(session, "POST", url, headers=exact, data=body)
    assert reply.status == 200, str(reply)
    assert reply.headers["Countersign-Approval-Id"] == approval_id
    assert reply.json() == {"ok": True}
    again = await send(session, "POST", url, headers=exact, data=body)
    assert (again.status, again.code) == (403, "approval_used"), str(again)
    await asyncio.sleep(0.2)
    assert [(r.method, r.target, r.header("X-Amz-Target")) for r in recorder.requests] == [
        ("POST", "/exports/ddb", DESCRIBE)
    ]
    assert recorder.requests[0].body == body
    assert all(DELETE not in str(r.headers) for r in recorder.requests)


@pytest.mark.parametrize(
    ("name", "first", "second"),
    [
        ("Content-Type", "application/json", "text/plain"),
        ("X-Env", "prod", "staging"),
        ("Accept", "application/json", "text/csv"),
    ],
)
async def test_held_requests_differing_in_one_header_are_two_approvals(
    start_proxy: StartProxy,
    recorder: Recorder,
    tokens: Tokens,
    session: aiohttp.ClientSession,
    name: str,
    first: str,
    second: str,
) -> None:
    proc = start_proxy()
    url = f"{proc.url}/cloud/exports/one-header"
    agent = await tokens("agent-7")
    bob = await tokens("bob")
    body = b'{"format": "csv"}'
    call_1 = start(session, "POST", url, headers={**agent, **JSON, name: first}, data=body)
    await wait_pending(session, proc.url, bob, 1)
    call_2 = start(session, "POST", url, headers={**agent, **JSON, name: second}, data=body)
    pending = await wait_pending(session, proc.url, bob, 2)
    assert len(pending) == 2 and len({a["approval_id"] for a in pending}) == 2

    def value_of(approval: dict[str, object]) -> str | None:
        headers = approval["headers"]
        assert isinstance(headers, list)
        return next((h["value"] for h in headers if h["name"].lower() == name.lower()), None)

    by_value = {value_of(a): a["approval_id"] for a in pending}
    assert set(by_value) == {first, second}
    assert recorder.requests == []

    approved = await decide(session, proc.url, by_value[first], bob, "approve")
    assert approved.status == 200, str(approved)
    reply = await asyncio.wait_for(call_1, 10)
    assert reply.status == 200 and reply.headers["Countersign-Approval-Id"] == by_value[first]
    await asyncio.sleep(0.3)
    assert not call_2.done()  # still held: the other approval is undecided
    assert [(r.target, r.header(name)) for r in recorder.requests] == [
        ("/exports/one-header", first)
    ]

    denied = await decide(session, proc.url, by_value[second], bob, "deny", "not this one")
    assert denied.status == 200, str(denied)
    reply = await asyncio.wait_for(call_2, 10)
    assert (reply.status, reply.code) == (403, "approval_denied"), str(reply)
    await asyncio.sleep(0.2)
    assert len(recorder.requests) == 1


@pytest.mark.parametrize(
    "override", ["X-HTTP-Method-Override", "X-Method-Override", "X-HTTP-Method"]
)
async def test_method_override_header_is_refused_before_any_approval(
    start_proxy: StartProxy,
    recorder: Recorder,
    tokens: Tokens,
    session: aiohttp.ClientSession,
    override: str,
) -> None:
    proc = start_proxy()
    headers = {**(await tokens("agent-7")), **JSON, override: "DELETE"}
    reply = await send(session, "POST", f"{proc.url}/cloud/exports/x", headers=headers, data=b"{}")
    assert (reply.status, reply.code) == (400, "ambiguous_request"), str(reply)
    # Also on a route the policy allows (GET): the upstream must not be asked to DELETE.
    reply = await send(session, "GET", f"{proc.url}/cloud/tables/t", headers=headers)
    assert (reply.status, reply.code) == (400, "ambiguous_request"), str(reply)
    assert await list_approvals(session, proc.url, await tokens("bob")) == []
    assert recorder.requests == []


async def test_retry_differing_only_in_volatile_headers_joins_and_runs_once(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy()
    url = f"{proc.url}/cloud/exports/volatile"
    agent = await tokens("agent-7")
    bob = await tokens("bob")
    body = b'{"format": "csv"}'

    def attempt(n: int) -> dict[str, str]:
        return {
            **agent,
            **JSON,
            "traceparent": f"00-{n:032x}-{n:016x}-01",
            "tracestate": f"vendor=attempt{n}",
            "User-Agent": f"OpenAI/Python 1.{n}.0",
            "X-Stainless-Retry-Count": str(n),
            "X-Request-Id": f"client-request-{n}",
            "amz-sdk-invocation-id": f"inv-{n}",
            "amz-sdk-request": f"attempt={n}; max=3",
        }

    # Async: each attempt is told which approval it waits for.
    first = await send(session, "POST", url, headers={**attempt(1), **ASYNC}, data=body)
    second = await send(session, "POST", url, headers={**attempt(2), **ASYNC}, data=body)
    assert first.status == second.status == 202, (str(first), str(second))
    approval_id = first.json()["approval_id"]
    assert second.json()["approval_id"] == approval_id
    assert [a["approval_id"] for a in await wait_pending(session, proc.url, bob)] == [approval_id]

    assert recorder.requests == []
    approved = await decide(session, proc.url, approval_id, bob, "approve")
    assert approved.status == 200 and approved.json()["state"] == "approved", str(approved)
    # A third attempt with yet other volatile headers uses it ...
    use = {**attempt(3), **ASYNC, "Countersign-Approval": approval_id}
    reply = await send(session, "POST", url, headers=use, data=body)
    assert reply.status == 200 and reply.headers["Countersign-Approval-Id"] == approval_id

    # ... once: a fourth finds it used.
    use = {**attempt(4), **ASYNC, "Countersign-Approval": approval_id}
    again = await send(session, "POST", url, headers=use, data=body)
    assert (again.status, again.code) == (403, "approval_used"), str(again)
    await asyncio.sleep(0.2)
    assert len(recorder.requests) == 1
    assert recorder.requests[0].body == body
    assert recorder.requests[0].header("User-Agent") == "OpenAI/Python 1.3.0"


async def test_held_retries_differing_only_in_volatile_headers_share_one_execution(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy()
    url = f"{proc.url}/cloud/exports/twice"
    agent = await tokens("agent-7")
    bob = await tokens("bob")
    calls = [
        start(
            session,
            "POST",
            url,
            headers={
                **agent,
                **JSON,
                "traceparent": f"00-{n + 1:032x}-{n + 1:016x}-01",
                "User-Agent": f"agent-sdk/{n}",
                "X-Stainless-Retry-Count": str(n),
            },
            data=b"{}",
        )
        for n in range(3)
    ]
    await asyncio.sleep(0.5)  # every attempt reaches the gate
    pending = await wait_pending(session, proc.url, bob)
    assert len(pending) == 1, pending
    assert recorder.requests == []
    await decide(session, proc.url, pending[0]["approval_id"], bob, "approve")
    replies = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert sorted(r.status for r in replies) == [200, 403, 403], [str(r) for r in replies]
    assert {r.code for r in replies if r.status == 403} == {"approval_used"}
    await asyncio.sleep(0.2)
    assert len(recorder.requests) == 1


async def test_query_order_and_encoding_are_bound(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy(mode="async")
    base = f"{proc.url}/cloud/exports/q"
    agent = {**(await tokens("agent-7")), **JSON}
    body = b'{"n": 1}'
    held = await send(session, "POST", f"{base}?a=1&b=2", headers=agent, data=body)
    assert held.status == 202, str(held)
    approval_id = held.json()["approval_id"]
    shown = await get_approval(session, proc.url, await tokens("bob"), approval_id)
    assert shown["target"].endswith("/q?a=1&b=2")
    await decide(session, proc.url, approval_id, await tokens("bob"), "approve")

    use = {**agent, "Countersign-Approval": approval_id}
    for other in ("?b=2&a=1", "?a=%31&b=2", "?a=1&b=2&", "?a=1&b=2&b=3", "?a=1&a=1&b=2", ""):
        reply = await send(session, "POST", f"{base}{other}", headers=use, data=body)
        assert (reply.status, reply.code) == (403, "approval_mismatch"), (other, str(reply))
    assert recorder.requests == []

    reply = await send(session, "POST", f"{base}?a=1&b=2", headers=use, data=body)
    assert reply.status == 200, str(reply)
    await asyncio.sleep(0.2)
    assert [r.target for r in recorder.requests] == ["/exports/q?a=1&b=2"]


def multipart(boundary: str, parts: list[tuple[str, str | None, str, bytes]]) -> bytes:
    """A multipart/form-data body written by hand: (name, filename, content type, content)."""
    out = b""
    for name, filename, content_type, content in parts:
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out += (
            (
                f"--{boundary}\r\nContent-Disposition: {disposition}\r\n"
                f"Content-Type: {content_type}\r\n\r\n"
            ).encode()
            + content
            + b"\r\n"
        )
    return out + f"--{boundary}--\r\n".encode()


UPLOAD: list[tuple[str, str | None, str, bytes]] = [
    ("meta", None, "application/json", b'{"table": "customers"}'),
    ("file", "customers.csv", "text/csv", b"id,email\n1,a@example.com\n2,b@example.com\n"),
]


def form(boundary: str) -> dict[str, str]:
    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def test_multipart_new_boundary_matches_but_a_changed_part_does_not(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    proc = start_proxy(mode="async")
    url = f"{proc.url}/cloud/exports/upload"
    agent = await tokens("agent-7")
    first = "----sdkBoundaryAAAA1111"
    held = await send(
        session, "POST", url, headers={**agent, **form(first)}, data=multipart(first, UPLOAD)
    )
    assert held.status == 202, str(held)
    approval_id = held.json()["approval_id"]
    await decide(session, proc.url, approval_id, await tokens("bob"), "approve")
    use = {**agent, "Countersign-Approval": approval_id}

    retry = "----sdkBoundaryBBBB2222"
    changed: dict[str, list[tuple[str, str | None, str, bytes]]] = {
        "content": [UPLOAD[0], (*UPLOAD[1][:3], UPLOAD[1][3] + b"3,evil@example.com\n")],
        "filename": [UPLOAD[0], ("file", "other.csv", *UPLOAD[1][2:])],
        "part name": [UPLOAD[0], ("file2", *UPLOAD[1][1:])],
        "part type": [UPLOAD[0], (*UPLOAD[1][:2], "application/octet-stream", UPLOAD[1][3])],
        "part order": [UPLOAD[1], UPLOAD[0]],
        "extra part": [*UPLOAD, ("more", None, "text/plain", b"x")],
    }
    for what, parts in changed.items():
        reply = await send(
            session, "POST", url, headers={**use, **form(retry)}, data=multipart(retry, parts)
        )
        assert (reply.status, reply.code) == (403, "approval_mismatch"), (what, str(reply))
    # The same parts under the first boundary but another media type parameter are different.
    reply = await send(
        session,
        "POST",
        url,
        headers={**use, "Content-Type": f"multipart/form-data; boundary={first}; charset=latin1"},
        data=multipart(first, UPLOAD),
    )
    assert (reply.status, reply.code) == (403, "approval_mismatch"), str(reply)
    assert recorder.requests == []

    same = multipart(retry, UPLOAD)
    reply = await send(session, "POST", url, headers={**use, **form(retry)}, data=same)
    assert reply.status == 200, str(reply)
    await asyncio.sleep(0.2)
    assert len(recorder.requests) == 1
    ran = recorder.requests[0]
    assert ran.body == same and ran.header("Content-Type") == form(retry)["Content-Type"]


async def test_multipart_boundary_text_inside_a_part_is_content_not_a_delimiter(
    start_proxy: StartProxy, recorder: Recorder, tokens: Tokens, session: aiohttp.ClientSession
) -> None:
    """The boundary is chosen by the client: text equal to it inside a part (not at a line
    start, so no parser reads a delimiter there) is part content. Re-sent under another
    boundary, that text changes, so the part's content changes: not the approved request."""
    proc = start_proxy(mode="async")
    url = f"{proc.url}/cloud/exports/run"
    agent = await tokens("agent-7")

    def command(boundary: str, flag: str) -> bytes:
        return multipart(
            boundary, [("cmd", None, "text/plain", f"terraform apply {flag}".encode())]
        )

    held = await send(
        session,
        "POST",
        url,
        headers={**agent, **form("dry-run")},
        data=command("dry-run", "--dry-run"),
    )
    assert held.status == 202, str(held)
    approval_id = held.json()["approval_id"]
    bob = await tokens("bob")
    shown = await get_approval(session, proc.url, bob, approval_id)
    assert "terraform apply --dry-run" in shown["body_preview"]  # what the approver reads
    await decide(session, proc.url, approval_id, bob, "approve")

    swapped = command("auto-approve", "--auto-approve")
    reply = await send(
        session,
        "POST",
        url,
        headers={**agent, **form("auto-approve"), "Countersign-Approval": approval_id},
        data=swapped,
    )
    await asyncio.sleep(0.2)
    ran = [r.body for r in recorder.requests]
    assert (reply.status, reply.code) == (403, "approval_mismatch"), (str(reply), ran)
    assert ran == []


BODY_UNBOUND = b'{"format": "csv"}'


@pytest.mark.parametrize("trusted", [[], ["127.0.0.1/32"]], ids=["direct", "behind-trusted-lb"])
async def test_unbound_client_headers_do_not_change_what_the_upstream_gets(
    start_proxy: StartProxy,
    recorder: Recorder,
    tokens: Tokens,
    session: aiohttp.ClientSession,
    trusted: list[str],
) -> None:
    """Headers left out of the binding (`Host`, `Countersign-*`, `X-Forwarded-*`) are unbound
    because Countersign sets or drops them (DESIGN §2: "the same for every replica and every
    retry"). So a re-send that changes them may use the approval, but none of the changed
    values may reach the upstream: the upstream gets what was approved — also when the client
    is a trusted proxy, whose `Forwarded` / `X-Forwarded-*` are honoured for allowed calls."""
    proc = start_proxy(mode="async", trusted_proxies=trusted)
    url = f"{proc.url}/cloud/exports/unbound"
    agent = {**(await tokens("agent-7")), **JSON}
    held = await send(session, "POST", url, headers=agent, data=BODY_UNBOUND)
    assert held.status == 202, str(held)
    approval_id = held.json()["approval_id"]
    await decide(session, proc.url, approval_id, await tokens("bob"), "approve")

    attack = {
        **agent,
        "Countersign-Approval": approval_id,
        "Host": "evil.example",
        "Countersign-Override": "evil-countersign",
        "X-Forwarded-For": "10.6.6.6",
        "X-Forwarded-Host": "evil-forwarded.example",
        "X-Forwarded-Proto": "gopher",
        "Forwarded": "for=10.6.6.6;host=evil-forwarded.example",
    }
    reply = await send(session, "POST", url, headers=attack, data=BODY_UNBOUND)
    await asyncio.sleep(0.2)
    leaked = [
        (name, value)
        for r in recorder.requests
        for name, value in r.headers
        if "evil" in value or "10.6.6.6" in value or "gopher" in value
    ]
    assert leaked == [], (str(reply), leaked)
    if reply.status == 200:
        [ran] = recorder.requests
        assert ran.body == BODY_UNBOUND
    else:
        assert (reply.status, reply.code) == (403, "approval_mismatch"), str(reply)
        assert recorder.requests == []
