"""`countersign check` builds what `countersign run` builds: what stops `run` at start-up makes
`check` exit 2 with the same cause, and a config `check` passes starts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import COUNTERSIGN, free_port

ROUTE = '  - {name: cloud, prefix: /cloud/, upstream: "http://127.0.0.1:9/"}'


def _config(tmp_path: Path, port: int, extra: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(f'server: {{listen: "127.0.0.1:{port}"}}\nroutes:\n{ROUTE}\n{extra}')
    return path


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COUNTERSIGN, "check", "-c", str(path)], capture_output=True, text=True, timeout=30
    )


def _run(path: Path) -> subprocess.CompletedProcess[str]:
    # A config that cannot start ends `run` at once; one that can would serve (not these).
    return subprocess.run(
        [COUNTERSIGN, "run", "-c", str(path)], capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    ("extra", "cause"),
    [
        # The audit file's last line is JSON but no chain line: `run` refuses to continue it.
        ("audit: {stdout: false, file: '{dir}/audit.jsonl'}", "cannot continue the chain"),
        # A store URL that is not one.
        ("store: {url: 'mysql://x'}", "unknown store"),
    ],
)
def test_what_stops_run_stops_check(tmp_path: Path, extra: str, cause: str) -> None:
    (tmp_path / "audit.jsonl").write_text('{"event": "x", "seq": 1}\n')
    path = _config(tmp_path, free_port(), extra.replace("{dir}", str(tmp_path)))
    checked = _check(path)
    assert checked.returncode == 2, checked
    assert cause in checked.stdout + checked.stderr
    ran = _run(path)
    assert ran.returncode != 0
    assert cause in ran.stdout + ran.stderr
    assert "Traceback" not in checked.stderr + ran.stderr


def test_a_config_check_passes_starts(tmp_path: Path) -> None:
    port = free_port()
    path = _config(tmp_path, port, f"audit: {{stdout: false, file: '{tmp_path}/new.jsonl'}}")
    checked = _check(path)
    assert checked.returncode == 0, checked
    proc = subprocess.Popen(
        [COUNTERSIGN, "run", "-c", str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        from tests.e2e.conftest import wait_for_port

        wait_for_port(port, proc)  # type: ignore[arg-type]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("approvals: {timout_seconds: 60}", "did you mean 'timeout_seconds'?"),
        ("approvals: {mode: holdd}", "must be one of hold, async"),
        (
            "policy:\n  rules:\n    - {name: r, action: allow, methods: POST}",
            "expected a list",
        ),
        ("routes: []\nroutes: []", "appears twice"),
    ],
)
def test_config_errors_read_the_same_from_check_and_run(
    tmp_path: Path, body: str, message: str
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f'server: {{listen: "127.0.0.1:{free_port()}"}}\n{body}\n')
    checked, ran = _check(path), _run(path)
    assert (checked.returncode, ran.returncode) == (2, 2)
    check_lines = [line for line in checked.stderr.splitlines() if message in line]
    run_lines = [line for line in ran.stderr.splitlines() if message in line]
    assert check_lines and check_lines == run_lines, (checked.stderr, ran.stderr)
