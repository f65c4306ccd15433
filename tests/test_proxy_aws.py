"""An AWS route in process, against the echo upstream (which shows what was forwarded): the
agent's signature is replaced by the route's, a route pinned to one service refuses another,
and refusals come in AWS's error shapes. Requests are signed by botocore itself."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from xml.etree import ElementTree

import pytest
from aiohttp.test_utils import TestClient, TestServer
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from proxy.app import build_app
from proxy.audit import AuditLog
from proxy.config import load_settings_text
from tests.helpers import ListSink

AGENT_KEY_ID = "AKIACSAGENT700000001"
AGENT_SECRET = "agent-7-secret-0123456789abcdefghijklmno"
ROUTE_KEY_ID = "AKIAROUTEKEY00000001"

CONFIG = """
server: {{listen: "127.0.0.1:0"}}
identity:
  aws_keys:
    - {{access_key_id: {agent_key}, secret: "{agent_secret}", subject: agent-7, groups: [agents]}}
routes:
  - name: iam
    prefix: /iam/
    upstream: "{echo}/api/"
    protocol: aws
    caller_credentials: [aws_sigv4]
    aws: {{region: us-east-1, service: iam,
          credentials: {{access_key_id: {route_key}, secret_access_key: "route-secret-000000000000"}}}}
  - name: ddb
    prefix: /ddb/
    upstream: "{echo}/api/"
    protocol: aws
    caller_credentials: [aws_sigv4]
    aws: {{region: eu-west-1,
          credentials: {{access_key_id: {route_key}, secret_access_key: "route-secret-000000000000"}}}}
policy:
  rules:
    - {{name: reads, actions: ["iam:List*", "dynamodb:Describe*"], action: allow}}
    - {{name: no-deletes, actions: ["dynamodb:Delete*"], action: deny}}
"""


@pytest.fixture
async def client(upstream: TestServer) -> AsyncIterator[TestClient[Any, Any]]:
    text = CONFIG.format(
        agent_key=AGENT_KEY_ID,
        agent_secret=AGENT_SECRET,
        route_key=ROUTE_KEY_ID,
        echo=str(upstream.make_url("/")).rstrip("/"),
    )
    settings = load_settings_text(text, "aws.yaml", env={})
    app = build_app(settings, audit_log=AuditLog([ListSink()]))
    test_client: TestClient[Any, Any] = TestClient(TestServer(app))
    await test_client.start_server()
    yield test_client
    await test_client.close()


def signed(
    client: TestClient[Any, Any],
    path: str,
    body: bytes,
    service: str,
    headers: dict[str, str],
) -> dict[str, str]:
    """The headers botocore's SigV4 puts on this request for the agent's key."""
    url = f"http://{client.host}:{client.port}{path}"
    request = AWSRequest(method="POST", url=url, data=body, headers=headers)
    SigV4Auth(Credentials(AGENT_KEY_ID, AGENT_SECRET), service, "us-east-1").add_auth(request)
    return dict(request.headers.items())


FORM = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}


async def test_the_agents_signature_is_replaced_by_the_routes(
    client: TestClient[Any, Any],
) -> None:
    body = b"Action=ListRoles&Version=2010-05-08"
    resp = await client.post("/iam/", data=body, headers=signed(client, "/iam/", body, "iam", FORM))
    assert resp.status == 200, await resp.text()
    echo = await resp.json()
    authorization = echo["headers"]["authorization"]
    assert authorization.startswith(f"AWS4-HMAC-SHA256 Credential={ROUTE_KEY_ID}/")
    assert "/us-east-1/iam/aws4_request" in authorization
    assert AGENT_KEY_ID not in str(echo["headers"])
    assert echo["body"] == body.decode()


async def test_a_route_pinned_to_one_service_refuses_a_request_signed_for_another(
    client: TestClient[Any, Any],
) -> None:
    body = b""
    resp = await client.post(
        "/iam/bucket?tagging",
        data=body,
        headers=signed(client, "/iam/bucket?tagging", body, "s3", {}),
    )
    assert resp.status == 403
    error = ElementTree.fromstring(await resp.read()).find("Error")
    assert error is not None
    assert error.findtext("Code") == "SignatureDoesNotMatch"
    assert "signed for s3" in (error.findtext("Message") or "")


async def test_json_services_get_json_errors(client: TestClient[Any, Any]) -> None:
    body = b'{"TableName": "orders"}'
    headers = {
        "Content-Type": "application/x-amz-json-1.0",
        "X-Amz-Target": "DynamoDB_20120810.DeleteTable",
    }
    resp = await client.post(
        "/ddb/", data=body, headers=signed(client, "/ddb/", body, "dynamodb", headers)
    )
    assert resp.status == 403
    assert resp.headers["x-amzn-ErrorType"] == "AccessDeniedException"
    assert resp.headers["Countersign-Error"] == "policy_denied"
    payload = await resp.json(content_type=None)
    assert payload["__type"] == "AccessDeniedException"
    assert payload["message"].startswith("the policy denies this request (rule no-deletes)")


async def test_an_ambiguous_path_on_an_aws_route_is_refused_as_aws_would(
    client: TestClient[Any, Any],
) -> None:
    resp = await client.post("/iam/a;b", data=b"")
    assert resp.status == 400
    error = ElementTree.fromstring(await resp.read()).find("Error")
    assert error is not None and error.findtext("Code") == "InvalidRequest"
