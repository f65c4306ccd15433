"""Policy conditions beyond method/path/identity: actions (judged per action, strictest wins),
headers, query, JSON and form fields, `needs_body`, empty path segments, case-insensitive
routes, the condition registry, and `explain` agreeing with `evaluate` (and both with a naive
reference) on random rule sets."""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from typing import Any

import pytest
from multidict import CIMultiDict

from proxy.config import PolicySettings, RuleSettings, accepted_texts
from proxy.model import (
    Action,
    AmbiguousField,
    Identity,
    RequestBody,
    RequestInfo,
    UnreadableBody,
)
from proxy.policy import Policy, actions_cover, rule_covers, when_covers
from proxy.policy.conditions import CONDITIONS
from proxy.policy.conditions.json_fields import json_pointer

APPROVERS = {"groups": ["security"]}


def frozen(value: Any) -> Any:
    """Lists as tuples, recursively: the strict settings take what the YAML loader builds."""
    if isinstance(value, list | tuple):
        return tuple(frozen(item) for item in value)
    if isinstance(value, dict):
        return {key: frozen(item) for key, item in value.items()}
    return value


def rule(name: str, action: str = "allow", **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"name": name, "action": action, **fields}
    if action == "approve":
        data["approvers"] = APPROVERS
    return data


def policy(*rules: dict[str, Any], default: str = "deny") -> Policy:
    settings = PolicySettings.model_validate(frozen({"default": default, "rules": list(rules)}))
    return Policy.compile(settings)


def req(
    method: str = "POST",
    path: str = "/",
    route: str | None = None,
    *,
    actions: Sequence[str] = (),
    headers: Sequence[tuple[str, str]] = (),
    query: str = "",
    body: bytes | None = None,
    content_type: str | None = "application/json",
    fold_case: bool = False,
) -> RequestInfo:
    return RequestInfo(
        method,
        path,
        route,
        actions=tuple(actions),
        headers=CIMultiDict(headers),
        query=query,
        body=None if body is None else RequestBody(body, content_type),
        fold_case=fold_case,
    )


def body(document: Any) -> bytes:
    return json.dumps(document).encode()


ANYONE = Identity(subject="agent-1", issuer="https://idp.example")


def decided(p: Policy, request: RequestInfo, identity: Identity = ANYONE) -> str | None:
    return p.evaluate(request, identity).rule


def reasons(p: Policy, request: RequestInfo) -> list[tuple[str, bool, str]]:
    return [(t.rule, t.matched, t.reason) for t in p.explain(request, ANYONE).trace if t.evaluated]


# --------------------------------------------------------------------------------------------
# Registry


def test_registry_lists_every_condition_once_in_evaluation_order() -> None:
    names = [kind.name for kind in CONDITIONS]
    assert names == [
        "methods",
        "route",
        "actions",
        "paths",
        "groups",
        "subjects",
        "claims",
        "headers",
        "query",
        "form",
        "json",
    ]
    assert {kind.name for kind in CONDITIONS if kind.reads_body} == {"form", "json"}


def test_conditions_no_rule_uses_are_not_compiled() -> None:
    p = policy(rule("reads", methods=["GET"]), rule("x", paths=["/x/**"]))
    assert [c.name for c in p._plan.conditions] == ["methods", "paths"]
    p = policy(rule("h", when={"headers": {"X-Env": "prod"}}))
    assert [c.name for c in p._plan.conditions] == ["headers"]
    assert not p.needs_body(req(), ANYONE)


# --------------------------------------------------------------------------------------------
# actions


@pytest.mark.parametrize(
    ("glob", "action", "expected"),
    [
        ("iam:Create*", "iam:CreateRole", True),
        ("iam:Create*", "iam:Create", True),
        ("iam:Create*", "iam:createRole", False),  # case-sensitive
        ("iam:Create*", "xiam:CreateRole", False),
        ("iam:CreateRole", "iam:CreateRole", True),
        ("iam:CreateRole", "iam:CreateRoles", False),
        ("tool:delete_*", "tool:delete_repo", True),
        ("tool:delete_*", "tool:create_repo", False),
        ("*:Delete*", "dynamodb:DeleteTable", True),  # '*' crosses ':'
        ("s3:*", "s3:GetObject", True),
        ("mcp:*/call", "mcp:tools/call", True),  # and '/'
        ("tool:a?c", "tool:abc", False),  # only '*' is special
        ("tool:a?c", "tool:a?c", True),
        ("tool:[ab]", "tool:a", False),
        ("tool:[ab]", "tool:[ab]", True),
        ("query:*", "mutation:deleteUser", False),
    ],
)
def test_action_globs(glob: str, action: str, expected: bool) -> None:
    p = policy(rule("r", actions=[glob]))
    assert (decided(p, req(actions=[action])) == "r") is expected


def test_rule_with_actions_never_matches_a_request_naming_none() -> None:
    p = policy(rule("any-action", actions=["*:*"]), rule("rest", "deny"))
    assert decided(p, req()) == "rest"
    assert decided(p, req(actions=["iam:GetUser"])) == "any-action"
    assert reasons(p, req())[0] == (
        "any-action",
        False,
        "the request names no action; rule needs one of [*:*]",
    )


IAM = [
    rule("iam-reads", "allow", actions=["iam:Get*", "iam:List*"]),
    rule("iam-writes", "approve", actions=["iam:Create*", "iam:Put*"]),
    rule("iam-deletes", "deny", actions=["iam:Delete*"]),
    rule("more-reads", "allow", actions=["iam:Describe*"]),
]


