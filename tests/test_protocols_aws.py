"""The AWS recognizer against requests botocore itself builds and signs.

Each request is made by a real boto3 client pointed at an unreachable endpoint; a `before-send`
hook captures the prepared request (method, URL, headers, body) and answers it with an
`AWSResponse`, so nothing leaves the process. The request is then turned into the `Message` the
proxy would build, with the service taken from the captured Authorization header's credential
scope, exactly as the SigV4 authenticator reads it.
"""

from __future__ import annotations

import asyncio
import timeit
from collections.abc import Iterator
from typing import Any
from urllib.parse import unquote, urlsplit

import boto3  # type: ignore[import-untyped]
import pytest
from botocore import xform_name  # type: ignore[import-untyped]
from botocore.awsrequest import (  # type: ignore[import-untyped]
    AWSPreparedRequest,
    AWSResponse,
)
from botocore.config import Config  # type: ignore[import-untyped]
from multidict import CIMultiDict

from proxy.model.request import AmbiguousField, RequestBody
from proxy.protocols import Message, Unrecognized, recognizer_for
from proxy.protocols import aws as aws_module

AWS = recognizer_for("aws")


class _Raw:
    """The raw stream an AWSResponse reads its content from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._data


def _client(service: str) -> Any:
    return boto3.session.Session().client(
        service,
        endpoint_url="http://127.0.0.1:1",
        region_name="us-east-1",
        aws_access_key_id="AKIACOUNTERSIGNTEST",
        aws_secret_access_key="not-a-real-secret",
        config=Config(
            s3={"addressing_style": "path"},
            signature_version="s3v4" if service == "s3" else None,
            retries={"max_attempts": 1},
        ),
    )


_CLIENTS: dict[str, Any] = {}


def capture(service: str, method: str, **params: Any) -> Message:
    """Call `method` on a boto3 client of `service`; return the Message the proxy would build."""
    client = _CLIENTS.get(service)
    if client is None:
        client = _CLIENTS[service] = _client(service)
    model = client.meta.service_model
    operation = next(name for name in model.operation_names if xform_name(name) == method)
    protocol = model.metadata["protocol"]
    seen: list[AWSPreparedRequest] = []

    def answer(request: AWSPreparedRequest, **_: Any) -> AWSResponse:
        seen.append(request)
        # The smallest answer each protocol's parser accepts, so the call completes.
        if protocol == "query":
            body = f"<{operation}Response><{operation}Result/></{operation}Response>".encode()
        elif protocol == "ec2":
            body = f"<{operation}Response/>".encode()
        elif protocol in ("json", "rest-json"):
            body = b"{}"
        else:
            body = b""
        return AWSResponse(request.url, 200, {}, _Raw(body))

    handler_id = f"capture-{method}"
    client.meta.events.register("before-send.*", answer, unique_id=handler_id)
    try:
        getattr(client, method)(**params)
    finally:
        client.meta.events.unregister("before-send.*", unique_id=handler_id)
    (request,) = seen
    return to_message(request)


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def to_message(request: AWSPreparedRequest) -> Message:
    url = urlsplit(request.url)
    headers: CIMultiDict[str] = CIMultiDict(
        (name, _text(value)) for name, value in request.headers.items()
    )
    body = request.body
    if hasattr(body, "read"):
        body = body.read()
    data = body.encode() if isinstance(body, str) else (body or b"")
    # "AWS4-HMAC-SHA256 Credential=AKID/20240101/us-east-1/iam/aws4_request, ..."
    credential = headers["Authorization"].split("Credential=", 1)[1].split(",", 1)[0]
    service = credential.split("/")[3]
    has_body = request.method in {"POST", "PUT", "PATCH", "DELETE"}
    return Message(
        method=request.method,
        path=unquote(url.path),
        raw_path=url.path,
        query=url.query,
        headers=headers,
        body=RequestBody(data, headers.get("Content-Type")) if has_body else None,
        service=service,
    )


def message(
    method: str,
    raw_path: str,
    query: str = "",
    *,
    service: str | None = "s3",
    headers: dict[str, str] | list[tuple[str, str]] | None = None,
    body: bytes | None = None,
    content_type: str | None = None,
) -> Message:
    return Message(
        method=method,
        path=unquote(raw_path),
        raw_path=raw_path,
        query=query,
        headers=CIMultiDict(headers or {}),
        body=RequestBody(body, content_type) if body is not None else None,
        service=service,
    )


# --- Query protocol -----------------------------------------------------------------------------


async def test_iam_reads_and_writes_are_told_apart() -> None:
    assert await AWS.recognize(capture("iam", "list_roles")) == ("iam:ListRoles",)
    created = capture("iam", "create_role", RoleName="r", AssumeRolePolicyDocument="{}")
    assert created.service == "iam"
    assert await AWS.recognize(created) == ("iam:CreateRole",)
    attached = capture(
        "iam", "attach_role_policy", RoleName="r", PolicyArn="arn:aws:iam::aws:policy/Admin"
    )
    assert await AWS.recognize(attached) == ("iam:AttachRolePolicy",)


async def test_sts_get_caller_identity() -> None:
    assert await AWS.recognize(capture("sts", "get_caller_identity")) == ("sts:GetCallerIdentity",)


async def test_query_action_from_the_query_string() -> None:
    assert await AWS.recognize(
        message("GET", "/", "Action=ListUsers&Version=2010-05-08", service="iam")
    ) == ("iam:ListUsers",)


async def test_ec2_protocol() -> None:
    msg = capture("ec2", "terminate_instances", InstanceIds=["i-1"])
    assert await AWS.recognize(msg) == ("ec2:TerminateInstances",)


async def test_repeated_action_is_ambiguous() -> None:
    form = "application/x-www-form-urlencoded; charset=utf-8"
    body = b"Action=ListRoles&Action=DeleteRole&Version=2010-05-08"
    with pytest.raises(AmbiguousField, match="form field 'Action'"):
        await AWS.recognize(message("POST", "/", service="iam", body=body, content_type=form))
    with pytest.raises(AmbiguousField, match="query parameter 'Action'"):
        await AWS.recognize(
            message("GET", "/", "Action=ListRoles&Action=DeleteRole", service="iam")
        )


async def test_action_in_query_and_body_is_ambiguous() -> None:
    form = "application/x-www-form-urlencoded"
    with pytest.raises(AmbiguousField, match="query parameter and form field 'Action'"):
        await AWS.recognize(
            message(
                "POST",
                "/",
                "Action=ListRoles",
                service="iam",
                body=b"Action=DeleteRole",
                content_type=form,
            )
        )


async def test_form_body_is_read_whatever_its_content_type() -> None:
    # A lenient upstream parses it anyway; the Action it would run must be the one named.
    msg = message("POST", "/", service="iam", body=b"Action=DeleteRole&RoleName=r")
    assert await AWS.recognize(msg) == ("iam:DeleteRole",)


async def test_unknown_action_and_no_action_are_unrecognized() -> None:
    with pytest.raises(Unrecognized, match="IAM has no operation 'DropEverything'"):
        await AWS.recognize(message("GET", "/", "Action=DropEverything", service="iam"))
    with pytest.raises(Unrecognized, match="it has no Action parameter"):
        await AWS.recognize(message("POST", "/", service="iam", body=b""))


# --- JSON protocol ------------------------------------------------------------------------------


async def test_dynamodb_describe_vs_delete_table() -> None:
    described = capture("dynamodb", "describe_table", TableName="t")
    assert described.service == "dynamodb"
    assert await AWS.recognize(described) == ("dynamodb:DescribeTable",)
    assert await AWS.recognize(capture("dynamodb", "delete_table", TableName="t")) == (
        "dynamodb:DeleteTable",
    )


async def test_dynamodb_streams_shares_the_signing_name() -> None:
    msg = capture("dynamodbstreams", "get_records", ShardIterator="x" * 20)
    assert msg.service == "dynamodb"
    assert await AWS.recognize(msg) == ("dynamodb:GetRecords",)


async def test_sqs_json_and_its_query_compatibility() -> None:
    url = "http://127.0.0.1:1/1/q"
    assert await AWS.recognize(capture("sqs", "delete_queue", QueueUrl=url)) == ("sqs:DeleteQueue",)
    legacy = message("POST", "/1/q", service="sqs", body=b"Action=DeleteQueue&Version=2012-11-05")
    assert await AWS.recognize(legacy) == ("sqs:DeleteQueue",)
    both = message(
        "POST",
        "/",
        "Action=ListQueues",
        service="sqs",
        headers={"X-Amz-Target": "AmazonSQS.DeleteQueue"},
        body=b"{}",
        content_type="application/x-amz-json-1.0",
    )
    with pytest.raises(
        Unrecognized, match=r"X-Amz-Target 'AmazonSQS\.DeleteQueue' names DeleteQueue"
    ):
        await AWS.recognize(both)


async def test_cloudwatch_signs_as_monitoring_and_is_named_cloudwatch() -> None:
    msg = capture("cloudwatch", "delete_alarms", AlarmNames=["a"])
    assert msg.service == "monitoring"
    assert await AWS.recognize(msg) == ("cloudwatch:DeleteAlarms",)


async def test_rpc_v2_cbor_path() -> None:
    # CloudWatch also speaks Smithy RPC v2 CBOR: the operation is in the path.
    path = "/service/GraniteServiceVersion20100801/operation/DeleteAlarms"
    cbor = {"smithy-protocol": "rpc-v2-cbor"}
    msg = message(
        "POST",
        path,
        service="monitoring",
        headers=cbor,
        body=b"\xa0",
        content_type="application/cbor",
    )
    assert await AWS.recognize(msg) == ("cloudwatch:DeleteAlarms",)
    unknown = message("POST", path.replace("DeleteAlarms", "Nope"), service="monitoring")
    with pytest.raises(Unrecognized, match="names no CloudWatch operation"):
        await AWS.recognize(unknown)


async def test_unknown_target_is_unrecognized() -> None:
    for target in ("DynamoDB_20120810.DropAllTables", "Other_1.DeleteTable", "DeleteTable"):
        msg = message("POST", "/", service="dynamodb", headers={"X-Amz-Target": target}, body=b"{}")
        with pytest.raises(Unrecognized, match="names no DynamoDB operation"):
            await AWS.recognize(msg)


async def test_repeated_target_is_ambiguous() -> None:
    headers = [
        ("X-Amz-Target", "DynamoDB_20120810.DescribeTable"),
        ("x-amz-target", "DynamoDB_20120810.DeleteTable"),
    ]
    msg = message("POST", "/", service="dynamodb", headers=headers, body=b"{}")
    with pytest.raises(AmbiguousField, match="header 'X-Amz-Target'"):
        await AWS.recognize(msg)


async def test_json_service_without_target_is_unrecognized() -> None:
    msg = message("POST", "/", service="dynamodb", body=b"{}")
    with pytest.raises(Unrecognized, match="no X-Amz-Target header"):
        await AWS.recognize(msg)


# --- REST protocols -----------------------------------------------------------------------------

ODD_KEY = "logs//a b+c=d/ü.txt"


async def test_s3_put_object_with_an_awkward_key() -> None:
    msg = capture("s3", "put_object", Bucket="my-bucket", Key=ODD_KEY, Body=b"hello")
    assert msg.service == "s3"
    assert msg.path == "/my-bucket/" + ODD_KEY
    assert "%2B" in msg.raw_path and "%C3%BC" in msg.raw_path
    assert await AWS.recognize(msg) == ("s3:PutObject",)


@pytest.mark.parametrize(
    ("method", "params", "actions"),
    [
        ("get_object", {"Key": ODD_KEY}, ("s3:GetObject",)),
        ("get_object", {"Key": "k", "VersionId": "v1"}, ("s3:GetObject", "s3:GetObjectVersion")),
        ("delete_object", {"Key": ODD_KEY}, ("s3:DeleteObject",)),
        (
            "delete_object",
            {"Key": "k", "VersionId": "v1"},
            ("s3:DeleteObject", "s3:DeleteObjectVersion"),
        ),
        ("head_object", {"Key": ODD_KEY}, ("s3:HeadObject", "s3:GetObject")),
        ("list_objects_v2", {}, ("s3:ListObjectsV2", "s3:ListBucket")),
        (
            "list_objects_v2",
            {"Prefix": "a/", "Delimiter": "/"},
            ("s3:ListObjectsV2", "s3:ListBucket"),
        ),
        ("list_objects", {}, ("s3:ListObjects", "s3:ListBucket")),
        ("head_bucket", {}, ("s3:HeadBucket", "s3:ListBucket")),
        (
            "delete_objects",
            {"Delete": {"Objects": [{"Key": "a"}, {"Key": ODD_KEY}]}},
            ("s3:DeleteObjects", "s3:DeleteObject"),
        ),
        (
            "delete_objects",
            {"Delete": {"Objects": [{"Key": "a", "VersionId": "v1"}]}},
            ("s3:DeleteObjects", "s3:DeleteObject", "s3:DeleteObjectVersion"),
        ),
        ("create_multipart_upload", {"Key": ODD_KEY}, ("s3:CreateMultipartUpload", "s3:PutObject")),
        (
            "upload_part",
            {"Key": "k", "UploadId": "u", "PartNumber": 1, "Body": b"x"},
            ("s3:UploadPart", "s3:PutObject"),
        ),
        (
            "complete_multipart_upload",
            {
                "Key": "k",
                "UploadId": "u",
                "MultipartUpload": {"Parts": [{"PartNumber": 1, "ETag": "e"}]},
            },
            ("s3:CompleteMultipartUpload", "s3:PutObject"),
        ),
        ("abort_multipart_upload", {"Key": "k", "UploadId": "u"}, ("s3:AbortMultipartUpload",)),
        (
            "list_parts",
            {"Key": "k", "UploadId": "u"},
            ("s3:ListParts", "s3:ListMultipartUploadParts"),
        ),
        (
            "copy_object",
            {"Key": "k", "CopySource": "src-bucket/src key"},
            ("s3:CopyObject", "s3:PutObject", "s3:GetObject"),
        ),
        ("get_object_acl", {"Key": "k"}, ("s3:GetObjectAcl",)),
        ("put_object_tagging", {"Key": "k", "Tagging": {"TagSet": []}}, ("s3:PutObjectTagging",)),
        ("get_bucket_policy", {}, ("s3:GetBucketPolicy",)),
        ("delete_bucket", {}, ("s3:DeleteBucket",)),
        (
            "put_public_access_block",
            {"PublicAccessBlockConfiguration": {"BlockPublicAcls": False}},
            ("s3:PutPublicAccessBlock", "s3:PutBucketPublicAccessBlock"),
        ),
    ],
)
async def test_s3_operations(method: str, params: dict[str, Any], actions: tuple[str, ...]) -> None:
    msg = capture("s3", method, Bucket="my-bucket", **params)
    assert await AWS.recognize(msg) == actions


async def test_s3_list_buckets() -> None:
    msg = capture("s3", "list_buckets")
    assert (msg.method, msg.raw_path) == ("GET", "/")
    assert await AWS.recognize(msg) == ("s3:ListBuckets", "s3:ListAllMyBuckets")


async def test_s3_key_with_an_encoded_slash_and_a_trailing_slash_bucket() -> None:
    assert await AWS.recognize(message("GET", "/b/a%2Fb")) == ("s3:GetObject",)
    assert await AWS.recognize(message("GET", "/b/")) == ("s3:ListObjects", "s3:ListBucket")
    assert await AWS.recognize(message("DELETE", "/b//")) == ("s3:DeleteObject",)


async def test_s3_client_labels_do_not_name_the_operation() -> None:
    # x-id is a label the SDK adds; S3 runs GetObject whatever it says.
    assert await AWS.recognize(message("GET", "/b/k", "x-id=DeleteObject")) == ("s3:GetObject",)


async def test_s3_unknown_subresource_is_unrecognized() -> None:
    with pytest.raises(Unrecognized) as caught:
        await AWS.recognize(message("GET", "/b/x", "foo"))
    assert caught.value.message == "cannot tell which S3 operation GET /b/x?foo is"


async def test_s3_repeated_subresource_value_is_ambiguous() -> None:
    with pytest.raises(AmbiguousField, match="'list-type'"):
        await AWS.recognize(message("GET", "/b", "list-type=2&list-type=1"))


async def test_lambda_invoke() -> None:
    msg = capture("lambda", "invoke", FunctionName="my-fn", Payload=b"{}")
    assert msg.service == "lambda"
    assert await AWS.recognize(msg) == ("lambda:Invoke",)
    deleted = capture("lambda", "delete_function", FunctionName="my-fn")
    assert await AWS.recognize(deleted) == ("lambda:DeleteFunction",)


async def test_lambda_function_arn_is_one_segment() -> None:
    arn = "arn:aws:lambda:us-east-1:123456789012:function:my-fn"
    msg = capture("lambda", "get_function", FunctionName=arn)
    assert await AWS.recognize(msg) == ("lambda:GetFunction",)


# --- Service -----------------------------------------------------------------------------------


async def test_no_service_is_unrecognized() -> None:
    with pytest.raises(Unrecognized, match="an AWS route needs a SigV4-signed request"):
        await AWS.recognize(message("GET", "/", "Action=ListRoles", service=None))


async def test_unknown_signing_name_is_unrecognized() -> None:
    with pytest.raises(Unrecognized, match="no AWS service model signs as 'nosuchservice'"):
        await AWS.recognize(message("GET", "/", "Action=ListRoles", service="nosuchservice"))


async def test_needs_body() -> None:
    assert [AWS.needs_body(m) for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")] == [
        False,
        False,
        True,
        True,
        True,
        True,
    ]


async def test_concurrent_first_requests_load_once(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    real_build = aws_module._build_service

    def counting_build(signing_name: str, names: Any) -> Any:
        built.append(signing_name)
        return real_build(signing_name, names)

    monkeypatch.setattr(aws_module, "_build_service", counting_build)
    monkeypatch.delitem(aws_module._SERVICES, "sts", raising=False)
    msg = message("GET", "/", "Action=GetCallerIdentity", service="sts")
    results = await asyncio.gather(*(AWS.recognize(msg) for _ in range(8)))
    assert set(results) == {("sts:GetCallerIdentity",)}
    assert built == ["sts"]


async def test_presigned_s3_url() -> None:
    client = _CLIENTS.get("s3") or _client("s3")
    url = urlsplit(
        client.generate_presigned_url(
            "delete_object", Params={"Bucket": "b", "Key": ODD_KEY, "VersionId": "v1"}
        )
    )
    credential = unquote(url.query.split("X-Amz-Credential=", 1)[1].split("&", 1)[0])
    msg = message("DELETE", url.path, url.query, service=credential.split("/")[3])
    assert await AWS.recognize(msg) == ("s3:DeleteObject", "s3:DeleteObjectVersion")


def test_recognize_cost_after_load() -> None:
    """Not a benchmark gate: a regression guard (well under a millisecond each)."""
    messages = [
        capture("iam", "create_role", RoleName="r", AssumeRolePolicyDocument="{}"),
        capture("dynamodb", "delete_table", TableName="t"),
        capture("s3", "put_object", Bucket="my-bucket", Key=ODD_KEY, Body=b"x"),
    ]

    async def run(msg: Message, times: int) -> None:
        for _ in range(times):
            await AWS.recognize(msg)

    for msg in messages:
        asyncio.run(run(msg, 1))  # load the model
        seconds = timeit.timeit(lambda: asyncio.run(run(msg, 1000)), number=1) / 1000  # noqa: B023
        assert seconds < 0.001, (msg.service, seconds)
