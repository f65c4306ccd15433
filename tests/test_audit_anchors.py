"""Anchors of signed checkpoints: a file, a real Redis stream and a witness over HTTP, each kept in
order, read back, down and back again, bounded, and flushed at shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from proxy.audit import anchors as anchors_module
from proxy.audit.anchors import (
    ANCHOR_FAILED,
    ANCHOR_RESUMED,
    AnchorSet,
    AnchorUnreadable,
    FileAnchor,
    RedisAnchor,
    anchor_name,
    build_anchors,
    read_anchor,
)
from proxy.audit.chain import canonical
from proxy.audit.signing import (
    SigningKey,
    checkpoint_statement,
    new_signing_key,
    rotation_statement,
    verify_statement,
)
from proxy.config import AnchorSettings, AuditSettings
from proxy.server.metrics import Metrics
from tests.redis_fixture import RedisServer, _free_port
from tests.witness import Witness

SECRET = "witness-hmac-secret-7"
FAST = {"first_delay": 0.02, "max_delay": 0.1}  # backoff for tests


class Hooks:
    """What an AnchorSet reports: events (AuditLog.emit's shape) and failed attempts."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.failures: list[str] = []

    def event(self, event: str, /, **fields: Any) -> None:
        self.events.append((event, fields))

    def failure(self, anchor: str) -> None:
        self.failures.append(anchor)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for name, fields in self.events if name == event]


def statements(n: int, key: SigningKey | None = None) -> list[dict[str, Any]]:
    """`n` signed checkpoints of one chain, a key rotation second (if n > 1)."""
    key = key or new_signing_key()
    chain = secrets.token_hex(8)
    out: list[dict[str, Any]] = []
    for i in range(n):
        ts = f"2026-11-30T15:00:{i % 60:02d}.000000Z"
        if i == 1:
            out.append(
                rotation_statement(
                    key,
                    chain=chain,
                    seq=10 * i,
                    head_hash="b" * 64,
                    ts=ts,
                    previous_key_id="0" * 16,
                )
            )
            continue
        statement = checkpoint_statement(
            chain=chain, seq=10 * i, head_hash=f"{i:064x}", ts=ts, prev_checkpoint=10 * (i - 1)
        )
        out.append(key.sign_statement(statement))
    return out


