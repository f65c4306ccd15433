"""The audit pipeline end to end (timestamp, redaction, every sink): what it writes must not
change when its hot path gets cheaper.

The golden lines below were written by the code as it was before the audit hot-path work
(commit a67b9d4: structlog's TimeStamper, the lru-cached Redactor, json-encoded seals), for the
events `emit_golden` emits at the clock readings `GOLDEN_TIMES`.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import random
import re
import time
import types
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog

from proxy import audit as audit_module
from proxy.audit import AuditLog, StreamSink
from proxy.audit import redact as redact_module
from proxy.audit.chain import verify_files
from proxy.audit.file_sink import ChainedFileSink
from proxy.audit.redact import REDACTED, SECRET_PATTERNS, SENSITIVE_KEYS, Redactor
from proxy.audit.timestamp import IsoUtcStamper
from tests.helpers import ListSink

GOLDEN_FILE = [
    '{"event":"request.received","hash":"9316ad246fc57d408695c05414a0d7571edb7f6eadbd7e5d061ae13f51f8ec03","method":"GET","path":"/cloud/b%C3%A9/x?token=[REDACTED]","prev_hash":"0000000000000000000000000000000000000000000000000000000000000000","remote":"127.0.0.1","request_id":"2d4fbfe21cac43358f6a7dc71a190ca5","seq":1,"ts":"2026-11-25T16:07:44.050783Z","v":1}',
    '{"action":"allow","event":"policy.decided","hash":"263d4e6bf3ae2864b1bfaf80b26e76fbd27bebfc22f060383b96e95dda18ba73","identity":{"client_id":"ci","email":null,"groups":["ci"],"issuer":"https://idp.example.com","owner":null,"subject":"agent-1"},"method":"GET","path":"/cloud/b\xe9/x","prev_hash":"9316ad246fc57d408695c05414a0d7571edb7f6eadbd7e5d061ae13f51f8ec03","request_id":"2d4fbfe21cac43358f6a7dc71a190ca5","route":"cloud","rule":"reads","seq":2,"ts":"2026-11-25T16:07:44.061355Z","v":1}',
    '{"approval_id":null,"bytes_sent":1234,"duration_ms":2.5e-05,"error":null,"event":"request.forwarded","hash":"8394f78ae9c9b4cbac63184327a656cf566483eeb618e003d18aa9d8d9fea610","identity":{"client_id":"ci","email":null,"groups":["ci"],"issuer":"https://idp.example.com","owner":null,"subject":"agent-1"},"method":"GET","path":"/cloud/b\xe9/x","prev_hash":"263d4e6bf3ae2864b1bfaf80b26e76fbd27bebfc22f060383b96e95dda18ba73","request_id":"2d4fbfe21cac43358f6a7dc71a190ca5","route":"cloud","rule":"reads","seq":3,"status":200,"ts":"2026-11-25T16:07:45Z","v":1}',
    '{"approval_id":"apr_x","event":"approval.requested","expires_at":1795628264.06,"hash":"432dd49adfaa8f1931258b9ed2de0a21a48aa7cdc37c7815537ae8bd10d80b37","nan":"NaN","prev_hash":"8394f78ae9c9b4cbac63184327a656cf566483eeb618e003d18aa9d8d9fea610","quorum":2,"reason":"rotate key [REDACTED] \u2615 \u2028 \\u0000","request_id":"2d4fbfe21cac43358f6a7dc71a190ca5","requester":{"Authorization":"[REDACTED]","email":"a7@example.com","subject":"agent-7"},"seq":4,"tags":["a",1,1.0,null,true],"ts":"2026-11-25T16:07:45.000007Z","v":1}',
]
GOLDEN_STDOUT = [
    '{"event":"request.received","request_id":"2d4fbfe21cac43358f6a7dc71a190ca5","method":"GET","path":"/cloud/b%C3%A9/x?token=[REDACTED]","remote":"127.0.0.1","ts":"2026-11-25T16:07:44.050783Z","v":1}',
    '{"event":"policy.decided","request_id":"2d4fbfe21cac43358f6a7dc71a190ca5","identity":{"subject":"agent-1","issuer":"https://idp.example.com","client_id":"ci","email":null,"groups":["ci"],"owner":null},"method":"GET","path":"/cloud/b\xe9/x","route":"cloud","rule":"reads","action":"allow","ts":"2026-11-25T16:07:44.061355Z","v":1}',
    '{"event":"request.forwarded","request_id":"2d4fbfe21cac43358f6a7dc71a190ca5","identity":{"subject":"agent-1","issuer":"https://idp.example.com","client_id":"ci","email":null,"groups":["ci"],"owner":null},"method":"GET","path":"/cloud/b\xe9/x","route":"cloud","rule":"reads","approval_id":null,"status":200,"bytes_sent":1234,"duration_ms":0.000025,"error":null,"ts":"2026-11-25T16:07:45Z","v":1}',
    '{"event":"approval.requested","approval_id":"apr_x","request_id":"2d4fbfe21cac43358f6a7dc71a190ca5","requester":{"subject":"agent-7","Authorization":"[REDACTED]","email":"a7@example.com"},"reason":"rotate key [REDACTED] \u2615 \u2028 \\u0000","quorum":2,"expires_at":1795628264.06,"nan":null,"tags":["a",1,1.0,null,true],"ts":"2026-11-25T16:07:45.000007Z","v":1}',
]

UTC = datetime.UTC
# The clock readings of the golden events (ns; the last digits below the microsecond are
# dropped, as datetime.now drops them): a whole second, and 7 µs past one, included.
GOLDEN_TIMES = [
    int(datetime.datetime(2026, 11, 25, 16, 7, 44, tzinfo=UTC).timestamp()) * 10**9 + 50_783_999,
    int(datetime.datetime(2026, 11, 25, 16, 7, 44, tzinfo=UTC).timestamp()) * 10**9 + 61_355_000,
    int(datetime.datetime(2026, 11, 25, 16, 7, 45, tzinfo=UTC).timestamp()) * 10**9 + 999,
    int(datetime.datetime(2026, 11, 25, 16, 7, 45, tzinfo=UTC).timestamp()) * 10**9 + 7_000,
]
SECRET = "upstream-credential-0123456789"


def emit_golden(log: AuditLog) -> None:
    identity = {
        "subject": "agent-1",
        "issuer": "https://idp.example.com",
        "client_id": "ci",
        "email": None,
        "groups": ["ci"],
        "owner": None,
    }
    rid = "2d4fbfe21cac43358f6a7dc71a190ca5"
    log.emit(
        "request.received",
        request_id=rid,
        method="GET",
        path=f"/cloud/b%C3%A9/x?token={SECRET}",
        remote="127.0.0.1",
    )
    log.emit(
        "policy.decided",
        request_id=rid,
        identity=identity,
        method="GET",
        path="/cloud/bé/x",
        route="cloud",
        rule="reads",
        action="allow",
    )
    log.emit(
        "request.forwarded",
        request_id=rid,
        identity=identity,
        method="GET",
        path="/cloud/bé/x",
        route="cloud",
        rule="reads",
        approval_id=None,
        status=200,
        bytes_sent=1234,
        duration_ms=2.5e-05,
        error=None,
    )
    log.emit(
        "approval.requested",
        approval_id="apr_x",
        request_id=rid,
        requester={
            "subject": "agent-7",
            "Authorization": "Bearer eyJhbGciOi.eyJzdWIiOi.sig",
            "email": "a7@example.com",
        },
        reason="rotate key AKIAABCDEFGHIJKLMNOP ☕ \u2028 \x00",
        quorum=2,
        expires_at=1795628264.06,
        nan=float("nan"),
        tags=("a", 1, 1.0, None, True),
    )


def fake_clock(monkeypatch: pytest.MonkeyPatch, readings: Iterable[int]) -> None:
    ticks = iter(readings)
    monkeypatch.setattr(time, "time_ns", lambda: next(ticks))


async def test_every_sink_writes_byte_for_byte_what_it_wrote_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_clock(monkeypatch, GOLDEN_TIMES)
    # The golden lines carry the schema version of their day: the pipeline writes whatever
    # SCHEMA_VERSION says, byte for byte the same otherwise.
    monkeypatch.setattr(audit_module, "SCHEMA_VERSION", 1)
    path = tmp_path / "audit.jsonl"
    sink = ChainedFileSink(path)
    sink.open()
    out = io.StringIO()
    log = AuditLog([StreamSink(out), sink], Redactor(known_secrets=[SECRET]))
    emit_golden(log)
    await log.aclose()
    assert path.read_bytes() == "".join(line + "\n" for line in GOLDEN_FILE).encode()
    assert out.getvalue() == "".join(line + "\n" for line in GOLDEN_STDOUT)


async def test_a_file_written_before_verifies_and_its_chain_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes("".join(line + "\n" for line in GOLDEN_FILE).encode())
    report = verify_files([path])
    assert report.ok and report.lines == 4
    sink = ChainedFileSink(path)
    sink.open()
    assert sink.head.seq == 4
    log = AuditLog([sink], Redactor(known_secrets=[SECRET]))
    emit_golden(log)
    await log.aclose()
    report = verify_files([path])
    assert report.ok and report.lines == 8 and report.last_seq == 8


def reference_stamp(ns: int) -> str:
    """What structlog's TimeStamper(fmt="iso", utc=True) writes when datetime.now reads `ns`."""
    micros = ns // 1000
    moment = datetime.datetime.fromtimestamp(micros // 10**6, tz=UTC)
    return moment.replace(microsecond=micros % 10**6).isoformat().replace("+00:00", "Z")


def test_timestamps_are_what_structlog_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    readings = [0, 999, 1000, 10**9, 10**9 + 1000, GOLDEN_TIMES[0], GOLDEN_TIMES[2]]
    readings += [rng.randrange(0, 4_102_444_800 * 10**9) for _ in range(20_000)]
    base = GOLDEN_TIMES[2]  # many readings within one second: the cached part is reused
    readings += sorted(base + rng.randrange(10**9) for _ in range(2000))
    fake_clock(monkeypatch, readings)
    stamper = IsoUtcStamper()
    for ns in readings:
        assert stamper(None, "info", {})["ts"] == reference_stamp(ns), ns
    monkeypatch.undo()
    # And against structlog itself, on the real clock: same shape, in order.
    theirs = structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts")
    shape = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{6})?Z")
    for _ in range(1000):
        before = theirs(None, "info", {})["ts"]
        ours = stamper(None, "info", {})["ts"]
        after = theirs(None, "info", {})["ts"]
        assert shape.fullmatch(ours) and before[:19] <= ours[:19] <= after[:19]


