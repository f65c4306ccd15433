"""The approvers' web inbox under `/_countersign/ui/`: pages, decisions, live updates.

Server-rendered (Jinja2, autoescaped); every page works without JavaScript. A person logs in
through `login.WebLogin`; their session (`session.Cookies`) carries the `Identity` their ID token
made, and every decision goes through `ApprovalService.decide` with channel "web": the same
person, the same checks (zero self-approval, approver authorization, quorum by person) and the
same audit as a decision through the API or Slack. Visibility is `ApprovalService.may_see`.
Grants are asked with the decision (`decide(grant_uses=, grant_seconds=)`, the rule's limits
checked by the service) and revoked with `ApprovalService.revoke_grant`, as through the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp
import jinja2
import structlog
from aiohttp import web
from multidict import MultiDictProxy

from ..approvals.service import ApprovalService
from ..audit import AuditUnavailable
from ..config import Settings, WebLoginSettings
from ..model import Approval, ApprovalState, Identity, Verdict, state
from ..model.grant import Grant, GrantState, pattern_of
from ..model.persons import canonical_email, same_person
from ..server.responses import status_for
from ..store.base import InvalidCursor, StoreUnavailable, parse_cursor
from . import text
from .login import LoginError, WebLogin
from .session import UI_PATH, Cookies, Session, safe_next

log = structlog.get_logger("countersign.ui")

BODY_SHOWN_BYTES = 256 * 1024  # larger bodies: the first part is shown, the rest downloaded
EVENTS_SECONDS = 300.0  # one live-update stream lasts this long; the browser reconnects
EVENTS_POLL_SECONDS = 5.0  # other replicas' changes are seen within this
EVENTS_KEEPALIVE_SECONDS = 15.0
PAGE_SIZE = 50

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class InboxEvents:
    """Told of every approval transition in this process (a `Notifier` of the `NotifyHub`):
    wakes the live-update streams at once. Other replicas' changes are found by polling."""

    def __init__(self) -> None:
        self._changed = asyncio.Event()

    async def notify(self, event: str, approval: Approval) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    async def aclose(self) -> None:
        return None