@pytest.mark.parametrize(
    ("actions", "expected_rule", "expected_action", "deciding"),
    [
        (["iam:GetUser"], "iam-reads", "allow", "iam:GetUser"),
        (["iam:GetUser", "iam:CreateRole"], "iam-writes", "approve", "iam:CreateRole"),
        (["iam:CreateRole", "iam:GetUser"], "iam-writes", "approve", "iam:CreateRole"),
        (
            ["iam:GetUser", "iam:CreateRole", "iam:DeleteRole"],
            "iam-deletes",
            "deny",
            "iam:DeleteRole",
        ),
        # equally strict: the earliest rule decides
        (["iam:DescribeX", "iam:ListUsers"], "iam-reads", "allow", "iam:ListUsers"),
        # an action no rule matches brings the default in (deny beats allow) ...
        (["iam:GetUser", "iam:TagRole"], None, "deny", "iam:TagRole"),
        # ... and a rule's deny comes before the default's
        (["iam:TagRole", "iam:DeleteRole"], "iam-deletes", "deny", "iam:DeleteRole"),
        # the same action twice is judged once
        (["iam:GetUser", "iam:GetUser"], "iam-reads", "allow", "iam:GetUser"),
    ],
)
def test_several_actions_strictest_outcome_wins(
    actions: list[str], expected_rule: str | None, expected_action: str, deciding: str
) -> None:
    p = policy(*IAM)
    decision = p.evaluate(req(actions=actions), ANYONE)
    assert decision.rule == expected_rule
    assert decision.action.value == expected_action
    assert decision.reason.endswith(f"(action {deciding})")
    explanation = p.explain(req(actions=actions), ANYONE)
    assert explanation.decision == decision
    assert explanation.action == deciding


def test_default_allow_is_the_weakest_outcome() -> None:
    p = policy(rule("writes", "approve", actions=["iam:Create*"]), default="allow")
    d = p.evaluate(req(actions=["iam:GetUser", "iam:CreateRole"]), ANYONE)
    assert (d.rule, d.action) == ("writes", Action.APPROVE)
    d = p.evaluate(req(actions=["iam:GetUser"]), ANYONE)
    assert (d.rule, d.action) == (None, Action.ALLOW)
    assert d.reason == "no rule matched; default allow (action iam:GetUser)"


def test_action_decision_reason_and_explain_texts() -> None:
    p = policy(*IAM)
    d = p.evaluate(req(actions=["iam:CreateRole"]), ANYONE)
    assert d.reason == "rule iam-writes matched (action iam:CreateRole)"
    assert reasons(p, req(actions=["iam:CreateRole"])) == [
        ("iam-reads", False, "action iam:CreateRole matches none of [iam:Get*, iam:List*]"),
        ("iam-writes", True, "matches: action iam:CreateRole matches iam:Create*"),
    ]
    p = policy(rule("one", actions=["iam:Get*"]))
    assert reasons(p, req(actions=["iam:PutX"])) == [
        ("one", False, "action iam:PutX does not match iam:Get*")
    ]
    text = p.explain(req(actions=["iam:PutX"]), ANYONE).render()
    assert "judging action iam:PutX" in text


def test_actions_combine_with_other_conditions() -> None:
    p = policy(
        rule("aws-writes", "approve", route="aws", methods=["POST"], actions=["iam:Create*"]),
        rule("rest", "deny"),
    )
    assert decided(p, req("POST", "/", "aws", actions=["iam:CreateRole"])) == "aws-writes"
    assert decided(p, req("POST", "/", "other", actions=["iam:CreateRole"])) == "rest"
    assert decided(p, req("GET", "/", "aws", actions=["iam:CreateRole"])) == "rest"


def test_action_cache_is_bounded() -> None:
    p = policy(rule("r", actions=["tool:*"]))
    condition = next(c for c in p._plan.conditions if c.name == "actions")
    for i in range(condition.max_cached + 10):  # type: ignore[attr-defined]
        assert decided(p, req(actions=[f"tool:t{i}"])) == "r"
    assert len(condition._cache) <= condition.max_cached  # type: ignore[attr-defined]
    assert decided(p, req(actions=["other:x"])) is None


# --------------------------------------------------------------------------------------------
# headers, query


def test_headers() -> None:
    p = policy(rule("prod", when={"headers": {"X-Env": ["prod", "staging"]}}))
    assert decided(p, req(headers=[("X-Env", "prod")])) == "prod"
    assert decided(p, req(headers=[("x-env", "staging")])) == "prod"  # names: any case
    assert decided(p, req(headers=[("X-Env", "Prod")])) is None  # values: exact
    assert decided(p, req(headers=[("X-Env", "dev")])) is None
    assert decided(p, req()) is None  # missing
    with pytest.raises(AmbiguousField) as info:
        p.evaluate(req(headers=[("X-Env", "prod"), ("x-env", "dev")]), ANYONE)
    assert info.value.name == "X-Env"
    with pytest.raises(AmbiguousField):
        p.explain(req(headers=[("X-Env", "prod"), ("X-Env", "prod")]), ANYONE)


