"""`countersign check` warnings: shadowed rules, unreachable paths, approvers no one can be,
quorums larger than the known approvers, a default that waits for nobody — each exact, none on
the shipped examples or the test configurations, and `--strict` failing on them."""

from __future__ import annotations

import itertools
import os
import random
import re
import subprocess
from pathlib import Path

import pytest

from proxy.check import Finding, config_lines, find_issues
from proxy.config import load_settings, load_settings_text
from proxy.policy import glob_covers, globs_intersect
from tests.e2e.conftest import COUNTERSIGN
from tests.e2e.test_cli import config_text
from tests.helpers import settings_for

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    "CLOUD_TOKEN": "x",
    "GITHUB_TOKEN": "y",
    "REDIS_PASSWORD": "z",
    "AGENT_7_AWS_SECRET": "0123456789abcdef0123",
}

ROUTES = """
routes:
  - {name: cloud, prefix: /cloud/, upstream: "https://cloud.example.com/"}
  - {name: github, prefix: /github/, upstream: "https://api.github.com/"}
"""


def findings(text: str) -> list[Finding]:
    return find_issues(load_settings_text(text, "w.yaml", env={}), config_lines(text))


def rendered(text: str) -> list[str]:
    return [f.render("w.yaml") for f in findings(text)]


def warnings_of(text: str) -> list[str]:
    return [f.render("w.yaml") for f in findings(text) if f.severity == "warning"]


def rules(*lines: str, default: str = "deny", extra: str = "") -> str:
    body = "".join(f"    {line}\n" for line in lines)
    return f"{ROUTES}{extra}policy:\n  default: {default}\n  rules:\n{body}"


# --------------------------------------------------------------------------------------------
# Glob analysis: sound against a reference matcher on every path over a small alphabet


def reference_regex(glob: str) -> re.Pattern[str]:
    pieces = []
    for segment in (s for s in glob.split("/") if s):
        if segment == "**":
            pieces.append("(?:/[^/]+)*")
        elif segment == "*":
            pieces.append("/[^/]+")
        else:
            pieces.append("/" + "[^/]*".join(re.escape(p) for p in segment.split("*")))
    return re.compile("".join(pieces))


ALPHABET = ["a", "b", "ab", "abc", "ac", "x.json", "ba", "zz"]
TOKENS = ["a", "b", "ab", "*", "*", "**", "**", "a*", "*b*", "a*c", "*.json", "x*", "*c"]


def random_glob(rng: random.Random) -> str:
    segments = [rng.choice(TOKENS) for _ in range(rng.randrange(0, 5))]
    segments = [s for i, s in enumerate(segments) if not (s == "**" and segments[i - 1 : i] == [s])]
    return "/" + "/".join(segments)


def test_glob_analysis_is_sound_against_a_reference() -> None:
    paths = [
        "".join("/" + s for s in combo)
        for length in range(5)
        for combo in itertools.product(ALPHABET, repeat=length)
    ]
    rng = random.Random(17)
    globs = sorted({random_glob(rng) for _ in range(400)})
    masks = {}
    for glob in globs:
        rx = reference_regex(glob)
        masks[glob] = sum(1 << i for i, p in enumerate(paths) if rx.fullmatch(p))
    proven = 0
    for outer, inner in itertools.product(globs, repeat=2):
        both = masks[outer] & masks[inner]
        if glob_covers(outer, inner):
            proven += 1
            assert masks[inner] & ~masks[outer] == 0, (outer, inner)
        if not globs_intersect(outer, inner):
            assert both == 0, (outer, inner)
    assert proven > 2000  # and it proves a fair share of what holds


@pytest.mark.parametrize(
    ("outer", "inner", "expected"),
    [
        ("/cloud/**", "/cloud/x", True),
        ("/cloud/**", "/cloud", True),
        ("/cloud/**", "/cloud/**", True),
        ("/cloud/**", "/cloud/*/x/**", True),
        ("/**", "/", True),
        ("/*/**", "/**/x", True),  # "/**/x" needs a segment; "/*/**" matches any non-empty
        ("/**/*.json", "/v1/a*.json", True),
        ("/v1/*", "/v1/a*b", True),
        ("/v1/a*", "/v1/ab*c", True),
        ("/cloud/*", "/cloud/**", False),  # "/cloud" and "/cloud/a/b"
        ("/cloud/**", "/**", False),
        ("/v1/*.json", "/v1/*", False),
        ("/v1/a*", "/v1/*a", False),
        ("/a/b", "/a/*", False),
        ("/*/**", "/**", False),  # "/" is not matched by "/*/**"
    ],
)
def test_glob_covers(outer: str, inner: str, expected: bool) -> None:
    assert glob_covers(outer, inner) is expected


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("/cloud/**", "/clod/**", False),
        ("/clod/**", "/**", True),
        ("/**/x", "/a/**", True),
        ("/a*", "/*b", True),  # "ab"
        ("/a*c", "/b*", False),
        ("/x*.json", "/*.yaml", False),
        ("/a/*", "/a", False),
        ("/a/**", "/a", True),
    ],
)
def test_globs_intersect(first: str, second: str, expected: bool) -> None:
    assert globs_intersect(first, second) is expected


