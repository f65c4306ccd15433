"""An AWS agent behind Countersign: unchanged boto3 against the real `countersign run`, with
`moto_server` (signature checking on) as AWS.

The agent holds a Countersign-issued access key, never a real one; Countersign verifies its
signature, names the action as IAM does, lets reads through, holds IAM writes, DynamoDB and S3
deletes for a human, and re-signs what it forwards with the route's real credentials — which
moto checks, so every answer here proves the re-signing is right.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import botocore.exceptions
import pytest
from botocore.config import Config

from tests.e2e.conftest import Process, free_port
from tests.e2e.test_approvals_e2e import decide_pending
from tests.idp_fixture import TestIdP
from tests.moto_fixture import REGION, Moto, moto_server

StartFn = Callable[[str, int], Process]
WAIT = 20  # seconds: the bound on every wait in this file
AGENT_KEY_ID = "AKIACSAGENT700000001"
AGENT_SECRET = "agent-7-secret-0123456789abcdefghijklmno"
TABLE = "orders"
BUCKET = "reports-bucket"
ODD_KEYS = ["logs//2024/x.txt", "a+b=c d.txt", "ünïcode/ß.txt", "trailing/"]


def config(port: int, moto: Moto, issuer: str) -> str:
    return f"""
server:
  listen: "127.0.0.1:{port}"
identity:
  issuers: [{{issuer: "{issuer}", audiences: [countersign]}}]
  aws_keys:
    - {{access_key_id: {AGENT_KEY_ID}, secret: "{AGENT_SECRET}", subject: agent-7,
       groups: [agents], owner: "alice@example.com"}}
routes:
  - name: aws
    prefix: /
    upstream: "{moto.url}"
    protocol: aws
    caller_credentials: [aws_sigv4]
    aws:
      region: {REGION}
      credentials: {{access_key_id: "{moto.access_key_id}",
                     secret_access_key: "{moto.secret_access_key}"}}
    merge_slashes: false
approvals:
  timeout_seconds: 60
policy:
  rules:
    - name: reads
      actions: ["iam:List*", "iam:Get*", "dynamodb:Describe*", "dynamodb:List*",
                "s3:Get*", "s3:List*", "s3:Head*", "sts:GetCallerIdentity"]
      action: allow
    - name: iam-writes
      route: aws
      actions: ["iam:Create*", "iam:Attach*Policy", "iam:Put*", "iam:Delete*"]
      action: approve
      approvers: {{groups: [data-owners]}}
    - name: deletes
      actions: ["dynamodb:DeleteTable", "s3:DeleteObject", "s3:DeleteBucket"]
      action: approve
      approvers: {{groups: [data-owners]}}
    - name: setup
      actions: ["dynamodb:CreateTable", "dynamodb:PutItem", "s3:CreateBucket", "s3:PutObject"]
      action: allow
