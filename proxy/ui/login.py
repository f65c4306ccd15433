"""Logging approvers in: OpenID Connect authorization code with PKCE (S256).

authlib builds the authorization request (state, nonce, the S256 code challenge) and checks the
authorization response's state; the code is exchanged over the proxy's own aiohttp client, and
the ID token is verified by the same `OIDCVerifier` (JWKS cache, key rotation, algorithm
allow-list) that verifies agents' and approvers' bearer tokens: signature by the issuer's keys,
issuer, audience = client id, expiry; then the nonce and `azp` here. The person is made by
`identity_from_claims`, exactly as for an API decider: the same issuer and subject, the same
verified email (per the issuer's `require_email_verified`), the same groups claim.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import structlog
from authlib.common.security import generate_token
from authlib.oauth2.rfc6749.errors import OAuth2Error
from authlib.oauth2.rfc6749.parameters import (
    parse_authorization_code_response,
    prepare_grant_uri,
    prepare_token_request,
)
from authlib.oauth2.rfc7636 import create_s256_code_challenge

from ..authn import AuthError, IdentityUnavailable
from ..authn.oidc import OIDCVerifier
from ..config import ClaimsSettings, IssuerSettings, WebLoginSettings
from ..model import Identity

log = structlog.get_logger("countersign.ui")

_TIMEOUT = aiohttp.ClientTimeout(total=10)
_DISCOVERY_TTL_SECONDS = 3600.0


class LoginError(Exception):
    """The login cannot complete; `message` is shown to the person (never a token or secret)."""

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Endpoints:
    authorization: str
    token: str
    end_session: str | None


@dataclass(frozen=True, slots=True)
class LoggedIn:
    identity: Identity
    id_token_expires_at: float
    id_token: str  # kept for logout at the IdP (`id_token_hint`)


def id_token_issuer(
    web_login: WebLoginSettings, issuers: tuple[IssuerSettings, ...]
) -> IssuerSettings:
    """How the ID token is checked: the audience is the client id; algorithms, leeway and
    `require_email_verified` come from the issuer's entry in `identity.issuers`, when it has one."""
    entry = next((i for i in issuers if i.issuer == web_login.issuer), None)
    base = entry if entry is not None else IssuerSettings(issuer=web_login.issuer, audiences=("-",))
    return base.model_copy(
        update={
            "audiences": (web_login.client_id,),
            "discovery_url": web_login.discovery_url or base.discovery_url,
        }
    )


