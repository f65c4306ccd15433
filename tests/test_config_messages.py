"""Configuration errors in plain words (issue 17): each mistake gives `file:line: key: message`.

Every test writes one mistake an operator makes and asserts the exact line `countersign check`
prints for it: the line of the mistake, the key, and a sentence that names the YAML type written
and what was expected, never pydantic's vocabulary or class names.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_settings, load_settings_text

ROUTE = "routes:\n  - name: cloud\n    prefix: /cloud/\n    upstream: https://cloud.example/api/\n"


def issues(text: str, env: Mapping[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings_text(text, "c.yaml", env=env or {})
    return [str(issue) for issue in info.value.issues]


def issue(text: str, env: Mapping[str, str] | None = None) -> str:
    [only] = issues(text, env)
    return only


# --------------------------------------------------------------------------------------------
# Types


def test_a_string_where_a_list_is_expected() -> None:
    text = "policy:\n  rules:\n    - name: exports\n      action: allow\n      methods: POST\n"
    assert issue(text) == (
        "c.yaml:5: policy.rules[0].methods: expected a list (e.g. [POST]), got a string"
    )


def test_a_mapping_where_a_list_of_mappings_is_expected() -> None:
    text = "routes:\n  name: cloud\n  prefix: /cloud/\n"
    assert issue(text) == (
        "c.yaml:1: routes: expected a list of mappings, each item starting with '- '; got a mapping"
    )


def test_a_number_where_a_string_is_expected() -> None:
    assert issue("server:\n  listen: 8080\n") == (
        "c.yaml:2: server.listen: expected a string, got a number (8080); put it in quotes"
    )


def test_a_string_where_a_mapping_of_known_keys_is_expected() -> None:
    text = "policy:\n  rules:\n    - {name: r, action: approve, approvers: alice}\n"
    assert issue(text) == (
        "c.yaml:3: policy.rules[0].approvers: expected a mapping with keys groups, users; "
        "got a string ('alice')"
    )


def test_an_empty_section_is_null() -> None:
    assert issue("identity:\n  claims:\n") == (
        "c.yaml:2: identity.claims: expected a mapping with keys groups, email, owner; "
        "got null (an empty value)"
    )


def test_a_word_where_a_boolean_is_expected() -> None:
    assert issue("audit:\n  stdout: maybe\n") == (
        "c.yaml:2: audit.stdout: expected true or false, got a string ('maybe')"
    )


def test_a_value_that_fits_no_branch_of_a_union() -> None:
    text = (
        "policy:\n  rules:\n    - name: r\n      action: allow\n      when: {claims: {tier: 3}}\n"
    )
    assert issue(text) == (
        "c.yaml:5: policy.rules[0].when.claims.tier: expected a string or a list, got a number (3)"
    )


def test_the_value_of_a_secret_is_never_echoed() -> None:
    text = ROUTE + "    inject_headers: {X-Token: 12345}\n"
    assert issue(text) == (
        "c.yaml:5: routes[0].inject_headers.X-Token: expected a string, got a number; "
        "put it in quotes"
    )


# --------------------------------------------------------------------------------------------
# Unknown and missing keys, choices


def test_an_unknown_key_suggests_the_closest_known_one() -> None:
    assert issue("approvals:\n  mode: hold\n  timout_seconds: 60\n") == (
        "c.yaml:3: approvals.timout_seconds: unknown key; did you mean 'timeout_seconds'?"
    )


def test_an_unknown_top_level_section_suggests_the_closest_one() -> None:
    assert issue("polcy:\n  default: deny\n") == (
        "c.yaml:1: polcy: unknown key; did you mean 'policy'?"
    )


def test_an_unknown_key_with_no_close_match_lists_the_keys_of_its_mapping() -> None:
    assert issue("store:\n  colour: red\n") == (
        "c.yaml:2: store.colour: unknown key; the keys here are url, mode, sentinel, key_prefix, "
        "retention_seconds, timeout_seconds, max_connections"
    )


def test_a_missing_required_key() -> None:
    assert issue("routes:\n  - name: cloud\n    prefix: /cloud/\n") == (
        "c.yaml:2: routes[0].upstream: required key is missing"
    )


def test_a_misspelt_choice_lists_the_choices() -> None:
    assert issue("approvals:\n  mode: holdd\n") == (
        "c.yaml:2: approvals.mode: must be one of hold, async; got 'holdd'"
    )


def test_a_number_where_a_choice_is_expected_names_no_class() -> None:
    assert issue("policy:\n  rules:\n    - {name: r, action: 3}\n") == (
        "c.yaml:3: policy.rules[0].action: must be one of allow, deny, approve; got a number (3)"
    )


# --------------------------------------------------------------------------------------------
# Numbers and durations


def test_zero_seconds_where_a_duration_must_be_positive() -> None:
    assert issue(ROUTE + "    timeout_seconds: 0\n") == (
        "c.yaml:5: routes[0].timeout_seconds: must be a number of seconds greater than 0, got 0"
    )


def test_a_duration_written_with_a_unit() -> None:
    assert issue("approvals:\n  timeout_seconds: 15m\n") == (
        "c.yaml:2: approvals.timeout_seconds: must be a whole number of seconds greater than 0, "
        "got a string ('15m')"
    )


def test_a_quoted_number() -> None:
    assert issue("policy:\n  rules:\n    - {name: r, action: allow, quorum: '2'}\n") == (
        "c.yaml:3: policy.rules[0].quorum: must be a whole number greater than 0, "
        "got a string ('2'); write it without quotes"
    )


def test_a_quoted_boolean() -> None:
    assert issue(
        'routes:\n  - {name: a, prefix: /a/, upstream: "https://x", strip_prefix: "false"}\n'
    ) == (
        "c.yaml:2: routes[0].strip_prefix: expected true or false, got a string ('false'); "
        "write it without quotes"
    )


def test_an_infinite_duration() -> None:
    assert issue("server:\n  upstream_timeout_seconds: .inf\n") == (
        "c.yaml:2: server.upstream_timeout_seconds: must be a finite number of seconds "
        "greater than 0, got .inf"
    )


def test_a_number_out_of_its_range_gives_the_range() -> None:
    assert issue("server:\n  workers: 0\n") == (
        "c.yaml:2: server.workers: must be a whole number from 1 to 64, got 0"
    )


def test_a_zero_jwks_cooldown_is_refused() -> None:
    assert issue("identity:\n  jwks_refresh_cooldown_seconds: 0\n") == (
        "c.yaml:2: identity.jwks_refresh_cooldown_seconds: must be a number of seconds "
        "greater than 0, got 0"
    )


def test_a_pattern_is_described_not_shown() -> None:
    assert issue("store:\n  key_prefix: my app\n") == (
        "c.yaml:2: store.key_prefix: may hold only letters, digits and _ . : -; "
        "got a string ('my app')"
    )


# --------------------------------------------------------------------------------------------
# YAML syntax


def test_a_bad_indent() -> None:
    text = "server:\n  listen: 127.0.0.1:8080\n public_url: http://127.0.0.1:8080\n"
    assert issue(text) == (
        "c.yaml:3: (yaml): the indentation of this line does not match the lines above it"
    )


def test_a_line_indented_too_deep() -> None:
    text = ROUTE + "     strip_prefix: false\n"
    assert issue(text) == (
        "c.yaml:5: (yaml): the indentation of this line does not match the lines above it"
    )


def test_a_list_item_key_aligned_with_its_dash() -> None:
    text = "routes:\n  - name: cloud\n  prefix: /cloud/\n"
    assert issue(text) == (
        "c.yaml:3: (yaml): the indentation of this line does not match the lines above it"
    )


def test_a_missing_colon_names_its_own_line() -> None:
    text = "server:\n  listen 127.0.0.1:8080\n  workers: 1\n"
    assert issue(text) == "c.yaml:2: (yaml): a ':' is missing after the key on this line"


def test_a_missing_colon_after_a_section_name() -> None:
    assert issue("server\n  workers: 1\n") == (
        "c.yaml:1: (yaml): a ':' is missing after the key on this line"
    )


def test_an_unclosed_quote_names_the_line_it_opens_on() -> None:
    text = 'server:\n  public_url: "http://x\n  workers: 1\n'
    assert issue(text) == (
        "c.yaml:2: (yaml): unclosed quote: the quote opened on this line is never closed"
    )


def test_an_unclosed_bracket_names_the_line_it_opens_on() -> None:
    text = "policy:\n  rules:\n    - name: r\n      methods: [GET,\n      action: allow\n"
    assert issue(text) == "c.yaml:4: (yaml): the '[' opened on this line is never closed"


def test_a_missing_comma_in_a_bracket() -> None:
    assert issue("routes: [{name: a}\npolicy: {}\n") == (
        "c.yaml:2: (yaml): a ',' or ']' is missing before this (in the '[' opened on line 1)"
    )


def test_a_tab_used_for_indentation() -> None:
    assert issue("server:\n\tworkers: 1\n") == (
        "c.yaml:2: (yaml): a tab is used for indentation here; YAML indents with spaces only"
    )


def test_a_value_holding_a_second_colon() -> None:
    assert issue("server:\n  public_url: see: docs\n") == (
        "c.yaml:2: (yaml): a second ': ' on this line; put the value in quotes if it contains ': '"
    )


def test_an_untranslated_yaml_error_keeps_its_gist() -> None:
    assert issue("a: *\n") == (
        "c.yaml:1: (yaml): this is not valid YAML (while scanning an alias; expected "
        "alphabetic or numeric character, but found '\\n')"
    )


def test_a_duplicate_top_level_key_names_both_lines() -> None:
    text = ROUTE + "policy:\n  default: deny\n" + ROUTE
    assert issue(text) == "c.yaml:7: key 'routes' appears twice (first on line 1)"


def test_a_duplicate_nested_key_names_both_lines() -> None:
    text = ROUTE + "    prefix: /other/\n"
    assert issue(text) == "c.yaml:5: routes[0]: key 'prefix' appears twice (first on line 3)"


def test_an_unknown_tag() -> None:
    assert issue("store:\n  url: !vault redis/url\n") == (
        "c.yaml:2: store.url: cannot read 'redis/url' as !vault; remove the tag "
        "(only plain strings, numbers, booleans, lists and mappings are used)"
    )


# --------------------------------------------------------------------------------------------
# Listen addresses and URLs


def test_a_port_out_of_range() -> None:
    assert issue('server:\n  listen: "0.0.0.0:99999"\n') == (
        "c.yaml:2: server.listen: port 99999 is out of range; use 1 to 65535 "
        "(or 0 for any free port)"
    )


def test_port_zero_stays_allowed_for_tests() -> None:
    settings = load_settings_text('server:\n  listen: "127.0.0.1:0"\n', "c.yaml", env={})
    assert settings.server.port == 0


def test_a_listen_address_without_a_host() -> None:
    assert issue('server:\n  listen: ":8080"\n') == (
        "c.yaml:2: server.listen: the host before ':8080' is missing; e.g. 127.0.0.1:8080 "
        "(this machine only) or 0.0.0.0:8080 (every interface)"
    )


def test_an_ipv6_listen_address_needs_brackets() -> None:
    assert issue('server:\n  listen: "::1:8080"\n') == (
        "c.yaml:2: server.listen: an IPv6 address needs brackets, e.g. [::1]:8080"
    )
    settings = load_settings_text('server:\n  listen: "[::1]:8080"\n', "c.yaml", env={})
    assert settings.server.host == "::1"


def test_an_upstream_with_an_encoded_slash() -> None:
    text = (
        "routes:\n  - name: files\n    prefix: /files/\n    upstream: https://s.example/b/a%2Fb/\n"
    )
    assert issue(text) == (
        "c.yaml:4: routes[0].upstream: the path '/b/a%2Fb/' contains %2F (an encoded '/'), "
        "which the proxy cannot forward: it decodes every path and sends it re-encoded; "
        "write the path without %2F"
    )


def test_an_upstream_with_a_dot_segment() -> None:
    text = (
        "routes:\n  - name: files\n    prefix: /files/\n    upstream: https://s.example/a/../b/\n"
    )
    assert issue(text) == (
        "c.yaml:4: routes[0].upstream: the path '/a/../b/' has a '.' or '..' segment; "
        "write the resolved path"
    )


def test_an_upstream_with_an_ordinary_escape_is_accepted() -> None:
    text = "routes:\n  - name: files\n    prefix: /files/\n    upstream: https://s.example/my%20files/\n"
    assert load_settings_text(text, "c.yaml", env={}).routes[0].upstream.endswith("%20files/")


def test_a_public_url_without_a_host() -> None:
    assert issue("server:\n  public_url: https:///approvals\n") == (
        "c.yaml:2: server.public_url: the URL has no host (e.g. https://host/), "
        "got 'https:///approvals'"
    )


def test_a_webhook_url_with_a_bad_port() -> None:
    text = "notify:\n  webhooks:\n    - url: https://hooks.example:99999/x\n"
    assert issue(text) == (
        "c.yaml:3: notify.webhooks[0].url: 'https://hooks.example:99999/x' is not a valid URL "
        "(is the port a number from 1 to 65535? is an IPv6 address in brackets?)"
    )


def test_a_store_url_without_a_host_hides_the_password() -> None:
    assert issue("store:\n  url: redis://:hunter2@redis:6379/zero\n") == (
        "c.yaml:2: store.url: the database after the host must be a number "
        "(e.g. redis://redis:6379/0), got 'redis://:***@redis:6379/zero'"
    )
    assert issue("store:\n  url: redis://\n") == (
        "c.yaml:2: store.url: the Redis URL has no host (e.g. redis://redis:6379/0), got 'redis://'"
    )


def test_an_audit_redis_url_must_be_redis() -> None:
    assert issue("audit:\n  redis_stream: audit\n  redis_url: memory://\n") == (
        "c.yaml:3: audit.redis_url: not a Redis URL: 'memory://'; use "
        "redis://[:password@]host:port/db (rediss:// for TLS, unix:///path/to/socket)"
    )


# --------------------------------------------------------------------------------------------
# Injected headers


def test_an_empty_injected_secret_names_its_variable() -> None:
    text = ROUTE + '    inject_headers:\n      Authorization: "${CLOUD_TOKEN:-}"\n'
    assert issue(text, env={}) == (
        "c.yaml:6: routes[0].inject_headers.Authorization: is empty (is ${CLOUD_TOKEN} set?)"
    )


def test_a_bearer_scheme_without_its_token() -> None:
    text = ROUTE + '    inject_headers:\n      Authorization: "Bearer ${CLOUD_TOKEN:-}"\n'
    assert issue(text, env={}) == (
        "c.yaml:6: routes[0].inject_headers.Authorization: is 'Bearer' with nothing after it "
        "(is ${CLOUD_TOKEN} set?)"
    )


def test_an_injected_variable_set_to_blank() -> None:
    text = ROUTE + '    inject_headers:\n      X-Api-Key: "${API_KEY}"\n'
    assert issue(text, env={"API_KEY": "  "}) == (
        "c.yaml:6: routes[0].inject_headers.X-Api-Key: is empty (${API_KEY} is set but empty)"
    )


def test_an_injected_value_with_a_line_break() -> None:
    text = ROUTE + '    inject_headers:\n      X-Api-Key: "${API_KEY}"\n'
    assert issue(text, env={"API_KEY": "k1\nX-Admin: yes"}) == (
        "c.yaml:6: routes[0].inject_headers.X-Api-Key: contains a line break or another "
        "control character"
    )


def test_an_empty_literal_injected_value() -> None:
    text = ROUTE + '    inject_headers:\n      X-Api-Key: ""\n'
    assert issue(text) == "c.yaml:6: routes[0].inject_headers.X-Api-Key: is empty"


def test_an_injected_secret_that_is_set_loads() -> None:
    text = ROUTE + '    inject_headers:\n      Authorization: "Bearer ${CLOUD_TOKEN:-}"\n'
    settings = load_settings_text(text, "c.yaml", env={"CLOUD_TOKEN": "t0k"})
    assert settings.routes[0].inject_headers["Authorization"] == "Bearer t0k"


# --------------------------------------------------------------------------------------------
# Across the board


MISTAKES = [
    "server: 3\n",
    "server:\n  listen: [a]\n",
    "server:\n  max_body_bytes: big\n",
    "server:\n  event_loop: tokio\n",
    "identity:\n  issuers: {issuer: x}\n",
    "identity:\n  issuers:\n    - {issuer: https://i, audiences: []}\n",
    "identity:\n  claims: groups\n",
    "routes: [cloud]\n",
    "routes:\n  - {name: a, prefix: /a/, upstream: https://x, inject_headers: [a]}\n",
    "policy:\n  rules:\n    - {name: r, action: allow, when: groups}\n",
    "policy:\n  rules:\n    - {name: r, action: allow, when: {claims: {a: {b: c}}}}\n",
    "policy:\n  default: [deny]\n",
    "approvals:\n  groups: [a]\n",
    "approvals:\n  groups: {owners: a}\n",
    "notify:\n  slack: yes\n",
    "notify:\n  webhooks: [{url: 3}]\n",
    "audit:\n  redact: {patterns: a}\n",
    "audit:\n  commit_interval_ms: 5000\n",
]


@pytest.mark.parametrize("text", MISTAKES)
def test_no_message_speaks_pydantic(text: str) -> None:
    for line in issues(text):
        assert line.startswith("c.yaml:"), line
        for word in ("Input should", "Settings", "pydantic", "tuple", "dictionary", "instance"):
            assert word not in line, line


def test_load_settings_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "countersign.yaml"
    path.write_text("approvals:\n  mode: holdd\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path, env={})
    assert str(info.value) == f"{path}:2: approvals.mode: must be one of hold, async; got 'holdd'"
