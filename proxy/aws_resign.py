"""Re-signing what Countersign forwards to AWS with the route's real credentials (DESIGN §6).

Agents sign with keys Countersign issued them (`proxy.authn.sigv4` checks those); AWS must see
a signature made with credentials it knows. `AwsUpstreamSigner` holds a route's credentials —
botocore's default chain (environment, shared config and credentials files, profile, container
and instance roles), a named profile, or static keys — and signs each forwarded request with
botocore's own signer (`S3SigV4Auth` for S3, which signs the path as sent; `SigV4Auth` else).

Resolving and refreshing credentials may do I/O (files, STS, the instance metadata service):
that runs on a worker thread, at start and whenever botocore says a refresh is due; the usual
request signs with cached frozen credentials on the event loop (an HMAC chain, microseconds).
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

from botocore.auth import (  # type: ignore[import-untyped]
    SIGNED_HEADERS_BLACKLIST,
    S3SigV4Auth,
    SigV4Auth,
)
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import (  # type: ignore[import-untyped]
    Credentials,
    RefreshableCredentials,
)

from .authn.sigv4 import (
    S3_SERVICES,
    SIGV4_CREDENTIAL_HEADERS,
    STREAMING_UNSIGNED_PAYLOAD_TRAILER,
    UNSIGNED_PAYLOAD,
    sha256_hex,
)
from .config import AwsProfileCredentials, AwsRouteSettings, AwsStaticCredentials

__all__ = ["AwsCredentialsUnavailable", "AwsUpstreamSigner"]

# The client's own signing headers: replaced by ours.
_REPLACED = SIGV4_CREDENTIAL_HEADERS
# Forwarded but not signed: framing the HTTP client sets, and what proxies on the way to AWS may
# add to or rewrite. botocore already leaves out hop-by-hop headers and User-Agent.
_NOT_SIGNED = frozenset(
    {
        *(name.lower() for name in SIGNED_HEADERS_BLACKLIST),
        "content-length",
        "forwarded",
        "via",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-proto",
    }
)
_UNSIGNED_PAYLOADS = frozenset({UNSIGNED_PAYLOAD, STREAMING_UNSIGNED_PAYLOAD_TRAILER})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHAIN = (
    "the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE), the shared "
    "credentials and config files (~/.aws/credentials, ~/.aws/config, or AWS_SHARED_"
    "CREDENTIALS_FILE / AWS_CONFIG_FILE), web identity and SSO settings, the container "
    "credentials endpoint and the EC2 instance metadata service"
)


class AwsCredentialsUnavailable(RuntimeError):
    """The route's credentials cannot be refreshed right now (STS or instance metadata failing
    inside botocore's mandatory refresh window): the request cannot be signed."""


class _ResignHeaders:
    """botocore's header selection minus headers that may change in transit, with the payload
    hash computed once by the caller (botocore would otherwise read the body again)."""

    _payload: str

    def headers_to_sign(self, request: Any) -> Any:
        headers = super().headers_to_sign(request)  # type: ignore[misc]
        for name in {name.lower() for name in headers}:
            if name in _NOT_SIGNED:
                del headers[name]
        return headers

    def payload(self, request: Any) -> str:
        return self._payload


class _Resign(_ResignHeaders, SigV4Auth):  # type: ignore[misc]
    pass


class _ResignS3(_ResignHeaders, S3SigV4Auth):  # type: ignore[misc]
    pass


