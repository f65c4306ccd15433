"""SigV4 verification of agents (proxy.authn.sigv4) against requests real boto3 signs.

Each request is built and signed by boto3 with an endpoint on loopback; a `before-send` hook
captures the prepared request and stops it there, so nothing is sent. The verifier then sees
exactly what the proxy would receive: the raw target, the headers (with Host), the body.
"""

from __future__ import annotations

import calendar
import datetime
import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from multidict import CIMultiDict

from proxy.authn import Authenticator, AuthError
from proxy.authn.apikeys import ApiKeyAuthenticator
from proxy.authn.sigv4 import (
    BODY_MISMATCH_MESSAGE,
    PRESIGNED_MESSAGE,
    SESSION_TOKEN_MESSAGE,
    SIGV4_CREDENTIAL_HEADERS,
    STREAMING_SIGNED_MESSAGE,
    SigV4Verifier,
)
from proxy.config import AwsKeySettings

KEY_ID = "AKIACSTESTKEY7AGENT7"
SECRET = "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"
OTHER_ID = "AKIACSOTHERKEYOTHER2"
OTHER_SECRET = "o" * 40
ENDPOINT = "http://127.0.0.1:8080"
KEYS = (
    AwsKeySettings(
        access_key_id=KEY_ID,
        secret=SECRET,
        subject="agent-7",
        groups=("agents",),
        owner="bob@example.com",
    ),
    AwsKeySettings(
        access_key_id=OTHER_ID,
        secret=OTHER_SECRET,
        subject="reviewer",
        email="carol@example.com",
    ),
)
# S3 keys that a path normalizer or a second encoding would change.
ODD_KEYS = [
    "a//b",
    "plus+sign",
    "eq=ual&amp",
    "with space/and  two",
    "ünï/cødé ✓.txt",
    "dots/./and/../x",
    "percent%2F41",
    "~tilde*star'quote(paren)!",
]


class Captured(Exception):
    """Raised by the before-send hook: the signed request, never sent."""

    def __init__(self, request: Any) -> None:
        super().__init__("captured")
        self.request = request


def _stop(request: Any, **_: Any) -> None:
    raise Captured(request)


@dataclass(frozen=True)
class Signed:
    """A request as the proxy receives it."""

    method: str
    target: str
    host: str
    headers: CIMultiDict[str]
    body: bytes

    def with_header(self, name: str, value: str) -> Signed:
        headers = CIMultiDict(self.headers)
        headers[name] = value
        return replace(self, headers=headers)


def boto_client(
    service: str,
    *,
    endpoint: str = ENDPOINT,
    key_id: str = KEY_ID,
    secret: str = SECRET,
    token: str | None = None,
    **config: Any,
) -> Any:
    """A boto3 client whose requests are captured, never sent."""
    client = boto3.client(
        service,
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        aws_session_token=token,
        config=Config(retries={"max_attempts": 1}, **config),
    )
    client.meta.events.register("before-send", _stop)
    return client


def as_received(prepared: Any) -> Signed:
    """What the proxy would receive for botocore's prepared request (urllib3 adds Host)."""
    url = urlsplit(prepared.url)
    headers: CIMultiDict[str] = CIMultiDict()
    headers["Host"] = url.netloc
    for name, value in prepared.headers.items():
        headers.add(name, value.decode() if isinstance(value, bytes) else str(value))
    body = prepared.body
    if hasattr(body, "read"):
        body = body.read()
    if isinstance(body, str):
        body = body.encode()
    target = url.path + (f"?{url.query}" if url.query else "")
    return Signed(prepared.method, target, url.netloc, headers, body or b"")


def capture(client: Any, operation: str, **params: Any) -> Signed:
    """Call `operation` on a capturing client; the request it would have sent."""
    try:
        getattr(client, operation)(**params)
    except Captured as captured:
        return as_received(captured.request)
    raise AssertionError(f"{operation} was not captured")


