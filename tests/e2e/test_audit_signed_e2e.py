"""Signed checkpoints and anchors through the real `countersign run`: the proxy signs its chain,
the anchors (a WORM-like file and an https witness) keep every checkpoint, a witness outage is
audited, counted and caught up on, and `countersign audit verify` holds the files against the
anchors after shutdown — and names the forgery of a hostile administrator."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from proxy.audit.chain import GENESIS, ChainHead, canonical, seal
from proxy.audit.signing import new_signing_key
from tests.e2e.conftest import free_port
from tests.e2e.test_audit_e2e import AGENT, ALICE_KEY, StartFn, held_and_approved
from tests.e2e.test_audit_e2e import config as audit_config
from tests.witness import Witness

ROOT = Path(__file__).resolve().parent.parent.parent
WITNESS_SECRET = "witness-secret-5c1d"


def config(port: int, upstream: str, tmp_path: Path, witness: str) -> tuple[str, Path, Path]:
    key = new_signing_key()
    private = tmp_path / "audit-ed25519.pem"
    public = tmp_path / "audit-ed25519.pub.pem"
    private.write_bytes(key.private_pem())
    public.write_bytes(key.public_pem())
    audit_file = tmp_path / "audit" / "audit.jsonl"
    worm = tmp_path / "worm" / "checkpoints.jsonl"
    text = audit_config(port, upstream, audit_file).replace(
        "  commit_interval_ms: 1000\n",
        f"""  commit_interval_ms: 20
  signing_key: "{private}"
  checkpoint_seconds: 0.2
  anchors:
    - "file://{worm}"
    - {{url: "{witness}", secret: "{WITNESS_SECRET}"}}
""",
    )
    return text, public, worm


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "verify", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "COUNTERSIGN_ANCHOR_SECRET": WITNESS_SECRET},
    )


async def wait_for(condition: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("timed out")


async def test_signed_trail_with_anchors_through_the_real_process(
    run_countersign: StartFn, upstream: TestServer, tmp_path: Path
) -> None:
    async with Witness(secret=WITNESS_SECRET) as witness:
        port = free_port()
        text, public, worm = config(port, str(upstream.make_url("/")), tmp_path, witness.url)
        audit_file = tmp_path / "audit" / "audit.jsonl"
        proc = run_countersign(text, port)
        async with aiohttp.ClientSession() as session:
            for _ in range(5):
                async with session.get(f"{proc.url}/cloud/buckets", headers=AGENT) as resp:
                    assert resp.status == 200
            approval_id, status = await held_and_approved(session, proc.url, {"n": 1})
            assert status == 200
            await wait_for(lambda: len(witness.records) >= 1)

            # The witness goes down: requests are not held up, the outage is audited and
            # counted, and what it missed arrives once it is back.
            witness.failing = True
            for _ in range(5):
                async with session.get(f"{proc.url}/cloud/buckets", headers=AGENT) as resp:
                    assert resp.status == 200
            await wait_for(
                lambda: any(line["event"] == "audit.anchor_failed" for line in lines_of(audit_file))
            )
            async with session.get(f"{proc.url}/_countersign/metrics") as resp:
                metrics = await resp.text()
            failures = [
                line
                for line in metrics.splitlines()
                if line.startswith("countersign_audit_anchor_failures_total{")
            ]
            assert failures and float(failures[0].rsplit(" ", 1)[1]) >= 1
            assert "countersign_audit_checkpoints_total" in metrics
            witness.failing = False
            await wait_for(
                lambda: any(
                    line["event"] == "audit.anchor_resumed" for line in lines_of(audit_file)
                )
            )
        # In a thread: the witness answers from this test's loop while the proxy shuts down.
        assert await asyncio.to_thread(proc.stop) == 0

    lines = lines_of(audit_file)
    assert lines[-1]["event"] == "audit.checkpoint"  # signed at shutdown
    statements = [line["checkpoint"] for line in lines if line["event"] == "audit.checkpoint"]
    kept = [json.loads(line) for line in worm.read_text().splitlines()]
    assert kept == statements  # every checkpoint, in order, in the WORM file
    assert witness.records == statements  # and at the witness, after its outage
    assert any(line.get("approval_id") == approval_id for line in lines)

    done = verify("--public-key", str(public), "--anchor", f"file://{worm}", str(audit_file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1].startswith("OK: signed and intact up to ")

    # A hostile administrator turns the decision around and re-chains the file.
    decided = next(i for i, line in enumerate(lines) if line["event"] == "approval.decided")
    lines[decided]["approver"] = {"subject": "ciso", "email": "ciso@example.com"}
    head = ChainHead(lines[decided - 1]["seq"], lines[decided - 1]["hash"]) if decided else None
    head = head or ChainHead(0, GENESIS)
    forged = lines[:decided]
    for line in lines[decided:]:
        event = {k: v for k, v in line.items() if k not in ("seq", "prev_hash", "hash")}
        sealed, head = seal(event, head)
        forged.append(json.loads(sealed))
    audit_file.write_text("".join(canonical(line) + "\n" for line in forged))
    assert verify(str(audit_file)).returncode == 0  # the chain alone cannot tell
    done = verify("--public-key", str(public), "--anchor", f"file://{worm}", str(audit_file))
    assert done.returncode == 1
    assert "re-chained" in done.stdout.splitlines()[-1]


async def test_a_witness_read_back_by_verify(
    run_countersign: StartFn, upstream: TestServer, tmp_path: Path
) -> None:
    async with Witness(secret=WITNESS_SECRET) as witness:
        port = free_port()
        text, public, _ = config(port, str(upstream.make_url("/")), tmp_path, witness.url)
        audit_file = tmp_path / "audit" / "audit.jsonl"
        proc = run_countersign(text, port)
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                async with session.get(f"{proc.url}/cloud/buckets", headers=AGENT) as resp:
                    assert resp.status == 200
        # In a thread: the witness answers from this test's loop while the proxy shuts down.
        assert await asyncio.to_thread(proc.stop) == 0
        await wait_for(lambda: witness.records and witness.records[-1]["seq"] > 3)
        done = await asyncio.to_thread(
            verify, "--public-key", str(public), "--anchor", witness.url, str(audit_file)
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "anchored: " in done.stdout
        # Cut the end: the witness remembers.
        lines = audit_file.read_text().splitlines(keepends=True)
        audit_file.write_text("".join(lines[:-2]))
        done = await asyncio.to_thread(
            verify, "--public-key", str(public), "--anchor", witness.url, str(audit_file)
        )
        assert done.returncode == 1 and "removed" in done.stdout
    assert ALICE_KEY  # the approver of the shared config, unused here