class WebLogin:
    def __init__(
        self,
        settings: WebLoginSettings,
        issuers: tuple[IssuerSettings, ...],
        claims: ClaimsSettings,
        session: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        self._issuer = id_token_issuer(settings, issuers)
        self._session = session
        # The project's one JWT verifier, for this client's ID tokens (never cached: each is
        # verified once, at login).
        self._verifier = OIDCVerifier([self._issuer], claims, session, cache_size=0)
        self._endpoints: tuple[float, Endpoints] | None = None

    async def endpoints(self) -> Endpoints:
        """The issuer's authorization, token and end-session endpoints (discovery, cached)."""
        cached = self._endpoints
        if cached is not None and time.monotonic() - cached[0] < _DISCOVERY_TTL_SECONDS:
            return cached[1]
        issuer = self.settings.issuer
        url = self._issuer.discovery_url or issuer.rstrip("/") + "/.well-known/openid-configuration"
        try:
            async with self._session.get(url, timeout=_TIMEOUT, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ValueError(f"GET {url} answered {resp.status}")
                doc = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("ui.discovery_failed", issuer=issuer, error=str(exc) or type(exc).__name__)
            raise LoginError(
                f"the identity provider {issuer} cannot be reached; try again shortly", status=503
            ) from None
        if not isinstance(doc, dict) or doc.get("issuer") != issuer:
            raise LoginError(f"the discovery document at {url} is not {issuer}'s", status=503)
        authorization, token = doc.get("authorization_endpoint"), doc.get("token_endpoint")
        if not isinstance(authorization, str) or not isinstance(token, str):
            raise LoginError(f"the discovery document at {url} has no code flow", status=503)
        end = doc.get("end_session_endpoint")
        if not isinstance(end, str) or not end.lower().startswith(("https://", "http://")):
            end = None
        found = Endpoints(authorization, token, end)
        self._endpoints = (time.monotonic(), found)
        return found

    async def logout_url(self, id_token: str | None, post_logout_redirect_uri: str) -> str | None:
        """Where to send the browser to end its session at the IdP too (OpenID Connect
        RP-Initiated Logout), when the discovery document names an `end_session_endpoint`; else
        (or when the IdP cannot be reached now) None. The IdP sends the browser back to
        `post_logout_redirect_uri` if that is registered for the client."""
        try:
            endpoints = await self.endpoints()
        except LoginError:
            return None
        if endpoints.end_session is None:
            return None
        params = {"client_id": self.settings.client_id}
        if id_token:
            params["id_token_hint"] = id_token
        params["post_logout_redirect_uri"] = post_logout_redirect_uri
        separator = "&" if "?" in endpoints.end_session else "?"
        return endpoints.end_session + separator + urlencode(params)

    async def start(self, redirect_uri: str) -> tuple[str, dict[str, Any]]:
        """The authorization URL to send the browser to, and what the callback must check
        (kept in the signed login cookie): state, nonce, the PKCE verifier, the redirect URI."""
        endpoints = await self.endpoints()
        state, nonce, verifier = generate_token(32), generate_token(32), generate_token(64)
        url = prepare_grant_uri(
            endpoints.authorization,
            client_id=self.settings.client_id,
            response_type="code",
            redirect_uri=redirect_uri,
            scope=" ".join(self.settings.scopes),
            state=state,
            nonce=nonce,
            code_challenge=create_s256_code_challenge(verifier),
            code_challenge_method="S256",
        )
        return str(url), {
            "state": state,
            "nonce": nonce,
            "verifier": verifier,
            "redirect_uri": redirect_uri,
        }

    async def finish(self, callback_url: str, flight: dict[str, Any]) -> LoggedIn:
        """Check the authorization response against the login in flight, exchange the code,
        verify the ID token and make the identity."""
        answered = parse_qs(urlsplit(callback_url).query)
        if "error" in answered and "code" not in answered:
            error = answered["error"][0]
            description = answered.get("error_description", [""])[0]
            raise LoginError(
                f"the identity provider refused the login: {error} {description}".strip()
            )
        state = flight.get("state")
        if not isinstance(state, str) or not state:
            raise LoginError("no login is in progress in this browser: start again")
        try:
            params = parse_authorization_code_response(callback_url, state=state)
        except OAuth2Error as exc:
            raise LoginError(
                "the login response does not match the login this browser started "
                f"({exc.error}): start again"
            ) from None
        if not hmac.compare_digest(str(params.get("state", "")), state):
            raise LoginError("the login response does not match the login this browser started")
        tokens = await self._exchange(str(params["code"]), flight)
        id_token = tokens.get("id_token")
        if not isinstance(id_token, str):
            raise LoginError("the identity provider returned no ID token (is openid a scope?)")
        try:
            identity = await self._verifier.verify(id_token)
        except AuthError as exc:
            raise LoginError(f"the ID token was refused: {exc.description}") from None
        except IdentityUnavailable:
            raise LoginError(
                "the identity provider's keys cannot be fetched now", status=503
            ) from None
        claims = identity.claims
        nonce = flight.get("nonce")
        if not isinstance(nonce, str) or not hmac.compare_digest(
            str(claims.get("nonce", "")), nonce
        ):
            raise LoginError("the ID token's nonce does not match this login: start again")
        aud = claims.get("aud")
        azp = claims.get("azp")
        if (
            (isinstance(aud, list) and len(aud) > 1) or azp is not None
        ) and azp != self.settings.client_id:
            raise LoginError("the ID token was issued to another client (azp)")
        return LoggedIn(identity, float(claims["exp"]), id_token)

    async def _exchange(self, code: str, flight: dict[str, Any]) -> dict[str, Any]:
        endpoints = await self.endpoints()
        body = prepare_token_request(
            "authorization_code",
            code=code,
            redirect_uri=flight.get("redirect_uri"),
            code_verifier=flight.get("verifier"),
            client_id=self.settings.client_id,
        )
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        auth = None
        if self.settings.client_secret:
            auth = aiohttp.BasicAuth(self.settings.client_id, self.settings.client_secret)
        try:
            async with self._session.post(
                endpoints.token,
                data=str(body).encode("ascii"),
                headers=headers,
                auth=auth,
                timeout=_TIMEOUT,
                allow_redirects=False,
            ) as resp:
                data = await resp.json(content_type=None)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("ui.token_exchange_failed", error=str(exc) or type(exc).__name__)
            raise LoginError(
                "the identity provider's token endpoint cannot be reached", status=503
            ) from None
        if status != 200 or not isinstance(data, dict):
            error = data.get("error") if isinstance(data, dict) else None
            log.warning("ui.token_exchange_refused", status=status, error=error)
            raise LoginError(f"the identity provider refused the code exchange ({error or status})")
        return data