def test_several_headers_must_all_hold() -> None:
    p = policy(rule("both", when={"headers": {"X-Env": "prod", "X-Team": "data"}}))
    assert decided(p, req(headers=[("X-Env", "prod"), ("X-Team", "data")])) == "both"
    assert decided(p, req(headers=[("X-Env", "prod"), ("X-Team", "ops")])) is None
    assert decided(p, req(headers=[("X-Team", "data")])) is None


def test_header_explain_texts() -> None:
    p = policy(rule("prod", when={"headers": {"X-Env": "prod"}}))
    assert reasons(p, req(headers=[("X-Env", "dev")])) == [
        ("prod", False, "header X-Env is 'dev', not in [prod]")
    ]
    assert reasons(p, req()) == [("prod", False, "header X-Env is missing (needs [prod])")]
    assert reasons(p, req(headers=[("x-env", "prod")])) == [
        ("prod", True, "matches: header X-Env = prod")
    ]


def test_query() -> None:
    p = policy(rule("dry", "allow", when={"query": {"dry_run": "true", "mode": ["a", "b c"]}}))
    assert decided(p, req(query="dry_run=true&mode=a")) == "dry"
    assert decided(p, req(query="mode=b%20c&dry_run=true&other=1&other=2")) == "dry"
    assert decided(p, req(query="mode=b+c&dry_run=true")) == "dry"  # decoded
    assert decided(p, req(query="dry_run=TRUE&mode=a")) is None
    assert decided(p, req(query="mode=a")) is None
    with pytest.raises(AmbiguousField) as info:
        p.evaluate(req(query="dry_run=true&mode=a&dry_run=false"), ANYONE)
    assert info.value.name == "dry_run"
    assert reasons(p, req(query="dry_run=true&mode=z")) == [
        ("dry", False, "query parameter mode is 'z', not in [a, b c]")
    ]


def test_a_repeated_field_only_other_rules_read_is_not_ambiguous() -> None:
    p = policy(
        rule("tagged", route="cloud", when={"query": {"tag": "x"}, "headers": {"X-Env": "p"}}),
        rule("rest", "deny"),
    )
    repeated = {"query": "tag=a&tag=b", "headers": [("X-Env", "1"), ("X-Env", "2")]}
    # Another route: the rule that reads them is out before they are read.
    assert decided(p, req(route="db", **repeated)) == "rest"
    assert p.explain(req(route="db", **repeated), ANYONE).decision.rule == "rest"
    with pytest.raises(AmbiguousField):
        p.evaluate(req(route="cloud", **repeated), ANYONE)
    # A rule before it decides: nothing after it is read.
    p = policy(rule("first", route="db"), rule("tagged", when={"query": {"tag": "x"}}))
    assert decided(p, req(route="db", query="tag=a&tag=b")) == "first"


# --------------------------------------------------------------------------------------------
# json


@pytest.mark.parametrize(
    ("fields", "document", "expected"),
    [
        ({"/format": ["csv", "parquet"]}, {"format": "csv"}, True),
        ({"/format": ["csv", "parquet"]}, {"format": "json"}, False),
        ({"/format": "csv"}, {}, False),  # missing
        ({"/format": "csv"}, {"format": None}, False),
        ({"/format": "csv"}, {"format": {"csv": 1}}, False),
        ({"/export/format": "csv"}, {"export": {"format": "csv"}}, True),
        ({"/export/format": "csv"}, {"export": "csv"}, False),
        ({"/items/0/kind": "table"}, {"items": [{"kind": "table"}]}, True),
        ({"/items/1/kind": "table"}, {"items": [{"kind": "table"}]}, False),
        ({"/items/01": "x"}, {"items": ["a", "x"]}, False),  # not an array index
        ({"/items/-": "x"}, {"items": ["x"]}, False),
        ({"/items/1": "x"}, {"items": ["a", "x"]}, True),
        ({"/a~1b": "x"}, {"a/b": "x"}, True),  # RFC 6901 escapes
        ({"/a~0b": "x"}, {"a~b": "x"}, True),
        ({"/a~01": "x"}, {"a~1": "x"}, True),
        ({"/": "x"}, {"": "x"}, True),  # the empty key
        ({"": "x"}, "x", True),  # the whole document
        ({"/tags": "prod"}, {"tags": ["dev", "prod"]}, True),  # an array: any element
        ({"/tags": "prod"}, {"tags": ["dev"]}, False),
        ({"/tags": "prod"}, {"tags": []}, False),
        ({"/tags": "prod"}, {"tags": [["prod"]]}, False),
        ({"/count": 1}, {"count": 1}, True),  # numbers and booleans by their JSON text
        ({"/count": 1}, {"count": "1"}, True),
        ({"/count": 1}, {"count": 1.5}, False),
        ({"/count": "1.5"}, {"count": 1.5}, True),
        ({"/count": 1}, {"count": True}, False),
        ({"/dry": True}, {"dry": True}, True),
        ({"/dry": True}, {"dry": False}, False),
        ({"/dry": True}, {"dry": "true"}, True),
        ({"/dry": "false"}, {"dry": False}, True),
        ({"/ids": 3}, {"ids": [1, 2, 3]}, True),
        ({"/format": "csv", "/dry": True}, {"format": "csv", "dry": True}, True),  # all hold
        ({"/format": "csv", "/dry": True}, {"format": "csv", "dry": False}, False),
    ],
)
def test_json_fields(fields: dict[str, Any], document: Any, expected: bool) -> None:
    p = policy(rule("r", when={"json": fields}))
    assert (decided(p, req(body=body(document))) == "r") is expected
    assert (p.explain(req(body=body(document)), ANYONE).decision.rule == "r") is expected