# --------------------------------------------------------------------------------------------
# 1. shadowed rules


def test_catch_all_shadows_everything_after_it() -> None:
    text = rules(
        "- {name: everything, action: allow}",
        "- name: exports",
        "  methods: [POST]",
        "  paths: ['/cloud/exports/**']",
        "  action: approve",
        "  approvers: {users: [alice@example.com]}",
    )
    assert rendered(text) == [
        "warning: w.yaml:9: policy.rules[1]: rule 'exports' can never match: rule 'everything' "
        "(policy.rules[0], line 8) matches every request it would"
    ]


def test_methods_and_globs_cover_a_later_rule() -> None:
    text = rules(
        "- {name: cloud-reads, methods: [GET], paths: ['/cloud/**'], action: allow}",
        "- {name: one, methods: [GET], paths: ['/cloud/x'], action: deny}",
        "- {name: several, methods: [GET], paths: ['/cloud/a/*', '/cloud/**/b.json'], "
        "action: deny}",
    )
    assert rendered(text) == [
        "warning: w.yaml:9: policy.rules[1]: rule 'one' can never match: rule 'cloud-reads' "
        "(policy.rules[0], line 8) matches every request it would",
        "warning: w.yaml:10: policy.rules[2]: rule 'several' can never match: rule "
        "'cloud-reads' (policy.rules[0], line 8) matches every request it would",
    ]


def test_when_conditions_of_the_earlier_rule_implied_by_the_later() -> None:
    text = rules(
        "- {name: agents, when: {groups: [agents, bots], claims: {tier: [gold, silver]}}, "
        "action: deny}",
        "- {name: gold-agents, methods: [PUT], when: {groups: [agents], subjects: [a1], "
        "claims: {tier: gold}}, action: allow}",
    )
    assert [f.key for f in findings(text)] == ["policy.rules[1]"]


def test_route_conditions_cover_by_name_or_by_prefix() -> None:
    text = rules(
        "- {name: cloud-deletes, route: cloud, methods: [DELETE], action: deny}",
        # every path of this rule is routed to cloud: the earlier rule covers it
        "- {name: bucket-deletes, methods: [DELETE], paths: ['/cloud/buckets/**'], action: allow}",
        # the earlier rule covers all of this rule's route
        "- {name: by-route, route: cloud, methods: [DELETE], paths: ['/cloud/x/*'], action: allow}",
    )
    assert [f.key for f in findings(text)] == ["policy.rules[1]", "policy.rules[2]"]
    text = rules(
        "- {name: all-cloud, paths: ['/cloud/**'], action: deny}",
        "- {name: routed, route: cloud, action: allow}",
    )
    assert [f.key for f in findings(text)] == ["policy.rules[1]"]


def test_a_longer_route_prefix_takes_the_paths_away() -> None:
    text = (
        "routes:\n"
        "  - {name: cloud, prefix: /cloud/, upstream: 'https://cloud.example.com/'}\n"
        "  - {name: special, prefix: /cloud/special/, upstream: 'https://s.example.com/'}\n"
        "policy:\n"
        "  rules:\n"
        "    - {name: cloud-deletes, route: cloud, methods: [DELETE], action: deny}\n"
        "    - {name: bucket-deletes, methods: [DELETE], paths: ['/cloud/**'], action: allow}\n"
    )
    assert findings(text) == []


