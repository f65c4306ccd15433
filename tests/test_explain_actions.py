"""`countersign explain` with actions, headers and bodies: the same recognizers and policy
engine as the proxy, without serving."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from proxy.config import load_settings_text
from proxy.explain import EXIT_ALLOW, EXIT_APPROVE, EXIT_DENY, explain_request

CONFIG = """
identity:
  aws_keys: [{access_key_id: AKIACSTEST0000000001, secret: "0123456789abcdef0123", subject: agent-7}]
routes:
  - {name: aws, prefix: /, upstream: "https://iam.amazonaws.com/", protocol: aws,
     caller_credentials: [aws_sigv4], aws: {region: us-east-1}}
  - {name: gql, prefix: /graphql, upstream: "https://api.example.com/graphql", protocol: graphql}
  - {name: data, prefix: /data/, upstream: "https://data.example.com/"}
policy:
  rules:
    - {name: iam-reads, actions: ["iam:List*", "iam:Get*"], action: allow}
    - {name: iam-writes, actions: ["iam:Create*"], action: approve, approvers: {groups: [sec]}}
    - {name: gql-reads, route: gql, actions: ["query:*"], action: allow}
    - {name: prod-exports, route: data, when: {json: {"/format": csv}, headers: {X-Env: prod}},
       action: approve, approvers: {groups: [sec]}}
    - {name: data, route: data, action: allow}
"""
FORM = [("Content-Type", "application/x-www-form-urlencoded")]
SETTINGS = load_settings_text(CONFIG, "explain.yaml", env={})


def test_aws_actions_are_recognized_from_the_body() -> None:
    create = explain_request(
        SETTINGS,
        "POST",
        "/",
        subject="agent-7",
        headers=FORM,
        body=b"Action=CreateRole&Version=2010-05-08&RoleName=x",
        aws_service="iam",
    )
    assert create.actions == ("iam:CreateRole",)
    assert create.exit_code == EXIT_APPROVE
    assert "action iam:CreateRole matches iam:Create*" in create.text()
    listing = explain_request(
        SETTINGS,
        "POST",
        "/",
        subject="agent-7",
        headers=FORM,
        body=b"Action=ListRoles",
        aws_service="iam",
    )
    assert listing.exit_code == EXIT_ALLOW


def test_an_aws_route_needs_the_service_or_the_actions() -> None:
    unknown = explain_request(SETTINGS, "POST", "/", subject="a", headers=FORM, body=b"Action=X")
    assert unknown.exit_code == EXIT_DENY
    assert unknown.refusal is not None and unknown.refusal[0] == 400
    assert "--aws-service" in unknown.text()
    named = explain_request(SETTINGS, "POST", "/", subject="a", actions=["iam:GetRole"])
    assert named.exit_code == EXIT_ALLOW
    assert named.as_json()["actions"] == ["iam:GetRole"]


def test_graphql_mutation_fields_are_judged_not_the_operation_name() -> None:
    body = json.dumps(
        {"query": "query Safe { a: __typename } mutation { dropAll }", "operationName": "Safe"}
    ).encode()
    explained = explain_request(
        SETTINGS,
        "POST",
        "/graphql",
        subject="a",
        headers=[("Content-Type", "application/json")],
        body=body,
    )
    assert explained.actions == ("query:__typename", "mutation:dropAll")
    assert explained.exit_code == EXIT_DENY


def test_header_and_json_conditions() -> None:
    def run(env: str, fmt: str) -> int:
        return explain_request(
            SETTINGS,
            "POST",
            "/data/exports",
            subject="a",
            headers=[("X-Env", env), ("Content-Type", "application/json")],
            body=json.dumps({"format": fmt}).encode(),
        ).exit_code

    assert run("prod", "csv") == EXIT_APPROVE
    assert run("dev", "csv") == EXIT_ALLOW
    assert run("prod", "pdf") == EXIT_ALLOW


def test_the_cli_takes_headers_and_a_body_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG)
    body = tmp_path / "body.json"
    body.write_text('{"format": "csv"}')
    countersign = str(Path(sys.executable).parent / "countersign")
    result = subprocess.run(
        [
            countersign,
            "explain",
            "-c",
            str(config),
            "POST",
            "/data/exports",
            "-H",
            "X-Env: prod",
            "-H",
            "Content-Type: application/json",
            "-d",
            f"@{body}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == EXIT_APPROVE, result.stderr
    assert "prod-exports" in result.stdout