# -- redaction -------------------------------------------------------------------------------


class ReferenceRedactor:
    """The rules of `Redactor`, written the obvious way (as it was, less its cache)."""

    def __init__(self, patterns: Iterable[str], fields: Iterable[str], secrets: Iterable[str]):
        known = sorted({s for s in secrets if len(s) >= 6}, key=len, reverse=True)
        alternatives = [re.escape(s) for s in known] + list(SECRET_PATTERNS) + list(patterns)
        self._pattern = re.compile("|".join(f"(?:{a})" for a in alternatives))
        self._fields = SENSITIVE_KEYS | {f.lower() for f in fields}

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._pattern.sub(REDACTED, value) if value else value
        if isinstance(value, Mapping):
            return {
                k: REDACTED if str(k).lower() in self._fields else self.value(v)
                for k, v in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> Any:
        for key, value in event.items():
            if key.lower() in self._fields:
                event[key] = REDACTED
            elif isinstance(value, (str, Mapping, list, tuple)):
                event[key] = self.value(value)
        return event


class Text(str):
    pass


WORDS = [
    "GET",
    "cloud",
    "",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
    "xoxb-123456-abcdef",
    "AKIAABCDEFGHIJKLMNOP",
    "cs_" + "a" * 25,
    f"Bearer {SECRET}",
    "x" * 300,
    f"pre {SECRET} post" * 20,
    "naïve ☕ 2026-11-25",
    "-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END RSA PRIVATE KEY-----",
]
KEYS: list[Any] = ["path", "Authorization", "TOKEN", "password", "groups", "MyField", "x-api-key"]
KEYS += [1, True, None, 2.5]


def random_value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth < 3 and r < 0.15:
        return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    if depth < 3 and r < 0.22:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if depth < 3 and r < 0.26:
        return tuple(random_value(rng, depth + 1) for _ in range(rng.randrange(3)))
    if depth < 3 and r < 0.28:
        return types.MappingProxyType({rng.choice(KEYS): random_value(rng, depth + 1)})
    if r < 0.30:
        return Text(rng.choice(WORDS))
    if r < 0.33:
        return rng.choice([b"bytes", {1, 2}, 1.5, 0, None, True])
    return rng.choice(WORDS) + (str(rng.randrange(100)) if rng.random() < 0.3 else "")


def shape(value: Any) -> Any:
    """`value` with every type spelled out (1 == True and "a" == Text("a") would hide a change)."""
    if isinstance(value, dict):
        return [(type(k).__name__, repr(k), shape(v)) for k, v in value.items()]
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [shape(v) for v in value])
    return (type(value).__name__, repr(value))


