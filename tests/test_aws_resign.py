"""Re-signing upstream (proxy.aws_resign) against moto's server with signature checking on.

The chain the proxy runs: boto3 signs with a Countersign key (captured, never sent), the
verifier accepts it, the caller's credential headers are dropped, `AwsUpstreamSigner` signs with
the route's real credentials, and the request goes to moto. moto recomputes the signature with
botocore from what it receives (path, query, signed headers, and for services other than S3 the
body's hash) and refuses a mismatch with `SignatureDoesNotMatch`: an answer proves the
re-signing is what AWS checks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from proxy.authn.sigv4 import SIGV4_CREDENTIAL_HEADERS, SigV4Verifier
from proxy.aws_resign import AwsUpstreamSigner
from proxy.config import AwsProfileCredentials, AwsRouteSettings, AwsStaticCredentials
from tests.test_sigv4 import KEYS, ODD_KEYS, Signed, boto_client, capture, unsigned_put

REGION = "us-east-1"
ADMIN = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
}
TRUST_ANYONE = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}],
}
# moto's requests that skip the signature check, spent on the setup below.
SETUP_ACTIONS = 5
# Framing the forwarder sets itself, never what it signs.
HOP_BY_HOP = frozenset({"connection", "content-length", "expect", "host", "transfer-encoding"})
SIGNATURE_MISMATCH = "SignatureDoesNotMatch"


@dataclass(frozen=True)
class Moto:
    url: str
    access_key_id: str
    secret_access_key: str
    role_arn: str

    def settings(self, **overrides: Any) -> AwsRouteSettings:
        credentials = AwsStaticCredentials(
            access_key_id=self.access_key_id,
            secret_access_key=overrides.pop("secret", self.secret_access_key),
        )
        return AwsRouteSettings(region=REGION, credentials=credentials, **overrides)


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    """moto's server in this process, checking signatures once its setup is done."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        # The next SETUP_ACTIONS requests are not checked; every later one is.
        httpx.post(
            f"{url}/moto-api/reset-auth", content=str(SETUP_ACTIONS).encode()
        ).raise_for_status()
        iam = boto3.client(
            "iam",
            endpoint_url=url,
            region_name=REGION,
            aws_access_key_id="AKIASETUP00000000000",
            aws_secret_access_key="setup" * 8,
        )
        iam.create_user(UserName="countersign")
        key = iam.create_access_key(UserName="countersign")["AccessKey"]
        iam.put_user_policy(
            UserName="countersign", PolicyName="admin", PolicyDocument=json.dumps(ADMIN)
        )
        role = iam.create_role(RoleName="worker", AssumeRolePolicyDocument=json.dumps(TRUST_ANYONE))
        iam.put_role_policy(RoleName="worker", PolicyName="admin", PolicyDocument=json.dumps(ADMIN))
        yield Moto(url, key["AccessKeyId"], key["SecretAccessKey"], role["Role"]["Arn"])
    finally:
        # Signature checking is a process-wide moto setting: leave it off for others.
        httpx.post(f"{url}/moto-api/reset-auth", content=b"inf")
        server.stop()


@pytest.fixture
async def signer(moto: Moto) -> AwsUpstreamSigner:
    signer = AwsUpstreamSigner(moto.settings())
    await signer.start()
    return signer


async def forward(
    moto: Moto, signer: AwsUpstreamSigner, request: Signed, *, body: bytes | None = None
) -> httpx.Response:
    """What the proxy does with an agent's request: verify, drop the credential, re-sign, send."""
    _, caller = await SigV4Verifier(KEYS).verify(
        method=request.method,
        target=request.target,
        host=request.host,
        headers=request.headers,
        body=request.body,
    )
    headers = [
        (name, value)
        for name, value in request.headers.items()
        if name.lower() not in HOP_BY_HOP and name.lower() not in SIGV4_CREDENTIAL_HEADERS
    ]
    url = moto.url + request.target
    signed = await signer.sign(
        method=request.method,
        url=url,
        headers=headers,
        body=request.body,
        service=caller.service,
        payload=caller.payload,
    )
    async with httpx.AsyncClient() as client:
        return await client.request(
            request.method,
            httpx.URL(url),
            headers=signed,
            content=request.body if body is None else body,
        )


