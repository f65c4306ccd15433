"""OIDC bearer JWT verification against each configured issuer's JWKS.

- Discovery and JWKS are fetched with aiohttp (never blocking the loop) and cached.
- An unknown `kid` triggers one JWKS refetch per issuer per cooldown, so a flood of tokens with
  random kids cannot make us hammer the identity provider.
- The algorithm must be on the issuer's allow-list; HS* and `none` are refused before anything
  else (config refuses to list them, and this module checks again).
- A verified token's identity is cached until the token's `exp`, so the hot path does not verify
  an RSA signature on every call.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import jwt
import structlog

from ..config import FORBIDDEN_ALGORITHMS, ClaimsSettings, IssuerSettings
from ..model import Identity
from .errors import AuthError, IdentityUnavailable

log = structlog.get_logger("countersign.authn")

_FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10)
# After a failed fetch, requests fail fast (503) for this long instead of each retrying the IdP.
_FAILURE_BACKOFF_SECONDS = 1.0
# readyz: an issuer's reachability is probed at most this often, each probe this bounded.
_PROBE_TTL_SECONDS = 10.0
_PROBE_TIMEOUT_SECONDS = 1.5


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted claim path (`act.sub`), or None."""
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def identity_from_claims(
    issuer: str,
    claims: Mapping[str, Any],
    paths: ClaimsSettings,
    *,
    require_email_verified: bool = True,
) -> Identity:
    """The identity a verified token's claims describe. Its email names a person only when the
    token says `email_verified: true` (the JSON boolean), unless the issuer is configured with
    `require_email_verified: false`."""
    groups_value = claim_at(claims, paths.groups)
    if isinstance(groups_value, str):
        groups = frozenset(groups_value.split())
    elif isinstance(groups_value, list):
        groups = frozenset(str(g) for g in groups_value)
    else:
        groups = frozenset()
    email = claim_at(claims, paths.email)
    owner = claim_at(claims, paths.owner)
    client_id = claims.get("client_id") or claims.get("azp")
    verified = claims.get("email_verified") is True or not require_email_verified
    return Identity(
        subject=str(claims["sub"]),
        issuer=issuer,
        client_id=str(client_id) if client_id is not None else None,
        email=email if isinstance(email, str) else None,
        groups=groups,
        # A present owner that is not a string is kept as its JSON text: it then names nobody,
        # and self-approval fails closed instead of the owner being taken as absent.
        owner=owner if isinstance(owner, str) or owner is None else _as_text(owner),
        claims=claims,
        email_verified=isinstance(email, str) and verified,
    )


def _as_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


class _IssuerKeys:
    """Discovery + JWKS of one issuer, refreshed on demand with a cooldown."""

    def __init__(self, settings: IssuerSettings, session: aiohttp.ClientSession, cooldown: float):
        self.settings = settings
        self._session = session
        self._cooldown = cooldown
        self._keys: dict[str, jwt.PyJWK] = {}
        self._jwks_uri: str | None = None
        self._last_miss_refresh = float("-inf")
        self._last_failure = float("-inf")
        self._lock = asyncio.Lock()
        self._probed: tuple[float, bool] | None = None  # (monotonic time, reachable)
        self._probe_lock = asyncio.Lock()

    async def key_for(self, kid: str | None) -> jwt.PyJWK:
        key = self._lookup(kid)
        if key is not None:
            return key
        async with self._lock:
            # Another request may have refreshed the keys while we waited for the lock.
            key = self._lookup(kid)
            if key is not None:
                return key
            now = time.monotonic()
            if now - self._last_failure < _FAILURE_BACKOFF_SECONDS:
                raise IdentityUnavailable(f"cannot fetch keys of {self.settings.issuer}")
            if self._keys:
                # Keys are loaded and this kid is not among them: refetch (key rotation), but
                # at most once per cooldown, whatever kids strangers invent.
                if now - self._last_miss_refresh < self._cooldown:
                    raise AuthError("token signed with an unknown key")
                self._last_miss_refresh = now
            await self._refresh()
        key = self._lookup(kid)
        if key is None:
            raise AuthError("token signed with an unknown key")
        return key

    async def prefetch(self) -> None:
        """Load the keys ahead of the first request; failures are logged and retried later."""
        async with self._lock:
            if not self._keys:
                with contextlib.suppress(IdentityUnavailable):
                    await self._refresh()

    async def reachable(self) -> bool:
        """Whether discovery and the JWKS answer, probed at most every `_PROBE_TTL_SECONDS`
        (concurrent callers share one probe) and each probe bounded by `_PROBE_TIMEOUT_SECONDS`. The
        keys in use are not touched: rotation stays `key_for`'s business."""
        probed = self._probed
        if probed is not None and time.monotonic() - probed[0] < _PROBE_TTL_SECONDS:
            return probed[1]
        async with self._probe_lock:
            probed = self._probed
            if probed is not None and time.monotonic() - probed[0] < _PROBE_TTL_SECONDS:
                return probed[1]
            try:
                async with asyncio.timeout(_PROBE_TIMEOUT_SECONDS):
                    jwks_uri = self._jwks_uri or await self._discover()
                    jwt.PyJWKSet.from_dict(await self._get_json(jwks_uri))
            except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWKSetError):
                ok = False
            else:
                ok = True
            self._probed = (time.monotonic(), ok)
            return ok

    def _lookup(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None:
            # Without a kid we only accept the token when the issuer has exactly one key.
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _refresh(self) -> None:
        issuer = self.settings.issuer
        try:
            jwks_uri = self._jwks_uri or await self._discover()
            jwks = await self._get_json(jwks_uri)
            keyset = jwt.PyJWKSet.from_dict(jwks)
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWKSetError) as exc:
            self._last_failure = time.monotonic()
            log.warning("jwks.fetch_failed", issuer=issuer, error=str(exc) or type(exc).__name__)
            raise IdentityUnavailable(f"cannot fetch keys of {issuer}") from exc
        self._keys = {k.key_id: k for k in keyset.keys if k.key_id is not None}
        if len(keyset.keys) == 1 and keyset.keys[0].key_id is None:
            self._keys = {"": keyset.keys[0]}
        log.info("jwks.fetched", issuer=issuer, kids=sorted(self._keys))

    async def _discover(self) -> str:
        """The issuer's `jwks_uri`, from its discovery document (then remembered)."""
        issuer = self.settings.issuer
        url = self.settings.discovery_url or (
            issuer.rstrip("/") + "/.well-known/openid-configuration"
        )
        discovery = await self._get_json(url)
        if discovery.get("issuer") != issuer:
            raise ValueError(
                f"discovery document at {url} names issuer {discovery.get('issuer')!r}, "
                f"expected {issuer!r}"
            )
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise ValueError(f"discovery document at {url} has no jwks_uri")
        self._jwks_uri = jwks_uri
        return jwks_uri

    async def _get_json(self, url: str) -> dict[str, Any]:
        async with self._session.get(url, timeout=_FETCH_TIMEOUT, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"GET {url} answered {resp.status}")
            data = await resp.json(content_type=None)
        if not isinstance(data, dict):
            raise ValueError(f"GET {url} did not return a JSON object")
        return data


