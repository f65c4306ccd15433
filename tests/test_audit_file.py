"""The hash-chained audit file: group commit, durability on demand, restarts, rotation, tears."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import AuditLog
from proxy.audit.chain import verify_files
from proxy.audit.file_sink import ChainedFileSink, rotated_files


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def open_sink(path: Path, **kwargs: Any) -> ChainedFileSink:
    sink = ChainedFileSink(path, **kwargs)
    sink.open()
    return sink


async def test_events_form_a_verifiable_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog([open_sink(path)])
    for i in range(50):
        audit.emit("request.received", request_id=f"r{i}", path="/x")
    await audit.aclose()
    report = verify_files([path])
    assert report.ok and report.lines == 50 and report.first_seq == 1 and report.last_seq == 50
    first = lines_of(path)[0]
    assert first["prev_hash"] == "0" * 64 and first["event"] == "request.received"


async def test_group_commit_batches_and_sync_forces_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    fsyncs = 0
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        nonlocal fsyncs
        fsyncs += 1
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    audit = AuditLog([open_sink(path, commit_interval=0.05, commit_lines=10_000)])
    for i in range(2000):
        audit.emit("request.received", request_id=f"r{i}")
    assert path.read_text() == "", "nothing is written on the request path"
    await asyncio.sleep(0.2)
    assert len(lines_of(path)) == 2000
    assert fsyncs <= 3, f"{fsyncs} fsyncs for 2,000 pass-through events"

    slow = AuditLog([open_sink(tmp_path / "slow.jsonl", commit_interval=30)])
    await slow.emit_durable("approval.decided", approval_id="apr_x", verdict="approve")
    # No waiting for the 30 s group commit: the decision is on disk when emit_durable returns.
    assert [e["approval_id"] for e in lines_of(tmp_path / "slow.jsonl")] == ["apr_x"]
    await slow.aclose()
    await audit.aclose()


async def test_the_chain_continues_across_restarts(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    for run in range(3):
        audit = AuditLog([open_sink(path)])
        for i in range(5):
            audit.emit("request.received", request_id=f"{run}-{i}")
        await audit.aclose()
    report = verify_files([path])
    assert report.ok and report.lines == 15 and report.last_seq == 15


async def test_rotation_keeps_one_chain_across_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog([open_sink(path, max_bytes=2000, commit_lines=5)])
    for i in range(60):
        audit.emit("request.received", request_id=f"r{i:03d}", path="/cloud/buckets")
        if i % 5 == 4:
            await asyncio.sleep(0)  # let commits (and rotations) happen
            await audit.sync()
    await audit.aclose()
    rotated = rotated_files(path)
    assert len(rotated) >= 2
    report = verify_files([*rotated, path])
    assert report.ok and report.lines == 60 and report.first_seq == 1
    # A restart after rotation (the live file may be empty) still continues the chain.
    audit = AuditLog([open_sink(path)])
    audit.emit("request.received", request_id="after-restart")
    await audit.aclose()
    report = verify_files([*rotated_files(path), path])
    assert report.ok and report.last_seq == 61


async def test_a_torn_tail_is_set_aside_and_the_chain_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog([open_sink(path)])
    for i in range(3):
        audit.emit("request.received", request_id=f"r{i}")
    await audit.aclose()
    with path.open("ab") as f:
        f.write(b'{"event": "request.rec')  # a crash in the middle of a write
    assert verify_files([path]).warnings  # torn last line: a warning, not a failure
    audit = AuditLog([open_sink(path)])
    audit.emit("request.received", request_id="after-crash")
    await audit.aclose()
    report = verify_files([path])
    assert report.ok and report.lines == 5 and not report.warnings
    torn = list(tmp_path.glob("audit.jsonl.torn-*"))
    assert len(torn) == 1 and torn[0].read_bytes() == b'{"event": "request.rec'
    # What was set aside is in the chain itself, for auditors.
    set_aside = json.loads(path.read_text().splitlines()[3])
    assert set_aside["event"] == "audit.tail_set_aside" and set_aside["to"] == str(torn[0])
    assert set_aside["bytes"] == 22
    assert set_aside["sha256"] == hashlib.sha256(b'{"event": "request.rec').hexdigest()


async def test_an_unwritable_file_fails_privileged_steps(tmp_path: Path) -> None:
    from proxy.audit import AuditUnavailable

    path = tmp_path / "audit.jsonl"
    sink = open_sink(path)
    audit = AuditLog([sink])
    assert sink._fd is not None
    os.close(sink._fd)  # the disk goes away under the proxy
    sink._fd = os.open(os.devnull, os.O_RDONLY)
    with pytest.raises(AuditUnavailable):
        await audit.emit_durable("approval.decided", approval_id="apr_x")
    with pytest.raises(AuditUnavailable):
        await audit.sync()