def test_json_pointer_tokens() -> None:
    assert json_pointer("") == ()
    assert json_pointer("/") == ("",)
    assert json_pointer("/a~1b/~0/0") == ("a/b", "~", "0")
    assert json_pointer("/a~01") == ("a~1",)


def test_json_body_that_is_not_json_or_not_read_fails_the_condition() -> None:
    p = policy(rule("csv", when={"json": {"/format": "csv"}}), rule("rest", "deny"))
    assert (
        decided(p, req(body=b"format=csv", content_type="application/x-www-form-urlencoded"))
        == "rest"
    )
    assert decided(p, req(body=b"\xff\xfe", content_type="application/octet-stream")) == "rest"
    assert decided(p, req(body=None)) == "rest"  # not read
    assert decided(p, req(body=b"")) == "rest"
    # any Content-Type: a lenient upstream parses JSON whatever it is told
    assert decided(p, req(body=b'{"format": "csv"}', content_type="text/plain")) == "csv"
    # Meant as JSON but not JSON to us: refused, never judged as if the field were absent (a
    # lenient upstream could read it: a byte-order mark, a trailing comma, invalid UTF-8).
    for meant in (
        b'{"format": "csv"',
        b'\xef\xbb\xbf{"format": "csv"}',
        b'{"format": "csv",}',
        b'{"format": "\xff"}',
        b"[" * 100_000,
    ):
        with pytest.raises(UnreadableBody):
            decided(p, req(body=meant))
    with pytest.raises(UnreadableBody):
        decided(p, req(body=b"nope", content_type="application/json"))
    assert reasons(p, req(body=None))[0] == (
        "csv",
        False,
        "JSON /format is not known: the body was not read (needs [csv])",
    )
    assert reasons(p, req(body=body({"format": "xml"})))[0] == (
        "csv",
        False,
        "JSON /format is 'xml', not in [csv]",
    )
    assert reasons(p, req(body=body({})))[0] == (
        "csv",
        False,
        "JSON /format is missing (needs [csv])",
    )


def test_json_repeated_key_is_ambiguous() -> None:
    p = policy(rule("csv", when={"json": {"/format": "csv"}}), rule("rest", "deny"))
    with pytest.raises(AmbiguousField):
        p.evaluate(req(body=b'{"format": "csv", "format": "xml"}'), ANYONE)
    with pytest.raises(AmbiguousField):  # anywhere in the document
        p.evaluate(req(body=b'{"format": "csv", "x": {"a": 1, "a": 2}}'), ANYONE)
    with pytest.raises(AmbiguousField):
        p.explain(req(body=b'{"format": "csv", "format": "csv"}'), ANYONE)


# --------------------------------------------------------------------------------------------
# form


FORM = "application/x-www-form-urlencoded"


def test_form_fields() -> None:
    p = policy(rule("del", "deny", when={"form": {"Action": "DeleteRole"}}), default="allow")
    assert decided(p, req(body=b"Action=DeleteRole&Version=1", content_type=FORM)) == "del"
    assert (
        decided(p, req(body=b"Action=DeleteRole", content_type=f"{FORM}; charset=utf-8")) == "del"
    )
    assert decided(p, req(body=b"Action=Delete%52ole", content_type=FORM)) == "del"  # decoded
    assert decided(p, req(body=b"Action=GetRole", content_type=FORM)) is None
    assert decided(p, req(body=b"Version=1", content_type=FORM)) is None
    # only urlencoded bodies have fields
    assert decided(p, req(body=b"Action=DeleteRole", content_type="text/plain")) is None
    assert decided(p, req(body=b'{"Action": "DeleteRole"}')) is None
    assert decided(p, req(body=b"Action=DeleteRole\xff", content_type=FORM)) is None
    assert decided(p, req(body=None)) is None
    with pytest.raises(AmbiguousField) as info:
        p.evaluate(req(body=b"Action=GetRole&Action=DeleteRole", content_type=FORM), ANYONE)
    assert info.value.name == "Action"
    assert reasons(p, req(body=b"{}"))[0] == (
        "del",
        False,
        "form field Action is missing: the body is not application/x-www-form-urlencoded "
        "(needs [DeleteRole])",
    )


# --------------------------------------------------------------------------------------------
# needs_body


def test_needs_body_without_body_rules_is_false() -> None:
    p = policy(rule("a", methods=["POST"], when={"headers": {"X": "1"}}))
    assert not p.needs_body(req(), ANYONE)


def test_needs_body_when_a_body_rule_comes_first() -> None:
    p = policy(
        rule("csv-exports", "approve", methods=["POST"], when={"json": {"/format": "csv"}}),
        rule("posts", "allow", methods=["POST"]),
    )
    assert p.needs_body(req("POST"), ANYONE)
    # No rule matches a GET, whatever its body: the default decides.
    assert not p.needs_body(req("GET"), ANYONE)


def test_no_body_needed_when_a_body_free_rule_decides_first() -> None:
    p = policy(
        rule("posts", "allow", methods=["POST"]),
        rule("csv-exports", "approve", when={"json": {"/format": "csv"}}),
    )
    assert not p.needs_body(req("POST"), ANYONE)  # `posts` matches whatever the body
    assert p.needs_body(req("PUT"), ANYONE)  # `posts` is out: the body rule comes first


