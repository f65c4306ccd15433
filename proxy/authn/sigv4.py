"""SigV4 verification: an agent's AWS signature is its authentication (DESIGN §6).

Agents hold access keys Countersign issued (`countersign keys new --aws`, `identity.aws_keys`),
never real AWS ones. An SDK pointed at the proxy (boto3, the AWS CLI, Terraform) signs each
request with such a key exactly as it would for AWS; this module checks that signature and
names the identity the key was issued to. `proxy.aws_resign` then signs what is forwarded with
the route's real credentials.

The canonical request is rebuilt by botocore itself, from the request as it arrived: the raw
target and only the headers the agent says it signed. `S3SigV4Auth` is used for S3 (it neither
normalizes nor double-encodes the path, so keys with `//`, `+` or `%` verify), `SigV4Auth` for
every other service, as the SDKs do. A hand-written canonicalization would be one more place
to disagree with them.

What is refused, and why:
- presigned URLs: a signature in the query could be replayed by anyone who sees the URL (logs,
  approval views), and the approval binds the target; agents sign in the Authorization header;
- `X-Amz-Security-Token`: Countersign keys have no session tokens;
- `STREAMING-AWS4-HMAC-SHA256-PAYLOAD` (signed aws-chunked bodies): every chunk carries its own
  signature, chained from the header's; verifying them would mean re-framing the body. SDKs can
  sign the whole body or leave it unsigned instead, and the approval binds the body anyway.
"""

from __future__ import annotations

import asyncio
import calendar
import datetime
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from botocore.auth import S3SigV4Auth, SigV4Auth  # type: ignore[import-untyped]
from botocore.awsrequest import AWSRequest  # type: ignore[import-untyped]
from botocore.credentials import Credentials  # type: ignore[import-untyped]

from ..config import AwsKeySettings
from ..model import Identity
from ..model.request import HeaderView
from .errors import AuthError

__all__ = [
    "AWS_KEY_ISSUER",
    "BODY_MISMATCH_MESSAGE",
    "MAX_SKEW_SECONDS",
    "PRESIGNED_MESSAGE",
    "S3_SERVICES",
    "SESSION_TOKEN_MESSAGE",
    "SIGV4_CREDENTIAL_HEADERS",
    "SIGV4_SCHEME",
    "STREAMING_SIGNED_MESSAGE",
    "STREAMING_UNSIGNED_PAYLOAD_TRAILER",
    "UNSIGNED_PAYLOAD",
    "SigV4Caller",
    "SigV4Verifier",
    "is_presigned",
    "sha256_hex",
]

SIGV4_SCHEME = "AWS4-HMAC-SHA256"
AWS_KEY_ISSUER = "aws-key"
# AWS refuses a request whose X-Amz-Date is more than 15 minutes from its clock
# (RequestTimeTooSkewed); a captured request cannot be replayed later than that.
MAX_SKEW_SECONDS = 15 * 60
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_UNSIGNED_PAYLOAD_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
_UNSIGNED_PAYLOADS = frozenset({UNSIGNED_PAYLOAD, STREAMING_UNSIGNED_PAYLOAD_TRAILER})
# The headers that carry a SigV4 credential: stripped before forwarding (the route's own
# signature replaces them) and never bound into an approval (they change on every retry).
SIGV4_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"}
)
# Services signed the S3 way: the path as sent, no normalization, no second encoding.
S3_SERVICES = frozenset({"s3", "s3-object-lambda", "s3-outposts"})

PRESIGNED_MESSAGE = "presigned URLs are not accepted; sign the request in its Authorization header"
SESSION_TOKEN_MESSAGE = (
    "X-Amz-Security-Token is not accepted: Countersign access keys have no session token "
    "(unset AWS_SESSION_TOKEN for this client)"
)
STREAMING_SIGNED_MESSAGE = (
    "signed streaming uploads (x-amz-content-sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD) are "
    "not accepted; configure the client to sign the whole body or send it unsigned: "
    "request_checksum_calculation = when_required (AWS_REQUEST_CHECKSUM_CALCULATION="
    "when_required) for the AWS CLI and SDKs, and payload signing / chunked encoding off "
    "where the SDK has that setting (e.g. Java: chunkedEncodingEnabled(false))"
)
BODY_MISMATCH_MESSAGE = "the body does not match its signed hash"

