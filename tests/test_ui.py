"""The approvers' web inbox in process, logging in at the real test IdP (authorization code +
PKCE): sessions, cookies, CSRF, decisions through the same checks and audit as the API."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Any
from unittest.mock import patch
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import build_app
from proxy.audit import AuditLog
from proxy.config import ClaimsSettings, Settings, WebLoginSettings, load_settings_text
from proxy.ui import views
from proxy.ui.login import Endpoints, WebLogin
from proxy.ui.session import Cookies, Session, Signer, safe_next
from tests import helpers
from tests.conftest import Client
from tests.helpers import AGENT_KEY, ALICE_KEY, ListSink, bearer, settings_for
from tests.idp_fixture import TestIdP

UI = "/_countersign/ui/"
API = "/_countersign/api/approvals"
AGENT = bearer(AGENT_KEY)  # agent-key acts for bob@example.com
EXPORT = "/cloud/exports/customers"
REPORT = "/cloud/reports/weekly"  # rule "reports": approvers may grant 3 more for 10 minutes
SECRET = "s" * 40
GRANTS = "/_countersign/api/grants"

# One more rule beside the shared test config's: it allows grants and tells approvers its risk.
# Its approvers are alice and the "auditors" (carol): bob, the agent's owner, sees its grants
# (as he sees his agent's approvals) but is no approver of it.
REPORTS_RULE = """\
    - name: reports
      route: cloud
      methods: [POST]
      paths: ["/cloud/reports/**"]
      when: {{groups: [agents]}}
      action: approve
      approvers: {{groups: [auditors], users: ["alice@example.com"]}}
      grant: {{max_uses: 3, max_seconds: 600}}
      risk: high
      note: "Reports leave the company: check the recipient."
