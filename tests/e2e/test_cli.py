"""The real `countersign` CLI as a user runs it: check, explain, keys new, run, demo."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from tests.e2e.conftest import COUNTERSIGN, Process, free_port, running_demo
from tests.idp_fixture import TestIdP

StartFn = Callable[[str, int], Process]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [COUNTERSIGN, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def config_text(port: int, upstream: str, issuer: str | None = None) -> str:
    issuers = f'[{{issuer: "{issuer}", audiences: [countersign]}}]' if issuer else "[]"
    return f"""
server:
  listen: "127.0.0.1:{port}"
identity:
  issuers: {issuers}
routes:
  - name: cloud
    prefix: /cloud/
    upstream: "{upstream}"
    inject_headers: {{Authorization: "Bearer ${{CLOUD_TOKEN:-upstream-token}}"}}
policy:
  default: deny
  rules:
    - {{name: reads, methods: [GET, HEAD], action: allow}}
    - name: exports
      route: cloud
      methods: [POST]
      paths: ["/cloud/exports/**"]
      when: {{groups: [agents]}}
      action: approve
      approvers: {{groups: [data-owners]}}
    - {{name: uploads, methods: [PUT], paths: ["/cloud/uploads/**"], action: allow}}
    - {{name: no-deletes, methods: [DELETE], action: deny}}
