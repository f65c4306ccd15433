"""Authentication: turn a request's credential into an `Identity`.

`Authenticator.authenticate_request(sources, …)` is the call the proxy makes: the route's
`caller_credentials` say where the credential is read (`proxy.authn.sources`). A credential read
from `bearer`, `token`, `basic` or `header:NAME` is a Countersign API key (prefix `cs_`) or an
OIDC JWT; `aws_sigv4` is a SigV4 signature made with a key from `identity.aws_keys`
(`proxy.authn.sigv4`). `authenticate(authorization)` reads `Authorization: Bearer` alone, for
the API and the inbox.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import Identity
from ..model.request import HeaderView
from .apikeys import KEY_PREFIX, ApiKeyAuthenticator
from .errors import AuthError, IdentityUnavailable
from .oidc import OIDCVerifier
from .sigv4 import SIGV4_CREDENTIAL_HEADERS, SigV4Caller, SigV4Verifier
from .sources import AWS_SIGV4, find_credential

__all__ = [
    "AuthError",
    "Authenticated",
    "Authenticator",
    "IdentityUnavailable",
    "SigV4Caller",
    "SigV4Verifier",
]


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Who the caller is, and which of its headers carried the credential.

    `credential_headers` (lower-case) are never forwarded upstream and never bound into an
    approval: for SigV4 they are authorization, x-amz-date, x-amz-security-token and
    x-amz-content-sha256, which the route's own signature replaces; otherwise every header the
    route reads credentials from that the request carries. `sigv4` is set when a SigV4
    signature authenticated the caller (the forwarder re-signs with its service and payload).
    """

    identity: Identity
    credential_headers: frozenset[str]
    sigv4: SigV4Caller | None = None


class Authenticator:
    def __init__(
        self,
        api_keys: ApiKeyAuthenticator,
        oidc: OIDCVerifier | None,
        sigv4: SigV4Verifier | None = None,
    ) -> None:
        self._api_keys = api_keys
        self._oidc = oidc
        self._sigv4 = sigv4 if sigv4 is not None else SigV4Verifier(())

    async def authenticate(self, authorization: str | None) -> Identity:
        """The identity of an `Authorization: Bearer` header (an API key or a JWT)."""
        if not authorization:
            raise AuthError("missing bearer token")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthError("expected 'Authorization: Bearer <token>'")
        return await self._identity_of(credential)

    async def authenticate_request(
        self,
        sources: tuple[str, ...],
        *,
        method: str,
        target: str,
        host: str,
        headers: HeaderView,
        body: bytes | None,
    ) -> Authenticated:
        """Authenticate a request by the first of `sources` it carries a credential in.

        `target` is the raw request-target (path?query, still percent-encoded), `host` the Host
        header, `body` the complete body: required for `aws_sigv4` (its hash may be signed),
        ignored otherwise. Raises `AuthError` (401, or `exc.status`) or `IdentityUnavailable`.
        """
        credential = find_credential(sources, headers, target)
        if credential.source == AWS_SIGV4:
            if body is None:
                raise TypeError("aws_sigv4 authentication needs the request's complete body")
            identity, caller = await self._sigv4.verify(
                method=method, target=target, host=host, headers=headers, body=body
            )
            return Authenticated(identity, SIGV4_CREDENTIAL_HEADERS, caller)
        identity = await self._identity_of(credential.value)
        return Authenticated(identity, credential.headers)

    async def _identity_of(self, credential: str) -> Identity:
        """A credential's identity: an API key by its `cs_` prefix, else an OIDC JWT."""
        if credential.startswith(KEY_PREFIX):
            return self._api_keys.authenticate(credential)
        if self._oidc is None or not self._oidc.configured:
            raise AuthError("no OIDC issuer is configured")
        return await self._oidc.verify(credential)