@pytest.mark.parametrize(
    ("earlier", "later"),
    [
        # HEAD is not implied by GET
        ("{name: e, methods: [GET], action: allow}", "{name: l, methods: [HEAD], action: deny}"),
        # any method is not covered by a list, even of every method
        (
            "{name: e, methods: [GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS, TRACE, CONNECT], "
            "action: allow}",
            "{name: l, action: deny}",
        ),
        # one segment does not cover any number
        (
            "{name: e, paths: ['/cloud/*'], action: allow}",
            "{name: l, paths: ['/cloud/**'], action: deny}",
        ),
        # a later glob only partly covered
        (
            "{name: e, paths: ['/cloud/a/**'], action: allow}",
            "{name: l, paths: ['/cloud/a/**', '/cloud/b'], action: deny}",
        ),
        # the earlier rule asks for a group the later does not
        (
            "{name: e, when: {groups: [agents]}, action: allow}",
            "{name: l, methods: [GET], action: deny}",
        ),
        (
            "{name: e, when: {groups: [agents]}, action: allow}",
            "{name: l, when: {groups: [agents, ci]}, action: deny}",
        ),
        (
            "{name: e, when: {subjects: [a]}, action: allow}",
            "{name: l, when: {groups: [a]}, action: deny}",
        ),
        (
            "{name: e, when: {claims: {tier: gold}}, action: allow}",
            "{name: l, when: {claims: {tier: [gold, silver]}}, action: deny}",
        ),
        # another route
        ("{name: e, route: github, action: allow}", "{name: l, route: cloud, action: deny}"),
        # a route, against paths in two routes
        (
            "{name: e, route: cloud, action: allow}",
            "{name: l, paths: ['/cloud/**', '/github/**'], action: deny}",
        ),
    ],
)
def test_no_shadowing_without_proof(earlier: str, later: str) -> None:
    assert findings(rules(f"- {earlier}", f"- {later}")) == []


# --------------------------------------------------------------------------------------------
# 2. paths no route leads to


def test_path_under_no_route_prefix() -> None:
    text = rules(
        "- {name: typo, methods: [DELETE], paths: ['/clod/**', '/cloud/x'], action: deny}",
        "- {name: wrong-route, route: github, paths: ['/cloud/**'], action: deny}",
        "- {name: fine, paths: ['/**/x', '/*/repos'], action: deny}",
    )
    assert rendered(text) == [
        "warning: w.yaml:8: policy.rules[0].paths[0]: rule 'typo': path '/clod/**' is under no "
        "route prefix; no request can reach it",
        "warning: w.yaml:9: policy.rules[1].paths[0]: rule 'wrong-route': path '/cloud/**' is "
        "outside the prefix /github/ of its route 'github'; no request can reach it",
    ]


def test_no_routes_at_all() -> None:
    text = "policy:\n  rules:\n    - {name: r, action: allow}\n"
    assert rendered(text) == [
        "warning: w.yaml:1: routes: no routes are configured: every request is answered 404 "
        "no_route and no rule can ever match"
    ]
    assert findings("identity: {api_keys: []}\n") == []


# --------------------------------------------------------------------------------------------
# 3. and 5. approvers and quorum


ISSUER = "identity:\n  issuers: [{issuer: 'https://idp.example.com', audiences: [cs]}]\n"


def test_approvers_only_tokens_can_name_are_a_note() -> None:
    text = rules(
        "- name: iam",
        "  action: approve",
        "  approvers: {groups: [security, sre]}",
        extra=ISSUER,
    )
    found = findings(text)
    assert [f.render("w.yaml") for f in found] == [
        "note: w.yaml:12: policy.rules[0].approvers: no approver is known from config for "
        "rule 'iam' (groups: security, sre): they must come from tokens' groups claims"
    ]
    assert found[0].severity == "note"
    # a directory member, a user or an API key with an email in the group is known: no note
    for extra in (
        "approvals: {groups: {sre: [bob@example.com]}}\n",
        "identity:\n  issuers: [{issuer: 'https://i', audiences: [cs]}]\n  api_keys:\n"
        f"    - {{sha256: '{'0' * 64}', subject: k, groups: [security], email: k@example.com}}\n",
    ):
        text = rules(
            "- {name: iam, action: approve, approvers: {groups: [security, sre]}}",
            extra=ISSUER + extra if "issuers" not in extra else extra,
        )
        assert findings(text) == [], extra


def test_approvers_no_one_can_be() -> None:
    # no issuer: only the config names identities, and it names no member of the group
    text = rules(
        "- name: iam",
        "  action: approve",
        "  approvers: {groups: [security]}",
        extra=f"identity:\n  api_keys:\n    - {{sha256: '{'0' * 64}', subject: k, "
        "groups: [security]}\n",  # a key without an email is no person: it cannot decide
    )
    assert rendered(text) == [
        "warning: w.yaml:13: policy.rules[0].approvers: no one can approve rule 'iam': no "
        "member of groups [security] is known from approvals.groups, identity.api_keys or "
        "users, and no issuer is configured whose tokens could name one; every request it "
        "holds will expire"
    ]
    text = rules("- {name: r, action: approve, approvers: {users: [alice]}}", extra=ISSUER)
    assert rendered(text) == [
        "warning: w.yaml:10: policy.rules[0].approvers.users[0]: rule 'r': approver 'alice' is "
        "not an email address; approvers are recognized by email, so no one can act as them",
        "warning: w.yaml:10: policy.rules[0].approvers: no one can approve rule 'r': none of "
        "its users is an email address; every request it holds will expire",
    ]