@pytest.mark.parametrize("small_caches", [False, True])
def test_redaction_follows_its_rules(monkeypatch: pytest.MonkeyPatch, small_caches: bool) -> None:
    if small_caches:  # caches that fill and empty all the time
        monkeypatch.setattr(redact_module, "_CACHE_SIZE", 5)
        monkeypatch.setattr(redact_module, "_KEYS_SIZE", 3)
    rng = random.Random(11)
    configs: list[dict[str, Any]] = [
        {},
        {"known_secrets": [SECRET, "abc"]},
        {"known_secrets": [SECRET], "extra_fields": ["MyField"], "extra_patterns": [r"\d{4}-\d\d"]},
    ]
    for config in configs:
        ours = Redactor(**config)
        reference = ReferenceRedactor(
            config.get("extra_patterns", ()),
            config.get("extra_fields", ()),
            config.get("known_secrets", ()),
        )
        for _ in range(3000):
            names = [k for k in KEYS if isinstance(k, str)]
            event = {rng.choice(names): random_value(rng) for _ in range(rng.randrange(8))}
            assert shape(ours(None, "info", dict(event))) == shape(
                reference(None, "info", dict(event))
            )
            value = random_value(rng)
            assert shape(ours.value(value)) == shape(reference.value(value))


async def test_secrets_are_redacted_in_every_sink(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = ChainedFileSink(path)
    sink.open()
    out = io.StringIO()
    listed = ListSink()
    log = AuditLog([StreamSink(out), sink, listed], Redactor(known_secrets=[SECRET]))
    for _ in range(3):  # the second and third time, from the caches
        log.emit(
            "request.received",
            request_id="r1",
            path=f"/x?key={SECRET}",
            identity={"subject": "a", "groups": [f"Bearer {SECRET}"], "Cookie": "c=1"},
            Authorization="Basic dXNlcjpwYXNz",
            note=("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig", "x" * 300 + SECRET),
        )
    await log.aclose()
    written = [path.read_text(), out.getvalue(), repr(listed.events)]
    for text in written:
        for secret in (SECRET, "dXNlcjpwYXNz", "c=1", "eyJhbGciOiJIUzI1NiJ9"):
            assert secret not in text
        assert text.count(REDACTED) == 3 * 6


# -- the stdout sink -------------------------------------------------------------------------


async def test_a_burst_past_max_lines_schedules_one_flush(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    scheduled = 0
    call_later = loop.call_later

    def counting(delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        nonlocal scheduled
        scheduled += 1
        return call_later(delay, callback, *args)

    monkeypatch.setattr(loop, "call_later", counting)
    out = io.StringIO()
    sink = StreamSink(out, max_lines=10)
    for i in range(1000):
        sink.write({"event": "x", "i": i})
    assert scheduled == 2  # the interval's timer, then one to flush at once
    await asyncio.sleep(0.05)
    for i in range(1000, 1100):
        sink.write({"event": "x", "i": i})
    await sink.aclose()
    lines = out.getvalue().splitlines()
    assert [f'{{"event":"x","i":{i}}}' for i in range(1100)] == lines


async def test_emit_soon_batches_a_loop_turn_and_keeps_the_chain_in_emission_order(
    tmp_path: Path,
) -> None:
    """`request.completed` goes through `emit_soon`: written at the end of the loop turn, with
    the others of that turn, yet never after an event emitted later, and always before `sync`
    returns; the chained file verifies."""
    sink = ChainedFileSink(tmp_path / "audit.jsonl")
    sink.open()
    log = AuditLog([sink])
    log.emit_soon({"event": "request.completed", "request_id": "r1", "token": "sk-" + "a" * 40})
    log.emit_soon({"event": "request.completed", "request_id": "r2"})
    assert sink.head.seq == 0  # not yet: at the end of this turn
    log.emit("request.forwarded", request_id="r3")  # emitted later: written after them
    log.emit_soon({"event": "request.completed", "request_id": "r4"})
    await asyncio.sleep(0)  # the turn ends
    log.emit_soon({"event": "request.completed", "request_id": "r5"})
    await log.sync()  # pending ones are written before it returns
    await log.aclose()
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    import json

    events = [json.loads(line) for line in lines]
    assert [e["request_id"] for e in events] == ["r1", "r2", "r3", "r4", "r5"]
    assert all(e["v"] == audit_module.SCHEMA_VERSION and "ts" in e for e in events)
    assert "sk-" not in lines[0]  # redacted like any event
    assert verify_files([tmp_path / "audit.jsonl"]).ok


def test_emit_soon_without_a_loop_writes_at_once(tmp_path: Path) -> None:
    sink = ChainedFileSink(tmp_path / "audit.jsonl")
    sink.open()
    log = AuditLog([sink])
    log.emit_soon({"event": "request.completed", "request_id": "cli"})
    assert sink.head.seq == 1
