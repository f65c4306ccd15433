"""Policy: glob semantics, rule conditions, first match, default, explain, and agreement of the
compiled matcher with a naive reference implementation."""

from __future__ import annotations

import random
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from proxy.config import ApproversSettings, PolicySettings, RuleSettings, WhenSettings
from proxy.model import Action, Decision, Identity, RequestInfo
from proxy.policy import Explanation, Policy, PolicyError, RuleTrace
from proxy.policy.globs import Trie

APPROVERS = ApproversSettings(groups=("data-owners",))


def rule(
    name: str,
    action: Action = Action.ALLOW,
    *,
    methods: Sequence[str] = (),
    paths: Sequence[str] = (),
    route: str | None = None,
    when: WhenSettings | None = None,
) -> RuleSettings:
    return RuleSettings(
        name=name,
        action=action,
        methods=tuple(methods),
        paths=tuple(paths),
        route=route,
        when=when,
        approvers=APPROVERS if action is Action.APPROVE else None,
    )


def policy(*rules: RuleSettings, default: Action = Action.DENY) -> Policy:
    return Policy.compile(PolicySettings(default=default, rules=tuple(rules)))


def req(method: str = "GET", path: str = "/", route: str | None = None) -> RequestInfo:
    return RequestInfo(method=method, path=path, route=route)


def ident(
    subject: str = "agent-1",
    groups: Sequence[str] = (),
    claims: Mapping[str, Any] | None = None,
) -> Identity:
    return Identity(
        subject=subject,
        issuer="https://idp.example",
        groups=frozenset(groups),
        claims=dict(claims or {}),
    )


ANYONE = ident()


# --------------------------------------------------------------------------------------------
# Glob semantics


GLOBS = [
    # ** matches any number of segments, including zero
    ("/cloud/exports/**", "/cloud/exports", True),
    ("/cloud/exports/**", "/cloud/exports/", True),
    ("/cloud/exports/**", "/cloud/exports/x", True),
    ("/cloud/exports/**", "/cloud/exports/x/y", True),
    ("/cloud/exports/**", "/cloud/exports/x/y/", True),
    ("/cloud/exports/**", "/cloud/export", False),
    ("/cloud/exports/**", "/cloud/exportsx", False),
    ("/cloud/exports/**", "/cloud/exports-x/y", False),
    ("/cloud/exports/**", "/cloud", False),
    ("/cloud/exports/**", "/other/cloud/exports", False),
    ("/a/**/c", "/a/c", True),
    ("/a/**/c", "/a/b/c", True),
    ("/a/**/c", "/a/b/d/c", True),
    ("/a/**/c", "/a/c/c", True),
    ("/a/**/c", "/a/b", False),
    ("/a/**/c", "/a/c/d", False),
    ("/**", "/", True),
    ("/**", "/x", True),
    ("/**", "/x/y/", True),
    ("/**/admin", "/admin", True),
    ("/**/admin", "/x/admin", True),
    ("/**/admin", "/x/y/admin/", True),
    ("/**/admin", "/admin/x", False),
    ("/**/admin", "/xadmin", False),
    ("/**/x/**", "/x", True),
    ("/**/x/**", "/a/x/b/c", True),
    ("/**/x/**", "/a/b", False),
    ("/a/**/**", "/a", True),
    ("/a/**/**", "/a/b/c", True),
    ("/a/**/b/**/c", "/a/b/c", True),
    ("/a/**/b/**/c", "/a/x/b/y/z/c", True),
    ("/a/**/b/**/c", "/a/x/c", False),
    # * matches exactly one non-empty segment
    ("/a/*", "/a/b", True),
    ("/a/*", "/a/b/", True),  # one trailing slash is ignored
    ("/a/*", "/a", False),
    ("/a/*", "/a/", False),
    ("/a/*", "/a/b/c", False),
    ("/a/*/c", "/a/b/c", True),
    ("/a/*/c", "/a/c", False),
    ("/a/*/c", "/a/b/x/c", False),
    ("/*", "/", False),
    ("/*", "/a", True),
    ("/*", "/a/", True),
    ("/*", "/a/b", False),
    ("/*/*", "/a", False),
    ("/*/*", "/a/b", True),
    # * inside a segment: a one-segment wildcard part
    ("/v1/*.json", "/v1/x.json", True),
    ("/v1/*.json", "/v1/.json", True),
    ("/v1/*.json", "/v1/x.jsonx", False),
    ("/v1/*.json", "/v1/a/x.json", False),
    ("/v1/*.json", "/v1/x.JSON", False),
    ("/v1/user-*-x", "/v1/user-1-x", True),
    ("/v1/user-*-x", "/v1/user--x", True),
    ("/v1/user-*-x", "/v1/user-1-y", False),
    ("/v1/a*b*c", "/v1/abc", True),
    ("/v1/a*b*c", "/v1/aXbYc", True),
    ("/v1/a*b*c", "/v1/acb", False),
    ("/a*", "/ab", True),
    ("/a*", "/a", True),
    ("/a*", "/a/b", False),
    # literal text: exact, case-sensitive, regex characters are literal
    ("/Cloud/x", "/Cloud/x", True),
    ("/Cloud/x", "/cloud/x", False),
    ("/a.b/c", "/a.b/c", True),
    ("/a.b/c", "/aXb/c", False),
    ("/f/[x]?+(y)", "/f/[x]?+(y)", True),
    ("/f/[x]?+(y)", "/f/x", False),
    ("/café/*", "/café/x", True),
    ("/a b/*", "/a b/c", True),
    # trailing slashes
    ("/a/b", "/a/b/", True),
    ("/a/b/", "/a/b", True),
    ("/a/b/", "/a/b/", True),
    ("/a/b", "/a/b/c", False),
    ("/", "/", True),
    ("/", "/a", False),
]


