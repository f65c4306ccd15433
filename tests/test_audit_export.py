"""Evidence export: a realistic day of audit events → one CSV/JSONL row per approval."""

from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.audit import AuditLog
from proxy.audit.export import chains_of
from proxy.audit.file_sink import ChainedFileSink

COUNTERSIGN = str(Path(sys.executable).parent / "countersign")


def write_day(path: Path, approvals: int = 1500, passthrough: int = 6000) -> dict[str, str]:
    """A day of traffic through the real sink: mostly reads, some approvals of every outcome.
    Returns approval id → expected outcome."""
    rng = random.Random(7)
    sink = ChainedFileSink(path, max_bytes=1_000_000)  # rotates a few times over the day
    sink.open()
    audit = AuditLog([sink])
    expected: dict[str, str] = {}
    reads_per_approval = passthrough // approvals
    requester = {"subject": "agent-7", "issuer": "idp", "email": "a7@example.com", "owner": "alice"}
    for n in range(approvals):
        for _ in range(reads_per_approval):
            audit.emit(
                "request.completed", request_id=f"r{n}", method="GET", path="/cloud/x", status=200
            )
        approval_id = f"apr_{n:05d}"
        audit.emit(
            "approval.requested",
            approval_id=approval_id,
            rule="exports",
            route="cloud",
            method="POST",
            path=f"/cloud/exports/{n}",
            requester=requester,
            reason='=HYPERLINK("http://evil")' if n == 3 else f"report {n}",
        )
        outcome = rng.choice(["executed", "denied", "expired", "pending"])
        if outcome in ("executed", "denied"):
            verdict = "approve" if outcome == "executed" else "deny"
            audit.emit(
                "approval.decided",
                approval_id=approval_id,
                rule="exports",
                approver={"subject": "bob", "email": "bob@example.com"},
                channel="api",
                verdict=verdict,
                reason="ok" if verdict == "approve" else 'no, because, "x"',
                outcome="approved" if verdict == "approve" else "denied",
            )
        if outcome == "executed":
            audit.emit(
                "request.forwarded",
                approval_id=approval_id,
                rule="exports",
                outcome="completed",
                status=201,
            )
        if outcome in ("executed", "denied"):  # the held request's own last event
            audit.emit(
                "request.completed",
                approval_id=approval_id,
                rule="exports",
                status=201 if outcome == "executed" else 403,
            )
        if outcome == "expired":
            audit.emit("approval.expired", approval_id=approval_id, rule="exports")
        expected[approval_id] = outcome
    sink._commit_now_blocking()
    return expected


def export(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COUNTERSIGN, "audit", "export", *args], capture_output=True, text=True, timeout=120
    )


def files_of(path: Path) -> list[str]:
    return [str(p) for p in sorted(path.parent.glob(path.name + ".*"))] + [str(path)]


def test_a_day_exports_to_a_clean_csv(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    expected = write_day(path)
    files = files_of(path)
    assert len(files) > 2, "the day spans rotated files"
    out = tmp_path / "evidence.csv"
    result = export("--format", "csv", "-o", str(out), *files)
    assert result.returncode == 0, result.stderr
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(expected)
    outcomes = {r["approval_id"]: r["outcome"] for r in rows}
    assert outcomes == expected
    executed = next(r for r in rows if r["outcome"] == "executed")
    assert executed["upstream_status"] == "201"
    assert executed["approvers"] == "bob@example.com (api) approve: ok"
    assert executed["requester"] == "agent-7" and executed["owner"] == "alice"
    assert all(r["chain_intact"] == "yes" for r in rows)
    formula = next(r for r in rows if r["approval_id"] == "apr_00003")
    assert formula["reason"].startswith("'="), "no spreadsheet formula injection"
    assert "1500 approvals" in result.stderr


def test_export_jsonl_and_date_window(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_day(path, approvals=50, passthrough=100)
    result = export("--format", "jsonl", *files_of(path))
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 50 and rows[0]["approval_id"] == "apr_00000"
    result = export("--since", "2000-01-01", "--until", "2000-12-31", *files_of(path))
    assert result.returncode == 0
    assert len(list(csv.reader(io.StringIO(result.stdout)))) == 1  # the header only


def test_export_refuses_a_broken_chain_unless_asked(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    write_day(path, approvals=20, passthrough=40)
    lines = path.read_text().splitlines(keepends=True)
    victim = next(i for i, line in enumerate(lines) if i > 8 and '"GET"' in line)
    lines[victim] = lines[victim].replace('"GET"', '"PUT"')  # tamper with one event
    path.write_text("".join(lines))
    result = export("--format", "csv", str(path))
    assert result.returncode == 1
    assert f"{path}:{victim + 1}: " in result.stderr
    assert "refusing to export" in result.stderr
    result = export("--format", "csv", "--allow-broken", str(path))
    assert result.returncode == 0
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert rows and any(r["chain_intact"] == "NO" for r in rows)
    assert "WARNING" in result.stderr


@pytest.mark.parametrize(
    ("names", "chains"),
    [
        (["a.jsonl"], [["a.jsonl"]]),
        (
            ["a.jsonl", "a.jsonl.20261125T010000", "a.jsonl.20261124T230000"],
            [["a.jsonl.20261124T230000", "a.jsonl.20261125T010000", "a.jsonl"]],
        ),
        (
            ["a.worker-0.jsonl", "a.worker-1.jsonl", "a.worker-0.jsonl.20261125T010000"],
            [["a.worker-0.jsonl.20261125T010000", "a.worker-0.jsonl"], ["a.worker-1.jsonl"]],
        ),
    ],
)
def test_files_group_into_chains(names: list[str], chains: list[list[str]]) -> None:
    assert chains_of(names) == chains