async def test_iam_list_and_create_roles(moto: Moto, signer: AwsUpstreamSigner) -> None:
    listed = await forward(moto, signer, capture(boto_client("iam"), "list_roles"))
    assert listed.status_code == 200, listed.text
    created = await forward(
        moto,
        signer,
        capture(
            boto_client("iam"),
            "create_role",
            RoleName="made-by-agent",
            AssumeRolePolicyDocument=json.dumps(TRUST_ANYONE),
            Description="ünïcode & symbols +=/",
        ),
    )
    assert created.status_code == 200, created.text
    listed = await forward(moto, signer, capture(boto_client("iam"), "list_roles"))
    assert "<RoleName>made-by-agent</RoleName>" in listed.text


async def test_dynamodb_create_and_describe_table(moto: Moto, signer: AwsUpstreamSigner) -> None:
    create = capture(
        boto_client("dynamodb"),
        "create_table",
        TableName="orders",
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    created = await forward(moto, signer, create)
    assert created.status_code == 200, created.text
    described = await forward(
        moto, signer, capture(boto_client("dynamodb"), "describe_table", TableName="orders")
    )
    assert described.status_code == 200, described.text
    assert described.json()["Table"]["TableName"] == "orders"


async def test_s3_objects_with_odd_keys_round_trip(moto: Moto, signer: AwsUpstreamSigner) -> None:
    made = await forward(moto, signer, capture(boto_client("s3"), "create_bucket", Bucket="odd"))
    assert made.status_code == 200, made.text
    # Keys with "." or ".." segments are left out here: httpx resolves them before sending (and
    # the proxy refuses such paths as ambiguous before anything is signed).
    keys = [key for key in ODD_KEYS if not {".", ".."} & set(key.split("/"))]
    assert len(keys) == len(ODD_KEYS) - 1
    for number, key in enumerate(keys):
        body = f"object {number}: {key}".encode() + bytes(range(256))
        put = capture(boto_client("s3"), "put_object", Bucket="odd", Key=key, Body=body)
        stored = await forward(moto, signer, put)
        assert stored.status_code == 200, (key, stored.text)
        got = await forward(
            moto, signer, capture(boto_client("s3"), "get_object", Bucket="odd", Key=key)
        )
        assert got.status_code == 200, (key, got.text)
        assert got.content == body, key
    listed = await forward(
        moto,
        signer,
        capture(boto_client("s3"), "list_objects_v2", Bucket="odd", Prefix="ünï/cødé ✓"),
    )
    assert listed.status_code == 200, listed.text


async def test_s3_streaming_unsigned_trailer_upload(moto: Moto, signer: AwsUpstreamSigner) -> None:
    await forward(moto, signer, capture(boto_client("s3"), "create_bucket", Bucket="chunks"))
    # boto3 over https: an aws-chunked body with a CRC32 trailer, payload unsigned.
    client = boto_client("s3", endpoint="https://127.0.0.1:8443")
    put = capture(client, "put_object", Bucket="chunks", Key="a//b c", Body=_Stream(b"chunked!"))
    assert put.headers["X-Amz-Content-SHA256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    stored = await forward(moto, signer, put)
    assert stored.status_code == 200, stored.text
    got = await forward(
        moto, signer, capture(boto_client("s3"), "get_object", Bucket="chunks", Key="a//b c")
    )
    assert got.content == b"chunked!"


async def test_s3_unsigned_payload_upload(moto: Moto, signer: AwsUpstreamSigner) -> None:
    await forward(moto, signer, capture(boto_client("s3"), "create_bucket", Bucket="unsigned"))
    put = unsigned_put("unsigned")
    stored = await forward(moto, signer, put)
    assert stored.status_code == 200, stored.text


class _Stream:
    """A readable body of unknown length, as an upload from a file or pipe is."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._position = 0

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._position + size
        chunk = self._data[self._position : end]
        self._position += len(chunk)
        return chunk

    def seek(self, position: int, whence: int = 0) -> int:
        self._position = position if whence == 0 else len(self._data) + position
        return self._position

    def tell(self) -> int:
        return self._position


@pytest.mark.parametrize(
    ("service", "operation", "params"),
    [
        ("iam", "list_roles", {}),
        ("dynamodb", "list_tables", {}),
        ("s3", "list_buckets", {}),
        ("s3", "put_object", {"Bucket": "odd", "Key": "a//b", "Body": b"x"}),
    ],
)
async def test_moto_refuses_a_wrong_secret(
    moto: Moto, service: str, operation: str, params: dict[str, Any]
) -> None:
    wrong = AwsUpstreamSigner(moto.settings(secret="W" * 40))
    await wrong.start()
    answer = await forward(moto, wrong, capture(boto_client(service), operation, **params))
    assert answer.status_code == 403
    assert SIGNATURE_MISMATCH in answer.text


async def test_moto_checks_the_path_and_the_hashed_body(
    moto: Moto, signer: AwsUpstreamSigner
) -> None:
    # What a signature covers, as moto checks it: a signed request sent elsewhere is refused...
    signed = await signer.sign(
        method="GET", url=f"{moto.url}/odd/a//b", headers=[], body=b"", service="s3", payload=""
    )
    async with httpx.AsyncClient() as client:
        moved = await client.get(httpx.URL(f"{moto.url}/odd/a/b"), headers=signed)
    assert moved.status_code == 403 and SIGNATURE_MISMATCH in moved.text
    # ... and so is another body for a service that signs the body's hash (IAM).
    request = capture(boto_client("iam"), "list_roles")
    other = request.body.replace(b"ListRoles", b"ListUsers")
    answer = await forward(moto, signer, request, body=other)
    assert answer.status_code == 403 and SIGNATURE_MISMATCH in answer.text


# -- the headers sign() returns ---------------------------------------------------------------


def _auth(headers: list[tuple[str, str]]) -> dict[str, str]:
    value = dict(headers)["Authorization"]
    return dict(re.findall(r"(Credential|SignedHeaders|Signature)=([^,\s]+)", value))


async def test_sign_replaces_the_clients_signing_headers_and_keeps_order() -> None:
    signer = AwsUpstreamSigner(
        AwsRouteSettings(
            region="eu-west-3",
            credentials=AwsStaticCredentials(
                access_key_id="AKIAREAL000000000001",
                secret_access_key="r" * 40,
                session_token="TOKEN",
            ),
        )
    )
    await signer.start()
    given = [
        ("Host", "proxy.example.com"),
        ("Content-Type", "application/x-amz-json-1.0"),
        ("Authorization", "AWS4-HMAC-SHA256 Credential=AKIACS…"),
        ("X-Amz-Target", "DynamoDB_20120810.ListTables"),
        ("x-amz-date", "20000101T000000Z"),
        ("X-Amz-Security-Token", "agent's"),
        ("X-Amz-Content-SHA256", "UNSIGNED-PAYLOAD"),
        ("X-Forwarded-For", "10.0.0.1"),
        ("Date", "Mon, 01 Jan 2024 00:00:00 GMT"),
        ("Content-Length", "2"),
        ("Countersign-Request-Id", "req-1"),
    ]
    headers = await signer.sign(
        method="POST",
        url="https://dynamodb.eu-west-3.amazonaws.com:443/",
        headers=given,
        body=b"{}",
        service="dynamodb",
        payload="44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a",
    )
    names = [name for name, _ in headers]
    assert names[0] == "Host" and dict(headers)["Host"] == "dynamodb.eu-west-3.amazonaws.com"
    # The client's order, minus what was replaced; each signing header once.
    kept = [
        n
        for n in names
        if n in ("Content-Type", "X-Amz-Target", "X-Forwarded-For", "Content-Length")
    ]
    assert kept == ["Content-Type", "X-Amz-Target", "X-Forwarded-For", "Content-Length"]
    lowered = [n.lower() for n in names]
    for name in ("authorization", "x-amz-date", "x-amz-security-token", "host"):
        assert lowered.count(name) == 1, name
    assert dict(headers)["X-Amz-Security-Token"] == "TOKEN"
    assert dict(headers)["X-Amz-Date"] != "20000101T000000Z"
    assert dict(headers)["Date"] == "Mon, 01 Jan 2024 00:00:00 GMT"  # kept, not signed
    # Non-S3 with a hashed body: no X-Amz-Content-SHA256 header (the hash is signed).
    assert "x-amz-content-sha256" not in lowered
    auth = _auth(headers)
    assert auth["Credential"].startswith("AKIAREAL000000000001/")
    assert auth["Credential"].endswith("/eu-west-3/dynamodb/aws4_request")
    assert auth["SignedHeaders"] == (
        "content-type;countersign-request-id;host;x-amz-date;x-amz-security-token;x-amz-target"
    )


@pytest.mark.parametrize(
    ("service", "payload", "expected"),
    [
        ("s3", "", "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"),
        ("s3", "UNSIGNED-PAYLOAD", "UNSIGNED-PAYLOAD"),
        ("s3", "STREAMING-UNSIGNED-PAYLOAD-TRAILER", "STREAMING-UNSIGNED-PAYLOAD-TRAILER"),
        # A hex digest from the agent is not trusted: the hash is the body's own.
        ("s3", "0" * 64, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"),
        ("iam", "UNSIGNED-PAYLOAD", "UNSIGNED-PAYLOAD"),
        ("iam", "0" * 64, None),
    ],
)
async def test_the_payload_header(service: str, payload: str, expected: str | None) -> None:
    signer = AwsUpstreamSigner(
        AwsRouteSettings(
            region=REGION,
            credentials=AwsStaticCredentials(
                access_key_id="AKIAREAL000000000001", secret_access_key="r" * 40
            ),
        )
    )
    await signer.start()
    headers = await signer.sign(
        method="PUT",
        url="http://127.0.0.1:9000/b/k",
        headers=[],
        body=b"hello",
        service=service,
        payload=payload,
    )
    assert dict(headers).get("X-Amz-Content-SHA256") == expected
    assert dict(headers)["Host"] == "127.0.0.1:9000"


async def test_the_route_may_name_the_service() -> None:
    signer = AwsUpstreamSigner(
        AwsRouteSettings(
            region=REGION,
            service="execute-api",
            credentials=AwsStaticCredentials(
                access_key_id="AKIAREAL000000000001", secret_access_key="r" * 40
            ),
        )
    )
    await signer.start()
    headers = await signer.sign(
        method="GET", url="https://[::1]:8443/x", headers=[], body=b"", service="s3", payload=""
    )
    assert _auth(headers)["Credential"].endswith(f"/{REGION}/execute-api/aws4_request")
    assert dict(headers)["Host"] == "[::1]:8443"


async def test_sign_before_start_is_an_error(moto: Moto) -> None:
    with pytest.raises(RuntimeError, match=r"start\(\) has not completed"):
        await AwsUpstreamSigner(moto.settings()).sign(
            method="GET", url=moto.url, headers=[], body=b"", service="s3", payload=""
        )


# -- where the credentials come from ----------------------------------------------------------

_CHAIN_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CREDENTIAL_EXPIRATION",
)


@pytest.fixture
def aws_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An environment whose only AWS credentials are what the test writes into `tmp_path`."""
    for name in _CHAIN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    (tmp_path / "credentials").write_text("")
    (tmp_path / "config").write_text("")
    return tmp_path


async def test_default_chain_reads_the_environment(
    moto: Moto, aws_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto.secret_access_key)
    signer = AwsUpstreamSigner(AwsRouteSettings(region=REGION))
    await signer.start()
    assert signer.source == "env"
    answer = await forward(moto, signer, capture(boto_client("iam"), "list_roles"))
    assert answer.status_code == 200, answer.text


async def test_a_named_profile_from_the_shared_files(moto: Moto, aws_files: Path) -> None:
    (aws_files / "credentials").write_text(
        f"[real]\naws_access_key_id = {moto.access_key_id}\n"
        f"aws_secret_access_key = {moto.secret_access_key}\n"
    )
    signer = AwsUpstreamSigner(
        AwsRouteSettings(region=REGION, credentials=AwsProfileCredentials(profile="real"))
    )
    await signer.start()
    assert signer.source == "shared-credentials-file"
    answer = await forward(moto, signer, capture(boto_client("dynamodb"), "list_tables"))
    assert answer.status_code == 200, answer.text


async def test_a_missing_profile_is_a_clear_error(aws_files: Path) -> None:
    signer = AwsUpstreamSigner(
        AwsRouteSettings(region=REGION, credentials=AwsProfileCredentials(profile="nope"))
    )
    with pytest.raises(RuntimeError) as caught:
        await signer.start()
    assert str(caught.value) == (
        "the AWS profile 'nope' is not in the shared config or credentials files "
        "(~/.aws/config, ~/.aws/credentials, or AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE)"
    )


async def test_no_credentials_anywhere_is_a_clear_error(aws_files: Path) -> None:
    with pytest.raises(RuntimeError) as caught:
        await AwsUpstreamSigner(AwsRouteSettings(region=REGION)).start()
    message = str(caught.value)
    assert message.startswith("no AWS credentials found (looked in the environment")
    assert "instance metadata service" in message


class CountingExecutor(ThreadPoolExecutor):
    """The loop's default executor, counting what is handed to a thread."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.submitted = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.submitted += 1
        return super().submit(fn, *args, **kwargs)


def _assume_role_profile(
    moto: Moto, aws_files: Path, seconds: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    (aws_files / "credentials").write_text(
        f"[base]\naws_access_key_id = {moto.access_key_id}\n"
        f"aws_secret_access_key = {moto.secret_access_key}\n"
    )
    (aws_files / "config").write_text(
        f"[profile worker]\nrole_arn = {moto.role_arn}\nsource_profile = base\n"
        f"duration_seconds = {seconds}\nregion = {REGION}\n"
    )
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", moto.url)  # STS AssumeRole goes to moto too


async def test_fresh_refreshable_credentials_sign_without_a_thread(
    moto: Moto, aws_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _assume_role_profile(moto, aws_files, 3600, monkeypatch)
    signer = AwsUpstreamSigner(
        AwsRouteSettings(region=REGION, credentials=AwsProfileCredentials(profile="worker"))
    )
    await signer.start()
    assert signer.source == "assume-role"
    executor = CountingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    try:
        keys = set()
        for _ in range(3):
            headers = await signer.sign(
                method="GET", url=f"{moto.url}/", headers=[], body=b"", service="iam", payload=""
            )
            keys.add(_auth(headers)["Credential"].split("/")[0])
            assert "X-Amz-Security-Token" in dict(headers)
        assert executor.submitted == 0
        assert len(keys) == 1
        answer = await forward(moto, signer, capture(boto_client("iam"), "list_roles"))
        assert answer.status_code == 200, answer.text
    finally:
        executor.shutdown()


async def test_credentials_due_for_refresh_are_refreshed_on_a_thread(
    moto: Moto, aws_files: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 15 minutes, the shortest AssumeRole allows, is inside botocore's advisory refresh window:
    # every signature asks for fresh credentials.
    _assume_role_profile(moto, aws_files, 900, monkeypatch)
    signer = AwsUpstreamSigner(
        AwsRouteSettings(region=REGION, credentials=AwsProfileCredentials(profile="worker"))
    )
    await signer.start()
    executor = CountingExecutor()
    asyncio.get_running_loop().set_default_executor(executor)
    try:
        first = await forward(moto, signer, capture(boto_client("iam"), "list_roles"))
        assert first.status_code == 200, first.text
        second = await forward(moto, signer, capture(boto_client("dynamodb"), "list_tables"))
        assert second.status_code == 200, second.text
        assert executor.submitted >= 2
    finally:
        executor.shutdown()