@pytest.mark.parametrize(("glob", "path", "expected"), GLOBS)
def test_glob(glob: str, path: str, expected: bool) -> None:
    p = policy(rule("r", paths=[glob]))
    assert (p.evaluate(req(path=path), ANYONE).rule == "r") is expected
    assert (p.path_candidates(path) == ["r"]) is expected


@pytest.mark.parametrize(("glob", "path", "expected"), GLOBS)
def test_glob_agrees_with_reference(glob: str, path: str, expected: bool) -> None:
    assert reference_glob_match(glob, path) is expected


def test_any_of_several_globs() -> None:
    p = policy(rule("r", paths=["/a/**", "/b/*"]))
    assert p.evaluate(req(path="/a/x/y"), ANYONE).rule == "r"
    assert p.evaluate(req(path="/b/x"), ANYONE).rule == "r"
    assert p.evaluate(req(path="/b/x/y"), ANYONE).rule is None
    assert p.evaluate(req(path="/c"), ANYONE).rule is None


def test_empty_paths_match_any_path() -> None:
    p = policy(rule("r"))
    for path in ["/", "/a", "/a/b/c/", "/x.json"]:
        assert p.evaluate(req(path=path), ANYONE).rule == "r"


def test_empty_segments_are_segments_only_double_star_absorbs() -> None:
    # Paths keep '//' only on a route with merge_slashes: false; there an empty segment is a
    # real segment (tests/test_policy_conditions.py has more).
    p = policy(rule("r", paths=["/a/*"]))
    assert p.evaluate(req(path="/a//b"), ANYONE).rule is None
    assert p.evaluate(req(path="//a/b"), ANYONE).rule is None
    assert p.evaluate(req(path="/a/b/"), ANYONE).rule == "r"
    p = policy(rule("r", paths=["/a/**"]))
    assert p.evaluate(req(path="/a//b"), ANYONE).rule == "r"


@pytest.mark.parametrize(
    ("glob", "message"),
    [
        ("/a//b", "empty segment"),
        ("/a/../b", "'..' segment"),
        ("/a/./b", "'.' segment"),
        ("/a**", "whole path segment"),
        ("/a/**b", "whole path segment"),
        ("/a/***", "whole path segment"),
    ],
)
def test_malformed_glob(glob: str, message: str) -> None:
    # The config refuses it (so `countersign check` names file and line) ...
    with pytest.raises(ValueError, match=message):
        rule("bad-rule", paths=["/ok", glob])
    # ... and compile refuses it too, for settings built without validation.
    unchecked = RuleSettings.model_construct(
        name="bad-rule",
        action=Action.ALLOW,
        methods=(),
        paths=("/ok", glob),
        route=None,
        when=None,
        approvers=None,
        quorum=1,
        timeout_seconds=None,
    )
    with pytest.raises(PolicyError, match=message) as info:
        policy(unchecked)
    assert "bad-rule" in str(info.value)
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------------------------
# Methods, routes, order, default


