"""The pure core (DESIGN §3): `proxy.model` imports no aiohttp, redis or slack, and names no HTTP
status; the store builds on it without importing the approvals service."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MODEL = Path(__file__).resolve().parent.parent / "proxy" / "model"


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return {name.split(".")[0] for name in out.split()} | set(out.split())


def test_the_model_imports_no_framework() -> None:
    loaded = _loaded_after("import proxy.model, proxy.model.state, proxy.model.binding")
    for framework in ("aiohttp", "redis", "slack_sdk", "slack_bolt", "structlog"):
        assert framework not in loaded


def test_the_store_does_not_import_the_approvals_service() -> None:
    loaded = _loaded_after("import proxy.store.memory, proxy.store.base")
    assert "proxy.approvals.service" not in loaded


def test_the_model_names_no_http_status() -> None:
    for source in MODEL.glob("*.py"):
        text = source.read_text()
        for status in ("status = 4", "status = 5", "status=4", "status=5"):
            assert status not in text, f"{source.name} chooses an HTTP status"