def _is_loopback_host(host: str) -> bool:
    import ipaddress

    name = urlsplit(f"//{host}").hostname or ""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class Inbox:
    def __init__(
        self,
        settings: Settings,
        web_login: WebLoginSettings,
        service: ApprovalService,
        events: InboxEvents,
    ) -> None:
        self._settings = settings
        self._web_login = web_login
        self._service = service
        self._events = events
        self._directory = settings.approvals.groups
        public_url = settings.server.public_url
        self._public_url = public_url.rstrip("/") if public_url else None
        self.cookies = Cookies(
            web_login.session_secret,
            secure=bool(public_url and public_url.lower().startswith("https:")),
        )
        self.login: WebLogin | None = None  # made once the loop runs (it needs a client)
        self._templates = jinja2.Environment(
            loader=jinja2.PackageLoader("proxy.ui", "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        self._templates.filters.update(
            visible=text.visible, age=text.age, left=text.left, when=text.when
        )
        self._templates.globals.update(ui=UI_PATH, has_invisible=text.has_invisible)
        package = resources.files("proxy.ui") / "static"
        self._static = {
            "app.css": ((package / "app.css").read_bytes(), "text/css"),
            "live.js": ((package / "live.js").read_bytes(), "text/javascript"),
        }

    # -- lifecycle -------------------------------------------------------------------------------

    async def lifecycle(self, app: web.Application) -> Any:
        session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        identity = self._settings.identity
        self.login = WebLogin(self._web_login, identity.issuers, identity.claims, session)
        try:
            yield
        finally:
            await session.close()

    # -- rendering -------------------------------------------------------------------------------

    def page(
        self, template: str, status: int = 200, session: Session | None = None, **context: Any
    ) -> web.Response:
        html = self._templates.get_template(template).render(
            session=session,
            me=session.identity if session is not None else None,
            csrf=session.csrf if session is not None else "",
            now=time.time(),
            status=status,
            **context,
        )
        return web.Response(
            text=html, status=status, content_type="text/html", headers=_SECURITY_HEADERS
        )

    def message(
        self, title: str, words: str, status: int, session: Session | None = None, **more: Any
    ) -> web.Response:
        return self.page("message.html", status, session, title=title, words=words, **more)

    def redirect(self, location: str, status: int = 302) -> web.Response:
        return web.Response(status=status, headers={"Location": location, **_SECURITY_HEADERS})

    def to_login(self, request: web.Request) -> web.Response:
        return self.redirect(UI_PATH + "login?" + urlencode({"next": request.path_qs}))

    # -- who may do what ---------------------------------------------------------------------------

    def why_not_decide(self, approval: Approval, identity: Identity) -> str | None:
        """None when `identity` may decide `approval` now; else why not, in words. The same
        rules `ApprovalService.decide` applies (`state.check_approver`)."""
        if approval.state is not ApprovalState.PENDING:
            return f"this approval is {approval.state.value}: it can no longer be decided"
        try:
            person = state.check_approver(approval, identity, self._directory)
        except state.ApprovalError as exc:
            return exc.message
        for decision in approval.decisions:
            if decision.person is not None and same_person(decision.person, person):
                return "you already approved this request; it waits for other approvers"
        return None

    # -- handlers ----------------------------------------------------------------------------------

    async def static(self, request: web.Request) -> web.Response:
        found = self._static.get(request.match_info["name"])
        if found is None:
            return self.message("Not found", "There is no such file.", 404)
        body, content_type = found
        return web.Response(
            body=body,
            content_type=content_type,
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    def _base(self, request: web.Request) -> str | None:
        """This inbox's origin as the IdP must call it back: `server.public_url`, else the
        request's own host when that is a loopback address; else None (no login possible)."""
        if self._public_url is not None:
            return self._public_url
        if _is_loopback_host(request.host):
            return f"http://{request.host}"
        return None

    async def login_page(self, request: web.Request) -> web.Response:
        assert self.login is not None
        target = safe_next(request.query.get("next"))
        base = self._base(request)
        if base is not None:
            redirect_uri = base + UI_PATH + "callback"
        else:
            return self.message(
                "Cannot log in here",
                "This inbox has no server.public_url, so it can only be used on a loopback "
                "address (127.0.0.1, localhost). Set server.public_url.",
                400,
            )
        try:
            url, flight = await self.login.start(redirect_uri)
        except LoginError as exc:
            return self.message("Cannot log in now", exc.message, exc.status)
        response = self.redirect(url)
        self.cookies.set_login(response, {**flight, "next": target})
        return response

    async def callback(self, request: web.Request) -> web.Response:
        assert self.login is not None
        flight = self.cookies.login(request)
        if flight is None:
            return self.message(
                "Login not completed",
                "No login is in progress in this browser (or it took longer than 10 minutes). "
                "Start again.",
                400,
                login_link=True,
            )
        url = f"{flight.get('redirect_uri', '')}?{request.query_string}"
        try:
            logged_in = await self.login.finish(url, flight)
        except LoginError as exc:
            log.warning("ui.login_refused", error=exc.message)
            response = self.message("Login refused", exc.message, exc.status, login_link=True)
            self.cookies.clear_login(response)
            return response
        now = time.time()
        expires_at = min(
            now + self._web_login.session_seconds,
            logged_in.id_token_expires_at + self._web_login.session_grace_seconds,
        )
        if expires_at <= now + 30:
            return self.message(
                "Login refused", "The ID token has already expired.", 400, login_link=True
            )
        session = Session.new(logged_in.identity, expires_at, logged_in.id_token)
        ident = logged_in.identity
        log.info("ui.login", subject=ident.subject, issuer=ident.issuer, person=ident.person)
        response = self.redirect(safe_next(str(flight.get("next", ""))), 303)
        self.cookies.clear_login(response)
        self.cookies.set_session(response, session)
        return response

    async def logout(self, request: web.Request) -> web.Response:
        session = self.cookies.session(request)
        form = await request.post()
        if session is not None and not session.csrf_ok(form.get("csrf")):
            return self._csrf_refused(session)
        # Then at the IdP too, when it offers RP-Initiated Logout: else the next visit would log
        # the same person in again without asking.
        base = self._base(request)
        end_session = None
        if session is not None and base is not None and self.login is not None:
            end_session = await self.login.logout_url(
                session.id_token, base + UI_PATH + "logged-out"
            )
        if end_session is not None:
            # A page that moves on by itself, not a redirect: the CSP's `form-action 'self'`
            # forbids a form's POST to be redirected to another origin.
            response = self.message(
                "Logged out",
                "You are logged out of the inbox; now ending your session at your identity "
                "provider.",
                200,
                idp_logout=end_session,
            )
        else:
            response = self.message(
                "Logged out", "You are logged out of the inbox.", 200, login_link=True
            )
        if session is not None:
            log.info("ui.logout", subject=session.identity.subject, idp=end_session is not None)
        self.cookies.clear_session(response)
        return response

    async def logged_out(self, request: web.Request) -> web.Response:
        """Where the IdP sends the browser back after ending its session there."""
        return self.message(
            "Logged out",
            "You are logged out of the inbox and of your identity provider.",
            200,
            login_link=True,
        )

    async def _checked_form(
        self, request: web.Request, done: str
    ) -> tuple[Session, MultiDictProxy[str | bytes | bytearray | web.FileField]] | web.Response:
        """The session and form of a POST that may change something, or the 403 page saying
        why nothing was `done` (no session, a missing or wrong CSRF token)."""
        session = self.cookies.session(request)
        form = await request.post()
        if session is None:
            return self.message(
                "Refused: you are not logged in",
                f"Your session has ended, so nothing was {done}. Log in and try again.",
                403,
                login_link=True,
            )
        if not session.csrf_ok(form.get("csrf")):
            return self._csrf_refused(session)
        return session, form

    def _csrf_refused(self, session: Session | None) -> web.Response:
        return self.message(
            "Refused: the form's token is missing or wrong",
            "This form was not sent by a page of this inbox in your session (its CSRF token is "
            "missing or wrong), so nothing was done. Reload the page and try again.",
            403,
            session,
        )

    async def pending(self, request: web.Request) -> web.Response:
        session = self.cookies.session(request)
        if session is None:
            return self.to_login(request)
        identity = session.identity
        approvals, more = await self._service.list_for(identity, ApprovalState.PENDING, 200)
        mine: list[tuple[Approval, str | None]] = []
        others: list[tuple[Approval, str | None]] = []
        for approval in approvals:
            why = self.why_not_decide(approval, identity)
            (mine if why is None else others).append((approval, why))
        return self.page(
            "pending.html",
            session=session,
            mine=mine,
            others=others,
            more=more is not None,
            events=UI_PATH + "events",
        )

    async def _visible(self, request: web.Request, session: Session) -> Approval | None:
        approval = await self._service.get(request.match_info["approval_id"])
        if approval is None or not self._service.may_see(approval, session.identity):
            return None
        return approval

    def _not_found(self, session: Session) -> web.Response:
        return self.message(
            "No such approval",
            "There is no such approval, or you may not see it.",
            404,
            session,
        )

    async def approval(self, request: web.Request) -> web.Response:
        session = self.cookies.session(request)
        if session is None:
            return self.to_login(request)
        approval = await self._visible(request, session)
        if approval is None:
            return self._not_found(session)
        done = request.query.get("decided")
        notice = None
        if done in ("approve", "deny"):
            notice = (
                "Your approval was recorded." if done == "approve" else "Your denial was recorded."
            )
        return await self._approval_page(approval, session, notice=notice)

    async def _approval_page(
        self,
        approval: Approval,
        session: Session,
        *,
        status: int = 200,
        error: str | None = None,
        error_code: str | None = None,
        notice: str | None = None,
        reason: str = "",
        asked: dict[str, str] | None = None,
    ) -> web.Response:
        view = await self._service.view_live(approval)
        body = await self._body_view(approval)
        earlier = await self._earlier(approval, session.identity)
        offer = grant_offer(approval)
        if offer is not None and asked:
            offer = {**offer, "uses": asked.get("uses", ""), "time": asked.get("time", "")}
        return self.page(
            "approval.html",
            status,
            session,
            approval=approval,
            view=view,
            body=body,
            earlier=earlier,
            offer=offer,
            why_not=self.why_not_decide(approval, session.identity),
            error=error,
            error_code=error_code,
            notice=notice,
            reason=reason,
            events=UI_PATH + "events?" + urlencode({"approval": approval.id}),
            owner_is_person=canonical_email(approval.requester.owner) is not None,
        )

    async def _body_view(self, approval: Approval) -> dict[str, Any]:
        """The body for the page: the raw text (redacted by pattern), pretty-printed when it is
        JSON without duplicate keys, and where it was cut; the exact bytes are a download."""
        view: dict[str, Any] = {"bytes": approval.body_bytes, "raw": None, "pretty": None}
        if not approval.body_bytes:
            return view
        try:
            raw = await self._service.body(approval.id)
        except state.ApprovalNotFound as exc:
            view["note"] = exc.message
            return view
        shown = raw[:BODY_SHOWN_BYTES]
        try:
            decoded = shown.decode("utf-8")
        except UnicodeDecodeError as exc:
            if len(raw) > BODY_SHOWN_BYTES and exc.start >= BODY_SHOWN_BYTES - 3:
                decoded = shown[: exc.start].decode("utf-8")
            else:
                view["note"] = f"{len(raw)} bytes of binary data: download the body to see it"
                return view
        redactor = self._service.redactor
        view["raw"] = str(redactor.value(decoded))
        view["cut"] = len(raw) > BODY_SHOWN_BYTES
        if view["cut"]:
            return view
        duplicates: list[str] = []

        def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
            seen: dict[str, Any] = {}
            for key, value in items:
                if key in seen:
                    duplicates.append(key)
                seen[key] = value
            return seen

        stripped = decoded.lstrip()
        if stripped[:1] in ("{", "["):
            try:
                parsed = json.loads(decoded, object_pairs_hook=pairs)
            except ValueError:
                view["json_note"] = "The body looks like JSON but does not parse: raw text only."
            else:
                if duplicates:
                    view["json_note"] = (
                        "The JSON repeats key(s) "
                        + ", ".join(sorted(set(duplicates)))
                        + ": upstreams may read either value, so only the raw text is shown."
                    )
                else:
                    view["pretty"] = json.dumps(
                        redactor.value(parsed), indent=2, ensure_ascii=False
                    )
        return view

    async def _earlier(self, approval: Approval, identity: Identity) -> list[Approval]:
        """This requester's recent approvals on the same rule (the newest first)."""
        recent, _ = await self._service.list_for(identity, None, 100)
        key = (approval.requester.issuer, approval.requester.subject)
        return [
            a
            for a in recent
            if a.id != approval.id
            and a.rule == approval.rule
            and (a.requester.issuer, a.requester.subject) == key
        ][:10]

    async def decide(self, request: web.Request) -> web.Response:
        checked = await self._checked_form(request, "decided")
        if isinstance(checked, web.Response):
            return checked
        session, form = checked
        approval = await self._visible(request, session)
        if approval is None:
            return self._not_found(session)
        reason_value = form.get("reason")
        reason = reason_value if isinstance(reason_value, str) else ""
        asked = {
            "uses": _form_text(form, "grant_uses"),
            "time": _form_text(form, "grant_minutes") or _form_text(form, "grant_seconds"),
        }
        chosen = str(form.get("verdict"))
        with_grant = chosen == Verdict.APPROVE.value + GRANT_SUFFIX
        try:
            verdict = Verdict.APPROVE if with_grant else Verdict(chosen)
        except ValueError:
            return await self._approval_page(
                approval, session, status=400, error='Choose "Approve" or "Deny".', reason=reason
            )
        grant_uses = grant_seconds = None
        if with_grant:
            try:
                grant_uses, grant_seconds = _grant_asked(form)
            except _BadGrant as exc:
                return await self._approval_page(
                    approval,
                    session,
                    status=400,
                    error=f"The grant was not understood: {exc}. Nothing was decided.",
                    error_code="invalid_request",
                    reason=reason,
                    asked=asked,
                )
        try:
            decided = await self._service.decide(
                approval.id,
                session.identity,
                verdict,
                reason,
                channel="web",
                grant_uses=grant_uses,
                grant_seconds=grant_seconds,
            )
        except state.ApprovalError as exc:
            current = exc.approval or await self._service.get(approval.id) or approval
            return await self._approval_page(
                current,
                session,
                status=status_for(exc.code),
                error=_refusal_words(exc),
                error_code=exc.code,
                reason=reason,
                asked=asked if grant_uses is not None else None,
            )
        return self.redirect(
            f"{UI_PATH}approvals/{decided.id}?{urlencode({'decided': verdict.value})}", 303
        )

    # -- grants ------------------------------------------------------------------------------

    async def grants(self, request: web.Request) -> web.Response:
        session = self.cookies.session(request)
        if session is None:
            return self.to_login(request)
        notice = None
        revoked = request.query.get("revoked", "")
        if re.fullmatch(r"grt_[A-Za-z0-9_-]{1,80}", revoked):
            notice = f"Grant {revoked} is revoked: it lets nothing more through."
        return await self._grants_page(session, notice=notice)

    async def _grants_page(
        self,
        session: Session,
        *,
        status: int = 200,
        error: str | None = None,
        error_code: str | None = None,
        notice: str | None = None,
    ) -> web.Response:
        identity = session.identity
        now = time.time()
        live: list[dict[str, Any]] = []
        ended: list[dict[str, Any]] = []
        for grant in await self._service.grants_for(identity):
            shown = self._grant_row(grant, identity, now)
            (live if shown["active"] else ended).append(shown)
        return self.page(
            "grants.html",
            status,
            session,
            live=live,
            ended=ended[:50],
            error=error,
            error_code=error_code,
            notice=notice,
        )

    def _grant_row(self, grant: Grant, identity: Identity, now: float) -> dict[str, Any]:
        grant_state = grant.state(now)
        return {
            "view": self._service.grant_view(grant),
            "grant": grant,
            "state": grant_state.value,
            "active": grant_state is GrantState.ACTIVE,
            "may_revoke": self._service.may_revoke(grant, identity),
        }

    async def revoke_grant(self, request: web.Request) -> web.Response:
        """End a grant at once: the same service call (checks and `grant.revoked` audit) as
        `DELETE /_countersign/api/grants/{id}`."""
        checked = await self._checked_form(request, "revoked")
        if isinstance(checked, web.Response):
            return checked
        session, _ = checked
        grant_id = request.match_info["grant_id"]
        try:
            revoked = await self._service.revoke_grant(grant_id, session.identity)
        except state.ApprovalNotFound:
            return self.message(
                "No such grant", "There is no such grant, or you may not see it.", 404, session
            )
        except state.NotAnApprover as exc:
            return await self._grants_page(
                session,
                status=403,
                error=f"You cannot revoke grant {grant_id}: only an approver of its rule may "
                f"({exc.message}). Nothing was changed.",
                error_code=exc.code,
            )
        log.info("ui.grant_revoked", grant_id=revoked.id, subject=session.identity.subject)
        return self.redirect(f"{UI_PATH}grants?{urlencode({'revoked': revoked.id})}", 303)

    async def body(self, request: web.Request) -> web.Response:
        session = self.cookies.session(request)
        if session is None:
            return self.to_login(request)
        approval = await self._visible(request, session)
        if approval is None:
            return self._not_found(session)
        try:
            raw = await self._service.body(approval.id)
        except state.ApprovalNotFound as exc:
            return self.message("Body not kept", exc.message, 404, session)
        return web.Response(
            body=raw,
            headers={
                "Content-Type": "application/octet-stream",
                "Content-Disposition": f'attachment; filename="{approval.id}.body"',
                "X-Content-Type-Options": "nosniff",
                "Cache-Control": "no-store",
                "Countersign-Body-Sha256": approval.body_sha256,
            },
        )

    async def history(self, request: web.Request) -> web.Response:
        session = self.cookies.session(request)
        if session is None:
            return self.to_login(request)
        wanted = request.query.get("state", "")
        rule = request.query.get("rule", "").strip()
        requester = request.query.get("requester", "").strip()
        cursor = request.query.get("cursor") or None
        try:
            approval_state = ApprovalState(wanted) if wanted else None
        except ValueError:
            return self.message("Bad filter", f"Unknown state {wanted!r}.", 400, session)
        try:
            if cursor is not None:
                parse_cursor(cursor)
            approvals, next_cursor = await self._service.list_for(
                session.identity, approval_state, PAGE_SIZE, cursor
            )
        except InvalidCursor:
            return self.message("Bad page", "That page link is not valid.", 400, session)
        needle = requester.lower()
        shown = [
            a
            for a in approvals
            if (approval_state is not None or a.state is not ApprovalState.PENDING)
            and (not rule or a.rule == rule)
            and (
                not needle
                or needle
                in {
                    (a.requester.subject or "").lower(),
                    (a.requester.email or "").lower(),
                    (a.requester.owner or "").lower(),
                }
            )
        ]
        filters = {"state": wanted, "rule": rule, "requester": requester}
        next_link = None
        if next_cursor is not None:
            next_link = UI_PATH + "history?" + urlencode({**filters, "cursor": next_cursor})
        return self.page(
            "history.html",
            session=session,
            approvals=shown,
            filters=filters,
            states=[s.value for s in ApprovalState],
            next_link=next_link,
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: `changed` whenever what the page shows changed (the pending list,
        or the one approval named by `?approval=`); the page reloads itself."""
        session = self.cookies.session(request)
        if session is None:
            return self.message("Not logged in", "Log in to get live updates.", 403)
        approval_id = request.query.get("approval")
        identity = session.identity

        async def digest() -> Any:
            if approval_id is not None:
                found = await self._service.get(approval_id)
                if found is None or not self._service.may_see(found, identity):
                    return None
                return (found.state.value, len(found.decisions), found.outcome)
            page, _ = await self._service.list_for(identity, ApprovalState.PENDING, 200)
            return tuple((a.id, len(a.decisions)) for a in page)

        try:
            last = await digest()
        except StoreUnavailable:
            last = None
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        await response.write(b"retry: 5000\n\n")
        from ..app import DRAINING  # set on SIGTERM: streams end so the drain is not held up

        draining = request.app.get(DRAINING)
        started = quiet_since = time.monotonic()
        while (
            time.monotonic() - started < EVENTS_SECONDS
            and session.expires_at > time.time()
            and not (draining is not None and draining.is_set())
        ):
            waited: Awaitable[Any]
            if approval_id is not None and last is not None and last[0] == "pending":
                waited = self._service.store.wait(approval_id, EVENTS_POLL_SECONDS)
            else:
                waited = self._events.wait(EVENTS_POLL_SECONDS)
            try:
                await waited
                current = await digest()
            except StoreUnavailable:
                await asyncio.sleep(EVENTS_POLL_SECONDS)
                continue
            if current != last:
                last = current
                await response.write(b"event: changed\ndata: {}\n\n")
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > EVENTS_KEEPALIVE_SECONDS:
                await response.write(b": keep-alive\n\n")
                quiet_since = time.monotonic()
        return response


GRANT_SUFFIX = "+grant"  # the verdict of the "Approve this and the next N like it" button


class _BadGrant(ValueError):
    """The grant fields of a decision form, said in words."""


def _form_text(form: Any, name: str) -> str:
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def _whole(text: str, what: str) -> int:
    if not text:
        raise _BadGrant(f"the number of {what} is missing")
    if not text.isdigit() or len(text) > 9:
        raise _BadGrant(f"the number of {what} must be a whole number, not {text[:20]!r}")
    value = int(text)
    if value < 1:
        raise _BadGrant(f"the number of {what} must be at least 1")
    return value


def _grant_asked(form: Any) -> tuple[int, int]:
    """(uses, seconds) from the grant fields: `grant_uses` and `grant_minutes` (or
    `grant_seconds`, for a rule whose grants last less than a minute). The rule's limits are
    checked by the service (`InvalidGrant`), as for the API."""
    uses = _whole(_form_text(form, "grant_uses"), "requests")
    if _form_text(form, "grant_minutes"):
        return uses, _whole(_form_text(form, "grant_minutes"), "minutes") * 60
    return uses, _whole(_form_text(form, "grant_seconds"), "seconds")


def grant_offer(approval: Approval) -> dict[str, Any] | None:
    """What the decision form offers as a grant, when the approval's rule allows one: the
    inputs' bounds (the rule's limits) and pre-filled values (the limits themselves). Time is in
    minutes, or in seconds for a rule whose grants last less than a minute."""
    max_uses, max_seconds = approval.grant_max_uses, approval.grant_max_seconds
    if max_uses is None or max_seconds is None:
        return None
    in_minutes = max_seconds >= 60
    max_time = max_seconds // 60 if in_minutes else max_seconds
    return {
        "max_uses": max_uses,
        "max_time": max_time,
        "unit": "minutes" if in_minutes else "seconds",
        "field": "grant_minutes" if in_minutes else "grant_seconds",
        "uses": str(max_uses),
        "time": str(max_time),
        "pattern": pattern_of(approval.method, approval.path, approval.actions),
    }


def _refusal_words(exc: state.ApprovalError) -> str:
    """A refused decision, said to the person who tried."""
    lead = {
        "self_approval": "You cannot decide this request: nobody may approve their own request "
        "or one made on their behalf.",
        "not_an_approver": "You are not an approver of this request.",
        "approver_unidentified": "Your login names no verified email, so it cannot decide "
        "approvals.",
        "approval_not_pending": "This approval was already decided or has expired.",
        "already_approved": "You already approved this request.",
        "reason_required": "A denial needs a reason: write one in the reason field.",
        "approval_not_found": "This approval no longer exists.",
        "invalid_request": "The grant asked for is not allowed, so nothing was decided.",
    }.get(exc.code, "The decision was refused.")
    return f"{lead} ({exc.message})"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _store_errors(inbox: Inbox, handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except StoreUnavailable:
            return inbox.message(
                "Approvals unavailable",
                "The approval store cannot be reached; nothing was decided. Try again shortly.",
                503,
            )
        except AuditUnavailable:
            return inbox.message(
                "Audit unavailable",
                "The audit trail cannot be written; nothing was decided. Try again shortly.",
                503,
            )

    return wrapped


def ui_routes(inbox: Inbox) -> list[web.RouteDef]:
    def route(method: str, path: str, handler: Handler) -> web.RouteDef:
        return web.route(method, UI_PATH + path, _store_errors(inbox, handler))

    async def slashless(request: web.Request) -> web.Response:
        return inbox.redirect(UI_PATH)

    return [
        web.get(UI_PATH.rstrip("/"), slashless),
        route("GET", "", inbox.pending),
        route("GET", "login", inbox.login_page),
        route("GET", "callback", inbox.callback),
        route("POST", "logout", inbox.logout),
        route("GET", "history", inbox.history),
        route("GET", "events", inbox.events),
        route("GET", "static/{name}", inbox.static),
        route("GET", "approvals/{approval_id}", inbox.approval),
        route("POST", "approvals/{approval_id}/decision", inbox.decide),
        route("GET", "approvals/{approval_id}/body", inbox.body),
        route("GET", "grants", inbox.grants),
        route("POST", "grants/{grant_id}/revoke", inbox.revoke_grant),
        route("GET", "logged-out", inbox.logged_out),
    ]


def _not_configured_routes() -> list[web.RouteDef]:
    async def off(request: web.Request) -> web.Response:
        return web.Response(
            status=404,
            content_type="text/html",
            text="<!doctype html><title>Inbox not configured</title><h1>Inbox not configured"
            "</h1><p>The approvers' web inbox needs <code>identity.web_login</code> in the "
            "configuration.</p>",
            headers=_SECURITY_HEADERS,
        )

    return [web.get(UI_PATH.rstrip("/"), off), web.get(UI_PATH, off)]


def setup_ui(
    app: web.Application,
    settings: Settings,
    service: ApprovalService,
    add_notifier: Callable[[InboxEvents], None] | None = None,
) -> Inbox | None:
    """Serve the inbox on `app` when `identity.web_login` is configured (else a page saying
    how to configure it). `add_notifier` hands the live-update notifier to the `NotifyHub`."""
    web_login = settings.identity.web_login
    if web_login is None:
        app.router.add_routes(_not_configured_routes())
        return None
    events = InboxEvents()
    if add_notifier is not None:
        add_notifier(events)
    inbox = Inbox(settings, web_login, service, events)
    app.cleanup_ctx.append(inbox.lifecycle)
    app.router.add_routes(ui_routes(inbox))
    return inbox