def test_methods() -> None:
    p = policy(rule("reads", methods=["GET"]), rule("writes", methods=["POST", "PUT"]))
    assert p.evaluate(req("GET"), ANYONE).rule == "reads"
    assert p.evaluate(req("POST"), ANYONE).rule == "writes"
    assert p.evaluate(req("PUT"), ANYONE).rule == "writes"
    assert p.evaluate(req("DELETE"), ANYONE).rule is None
    assert p.evaluate(req("PROPFIND"), ANYONE).rule is None


def test_head_is_not_implied_by_get() -> None:
    p = policy(rule("reads", methods=["GET"]))
    assert p.evaluate(req("HEAD"), ANYONE).rule is None
    p = policy(rule("reads", methods=["GET", "HEAD"]))
    assert p.evaluate(req("HEAD"), ANYONE).rule == "reads"


def test_empty_methods_match_any_method() -> None:
    p = policy(rule("any"))
    for method in ["GET", "HEAD", "POST", "DELETE", "PROPFIND"]:
        assert p.evaluate(req(method), ANYONE).rule == "any"


def test_request_method_is_compared_upper_case() -> None:
    p = policy(rule("no-deletes", Action.DENY, methods=["DELETE"]), default=Action.ALLOW)
    assert p.evaluate(req("delete"), ANYONE).action is Action.DENY


def test_route() -> None:
    p = policy(rule("cloud-only", route="cloud"))
    assert p.evaluate(req(route="cloud"), ANYONE).rule == "cloud-only"
    assert p.evaluate(req(route="db"), ANYONE).rule is None
    assert p.evaluate(req(route=None), ANYONE).rule is None
    p = policy(rule("any-route"))
    assert p.evaluate(req(route=None), ANYONE).rule == "any-route"
    assert p.evaluate(req(route="db"), ANYONE).rule == "any-route"


def test_first_match_wins() -> None:
    a = rule("a", Action.DENY, paths=["/x/**"])
    b = rule("b", Action.ALLOW, paths=["/x/y"])
    assert policy(a, b).evaluate(req(path="/x/y"), ANYONE) == Decision(
        Action.DENY, "a", "rule a matched"
    )
    assert policy(b, a).evaluate(req(path="/x/y"), ANYONE) == Decision(
        Action.ALLOW, "b", "rule b matched"
    )


def test_later_rule_applies_when_earlier_conditions_fail() -> None:
    p = policy(
        rule("a", methods=["GET"], paths=["/x/**"]),
        rule("b", Action.APPROVE, route="cloud", paths=["/x/*"]),
        rule("c", Action.DENY),
    )
    assert p.evaluate(req("POST", "/x/y", "cloud"), ANYONE).rule == "b"
    assert p.evaluate(req("POST", "/x/y/z", "cloud"), ANYONE).rule == "c"
    assert p.evaluate(req("GET", "/x/y/z", "cloud"), ANYONE).rule == "a"


@pytest.mark.parametrize("default", list(Action))
def test_default(default: Action) -> None:
    p = policy(rule("r", methods=["GET"]), default=default)
    assert p.evaluate(req("POST"), ANYONE) == Decision(
        action=default, rule=None, reason=f"no rule matched; default {default.value}"
    )


def test_no_rules_at_all() -> None:
    p = policy()
    assert p.evaluate(req(), ANYONE) == Decision(Action.DENY, None, "no rule matched; default deny")
    assert p.explain(req(), ANYONE).trace == []


def test_rule_lookup_and_attributes() -> None:
    exports = rule("exports", Action.APPROVE, methods=["POST"])
    p = policy(exports, default=Action.ALLOW)
    assert p.rule("exports") is exports
    assert p.rules == (exports,)
    assert p.default is Action.ALLOW
    with pytest.raises(KeyError):
        p.rule("missing")


# --------------------------------------------------------------------------------------------
# when: groups, subjects, claims


