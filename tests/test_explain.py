"""`countersign explain`: route, forwarded URL, decision, why each earlier rule did not match,
approvers / quorum / timeout for approve; exit codes 0 allow, 1 deny, 3 approve; `--json`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Settings, load_settings_text
from proxy.explain import Explained, explain, explain_request
from tests.e2e.conftest import COUNTERSIGN

CONFIG = """
routes:
  - name: cloud
    prefix: /cloud/
    upstream: "https://cloud.example.com/api/"
  - name: raw
    prefix: /raw/
    upstream: "https://raw.example.com"
    strip_prefix: false
approvals:
  timeout_seconds: 600
policy:
  default: {default}
  rules:
    - {{name: reads, methods: [GET, HEAD], action: allow}}
    - name: exports
      route: cloud
      methods: [POST]
      paths: ["/cloud/exports/**"]
      when: {{groups: [agents]}}
      action: approve
      approvers: {{groups: [data-owners], users: [alice@example.com]}}
      quorum: 2
      timeout_seconds: 300
    - name: iam
      route: cloud
      paths: ["/cloud/iam/**"]
      action: approve
      approvers: {{groups: [security]}}
    - {{name: gold, when: {{claims: {{tier: gold}}}}, methods: [PATCH], action: allow}}
    - {{name: no-deletes, methods: [DELETE], action: deny}}