class OIDCVerifier:
    def __init__(
        self,
        issuers: Sequence[IssuerSettings],
        claims: ClaimsSettings,
        session: aiohttp.ClientSession,
        *,
        cache_size: int = 10_000,
        refresh_cooldown: float = 30.0,
    ) -> None:
        self._issuers = {i.issuer: _IssuerKeys(i, session, refresh_cooldown) for i in issuers}
        self._claims = claims
        self._cache: OrderedDict[str, tuple[Identity, float]] = OrderedDict()
        self._cache_size = cache_size

    @property
    def configured(self) -> bool:
        return bool(self._issuers)

    async def health(self) -> str:
        """For readyz: "ok" when every issuer's discovery and JWKS answer, "down" when one does
        not, "not configured" without issuers. Cached per issuer (see `_IssuerKeys.reachable`)."""
        if not self._issuers:
            return "not configured"
        results = await asyncio.gather(*(i.reachable() for i in self._issuers.values()))
        return "ok" if all(results) else "down"

    async def prefetch(self) -> None:
        """Fetch every issuer's discovery document and JWKS, so the first request is fast."""
        await asyncio.gather(*(issuer.prefetch() for issuer in self._issuers.values()))

    async def verify(self, token: str) -> Identity:
        cached = self._cache.get(token)
        if cached is not None:
            identity, expires_at = cached
            if time.time() < expires_at:
                return identity
            del self._cache[token]
        identity, expires_at = await self._verify_uncached(token)
        if self._cache_size:
            self._cache[token] = (identity, expires_at)
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return identity

    async def _verify_uncached(self, token: str) -> tuple[Identity, float]:
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.DecodeError:
            raise AuthError("malformed token") from None
        except jwt.PyJWTError as exc:
            # A well-formed token with a header pyjwt refuses: a non-string `kid`, a `crit` it
            # does not understand or that is not a list of names, ...
            raise AuthError(f"invalid token header: {exc}") from None
        except (ValueError, TypeError, AttributeError):
            # Anything else odd in the header or payload (json.JSONDecodeError and
            # UnicodeDecodeError are ValueErrors): refused, never a 500.
            raise AuthError("malformed token") from None
        if not isinstance(header, dict) or not isinstance(unverified, dict):
            raise AuthError("malformed token")
        alg = header.get("alg")
        if not isinstance(alg, str) or FORBIDDEN_ALGORITHMS.match(alg):
            raise AuthError(f"algorithm {alg!r} is not accepted")
        iss = unverified.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise AuthError("token issuer is not trusted")
        if alg not in issuer.settings.algorithms:
            raise AuthError(f"algorithm {alg!r} is not accepted")
        kid = header.get("kid")
        key = await issuer.key_for(kid if isinstance(kid, str) else None)
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=list(issuer.settings.audiences),
                issuer=issuer.settings.issuer,
                leeway=issuer.settings.leeway_seconds,
                options={"require": ["exp", "iss", "sub", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthError("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise AuthError("token audience is not accepted") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        except (ValueError, TypeError):
            # A key that cannot check this token's signature (e.g. of another type than `alg`).
            raise AuthError("invalid token: the signature cannot be verified") from None
        identity = identity_from_claims(
            issuer.settings.issuer,
            claims,
            self._claims,
            require_email_verified=issuer.settings.require_email_verified,
        )
        return identity, float(claims["exp"])
