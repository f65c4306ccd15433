"""Static API keys for clients that cannot do OIDC.

Only the SHA-256 of a key is ever configured or kept in memory; a key is recognised by its
`cs_` prefix so it never reaches the JWT verifier. `countersign keys new` makes one.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence

from ..config import ApiKeySettings
from ..model import Identity
from .errors import AuthError

KEY_PREFIX = "cs_"
API_KEY_ISSUER = "api-key"


def new_key() -> str:
    """A fresh random key: `cs_` + 256 bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeyAuthenticator:
    def __init__(self, keys: Sequence[ApiKeySettings]) -> None:
        self._by_digest: dict[str, Identity] = {
            k.sha256: Identity(
                subject=k.subject,
                issuer=API_KEY_ISSUER,
                client_id=k.subject,
                email=k.email,
                groups=frozenset(k.groups),
                owner=k.owner,
                claims={"sub": k.subject, "groups": list(k.groups)},
                # The operator wrote this email into the config: it names the key's person.
                email_verified=k.email is not None,
            )
            for k in keys
        }

    def authenticate(self, key: str) -> Identity:
        digest = key_digest(key)
        identity = self._by_digest.get(digest)
        # The lookup is keyed by a hash of the secret, so its timing reveals nothing useful
        # about the key itself.
        if identity is None:
            raise AuthError("unknown API key")
        return identity
