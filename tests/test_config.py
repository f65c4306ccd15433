"""Configuration: YAML → frozen typed settings, with errors naming file, key and line."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from proxy.config import ConfigError, Settings, load_settings_text
from proxy.model import Action


def errors_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings_text(text, "c.yaml", env=env or {})
    return [str(issue) for issue in info.value.issues]


def test_empty_file_gives_closed_defaults() -> None:
    settings = load_settings_text("", "c.yaml", env={})
    assert settings.policy.default is Action.DENY
    assert settings.store.url == "memory://"
    assert settings.server.listen == "127.0.0.1:8080"
    assert settings.routes == ()


def test_full_example_loads_into_typed_frozen_settings() -> None:
    settings = load_settings_text(
        """
server: {listen: "0.0.0.0:9000", trusted_proxies: ["10.0.0.0/8"]}
identity:
  issuers: [{issuer: "https://idp", audiences: [cs], algorithms: [ES256]}]
routes:
  - {name: cloud, prefix: /cloud/, upstream: "https://c/", inject_headers: {X-Token: "${T}"}}
policy:
  rules:
    - {name: exports, route: cloud, methods: [post], action: approve,
       approvers: {users: [alice@example.com]}, quorum: 2}
approvals: {mode: async, groups: {owners: [a@example.com]}}
""",
        "c.yaml",
        env={"T": "secret"},
    )
    assert isinstance(settings, Settings)
    assert settings.server.port == 9000 and settings.server.host == "0.0.0.0"
    assert settings.routes[0].inject_headers["X-Token"] == "secret"
    rule = settings.policy.rules[0]
    assert rule.methods == ("POST",) and rule.quorum == 2 and rule.action is Action.APPROVE
    assert settings.approvals.mode == "async"
    with pytest.raises(ValidationError):
        settings.server.listen = "x"  # type: ignore[misc]


def test_env_interpolation_with_default_and_missing_variable() -> None:
    text = 'routes: [{name: a, prefix: /a/, upstream: "${UP:-http://localhost:1}/"}]'
    assert load_settings_text(text, "c.yaml", env={}).routes[0].upstream == "http://localhost:1/"
    assert load_settings_text(text, "c.yaml", env={"UP": "https://x"}).routes[0].upstream == (
        "https://x/"
    )
    assert errors_of("store:\n  url: ${STORE_URL}\n") == [
        "c.yaml:2: store.url: environment variable STORE_URL is not set"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("serve: {}\n", "c.yaml:1: serve: unknown key; did you mean 'server'?"),
        (
            "server:\n  listen: 8080\n",
            "c.yaml:2: server.listen: expected a string, got a number (8080); put it in quotes",
        ),
        (
            "server:\n  max_body_bytes: -1\n",
            "c.yaml:2: server.max_body_bytes: must be a whole number of bytes greater than 0, got -1",
        ),
        (
            "server:\n  trusted_proxies: [lan]\n",
            "c.yaml:2: server.trusted_proxies: not an IP address or CIDR network: 'lan'",
        ),
        (
            "identity:\n  issuers:\n    - issuer: https://i\n      audiences: [a]\n      algorithms: [HS256]\n",
            "c.yaml:5: identity.issuers[0].algorithms: algorithm 'HS256' is never accepted (HS* and none are refused)",
        ),
        (
            "identity:\n  issuers:\n    - {issuer: https://i, audiences: [a], algorithms: [none]}\n",
            "c.yaml:3: identity.issuers[0].algorithms: algorithm 'none' is never accepted (HS* and none are refused)",
        ),
        (
            "identity:\n  issuers:\n    - {issuer: https://i}\n",
            "c.yaml:3: identity.issuers[0].audiences: required key is missing",
        ),
        (
            "identity:\n  api_keys: [{sha256: abc, subject: s}]\n",
            "c.yaml:2: identity.api_keys[0].sha256: must be 64 lowercase hexadecimal digits: "
            "the SHA-256 of the API key, not the key itself",
        ),
        (
            "routes:\n  - {name: a, prefix: a/, upstream: 'https://x/'}\n",
            "c.yaml:2: routes[0].prefix: must start with '/', got 'a/'",
        ),
        (
            "routes:\n  - {name: a, prefix: /a/, upstream: 'ftp://x/'}\n",
            "c.yaml:2: routes[0].upstream: must be an http:// or https:// URL, got 'ftp://x/'",
        ),
        (
            "policy:\n  default: maybe\n",
            "c.yaml:2: policy.default: must be one of allow, deny, approve; got 'maybe'",
        ),
        (
            "policy:\n  rules:\n    - {name: r, action: approve}\n",
            "c.yaml:3: policy.rules[0]: an approve rule needs approvers (groups or users)",
        ),
        (
            "policy:\n  rules:\n    - {name: r, action: allow, methods: [FETCH]}\n",
            "c.yaml:3: policy.rules[0].methods: unknown HTTP method 'FETCH'",
        ),
        (
            "policy:\n  rules:\n    - {name: r, action: allow, paths: [cloud/**]}\n",
            "c.yaml:3: policy.rules[0].paths: path globs must start with '/', got 'cloud/**'",
        ),
        (
            "approvals:\n  mode: later\n",
            "c.yaml:2: approvals.mode: must be one of hold, async; got 'later'",
        ),
        ("server: {}\nserver: {}\n", "c.yaml:2: key 'server' appears twice (first on line 1)"),
    ],
)
def test_each_error_names_file_line_and_key(text: str, expected: str) -> None:
    assert expected in errors_of(text)


def test_cross_references_are_checked() -> None:
    text = """
