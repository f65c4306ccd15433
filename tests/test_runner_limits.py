"""`server.max_connections` against the process's open-file limit (proxy.server.runner)."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import resource, structlog
structlog.configure(logger_factory=structlog.PrintLoggerFactory())
resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
from proxy.server.runner import connection_cap
print("cap", connection_cap({configured}))
print("soft", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def probe(soft: int, hard: int, configured: int) -> str:
    code = _PROBE.format(soft=soft, hard=hard, configured=configured)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_the_soft_limit_is_raised_to_fit_the_connection_cap() -> None:
    out = probe(1024, 4096, 2000)
    assert "cap 2000" in out
    assert "soft 3100" in out  # 2,000 client connections + 1,100 for everything else


def test_a_cap_the_hard_limit_cannot_hold_is_lowered_with_a_warning() -> None:
    out = probe(1024, 1024, 10_000)
    assert "cap 512" in out
    assert "server.max_connections_lowered" in out and "open_file_limit=1024" in out
