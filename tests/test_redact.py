"""Redaction of text wherever it goes out: query and form pairs, JSON written as text, free text
(the agent's reason), provider key formats, headers shown to approvers, and the logs.

Keys below are made up, and built from pieces so that no secret scanner mistakes them for real.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from proxy.audit.redact import DEFAULT, REDACTED, Redactor


def scrub(text: str, redactor: Redactor = DEFAULT) -> str:
    out = redactor.value(text)
    assert isinstance(out, str)
    assert redactor.value(out) == out, "redacting twice changes nothing"
    return out


# -- query strings and form bodies -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("/x?token=abc&api_key=zzz", "/x?token=[REDACTED]&api_key=[REDACTED]"),
        ("password=hunter2&user=x", "password=[REDACTED]&user=x"),
        ("a=1;session=s1;b=2", "a=1;session=[REDACTED];b=2"),
        (
            "/x?api%5Fkey=abc&X%2DAPI%2DKEY=def&q=1",
            "/x?api%5Fkey=[REDACTED]&X%2DAPI%2DKEY=[REDACTED]&q=1",
        ),
        (
            "user%5Bpassword%5D=abc&user[password]=def&user.token=ghi&user[name]=bob",
            "user%5Bpassword%5D=[REDACTED]&user[password]=[REDACTED]&user.token=[REDACTED]"
            "&user[name]=bob",
        ),
        (
            "/cb#access_token=tok123&token_type=bearer",
            "/cb#access_token=[REDACTED]&token_type=bearer",
        ),
        ("next=%2Fx&redirect=/x?token=abc&y=1", "next=%2Fx&redirect=/x?token=[REDACTED]&y=1"),
        (
            "X-Amz-Signature=abc123&X-Amz-Credential=AKIA%2F2026&X-Amz-Security-Token=IQo"
            "&X-Amz-Date=20260101T000000Z",
            "X-Amz-Signature=[REDACTED]&X-Amz-Credential=[REDACTED]"
            "&X-Amz-Security-Token=[REDACTED]&X-Amz-Date=20260101T000000Z",
        ),
        (
            "pass=a&pwd=b&credentials=c&sessionid=d&auth=e&sig=f&signature=g&secret=h",
            "pass=[REDACTED]&pwd=[REDACTED]&credentials=[REDACTED]&sessionid=[REDACTED]"
            "&auth=[REDACTED]&sig=[REDACTED]&signature=[REDACTED]&secret=[REDACTED]",
        ),
        (
            "DB_PASSWORD=x&githubToken=y&refresh_token=z&x-api-key=w",
            "DB_PASSWORD=[REDACTED]&githubToken=[REDACTED]&refresh_token=[REDACTED]"
            "&x-api-key=[REDACTED]",
        ),
        ("curl -d password=hunter2 -d user=bob", "curl -d password=[REDACTED] -d user=bob"),
        ("token=abc#frag", "token=[REDACTED]#frag"),
        ("token=abc def", "token=[REDACTED] def"),
        ("Cookie: session=abc123; theme=dark", "Cookie: session=[REDACTED]; theme=dark"),
        ("token=&page=2", "token=&page=2"),  # nothing to hide
    ],
)
def test_sensitive_pairs_keep_their_name_and_lose_their_value(text: str, expected: str) -> None:
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "user=bob&page=2",
        "/cb?code=abc&state=xyz",  # an OAuth code is short-lived and shown
        "max_tokens=100&tokens=5&token_count=7",
        "passage=1&bypass=2&keynote=3&monkey=4&author=5&session_count=6&sig_version=7",
        "a=b=c&x==y",
    ],
)
def test_ordinary_pairs_are_untouched(text: str) -> None:
    assert scrub(text) == text


# -- JSON written as text --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Raw text: spacing, order and duplicate keys stay as they were.
        (
            '{"password": "hunter2", "user": "bob", "password":"again"}',
            '{"password": "[REDACTED]", "user": "bob", "password":"[REDACTED]"}',
        ),
        (
            '{"pin": 1234, "token": 12345, "secret": true, "api_key": null, "n": 5}',
            '{"pin": 1234, "token": "[REDACTED]", "secret": "[REDACTED]", "api_key": null, "n": 5}',
        ),
        (
            '{\n  "apiKey" : "k1",\n  "b": [1, 2]\n}',
            '{\n  "apiKey" : "[REDACTED]",\n  "b": [1, 2]\n}',
        ),
        ('{"password": "a\\"b, c", "x": 1}', '{"password": "[REDACTED]", "x": 1}'),
        (
            '{"auth": {"type": "oauth", "client_secret": "s"}}',
            '{"auth": {"type": "oauth", "client_secret": "[REDACTED]"}}',
        ),
        ('{"url": "/x?token=abc&a=1"}', '{"url": "/x?token=[REDACTED]&a=1"}'),
        (
            '{"data": "{\\"session\\": \\"s1\\", \\"n\\": \\"2\\"}"}',
            '{"data": "{\\"session\\": \\"[REDACTED]\\", \\"n\\": \\"2\\"}"}',
        ),
        ('{"password": "x", oops', '{"password": "[REDACTED]", oops'),  # not JSON: still raw
        ('[{"session": "abc', '[{"session": "[REDACTED]"'),  # a preview cut mid-value
    ],
)
def test_json_text_loses_secret_values_and_nothing_else(text: str, expected: str) -> None:
    assert scrub(text) == expected


def test_json_text_stays_json() -> None:
    text = '{"user": "bob", "Password": "hunter2", "tokens": 5, "auth": {"token": 42}}'
    assert json.loads(scrub(text)) == {
        "user": "bob",
        "Password": REDACTED,
        "tokens": 5,
        "auth": {"token": REDACTED},
    }


# -- free text (the agent's reason, approvers' notes, exception messages) --------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("my password is: hunter2", "my password is: [REDACTED]"),
        ("Password = hunter2, thanks", "Password = [REDACTED], thanks"),
        ("password:hunter2", "password:[REDACTED]"),
        (
            "the API_KEY='abc123' and client_secret: s3cr3t",
            "the API_KEY='[REDACTED]' and client_secret: [REDACTED]",
        ),
        (
            "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCY",
            "aws_secret_access_key = [REDACTED]",
        ),
        ("X-Api-Key: abc123 please", "X-Api-Key: [REDACTED] please"),
        (
            "private key: abc and access_key=def",
            "private key: [REDACTED] and access_key=[REDACTED]",
        ),
        ("token: abc", "token: [REDACTED]"),
        ('he wrote "secret": "x y"', 'he wrote "secret": "[REDACTED]"'),
        ("https://u:p4ss@host/x", "https://u:[REDACTED]@host/x"),
        ("redis://:s3cret@redis:6379/0", "redis://:[REDACTED]@redis:6379/0"),
    ],
)
def test_secrets_named_in_free_text_are_redacted(text: str, expected: str) -> None:
    assert scrub(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "the token is expired",
        "max_tokens: 100, tokens: 5",
        "a secret plan",
        "Password reset requested at 10:30",
        "key: value",
        "passwords: optional",
        "password_hint: the dog",
        "Countersign-Reason: export the Q3 customers for the audit",
        "ssh://git@github.com:22/org/repo.git and https://host:8443/x@y",
    ],
)
def test_ordinary_text_is_untouched(text: str) -> None:
    assert scrub(text) == text


# -- provider key formats --------------------------------------------------------------------

KEYS = {
    "openai": "sk-" + "A1b2C3d4E5" * 4 + "F6g7H8i9",
    "openai project": "sk-proj-" + "Ab1_Cd2-Ef3" * 12,
    "anthropic": "sk-" + "ant-api03-" + "aB3dE" * 18 + "-xyzAA",
    "github": "gh" + "p_" + "aB3dE6" * 6,
    "github oauth": "gh" + "o_" + "aB3dE6" * 6,
    "github user": "gh" + "u_" + "aB3dE6" * 6,
    "github server": "gh" + "s_" + "aB3dE6" * 6,
    "github refresh": "gh" + "r_" + "aB3dE6" * 6,
    "github fine-grained": "github" + "_pat_" + "11ABCDEFG0_" + "aB3dE" * 12,
    "gitlab": "gl" + "pat-" + "aB3dE6fG9hJ1kL2mN4pQ",
    "slack bot": "xo" + "xb-" + "1234567890-abcdefghij",
    "slack refresh": "xo" + "xe.xoxp-1-" + "abcdefghij",
    "slack config": "xo" + "xe-1-" + "abcdefghij1234",
    "slack app": "xa" + "pp-1-" + "A0B1C2D3",
    "stripe live": "sk" + "_live_" + "aB3dE6fG9h" * 3,
    "stripe restricted": "rk" + "_live_" + "aB3dE6fG9h" * 3,
    "stripe test": "sk" + "_test_" + "aB3dE6fG9h" * 3,
    "stripe webhook": "wh" + "sec_" + "aB3dE6fG9h" * 3,
    "google": "AI" + "za" + "Sy" + "aB3dE6fG9h" * 3 + "123",
    "aws key id": "AK" + "IA" + "ABCDEFGHIJKLMNOP",
    "npm": "np" + "m_" + "aB3dE6" * 6,
    "sendgrid": "SG" + ".aB3dE6fG9hJ1kL2mN4pQ5r." + "sT7uV8wX9yZ0" * 3 + "abcdefg",
    "hugging face": "hf" + "_" + "aB3dE6fG9h" * 3 + "abcd",
    "jwt": "eyJhbGciOiJIUzI1NiJ9" + ".eyJzdWIiOiIxIn0.c2lnbmF0dXJl",
    "countersign": "cs" + "_live_" + "a1" * 12,
    "pem": "-----BEGIN PRIVATE KEY-----\nMIIBVQIBADANBg\n-----END PRIVATE KEY-----",
    "bearer": "Bearer " + "abc123DEF456ghi789",
    "basic": "Basic " + "dXNlcjpwYXNz",
}


@pytest.mark.parametrize("key", KEYS.values(), ids=KEYS.keys())
def test_provider_keys_are_redacted_anywhere(key: str) -> None:
    assert scrub(f"rotate {key} today") == f"rotate {REDACTED} today"
    assert scrub(f"use key {key}") == f"use key {REDACTED}"
    assert key not in scrub(f'{{"note": "{key}", "n": 1}}')
    assert key not in scrub(f"/x?q={key}&page=2")


@pytest.mark.parametrize(
    "text",
    [
        "550e8400-e29b-41d4-a716-446655440000",
        "skeleton key, ask-me-anything, task-abcdefghij1234567890abc, sk-learn",
        "frisk_live_abcdefghijkl and desk_test_abcdefghijkl",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "apr_0123456789abcdef0123456789abcdef",
        "2026-11-25T16:07:45.000007Z and 2026-11-25",
        "w1-000000000000002a",
        "agent-1@example.com",
        "https://idp.example.com:8443/realms/x?client_id=ci&response_type=code",
        "use a Bearer token for Basic Authentication",
        "sk-some-kebab-case-slug-name-here",
        "ghp_short AIzaShort SG.short.x npm_short hf_short glpat-short",
        "The quick brown fox jumps over the lazy dog 12 times.",
    ],
)
def test_ids_and_prose_are_not_mistaken_for_keys(text: str) -> None:
    assert scrub(text) == text


# -- configuration, field names, mappings ----------------------------------------------------


def test_configured_fields_and_patterns_apply_to_text_too() -> None:
    redactor = Redactor(
        extra_fields=["SSN"], extra_patterns=[r"ACME-[0-9]{6}"], known_secrets=["upstream-x1"]
    )
    assert scrub("ssn=123-45-6789&x=1", redactor) == "ssn=[REDACTED]&x=1"
    assert scrub('{"ssn": "123-45-6789"}', redactor) == '{"ssn": "[REDACTED]"}'
    assert scrub("ticket ACME-123456, creds upstream-x1", redactor) == (
        "ticket [REDACTED], creds [REDACTED]"
    )
    assert redactor.value({"SSN": "1", "n": "ACME-654321"}) == {"SSN": REDACTED, "n": REDACTED}
    assert scrub("ssn=1") == "ssn=1", "the default redactor does not know the field"


@pytest.mark.parametrize(
    "name",
    [
        "password",
        "PWD",
        "pass",
        "credentials",
        "session",
        "SessionId",
        "auth",
        "sig",
        "X-Amz-Signature",
        "x_amz_credential",
        "X-Amz-Security-Token",
        "db_password",
        "GITHUB_TOKEN",
        "accessToken",
        "x-goog-api-key",
        "client-secret",
        "aws_secret_access_key",
    ],
)
def test_sensitive_field_names(name: str) -> None:
    assert DEFAULT.is_sensitive_field(name)


@pytest.mark.parametrize(
    "name",
    ["code", "state", "max_tokens", "tokens", "bypass", "author", "keynote", "page", "key", "id"],
)
def test_ordinary_field_names(name: str) -> None:
    assert not DEFAULT.is_sensitive_field(name)


def test_mappings_blank_sensitive_fields_and_scrub_the_rest() -> None:
    event: dict[str, Any] = {
        "pwd": "x",
        "accessToken": "y",
        "code": "c",
        "url": "/x?token=abc",
        "reason": "my password is: hunter2",
        "nested": [{"Signature": "s", "ok": 1}],
    }
    assert DEFAULT(None, "info", dict(event)) == {
        "pwd": REDACTED,
        "accessToken": REDACTED,
        "code": "c",
        "url": "/x?token=[REDACTED]",
        "reason": "my password is: [REDACTED]",
        "nested": [{"Signature": REDACTED, "ok": 1}],
    }


# -- headers approvers see -------------------------------------------------------------------


def test_headers_are_shown_with_secret_values_redacted_and_marked() -> None:
    redactor = Redactor(extra_fields=["X-Tenant-Pin"])
    shown = redactor.headers(
        [
            ("Authorization", "Bearer x"),
            ("Proxy-Authorization", "Basic y"),
            ("Cookie", "a=1"),
            ("Set-Cookie", "b=2"),
            ("X-Api-Key", "k"),
            ("X-Goog-Api-Key", "k"),
            ("X-Amz-Security-Token", "t"),
            ("X-Auth-Token", "t"),
            ("X-CSRF-Token", "t"),
            ("X-Client-Secret", "s"),
            ("X-Admin-Password", "p"),
            ("X-Tenant-Pin", "1234"),
            ("Accept", "application/json"),
            ("X-Trace", "token=abc123"),
            ("X-Note", "use " + KEYS["openai"]),
            ("Content-Type", "application/json"),
        ]
    )
    assert [h["name"] for h in shown][:3] == ["Authorization", "Proxy-Authorization", "Cookie"]
    hidden = {h["name"] for h in shown if h["value"] == REDACTED}
    assert hidden == {
        "Authorization",
        "Proxy-Authorization",
        "Cookie",
        "Set-Cookie",
        "X-Api-Key",
        "X-Goog-Api-Key",
        "X-Amz-Security-Token",
        "X-Auth-Token",
        "X-CSRF-Token",
        "X-Client-Secret",
        "X-Admin-Password",
        "X-Tenant-Pin",
    }
    by_name = {h["name"]: h for h in shown}
    assert by_name["Accept"] == {"name": "Accept", "value": "application/json", "redacted": False}
    assert by_name["X-Trace"] == {"name": "X-Trace", "value": "token=[REDACTED]", "redacted": True}
    assert by_name["X-Note"] == {"name": "X-Note", "value": "use [REDACTED]", "redacted": True}
    assert all(h["redacted"] for h in shown if h["name"] in hidden)


# -- the logs --------------------------------------------------------------------------------

_LOG_SCRIPT = """
import logging, structlog
from proxy.audit.redact import Redactor
from proxy.logs import configure_logging