def test_when_groups_any_of() -> None:
    p = policy(rule("r", when=WhenSettings(groups=("agents", "ci"))))
    assert p.evaluate(req(), ident(groups=["agents"])).rule == "r"
    assert p.evaluate(req(), ident(groups=["x", "ci"])).rule == "r"
    assert p.evaluate(req(), ident(groups=["x"])).rule is None
    assert p.evaluate(req(), ident()).rule is None


def test_when_subjects() -> None:
    p = policy(rule("r", when=WhenSettings(subjects=("agent-ci", "agent-bot"))))
    assert p.evaluate(req(), ident("agent-ci")).rule == "r"
    assert p.evaluate(req(), ident("agent-bot")).rule == "r"
    assert p.evaluate(req(), ident("agent-other")).rule is None


@pytest.mark.parametrize(
    ("required", "claims", "expected"),
    [
        ({"tier": "gold"}, {"tier": "gold"}, True),
        ({"tier": "gold"}, {"tier": "silver"}, False),
        ({"tier": "gold"}, {}, False),  # missing claim: no match
        ({"tier": "gold"}, {"tier": None}, False),
        ({"tier": ("gold", "platinum")}, {"tier": "platinum"}, True),
        ({"tier": ("gold", "platinum")}, {"tier": "silver"}, False),
        ({"roles": "admin"}, {"roles": ["reader", "admin"]}, True),  # list claim: any overlap
        ({"roles": ("admin", "owner")}, {"roles": ["reader", "owner"]}, True),
        ({"roles": "admin"}, {"roles": ["reader"]}, False),
        ({"roles": "admin"}, {"roles": []}, False),
        ({"act.sub": "alice"}, {"act": {"sub": "alice"}}, True),  # dotted path
        ({"act.sub": "alice"}, {"act": {"sub": "bob"}}, False),
        ({"act.sub": "alice"}, {"act": "alice"}, False),
        ({"act.sub": "alice"}, {"act": {}}, False),
        ({"a.b.c": "x"}, {"a": {"b": {"c": "x"}}}, True),
        ({"https://ex.io/role": "admin"}, {"https://ex.io/role": "admin"}, True),  # literal key
        ({"level": "3"}, {"level": 3}, True),  # integers compare by their text
        ({"email_verified": "true"}, {"email_verified": True}, True),
        ({"email_verified": "true"}, {"email_verified": False}, False),
        ({"level": "3"}, {"level": 3.0}, False),
        ({"org": "x"}, {"org": {"id": "x"}}, False),  # an object is never equal to a string
        ({"tier": "gold", "region": "eu"}, {"tier": "gold", "region": "eu"}, True),  # all
        ({"tier": "gold", "region": "eu"}, {"tier": "gold", "region": "us"}, False),
        ({"tier": "gold", "region": "eu"}, {"tier": "gold"}, False),
    ],
)
def test_when_claims(required: dict[str, Any], claims: dict[str, Any], expected: bool) -> None:
    p = policy(rule("r", when=WhenSettings(claims=required)))
    assert (p.evaluate(req(), ident(claims=claims)).rule == "r") is expected
    assert (p.explain(req(), ident(claims=claims)).decision.rule == "r") is expected


def test_when_conditions_all_must_hold() -> None:
    when = WhenSettings(groups=("agents",), subjects=("agent-1",), claims={"tier": "gold"})
    p = policy(rule("r", when=when))
    ok = ident("agent-1", ["agents"], {"tier": "gold"})
    assert p.evaluate(req(), ok).rule == "r"
    assert p.evaluate(req(), ident("agent-2", ["agents"], {"tier": "gold"})).rule is None
    assert p.evaluate(req(), ident("agent-1", ["ci"], {"tier": "gold"})).rule is None
    assert p.evaluate(req(), ident("agent-1", ["agents"], {"tier": "silver"})).rule is None


def test_empty_when_matches_everyone() -> None:
    p = policy(rule("r", when=WhenSettings()))
    assert p.evaluate(req(), ident()).rule == "r"


def test_identity_condition_on_an_earlier_rule_lets_a_later_one_match() -> None:
    p = policy(
        rule("agents-only", Action.APPROVE, when=WhenSettings(groups=("agents",))),
        rule("fallback", Action.DENY),
    )
    assert p.evaluate(req(), ident(groups=["agents"])).rule == "agents-only"
    assert p.evaluate(req(), ident(groups=["ci"])).rule == "fallback"


