"""Audit hot-path benchmark: event-loop µs per proxied request (its one audit event).

Run from the repository root:  python bench/bench_audit.py [requests]   (default 50,000)

Every request the proxy lets through emits one event, `request.completed`, with everything its
steps knew (proxy/pipeline.py; until 2026-11-30 it was three: `request.received`,
`policy.decided` and `request.forwarded`, 27.4 µs/request here). This builds an `AuditLog` the way
`proxy.app.build_audit` does: the hash-chained file sink (in a temporary directory, group commit
as configured by default) and a `Redactor` holding a few known secrets, as `build_redactor` makes
from a configuration with injected upstream credentials. Two sink sets are timed:

- file: the chained file only (what `make bench` runs);
- file+stdout: the chained file plus the stdout sink (the default configuration), here writing
  to /dev/null.

Only the `emit` calls are timed, inside a running event loop: the file sink's writes and fsyncs
run in a worker thread between batches, as they do in the proxy. Each figure is the best of
several rounds (less noise from the machine), single thread. The breakdown times the stages of
one event on their own (ts, redaction, rendering for a stream sink, sealing into the chain).
At the end the file written is checked: its head, and its first lines verified as a chain.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import audit
from proxy.audit import AuditLog, Sink, StreamSink
from proxy.audit.chain import GENESIS, last_head_of, seal_line, verify_files
from proxy.audit.file_sink import ChainedFileSink
from proxy.audit.redact import Redactor
from proxy.audit.sinks import render
from proxy.model import Identity

ROUNDS = 7
VERIFIED = 30_000  # lines of the file written that are verified as a chain
BATCH = 256  # requests between yields to the loop (the default commit_max_events)
EVENTS_PER_REQUEST = 1  # request.completed

IDENTITY = Identity(
    subject="agent-1",
    issuer="https://idp.example.com",
    client_id="ci",
    groups=frozenset({"ci"}),
)
# As build_redactor derives them from `inject_headers: {Authorization: "Bearer ..."}` and a
# Redis URL with a password.
KNOWN_SECRETS = [
    "Bearer upstream-credential-0123456789",
    "upstream-credential-0123456789",
    "redis-password-42",
]


def requests(count: int, seed: int = 7) -> list[dict[str, Any]]:
    """What the handler knows about each request when it emits (built before timing)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        raw = f"/cloud/buckets/b{rng.randrange(200)}/objects/o{rng.randrange(10**6)}"
        out.append(
            {
                "request_id": uuid.UUID(int=rng.getrandbits(128), version=4).hex,
                "path": raw,
                "method": rng.choice(["GET", "GET", "GET", "HEAD", "PUT"]),
                "bytes_sent": rng.randrange(10_000),
                "duration_ms": round(rng.uniform(0.2, 30.0), 3),
                # A dict of its own per request, as Exchange.identity_log builds it.
                "identity": IDENTITY.to_log(),
            }
        )
    return out


def completed_fields(r: dict[str, Any]) -> dict[str, Any]:
    """The fields `ProxyHandler._completed` passes for an allowed request."""
    return {
        "request_id": r["request_id"],
        "method": r["method"],
        "path": r["path"],
        "remote": "127.0.0.1",
        "identity": r["identity"],
        "route": "cloud",
        "rule": "reads",
        "action": "allow",
        "status": 200,
        "bytes_sent": r["bytes_sent"],
        "duration_ms": r["duration_ms"],
        "error": None,
    }


def emit_request(log: AuditLog, r: dict[str, Any]) -> None:
    """The one event of one allowed request, with the fields the handler passes."""
    log.emit(audit.REQUEST_COMPLETED, **completed_fields(r))


async def run_round(log: AuditLog, reqs: list[dict[str, Any]]) -> float:
    """Seconds spent in `emit` for all of `reqs`, yielding to the loop between batches."""
    spent = 0.0
    perf = time.perf_counter
    for start in range(0, len(reqs), BATCH):
        batch = reqs[start : start + BATCH]
        began = perf()
        for r in batch:
            emit_request(log, r)
        spent += perf() - began
        await asyncio.sleep(0)  # let the commit task hand a batch to the writer thread
    return spent


async def bench_sinks(label: str, make_sinks: Callable[[Path], list[Sink]], count: int) -> None:
    reqs = requests(count)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "audit.jsonl"
        log = AuditLog(make_sinks(path), Redactor(known_secrets=KNOWN_SECRETS))
        times = []
        for _ in range(ROUNDS):
            times.append(await run_round(log, reqs) / count * 1e6)
            await log.sync()
        await log.aclose()
        lines = EVENTS_PER_REQUEST * count * ROUNDS
        size = path.stat().st_size
        head, _ = last_head_of(path)
        assert head is not None and head.seq == lines, head
        # Verifying all of it would take longer than the benchmark: the first lines will do.
        sample = Path(tmp) / "sample.jsonl"
        with path.open("rb") as f:
            sample.write_bytes(b"".join(itertools.islice(f, VERIFIED)))
        report = verify_files([sample])
        assert report.ok and report.lines == min(VERIFIED, lines), report
    print(
        f"  {label:<12} {min(times):6.2f} µs/request (best of {ROUNDS} rounds; median "
        f"{statistics.median(times):.2f}), {min(times) / EVENTS_PER_REQUEST:.2f} µs/event; "
        f"{size / lines:.0f} bytes/line; the first {report.lines:,} lines verified"
    )


def file_sink(path: Path) -> list[Sink]:
    sink = ChainedFileSink(path, commit_interval=0.1, commit_lines=256, max_bytes=None)
    sink.open()
    return [sink]


def file_and_stdout(path: Path) -> list[Sink]:
    devnull = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the process)
    return [StreamSink(devnull), *file_sink(path)]


def per_call(fn: Callable[[], Any], loops: int = 20_000) -> float:
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - start) / loops)
    return best * 1e6


def breakdown() -> None:
    """The stages of one `request.completed` event, each timed on its own."""
    r = requests(1)[0]
    log = AuditLog([], Redactor(known_secrets=KNOWN_SECRETS))
    stamper, add_schema, redactor = log._processors
    fields: dict[str, Any] = {"event": audit.REQUEST_COMPLETED, **completed_fields(r)}
    event = redactor(None, "info", add_schema(None, "info", stamper(None, "info", dict(fields))))
    stages = {
        "timestamp": lambda: stamper(None, "info", {}),
        "redact": lambda: redactor(None, "info", dict(fields)),
        "render": lambda: render(event),
        "seal": lambda: seal_line(event, 1, GENESIS),
    }
    print("\nbreakdown, one request.completed event (µs, each stage on its own):")
    for name, fn in stages.items():
        print(f"  {name:<10} {per_call(fn):6.2f}")


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 50_000
    print(f"Python {platform.python_version()} on {platform.machine()}, {platform.processor()}")
    print(f"{count:,} allowed requests ({EVENTS_PER_REQUEST} audit event each), {ROUNDS} rounds:")
    asyncio.run(bench_sinks("file", file_sink, count))
    asyncio.run(bench_sinks("file+stdout", file_and_stdout, count))
    breakdown()


if __name__ == "__main__":
    main()