def _host_of(url: str) -> str:
    """The Host header for `url`, as botocore derives it (lower-case, no default port)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    if port is not None and port != _DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{port}"
    return host


class AwsUpstreamSigner:
    """Signs requests forwarded on one route with the route's real AWS credentials."""

    def __init__(self, settings: AwsRouteSettings) -> None:
        self._settings = settings
        self._credentials: Any = None
        self._refreshing = asyncio.Lock()

    @property
    def source(self) -> str | None:
        """Where the credentials came from (botocore's name: `env`, `shared-credentials-file`,
        `assume-role`, `iam-role`, `container-role`, `static`, …); None before `start`."""
        method = getattr(self._credentials, "method", None)
        return method if isinstance(method, str) else None

    async def start(self) -> None:
        """Resolve the credentials (off the event loop); `RuntimeError` with a sentence fit for
        a start-up error when there are none."""
        self._credentials = await asyncio.to_thread(self._resolve)

    def _resolve(self) -> Any:
        configured = self._settings.credentials
        if isinstance(configured, AwsStaticCredentials):
            return Credentials(
                configured.access_key_id,
                configured.secret_access_key,
                configured.session_token,
                method="static",
            )
        import botocore.session  # type: ignore[import-untyped]
        from botocore.exceptions import (  # type: ignore[import-untyped]
            BotoCoreError,
            ProfileNotFound,
        )

        profile = configured.profile if isinstance(configured, AwsProfileCredentials) else None
        try:
            credentials = botocore.session.Session(profile=profile).get_credentials()
            if credentials is not None:
                # Deferred credentials (container, SSO, assume-role) fetch on first use: here.
                credentials.get_frozen_credentials()
        except ProfileNotFound:
            raise RuntimeError(
                f"the AWS profile {profile!r} is not in the shared config or credentials files "
                "(~/.aws/config, ~/.aws/credentials, or AWS_CONFIG_FILE / "
                "AWS_SHARED_CREDENTIALS_FILE)"
            ) from None
        except BotoCoreError as exc:
            raise RuntimeError(f"cannot load AWS credentials: {exc}") from None
        if credentials is None:
            where = f"profile {profile!r} in " if profile else ""
            raise RuntimeError(f"no AWS credentials found (looked in {where}{_CHAIN})")
        return credentials

    async def _frozen(self) -> Any:
        """Current credentials: cached ones without a thread hop, refreshed ones when botocore
        says a refresh is due (on a thread, one refresh at a time)."""
        credentials = self._credentials
        if credentials is None:
            raise RuntimeError("AwsUpstreamSigner.start() has not completed")
        if isinstance(credentials, RefreshableCredentials) and credentials.refresh_needed():
            async with self._refreshing:
                try:
                    return await asyncio.to_thread(credentials.get_frozen_credentials)
                except Exception as exc:
                    raise AwsCredentialsUnavailable(
                        f"cannot refresh the route's AWS credentials: {exc}"
                    ) from None
        return credentials.get_frozen_credentials()

    async def sign(
        self,
        *,
        method: str,
        url: str,
        headers: list[tuple[str, str]],
        body: bytes,
        service: str,
        payload: str,
    ) -> list[tuple[str, str]]:
        """The headers to send with this request, signed for AWS.

        The given headers (order kept) minus any client-supplied Authorization, X-Amz-Date,
        X-Amz-Security-Token and X-Amz-Content-SHA256, plus Host (from `url`), X-Amz-Date,
        Authorization, X-Amz-Security-Token (session credentials) and X-Amz-Content-SHA256
        (always for S3; for other services when `payload` is UNSIGNED-PAYLOAD or
        STREAMING-UNSIGNED-PAYLOAD-TRAILER, which is then kept; otherwise the body's hash is
        signed). `service` is the agent's (its signature's scope) unless the route sets one.
        """
        credentials = await self._frozen()
        service = self._settings.service or service
        body_hash = payload if payload in _UNSIGNED_PAYLOADS else await sha256_hex(body)
        request = AWSRequest(method=method, url=url)
        request.headers["Host"] = _host_of(url)
        dates: list[str] = []
        for name, value in headers:
            lower = name.lower()
            if lower in _REPLACED or lower == "host":
                continue
            if lower == "date":
                # botocore would sign with Date instead of X-Amz-Date; AWS prefers X-Amz-Date
                # when both are sent, so the client's Date is kept but not signed.
                dates.append(value)
                continue
            request.headers[name] = value
        s3 = service in S3_SERVICES
        if not s3 and body_hash in _UNSIGNED_PAYLOADS:
            request.headers["X-Amz-Content-SHA256"] = body_hash
        signer = (_ResignS3 if s3 else _Resign)(credentials, service, self._settings.region)
        signer._payload = body_hash
        signer.add_auth(request)
        signed: list[tuple[str, str]] = [(str(k), str(v)) for k, v in request.headers.items()]
        signed.extend(("Date", value) for value in dates)
        return signed
