"""Inbound Bot Framework activities: the bearer token checked by Countersign itself.

Every `POST /_countersign/teams/messages` must carry `Authorization: Bearer <jwt>` that:
- is signed (RS256) by a key of the Bot Framework's OpenID metadata document, whose URL is
  configurable (`notify.teams.openid_metadata_url`): its `jwks_uri` is fetched with aiohttp and
  cached, refetched on an unknown `kid` at most once per cooldown (`authn.oidc`'s key cache);
- names issuer `https://api.botframework.com` and audience = the bot's app id, and is not
  expired (nor not yet valid);
- carries a `serviceurl` claim equal to the activity's `serviceUrl` (so a token minted for one
  channel endpoint cannot steer our replies elsewhere);
and the activity's tenant (`channelData.tenant.id`) must be the configured one. Anything else
is `TeamsAuthError` (the route answers our JSON 401).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import jwt

from ..authn.errors import AuthError
from ..authn.oidc import _IssuerKeys
from ..config import IssuerSettings

BOT_FRAMEWORK_ISSUER = "https://api.botframework.com"
ALGORITHMS = ("RS256",)
LEEWAY_SECONDS = 300  # the Bot Framework SDK allows five minutes of clock skew


class TeamsAuthError(Exception):
    """The activity is not from the Bot Framework for this bot and tenant."""


def _service_url(value: object) -> str:
    return str(value or "").rstrip("/").lower()


class ActivityVerifier:
    def __init__(
        self,
        app_id: str,
        tenant_id: str,
        openid_metadata_url: str,
        session: aiohttp.ClientSession,
        *,
        refresh_cooldown: float = 30.0,
    ) -> None:
        self._app_id = app_id
        self._tenant_id = tenant_id.lower()
        settings = IssuerSettings(
            issuer=BOT_FRAMEWORK_ISSUER,
            audiences=(app_id,),
            algorithms=ALGORITHMS,
            discovery_url=openid_metadata_url,
        )
        self._keys = _IssuerKeys(settings, session, refresh_cooldown)

    async def verify(
        self, authorization: str | None, activity: Mapping[str, Any]
    ) -> dict[str, Any]:
        """The verified token's claims; `TeamsAuthError` unless the token and the activity are
        acceptable."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise TeamsAuthError("missing bearer token")
        token = token.strip()
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError, AttributeError):
            raise TeamsAuthError("malformed token") from None
        if not isinstance(header, dict) or header.get("alg") not in ALGORITHMS:
            raise TeamsAuthError("token algorithm is not accepted")
        kid = header.get("kid")
        try:
            key = await self._keys.key_for(kid if isinstance(kid, str) else None)
        except AuthError as exc:
            raise TeamsAuthError(str(exc)) from None
        try:
            claims = jwt.decode(
                token,
                key=key,
                algorithms=list(ALGORITHMS),
                audience=self._app_id,
                issuer=BOT_FRAMEWORK_ISSUER,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise TeamsAuthError("token expired") from None
        except jwt.InvalidAudienceError:
            raise TeamsAuthError("token audience is not this bot") from None
        except jwt.InvalidIssuerError:
            raise TeamsAuthError("token issuer is not the Bot Framework") from None
        except jwt.PyJWTError as exc:
            raise TeamsAuthError(f"invalid token: {exc}") from None
        except (ValueError, TypeError):
            raise TeamsAuthError("invalid token: the signature cannot be verified") from None
        claimed = claims.get("serviceurl", claims.get("serviceUrl"))
        if not claimed or _service_url(claimed) != _service_url(activity.get("serviceUrl")):
            raise TeamsAuthError("token serviceurl does not match the activity")
        tenant = ((activity.get("channelData") or {}).get("tenant") or {}).get("id")
        if not isinstance(tenant, str) or tenant.lower() != self._tenant_id:
            raise TeamsAuthError("activity is not from the configured tenant")
        return dict(claims)
