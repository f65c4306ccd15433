"""The small things of the CLI (issue 17), as a user sees them: `--version`, the demo's port,
decision wording, a closed pipe, `keys new`, `--url` checks, and an example config with every key.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import typing
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import aiohttp
import pytest
import yaml
from pydantic import BaseModel

from proxy import cli as cli_module
from proxy.config import Settings, load_settings
from tests.e2e.conftest import COUNTERSIGN, running_demo
from tests.e2e.test_cli import cli
from tests.test_audit_export import write_day

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "config" / "countersign.example.yaml"


# --- 1. --version -------------------------------------------------------------------------


def test_version_prints_the_installed_version() -> None:
    result = cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"countersign {version('countersign')}\n"
    assert result.stderr == ""


def test_version_falls_back_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata

    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert cli_module.version() == cli_module.FALLBACK_VERSION


# --- 2. the demo's port -------------------------------------------------------------------


def make_dry_run(*args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "MAKEFLAGS", "MAKELEVEL")}
    result = subprocess.run(
        ["make", "-n", "demo", *args], cwd=ROOT, capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()


def test_make_demo_passes_port() -> None:
    assert make_dry_run("PORT=9000")[-1].endswith("/countersign demo --port 9000")
    assert make_dry_run()[-1].rstrip().endswith("/countersign demo")  # the CLI's default, 8080


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_demo_on_a_busy_port_says_so_in_one_line(busy_port: int) -> None:
    result = cli("demo", "--port", str(busy_port))
    assert result.returncode == 1
    assert result.stderr == (
        f"countersign demo: port {busy_port} is in use: try `make demo PORT=9000` or "
        "`countersign demo --port 9000`\n"
    )
    assert result.stdout == ""


def test_demo_refuses_a_port_out_of_range() -> None:
    result = cli("demo", "--port", "70000")
    assert result.returncode == 2
    assert "argument --port: expected a port number from 1 to 65535, got '70000'" in result.stderr
    assert "Traceback" not in result.stderr


# --- 3. "approved by", "denied by" --------------------------------------------------------


async def test_decisions_read_approved_by_and_denied_by() -> None:
    async with running_demo() as demo:
        base = demo.base
        env = {"COUNTERSIGN_URL": base, "COUNTERSIGN_TOKEN": demo.approver_key}
        headers = {"Authorization": f"Bearer {demo.agent_key}", "Countersign-Reason": "report"}
        async with aiohttp.ClientSession() as session:
            held = [
                asyncio.create_task(
                    session.post(f"{base}/cloud/exports/{name}", json={}, headers=headers)
                )
                for name in ("a", "b")
            ]
            ids: list[str] = []
            for _ in range(100):
                listing = (await asyncio.to_thread(cli, "approvals", "list", env=env)).stdout
                ids = [w for w in listing.split() if w.startswith("apr_")]
                if len(ids) == 2:
                    break
                await asyncio.sleep(0.1)
            assert len(ids) == 2, listing
            approved = await asyncio.to_thread(
                cli, "approvals", "approve", ids[0], "--reason", "fine", env=env
            )
            denied = await asyncio.to_thread(
                cli, "approvals", "deny", ids[1], "--reason", "not now", env=env
            )
            for task in held:
                (await asyncio.wait_for(task, 10)).release()
        assert approved.returncode == 0, approved.stderr
        assert re.search(
            r"\n  approved by alice@example\.com via api at \S+: fine", approved.stdout
        )
        assert denied.returncode == 0, denied.stderr
        assert re.search(r"\n  denied by alice@example\.com via api at \S+: not now", denied.stdout)
        shown = await asyncio.to_thread(cli, "approvals", "show", ids[1], env=env)
        assert "  denied by alice@example.com via api" in shown.stdout
        assert "denyd" not in denied.stdout + shown.stdout
        assert "approved by" in approved.stdout and "approveed" not in approved.stdout


# --- 4. quiet on a closed pipe ------------------------------------------------------------


@pytest.fixture(scope="module")
def big_audit(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    path = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    write_day(path, approvals=3000, passthrough=3000)  # ~1 MB of export: far beyond a pipe
    return [str(p) for p in sorted(path.parent.glob("audit.jsonl*"))]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_export_into_a_closed_pipe_is_quiet(big_audit: list[str], fmt: str) -> None:
    """`countersign audit export … | head -1`: one line read, then the reader goes away."""
    proc = subprocess.Popen(
        [COUNTERSIGN, "audit", "export", "--format", fmt, *big_audit],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    status = proc.wait(timeout=60)
    assert first  # the reader got its line
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert "Exception ignored" not in stderr, stderr
    assert status in (0, 141), (status, stderr)


# --- 5. keys new --------------------------------------------------------------------------


def test_keys_new_requires_a_subject() -> None:
    result = cli("keys", "new", "--groups", "ci")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: countersign keys new [--aws] --subject SUBJECT")
    assert result.stderr.splitlines()[-1] == (
        "countersign keys new: error: --subject is required: the identity the key "
        "authenticates as, e.g. --subject agent-ci"
    )


def test_keys_new_prints_email_and_owner(tmp_path: Path) -> None:
    result = cli(
        "keys",
        "new",
        "--subject",
        "agent-build",
        "--groups",
        "agents, ci",
        "--email",
        "build@example.com",
        "--owner",
        "bob@example.com",
    )
    assert result.returncode == 0, result.stderr
    entry = next(line for line in result.stdout.splitlines() if "sha256" in line)
    assert re.fullmatch(
        r'  - \{sha256: "[0-9a-f]{64}", subject: "agent-build", groups: \["agents", "ci"\], '
        r'email: "build@example\.com", owner: "bob@example\.com"\}',
        entry,
    ), entry
    config = tmp_path / "k.yaml"
    config.write_text("identity:\n  api_keys:\n" + entry + "\n")
    assert cli("check", "-c", str(config)).returncode == 0
    key = load_settings(config).identity.api_keys[0]
    assert (key.subject, key.groups) == ("agent-build", ("agents", "ci"))
    assert (key.email, key.owner) == ("build@example.com", "bob@example.com")


def test_keys_new_quotes_what_it_prints(tmp_path: Path) -> None:
    result = cli("keys", "new", "--subject", 'odd "name": x', "--groups", "a: b")
    assert result.returncode == 0, result.stderr
    entry = next(line for line in result.stdout.splitlines() if "sha256" in line)
    parsed = yaml.safe_load(entry)[0]
    assert parsed["subject"] == 'odd "name": x' and parsed["groups"] == ["a: b"]
    assert "email" not in parsed and "owner" not in parsed


def test_keys_new_refuses_a_non_email() -> None:
    result = cli("keys", "new", "--subject", "a", "--email", "carol")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (
        "countersign keys new: error: --email must be an email address, e.g. bob@example.com, "
        "got 'carol'"
    )


# --- 6. --url -----------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["127.0.0.1:8080", "localhost:8080", "ftp://127.0.0.1:8080"])
def test_approvals_url_needs_http(url: str) -> None:
    result = cli("approvals", "list", "--url", url, "--token", "t")
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "countersign approvals: --url must start with http:// or https://, "
        "e.g. http://127.0.0.1:8080\n"
    )


def test_approvals_env_url_needs_http() -> None:
    result = cli("approvals", "show", "apr_x", "--token", "t", env={"COUNTERSIGN_URL": "h:1"})
    assert result.returncode == 2
    assert result.stderr == (
        "countersign approvals: $COUNTERSIGN_URL must start with http:// or https://, "
        "e.g. http://127.0.0.1:8080\n"
    )


def test_approvals_url_with_a_bad_port() -> None:
    result = cli("approvals", "deny", "apr_x", "--reason", "r", "--url", "http://h:99999")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith("countersign approvals: --url is not a valid URL")


# --- 7. the example config shows every key ------------------------------------------------


def _models_in(annotation: object) -> Iterator[type[BaseModel]]:
    """The pydantic models an annotation holds (through Optional, tuple, Mapping, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    for arg in typing.get_args(annotation):
        yield from _models_in(arg)


def _field_names(model: type[BaseModel]) -> Iterator[tuple[str, str]]:
    """(dotted path, key) of every field of `model` and of the models below it."""
    for name, field in model.model_fields.items():
        key = field.alias or name  # what YAML spells (`json` for `json_fields`)
        yield key, key
        for sub in _models_in(field.annotation):
            for path, sub_key in _field_names(sub):
                yield f"{key}.{path}", sub_key


def _sections(text: str) -> dict[str, str]:
    """Top-level key → its block of the file (comments included)."""
    sections: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"([A-Za-z_]+):", line)
        if match:
            current = match.group(1)
        if current is not None:
            sections[current] = sections.get(current, "") + line + "\n"
    return sections


def test_example_config_shows_every_key() -> None:
    sections = _sections(EXAMPLE.read_text())
    missing = []
    for top, field in Settings.model_fields.items():
        section = sections.get(top)
        if section is None:
            missing.append(top)
            continue
        for model in _models_in(field.annotation):
            for path, key in _field_names(model):
                # as a key, active or commented out: `key:` not preceded by a name character
                if not re.search(rf"(?<![\w.]){re.escape(key)}:", section):
                    missing.append(f"{top}.{path}")
    assert not missing, f"{EXAMPLE.name} lacks: {', '.join(missing)}"


def test_example_config_checks_ok() -> None:
    result = cli("check", "-c", str(EXAMPLE), env={"CLOUD_TOKEN": "x", "GITHUB_TOKEN": "y"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{EXAMPLE}: OK")


def test_readme_points_only_inside_the_repository() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "../" not in readme.replace("/../", "")  # `/../` is a dot segment, not a link
    assert "DESIGN.md" not in readme and "design file" not in readme.lower()
    for link in re.findall(r"\]\(([^)#]+)", readme):
        if "://" not in link:
            assert (ROOT / link).exists(), link