# --------------------------------------------------------------------------------------------
# explain


def example_policy() -> Policy:
    return policy(
        rule("reads", methods=["GET", "HEAD"]),
        rule(
            "exports",
            Action.APPROVE,
            route="cloud",
            methods=["POST"],
            paths=["/cloud/exports/**"],
            when=WhenSettings(groups=("agents",)),
        ),
        rule("bots", Action.ALLOW, when=WhenSettings(subjects=("bot-1",))),
        rule("gold", Action.ALLOW, when=WhenSettings(claims={"tier": ("gold", "platinum")})),
        rule("no-deletes", Action.DENY, methods=["DELETE"]),
    )


def reasons(explanation: Explanation) -> list[tuple[str, bool, str]]:
    return [(t.rule, t.matched, t.reason) for t in explanation.trace if t.evaluated]


def test_explain_trace_texts() -> None:
    p = example_policy()
    e = p.explain(req("DELETE", "/cloud/x", "db"), ident(groups=["ci"], claims={"tier": "x"}))
    assert reasons(e) == [
        ("reads", False, "method DELETE not in [GET, HEAD]"),
        ("exports", False, "method DELETE not in [POST]"),
        ("bots", False, "subject agent-1 not in [bot-1]"),
        ("gold", False, "claim tier is [x], not in [gold, platinum]"),
        ("no-deletes", True, "matches: method DELETE in [DELETE]"),
    ]
    assert e.decision == Decision(Action.DENY, "no-deletes", "rule no-deletes matched")


def test_explain_route_path_and_groups() -> None:
    p = example_policy()
    e = p.explain(req("POST", "/cloud/exports/1", "db"), ident())
    assert reasons(e)[1] == ("exports", False, "route db is not cloud")
    e = p.explain(req("POST", "/cloud/exports/1", None), ident())
    assert reasons(e)[1] == (
        "exports",
        False,
        "request matched no route; rule is for route cloud",
    )
    e = p.explain(req("POST", "/cloud/x", "cloud"), ident())
    assert reasons(e)[1] == ("exports", False, "path /cloud/x does not match /cloud/exports/**")
    e = p.explain(req("POST", "/cloud/exports/1", "cloud"), ident(groups=["ci", "bots"]))
    assert reasons(e)[1] == (
        "exports",
        False,
        "identity not in groups [agents] (has [bots, ci])",
    )
    e = p.explain(req("POST", "/cloud/exports/1", "cloud"), ident())
    assert reasons(e)[1] == ("exports", False, "identity not in groups [agents] (has no groups)")
    assert reasons(e)[3] == ("gold", False, "claim tier is missing (needs [gold, platinum])")


def test_explain_match_details_and_skipped_rules() -> None:
    p = example_policy()
    e = p.explain(req("POST", "/cloud/exports/1", "cloud"), ident(groups=["agents"]))
    assert e.decision.rule == "exports"
    assert reasons(e) == [
        ("reads", False, "method POST not in [GET, HEAD]"),
        (
            "exports",
            True,
            "matches: method POST in [POST], route cloud, "
            "path /cloud/exports/1 matches /cloud/exports/**, identity in group agents",
        ),
    ]
    skipped = [t for t in e.trace if not t.evaluated]
    assert [t.rule for t in skipped] == ["bots", "gold", "no-deletes"]
    assert all(not t.matched for t in skipped)
    assert skipped[0] == RuleTrace("bots", False, "not evaluated (an earlier rule matched)", False)


def test_explain_other_match_details() -> None:
    p = example_policy()
    e = p.explain(req("POST", "/x"), ident("bot-1"))
    assert reasons(e)[-1] == ("bots", True, "matches: subject bot-1")
    e = p.explain(req("POST", "/x"), ident(claims={"tier": ["silver", "platinum"]}))
    assert reasons(e)[-1] == ("gold", True, "matches: claim tier = platinum")
    e = policy(rule("all")).explain(req(), ident())
    assert reasons(e) == [("all", True, "matches (no conditions)")]


