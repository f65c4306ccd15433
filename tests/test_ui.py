"""The approvers' web inbox in process, logging in at the real test IdP (authorization code +
PKCE): sessions, cookies, CSRF, decisions through the same checks and audit as the API."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import build_app
from proxy.audit import AuditLog
from proxy.config import Settings, WebLoginSettings, load_settings_text
from proxy.ui.session import Cookies, Session, Signer, safe_next
from tests.conftest import Client
from tests.helpers import AGENT_KEY, ALICE_KEY, ListSink, bearer, settings_for
from tests.idp_fixture import TestIdP

UI = "/_countersign/ui/"
API = "/_countersign/api/approvals"
AGENT = bearer(AGENT_KEY)  # agent-key acts for bob@example.com
EXPORT = "/cloud/exports/customers"
SECRET = "s" * 40


def inbox_settings(upstream: str, idp: TestIdP, **web_login: Any) -> Settings:
    base = settings_for(upstream, issuers=f'[{{issuer: "{idp.issuer}", audiences: [countersign]}}]')
    login = WebLoginSettings(
        issuer=idp.issuer, client_id="people", session_secret=SECRET, **web_login
    )
    identity = base.identity.model_copy(update={"web_login": login})
    return base.model_copy(update={"identity": identity})


class Browser:
    """A person's browser: the test client's cookie jar, logging in at the IdP by login_hint."""

    def __init__(self, client: Client, idp: TestIdP) -> None:
        self.client = client
        self.idp = idp

    async def login(self, person: str, next_path: str = UI) -> aiohttp.ClientResponse:
        resp = await self.client.get(
            UI + "login", params={"next": next_path}, allow_redirects=False
        )
        assert resp.status == 302, await resp.text()
        url = resp.headers["Location"]
        assert url.startswith(self.idp.authorization_endpoint)
        url += "&" + urlencode({"login_hint": person})
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as idp:
            for _ in range(10):
                async with idp.get(url, allow_redirects=False) as answer:
                    assert answer.status in (302, 303), await answer.text()
                    url = urljoin(url, answer.headers["Location"])
                if urlsplit(url).path == UI + "callback":
                    break
        parts = urlsplit(url)
        return await self.client.get(f"{parts.path}?{parts.query}", allow_redirects=False)

    async def page(self, path: str) -> tuple[int, str]:
        resp = await self.client.get(path, allow_redirects=False)
        return resp.status, await resp.text()

    async def csrf(self, path: str = UI) -> str:
        status, html = await self.page(path)
        assert status == 200, html
        match = re.search(r'name="csrf" value="([^"]+)"', html)
        assert match, html
        return match.group(1)

    async def decide(
        self, approval_id: str, verdict: str, reason: str = "", csrf: str | None = "page"
    ) -> aiohttp.ClientResponse:
        form = {"verdict": verdict, "reason": reason}
        if csrf == "page":
            csrf = await self.csrf(f"{UI}approvals/{approval_id}")
        if csrf is not None:
            form["csrf"] = csrf
        return await self.client.post(
            f"{UI}approvals/{approval_id}/decision", data=form, allow_redirects=False
        )


@pytest.fixture
async def inbox(idp: TestIdP, upstream: TestServer) -> AsyncIterator[tuple[Any, ListSink, Client]]:
    """Returns (make_browser, audit sink, a plain client for the agent and the API)."""
    sink = ListSink()
    settings = inbox_settings(str(upstream.make_url("/")), idp)
    server = TestServer(build_app(settings, audit_log=AuditLog([sink])), handler_cancellation=True)
    agent = TestClient(server)
    await agent.start_server()
    browsers: list[Client] = []

    async def browser() -> Browser:
        client = TestClient(TestServer(web.Application()))  # own cookie jar, same proxy
        client._server = server  # type: ignore[attr-defined]
        browsers.append(client)
        return Browser(client, idp)

    yield browser, sink, agent
    for task in HELD:
        task.cancel()
    await asyncio.gather(*HELD, return_exceptions=True)
    HELD.clear()
    for client in browsers:
        await client.session.close()
    await agent.close()


HELD: list[asyncio.Task[Any]] = []


def held(agent: Client, **headers: str) -> asyncio.Task[tuple[int, dict[str, Any]]]:
    async def call() -> tuple[int, dict[str, Any]]:
        resp = await agent.post(EXPORT, json={"format": "csv"}, headers={**AGENT, **headers})
        return resp.status, await resp.json()

    task = asyncio.create_task(call())
    HELD.append(task)
    return task


async def pending_id(agent: Client) -> str:
    for _ in range(200):
        resp = await agent.get(API, params={"state": "pending"}, headers=bearer(ALICE_KEY))
        approvals = (await resp.json())["approvals"]
        if approvals:
            return str(approvals[0]["approval_id"])
        await asyncio.sleep(0.02)
    raise AssertionError("no pending approval appeared")


async def state_of(agent: Client, approval_id: str) -> dict[str, Any]:
    resp = await agent.get(f"{API}/{approval_id}", headers=bearer(ALICE_KEY))
    body: dict[str, Any] = await resp.json()
    return body


# -- login, session, cookies -----------------------------------------------------------------


async def test_without_a_session_the_inbox_sends_to_login_then_to_the_idp(
    inbox: Any, idp: TestIdP
) -> None:
    make, _, _ = inbox
    browser = await make()
    resp = await browser.client.get(UI + "history?state=denied", allow_redirects=False)
    assert resp.status == 302
    assert resp.headers["Location"] == UI + "login?" + urlencode(
        {"next": UI + "history?state=denied"}
    )
    resp = await browser.client.get(resp.headers["Location"], allow_redirects=False)
    assert resp.status == 302
    location = urlsplit(resp.headers["Location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == idp.authorization_endpoint
    query = {k: v[0] for k, v in parse_qs(location.query).items()}
    assert query["client_id"] == "people" and query["response_type"] == "code"
    assert query["code_challenge_method"] == "S256" and len(query["code_challenge"]) == 43
    assert len(query["state"]) >= 32 and len(query["nonce"]) >= 32
    assert set(query["scope"].split()) == {"openid", "email", "profile"}
    port = browser.client.port
    assert query["redirect_uri"] == f"http://127.0.0.1:{port}{UI}callback"
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith("countersign_ui_login=")


async def test_login_sets_a_session_cookie_with_safe_flags_and_shows_the_inbox(inbox: Any) -> None:
    make, _, _ = inbox
    browser = await make()
    resp = await browser.login("alice@example.com", UI + "history")
    assert resp.status == 303 and resp.headers["Location"] == UI + "history"
    cookies = resp.headers.getall("Set-Cookie")
    session = next(c for c in cookies if c.startswith("countersign_ui="))
    flags = {part.strip().lower() for part in session.split(";")[1:]}
    assert {"httponly", "samesite=lax", "path=/_countersign/ui/"} <= flags
    assert "secure" not in flags  # http://127.0.0.1: no public_url with https
    # The session ends at most session_grace_seconds after the ID token's exp (600 s here).
    payload = Signer(SECRET, "session").load(session.split(";")[0].split("=", 1)[1])
    assert payload is not None and payload["exp"] <= time.time() + 600 + 3600 + 5
    assert payload["sub"] == "alice@example.com" and payload["ev"] is True
    assert any(c.startswith("countersign_ui_login=") and "Max-Age=0" in c for c in cookies)
    status, html = await browser.page(UI)
    assert status == 200 and "alice@example.com" in html and "Nothing is waiting for you" in html


def test_cookies_are_secure_under_https_and_signed_per_purpose() -> None:
    cookies = Cookies(SECRET, secure=True)
    response = web.Response()
    from proxy.model import Identity

    session = Session.new(Identity(subject="s", issuer="i"), 2e9)
    cookies.set_session(response, session)
    header = response.cookies.output(header="").strip()
    assert header.startswith("__Secure-countersign_ui=")
    assert "Secure" in header and "HttpOnly" in header and "SameSite=Lax" in header
    # A session cookie is no login cookie (one key per purpose), and a forged one is refused.
    value = cookies._session.sign(session.to_payload())
    assert Signer(SECRET, "login").load(value) is None
    assert Signer(SECRET, "session").load(value) is not None
    assert Signer("t" * 40, "session").load(value) is None
    assert Signer(SECRET, "session").load(value[:-2] + "AA") is None
    expired = Signer(SECRET, "session").sign({**session.to_payload(), "exp": 1})
    assert Signer(SECRET, "session").load(expired) is None


async def test_callback_refuses_a_state_that_does_not_match(inbox: Any) -> None:
    make, _, _ = inbox
    browser = await make()
    resp = await browser.client.get(UI + "login", allow_redirects=False)
    assert resp.status == 302
    resp = await browser.client.get(
        UI + "callback", params={"code": "x", "state": "not-the-state"}, allow_redirects=False
    )
    assert resp.status == 400
    assert "does not match the login this browser started" in await resp.text()
    assert not any(c.startswith("countersign_ui=") for c in resp.headers.getall("Set-Cookie", []))
    # Without a login in flight at all:
    other = await make()
    resp = await other.client.get(UI + "callback", params={"code": "x", "state": "y"})
    assert resp.status == 400 and "No login is in progress" in await resp.text()
    status, _ = await other.page(UI)
    assert status == 302


@pytest.mark.parametrize(
    "target",
    [
        "https://evil.example/",
        "//evil.example/_countersign/ui/",
        "/_countersign/ui//evil.example",
        "/_countersign/ui/../../cloud/exports",
        "/_countersign/ui/%2e%2e/x",
        "/\\evil.example",
        "/cloud/exports/x",
    ],
)
async def test_login_never_redirects_off_the_inbox(inbox: Any, target: str) -> None:
    make, _, _ = inbox
    browser = await make()
    resp = await browser.login("alice@example.com", target)
    assert resp.status == 303 and resp.headers["Location"] == UI


def test_safe_next_keeps_paths_under_the_inbox() -> None:
    assert (
        safe_next("/_countersign/ui/approvals/apr_x?decided=1")
        == "/_countersign/ui/approvals/apr_x?decided=1"
    )
    assert safe_next(None) == UI and safe_next("") == UI
    assert safe_next("/_countersign/ui/\r\nSet-Cookie: x") == UI


async def test_logout_needs_the_token_and_ends_the_session(inbox: Any) -> None:
    make, _, _ = inbox
    browser = await make()
    await browser.login("alice@example.com")
    resp = await browser.client.post(UI + "logout", data={"csrf": "wrong"}, allow_redirects=False)
    assert resp.status == 403
    assert (await browser.page(UI))[0] == 200, "a refused logout changes nothing"
    csrf = await browser.csrf()
    resp = await browser.client.post(UI + "logout", data={"csrf": csrf}, allow_redirects=False)
    assert resp.status == 200 and "You are logged out" in await resp.text()
    cleared = [c for c in resp.headers.getall("Set-Cookie") if c.startswith("countersign_ui=")]
    assert cleared and "Max-Age=0" in cleared[0]
    assert (await browser.page(UI))[0] == 302


# -- deciding --------------------------------------------------------------------------------


async def test_approve_in_the_inbox_is_the_same_person_and_audit_as_the_api(inbox: Any) -> None:
    make, sink, agent = inbox
    call = held(agent, **{"Countersign-Reason": "monthly export \u202eevil"})
    approval_id = await pending_id(agent)
    alice = await make()
    await alice.login("alice@example.com")
    status, html = await alice.page(UI)
    assert status == 200 and "Waiting for you (1)" in html and approval_id in html
    status, html = await alice.page(f"{UI}approvals/{approval_id}")
    assert status == 200
    for shown in ("agent-key", "bob@example.com", EXPORT, "exports", "0 of 1 approval"):
        assert shown in html, shown
    assert "&lt;U+202E&gt;" in html and "\u202e" not in html  # the bidi override made visible
    assert ">Approve</button>" in html and ">Deny</button>" in html
    assert 'id="body-pretty">{\n  &#34;format&#34;: &#34;csv&#34;\n}' in html  # pretty-printed
    resp = await alice.decide(approval_id, "approve", "fine")
    assert resp.status == 303
    assert resp.headers["Location"] == f"{UI}approvals/{approval_id}?decided=approve"
    status, _ = await asyncio.wait_for(call, 5)
    assert status == 200, "the held request ran once approved"
    decided = sink.named("approval.decided")
    assert len(decided) == 1 and decided[0]["channel"] == "web"
    assert decided[0]["approver"]["person"] == "alice@example.com"
    view = await state_of(agent, approval_id)
    assert view["decisions"][0]["channel"] == "web"
    assert view["decisions"][0]["approver"]["person"] == "alice@example.com"
    status, html = await alice.page(f"{UI}history")
    assert status == 200 and approval_id in html and "via web" in html


async def test_a_web_approval_and_an_api_approval_by_the_same_person_count_once(
    inbox: Any, idp: TestIdP
) -> None:
    make, _, agent = inbox
    call = asyncio.create_task(
        agent.post("/cloud/iam/users", json={"name": "x"}, headers=AGENT)  # quorum 2
    )
    HELD.append(call)
    approval_id = await pending_id(agent)
    alice = await make()
    await alice.login("alice@example.com")
    assert (await alice.decide(approval_id, "approve")).status == 303
    token = await idp.user_token("alice@example.com")  # alice through the API: one person
    resp = await agent.post(
        f"{API}/{approval_id}/decision", json={"verdict": "approve"}, headers=bearer(token)
    )
    assert resp.status == 409 and (await resp.json())["error"]["code"] == "already_approved"
    status, html = await alice.page(f"{UI}approvals/{approval_id}")
    assert (
        status == 200 and "1 of 2 approvals" in html and "you already approved this request" in html
    )
    call.cancel()


async def test_deny_needs_a_reason_and_the_agent_reads_it(inbox: Any) -> None:
    make, sink, agent = inbox
    call = held(agent)
    approval_id = await pending_id(agent)
    alice = await make()
    await alice.login("alice@example.com")
    resp = await alice.decide(approval_id, "deny", "")
    assert resp.status == 400 and "A denial needs a reason" in await resp.text()
    assert (await state_of(agent, approval_id))["state"] == "pending"
    resp = await alice.decide(approval_id, "deny", "not this quarter")
    assert resp.status == 303
    status, body = await asyncio.wait_for(call, 5)
    assert status == 403 and body["error"]["code"] == "approval_denied"
    assert body["error"]["reason"] == "not this quarter"
    assert sink.named("approval.decided")[0]["channel"] == "web"


@pytest.mark.parametrize("csrf", [None, "", "wrong-token"])
async def test_a_decision_without_the_right_csrf_token_is_refused(
    inbox: Any, csrf: str | None
) -> None:
    make, sink, agent = inbox
    call = held(agent)
    approval_id = await pending_id(agent)
    alice = await make()
    await alice.login("alice@example.com")
    resp = await alice.decide(approval_id, "approve", "ok", csrf=csrf)
    assert resp.status == 403 and "Location" not in resp.headers
    assert "CSRF token is missing or wrong" in await resp.text()
    assert (await state_of(agent, approval_id))["state"] == "pending"
    assert sink.named("approval.decided") == []
    # Another person's token is no better.
    bob = await make()
    await bob.login("bob@example.com")
    resp = await alice.decide(approval_id, "approve", "ok", csrf=await bob.csrf())
    assert resp.status == 403
    assert (await state_of(agent, approval_id))["state"] == "pending"
    call.cancel()


async def test_a_decision_without_a_session_decides_nothing(inbox: Any) -> None:
    make, _, agent = inbox
    call = held(agent)
    approval_id = await pending_id(agent)
    stranger = await make()
    resp = await stranger.decide(approval_id, "approve", csrf="x")
    assert resp.status == 403 and "Location" not in resp.headers
    assert (await state_of(agent, approval_id))["state"] == "pending"
    call.cancel()


async def test_the_owner_of_the_agent_is_refused_in_words(inbox: Any) -> None:
    make, sink, agent = inbox
    call = held(agent)
    approval_id = await pending_id(agent)
    bob = await make()  # agent-key acts for bob@example.com; bob is in data-owners
    await bob.login("bob@example.com")
    status, html = await bob.page(UI)
    assert "Nothing is waiting for you" in html and approval_id in html  # under "other"
    status, html = await bob.page(f"{UI}approvals/{approval_id}")
    assert status == 200 and "made on your behalf" in html and ">Approve</button>" not in html
    csrf = await bob.csrf(f"{UI}approvals/{approval_id}")
    resp = await bob.decide(approval_id, "approve", "mine", csrf=csrf)
    assert resp.status == 403 and "Location" not in resp.headers
    html = await resp.text()
    assert 'data-code="self_approval"' in html
    assert "nobody may approve their own request or one made on their behalf" in html
    assert (await state_of(agent, approval_id))["state"] == "pending"
    assert sink.named("approval.decided") == []
    call.cancel()


async def test_a_non_approver_neither_sees_nor_decides(inbox: Any) -> None:
    make, _, agent = inbox
    call = held(agent)
    approval_id = await pending_id(agent)
    mallory = await make()
    await mallory.login("mallory@example.com")
    status, html = await mallory.page(UI)
    assert status == 200 and approval_id not in html
    status, _ = await mallory.page(f"{UI}approvals/{approval_id}")
    assert status == 404
    resp = await mallory.decide(approval_id, "approve", csrf=await mallory.csrf())
    assert resp.status == 404
    assert (await state_of(agent, approval_id))["state"] == "pending"
    call.cancel()


async def test_body_download_is_the_exact_bytes_and_the_page_marks_redactions(inbox: Any) -> None:
    make, _, agent = inbox
    raw = b'{"format": "csv",  "password": "hunter2", "format": "json"}'
    call = asyncio.create_task(
        agent.post(EXPORT, data=raw, headers={**AGENT, "Content-Type": "application/json"})
    )
    HELD.append(call)
    approval_id = await pending_id(agent)
    alice = await make()
    await alice.login("alice@example.com")
    status, html = await alice.page(f"{UI}approvals/{approval_id}")
    assert status == 200 and "hunter2" not in html
    assert "repeats key(s) format" in html  # no pretty view that would hide a duplicate key
    resp = await alice.client.get(f"{UI}approvals/{approval_id}/body")
    assert resp.status == 200 and await resp.read() == raw
    assert resp.headers["Content-Disposition"].startswith("attachment")
    call.cancel()


async def test_live_updates_tell_the_page_when_an_approval_changes(inbox: Any) -> None:
    make, _, agent = inbox
    call = held(agent)
    approval_id = await pending_id(agent)
    alice = await make()
    await alice.login("alice@example.com")
    resp = await alice.client.get(UI + "events", params={"approval": approval_id})
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert (await resp.content.readline()).startswith(b"retry:")
    token_resp = await agent.post(
        f"{API}/{approval_id}/decision",
        json={"verdict": "deny", "reason": "no"},
        headers=bearer(ALICE_KEY),
    )
    assert token_resp.status == 200
    seen = b""
    while b"event: changed" not in seen:
        seen += await asyncio.wait_for(resp.content.readline(), 8)
    resp.close()
    await asyncio.wait_for(call, 5)


def test_web_login_without_public_url_needs_a_loopback_listener() -> None:
    text = """
server: {listen: "0.0.0.0:8080"}
identity:
  web_login: {issuer: "https://idp.example.com", client_id: ui, session_secret: "${S}"}
"""
    with pytest.raises(Exception, match=r"identity.web_login: needs server.public_url"):
        load_settings_text(text, "c.yaml", env={"S": SECRET})
    public = text.replace("server: {", 'server: {public_url: "https://cs.example.com", ')
    assert load_settings_text(public, "c.yaml", env={"S": SECRET}).identity.web_login
    with pytest.raises(Exception, match="session_secret: must be at least 32 characters"):
        load_settings_text(public, "c.yaml", env={"S": "short"})