"""


def settings(default: str = "deny") -> Settings:
    return load_settings_text(CONFIG.format(default=default), "e.yaml", env={})


def run(method: str, path: str, default: str = "deny", **kwargs: Any) -> Explained:
    kwargs.setdefault("subject", "agent-7")
    return explain_request(settings(default), method, path, **kwargs)


def test_allow_names_route_upstream_and_rule() -> None:
    e = run("GET", "/cloud/buckets?limit=2")
    assert e.exit_code == 0
    assert e.route is not None and e.route.name == "cloud"
    assert e.upstream_url == "https://cloud.example.com/api/buckets?limit=2"
    assert e.text().splitlines() == [
        "request:  GET /cloud/buckets?limit=2",
        "identity: subject=agent-7 groups=[]",
        "route:    cloud (prefix /cloud/)",
        "upstream: https://cloud.example.com/api/buckets?limit=2",
        "rules:",
        "  ✔ reads: matches: method GET in [GET, HEAD]",
        "decision: allow by rule reads — rule reads matched",
        "outcome:  forwarded to https://cloud.example.com/api/buckets?limit=2",
    ]


def test_upstream_url_keeps_the_prefix_without_strip_prefix_and_is_encoded() -> None:
    e = run("GET", "/raw/a%20b/c")
    assert e.upstream_url == "https://raw.example.com/raw/a%20b/c"
    assert "normalized path: /raw/a b/c" in e.text()


def test_approve_lists_approvers_quorum_timeout_and_earlier_rules() -> None:
    e = run("POST", "/cloud/exports/x", groups=frozenset({"agents"}))
    assert e.exit_code == 3
    assert e.reasons() == [("reads", "method POST not in [GET, HEAD]")]
    lines = e.text().splitlines()
    assert lines[-4:] == [
        "  ✔ exports: matches: method POST in [POST], route cloud, path /cloud/exports/x "
        "matches /cloud/exports/**, identity in group agents",
        "decision: approve by rule exports — rule exports matched",
        "approval: approvers groups [data-owners], users [alice@example.com]; quorum 2; "
        "timeout 300s",
        "outcome:  held for approval by a human, then forwarded to "
        "https://cloud.example.com/api/exports/x",
    ]
    # the rule's own timeout, else approvals.timeout_seconds
    e = run("PUT", "/cloud/iam/roles")
    assert e.exit_code == 3 and e.timeout_seconds == 600
    assert "approval: approvers groups [security], users []; quorum 1; timeout 600s" in e.text()


def test_deny_by_rule_and_by_default_say_why_each_rule_failed() -> None:
    e = run("DELETE", "/cloud/buckets/b")
    assert e.exit_code == 1
    assert e.reasons() == [
        ("reads", "method DELETE not in [GET, HEAD]"),
        ("exports", "method DELETE not in [POST]"),
        ("iam", "path /cloud/buckets/b does not match /cloud/iam/**"),
        ("gold", "method DELETE not in [PATCH]"),
    ]
    assert "decision: deny by rule no-deletes — rule no-deletes matched" in e.text()
    e = run("POST", "/cloud/exports/x", groups=frozenset({"ci"}))
    assert e.exit_code == 1
    assert e.reasons()[1] == ("exports", "identity not in groups [agents] (has [ci])")
    text = e.text()
    assert "decision: deny by default (no rule matched)" in text
    assert "None" not in text
    assert (
        'outcome:  403 {"error": {"code": "policy_denied", "message": "the policy does not '
        'allow this request", "route": "cloud"}}'
    ) in text


def test_claims_from_the_command_line() -> None:
    assert run("PATCH", "/cloud/x", claims={"tier": "gold"}).exit_code == 0
    e = run("PATCH", "/cloud/x", claims={"tier": "silver"})
    assert e.exit_code == 1
    assert ("gold", "claim tier is [silver], not in [gold]") in e.reasons()


def test_default_approve_has_no_approvers() -> None:
    e = run("PUT", "/cloud/x", default="approve")
    assert e.exit_code == 3
    text = e.text()
    assert "decision: approve by default (no rule matched)" in text
    assert "approval: no approvers (policy.default has none): answered 503" in text
    assert '503 {"error": {"code": "approvals_unavailable"' in text
    assert "None" not in text
    data = e.as_json()
    assert data["rule"] is None and data["default"] is True and data["approvers"] is None


def test_refused_before_the_policy_is_a_deny() -> None:
    e = run("GET", "/nowhere/x")
    assert e.exit_code == 1 and e.route is None
    assert "route:    none matches (prefixes: /cloud/, /raw/)" in e.text()
    assert e.as_json()["refused"]["status"] == 404
    e = run("GET", "/cloud/a/..%2fb")
    assert e.exit_code == 1
    assert "refused:  400 ambiguous_request (encoded_slash)" in e.text()


def test_json_has_the_same_information() -> None:
    e = run("POST", "/cloud/exports/x?dry=1", groups=frozenset({"agents"}))
    data = json.loads(e.json_text())
    assert data == {
        "request": {
            "method": "POST",
            "path": "/cloud/exports/x",
            "query": "dry=1",
            "normalized_path": "/cloud/exports/x",
        },
        "identity": {"subject": "agent-7", "groups": ["agents"], "email": None},
        "route": {
            "name": "cloud",
            "prefix": "/cloud/",
            "upstream": "https://cloud.example.com/api/",
        },
        "upstream_url": "https://cloud.example.com/api/exports/x?dry=1",
        "actions": [],
        "action": "approve",
        "rule": "exports",
        "default": False,
        "decision_reason": "rule exports matched",
        "matched": "matches: method POST in [POST], route cloud, path /cloud/exports/x matches "
        "/cloud/exports/**, identity in group agents",
        "reasons": [{"rule": "reads", "why": "method POST not in [GET, HEAD]"}],
        "approvers": {"groups": ["data-owners"], "users": ["alice@example.com"]},
        "quorum": 2,
        "timeout_seconds": 300,
        "refused": None,
        "outcome": "held for approval by a human, then forwarded to "
        "https://cloud.example.com/api/exports/x?dry=1",
        "exit_code": 3,
    }


def test_the_compatible_explain_function() -> None:
    text, explanation = explain(settings(), "GET", "/cloud/x", subject="a")
    assert explanation is not None and explanation.decision.rule == "reads"
    assert text.startswith("request:  GET /cloud/x")
    assert explain(settings(), "GET", "/x/../y", subject="a")[1] is None


# --------------------------------------------------------------------------------------------
# The command


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COUNTERSIGN, "explain", *args], capture_output=True, text=True, timeout=60, env=os.environ
    )


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "e.yaml"
    path.write_text(CONFIG.format(default="deny"))
    return str(path)


def test_exit_codes(config: str) -> None:
    assert cli("-c", config, "GET", "/cloud/x").returncode == 0
    assert cli("-c", config, "delete", "/cloud/x").returncode == 1  # the method is upper-cased
    assert cli("-c", config, "GET", "/elsewhere").returncode == 1
    result = cli("-c", config, "POST", "/cloud/exports/x", "--groups", "ci, agents")
    assert result.returncode == 3, result.stderr
    assert "decision: approve by rule exports" in result.stdout
    result = cli("-c", config, "PATCH", "/cloud/x", "--claim", "tier=gold")
    assert result.returncode == 0, result.stdout


def test_json_output(config: str) -> None:
    result = cli("-c", config, "--json", "PUT", "/cloud/iam/x", "--subject", "s")
    assert result.returncode == 3
    data = json.loads(result.stdout)
    assert data["action"] == "approve" and data["rule"] == "iam"
    assert data["quorum"] == 1 and data["timeout_seconds"] == 600
    assert data["approvers"] == {"groups": ["security"], "users": []}
    assert [r["rule"] for r in data["reasons"]] == ["reads", "exports"]
    assert data["reasons"][1]["why"] == "method PUT not in [POST]"
    result = cli("-c", config, "--json", "DELETE", "/cloud/x")
    assert result.returncode == 1
    assert json.loads(result.stdout)["rule"] == "no-deletes"
