"""What signing the audit trail costs: checkpoints, receipts, and verifying a signed log.

Run from the repository root:  .venv/bin/python bench/bench_signing.py [requests]  (default 30,000)

- Ed25519: one signature over a checkpoint statement, and one whole checkpoint as the sink writes
  it (statement, signature, sealing its line into the chain);
- the audit hot path: event-loop µs per allowed request (its three events, as bench_audit.py
  emits them) into the chained file, without signing and with signing at the default
  `checkpoint_seconds: 10`, and at 0.01 s (a checkpoint every few hundred requests: the worst
  case a configuration allows is far above this);
- receipts: building and signing one (pyjwt, EdDSA), and verifying one;
- `audit verify`: lines per second for the hash chain alone and with every checkpoint checked.

Figures are the best of several rounds, one thread, on whatever else the machine is doing.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_audit import requests, run_round
from proxy.audit import AuditLog
from proxy.audit.chain import verify_files
from proxy.audit.evidence import check_evidence
from proxy.audit.file_sink import ChainedFileSink, Signing
from proxy.audit.receipts import receipt_payload, sign_receipt, verify_receipt
from proxy.audit.signing import checkpoint_statement, new_signing_key
from proxy.audit.sinks import ChainPosition
from proxy.model import Approval, ApprovalState, DecisionRecord, Requester, Verdict

ROUNDS = 5


def best_us(call: Callable[[], Any], n: int) -> float:
    for _ in range(min(n, 200)):
        call()
    best = float("inf")
    for _ in range(ROUNDS):
        started = time.perf_counter()
        for _ in range(n):
            call()
        best = min(best, (time.perf_counter() - started) / n)
    return best * 1e6


def approval() -> Approval:
    now = time.time()
    return Approval(
        id="apr_0123456789abcdef",
        fingerprint="f" * 64,
        state=ApprovalState.EXECUTED,
        created_at=now - 60,
        expires_at=now + 840,
        rule="exports",
        route="cloud",
        method="POST",
        path="/cloud/exports/run",
        query="",
        requester=Requester(subject="agent-7", issuer="api-key", owner="bob@example.com"),
        approver_groups=("data-owners",),
        approver_users=(),
        quorum=1,
        decisions=(
            DecisionRecord(
                verdict=Verdict.APPROVE,
                approver_subject="alice",
                approver_email="alice@example.com",
                channel="slack",
                reason="quarterly export",
                at=now - 30,
                approver_issuer="https://idp.example.com",
                person="alice@example.com",
            ),
        ),
        executed_at=now - 1,
        upstream_status=200,
        target="/exports/run",
        upstream_url="https://cloud.internal/exports/run",
        body_sha256="b" * 64,
    )


async def hot_path(count: int, interval: float | None) -> tuple[float, int]:
    """Event-loop µs per request, and the checkpoints written, for one signing setting."""
    reqs = requests(count)
    key = new_signing_key()
    best = float("inf")
    checkpoints = 0
    for _ in range(ROUNDS):
        with tempfile.TemporaryDirectory() as tmp:
            signing = None if interval is None else Signing(key, interval=interval)
            sink = ChainedFileSink(Path(tmp) / "audit.jsonl", signing=signing)
            sink.open()
            log = AuditLog([sink])
            spent = await run_round(log, reqs)
            await log.aclose()
            text = (Path(tmp) / "audit.jsonl").read_text()
            checkpoints = text.count('"event":"audit.checkpoint"')
        best = min(best, spent)
    return best / count * 1e6, checkpoints


async def main(count: int) -> None:
    key = new_signing_key()
    statement = checkpoint_statement(
        chain="0123456789abcdef",
        seq=123456,
        head_hash="a" * 64,
        ts="2026-11-30T15:00:00Z",
        prev_checkpoint=123400,
    )
    sign_us = best_us(lambda: key.sign_statement(dict(statement)), 2000)

    with tempfile.TemporaryDirectory() as tmp:
        sink = ChainedFileSink(Path(tmp) / "a.jsonl", signing=Signing(key))
        sink.open()

        def one_checkpoint() -> None:
            sink.write({"event": "x"})
            sink.checkpoint()

        checkpoint_us = best_us(one_checkpoint, 2000)
        await sink.aclose()

    plain, _ = await hot_path(count, None)
    default, default_checkpoints = await hot_path(count, 10.0)
    busy, busy_checkpoints = await hot_path(count, 0.01)

    executed = approval()
    position = ChainPosition("0123456789abcdef", 4242, "c" * 64)

    def issue() -> str:
        payload = receipt_payload(
            executed,
            status=200,
            response_sha256="d" * 64,
            response_bytes=1234,
            response_complete=True,
            audit=position,
            issued_at=time.time(),
            issuer="https://countersign.example.com",
        )
        return sign_receipt(key, payload)

    issue_us = best_us(issue, 2000)
    token = issue()
    keys = {key.key_id: key.public}
    verify_us = best_us(lambda: verify_receipt(token, keys), 2000)

    # A signed log of `count` requests with a checkpoint every ~100 lines, verified both ways.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.jsonl"
        sink = ChainedFileSink(path, signing=Signing(key, interval=3600))
        sink.open()
        log = AuditLog([sink])
        for start in range(0, count, 32):
            await run_round(log, requests(32, seed=start))
            sink.checkpoint()
        await log.aclose()
        lines = sum(1 for _ in path.open("rb"))
        started = time.perf_counter()
        assert verify_files([path]).ok
        chain_s = time.perf_counter() - started
        started = time.perf_counter()
        report = check_evidence([path], keys)
        assert report.ok, report.problem
        signed_s = time.perf_counter() - started

    print(f"Ed25519 signature over a checkpoint statement: {sign_us:.1f} µs")
    print(f"one checkpoint (statement, signature, its line sealed): {checkpoint_us:.1f} µs")
    print(f"audit per allowed request (3 events), event loop, {count:,} requests:")
    print(f"  unsigned:                      {plain:.2f} µs")
    print(
        f"  signed, checkpoint_seconds 10: {default:.2f} µs "
        f"({default_checkpoints} checkpoints in the run)"
    )
    print(
        f"  signed, checkpoint_seconds 0.01: {busy:.2f} µs "
        f"({busy_checkpoints} checkpoints in the run)"
    )
    print(f"receipt: build and sign {issue_us:.1f} µs, verify {verify_us:.1f} µs")
    print(
        f"audit verify, {lines:,} lines ({report.checkpoints:,} checkpoints): chain alone "
        f"{lines / chain_s:,.0f} lines/s, with signatures {lines / signed_s:,.0f} lines/s"
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 30_000))