_TIMESTAMP = re.compile(r"\d{8}T\d{6}Z")
_SCOPE_PART = re.compile(r"[A-Za-z0-9._-]+")
_SIGNATURE = re.compile(r"[0-9a-f]{64}")
_HEX_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+")  # lower-case RFC 9110 token
# Bodies at least this large are hashed on a worker thread (hashlib releases the GIL), so a
# 10 MiB upload does not stall every other request on the event loop for milliseconds.
_OFFLOAD_HASH_BYTES = 256 * 1024


async def sha256_hex(body: bytes) -> str:
    """The hex SHA-256 of `body`; large bodies are hashed off the event loop."""
    if len(body) < _OFFLOAD_HASH_BYTES:
        return hashlib.sha256(body).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())


@dataclass(frozen=True, slots=True)
class SigV4Caller:
    """What a verified SigV4 signature established, besides the identity."""

    access_key_id: str
    service: str  # the credential scope's service, e.g. "iam", "s3"
    region: str  # the credential scope's region
    # x-amz-content-sha256 as the agent signed it: a hex digest, "UNSIGNED-PAYLOAD" or
    # "STREAMING-UNSIGNED-PAYLOAD-TRAILER" (the body's hex SHA-256 when the header was absent).
    payload: str


@dataclass(frozen=True, slots=True)
class _Authorization:
    access_key_id: str
    date: str
    region: str
    service: str
    signed_headers: tuple[str, ...]
    signature: str


