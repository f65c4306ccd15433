"""Signed checkpoints: the writer signs its chain's head, and every way an administrator with
write access to the file could rewrite history is named by `audit verify --public-key`.

Logs are written by the real `ChainedFileSink` (with its signing), then tampered with as a
hostile administrator would: edit a decision and re-chain every later line, cut the end, remove
a checkpoint, reorder, forge a checkpoint with their own key, corrupt the tail.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import AuditLog
from proxy.audit.chain import GENESIS, ChainHead, canonical, seal, verify_files
from proxy.audit.evidence import EvidenceReport, check_evidence, last_signed_in
from proxy.audit.file_sink import ChainedFileSink, Signing, rotated_files
from proxy.audit.signing import (
    CHECKPOINT_EVENT,
    KEY_ROTATED_EVENT,
    TAIL_SET_ASIDE_EVENT,
    SigningKey,
    load_public_keys,
    load_signing_key,
    new_signing_key,
    verify_statement,
)

ROOT = Path(__file__).resolve().parent.parent


class Anchor:
    """What an anchor would have kept: every statement the sink handed over."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def send(self, record: dict[str, Any]) -> None:
        self.records.append(json.loads(canonical(record)))  # a copy, as it left the process


async def write_log(
    path: Path,
    key: SigningKey,
    anchor: Anchor,
    batches: list[int],
    *,
    pause: float = 0.06,
    interval: float = 0.02,
    max_bytes: int | None = None,
) -> None:
    """Events in batches, a checkpoint after each (the interval passes in between), and one at
    close. Approvals are decided in it, so there is something worth forging."""
    sink = ChainedFileSink(
        path,
        commit_interval=0.005,
        max_bytes=max_bytes,
        signing=Signing(key, interval=interval, on_statement=anchor.send),
    )
    sink.open()
    audit = AuditLog([sink])
    number = 0
    for size in batches:
        for _ in range(size):
            number += 1
            if number % 3 == 0:
                audit.emit(
                    "approval.decided",
                    approval_id=f"apr_{number}",
                    approver={"email": "carol@example.com"},
                    verdict="deny",
                    reason="not this quarter",
                )
            else:
                audit.emit("request.forwarded", request_id=f"r{number}", status=200)
        await asyncio.sleep(pause)
    await audit.aclose()


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_text("".join(canonical(line) + "\n" for line in lines))


def rechain(lines: list[dict[str, Any]], start: int = 0) -> list[dict[str, Any]]:
    """What a forger does after changing lines: seal again from `start` on, so that the hash
    chain holds (seq renumbered, prev_hash and hash recomputed)."""
    out = lines[:start]
    head = ChainHead(out[-1]["seq"], out[-1]["hash"]) if out else ChainHead(0, GENESIS)
    for line in lines[start:]:
        event = {k: v for k, v in line.items() if k not in ("seq", "prev_hash", "hash")}
        text, head = seal(event, head)
        out.append(json.loads(text))
    return out


def keys(*signing: SigningKey) -> dict[str, Any]:
    return {key.key_id: key.public for key in signing}


def checkpoints(lines: list[dict[str, Any]]) -> list[int]:
    return [i for i, line in enumerate(lines) if line["event"] == CHECKPOINT_EVENT]


@pytest.fixture
def key() -> SigningKey:
    return new_signing_key()


@pytest.fixture
async def signed_log(tmp_path: Path, key: SigningKey) -> tuple[Path, Anchor]:
    path = tmp_path / "audit.jsonl"
    anchor = Anchor()
    await write_log(path, key, anchor, [5, 4, 6])
    return path, anchor


# -- the writer ------------------------------------------------------------------------------