"""


@pytest.fixture(scope="module")
def moto() -> Iterator[Moto]:
    with moto_server() as server:
        yield server


@pytest.fixture
async def proxy(run_countersign: StartFn, moto: Moto, idp: TestIdP) -> Process:
    port = free_port()
    return run_countersign(config(port, moto, idp.issuer), port)


def agent_client(proxy: Process, service: str, secret: str = AGENT_SECRET) -> Any:
    """What the agent runs: boto3 with its endpoint set to the proxy and its Countersign key."""
    return boto3.client(
        service,
        endpoint_url=proxy.url,
        region_name=REGION,
        aws_access_key_id=AGENT_KEY_ID,
        aws_secret_access_key=secret,
        config=Config(retries={"max_attempts": 1}, read_timeout=WAIT + 10),
    )


async def test_iam_reads_pass_and_writes_wait_for_a_human(
    proxy: Process, moto: Moto, idp: TestIdP
) -> None:
    iam = agent_client(proxy, "iam")
    roles = await asyncio.to_thread(iam.list_roles)
    assert roles["ResponseMetadata"]["HTTPStatusCode"] == 200
    before = {r["RoleName"] for r in moto.client("iam").list_roles()["Roles"]}

    create = asyncio.create_task(
        asyncio.to_thread(
            iam.create_role, RoleName="exporter", AssumeRolePolicyDocument='{"Statement": []}'
        )
    )
    shown = await decide_pending(proxy.url, idp, "approve", "ok for the export")
    assert shown["actions"] == ["iam:CreateRole"]
    assert shown["rule"] == "iam-writes"
    assert shown["requester"]["subject"] == "agent-7"
    created = await asyncio.wait_for(create, WAIT)
    assert created["Role"]["RoleName"] == "exporter"
    after = {r["RoleName"] for r in moto.client("iam").list_roles()["Roles"]}
    assert after - before == {"exporter"}, "the approved CreateRole ran exactly once"


async def test_dynamodb_delete_denied_keeps_the_table(
    proxy: Process, moto: Moto, idp: TestIdP
) -> None:
    ddb = agent_client(proxy, "dynamodb")
    await asyncio.to_thread(
        ddb.create_table,
        TableName=TABLE,
        KeySchema=[{"AttributeName": "id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    described = await asyncio.to_thread(ddb.describe_table, TableName=TABLE)
    assert described["Table"]["TableName"] == TABLE

    delete = asyncio.create_task(asyncio.to_thread(ddb.delete_table, TableName=TABLE))
    shown = await decide_pending(proxy.url, idp, "deny", "not this quarter")
    assert shown["actions"] == ["dynamodb:DeleteTable"]
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        await asyncio.wait_for(delete, WAIT)
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    # boto3 reads Countersign's refusal as AWS would send it: code and the human's sentence.
    assert caught.value.response["Error"]["Code"] == "AccessDeniedException"
    assert str(caught.value).startswith(
        "An error occurred (AccessDeniedException) when calling the DeleteTable operation: "
        "Denied by bob@example.com: not this quarter."
    )
    assert TABLE in moto.client("dynamodb").list_tables()["TableNames"], "the table survives"


async def test_s3_keys_arrive_byte_exact_and_deletes_wait(
    proxy: Process, moto: Moto, idp: TestIdP
) -> None:
    s3 = agent_client(proxy, "s3")
    await asyncio.to_thread(s3.create_bucket, Bucket=BUCKET)
    for number, key in enumerate(ODD_KEYS):
        await asyncio.to_thread(
            s3.put_object, Bucket=BUCKET, Key=key, Body=f"body {number}".encode()
        )
    listed = await asyncio.to_thread(s3.list_objects_v2, Bucket=BUCKET)
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(ODD_KEYS)
    # What moto stored, seen without the proxy: the very keys the agent wrote.
    direct = moto.client("s3").list_objects_v2(Bucket=BUCKET)
    assert sorted(o["Key"] for o in direct["Contents"]) == sorted(ODD_KEYS)
    for number, key in enumerate(ODD_KEYS):
        got = await asyncio.to_thread(s3.get_object, Bucket=BUCKET, Key=key)
        assert got["Body"].read() == f"body {number}".encode()

    delete = asyncio.create_task(
        asyncio.to_thread(s3.delete_object, Bucket=BUCKET, Key="logs//2024/x.txt")
    )
    shown = await decide_pending(proxy.url, idp, "approve", "cleanup")
    assert shown["actions"] == ["s3:DeleteObject"]
    assert shown["target"] == "/reports-bucket/logs//2024/x.txt"
    await asyncio.wait_for(delete, WAIT)
    remaining = {o["Key"] for o in moto.client("s3").list_objects_v2(Bucket=BUCKET)["Contents"]}
    assert remaining == set(ODD_KEYS) - {"logs//2024/x.txt"}


async def test_a_wrong_agent_secret_is_refused_and_nothing_reaches_aws(
    proxy: Process, moto: Moto
) -> None:
    s3 = agent_client(proxy, "s3", secret="wrong-secret-0123456789abcdefghijklmnopq")
    with pytest.raises(botocore.exceptions.ClientError) as caught:
        await asyncio.to_thread(s3.create_bucket, Bucket="never-made")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert caught.value.response["Error"]["Code"] == "SignatureDoesNotMatch"
    assert "the signature does not match" in caught.value.response["Error"]["Message"]
    buckets = {b["Name"] for b in moto.client("s3").list_buckets().get("Buckets", [])}
    assert "never-made" not in buckets