configure_logging(redactor=Redactor(known_secrets=["upstream-secret-123"]))
structlog.get_logger("t").warning("fetch.failed", url="/x?token=abc123", error="bad upstream-secret-123")
try:
    raise RuntimeError("GET /x?api_key=k-123456 failed: password: hunter2")
except RuntimeError:
    logging.getLogger("countersign").exception("request.failed")
    structlog.get_logger("t").exception("boom")
"""


def test_logs_are_redacted_exception_text_included() -> None:
    done = subprocess.run(
        [sys.executable, "-c", _LOG_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [line["event"] for line in lines] == ["fetch.failed", "request.failed", "boom"]
    assert lines[0]["url"] == "/x?token=[REDACTED]" and lines[0]["error"] == "bad [REDACTED]"
    for line in lines[1:]:
        assert "RuntimeError" in line["exception"], line  # the traceback is there, as text
    text = done.stderr
    for secret in ("abc123", "upstream-secret-123", "k-123456", "hunter2"):
        assert secret not in text, secret


def test_an_events_own_request_id_is_not_scanned_but_a_nested_one_is() -> None:
    """The top-level `request_id` is the proxy's own (left as it is: new at every event, scanning
    it would only churn the cache); the same name inside a caller's data is scrubbed as usual."""
    secret = KEYS["openai"]
    event = {
        "event": "request.completed",
        "request_id": "0f3a9c1e2b4d5a6f0000000000000001",
        "path": f"/cloud/{secret}",
        "body": {"request_id": secret},
    }
    redactor = Redactor()
    for _ in range(2):  # the first call learns the field names; the second takes the fast path
        redacted = redactor(None, "info", dict(event))
        assert redacted["request_id"] == event["request_id"]
        assert redacted["path"] == f"/cloud/{REDACTED}"
        assert redacted["body"] == {"request_id": REDACTED}