def test_needs_body_sees_every_body_free_condition() -> None:
    p = policy(
        rule(
            "prod-csv",
            "deny",
            route="cloud",
            when={"headers": {"X-Env": "prod"}, "form": {"f": "1"}},
        ),
        rule("rest", "allow"),
    )
    assert p.needs_body(req(route="cloud", headers=[("X-Env", "prod")]), ANYONE)
    assert not p.needs_body(req(route="cloud", headers=[("X-Env", "dev")]), ANYONE)
    assert not p.needs_body(req(route="db", headers=[("X-Env", "prod")]), ANYONE)
    assert not p.needs_body(req(route="cloud"), ANYONE)


def test_needs_body_per_action() -> None:
    p = policy(
        rule("reads", "allow", actions=["iam:Get*"]),
        rule("tagged-writes", "approve", actions=["iam:*"], when={"json": {"/Tags/0": "x"}}),
        rule("writes", "deny", actions=["iam:*"]),
    )
    assert not p.needs_body(req(actions=["iam:GetUser"]), ANYONE)
    assert p.needs_body(req(actions=["iam:PutRole"]), ANYONE)
    assert p.needs_body(req(actions=["iam:GetUser", "iam:PutRole"]), ANYONE)
    assert not p.needs_body(req(), ANYONE)  # no action: no rule with actions matches


def test_evaluate_without_body_treats_body_conditions_as_failing() -> None:
    p = policy(rule("csv", when={"json": {"/f": "csv"}}), rule("rest", "deny"))
    assert decided(p, req(body=None)) == "rest"
    assert decided(p, req(body=body({"f": "csv"}))) == "csv"


# --------------------------------------------------------------------------------------------
# Empty segments (merge_slashes: false) and case-folded paths


EMPTY_SEGMENTS = [
    ("/b/logs/*/x", "/b/logs//x", False),  # '*' needs a non-empty segment
    ("/b/logs/*/x", "/b/logs/2024/x", True),
    ("/b/logs/**", "/b/logs//2024/x", True),  # '**' absorbs empty segments
    ("/b/logs/**/x", "/b/logs///x", True),
    ("/b/*/2024/**", "/b/logs//2024/x", False),
    ("/b/logs/2024/x", "/b/logs//2024/x", False),  # a literal glob has no empty segment
    ("/b/logs/a*", "/b/logs//a", False),
    ("/b/logs/*", "/b/logs/a/", True),  # one trailing slash is still ignored
    ("/b/logs/*", "/b/logs/a//", False),  # two: an empty segment
    ("/b/logs/*/*", "/b/logs/a//", False),
    ("/b/logs/**", "/b/logs/a//", True),
    ("/b/**", "//b/x", False),  # an empty first segment
    ("/**/b/x", "//b/x", True),
    ("/**", "//", True),
    ("/", "//", False),
    ("/*", "//", False),
    ("/", "/", True),
]


@pytest.mark.parametrize(("glob", "path", "expected"), EMPTY_SEGMENTS)
def test_empty_segments(glob: str, path: str, expected: bool) -> None:
    p = policy(rule("r", paths=[glob]))
    assert (decided(p, req(path=path)) == "r") is expected
    assert (p.path_candidates(path) == ["r"]) is expected
    assert reference_glob_match(glob, path) is expected


def test_explain_names_the_path_with_empty_segments() -> None:
    p = policy(rule("r", paths=["/b/*/x"]))
    assert reasons(p, req(path="/b//x")) == [("r", False, "path /b//x does not match /b/*/x")]


def test_case_folded_paths() -> None:
    p = policy(rule("exports", "approve", paths=["/Cloud/Exports/**", "/v1/*.JSON"]))
    assert decided(p, req(path="/cloud/EXPORTS/x", fold_case=True)) == "exports"
    assert decided(p, req(path="/cloud/EXPORTS/x")) is None
    assert decided(p, req(path="/Cloud/Exports/x")) == "exports"
    assert decided(p, req(path="/V1/A.json", fold_case=True)) == "exports"
    assert decided(p, req(path="/STRASSE", fold_case=True)) is None
    assert p.path_candidates("/CLOUD/exports", fold_case=True) == ["exports"]
    assert p.path_candidates("/CLOUD/exports") == []
    assert reasons(p, req(path="/cloud/EXPORTS/x", fold_case=True)) == [
        (
            "exports",
            True,
            "matches: path /cloud/EXPORTS/x (case-folded /cloud/exports/x) matches "
            "/Cloud/Exports/**",
        )
    ]
    p = policy(rule("street", paths=["/Straße/*"]))
    assert decided(p, req(path="/STRASSE/1", fold_case=True)) == "street"
    assert decided(p, req(path="/strasse//1", fold_case=True)) is None


# --------------------------------------------------------------------------------------------
# countersign check's analysis knows the new conditions


def settings_rule(**fields: Any) -> RuleSettings:
    return RuleSettings.model_validate(frozen(rule("r", **fields)))