async def wait_for(predicate: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def drained(anchors: AnchorSet, seconds: float = 10) -> None:
    await asyncio.wait_for(anchors.drained(), seconds)


Make = Callable[..., AnchorSet]


@pytest.fixture
async def make_anchors() -> AsyncIterator[Make]:
    """`build_anchors`, closed at the end of the test even if it failed."""
    made: list[AnchorSet] = []

    def make(*args: Any, **kwargs: Any) -> AnchorSet:
        made.append(build_anchors(*args, **kwargs))
        return made[-1]

    yield make
    for anchors in made:
        await anchors.aclose(timeout=0)


@pytest.fixture
async def witness() -> AsyncIterator[Witness]:
    async with Witness(secret=SECRET) as server:
        yield server


def stream_url(server: RedisServer, **params: Any) -> str:
    params.setdefault("stream", "test-anchor-" + secrets.token_hex(6))
    return server.url + "?" + "&".join(f"{k}={v}" for k, v in params.items())


# --- each kind keeps what it is sent, in order, and gives it back ------------------------------


async def test_file_anchor_appends_canonical_lines_and_reads_them_back(
    tmp_path: Path, make_anchors: Make
) -> None:
    path = tmp_path / "worm" / "countersign" / "checkpoints.jsonl"  # parent dirs missing
    url = f"file://{path}"
    hooks = Hooks()
    anchors = make_anchors(
        [AnchorSettings(url=url)], on_event=hooks.event, on_failure=hooks.failure
    )
    key = new_signing_key()
    records = statements(3, key)
    for record in records:
        anchors.send(record)
    await drained(anchors)
    assert path.read_text() == "".join(canonical(r) + "\n" for r in records)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o640 & ~umask
    assert await anchors.aclose() == 0

    back = read_anchor(url)
    assert back == records and back.warnings == []
    assert all(verify_statement(r, {key.key_id: key.public}) is None for r in back)
    assert anchors.names == (url,) and hooks.events == [] and hooks.failures == []


async def test_file_reader_skips_torn_and_foreign_lines_and_a_new_line_starts_fresh(
    tmp_path: Path,
) -> None:
    path = tmp_path / "checkpoints.jsonl"
    path.write_text('[1, 2]\n{"type":"countersign.checkpoint","seq":4')  # a torn last line
    anchor = FileAnchor(path)
    record = statements(1)[0]
    await anchor.deliver(record)
    await anchor.aclose()

    back = read_anchor(f"file://{path}")
    assert back == [record]
    assert len(back.warnings) == 2
    assert "line 1: not a JSON object" in back.warnings[0]
    assert "line 2: not JSON" in back.warnings[1]
    assert path.read_text().endswith('"seq":4\n' + canonical(record) + "\n")


async def test_redis_anchor_adds_each_record_to_the_stream_untrimmed(
    fresh_redis: RedisServer, make_anchors: Make
) -> None:
    url = stream_url(fresh_redis)
    stream = url.rsplit("stream=", 1)[1]
    anchors = make_anchors([AnchorSettings(url=url)])
    records = statements(5)
    for record in records:
        anchors.send(record)
    await drained(anchors)
    await anchors.aclose()

    client = redis.Redis.from_url(fresh_redis.url)
    try:
        entries = client.xrange(stream)
    finally:
        client.close()
    assert [fields for _, fields in entries or []] == [
        {b"record": canonical(r).encode()} for r in records
    ]
    back = read_anchor(url)
    assert back == records and back.warnings == []


async def test_redis_anchor_trims_only_when_told_and_reads_long_streams_in_pages(
    fresh_redis: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = statements(10)
    trimmed = stream_url(fresh_redis, maxlen=2)
    anchor = RedisAnchor(trimmed)
    for record in records:
        await anchor.deliver(record)
    await anchor.aclose()
    assert read_anchor(trimmed) == records[-2:]

    paged = stream_url(fresh_redis)
    anchor = RedisAnchor(paged)
    for record in records:
        await anchor.deliver(record)
    await anchor.aclose()
    monkeypatch.setattr(anchors_module, "_REDIS_PAGE", 3)
    assert read_anchor(paged) == records


async def test_redis_anchor_default_stream_key(fresh_redis: RedisServer) -> None:
    url = f"redis://127.0.0.1:{fresh_redis.port}/7"  # a database of its own: the key is fixed
    client = redis.Redis.from_url(url)
    client.delete("countersign:checkpoints")
    try:
        anchor = RedisAnchor(url)
        record = statements(1)[0]
        await anchor.deliver(record)
        await anchor.aclose()
        assert client.xlen("countersign:checkpoints") == 1
        assert read_anchor(url) == [record]
    finally:
        client.delete("countersign:checkpoints")
        client.close()


async def test_https_anchor_posts_records_signed_like_webhooks(
    witness: Witness, make_anchors: Make
) -> None:
    anchors = make_anchors([AnchorSettings(url=witness.url, secret=SECRET)])  # no session given
    records = statements(3)
    for record in records:
        anchors.send(record)
    await drained(anchors)
    assert await anchors.aclose() == 0

    assert witness.records == records  # every signature verified, or the witness keeps nothing
    assert witness.rejected == 0
    assert witness.events == ["audit.checkpoint", "audit.key_rotated", "audit.checkpoint"]
    back = await asyncio.to_thread(read_anchor, witness.url, secret=SECRET)
    assert back == records and back.warnings == []
    witness.as_array = True
    assert await asyncio.to_thread(read_anchor, witness.url, secret=SECRET) == records
    with pytest.raises(AnchorUnreadable, match=r"anchor http://127\.0\.0\.1:\d+/anchor .*401"):
        await asyncio.to_thread(read_anchor, witness.url)  # this witness wants signed reads


async def test_a_given_session_is_used_and_left_open(witness: Witness, make_anchors: Make) -> None:
    async with aiohttp.ClientSession() as session:
        anchors = make_anchors([AnchorSettings(url=witness.url, secret=SECRET)], session=session)
        anchors.send(statements(1)[0])
        await drained(anchors)
        await anchors.aclose()
        assert not session.closed
        assert len(witness.records) == 1


async def test_a_wrong_secret_is_refused_retried_and_counted_until_it_is_right(
    witness: Witness, make_anchors: Make
) -> None:
    hooks = Hooks()
    metrics = Metrics()

    def failure(anchor: str) -> None:
        hooks.failure(anchor)
        metrics.anchor_failure(anchor)

    anchors = make_anchors(
        [AnchorSettings(url=witness.url, secret="not-the-witness-secret")],
        on_event=hooks.event,
        on_failure=failure,
        **FAST,
    )
    records = statements(2)
    for record in records:
        anchors.send(record)
    await wait_for(lambda: len(hooks.failures) >= 3)
    assert witness.records == [] and witness.rejected >= 3
    [failed] = hooks.named(ANCHOR_FAILED)  # once for the outage, not once per attempt
    assert failed["anchor"] == witness.url and failed["pending"] == 2
    assert "HTTP 401" in failed["error"]
    assert set(hooks.failures) == {witness.url}

    witness.secret = "not-the-witness-secret"  # the witness learns the secret: deliveries resume
    await drained(anchors)
    assert witness.records == records
    [resumed] = hooks.named(ANCHOR_RESUMED)
    assert resumed["anchor"] == witness.url and resumed["delivered"] == 2
    assert resumed["dropped"] == 0 and resumed["outage_seconds"] > 0
    await anchors.aclose()

    families = text_string_to_metric_families(metrics.render().decode())
    counted = {
        s.labels["anchor"]: s.value
        for f in families
        for s in f.samples
        if s.name == "countersign_audit_anchor_failures_total"
    }
    assert counted == {witness.url: float(len(hooks.failures))}


# --- outages ------------------------------------------------------------------------------------


async def test_redis_down_and_back_delivers_everything_in_order(
    fresh_redis: RedisServer, make_anchors: Make
) -> None:
    url = stream_url(fresh_redis)
    hooks = Hooks()
    anchors = make_anchors(
        [AnchorSettings(url=url)], on_event=hooks.event, on_failure=hooks.failure, **FAST
    )
    records = statements(4)
    anchors.send(records[0])
    await drained(anchors)

    fresh_redis.stop()
    for record in records[1:]:
        anchors.send(record)
    await wait_for(lambda: len(hooks.failures) >= 2)
    [failed] = hooks.named(ANCHOR_FAILED)
    assert failed["pending"] == 3 and failed["anchor"] == url
    assert anchors.status()[0].failing and anchors.status()[0].pending == 3

    fresh_redis.start()  # the append-only file keeps what Redis held
    await drained(anchors)
    [resumed] = hooks.named(ANCHOR_RESUMED)
    assert resumed["delivered"] == 3 and resumed["dropped"] == 0
    assert len(hooks.named(ANCHOR_FAILED)) == 1
    assert await anchors.aclose() == 0
    assert read_anchor(url) == records


async def test_one_anchor_down_holds_back_no_other(
    witness: Witness, tmp_path: Path, make_anchors: Make
) -> None:
    file_path = tmp_path / "checkpoints.jsonl"
    file_url = f"file://{file_path}"
    hooks = Hooks()
    anchors = make_anchors(
        [AnchorSettings(url=witness.url, secret=SECRET), AnchorSettings(url=file_url)],
        on_event=hooks.event,
        on_failure=hooks.failure,
        **FAST,
    )
    witness.failing = True
    records = statements(3)
    for record in records:
        anchors.send(record)
    await wait_for(lambda: file_path.exists() and len(read_anchor(file_url)) == 3)
    await wait_for(lambda: len(hooks.failures) >= 2)
    assert witness.records == []
    assert [f["anchor"] for f in hooks.named(ANCHOR_FAILED)] == [witness.url]

    witness.failing = False
    await drained(anchors)
    assert witness.records == records
    assert [f["anchor"] for f in hooks.named(ANCHOR_RESUMED)] == [witness.url]
    await anchors.aclose()


async def test_a_full_queue_drops_the_oldest_and_counts(
    witness: Witness, make_anchors: Make
) -> None:
    hooks = Hooks()
    # A long backoff: the records below queue up while the anchor waits to retry.
    anchors = make_anchors(
        [AnchorSettings(url=witness.url, secret=SECRET)],
        on_event=hooks.event,
        on_failure=hooks.failure,
        queue_limit=3,
        first_delay=20.0,
    )
    witness.failing = True
    records = statements(10)
    anchors.send(records[0])
    await wait_for(lambda: len(hooks.failures) == 1)
    for record in records[1:]:
        anchors.send(record)
    [status] = anchors.status()
    assert (status.pending, status.dropped, status.delivered) == (3, 7, 0)

    witness.failing = False
    started = time.monotonic()
    assert await anchors.aclose(timeout=5) == 0  # closing cuts the 20-second backoff short
    assert time.monotonic() - started < 3
    assert witness.records == records[-3:]  # the newest
    [resumed] = hooks.named(ANCHOR_RESUMED)
    assert resumed["delivered"] == 3 and resumed["dropped"] == 7


# --- shutdown -----------------------------------------------------------------------------------


async def test_aclose_delivers_what_is_queued(
    witness: Witness, tmp_path: Path, make_anchors: Make
) -> None:
    file_url = f"file://{tmp_path / 'checkpoints.jsonl'}"
    anchors = make_anchors(
        [AnchorSettings(url=witness.url, secret=SECRET), AnchorSettings(url=file_url)]
    )
    records = statements(20)
    for record in records:
        anchors.send(record)
    assert await anchors.aclose(timeout=5) == 0
    assert witness.records == records
    assert read_anchor(file_url) == records
    anchors.send(records[0])  # after closing: ignored, never raised
    assert anchors.status()[0].pending == 0


async def test_aclose_gives_up_after_its_timeout_when_an_anchor_stays_down(
    witness: Witness, make_anchors: Make
) -> None:
    hooks = Hooks()
    anchors = make_anchors(
        [AnchorSettings(url=witness.url, secret=SECRET)],
        on_event=hooks.event,
        on_failure=hooks.failure,
        **FAST,
    )
    witness.failing = True
    for record in statements(2):
        anchors.send(record)
    started = time.monotonic()
    with capture_logs() as logs:
        left = await anchors.aclose(timeout=0.5)
    elapsed = time.monotonic() - started
    assert left == 2
    assert 0.5 <= elapsed < 2.5
    assert len(hooks.failures) >= 3  # it kept trying until the time was up
    [undelivered] = [e for e in logs if e["event"] == "audit.anchor_undelivered"]
    assert undelivered["anchor"] == witness.url and undelivered["records"] == 2
    await asyncio.sleep(0.1)  # a request already on the wire when the task stopped lands now
    attempts = witness.attempts
    await asyncio.sleep(0.3)
    assert witness.attempts == attempts  # stopped for good


async def test_records_sent_before_the_loop_runs_wait_for_it(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'c.jsonl'}"
    records = statements(2)

    def outside_the_loop() -> AnchorSet:
        anchors = build_anchors([AnchorSettings(url=url)])
        anchors.send(records[0])  # no running loop in this thread: queued, not lost
        return anchors

    anchors = await asyncio.to_thread(outside_the_loop)
    anchors.send(records[1])
    await drained(anchors)
    await anchors.aclose()
    assert read_anchor(url) == records


# --- reading back: dead anchors, names ----------------------------------------------------------


async def test_read_anchor_names_an_anchor_it_cannot_read(tmp_path: Path, witness: Witness) -> None:
    with pytest.raises(AnchorUnreadable, match=r"cannot read anchor file://.*missing\.jsonl"):
        read_anchor(f"file://{tmp_path / 'missing.jsonl'}")

    port = _free_port()
    with pytest.raises(AnchorUnreadable) as caught:
        read_anchor(f"redis://:hunter2@127.0.0.1:{port}/0?stream=x", timeout=1)
    assert f"cannot read anchor redis://127.0.0.1:{port}/0?stream=x" in str(caught.value)
    assert "hunter2" not in str(caught.value)

    dead_http = f"http://127.0.0.1:{_free_port()}/anchor?token=abc123"
    with pytest.raises(AnchorUnreadable, match=r"cannot read anchor http://127\.0\.0\.1") as caught:
        read_anchor(dead_http, timeout=1)
    assert "abc123" not in str(caught.value)

    witness.failing = True
    with pytest.raises(AnchorUnreadable, match="answered HTTP 503"):
        await asyncio.to_thread(read_anchor, witness.url, secret=SECRET)


def test_anchor_names_hide_passwords_and_tokens() -> None:
    assert anchor_name("redis://:pw@redis:6379/0?stream=cp&maxlen=5") == (
        "redis://redis:6379/0?stream=cp&maxlen=5"
    )
    assert anchor_name("rediss://user:pw@redis:6380/1") == "rediss://redis:6380/1"
    assert anchor_name("unix:///run/redis.sock?db=2&password=pw") == (
        "unix:///run/redis.sock?db=2&password=***"
    )
    assert anchor_name("https://u:p@witness.example/cp?token=abc#x") == (
        "https://witness.example/cp?token=***"
    )
    assert anchor_name("file:///mnt/worm/cp.jsonl") == "file:///mnt/worm/cp.jsonl"


async def test_deliveries_never_show_the_anchor_password(make_anchors: Make) -> None:
    hooks = Hooks()
    url = f"redis://:hunter2@127.0.0.1:{_free_port()}/0?stream=x"
    anchors = make_anchors(
        [AnchorSettings(url=url)], on_event=hooks.event, on_failure=hooks.failure, **FAST
    )
    anchors.send(statements(1)[0])
    await wait_for(lambda: bool(hooks.failures))
    await anchors.aclose(timeout=0)
    assert "hunter2" not in json.dumps(hooks.events) + "".join(hooks.failures)


def test_anchors_come_from_the_audit_settings(tmp_path: Path) -> None:
    audit = AuditSettings(
        file=str(tmp_path / "audit.jsonl"),
        signing_key=str(tmp_path / "k.pem"),
        anchors=(
            f"file://{tmp_path / 'cp.jsonl'}",
            "redis://:pw@127.0.0.1:6379/0?stream=cp",
            {"url": "https://witness.example/cp", "secret": SECRET},  # type: ignore[arg-type]
        ),
    )
    anchors = build_anchors(audit.anchors)
    assert anchors.names == (
        f"file://{tmp_path / 'cp.jsonl'}",
        "redis://127.0.0.1:6379/0?stream=cp",
        "https://witness.example/cp",
    )
    asyncio.run(anchors.aclose())


def test_metrics_families_of_the_audit_trail() -> None:
    metrics = Metrics()
    metrics.checkpoint()
    metrics.checkpoint()
    metrics.anchor_failure("file:///mnt/worm/cp.jsonl")
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    assert families["countersign_audit_checkpoints"].type == "counter"
    assert families["countersign_audit_anchor_failures"].type == "counter"
    values = {
        (s.name, tuple(s.labels.items())): s.value
        for f in families.values()
        for s in f.samples
        if s.name.endswith("_total")
    }
    assert values[("countersign_audit_checkpoints_total", ())] == 2.0
    assert (
        values[
            ("countersign_audit_anchor_failures_total", (("anchor", "file:///mnt/worm/cp.jsonl"),))
        ]
        == 1.0
    )


def test_redis_urls_lose_only_the_anchor_parameters() -> None:
    assert anchors_module._redis_parts("unix:///run/redis.sock?db=2&stream=cp&maxlen=9") == (
        "unix:///run/redis.sock?db=2",
        "cp",
        9,
    )
    assert anchors_module._redis_parts("rediss://:pw@h:6380/3?stream=a%3Ab") == (
        "rediss://:pw@h:6380/3",
        "a:b",
        None,
    )
    with pytest.raises(ValueError, match="maxlen must be a number"):
        anchors_module._redis_parts("redis://h/0?maxlen=lots")