routes:
  - {name: cloud, prefix: /cloud/, upstream: "https://c/"}
policy:
  rules:
    - {name: r1, action: allow}
    - {name: r2, action: allow, route: clouds}
"""
    assert errors_of(text) == [
        "c.yaml:7: policy.rules[1].route: unknown route 'clouds'; routes are: cloud"
    ]
    dup = "routes:\n  - {name: a, prefix: /a/, upstream: 'http://x'}\n  - {name: a, prefix: /b/, upstream: 'http://x'}\n"
    assert errors_of(dup) == ["c.yaml:1: routes: duplicate route name(s): a"]


def test_all_errors_of_a_pass_are_reported_together() -> None:
    issues = errors_of("server:\n  listen: nowhere\n  colour: red\naudit:\n  stdout: maybe\n")
    assert len(issues) == 3


def test_invalid_yaml_names_the_line() -> None:
    [issue] = errors_of("server:\n  listen: [\n")
    assert issue == "c.yaml:2: (yaml): the '[' opened on this line is never closed"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "policy:\n  rules:\n    - {name: r, action: allow, paths: ['/a//b']}\n",
            "c.yaml:3: policy.rules[0].paths: path glob '/a//b' has an empty segment ('//'); it can never match",
        ),
        (
            "policy:\n  rules:\n    - {name: r, action: allow, paths: ['/a/x**']}\n",
            "c.yaml:3: policy.rules[0].paths: path glob '/a/x**': '**' must be a whole path segment",
        ),
        (
            "routes:\n  - {name: a, prefix: '/a/../b/', upstream: 'http://x'}\n",
            "c.yaml:2: routes[0].prefix: route prefix '/a/../b/' can never match",
        ),
        (
            "routes:\n  - {name: a, prefix: /a, upstream: 'http://x'}\n  - {name: b, prefix: /a/, upstream: 'http://x'}\n",
            "c.yaml:1: routes: duplicate route prefix(es): /a",
        ),
        (
            "policy:\n  rules:\n    - {name: r, action: allow, when: {claims: {tier: []}}}\n",
            "c.yaml:3: policy.rules[0].when.claims: claim 'tier' lists no accepted value; the rule could never match",
        ),
    ],
)
def test_globs_and_prefixes_that_can_never_match_are_config_errors(
    text: str, expected: str
) -> None:
    assert any(issue.startswith(expected) for issue in errors_of(text)), errors_of(text)


def test_upstream_with_credentials_in_its_url_is_refused() -> None:
    errors = errors_of(
        "routes:\n  - name: cloud\n    prefix: /cloud/\n    upstream: https://user:pw@cloud.example/\n"
    )
    assert len(errors) == 1
    assert errors[0].startswith("c.yaml:4: routes[0].upstream:")
    assert "must not hold credentials" in errors[0]
