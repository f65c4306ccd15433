"""Authentication: turn a request's credential into an `Identity`.

`Authenticator.authenticate(authorization_header)` is the one call the server makes. API keys
(prefix `cs_`) and OIDC JWTs both arrive as `Authorization: Bearer ...`.
"""

from __future__ import annotations

from .apikeys import KEY_PREFIX, ApiKeyAuthenticator
from .errors import AuthError, IdentityUnavailable
from .oidc import OIDCVerifier

__all__ = ["AuthError", "Authenticator", "IdentityUnavailable"]

from ..model import Identity


class Authenticator:
    def __init__(self, api_keys: ApiKeyAuthenticator, oidc: OIDCVerifier | None) -> None:
        self._api_keys = api_keys
        self._oidc = oidc

    async def authenticate(self, authorization: str | None) -> Identity:
        if not authorization:
            raise AuthError("missing bearer token")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise AuthError("expected 'Authorization: Bearer <token>'")
        if credential.startswith(KEY_PREFIX):
            return self._api_keys.authenticate(credential)
        if self._oidc is None or not self._oidc.configured:
            raise AuthError("no OIDC issuer is configured")
        return await self._oidc.verify(credential)