"""


def test_check_accepts_the_shipped_examples(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    # The deployment's audit file lives under /var/log/countersign, writable by its service
    # user only: `check` would rightly refuse it here unless run as root. A copy with the audit
    # file moved to a writable place checks everything else, as any user.
    deploy = (root / "deploy" / "countersign.yaml").read_text()
    shipped_audit = "file: /var/log/countersign/audit.jsonl"
    assert shipped_audit in deploy
    deploy_copy = tmp_path / "countersign.yaml"
    deploy_copy.write_text(deploy.replace(shipped_audit, f"file: {tmp_path / 'audit.jsonl'}"))
    examples = [*sorted((root / "config").glob("*.yaml")), deploy_copy]
    env = {
        "CLOUD_TOKEN": "x",
        "GITHUB_TOKEN": "y",
        "REDIS_PASSWORD": "z",
        "AGENT_7_AWS_SECRET": "0123456789abcdef0123",
    }
    for example in examples:
        result = cli("check", "-c", str(example), env=env)
        assert result.returncode == 0, (example, result.stderr)
        assert "OK" in result.stdout


def test_check_reports_file_key_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "server:\n"
        "  listen: nowhere\n"
        "routes:\n"
        "  - name: cloud\n"
        "    prefix: /cloud/\n"
        "    upstream: https://cloud.example.com/\n"
        "    inject_headers: {Authorization: 'Bearer ${MISSING_TOKEN}'}\n"
        "policy:\n"
        "  rules:\n"
        "    - {name: r, action: allow, quorum: '2', colour: red}\n"
    )
    result = cli("check", "-c", str(bad))
    assert result.returncode == 2
    assert (
        f"{bad}:7: routes[0].inject_headers.Authorization: environment variable MISSING_TOKEN is not set"
        in result.stderr
    )
    fixed = bad.read_text().replace("${MISSING_TOKEN}", "x")
    bad.write_text(fixed)
    result = cli("check", "-c", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert (
        f"{bad}:2: server.listen: expected host:port, e.g. 127.0.0.1:8080, got 'nowhere'" in lines
    )
    assert (
        f"{bad}:10: policy.rules[0].quorum: must be a whole number greater than 0, got a string "
        "('2'); write it without quotes" in lines
    )
    assert (
        f"{bad}:10: policy.rules[0].colour: unknown key; the keys here are name, action, "
        "methods, paths, route, actions, when, approvers, quorum, timeout_seconds, mode, grant, risk, note"
        in lines
    )


def test_check_missing_file_and_broken_yaml(tmp_path: Path) -> None:
    result = cli("check", "-c", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml: cannot read: No such file or directory" in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("server:\n  listen: [unclosed\n")
    result = cli("check", "-c", str(broken))
    assert result.returncode == 2
    assert f"{broken}:2: (yaml): the '[' opened on this line is never closed" in result.stderr


def test_explain_names_route_rule_and_why(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(config_text(8080, "https://cloud.example.com/"))
    result = cli(
        "explain",
        "-c",
        str(config),
        "POST",
        "/cloud/exports/x",
        "--subject",
        "agent-7",
        "--groups",
        "agents",
    )
    assert result.returncode == 3, result.stderr  # 0 allow, 1 deny, 3 approve
    out = result.stdout
    assert "route:    cloud (prefix /cloud/)" in out
    assert "upstream: https://cloud.example.com/exports/x" in out
    assert "decision: approve by rule exports" in out
    assert "reads:" in out  # the rules before it are listed with why they did not match
    result = cli("explain", "-c", str(config), "DELETE", "/cloud/buckets/b", "--subject", "a")
    assert result.returncode == 1
    assert "decision: deny by rule no-deletes" in result.stdout
    assert '403 {"error": {"code": "policy_denied", "message": ' in result.stdout
    assert '"rule": "no-deletes", "route": "cloud"}}' in result.stdout
    result = cli("explain", "-c", str(config), "GET", "/cloud/a/..%2fb", "--subject", "a")
    assert "400 ambiguous_request (encoded_slash)" in result.stdout
    assert result.returncode == 1


def test_keys_new_prints_a_working_config_line(tmp_path: Path) -> None:
    result = cli("keys", "new", "--subject", "agent-ci", "--groups", "ci,deployers")
    assert result.returncode == 0
    key = next(line.split()[1] for line in result.stdout.splitlines() if line.startswith("key:"))
    entry = next(line for line in result.stdout.splitlines() if "sha256" in line)
    assert key.startswith("cs_") and key not in entry
    config = tmp_path / "k.yaml"
    config.write_text("identity:\n  api_keys:\n" + entry + "\n")
    assert cli("check", "-c", str(config)).returncode == 0


async def test_run_serves_a_real_idp_token(
    run_countersign: StartFn, upstream: TestServer, idp: TestIdP
) -> None:
    port = free_port()
    proc = run_countersign(config_text(port, str(upstream.make_url("/api/")), idp.issuer), port)
    token = await idp.token("agent-7")
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proc.url}/cloud/buckets", headers=auth) as resp:
            assert resp.status == 200
            echo = await resp.json()
            assert echo["path"] == "/api/buckets"
            assert echo["headers"]["authorization"] == "Bearer upstream-token"
        async with session.delete(f"{proc.url}/cloud/buckets/b", headers=auth) as resp:
            assert resp.status == 403
            assert await resp.json() == {
                "error": {
                    "code": "policy_denied",
                    "message": "the policy denies this request (rule no-deletes)",
                    "rule": "no-deletes",
                    "route": "cloud",
                    "request_id": resp.headers["X-Request-Id"],
                }
            }
        async with session.get(f"{proc.url}/cloud/buckets") as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
        async with session.get(f"{proc.url}/_countersign/readyz") as resp:
            assert resp.status == 200
    assert proc.stop() == 0, proc.stderr()
    events = [json.loads(line) for line in proc.stdout().splitlines()]
    names = [e["event"] for e in events]
    completed = [e for e in events if e["event"] == "request.completed"]
    assert len(completed) == names.count("request.completed") == 3  # one per request
    assert sorted((e["status"], e["error"]) for e in completed) == [
        (200, None),
        (401, "unauthorized"),
        (403, "policy_denied"),
    ]
    allowed = next(e for e in completed if e["status"] == 200)
    assert allowed["identity"]["subject"] == "agent-7"
    assert allowed["identity"]["owner"] == "alice@example.com"
    assert token not in proc.stdout() and token not in proc.stderr()
    assert "upstream-token" not in proc.stdout()


async def test_one_gib_upload_streams_with_flat_memory(
    run_countersign: StartFn, upstream: TestServer, tmp_path: Path
) -> None:
    from proxy.authn.apikeys import key_digest

    key = "cs_e2e_upload_key_00000000000000000000000"
    port = free_port()
    text = config_text(port, str(upstream.make_url("/"))).replace(
        "identity:\n",
        f'identity:\n  api_keys: [{{sha256: "{key_digest(key)}", subject: "uploader"}}]\n',
    )
    proc = run_countersign(text, port)
    rss_before = proc.rss_kib()
    chunk = b"\xab" * (1 << 20)
    total_chunks = 1024  # 1 GiB

    async def body() -> AsyncIterator[bytes]:
        for _ in range(total_chunks):
            yield chunk

    timeout = aiohttp.ClientTimeout(total=300)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.put(
            f"{proc.url}/cloud/uploads/big.bin",
            data=body(),
            headers={"Authorization": f"Bearer {key}"},
        ) as resp,
    ):
        assert resp.status == 200
        echo = await resp.json()
    assert echo["body_bytes"] == len(chunk) * total_chunks
    peak = proc.rss_kib("VmHWM")
    # Streaming, not buffering: the proxy's peak memory grows by far less than the body.
    assert peak - rss_before < 64 * 1024, f"RSS grew by {(peak - rss_before) // 1024} MiB"


async def test_demo_serves_the_printed_commands() -> None:
    async with running_demo() as demo:
        auth = {"Authorization": f"Bearer {demo.agent_key}"}
        base = demo.base
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/cloud/buckets", headers=auth) as resp:
                assert resp.status == 200
                assert (await resp.json())["buckets"] == ["customers", "reports"]
            async with session.delete(f"{base}/cloud/buckets/reports", headers=auth) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"]["rule"] == "no-deletes"
            async with session.get(f"{base}/cloud/buckets") as resp:
                assert resp.status == 401
            # The held export, approved with the printed `countersign approvals` commands.
            env = {"COUNTERSIGN_URL": base, "COUNTERSIGN_TOKEN": demo.approver_key}
            export = asyncio.create_task(
                session.post(
                    f"{base}/cloud/exports/customers",
                    json={"format": "csv"},
                    headers={**auth, "Countersign-Reason": "quarterly report"},
                )
            )
            listing = ""
            for _ in range(50):
                listing = (await asyncio.to_thread(cli, "approvals", "list", env=env)).stdout
                if "apr_" in listing:
                    break
                await asyncio.sleep(0.1)
            assert "quarterly report" in listing and "agent-7" in listing
            approval_id = next(w for w in listing.split() if w.startswith("apr_"))
            approved = await asyncio.to_thread(
                cli, "approvals", "approve", approval_id, "--reason", "looks fine", env=env
            )
            assert approved.returncode == 0, approved.stderr
            assert f"approval {approval_id}: approved" in approved.stdout
            resp = await asyncio.wait_for(export, 10)
            assert resp.status == 201
            assert resp.headers["Countersign-Approval-Id"] == approval_id
            assert (await resp.json())["export"] == "started"
            resp.release()