def test_explain_several_globs() -> None:
    p = policy(rule("r", paths=["/a/*", "/b/**", "/**/c"]))
    e = p.explain(req(path="/x"), ident())
    assert reasons(e) == [("r", False, "path /x does not match any of [/a/*, /b/**, /**/c]")]
    e = p.explain(req(path="/b/c"), ident())  # matches /b/** and /**/c: the first listed is shown
    assert reasons(e) == [("r", True, "matches: path /b/c matches /b/**")]


def test_explain_default() -> None:
    p = example_policy()
    e = p.explain(req("POST", "/x"), ident())
    assert e.decision == Decision(Action.DENY, None, "no rule matched; default deny")
    assert all(t.evaluated and not t.matched for t in e.trace)
    assert len(e.trace) == 5


def test_explain_render() -> None:
    p = example_policy()
    text = p.explain(req("GET", "/cloud/x", "cloud"), ident()).render()
    lines = text.splitlines()
    assert lines[0].split() == [
        "1.",
        "reads",
        "MATCH",
        "matches:",
        "method",
        "GET",
        "in",
        "[GET,",
        "HEAD]",
    ]
    assert "4 later rule(s) not evaluated" in lines[1]
    assert lines[-1] == "decision: allow (rule reads): rule reads matched"
    text = p.explain(req("POST", "/x"), ident()).render()
    assert "no rule matched; default deny" in text.splitlines()[-1]
    assert "(no rule)" in text.splitlines()[-1]


# --------------------------------------------------------------------------------------------
# The compiled matcher agrees with a naive reference


def reference_glob_regex(glob: str) -> re.Pattern[str]:
    pieces = []
    for segment in (s for s in glob.split("/") if s):
        if segment == "**":
            pieces.append("(?:/[^/]+)*")
        elif segment == "*":
            pieces.append("/[^/]+")
        else:
            pieces.append("/" + "[^/]*".join(re.escape(p) for p in segment.split("*")))
    return re.compile("".join(pieces))


def reference_glob_match(glob: str, path: str) -> bool:
    judged = path[:-1] if path.endswith("/") else path  # "/" → ""
    return reference_glob_regex(glob).fullmatch(judged) is not None


def reference_claim_ok(claims: Mapping[str, Any], claim: str, accepted: Any) -> bool:
    wanted = {accepted} if isinstance(accepted, str) else set(accepted)
    value: Any = claims
    for part in claim.split("."):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    values = value if isinstance(value, list) else [value]
    return any(isinstance(v, str) and v in wanted for v in values)


def reference_evaluate(
    rules: Sequence[RuleSettings], default: Action, request: RequestInfo, identity: Identity
) -> str | None:
    for r in rules:
        if r.methods and request.method not in r.methods:
            continue
        if r.route is not None and r.route != request.route:
            continue
        if r.paths and not any(reference_glob_match(g, request.path) for g in r.paths):
            continue
        w = r.when
        if w is not None:
            if w.groups and not identity.groups.intersection(w.groups):
                continue
            if w.subjects and identity.subject not in w.subjects:
                continue
            if not all(reference_claim_ok(identity.claims, c, v) for c, v in w.claims.items()):
                continue
        return r.name
    return None


SEGMENTS = ["a", "b", "c", "ab", "v1", "x.json", "y.json", "abc", "ba"]
GLOB_SEGMENTS = [*SEGMENTS, "*", "*", "**", "**", "a*", "*.json", "*b*", "x*", "a*c"]


def random_glob(rng: random.Random) -> str:
    segments = [rng.choice(GLOB_SEGMENTS) for _ in range(rng.randrange(0, 5))]
    segments = [s for i, s in enumerate(segments) if not (s == "**" and segments[i - 1 : i] == [s])]
    return "/" + "/".join(segments) + ("/" if segments and rng.random() < 0.1 else "")


def random_path(rng: random.Random) -> str:
    segments = [rng.choice([*SEGMENTS, "zz", "json", "q.json"]) for _ in range(rng.randrange(6))]
    return "/" + "/".join(segments) + ("/" if segments and rng.random() < 0.3 else "")