"""


def inbox_settings(upstream: str, idp: TestIdP, **web_login: Any) -> Settings:
    text = helpers.BASE_CONFIG.replace(
        "    - name: iam\n", REPORTS_RULE + "    - name: iam\n", 1
    ).replace(
        'groups: {{data-owners: ["carol@example.com"]}}',
        'groups: {{data-owners: ["carol@example.com"], auditors: ["carol@example.com"]}}',
    )
    assert text.count("auditors") == 2
    with patch.object(helpers, "BASE_CONFIG", text):
        base = settings_for(
            upstream, issuers=f'[{{issuer: "{idp.issuer}", audiences: [countersign]}}]'
        )
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
        self,
        approval_id: str,
        verdict: str,
        reason: str = "",
        csrf: str | None = "page",
        **more: str,
    ) -> aiohttp.ClientResponse:
        form = {"verdict": verdict, "reason": reason, **more}
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
        client._server = server
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


def held(
    agent: Client, path: str = EXPORT, body: Any = None, **headers: str
) -> asyncio.Task[tuple[int, dict[str, Any]]]:
    async def call() -> tuple[int, dict[str, Any]]:
        resp = await agent.post(
            path, json={"format": "csv"} if body is None else body, headers={**AGENT, **headers}
        )
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


async def test_logout_needs_the_token_and_ends_the_session_here_and_at_the_idp(
    inbox: Any, idp: TestIdP
) -> None:
    make, _, _ = inbox
    browser = await make()
    await browser.login("alice@example.com")
    resp = await browser.client.post(UI + "logout", data={"csrf": "wrong"}, allow_redirects=False)
    assert resp.status == 403
    assert (await browser.page(UI))[0] == 200, "a refused logout changes nothing"
    csrf = await browser.csrf()
    resp = await browser.client.post(UI + "logout", data={"csrf": csrf}, allow_redirects=False)
    cleared = [c for c in resp.headers.getall("Set-Cookie") if c.startswith("countersign_ui=")]
    assert cleared and "Max-Age=0" in cleared[0]
    html = await resp.text()
    assert resp.status == 200 and "You are logged out of the inbox" in html
    assert (await browser.page(UI))[0] == 302
    # The IdP's discovery names an end_session_endpoint: the page moves on there by itself
    # (RP-Initiated Logout; a redirect of the POST would break the CSP's form-action 'self'),
    # with the ID token as hint and the inbox's "logged out" page to come back to.
    link = re.search(r'<a id="idp-logout" href="([^"]+)"', html)
    refresh = re.search(r'<meta http-equiv="refresh" content="0;url=([^"]+)"', html)
    assert link and refresh and link.group(1) == refresh.group(1)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as at_idp:
        async with at_idp.get(idp.issuer + "/.well-known/openid-configuration") as answer:
            end_session = (await answer.json())["end_session_endpoint"]
        location = link.group(1).replace("&amp;", "&")
        parts = urlsplit(location)
        assert f"{parts.scheme}://{parts.netloc}{parts.path}" == end_session
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        back = f"http://127.0.0.1:{browser.client.port}{UI}logged-out"
        assert query["client_id"] == "people" and query["post_logout_redirect_uri"] == back
        assert query["id_token_hint"].count(".") == 2
        # The IdP accepts both (the hint verifies, the URI is registered) and sends us back.
        async with at_idp.get(location, allow_redirects=False) as answer:
            assert answer.status == 200, await answer.text()
            html = await answer.text()
        action = re.search(r'<form method="post" action="([^"]+)"', html)
        xsrf = re.search(r'name="xsrf" value="([^"]+)"', html)
        assert action and xsrf, html
        async with at_idp.post(
            urljoin(location, action.group(1)),
            data={"xsrf": xsrf.group(1), "logout": "yes"},
            allow_redirects=False,
        ) as answer:
            assert answer.status in (302, 303), await answer.text()
            assert answer.headers["Location"].startswith(back)
    status, html = await browser.page(UI + "logged-out")
    assert status == 200 and "logged out of the inbox and of your identity provider" in html


async def test_logout_stays_in_the_inbox_when_the_idp_has_no_end_session_endpoint(
    idp: TestIdP,
) -> None:
    login = WebLogin(
        WebLoginSettings(issuer=idp.issuer, client_id="people", session_secret=SECRET),
        (),
        ClaimsSettings(),
        aiohttp.ClientSession(),
    )
    try:
        login._endpoints = (time.monotonic(), Endpoints("https://i/a", "https://i/t", None))
        assert await login.logout_url("a.b.c", "https://cs/_countersign/ui/logged-out") is None
        login._endpoints = (
            time.monotonic(),
            Endpoints("https://i/a", "https://i/t", "https://i/logout?tenant=x"),
        )
        url = await login.logout_url(None, "https://cs/_countersign/ui/logged-out")
        assert url is not None and url.startswith("https://i/logout?tenant=x&")
        query = parse_qs(urlsplit(url).query)
        assert "id_token_hint" not in query and query["client_id"] == ["people"]
    finally:
        await login._session.close()


def test_a_large_id_token_is_not_kept_in_the_session_cookie() -> None:
    from proxy.model import Identity

    identity = Identity(subject="s", issuer="i")
    assert Session.new(identity, 2e9, "x" * 100).id_token == "x" * 100
    assert Session.new(identity, 2e9, "x" * 5000).id_token is None
    kept = Session.from_payload(Session.new(identity, 2e9, "a.b.c").to_payload())
    assert kept is not None and kept.id_token == "a.b.c"


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


# -- grants --------------------------------------------------------------------------------


async def pending_on(agent: Client, path: str) -> str:
    for _ in range(200):
        resp = await agent.get(API, params={"state": "pending"}, headers=bearer(ALICE_KEY))
        found = [a for a in (await resp.json())["approvals"] if a["path"] == path]
        if found:
            return str(found[0]["approval_id"])
        await asyncio.sleep(0.02)
    raise AssertionError(f"no pending approval for {path} appeared")


def grant_form(uses: str = "2", minutes: str = "5") -> dict[str, str]:
    return {"grant_uses": uses, "grant_minutes": minutes}


async def test_the_grant_is_offered_only_where_the_rule_allows_it(inbox: Any) -> None:
    make, sink, agent = inbox
    export = held(agent)
    export_id = await pending_on(agent, EXPORT)
    report = held(agent, REPORT)
    report_id = await pending_on(agent, REPORT)
    alice = await make()
    await alice.login("alice@example.com")
    status, html = await alice.page(f"{UI}approvals/{export_id}")
    assert status == 200 and 'id="grant-offer"' not in html and "approve+grant" not in html
    # Asked for anyway (a hand-made form): refused in words, nothing decided.
    resp = await alice.decide(export_id, "approve+grant", "ok", **grant_form("1", "1"))
    assert resp.status == 400 and "Location" not in resp.headers
    html = await resp.text()
    assert "grants are not allowed for rule" in html and 'data-code="invalid_request"' in html
    assert (await state_of(agent, export_id))["state"] == "pending"

    status, html = await alice.page(f"{UI}approvals/{report_id}")
    assert status == 200 and 'id="grant-offer"' in html
    # Two number inputs, pre-filled with the rule's maxima and bounded by them.
    assert re.search(r'id="grant-uses" name="grant_uses" [^>]*min="1" max="3" value="3"', html)
    assert re.search(r'id="grant-time" name="grant_minutes" [^>]*min="1" max="10" value="10"', html)
    assert "Approve this and the next" in html and "minutes" in html
    covers = html[html.index('id="grant-covers"') : html.index("</ul>", html.index("grant-covers"))]
    for said in ("same agent", "agent-key", "bob@example.com", "same rule", "reports"):
        assert said in covers, said
    assert "<code>POST /cloud/reports/weekly</code>" in covers and "exactly this path" in covers
    assert "query, headers and body" in html  # what a grant does not pin
    # The rule's risk and note, and who may approve.
    assert 'class="badge risk-high"' in html and "Reports leave the company" in html
    approvers = html[html.index('id="approvers"') : html.index("</td>", html.index('"approvers"'))]
    for said in ("auditors", "alice@example.com", "listed members: carol@example.com"):
        assert said in approvers, said
    assert sink.named("approval.decided") == []
    export.cancel()
    report.cancel()


@pytest.mark.parametrize(
    ("uses", "minutes", "words"),
    [
        ("4", "10", "allows a grant of at most 3 uses"),
        ("3", "11", "for at most 600 seconds"),
        ("0", "5", "must be at least 1"),
        ("two", "5", "must be a whole number"),
        ("2", "", "the number of seconds is missing"),
        ("", "5", "the number of requests is missing"),
        ("2", "-1", "must be a whole number"),
    ],
)
async def test_a_grant_beyond_the_rules_bounds_decides_nothing(
    inbox: Any, uses: str, minutes: str, words: str
) -> None:
    make, sink, agent = inbox
    call = held(agent, REPORT)
    approval_id = await pending_on(agent, REPORT)
    alice = await make()
    await alice.login("alice@example.com")
    resp = await alice.decide(approval_id, "approve+grant", "ok", **grant_form(uses, minutes))
    assert resp.status == 400 and "Location" not in resp.headers
    html = await resp.text()
    assert words in html and "nothing was decided" in html.lower()
    assert (
        f'name="grant_uses" type="number" inputmode="numeric" min="1" max="3" value="{uses}"'
        in (html)
    ), "what was typed is kept"
    assert (await state_of(agent, approval_id))["state"] == "pending"
    assert sink.named("approval.decided") == [] and sink.named("grant.created") == []
    call.cancel()


async def test_a_grant_form_without_the_right_csrf_token_is_refused(inbox: Any) -> None:
    make, sink, agent = inbox
    call = held(agent, REPORT)
    approval_id = await pending_on(agent, REPORT)
    alice = await make()
    await alice.login("alice@example.com")
    for csrf in (None, "wrong"):
        resp = await alice.decide(approval_id, "approve+grant", "ok", csrf=csrf, **grant_form())
        assert resp.status == 403 and "CSRF token is missing or wrong" in await resp.text()
    assert (await state_of(agent, approval_id))["state"] == "pending"
    assert sink.named("approval.decided") == []
    call.cancel()


async def approve_with_grant(make: Any, agent: Client, uses: str = "2") -> tuple[Any, str, str]:
    """alice approves a held report with a grant; returns (alice, approval id, grant id)."""
    call = held(agent, REPORT, {"week": 47})
    approval_id = await pending_on(agent, REPORT)
    alice = await make()
    await alice.login("alice@example.com")
    resp = await alice.decide(approval_id, "approve+grant", "weekly", **grant_form(uses, "5"))
    assert resp.status == 303, await resp.text()
    status, _ = await asyncio.wait_for(call, 5)
    assert status == 200
    grant = (await state_of(agent, approval_id))["grant"]
    assert grant["uses"] == int(uses) and grant["seconds"] == 300
    return alice, approval_id, str(grant["grant_id"])


async def test_an_inbox_grant_lets_the_next_request_like_it_through(inbox: Any) -> None:
    make, sink, agent = inbox
    alice, approval_id, grant_id = await approve_with_grant(make, agent)
    decided = sink.named("approval.decided")
    assert [(e["channel"], e["grant"]) for e in decided] == [("web", {"uses": 2, "seconds": 300})]
    assert [e["grant_id"] for e in sink.named("grant.created")] == [grant_id]
    status, html = await alice.page(f"{UI}approvals/{approval_id}")
    assert status == 200 and f'data-grant="{grant_id}"' in html
    assert re.search(r"Uses left: <strong>2</strong> of 2", html)
    assert "(and asked for a grant: the next 2 like it for 5 minutes)" in html
    # The next request of the same shape (another body) passes without a human.
    resp = await agent.post(REPORT, json={"week": 48}, headers=AGENT)
    assert resp.status == 200 and resp.headers["Countersign-Grant-Id"] == grant_id
    assert [e["grant_id"] for e in sink.named("grant.used")] == [grant_id]
    status, html = await alice.page(f"{UI}approvals/{approval_id}")
    assert re.search(r"Uses left: <strong>1</strong> of 2", html) and "badge active" in html
    # Another path is another shape: held for a human.
    other = held(agent, REPORT + "/extra", {"week": 48})
    await pending_on(agent, REPORT + "/extra")
    other.cancel()


async def test_the_grants_page_lists_and_revokes_and_refuses_non_approvers(
    inbox: Any,
) -> None:
    make, sink, agent = inbox
    alice, approval_id, grant_id = await approve_with_grant(make, agent, "3")
    status, html = await alice.page(f"{UI}grants")
    assert status == 200 and "Live grants (1)" in html
    card = html[html.index(f'data-grant="{grant_id}"') :]
    for shown in ("reports", "POST /cloud/reports/weekly", "agent-key", "bob@example.com"):
        assert shown in card, shown
    assert re.search(r'class="uses-left">3</strong> of 3', card) and "expires" in card
    assert f'action="{UI}grants/{grant_id}/revoke"' in card and ">Revoke</button>" in card

    # bob: the agent's owner sees the grant, may not revoke it, and is told why.
    bob = await make()
    await bob.login("bob@example.com")
    status, html = await bob.page(f"{UI}grants")
    assert status == 200 and f'data-grant="{grant_id}"' in html and ">Revoke</button>" not in html
    resp = await bob.client.post(
        f"{UI}grants/{grant_id}/revoke", data={"csrf": await bob.csrf()}, allow_redirects=False
    )
    assert resp.status == 403 and "Location" not in resp.headers
    html = await resp.text()
    assert 'data-code="not_an_approver"' in html and "only an approver of its rule" in html
    assert sink.named("grant.revoked") == []
    # mallory may not even see it.
    mallory = await make()
    await mallory.login("mallory@example.com")
    status, html = await mallory.page(f"{UI}grants")
    assert status == 200 and grant_id not in html
    resp = await mallory.client.post(
        f"{UI}grants/{grant_id}/revoke", data={"csrf": await mallory.csrf()}
    )
    assert resp.status == 404
    # alice's form needs her token.
    for csrf in (None, "wrong", await bob.csrf()):
        data = {} if csrf is None else {"csrf": csrf}
        resp = await alice.client.post(
            f"{UI}grants/{grant_id}/revoke", data=data, allow_redirects=False
        )
        assert resp.status == 403 and "CSRF token is missing or wrong" in await resp.text()
    assert sink.named("grant.revoked") == []

    resp = await alice.client.post(
        f"{UI}grants/{grant_id}/revoke",
        data={"csrf": await alice.csrf(f"{UI}grants")},
        allow_redirects=False,
    )
    assert resp.status == 303 and resp.headers["Location"] == f"{UI}grants?revoked={grant_id}"
    status, html = await alice.page(resp.headers["Location"])
    assert f"Grant {grant_id} is revoked" in html and "Live grants (0)" in html
    revoked = sink.named("grant.revoked")
    assert [(e["grant_id"], e["revoked_by"]["person"]) for e in revoked] == [
        (grant_id, "alice@example.com")
    ]
    api = await agent.get(f"{GRANTS}/{grant_id}", headers=bearer(ALICE_KEY))
    assert (await api.json())["state"] == "revoked"
    status, html = await alice.page(f"{UI}approvals/{approval_id}")
    assert "badge revoked" in html
    # The next request like it waits for a human again.
    again = held(agent, REPORT, {"week": 49})
    await pending_on(agent, REPORT)
    assert not again.done()
    again.cancel()


# -- live updates and paging -----------------------------------------------------------------


async def test_the_pending_list_updates_live_after_a_decision_elsewhere(inbox: Any) -> None:
    make, _, agent = inbox
    call = held(agent)
    approval_id = await pending_id(agent)
    alice = await make()
    await alice.login("alice@example.com")
    _, html = await alice.page(UI)
    assert 'data-events="/_countersign/ui/events"' in html
    resp = await alice.client.get(UI + "events")  # the pending page's stream
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert (await resp.content.readline()).startswith(b"retry:")
    decided = await agent.post(  # decided through the API, not in this browser
        f"{API}/{approval_id}/decision",
        json={"verdict": "approve", "reason": "via the API"},
        headers=bearer(ALICE_KEY),
    )
    assert decided.status == 200
    seen = b""
    while b"event: changed" not in seen:
        seen += await asyncio.wait_for(resp.content.readline(), 8)
    resp.close()
    _, html = await alice.page(UI)
    assert approval_id not in html and "Nothing is waiting for you" in html
    await asyncio.wait_for(call, 5)


async def test_history_pages_beyond_one_page(inbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(views, "PAGE_SIZE", 2)
    make, _, agent = inbox
    ids = []
    for n in range(5):
        path = f"/cloud/exports/part-{n}"
        call = held(agent, path)
        approval_id = await pending_on(agent, path)
        resp = await agent.post(
            f"{API}/{approval_id}/decision",
            json={"verdict": "deny", "reason": f"no {n}"},
            headers=bearer(ALICE_KEY),
        )
        assert resp.status == 200
        await asyncio.wait_for(call, 5)
        ids.append(approval_id)
    alice = await make()
    await alice.login("alice@example.com")
    seen: list[str] = []
    link: str | None = f"{UI}history?state=denied"
    pages = 0
    while link is not None:
        status, html = await alice.page(link)
        assert status == 200
        shown = re.findall(r'data-approval="([^"]+)"', html)
        assert len(shown) <= 2
        seen += shown
        found = re.search(r'<a href="([^"]+)" rel="next">', html)
        link = found.group(1).replace("&amp;", "&") if found else None
        if link is not None:
            assert "state=denied" in link and "cursor=" in link  # filters kept across pages
        pages += 1
        assert pages < 10
    assert pages >= 3 and seen == list(reversed(ids)), "every approval once, newest first"
    status, html = await alice.page(f"{UI}history?cursor=not-a-cursor")
    assert status == 400 and "That page link is not valid" in html