def test_rule_with_request_conditions_covers_only_what_implies_them() -> None:
    headers = settings_rule(when={"headers": {"X-Env": ["prod", "dev"]}})
    anything = settings_rule()
    assert not rule_covers(headers, anything)
    assert rule_covers(headers, settings_rule(when={"headers": {"x-env": "prod"}}))
    assert not rule_covers(headers, settings_rule(when={"headers": {"X-Env": "qa"}}))
    assert rule_covers(anything, headers)
    json_rule = settings_rule(when={"json": {"/n": [1, "2"]}})
    assert rule_covers(json_rule, settings_rule(when={"json": {"/n": "1"}}))
    assert not rule_covers(json_rule, settings_rule(when={"json": {"/m": 1}}))
    for key in ("query", "form"):
        outer = settings_rule(when={key: {"a": "1"}})
        assert not rule_covers(outer, anything)
        assert rule_covers(outer, settings_rule(when={key: {"a": "1", "b": "2"}}))
    assert when_covers(None, headers.when)


def test_actions_cover() -> None:
    assert actions_cover((), ())
    assert actions_cover((), ("iam:Create*",))
    assert not actions_cover(("iam:*",), ())
    assert actions_cover(("iam:*",), ("iam:Create*", "iam:DeleteRole"))
    assert not actions_cover(("iam:Create*",), ("iam:*",))
    assert actions_cover(("*",), ("tool:x",))
    assert not rule_covers(settings_rule(actions=["iam:*"]), settings_rule())
    assert rule_covers(settings_rule(actions=["iam:*"]), settings_rule(actions=["iam:Get*"]))


# --------------------------------------------------------------------------------------------
# Random rule sets: evaluate agrees with a naive reference; explain agrees with evaluate


def reference_glob_match(glob: str, path: str, fold: bool = False) -> bool:
    if fold:
        glob, path = glob.casefold(), path.casefold()
    pieces = []
    for segment in (s for s in glob.split("/") if s):
        if segment == "**":
            pieces.append("(?:/[^/]*)*")
        elif segment == "*":
            pieces.append("/[^/]+")
        else:
            pieces.append("/" + "[^/]*".join(re.escape(p) for p in segment.split("*")))
    judged = path[:-1] if path.endswith("/") else path
    return re.fullmatch("".join(pieces), judged) is not None


def reference_action_match(glob: str, action: str) -> bool:
    return re.fullmatch(".*".join(re.escape(p) for p in glob.split("*")), action, re.S) is not None


_ABSENT = object()


def reference_json_values(document: Any, pointer: str) -> list[str] | None:
    value = document
    if pointer:
        for raw in pointer[1:].split("/"):
            token = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(value, dict) and token in value:
                value = value[token]
            elif isinstance(value, list) and re.fullmatch(r"0|[1-9][0-9]*", token):
                if int(token) >= len(value):
                    return None
                value = value[int(token)]
            else:
                return None
    items = value if isinstance(value, list) else [value]
    texts = []
    for item in items:
        if isinstance(item, bool):
            texts.append("true" if item else "false")
        elif isinstance(item, int | float | str):
            texts.append(item if isinstance(item, str) else json.dumps(item))
    return texts


def reference_field_ok(values: list[str] | None, accepted: Any) -> bool:
    return values is not None and bool(set(values) & set(accepted_texts(accepted)))


def reference_matches(
    r: RuleSettings, request: RequestInfo, identity: Identity, action: str | None, body: bool = True
) -> bool:
    """Whether rule `r` matches; `body=False` leaves out the conditions on the body."""
    if r.methods and request.method.upper() not in r.methods:
        return False
    if r.route is not None and r.route != request.route:
        return False
    if r.actions and (
        action is None or not any(reference_action_match(g, action) for g in r.actions)
    ):
        return False
    if r.paths and not any(
        reference_glob_match(g, request.path, request.fold_case) for g in r.paths
    ):
        return False
    w = r.when
    if w is None:
        return True
    if w.groups and not identity.groups.intersection(w.groups):
        return False
    if w.subjects and identity.subject not in w.subjects:
        return False
    for name, accepted in w.headers.items():
        values = request.headers.getall(name, [])
        if not reference_field_ok(values or None, accepted):
            return False
    fields = dict(re.findall(r"([^&=]+)=([^&]*)", request.query))
    for name, accepted in w.query.items():
        if not reference_field_ok([fields[name]] if name in fields else None, accepted):
            return False
    if not body:
        return True
    data = request.body
    for name, accepted in w.form.items():
        form = {}
        if data is not None and data.is_form:
            form = dict(re.findall(r"([^&=]+)=([^&]*)", data.data.decode()))
        if not reference_field_ok([form[name]] if name in form else None, accepted):
            return False
    for pointer, accepted in w.json_fields.items():
        try:
            document = json.loads(data.data) if data is not None else _ABSENT
        except ValueError:
            document = _ABSENT
        values = None if document is _ABSENT else reference_json_values(document, pointer)
        if not reference_field_ok(values, accepted):
            return False
    return True


STRICTNESS = {Action.DENY: 0, Action.APPROVE: 1, Action.ALLOW: 2}


def reference_evaluate(
    rules: Sequence[RuleSettings], default: Action, request: RequestInfo, identity: Identity
) -> tuple[str | None, Action]:
    outcomes = []
    for action in dict.fromkeys(request.actions) or [None]:
        index = next(
            (i for i, r in enumerate(rules) if reference_matches(r, request, identity, action)),
            None,
        )
        verdict = default if index is None else rules[index].action
        outcomes.append((STRICTNESS[verdict], len(rules) if index is None else index, verdict))
    _, index, verdict = min(outcomes, key=lambda o: (o[0], o[1]))
    return (None if index == len(rules) else rules[index].name), verdict


