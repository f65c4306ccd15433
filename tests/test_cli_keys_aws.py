"""`countersign keys new --aws`: a new agent access key, its config entry, and that it works.

The command runs as a user runs it (the installed entry point, in a subprocess); the entry it
prints goes through the real config loader with the printed environment variable set, and a
request boto3 signs with the printed key verifies.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from proxy.authn.sigv4 import SigV4Verifier
from proxy.config import load_settings_text
from tests.test_sigv4 import boto_client, capture

COUNTERSIGN = str(Path(sys.executable).parent / "countersign")


def keys_new(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COUNTERSIGN, "keys", "new", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _value(output: str, label: str) -> str:
    match = re.search(rf"^{re.escape(label)}\s+(\S+)$", output, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{output}"
    return match.group(1)


def _entry(output: str) -> dict[str, object]:
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("config: identity.aws_keys"))
    entry = yaml.safe_load(lines[start + 1])
    assert isinstance(entry, list) and len(entry) == 1
    assert isinstance(entry[0], dict)
    return entry[0]


def test_prints_a_key_its_entry_and_how_to_use_it() -> None:
    done = keys_new(
        "--aws",
        "--subject",
        "agent-7",
        "--groups",
        "agents, ops",
        "--email",
        "ops-bot@example.com",
        "--owner",
        "bob@example.com",
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    key_id = _value(out, "access key id:")
    secret = _value(out, "secret access key:")
    assert re.fullmatch(r"AKIACS[A-Z2-7]{14}", key_id)
    assert re.fullmatch(r"[A-Za-z0-9]{40}", secret)
    assert _entry(out) == {
        "access_key_id": key_id,
        "secret": "${AGENT_7_AWS_SECRET}",
        "subject": "agent-7",
        "groups": ["agents", "ops"],
        "email": "ops-bot@example.com",
        "owner": "bob@example.com",
    }
    assert f"  export AGENT_7_AWS_SECRET={secret}\n" in out
    assert f"  export AWS_ACCESS_KEY_ID={key_id}\n" in out
    assert f"  export AWS_SECRET_ACCESS_KEY={secret}\n" in out
    assert "  export AWS_ENDPOINT_URL=" in out
    # The secret is printed for the operator to hand over; the config entry never holds it.
    assert secret not in "\n".join(line for line in out.splitlines() if "access_key_id" in line)


def test_every_key_is_new() -> None:
    first, second = keys_new("--aws", "--subject", "a"), keys_new("--aws", "--subject", "a")
    assert _value(first.stdout, "access key id:") != _value(second.stdout, "access key id:")
    assert _value(first.stdout, "secret access key:") != _value(second.stdout, "secret access key:")


def test_variable_names_come_from_the_subject() -> None:
    assert _entry(keys_new("--aws", "--subject", "ci bot.prod").stdout)["secret"] == (
        "${AGENT_CI_BOT_PROD_AWS_SECRET}"
    )
    assert _entry(keys_new("--aws", "--subject", "Agent_9").stdout)["secret"] == (
        "${AGENT_9_AWS_SECRET}"
    )


async def test_the_printed_key_verifies_through_the_config() -> None:
    out = keys_new("--aws", "--subject", "agent-7", "--owner", "bob@example.com").stdout
    key_id = _value(out, "access key id:")
    secret = _value(out, "secret access key:")
    variable = re.search(r"^  export (AGENT_\w+)=", out, re.MULTILINE)
    assert variable is not None
    entry_line = out.splitlines()[
        next(i for i, line in enumerate(out.splitlines()) if line.startswith("config:")) + 1
    ]
    config = f"""
identity:
  aws_keys:
{entry_line}
routes:
  - name: aws
    prefix: /
    upstream: "https://iam.amazonaws.com/"
    protocol: aws
    caller_credentials: [aws_sigv4]
    aws: {{region: us-east-1, credentials: {{access_key_id: AKIAREAL, secret_access_key: x}}}}
"""
    settings = load_settings_text(config, env={variable.group(1): secret})
    (key,) = settings.identity.aws_keys
    assert key.secret == secret
    request = capture(boto_client("iam", key_id=key_id, secret=secret), "list_roles")
    identity, caller = await SigV4Verifier(settings.identity.aws_keys).verify(
        method=request.method,
        target=request.target,
        host=request.host,
        headers=request.headers,
        body=request.body,
    )
    assert (identity.subject, identity.owner, identity.client_id) == (
        "agent-7",
        "bob@example.com",
        key_id,
    )
    assert caller.access_key_id == key_id


def test_subject_is_required() -> None:
    done = keys_new("--aws")
    assert done.returncode == 2
    assert "--subject is required" in done.stderr
    assert "--subject agent-7" in done.stderr


def test_api_keys_are_unchanged() -> None:
    done = keys_new("--subject", "agent-ci", "--groups", "ci")
    assert done.returncode == 0, done.stderr
    assert re.match(r"key:    cs_\S+\n", done.stdout)
    assert "config: identity.api_keys entry:" in done.stdout
    entry = yaml.safe_load(done.stdout.splitlines()[-1])
    assert set(entry[0]) == {"sha256", "subject", "groups"}