def _parse_authorization(value: str) -> _Authorization:
    """The parts of `AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != SIGV4_SCHEME:
        # Named back only when it looks like an algorithm: never echo a credential.
        shown = f" {algorithm}" if re.fullmatch(r"AWS4-[A-Z0-9-]{1,40}", algorithm) else ""
        raise AuthError(f"only {SIGV4_SCHEME} signatures are accepted, not{shown or ' this'}")
    fields: dict[str, str] = {}
    for item in rest.split(","):
        if not item.strip():
            continue
        name, sep, field_value = item.strip().partition("=")
        if not sep or name not in ("Credential", "SignedHeaders", "Signature"):
            raise AuthError(
                "malformed Authorization header: expected "
                f"'{SIGV4_SCHEME} Credential=…, SignedHeaders=…, Signature=…'"
            )
        if name in fields:
            raise AuthError(f"malformed Authorization header: {name} appears more than once")
        fields[name] = field_value.strip()
    missing = [n for n in ("Credential", "SignedHeaders", "Signature") if n not in fields]
    if missing:
        raise AuthError(f"malformed Authorization header: no {', '.join(missing)}")
    scope = fields["Credential"].split("/")
    if (
        len(scope) != 5
        or scope[4] != "aws4_request"
        or not re.fullmatch(r"\d{8}", scope[1])
        or not all(_SCOPE_PART.fullmatch(part) for part in scope[:4])
    ):
        raise AuthError(
            "malformed Authorization header: Credential must be "
            "ACCESS_KEY_ID/YYYYMMDD/REGION/SERVICE/aws4_request"
        )
    signed = tuple(fields["SignedHeaders"].split(";"))
    if not all(_HEADER_NAME.fullmatch(name) for name in signed) or len(set(signed)) != len(signed):
        raise AuthError(
            "malformed Authorization header: SignedHeaders must be distinct lower-case header "
            "names separated by ';'"
        )
    if not _SIGNATURE.fullmatch(fields["Signature"]):
        raise AuthError("malformed Authorization header: Signature must be 64 hex digits")
    return _Authorization(
        access_key_id=scope[0],
        date=scope[1],
        region=scope[2],
        service=scope[3],
        signed_headers=signed,
        signature=fields["Signature"],
    )


def is_presigned(target: str) -> bool:
    """Whether the request target's query carries a signature: SigV4's (`X-Amz-Signature`,
    `X-Amz-Credential`) or SigV2's (`AWSAccessKeyId` with `Signature`, which boto3 still makes
    for S3 on a custom endpoint)."""
    _, sep, query = target.partition("?")
    if not sep:
        return False
    names = {unquote(pair.partition("=")[0]).lower() for pair in query.split("&")}
    return bool(
        names & {"x-amz-signature", "x-amz-credential"} or {"awsaccesskeyid", "signature"} <= names
    )


class _HeaderList:
    """The signed headers as botocore's signer reads them (names, `get_all`), in a plain list:
    `email.message`, behind botocore's own `HTTPHeaders`, turns undecodable values into
    `Header` objects the signer cannot canonicalize."""

    __slots__ = ("_items",)

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self._items = items

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self._items if key == name]


class _ExactHeaders:
    """botocore's signer over exactly the headers the agent listed in SignedHeaders, with the
    payload hash the verifier already established (botocore would otherwise pick headers by
    its own rules and re-read the body)."""

    _exact: _HeaderList
    _payload: str

    def headers_to_sign(self, request: Any) -> _HeaderList:
        return self._exact

    def payload(self, request: Any) -> str:
        return self._payload


class _Verify(_ExactHeaders, SigV4Auth):  # type: ignore[misc]
    pass


class _VerifyS3(_ExactHeaders, S3SigV4Auth):  # type: ignore[misc]
    pass


def _expected_signature(
    *,
    secret: str,
    parsed: _Authorization,
    method: str,
    url: str,
    signed: _HeaderList,
    payload: str,
    timestamp: str,
) -> str:
    """The signature botocore computes for this request with `secret` (hex)."""
    cls = _VerifyS3 if parsed.service in S3_SERVICES else _Verify
    auth = cls(Credentials(parsed.access_key_id, secret), parsed.service, parsed.region)
    auth._exact = signed
    auth._payload = payload
    request = AWSRequest(method=method, url=url)
    request.context["timestamp"] = timestamp
    canonical = auth.canonical_request(request)
    signature = auth.signature(auth.string_to_sign(request, canonical), request)
    assert isinstance(signature, str)
    return signature


def _one(headers: HeaderView, name: str) -> str | None:
    values = headers.getall(name, [])
    if len(values) > 1:
        raise AuthError(f"more than one credential: the {name} header appears more than once")
    return values[0] if values else None


def _skew(signed_at: float, now: float, stamp: str) -> str | None:
    """Why `stamp` is too far from `now`, or None when it is within AWS's 15 minutes."""
    delta = signed_at - now
    if abs(delta) <= MAX_SKEW_SECONDS:
        return None
    minutes = int(abs(delta) // 60)
    amount = f"{minutes} minutes" if minutes < 120 else f"{minutes // 60} hours"
    way = "ahead of" if delta > 0 else "behind"
    return (
        f"X-Amz-Date {stamp} is {amount} {way} the proxy's clock; a signature must be made "
        "within 15 minutes of it (is the agent's clock right?)"
    )


class SigV4Verifier:
    """Checks an agent's SigV4 signature against the `identity.aws_keys` it was issued."""

    def __init__(
        self, keys: Sequence[AwsKeySettings], *, clock: Callable[[], float] = time.time
    ) -> None:
        # Keyed by a digest of the access key id, as API keys are, so the dict lookup's timing
        # says nothing about the configured ids.
        self._keys: dict[bytes, tuple[AwsKeySettings, Identity]] = {
            _digest(k.access_key_id): (k, _identity(k)) for k in keys
        }
        self._clock = clock

    @property
    def configured(self) -> bool:
        return bool(self._keys)

    async def verify(
        self,
        *,
        method: str,
        target: str,
        host: str,
        headers: HeaderView,
        body: bytes,
        now: float | None = None,
    ) -> tuple[Identity, SigV4Caller]:
        """The identity and scope of a request signed with one of our keys; else `AuthError`.

        `target` is the raw request-target (path?query, still percent-encoded), `host` the
        Host header, `body` the complete body. `now` (epoch seconds) replaces the clock, for
        tests of the 15-minute window.
        """
        if is_presigned(target):
            raise AuthError(PRESIGNED_MESSAGE)
        authorization = _one(headers, "authorization")
        if authorization is None:
            raise AuthError(f"missing Authorization: {SIGV4_SCHEME} … header")
        parsed = _parse_authorization(authorization)
        if headers.getall("x-amz-security-token", []):
            raise AuthError(SESSION_TOKEN_MESSAGE)
        found = self._keys.get(_digest(parsed.access_key_id))
        if found is None or not hmac.compare_digest(
            found[0].access_key_id.encode(), parsed.access_key_id.encode()
        ):
            raise AuthError("unknown access key")
        key, identity = found

        stamp = _one(headers, "x-amz-date")
        if stamp is None:
            raise AuthError("missing X-Amz-Date header: it dates the signature")
        if not _TIMESTAMP.fullmatch(stamp):
            raise AuthError("X-Amz-Date must look like 20240131T235959Z")
        try:
            signed_at = calendar.timegm(
                datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").timetuple()
            )
        except ValueError:
            raise AuthError(f"X-Amz-Date {stamp} is not a valid time") from None
        problem = _skew(signed_at, self._clock() if now is None else now, stamp)
        if problem is not None:
            raise AuthError(problem)
        if parsed.date != stamp[:8]:
            raise AuthError(
                f"the credential scope's date {parsed.date} is not X-Amz-Date's date {stamp[:8]}"
            )

        if "host" not in parsed.signed_headers:
            raise AuthError("the Host header must be signed (it is not in SignedHeaders)")
        signed: list[tuple[str, str]] = []
        for name in parsed.signed_headers:
            values = headers.getall(name, [])
            if not values and name == "host" and host:
                values = [host]
            if not values:
                raise AuthError(f"the signed header {name} is not in the request")
            signed.extend((name, value) for value in values)

        declared = _one(headers, "x-amz-content-sha256")
        if declared is None:
            # No header: the SDK signed the body's hash (botocore does so for every service
            # but S3, which always sends the header).
            payload = await sha256_hex(body)
        elif declared in _UNSIGNED_PAYLOADS or _HEX_SHA256.fullmatch(declared):
            payload = declared
        elif declared.startswith("STREAMING-"):
            raise AuthError(STREAMING_SIGNED_MESSAGE)
        else:
            raise AuthError(
                "X-Amz-Content-SHA256 must be the body's hex SHA-256, UNSIGNED-PAYLOAD or "
                "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
            )

        if not target.startswith("/"):
            raise AuthError("the request target must be a path (/…) to check its signature")
        if not host or any(c in host for c in "/?#@\\ \t"):
            raise AuthError("a valid Host header is needed to check the signature")
        try:
            expected = _expected_signature(
                secret=key.secret,
                parsed=parsed,
                method=method,
                url=f"http://{host}{target}",
                signed=_HeaderList(signed),
                payload=payload,
                timestamp=stamp,
            )
        except (UnicodeError, ValueError):
            # A header or target that is not text (undecodable bytes): it cannot have been
            # signed as sent.
            raise AuthError("the request cannot be canonicalized to check its signature") from None
        if not hmac.compare_digest(expected, parsed.signature):
            raise AuthError(
                "the signature does not match (is the secret right, and does the client sign "
                "the request it sends?)"
            )

        if declared is not None and declared not in _UNSIGNED_PAYLOADS:
            actual = await sha256_hex(body)
            if not hmac.compare_digest(actual, declared.lower()):
                raise AuthError(BODY_MISMATCH_MESSAGE, error="invalid_request", status=403)
        caller = SigV4Caller(
            access_key_id=key.access_key_id,
            service=parsed.service,
            region=parsed.region,
            payload=payload,
        )
        return identity, caller


def _digest(access_key_id: str) -> bytes:
    return hashlib.sha256(access_key_id.encode("utf-8")).digest()


def _identity(key: AwsKeySettings) -> Identity:
    return Identity(
        subject=key.subject,
        issuer=AWS_KEY_ISSUER,
        client_id=key.access_key_id,
        email=key.email,
        groups=frozenset(key.groups),
        owner=key.owner,
        claims={"sub": key.subject, "groups": list(key.groups)},
        # The operator wrote this email into the config: it names the key's person.
        email_verified=key.email is not None,
    )