def reference_needs_body(
    rules: Sequence[RuleSettings], request: RequestInfo, identity: Identity
) -> bool:
    for action in dict.fromkeys(request.actions) or [None]:
        first = next(
            (r for r in rules if reference_matches(r, request, identity, action, body=False)),
            None,
        )
        if (
            first is not None
            and first.when is not None
            and (first.when.json_fields or first.when.form)
        ):
            return True
    return False


ACTIONS = ["iam:CreateRole", "iam:DeleteRole", "iam:GetUser", "tool:delete_repo", "s3:GetObject"]
ACTION_GLOBS = ["iam:Create*", "iam:*", "iam:DeleteRole", "tool:*", "*:Get*", "*:*", "s3:*Object"]
SEGMENTS = ["a", "b", "Ab", "x.json"]
GLOB_SEGMENTS = [*SEGMENTS, "*", "**", "a*", "*.json"]


def random_glob(rng: random.Random) -> str:
    segments = [rng.choice(GLOB_SEGMENTS) for _ in range(rng.randrange(0, 4))]
    segments = [s for i, s in enumerate(segments) if not (s == "**" and segments[i - 1 : i] == [s])]
    return "/" + "/".join(segments)


def random_path(rng: random.Random) -> str:
    segments = [rng.choice([*SEGMENTS, "AB", "", "zz"]) for _ in range(rng.randrange(4))]
    return "/" + "/".join(segments) + ("/" if segments and rng.random() < 0.2 else "")


def random_rule(rng: random.Random, index: int) -> dict[str, Any]:
    # Two request conditions at least, so no early rule catches everything.
    kinds = set(rng.sample(["methods", "paths", "route", "actions"], 2))
    kinds.update(kind for kind in ["methods", "paths", "route", "actions"] if rng.random() < 0.2)
    fields: dict[str, Any] = {}
    if "methods" in kinds:
        fields["methods"] = rng.sample(["GET", "POST", "PUT"], rng.choice([1, 2]))
    if "paths" in kinds:
        fields["paths"] = [random_glob(rng) for _ in range(rng.choice([1, 2]))]
    if "route" in kinds:
        fields["route"] = rng.choice(["cloud", "aws"])
    if "actions" in kinds:
        fields["actions"] = rng.sample(ACTION_GLOBS, rng.choice([1, 2]))
    when: dict[str, Any] = {}
    if rng.random() < 0.2:
        when["groups"] = rng.sample(["agents", "ci"], 1)
    if rng.random() < 0.1:
        when["subjects"] = ["agent-1"]
    if rng.random() < 0.2:
        when["headers"] = {rng.choice(["X-Env", "x-env"]): rng.choice(["prod", ["prod", "dev"]])}
    if rng.random() < 0.2:
        when["query"] = {"mode": rng.choice(["a", ["a", "b"]])}
    if rng.random() < 0.2:
        when["json"] = rng.choice(
            [{"/format": ["csv", "xml"]}, {"/n": 1}, {"/dry": True}, {"/tags": "p", "/n": [1, 2]}]
        )
    if rng.random() < 0.15:
        when["form"] = {"op": rng.choice(["del", ["del", "put"]])}
    if when:
        fields["when"] = when
    return rule(f"r{index}", rng.choice(["allow", "deny", "approve"]), **fields)


def random_request(rng: random.Random, duplicates: bool) -> RequestInfo:
    headers = []
    if rng.random() < 0.6:
        headers.append(("X-Env", rng.choice(["prod", "dev", "qa"])))
    parts = [f"mode={rng.choice('abc')}"] if rng.random() < 0.6 else []
    if rng.random() < 0.3:
        parts.append("x=1")
    query = "&".join(parts)
    if duplicates and rng.random() < 0.3:
        if rng.random() < 0.5:
            headers.append(("x-env", "prod"))
        else:
            query += "&mode=a&mode=a"
    kind = rng.choice(["none", "json", "json", "form", "junk"])
    content_type: str | None = "application/json"
    data: bytes | None = None
    if kind == "json":
        document: dict[str, Any] = {}
        for key, values in [
            ("format", ["csv", "json"]),
            ("n", [1, 2, "1", 1.5]),
            ("dry", [True, False, "true"]),
            ("tags", [["p", "q"], ["q"], "p"]),
        ]:
            if rng.random() < 0.6:
                document[key] = rng.choice(values)
        data = body(document)
        if duplicates and rng.random() < 0.2:
            data = data[:-1] + (b', "n": 1}' if document else b'"n": 1, "n": 2}')
    elif kind == "form":
        content_type = FORM
        data = rng.choice([b"op=del", b"op=put", b"x=1", b"op=get&x=2"])
        if duplicates and rng.random() < 0.2:
            data = b"op=del&op=put"
    elif kind == "junk":
        content_type = "application/octet-stream"
        data = rng.choice([b"not json", b"\xff", b""])
    return req(
        rng.choice(["GET", "POST", "PUT", "DELETE"]),
        random_path(rng),
        rng.choice([None, "cloud", "aws"]),
        actions=rng.sample(ACTIONS, rng.choice([0, 0, 1, 1, 2, 3])),
        headers=headers,
        query=query,
        body=data,
        content_type=content_type,
        fold_case=rng.random() < 0.2,
    )


def random_identity(rng: random.Random) -> Identity:
    return Identity(
        subject=rng.choice(["agent-1", "agent-2"]),
        issuer="https://idp.example",
        groups=frozenset(rng.sample(["agents", "ci", "ops"], rng.randrange(3))),
    )