def test_quorum_larger_than_the_known_approvers() -> None:
    text = rules(
        "- name: iam",
        "  action: approve",
        "  approvers: {users: [alice@example.com, Alice+ops@example.com, bob@example.com]}",
        "  quorum: 3",
        extra=ISSUER,  # users only: tokens add no one
    )
    assert rendered(text) == [
        "warning: w.yaml:13: policy.rules[0].quorum: rule 'iam' needs quorum 3 but only 2 "
        "approvers are known"
    ]
    # no issuer: the directory and the API keys are every approver there is
    text = rules(
        "- {name: iam, action: approve, approvers: {groups: [sec]}, quorum: 2}",
        extra="approvals: {groups: {sec: [carol@example.com]}}\n",
    )
    assert rendered(text) == [
        "warning: w.yaml:9: policy.rules[0].quorum: rule 'iam' needs quorum 2 but only 1 "
        "approver is known"
    ]
    # with an issuer, tokens' groups claims may bring more: no warning
    text = rules(
        "- {name: iam, action: approve, approvers: {groups: [sec]}, quorum: 2}",
        extra=ISSUER + "approvals: {groups: {sec: [carol@example.com]}}\n",
    )
    assert findings(text) == []


# --------------------------------------------------------------------------------------------
# 4. default approve


def test_default_approve() -> None:
    text = rules("- {name: r, methods: [GET], action: allow}", default="approve")
    assert rendered(text) == [
        "warning: w.yaml:6: policy.default: every request no rule matches will wait for "
        "approval and has no approvers: answered 503"
    ]


# --------------------------------------------------------------------------------------------
# No false positives


def test_no_warnings_on_the_shipped_examples() -> None:
    for path in [*sorted((ROOT / "config").glob("*.yaml")), ROOT / "deploy" / "countersign.yaml"]:
        settings = load_settings(path, env=ENV)
        found = find_issues(settings, config_lines(path.read_text()))
        assert [f for f in found if f.severity == "warning"] == [], path
    example = ROOT / "config" / "countersign.example.yaml"
    found = find_issues(load_settings(example, env=ENV))
    assert [f.key for f in found] == ["policy.rules[2].approvers"]  # security: from tokens


def test_no_findings_on_the_test_configs() -> None:
    assert find_issues(settings_for("http://127.0.0.1:1")) == []
    text = config_text(8080, "https://cloud.example.com/", "https://idp.example.com")
    found = find_issues(load_settings_text(text, "c.yaml", env={}))
    assert [(f.severity, f.key) for f in found] == [("note", "policy.rules[1].approvers")]
    # Without an issuer nothing can name a data-owner there: that one is a real warning.
    text = config_text(8080, "https://cloud.example.com/")
    found = find_issues(load_settings_text(text, "c.yaml", env={}))
    assert [(f.severity, f.key) for f in found] == [("warning", "policy.rules[1].approvers")]


# --------------------------------------------------------------------------------------------
# The command


def check(path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COUNTERSIGN, "check", "-c", str(path), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **ENV},
    )


def test_check_prints_warnings_after_ok_and_strict_fails(tmp_path: Path) -> None:
    config = tmp_path / "w.yaml"
    config.write_text(
        rules(
            "- {name: everything, action: allow}",
            "- {name: later, methods: [GET], action: deny}",
        )
    )
    result = check(config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{config}: OK — ")
    assert lines[1:] == [
        f"warning: {config}:9: policy.rules[1]: rule 'later' can never match: rule 'everything' "
        "(policy.rules[0], line 8) matches every request it would"
    ]
    result = check(config, "--strict")
    assert result.returncode == 2
    assert result.stdout.splitlines()[1:] == lines[1:]
    assert result.stderr.strip() == f"{config}: 1 warning(s); failing because of --strict"


def test_strict_passes_clean_configs_and_notes(tmp_path: Path) -> None:
    for path in [*sorted((ROOT / "config").glob("*.yaml")), ROOT / "deploy" / "countersign.yaml"]:
        result = check(path, "--strict")
        assert result.returncode == 0, (path, result.stdout, result.stderr)
    result = check(ROOT / "config" / "countersign.example.yaml", "--strict")
    assert "note: " in result.stdout and "warning: " not in result.stdout
    config = tmp_path / "ok.yaml"
    config.write_text(rules("- {name: reads, methods: [GET], action: allow}"))
    result = check(config, "--strict")
    assert result.returncode == 0
    assert len(result.stdout.splitlines()) == 1