async def test_checkpoints_sign_the_head_and_reach_the_anchor(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    path, anchor = signed_log
    lines = read(path)
    marks = checkpoints(lines)
    assert len(marks) >= 3 and marks[-1] == len(lines) - 1  # the last one at close
    previous = 0
    for index in marks:
        statement = lines[index]["checkpoint"]
        assert verify_statement(statement, keys(key)) is None
        assert statement["seq"] == lines[index - 1]["seq"]
        assert statement["hash"] == lines[index]["prev_hash"] == lines[index - 1]["hash"]
        assert statement["prev_checkpoint"] == previous
        assert statement["key_id"] == key.key_id
        previous = lines[index]["seq"]
    # The anchor got each statement exactly as the file holds it, in order.
    assert anchor.records == [lines[i]["checkpoint"] for i in marks]
    report = check_evidence([path], keys(key), anchor.records)
    assert report.ok, report.problem
    assert report.checkpoints == len(marks) and report.unsigned_lines == 0
    assert report.anchored == len(marks)


async def test_no_checkpoint_when_nothing_was_written_since_the_last(
    tmp_path: Path, key: SigningKey
) -> None:
    path = tmp_path / "audit.jsonl"
    anchor = Anchor()
    await write_log(path, key, anchor, [2], pause=0.1)
    count = len(checkpoints(read(path)))
    sink = ChainedFileSink(path, signing=Signing(key, interval=0.01, on_statement=anchor.send))
    sink.open()
    await asyncio.sleep(0.05)
    await sink.aclose()
    assert len(checkpoints(read(path))) == count  # idle: no new checkpoint, no new line


async def test_the_signed_chain_goes_on_across_restarts_and_rotation(
    tmp_path: Path, key: SigningKey
) -> None:
    path = tmp_path / "audit.jsonl"
    anchor = Anchor()
    await write_log(path, key, anchor, [30, 30], max_bytes=4000)
    await write_log(path, key, anchor, [30, 30], max_bytes=4000)
    files = [*rotated_files(path), path]
    assert len(files) > 2
    assert len({record["chain"] for record in anchor.records}) == 1  # one chain throughout
    report = check_evidence(files, keys(key), anchor.records)
    assert report.ok, report.problem
    assert report.checkpoints == len(anchor.records)
    found = last_signed_in([path, *reversed(rotated_files(path))])
    assert found is not None and found.chain == anchor.records[0]["chain"]
    assert found.checkpoint_seq == anchor.records[-1]["seq"] + 1


async def test_each_worker_file_is_its_own_signed_chain(tmp_path: Path, key: SigningKey) -> None:
    anchor = Anchor()
    await write_log(tmp_path / "audit.worker-1.jsonl", key, anchor, [3])
    await write_log(tmp_path / "audit.worker-2.jsonl", key, anchor, [3])
    assert len({record["chain"] for record in anchor.records}) == 2
    for name in ("audit.worker-1.jsonl", "audit.worker-2.jsonl"):
        report = check_evidence([tmp_path / name], keys(key), anchor.records)
        assert report.ok, report.problem


async def test_a_torn_tail_set_aside_is_recorded_in_the_chain(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    path, anchor = signed_log
    with path.open("ab") as f:
        f.write(b'{"event":"approval.deci')  # a crash in the middle of a write
    await write_log(path, key, anchor, [1])
    lines = read(path)
    set_aside = [line for line in lines if line["event"] == TAIL_SET_ASIDE_EVENT]
    assert len(set_aside) == 1
    assert set_aside[0]["bytes"] == 23 and len(set_aside[0]["sha256"]) == 64
    assert Path(set_aside[0]["to"]).read_bytes() == b'{"event":"approval.deci'
    assert check_evidence([path], keys(key), anchor.records).ok


async def test_key_rotation_is_a_signed_line_and_later_checkpoints_use_the_new_key(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    path, anchor = signed_log
    new_key = new_signing_key()
    await write_log(path, new_key, anchor, [4])
    lines = read(path)
    rotations = [line for line in lines if line["event"] == KEY_ROTATED_EVENT]
    assert len(rotations) == 1
    rotation = rotations[0]["rotation"]
    assert rotation["previous_key_id"] == key.key_id and rotation["key_id"] == new_key.key_id
    assert verify_statement(rotation, keys(new_key)) is None
    after = [lines[i]["checkpoint"] for i in checkpoints(lines) if i > lines.index(rotations[0])]
    assert after and all(s["key_id"] == new_key.key_id for s in after)

    report = check_evidence([path], keys(key, new_key), anchor.records)
    assert report.ok, report.problem
    assert report.keys_used == [key.key_id, new_key.key_id] and len(report.rotations) == 1
    # An auditor given only the old key cannot take the new key's word for anything.
    report = check_evidence([path], keys(key), anchor.records)
    assert not report.ok and "not among the public keys given" in str(report.problem)


# -- tampering -------------------------------------------------------------------------------


def check(path: Path, key: SigningKey, anchored: list[dict[str, Any]] | None = None) -> str:
    report = check_evidence([path], keys(key), anchored or [])
    assert not report.ok, "tampering went unnoticed"
    return str(report.problem)


async def test_an_edited_decision_rechained_is_named(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    path, _ = signed_log
    lines = read(path)
    target = next(i for i, line in enumerate(lines) if line["event"] == "approval.decided")
    assert verify_files([path]).ok
    lines[target]["approver"] = {"email": "ciso@example.com"}
    lines[target]["verdict"] = "approve"
    write(path, rechain(lines, target))
    assert verify_files([path]).ok  # the hash chain alone cannot tell
    problem = check(path, key)
    first_checkpoint = checkpoints(lines)[0]
    assert problem.startswith(f"{path}:{first_checkpoint + 1}: the checkpoint signed seq")
    assert "re-chained" in problem


async def test_an_edited_checkpoint_fails_its_signature(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    path, _ = signed_log
    lines = read(path)
    index = checkpoints(lines)[1]
    lines[index]["checkpoint"]["ts"] = "2020-01-01T00:00:00Z"
    write(path, rechain(lines, index))
    problem = check(path, key)
    assert problem == (
        f"{path}:{index + 1}: checkpoint signature does not verify with key {key.key_id}: "
        "a forged or altered checkpoint"
    )


async def test_a_checkpoint_forged_with_another_key_is_named(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    path, _ = signed_log
    lines = read(path)
    first = checkpoints(lines)[0]
    target = next(
        i for i, line in enumerate(lines) if line["event"] == "approval.decided" and i > first
    )
    lines[target]["verdict"] = "approve"
    forged = rechain(lines, target)
    # The forger re-signs every checkpoint after the edit with a key of their own.
    mine = new_signing_key()
    for index in checkpoints(forged):
        if index > target:
            statement = dict(forged[index]["checkpoint"])
            statement.pop("key_id")
            statement["hash"] = forged[index - 1]["hash"]
            forged[index]["checkpoint"] = mine.sign_statement(statement)
            forged = rechain(forged, index)
    write(path, forged)
    first_forged = next(i for i in checkpoints(forged) if i > target)
    problem = check(path, key)
    assert problem == (
        f"{path}:{first_forged + 1}: checkpoint signed by key {mine.key_id}, which is not among "
        "the public keys given: a forged or altered checkpoint"
    )
    # Passing the forger's key as well is no way out: the chain's key changed without a
    # signed rotation.
    report = check_evidence([path], keys(key, mine))
    assert not report.ok and "no key rotation line comes before it" in str(report.problem)


async def test_a_checkpoint_removed_from_the_middle_is_named(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    path, _ = signed_log
    lines = read(path)
    marks = checkpoints(lines)
    removed = marks[1]
    write(path, rechain(lines[:removed] + lines[removed + 1 :], removed))
    problem = check(path, key)
    # The next checkpoint fails first: it signed a head the re-chained file no longer has.
    assert problem.startswith(f"{path}:{marks[2]}: the checkpoint signed seq")
    # Removed without re-chaining the lines after it, the chain itself breaks there.
    write(path, lines[:removed] + lines[removed + 1 :])
    assert f"{path}:{removed + 1}: 1 line removed" in check(path, key)


async def test_checkpoints_removed_and_their_statements_forged_anew_are_named(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    """The writer's own key re-signing after a removal (an administrator who holds the key):
    the prev_checkpoint link still names the gap."""
    path, _ = signed_log
    lines = read(path)
    marks = checkpoints(lines)
    removed = marks[0]
    edited = rechain(lines[:removed] + lines[removed + 1 :], removed)
    for index in checkpoints(edited):
        statement = dict(edited[index]["checkpoint"])
        statement["hash"] = edited[index - 1]["hash"]
        statement["seq"] = edited[index - 1]["seq"]
        statement.pop("sig")
        edited[index]["checkpoint"] = key.sign_statement(statement)
        edited = rechain(edited, index)
    write(path, edited)
    problem = check(path, key)
    assert "checkpoint(s) removed" in problem and problem.startswith(f"{path}:{marks[1]}:")


async def test_lines_reordered_and_rechained_are_named(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    path, _ = signed_log
    lines = read(path)
    lines[1], lines[2] = lines[2], lines[1]
    write(path, lines)
    assert "out of order" in check(path, key)  # not re-chained: the chain says so
    write(path, rechain(lines, 1))
    problem = check(path, key)
    assert problem.startswith(f"{path}:{checkpoints(lines)[0] + 1}: the checkpoint signed seq")


async def test_truncation_is_named_by_the_anchor(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    path, anchor = signed_log
    lines = read(path)
    marks = checkpoints(lines)
    cut = marks[-2] - 2  # the end, with the last two checkpoints, is gone
    write(path, lines[:cut])
    report = check_evidence([path], keys(key))
    assert report.ok  # without an anchor a clean cut cannot be told from a shorter log
    problem = check(path, key, anchor.records)
    assert problem == (
        f"{path}:{cut}: the files end at seq {cut}, but a checkpoint of seq "
        f"{lines[marks[-2]]['checkpoint']['seq']} signed at {lines[marks[-2]]['checkpoint']['ts']}"
        f" was anchored: the lines after seq {cut} were removed (truncated)"
    )


async def test_truncated_then_continued_is_named_by_the_anchor(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    """Cut the end, then let the proxy start again and write on: the chain and the checkpoints
    are sound, but the anchor remembers what was there."""
    path, anchor = signed_log
    lines = read(path)
    marks = checkpoints(lines)
    write(path, lines[: marks[-2] - 2])
    await write_log(path, key, anchor, [8, 8])
    assert check_evidence([path], keys(key)).ok
    problem = check(path, key, anchor.records)
    anchored = lines[marks[-2]]["checkpoint"]
    assert f"not the line anchored at {anchored['ts']}" in problem


async def test_the_last_checkpoint_removed_is_named_by_the_anchor(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    path, anchor = signed_log
    lines = read(path)
    write(path, lines[:-1])  # the checkpoint written at close
    problem = check(path, key, anchor.records)
    assert problem.endswith("is not in the file: removed")


async def test_a_torn_tail_made_by_hand_over_anchored_lines_is_named(
    signed_log: tuple[Path, Anchor], key: SigningKey
) -> None:
    path, anchor = signed_log
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # the last line cut in the middle, as a crash would
    report = check_evidence([path], keys(key), anchor.records)
    assert report.chain.warnings  # the chain alone: a torn tail, a warning
    assert not report.ok and "removed" in str(report.problem)


async def test_a_log_without_checkpoints_fails_when_a_key_is_given(
    tmp_path: Path, key: SigningKey
) -> None:
    path = tmp_path / "audit.jsonl"
    sink = ChainedFileSink(path)
    sink.open()
    sink.write({"event": "request.forwarded"})
    await sink.aclose()
    report = check_evidence([path], keys(key))
    assert not report.ok and str(report.problem).startswith("no signed checkpoint in the files")


# -- the command line ------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def key_files(tmp_path: Path, name: str = "audit-ed25519.pem") -> tuple[Path, Path]:
    done = run_cli("keys", "new", "--audit", "--out", str(tmp_path / name))
    assert done.returncode == 0, done.stderr
    private = tmp_path / name
    public = tmp_path / name.replace(".pem", ".pub.pem")
    assert private.stat().st_mode & 0o777 == 0o600
    assert "BEGIN PUBLIC KEY" in public.read_text()
    assert f"signing_key: {json.dumps(str(private.resolve()))}" in done.stdout
    return private, public


async def test_cli_verify_with_key_and_anchor(tmp_path: Path) -> None:
    private, public = key_files(tmp_path)
    key = load_signing_key(private)
    assert list(load_public_keys([public])) == [key.key_id]
    path = tmp_path / "audit.jsonl"
    anchor = Anchor()
    await write_log(path, key, anchor, [4, 4])
    witness = tmp_path / "worm" / "checkpoints.jsonl"
    witness.parent.mkdir()
    witness.write_text("".join(canonical(r) + "\n" for r in anchor.records))

    done = run_cli("audit", "verify", str(path))
    assert done.returncode == 0
    assert done.stdout.splitlines()[-1].startswith("unsigned: only the hash chain was checked")

    args = ("audit", "verify", "--public-key", str(public), "--anchor", f"file://{witness}")
    done = run_cli(*args, str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    lines = read(path)
    last = lines[-1]["checkpoint"]
    assert out[0].startswith(f"checked: {len(lines)} lines, seq 1\u2013{len(lines)}, ")
    assert out[1].startswith(
        f"signed: {len(anchor.records)} checkpoints verified (key {key.key_id})"
    )
    assert f"covers every line up to seq {last['seq']}, written by {last['ts']}" in out[1]
    assert out[2].startswith(f"anchored: {len(anchor.records)} anchored checkpoints found")
    assert out[-1] == f"OK: signed and intact up to {last['ts']} (last hash {lines[-1]['hash']})"

    write(path, lines[:-3])
    done = run_cli(*args, str(path))
    assert done.returncode == 1
    assert done.stdout.splitlines()[-1].startswith("FAILED: ")
    assert "(truncated)" in done.stdout

    done = run_cli("audit", "verify", "--anchor", f"file://{witness}", str(path))
    assert done.returncode == 2 and "--anchor needs --public-key" in done.stderr
    done = run_cli("audit", "verify", "--public-key", str(path), str(path))
    assert done.returncode == 2 and "no PEM key in it" in done.stderr


async def test_cli_export_marks_rows_after_the_last_checkpoint(tmp_path: Path) -> None:
    private, public = key_files(tmp_path)
    key = load_signing_key(private)
    path = tmp_path / "audit.jsonl"
    await write_log(path, key, Anchor(), [6])
    # Lines after the last checkpoint (e.g. a crash before the next one).
    lines = read(path)
    extra = {"event": "approval.requested", "approval_id": "apr_late", "ts": "2026-11-30T12:00:00Z"}
    write(path, rechain([*lines, extra], len(lines)))
    done = run_cli("audit", "export", "--format", "jsonl", "--public-key", str(public), str(path))
    assert done.returncode == 0, done.stderr
    rows = {row["approval_id"]: row for row in map(json.loads, done.stdout.splitlines())}
    assert rows["apr_3"]["signed"] is True and rows["apr_late"]["signed"] is False
    assert "1 row not covered by a verified checkpoint" in done.stderr
    done = run_cli("audit", "export", "--format", "jsonl", str(path))
    assert all(json.loads(row)["signed"] is None for row in done.stdout.splitlines())


def test_an_unusable_signing_key_stops_check(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-key.pem"
    bad.write_text("hello")
    config = tmp_path / "countersign.yaml"
    config.write_text(
        f"audit: {{file: {json.dumps(str(tmp_path / 'a.jsonl'))}, "
        f"signing_key: {json.dumps(str(bad))}}}\n"
    )
    done = run_cli("check", "-c", str(config))
    assert done.returncode != 0
    assert "audit.signing_key" in done.stdout + done.stderr


def test_config_refuses_signing_without_a_file_and_anchors_without_a_key(tmp_path: Path) -> None:
    from proxy.config import ConfigError, load_settings_text

    with pytest.raises(ConfigError, match=r"signing_key needs audit\.file"):
        load_settings_text("audit: {signing_key: /k.pem}\n")
    with pytest.raises(ConfigError, match=r"anchors need audit\.signing_key"):
        load_settings_text("audit: {file: /a.jsonl, anchors: ['file:///w.jsonl']}\n")
    with pytest.raises(ConfigError, match=r"an anchor is a file://, redis:// or https:// URL"):
        load_settings_text("audit: {file: /a.jsonl, signing_key: /k.pem, anchors: ['ftp://x/']}\n")
    settings = load_settings_text(
        "audit: {file: /a.jsonl, signing_key: /k.pem, anchors: ['file:///w.jsonl', "
        "{url: 'https://witness.example.com/cp', secret: s3cret}]}\n"
    )
    assert [a.url for a in settings.audit.anchors] == [
        "file:///w.jsonl",
        "https://witness.example.com/cp",
    ]
    assert settings.audit.checkpoint_seconds == 10


def test_report_defaults() -> None:
    assert EvidenceReport().ok