def without_body(request: RequestInfo) -> RequestInfo:
    return RequestInfo(
        request.method,
        request.path,
        request.route,
        actions=request.actions,
        headers=request.headers,
        query=request.query,
        fold_case=request.fold_case,
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_rule_sets_agree_with_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    raw = [random_rule(rng, i) for i in range(60)]
    default = rng.choice(["allow", "deny"])
    p = policy(*raw, default=default)
    rules = list(p.rules)
    outcomes: dict[str, int] = {"default": 0, "rule": 0, "needs body": 0}
    for _ in range(400):
        request = random_request(rng, duplicates=False)
        identity = random_identity(rng)
        expected = reference_evaluate(rules, Action(default), request, identity)
        decision = p.evaluate(request, identity)
        assert (decision.rule, decision.action) == expected, request
        assert p.explain(request, identity).decision == decision
        bare = without_body(request)
        needs = p.needs_body(bare, identity)
        assert needs == reference_needs_body(rules, bare, identity), request
        if not needs:  # then the body cannot change the decision
            assert p.evaluate(bare, identity) == decision, request
        outcomes["default" if decision.rule is None else "rule"] += 1
        outcomes["needs body"] += needs
    assert min(outcomes.values()) > 20, outcomes


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_explain_verdict_and_trace_agree_with_evaluate(seed: int) -> None:
    rng = random.Random(seed)
    p = policy(*(random_rule(rng, i) for i in range(40)), default="deny")
    ambiguous = 0
    for _ in range(300):
        request = random_request(rng, duplicates=True)
        identity = random_identity(rng)
        try:
            decision = p.evaluate(request, identity)
        except AmbiguousField:
            ambiguous += 1
            with pytest.raises(AmbiguousField):
                p.explain(request, identity)
            continue
        explanation = p.explain(request, identity)
        assert explanation.decision == decision
        trace = explanation.trace
        assert [t.rule for t in trace] == [r.name for r in p.rules]
        matched = [t.rule for t in trace if t.matched]
        assert matched == ([] if decision.rule is None else [decision.rule])
        evaluated = [t for t in trace if t.evaluated]
        if decision.rule is not None:
            assert evaluated[-1].rule == decision.rule
            assert evaluated[-1].reason.startswith("matches")
        assert all(t.reason for t in trace)
        assert not any(t.reason.startswith("matches") for t in trace if not t.matched)
    assert 0 < ambiguous < 150


def test_stopping_early_and_the_remembered_head_give_the_same_answers() -> None:
    # The first rule states no condition: it decides everything, nothing is read.
    p = policy(rule("all", "deny"), rule("h", when={"headers": {"X": "1"}}))
    repeated = req(headers=[("X", "1"), ("X", "2")])
    assert decided(p, repeated) == "all"
    assert p.explain(repeated, ANYONE).decision.rule == "all"
    # Decided by method and route alone, remembered, then the same for any path.
    p = policy(rule("gets", methods=["GET"]), rule("paths", paths=["/a/**"]))
    for _ in range(2):
        assert decided(p, req("GET", "/zz")) == "gets"
        assert decided(p, req("POST", "/a/b")) == "paths"
        assert decided(p, req("POST", "/zz")) is None
    # No rules at all.
    assert policy().evaluate(req(actions=["iam:X"]), ANYONE).rule is None
    assert not policy().needs_body(req(), ANYONE)


def test_head_cache_is_bounded() -> None:
    p = policy(rule("gets", methods=["GET"]), rule("p", paths=["/a"]))
    plan = p._plan
    for i in range(plan.max_heads + 5):
        assert decided(p, req(f"M{i}", "/a")) == "p"
    assert len(plan.head) <= plan.max_heads
    assert decided(p, req("GET", "/b")) == "gets"


def test_explain_matches_names_each_condition_in_order() -> None:
    p = policy(
        rule(
            "everything",
            "approve",
            methods=["POST"],
            route="aws",
            actions=["iam:Create*"],
            paths=["/**"],
            when={
                "groups": ["agents"],
                "headers": {"X-Env": "prod"},
                "query": {"mode": "a"},
                "json": {"/format": "csv"},
            },
        )
    )
    request = req(
        "POST",
        "/x",
        "aws",
        actions=["iam:CreateRole"],
        headers=[("X-Env", "prod")],
        query="mode=a",
        body=body({"format": "csv"}),
    )
    identity = Identity(subject="a", issuer="i", groups=frozenset({"agents"}))
    explanation = p.explain(request, identity)
    assert explanation.trace[0].reason == (
        "matches: method POST in [POST], route aws, action iam:CreateRole matches iam:Create*, "
        "path /x matches /**, identity in group agents, header X-Env = prod, "
        "query parameter mode = a, JSON /format = csv"
    )
    assert explanation.decision.reason == "rule everything matched (action iam:CreateRole)"


def test_rules_compare_with_mapping_values() -> None:
    # A header named twice in different case: both must hold.
    p = policy(rule("r", when={"headers": {"X-Env": ["a", "b"], "x-env": ["b", "c"]}}))
    assert decided(p, req(headers=[("X-Env", "b")])) == "r"
    assert decided(p, req(headers=[("X-Env", "a")])) is None
    assert decided(p, req(headers=[("X-Env", "c")])) is None
