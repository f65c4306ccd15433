"""The inbox's cookies: signed, expiring, HttpOnly, SameSite=Lax, Secure under https.

A session is a signed cookie, not a server-side record: every worker and replica derives the same
HMAC key from `identity.web_login.session_secret`, so any of them accepts it (a random key per
process would log people out whenever another worker answered). Each purpose (the session, the
login in flight) has its own key, so one cookie can never be replayed as the other.

The cookies' path is `/_countersign/ui/`: the browser never sends them on proxied requests, so
they cannot reach an upstream. Logout clears the cookie in the browser; a copy taken before stays
valid until it expires (at most `session_seconds`, and never past the ID token's `exp` plus
`session_grace_seconds`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from ..model import Identity

UI_PATH = "/_countersign/ui/"
SESSION_COOKIE = "countersign_ui"
LOGIN_COOKIE = "countersign_ui_login"
LOGIN_SECONDS = 600  # the login in flight: from /login to /callback
ID_TOKEN_KEPT_CHARS = 1800  # larger ID tokens are not kept: logout then names the client only
COOKIE_VALUE_CHARS = 3800  # a browser keeps about 4 KB per cookie, name and attributes included


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Signer:
    """Signs and checks small JSON payloads carrying an `exp` (unix time)."""

    def __init__(self, secret: str, purpose: str) -> None:
        self._key = hmac.new(
            secret.encode("utf-8"), b"countersign-ui/" + purpose.encode("ascii"), hashlib.sha256
        ).digest()

    def sign(self, payload: dict[str, Any]) -> str:
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode("utf-8"))
        mac = hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest()
        return f"{body}.{_b64(mac)}"

    def load(self, value: str | None, now: float | None = None) -> dict[str, Any] | None:
        """The payload, if `value` was signed with this key and has not expired; else None."""
        if not value or value.count(".") != 1:
            return None
        body, mac = value.split(".")
        try:
            expected = hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest()
            if not hmac.compare_digest(expected, _unb64(mac)):
                return None
            payload = json.loads(_unb64(body))
        except (ValueError, UnicodeError):
            return None
        if not isinstance(payload, dict) or not isinstance(payload.get("exp"), (int, float)):
            return None
        if (time.time() if now is None else now) >= payload["exp"]:
            return None
        return payload


@dataclass(frozen=True, slots=True)
class Session:
    """A logged-in person: the identity their ID token made, and the page forms' CSRF token.
    `id_token`: the ID token itself when it is small enough to keep in the cookie, sent back to
    the IdP as `id_token_hint` at logout (the cookie already holds every claim it carries)."""

    identity: Identity
    csrf: str
    expires_at: float
    id_token: str | None = None

    def to_payload(self) -> dict[str, Any]:
        ident = self.identity
        return {
            "iss": ident.issuer,
            "sub": ident.subject,
            "cid": ident.client_id,
            "email": ident.email,
            "ev": ident.email_verified,
            "groups": sorted(ident.groups),
            "owner": ident.owner,
            "csrf": self.csrf,
            "exp": self.expires_at,
            **({"idt": self.id_token} if self.id_token else {}),
        }

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> Session | None:
        try:
            identity = Identity(
                subject=str(data["sub"]),
                issuer=str(data["iss"]),
                client_id=data.get("cid"),
                email=data.get("email"),
                groups=frozenset(str(g) for g in data.get("groups", ())),
                owner=data.get("owner"),
                email_verified=data.get("ev") is True,
            )
            id_token = data.get("idt")
            return cls(
                identity,
                str(data["csrf"]),
                float(data["exp"]),
                id_token if isinstance(id_token, str) else None,
            )
        except (KeyError, TypeError, ValueError):
            return None

    @classmethod
    def new(cls, identity: Identity, expires_at: float, id_token: str | None = None) -> Session:
        if id_token is not None and len(id_token) > ID_TOKEN_KEPT_CHARS:
            id_token = None  # a browser keeps at most about 4 KB per cookie
        return cls(identity, secrets.token_urlsafe(32), expires_at, id_token)

    def csrf_ok(self, token: object) -> bool:
        return isinstance(token, str) and hmac.compare_digest(
            token.encode("utf-8"), self.csrf.encode("utf-8")
        )


class Cookies:
    """The inbox's two cookies: the session, and the login in flight (state, nonce, verifier)."""

    def __init__(self, secret: str, *, secure: bool) -> None:
        self._session = Signer(secret, "session")
        self._login = Signer(secret, "login")
        self.secure = secure
        # `__Secure-` makes the browser refuse the cookie from plain http (it cannot be planted
        # by a network attacker); `__Host-` would need Path=/, which would send it upstream.
        prefix = "__Secure-" if secure else ""
        self.session_name = prefix + SESSION_COOKIE
        self.login_name = prefix + LOGIN_COOKIE

    def _set(self, response: web.StreamResponse, name: str, value: str, max_age: int) -> None:
        response.set_cookie(
            name,
            value,
            max_age=max_age,
            path=UI_PATH,
            httponly=True,
            samesite="Lax",
            secure=self.secure,
        )

    def _clear(self, response: web.StreamResponse, name: str) -> None:
        response.del_cookie(name, path=UI_PATH, secure=self.secure, httponly=True, samesite="Lax")

    # -- the session ---------------------------------------------------------------------------

    def session(self, request: web.Request) -> Session | None:
        payload = self._session.load(request.cookies.get(self.session_name))
        return None if payload is None else Session.from_payload(payload)

    def set_session(self, response: web.StreamResponse, session: Session) -> None:
        max_age = max(1, int(session.expires_at - time.time()))
        value = self._session.sign(session.to_payload())
        if len(value) > COOKIE_VALUE_CHARS and session.id_token is not None:
            value = self._session.sign(replace(session, id_token=None).to_payload())
        self._set(response, self.session_name, value, max_age)

    def clear_session(self, response: web.StreamResponse) -> None:
        self._clear(response, self.session_name)

    # -- the login in flight -------------------------------------------------------------------

    def login(self, request: web.Request) -> dict[str, Any] | None:
        return self._login.load(request.cookies.get(self.login_name))

    def set_login(self, response: web.StreamResponse, flight: dict[str, Any]) -> None:
        payload = {**flight, "exp": time.time() + LOGIN_SECONDS}
        self._set(response, self.login_name, self._login.sign(payload), LOGIN_SECONDS)

    def clear_login(self, response: web.StreamResponse) -> None:
        self._clear(response, self.login_name)


def safe_next(value: str | None) -> str:
    """Where to go after login: a same-origin path under the inbox, else the inbox itself (no
    open redirect: no scheme, no host, no `//`, no backslash, no dot segments)."""
    if not value or not value.startswith(UI_PATH):
        return UI_PATH
    if any(c in value for c in "\\\r\n\t") or "//" in value or "/../" in value or "/./" in value:
        return UI_PATH
    if value.endswith(("/..", "/.")) or "%" in value.split("?", 1)[0]:
        return UI_PATH
    return value