def signed_at(request: Signed) -> float:
    stamp = request.headers["X-Amz-Date"]
    return calendar.timegm(datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").timetuple())


@pytest.fixture
def verifier() -> SigV4Verifier:
    return SigV4Verifier(KEYS)


async def verify(verifier: SigV4Verifier, request: Signed, **kwargs: Any) -> Any:
    return await verifier.verify(
        method=request.method,
        target=request.target,
        host=request.host,
        headers=request.headers,
        body=request.body,
        **kwargs,
    )


def _iam_create_role() -> Signed:
    return capture(
        boto_client("iam"),
        "create_role",
        RoleName="deployer",
        AssumeRolePolicyDocument='{"Version": "2012-10-17", "Statement": []}',
        Description="made by an agent: ünïcode & symbols +=/",
    )


def _dynamodb_create_table() -> Signed:
    return capture(
        boto_client("dynamodb"),
        "create_table",
        TableName="orders",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


CASES: dict[str, Callable[[], Signed]] = {
    "iam-list-roles": lambda: capture(boto_client("iam"), "list_roles", PathPrefix="/a b/+/"),
    "iam-create-role": _iam_create_role,
    "dynamodb-create-table": _dynamodb_create_table,
    "dynamodb-describe-table": lambda: capture(
        boto_client("dynamodb"), "describe_table", TableName="orders"
    ),
    "s3-list-odd-prefix": lambda: capture(
        boto_client("s3"), "list_objects_v2", Bucket="bkt", Prefix="a b/ü+=&~*'()!"
    ),
    "lambda-invoke-qualified": lambda: capture(
        boto_client("lambda"), "invoke", FunctionName="fn:prod", Payload=b'{"x": 1}'
    ),
    "sts-get-caller-identity": lambda: capture(boto_client("sts"), "get_caller_identity"),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_boto3_requests_verify(verifier: SigV4Verifier, case: str) -> None:
    request = CASES[case]()
    identity, caller = await verify(verifier, request)
    assert identity.subject == "agent-7"
    assert identity.issuer == "aws-key"
    assert identity.client_id == KEY_ID
    assert identity.groups == frozenset({"agents"})
    assert identity.owner == "bob@example.com"
    assert identity.person is None  # no email configured: this key names no person
    assert caller.access_key_id == KEY_ID
    assert caller.region == "us-east-1"
    assert caller.service == case.split("-")[0]
    # Non-S3 services sign the body's hash without sending it as a header.
    assert caller.payload == hashlib.sha256(request.body).hexdigest()


@pytest.mark.parametrize("key", ODD_KEYS)
async def test_s3_put_and_get_with_odd_keys_verify(verifier: SigV4Verifier, key: str) -> None:
    put = capture(boto_client("s3"), "put_object", Bucket="bkt", Key=key, Body=b"odd \x00 bytes")
    assert "//" in put.target or "//" not in key
    _, caller = await verify(verifier, put)
    assert (caller.service, caller.payload) == ("s3", hashlib.sha256(b"odd \x00 bytes").hexdigest())
    get = capture(boto_client("s3"), "get_object", Bucket="bkt", Key=key)
    _, caller = await verify(verifier, get)
    assert caller.payload == hashlib.sha256(b"").hexdigest()


async def test_the_email_of_a_key_names_its_person(verifier: SigV4Verifier) -> None:
    client = boto_client("iam", key_id=OTHER_ID, secret=OTHER_SECRET)
    identity, _ = await verify(verifier, capture(client, "list_users"))
    assert identity.subject == "reviewer"
    assert identity.email == "carol@example.com"
    assert identity.email_verified is True
    assert identity.person == "carol@example.com"


async def test_streaming_unsigned_trailer_is_accepted(verifier: SigV4Verifier) -> None:
    # Over https boto3 sends an aws-chunked body with a CRC32 trailer and an unsigned payload.
    client = boto_client("s3", endpoint="https://127.0.0.1:8443")
    request = capture(client, "put_object", Bucket="bkt", Key="k", Body=io.BytesIO(b"hello"))
    assert request.headers["X-Amz-Content-SHA256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert request.headers["Content-Encoding"] == "aws-chunked"
    _, caller = await verify(verifier, request)
    assert caller.payload == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"


def unsigned_put(bucket: str) -> Signed:
    """An S3 PutObject of b"hello" as boto3 signs it with payload signing off (over https)."""
    client = boto_client(
        "s3",
        endpoint="https://127.0.0.1:8443",
        s3={"payload_signing_enabled": False},
        request_checksum_calculation="when_required",
    )
    request = capture(
        client,
        "put_object",
        Bucket=bucket,
        Key="k",
        Body=b"hello",
        ContentMD5="XUFAKrxLKna5cZ2REBfFkg==",
    )
    assert request.headers["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
    return request


async def test_unsigned_payload_is_accepted(verifier: SigV4Verifier) -> None:
    request = unsigned_put("bkt")
    _, caller = await verify(verifier, request)
    assert caller.payload == "UNSIGNED-PAYLOAD"
    # The body is not signed: another body still verifies (the approval binds the body).
    await verify(verifier, replace(request, body=b"other"))


async def test_through_the_authenticator(verifier: SigV4Verifier) -> None:
    authenticator = Authenticator(ApiKeyAuthenticator(()), None, verifier)
    request = _dynamodb_create_table()
    authenticated = await authenticator.authenticate_request(
        ("aws_sigv4",),
        method=request.method,
        target=request.target,
        host=request.host,
        headers=request.headers,
        body=request.body,
    )
    assert authenticated.identity.subject == "agent-7"
    assert authenticated.credential_headers == SIGV4_CREDENTIAL_HEADERS
    assert authenticated.sigv4 is not None
    assert authenticated.sigv4.service == "dynamodb"


# -- refusals ---------------------------------------------------------------------------------


async def refused(verifier: SigV4Verifier, request: Signed, **kwargs: Any) -> AuthError:
    with pytest.raises(AuthError) as caught:
        await verify(verifier, request, **kwargs)
    return caught.value


async def test_tampered_body_of_s3_is_refused_as_403(verifier: SigV4Verifier) -> None:
    request = capture(boto_client("s3"), "put_object", Bucket="bkt", Key="k", Body=b"approved")
    error = await refused(verifier, replace(request, body=b"swapped!"))
    assert error.description == BODY_MISMATCH_MESSAGE
    assert error.status == 403


async def test_tampered_body_of_a_service_signing_its_hash_is_refused(
    verifier: SigV4Verifier,
) -> None:
    request = _dynamodb_create_table()
    error = await refused(
        verifier, replace(request, body=request.body.replace(b"orders", b"ordxrs"))
    )
    assert error.description.startswith("the signature does not match")
    assert error.status == 401


async def test_tampered_signed_header_is_refused(verifier: SigV4Verifier) -> None:
    request = capture(boto_client("dynamodb"), "describe_table", TableName="orders")
    tampered = request.with_header("X-Amz-Target", "DynamoDB_20120810.DeleteTable")
    assert (await refused(verifier, tampered)).description.startswith(
        "the signature does not match"
    )


async def test_an_unsigned_header_may_change(verifier: SigV4Verifier) -> None:
    request = capture(boto_client("dynamodb"), "describe_table", TableName="orders")
    await verify(verifier, request.with_header("User-Agent", "something else"))


@pytest.mark.parametrize(
    "target",
    ["/bkt/a/b", "/bkt/a%2F%2Fb", "/bkt/a//b?x=1", "/bkt/a//b/"],
)
async def test_tampered_s3_path_is_refused(verifier: SigV4Verifier, target: str) -> None:
    request = capture(boto_client("s3"), "get_object", Bucket="bkt", Key="a//b")
    assert request.target == "/bkt/a//b"
    error = await refused(verifier, replace(request, target=target))
    assert error.description.startswith("the signature does not match")


async def test_wrong_secret_is_refused(verifier: SigV4Verifier) -> None:
    client = boto_client("iam", secret="W" * 40)
    error = await refused(verifier, capture(client, "list_roles"))
    assert error.description.startswith("the signature does not match")


async def test_unknown_key_is_refused(verifier: SigV4Verifier) -> None:
    client = boto_client("iam", key_id="AKIAIOSFODNN7EXAMPLE")
    assert (await refused(verifier, capture(client, "list_roles"))).description == (
        "unknown access key"
    )


async def test_a_session_token_is_refused(verifier: SigV4Verifier) -> None:
    client = boto_client("iam", token="FwoGZXIvYXdzE-session")
    assert (await refused(verifier, capture(client, "list_roles"))).description == (
        SESSION_TOKEN_MESSAGE
    )


@pytest.mark.parametrize(
    ("offset", "words"),
    [(16 * 60, "16 minutes behind"), (-16 * 60, "16 minutes ahead of"), (-3 * 3600, "3 hours")],
)
async def test_clock_skew_beyond_15_minutes_is_refused(
    verifier: SigV4Verifier, offset: int, words: str
) -> None:
    request = _iam_create_role()
    error = await refused(verifier, request, now=signed_at(request) + offset)
    assert words in error.description
    assert "within 15 minutes" in error.description


@pytest.mark.parametrize("offset", [14 * 60, -14 * 60, 15 * 60])
async def test_skew_within_15_minutes_is_accepted(verifier: SigV4Verifier, offset: int) -> None:
    request = _iam_create_role()
    await verify(verifier, request, now=signed_at(request) + offset)


async def test_the_default_clock_is_the_verifiers(verifier: SigV4Verifier) -> None:
    request = _iam_create_role()
    late = SigV4Verifier(KEYS, clock=lambda: signed_at(request) + 3600)
    assert "60 minutes behind" in (await refused(late, request)).description


async def test_scope_date_must_be_x_amz_date_s_date(verifier: SigV4Verifier) -> None:
    request = capture(boto_client("iam"), "list_roles")
    day = request.headers["X-Amz-Date"][:8]
    other = "19991231" if day != "19991231" else "20000101"
    authorization = request.headers["Authorization"].replace(f"/{day}/", f"/{other}/")
    error = await refused(verifier, request.with_header("Authorization", authorization))
    assert error.description == (
        f"the credential scope's date {other} is not X-Amz-Date's date {day}"
    )


def _sign_by_hand(
    *,
    headers: dict[str, str],
    body: bytes = b"",
    url: str = f"{ENDPOINT}/bkt/key",
    method: str = "PUT",
    auth: type[Any] = SigV4Auth,
) -> Signed:
    """A request signed by botocore's signer directly, for what no SDK call produces."""
    request = AWSRequest(method=method, url=url, headers=headers, data=body)
    auth(Credentials(KEY_ID, SECRET), "s3", "us-east-1").add_auth(request)
    received: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers.items():
        received.add(name, value)
    url_parts = urlsplit(url)
    return Signed(method, url_parts.path, url_parts.netloc, received, body)


@pytest.mark.parametrize(
    "mode", ["STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"]
)
async def test_signed_streaming_payload_is_refused(verifier: SigV4Verifier, mode: str) -> None:
    request = _sign_by_hand(
        headers={"Host": "127.0.0.1:8080", "X-Amz-Content-SHA256": mode},
        body=b"5;chunk-signature=00\r\nhello\r\n",
    )
    error = await refused(verifier, request)
    assert error.description == STREAMING_SIGNED_MESSAGE
    assert "request_checksum_calculation = when_required" in error.description


async def test_a_hand_signed_request_verifies(verifier: SigV4Verifier) -> None:
    # The same signer the refusals above use, with nothing wrong: they fail for their reason.
    request = _sign_by_hand(headers={"Host": "127.0.0.1:8080"}, body=b"x")
    await verify(verifier, request)


async def test_host_must_be_signed(verifier: SigV4Verifier) -> None:
    request = capture(boto_client("iam"), "list_roles")
    authorization = request.headers["Authorization"].replace(
        "SignedHeaders=content-type;host;x-amz-date", "SignedHeaders=content-type;x-amz-date"
    )
    error = await refused(verifier, request.with_header("Authorization", authorization))
    assert error.description == "the Host header must be signed (it is not in SignedHeaders)"


@pytest.mark.parametrize("version", ["s3v4", None])  # None: boto3's default, SigV2 query auth
async def test_presigned_url_is_refused(verifier: SigV4Verifier, version: str | None) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=ENDPOINT,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        config=Config(signature_version=version),
    )
    url = urlsplit(client.generate_presigned_url("get_object", {"Bucket": "b", "Key": "k"}))
    headers: CIMultiDict[str] = CIMultiDict({"Host": url.netloc})
    request = Signed("GET", f"{url.path}?{url.query}", url.netloc, headers, b"")
    assert (await refused(verifier, request)).description == PRESIGNED_MESSAGE
    # Through the authenticator too: the query signature counts as the route's credential.
    authenticator = Authenticator(ApiKeyAuthenticator(()), None, verifier)
    with pytest.raises(AuthError, match="presigned URLs are not accepted"):
        await authenticator.authenticate_request(
            ("aws_sigv4",),
            method="GET",
            target=request.target,
            host=request.host,
            headers=headers,
            body=b"",
        )


async def test_repeated_authorization_is_refused(verifier: SigV4Verifier) -> None:
    request = capture(boto_client("iam"), "list_roles")
    headers = CIMultiDict(request.headers)
    headers.add("Authorization", request.headers["Authorization"])
    error = await refused(verifier, replace(request, headers=headers))
    assert error.description.startswith("more than one credential")


async def test_repeated_x_amz_date_is_refused(verifier: SigV4Verifier) -> None:
    request = capture(boto_client("iam"), "list_roles")
    headers = CIMultiDict(request.headers)
    headers.add("X-Amz-Date", request.headers["X-Amz-Date"])
    assert (
        "x-amz-date header appears more than once"
        in (await refused(verifier, replace(request, headers=headers))).description
    )


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (
            "AWS4-HMAC-SHA256",
            "malformed Authorization header: no Credential, SignedHeaders, Signature",
        ),
        (
            "AWS4-HMAC-SHA256 Credential=AKIACSTESTKEY7AGENT7/20240101/us-east-1/iam, "
            "SignedHeaders=host, Signature=" + "0" * 64,
            "malformed Authorization header: Credential must be "
            "ACCESS_KEY_ID/YYYYMMDD/REGION/SERVICE/aws4_request",
        ),
        (
            "AWS4-HMAC-SHA256 Credential=AKIACSTESTKEY7AGENT7/20240101/us-east-1/iam/aws4_request, "
            "SignedHeaders=Host;X-Amz-Date, Signature=" + "0" * 64,
            "malformed Authorization header: SignedHeaders must be distinct lower-case header "
            "names separated by ';'",
        ),
        (
            "AWS4-HMAC-SHA256 Credential=AKIACSTESTKEY7AGENT7/20240101/us-east-1/iam/aws4_request, "
            "SignedHeaders=host, Signature=abc",
            "malformed Authorization header: Signature must be 64 hex digits",
        ),
        (
            "AWS4-HMAC-SHA256 Credential=a/b, Credential=c/d, Signature=x",
            "malformed Authorization header: Credential appears more than once",
        ),
        (
            "AWS4-ECDSA-P256-SHA256 Credential=x",
            "only AWS4-HMAC-SHA256 signatures are accepted, not AWS4-ECDSA-P256-SHA256",
        ),
        ("AWS4-secretlookingthing x", "only AWS4-HMAC-SHA256 signatures are accepted, not this"),
    ],
)
async def test_malformed_authorization_is_refused(
    verifier: SigV4Verifier, authorization: str, message: str
) -> None:
    request = capture(boto_client("iam"), "list_roles").with_header("Authorization", authorization)
    assert (await refused(verifier, request)).description == message


async def test_a_signed_header_missing_from_the_request_is_refused(
    verifier: SigV4Verifier,
) -> None:
    request = capture(boto_client("dynamodb"), "describe_table", TableName="orders")
    headers = CIMultiDict(request.headers)
    del headers["X-Amz-Target"]
    error = await refused(verifier, replace(request, headers=headers))
    assert error.description == "the signed header x-amz-target is not in the request"


async def test_missing_or_bad_x_amz_date_is_refused(verifier: SigV4Verifier) -> None:
    request = capture(boto_client("iam"), "list_roles")
    headers = CIMultiDict(request.headers)
    del headers["X-Amz-Date"]
    missing = await refused(verifier, replace(request, headers=headers))
    assert missing.description == "missing X-Amz-Date header: it dates the signature"
    bad = await refused(verifier, request.with_header("X-Amz-Date", "2024-01-01T00:00:00Z"))
    assert bad.description == "X-Amz-Date must look like 20240131T235959Z"
    invalid = await refused(verifier, request.with_header("X-Amz-Date", "20241399T250000Z"))
    assert invalid.description == "X-Amz-Date 20241399T250000Z is not a valid time"


async def test_an_undecodable_signed_header_is_refused_not_a_crash(
    verifier: SigV4Verifier,
) -> None:
    request = capture(boto_client("dynamodb"), "describe_table", TableName="orders")
    # aiohttp hands undecodable header bytes over as lone surrogates.
    tampered = request.with_header("X-Amz-Target", "DynamoDB_20120810.\udcff")
    error = await refused(verifier, tampered)
    assert error.description == "the request cannot be canonicalized to check its signature"


async def test_an_odd_content_sha256_is_refused(verifier: SigV4Verifier) -> None:
    request = capture(boto_client("s3"), "get_object", Bucket="b", Key="k")
    error = await refused(verifier, request.with_header("X-Amz-Content-SHA256", "whatever"))
    assert error.description == (
        "X-Amz-Content-SHA256 must be the body's hex SHA-256, UNSIGNED-PAYLOAD or "
        "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    )


async def test_large_bodies_verify(verifier: SigV4Verifier) -> None:
    # Above the size hashed on a worker thread.
    body = bytes(range(256)) * 4096
    request = capture(boto_client("s3"), "put_object", Bucket="b", Key="big", Body=body)
    _, caller = await verify(verifier, request)
    assert caller.payload == hashlib.sha256(body).hexdigest()
    error = await refused(verifier, replace(request, body=body[:-1] + b"!"))
    assert error.description == BODY_MISMATCH_MESSAGE