def test_trie_agrees_with_reference_matcher() -> None:
    rng = random.Random(1234)
    globs = [[random_glob(rng) for _ in range(rng.choice([1, 1, 2]))] for _ in range(600)]
    rules = [rule(f"r{i}", paths=g) for i, g in enumerate(globs)]
    p = policy(*rules)
    regexes = [[reference_glob_regex(g) for g in gs] for gs in globs]
    matched_any = 0
    for _ in range(2500):
        path = random_path(rng)
        judged = path[:-1] if path.endswith("/") else path
        expected = [
            f"r{i}" for i, rxs in enumerate(regexes) if any(rx.fullmatch(judged) for rx in rxs)
        ]
        assert p.path_candidates(path) == expected, path
        assert p.evaluate(req(path=path), ANYONE).rule == (expected[0] if expected else None)
        matched_any += bool(expected)
    assert matched_any > 1000


def random_rule(rng: random.Random, index: int) -> RuleSettings:
    when = None
    if rng.random() < 0.6:
        claims: dict[str, str | tuple[str, ...]] = {}
        if rng.random() < 0.3:
            tiers: list[str | tuple[str, ...]] = ["gold", ("gold", "silver")]
            claims["tier"] = rng.choice(tiers)
        if rng.random() < 0.2:
            claims["act.sub"] = rng.choice(["alice", "bob"])
        when = WhenSettings(
            groups=tuple(rng.sample(["agents", "ci", "ops", "data"], rng.randrange(3))),
            subjects=tuple(rng.sample(["agent-1", "agent-2", "bot"], rng.choice([0, 0, 1, 2]))),
            claims=claims,
        )
    methods = rng.sample(["GET", "HEAD", "POST", "PUT", "DELETE"], rng.choice([0, 1, 1, 2]))
    paths = [random_glob(rng) for _ in range(rng.choice([0] + [1] * 10 + [2] * 5))]
    if not paths or "**" in paths[0]:
        methods = methods or [rng.choice(["GET", "POST"])]  # no catch-all shadowing the rest
    return rule(
        f"r{index}",
        rng.choice(list(Action)),
        methods=methods,
        paths=paths,
        route=rng.choice([None, "cloud", "db"]),
        when=when,
    )


def random_identity(rng: random.Random) -> Identity:
    claims: dict[str, Any] = {}
    if rng.random() < 0.5:
        claims["tier"] = rng.choice(["gold", "silver", "bronze", ["silver", "gold"], ["x"]])
    if rng.random() < 0.5:
        claims["act"] = {"sub": rng.choice(["alice", "bob", "carol"])}
    return ident(
        rng.choice(["agent-1", "agent-2", "bot", "other"]),
        rng.sample(["agents", "ci", "ops", "data", "misc"], rng.randrange(4)),
        claims,
    )


def check_full_agreement(rng: random.Random, p: Policy, rules: list[RuleSettings]) -> None:
    outcomes: dict[str, int] = {"default": 0, "first 20 rules": 0, "later rules": 0}
    for n in range(3000):
        request = req(
            rng.choice(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"]),
            random_path(rng),
            rng.choice([None, "cloud", "db", "other"]),
        )
        identity = random_identity(rng)
        expected = reference_evaluate(rules, Action.DENY, request, identity)
        decision = p.evaluate(request, identity)
        assert decision.rule == expected, (request, identity)
        if expected is not None:
            assert decision.action is p.rule(expected).action
        if n % 10 == 0:
            assert p.explain(request, identity).decision == decision
        if expected is None:
            outcomes["default"] += 1
        else:
            outcomes["first 20 rules" if int(expected[1:]) < 20 else "later rules"] += 1
    assert min(outcomes.values()) > 300, outcomes  # the generator covers all three outcomes


def test_evaluate_agrees_with_reference_evaluator() -> None:
    rng = random.Random(1234)
    rules = [random_rule(rng, i) for i in range(400)]
    check_full_agreement(rng, policy(*rules), rules)


def test_agreement_survives_state_cache_resets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Trie, "max_states", 3)
    rng = random.Random(4321)
    rules = [random_rule(rng, i) for i in range(200)]
    check_full_agreement(rng, policy(*rules), rules)


def test_policy_modules_import_no_io_libraries() -> None:
    code = (
        "import sys, proxy.policy, proxy.paths, proxy.routing; "
        "bad = [m for m in ('aiohttp', 'redis', 'slack_bolt', 'asyncio') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
