"""The audit hash chain: sealing, reading the head back, and verifying files of it.

Chains are built with `seal`, written to files, tampered with the way an attacker or a crash
would, and verified: every kind of tampering must be named at its exact first line.
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from proxy.audit import chain
from proxy.audit.chain import (
    GENESIS,
    ChainBroken,
    ChainError,
    ChainHead,
    VerifyReport,
    canonical,
    iter_verified,
    last_head_of,
    seal,
    verify_files,
)

ROOT = Path(__file__).resolve().parent.parent


def event(i: int, tag: str = "") -> dict[str, Any]:
    return {
        "event": "request.forwarded",
        "request_id": f"{tag}req{i:08d}",
        "identity": {
            "subject": "agent-7",
            "issuer": "api-key",
            "client_id": "agent-7",
            "email": None,
            "groups": ["agents", "ops"],
            "owner": "bob@example.com",
        },
        "method": "GET",
        "path": f"/cloud/buckets/{i}",
        "route": "cloud",
        "rule": "reads",
        "approval_id": None,
        "status": 200,
        "bytes_sent": 37 + i,
        "duration_ms": 1.954,
        "error": None,
        "note": "naïve café ☕ \u2028",
        "ts": "2026-11-25T16:07:44.053433Z",
        "v": 1,
    }


START = ChainHead(0, GENESIS)


def build(count: int, head: ChainHead = START, tag: str = "") -> tuple[list[str], ChainHead]:
    lines = []
    for _ in range(count):
        line, head = seal(event(head.seq + 1, tag), head)
        lines.append(line)
    return lines, head


def write(path: Path, lines: list[str]) -> str:
    path.write_bytes("".join(lines).encode("utf-8"))
    return str(path)


def reference_seal(ev: dict[str, Any], head: ChainHead) -> tuple[str, ChainHead]:
    """The contract, written the obvious way (two encodings)."""
    obj = {**ev, "seq": head.seq + 1, "prev_hash": head.hash}
    digest = hashlib.sha256(
        json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    obj["hash"] = digest
    line = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    return line, ChainHead(head.seq + 1, digest)


def resealed(obj: dict[str, Any]) -> str:
    """A forged line: fields chosen by the forger, hash recomputed correctly."""
    body = {k: v for k, v in obj.items() if k != "hash"}
    body["hash"] = hashlib.sha256(canonical(body).encode("utf-8")).hexdigest()
    return canonical(body) + "\n"


def verify(*paths: str) -> VerifyReport:
    return verify_files(list(paths))


# -- seal --------------------------------------------------------------------------------------


def test_seal_follows_the_contract_byte_for_byte() -> None:
    head = ChainHead(0, GENESIS)
    events: list[dict[str, Any]] = [
        event(1),
        {},
        {"a": "hash", "z": {"hash": "x"}},
        {"nested": {"hash": chain._STAND_IN, "k": 1}},  # forces the encode-twice path
        {"text": f'"hash":"{chain._STAND_IN}",'},  # escaped inside a string: still unique
        {"ünïcödé": "日本語", "emoji": "🙂", "ctl": '\x00\n\t"\\'},
        {"floats": [0.1, -0.0, 1e300, 5e-324], "big": 2**70, "neg": -1, "bool": True},
    ]
    for ev in events:
        expected = reference_seal(ev, head)
        assert seal(ev, head) == expected
        head = expected[1]
    assert head.seq == len(events)


class Color(enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


class Verdict(enum.StrEnum):
    APPROVE = "approve"


class Text(str):
    pass


def test_seal_writes_every_kind_of_value_as_the_json_module_does() -> None:
    """Plain events are encoded with orjson, everything else with json: the text is the same.

    Each pair is (value given, what the line must hold: the value as json.dumps writes it, or
    as text where JSON has no type for it)."""
    floats = [0.0, -0.0, 1.0, 0.1, 1e-4, 9.99e-5, 2.5e-05, 1e-9, 1.5e-10, 5e-324, 123.456]
    floats += [1795628264.06, 1e15, 9999999999999998.0, 1e16, 1.5e16, 1e300, -2.5e-7, -1e-4]
    cases: list[tuple[Any, Any]] = [(f, f) for f in floats]
    cases += [(i, i) for i in (0, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1)]
    cases += [
        (("a", (1, 2.0), []), ["a", [1, 2.0], []]),
        (float("nan"), "NaN"),
        (float("-inf"), "-Infinity"),
        (Color.RED, "Color.RED"),
        (Level.HIGH, 3),
        (Verdict.APPROVE, "approve"),
        (Text("text"), "text"),
        (uuid.UUID(int=7), str(uuid.UUID(int=7))),
        (datetime.datetime(2026, 11, 25, 16, 7, 44), "2026-11-25 16:07:44"),
        ({2: "x", 10: "y"}, {"10": "y", "2": "x"}),
        ({"z": {"y": [{"x": 1e-5}]}}, {"z": {"y": [{"x": 1e-5}]}}),
        ("\udcff", "\\udcff"),
    ]
    head = ChainHead(0, GENESIS)
    for given, written in cases:
        for ev in ({"event": "x", "value": given}, {"event": "x", "nested": [{"value": given}]}):
            expected_ev = {**ev}
            if "value" in ev:
                expected_ev["value"] = written
            else:
                expected_ev["nested"] = [{"value": written}]
            expected = reference_seal(expected_ev, head)
            assert seal(ev, head) == expected, given
            head = expected[1]


def test_seal_line_shape() -> None:
    line, head = seal({"event": "request.received"}, ChainHead(0, GENESIS))
    assert line.endswith("\n") and line.count("\n") == 1
    obj = json.loads(line)
    assert obj["seq"] == 1 and obj["prev_hash"] == GENESIS and obj["hash"] == head.hash
    body = {k: v for k, v in obj.items() if k != "hash"}
    assert hashlib.sha256(canonical(body).encode()).hexdigest() == head.hash
    line2, head2 = seal({"event": "x"}, head)
    assert json.loads(line2)["prev_hash"] == head.hash and head2.seq == 2


def test_seal_refuses_reserved_fields() -> None:
    for name in ("seq", "prev_hash", "hash"):
        with pytest.raises(ValueError, match="reserved"):
            seal({"event": "x", name: 1}, ChainHead(0, GENESIS))


def test_awkward_values_are_written_so_that_they_verify(tmp_path: Path) -> None:
    cyclic: dict[str, Any] = {"a": 1}
    cyclic["self"] = cyclic
    awkward: list[dict[Any, Any]] = [
        {"int_keys": {2: "two", 10: "ten"}},  # sorted as ints by json, as strings on reading
        {"when": datetime.date(2026, 11, 25), "raw": b"\xff"},
        {"nan": float("nan"), "inf": [float("inf"), float("-inf")]},
        {"undecodable": "bad\udcff header"},  # surrogateescape'd bytes from a request
        {"cycle": cyclic},
        {7: "top-level int key", "tuple": (1, (2, 3))},
    ]
    lines: list[str] = []
    head = ChainHead(0, GENESIS)
    for ev in awkward:
        line, head = seal(ev, head)
        line.encode("utf-8")  # strict UTF-8
        lines.append(line)
    objs = [json.loads(line) for line in lines]
    assert objs[0]["int_keys"] == {"2": "two", "10": "ten"}
    assert objs[1]["when"] == "2026-11-25"
    assert objs[2]["nan"] == "NaN" and objs[2]["inf"] == ["Infinity", "-Infinity"]
    assert objs[3]["undecodable"] == "bad\\udcff header"
    assert objs[4]["cycle"] == {"a": 1, "self": "[circular]"}
    assert objs[5]["7"] == "top-level int key"
    report = verify(write(tmp_path / "a.jsonl", lines))
    assert report.ok, report.problem
    assert report.lines == len(awkward)


# -- verify: intact ----------------------------------------------------------------------------


def test_intact_chain_verifies(tmp_path: Path) -> None:
    lines, head = build(20)
    report = verify(write(tmp_path / "audit.jsonl", lines))
    assert report.ok and report.problem is None
    assert (report.lines, report.first_seq, report.last_seq) == (20, 1, 20)
    assert report.last_hash == head.hash
    assert report.warnings == [] and report.notes == []


def test_chain_split_across_rotated_files_verifies(tmp_path: Path) -> None:
    lines, head = build(30)
    old = write(tmp_path / "audit.jsonl.20261124T000000", lines[:12])
    live = write(tmp_path / "audit.jsonl", lines[12:])
    report = verify(old, live)
    assert report.ok and report.lines == 30 and report.last_hash == head.hash
    # Wrong order: the live file's first line does not follow genesis' chain start.
    wrong = verify(live, old)
    assert not wrong.ok
    assert wrong.problem is not None and wrong.problem.startswith(f"{old}:1: ")


def test_empty_file_verifies(tmp_path: Path) -> None:
    report = verify(write(tmp_path / "audit.jsonl", []))
    assert report.ok and report.lines == 0 and report.last_seq is None


# -- verify: tampering ---------------------------------------------------------------------------


def test_altered_field(tmp_path: Path) -> None:
    lines, _ = build(10)
    lines[6] = lines[6].replace('"status":200', '"status":201')
    report = verify(path := write(tmp_path / "audit.jsonl", lines))
    assert not report.ok
    assert report.problem == f"{path}:7: line altered (hash mismatch)"
    assert (report.problem_path, report.problem_line) == (path, 7)
    assert (report.lines, report.last_seq) == (6, 6)


def test_altered_line_in_second_file_names_that_file(tmp_path: Path) -> None:
    lines, _ = build(10)
    old = write(tmp_path / "audit.jsonl.1", lines[:4])
    lines[5] = lines[5].replace("bob@example.com", "eve@example.com")
    live = write(tmp_path / "audit.jsonl", lines[4:])
    report = verify(old, live)
    assert report.problem == f"{live}:2: line altered (hash mismatch)"
    assert report.lines == 5


def test_altered_whitespace_or_duplicate_key_is_not_canonical(tmp_path: Path) -> None:
    lines, _ = build(5)
    spaced = lines[:]
    spaced[2] = spaced[2].replace('"method":"GET"', '"method": "GET"')
    report = verify(path := write(tmp_path / "a.jsonl", spaced))
    assert report.problem == (
        f"{path}:3: line altered (not in canonical form, though its content hashes right)"
    )
    # A duplicate key that some readers would take instead of the hashed value.
    duped = lines[:]
    duped[3] = duped[3].replace(
        '{"approval_id":null,', '{"approval_id":"apr_forged","approval_id":null,'
    )
    report = verify(path := write(tmp_path / "b.jsonl", duped))
    assert report.problem == (
        f"{path}:4: line altered (not in canonical form, though its content hashes right)"
    )


def test_altered_and_resealed_line(tmp_path: Path) -> None:
    lines, _ = build(10)
    obj = json.loads(lines[4])
    obj["status"] = 201
    lines[4] = resealed(obj)  # seq and prev_hash still right, hash recomputed
    report = verify(path := write(tmp_path / "audit.jsonl", lines))
    assert report.problem == (
        f"{path}:5: line altered and re-sealed (its hash is not the prev_hash that "
        f"{path}:6 records)"
    )
    assert report.lines == 4


def test_removed_line(tmp_path: Path) -> None:
    lines, _ = build(10)
    del lines[4]
    report = verify(path := write(tmp_path / "audit.jsonl", lines))
    assert report.problem == f"{path}:5: 1 line removed before this line (seq jumps from 4 to 6)"
    assert (report.lines, report.last_seq) == (4, 4)


def test_removed_lines(tmp_path: Path) -> None:
    lines, _ = build(10)
    del lines[2:5]
    report = verify(path := write(tmp_path / "audit.jsonl", lines))
    assert report.problem == f"{path}:3: 3 lines removed before this line (seq jumps from 2 to 6)"


def test_removed_last_lines_of_a_rotated_file(tmp_path: Path) -> None:
    lines, _ = build(10)
    old = write(tmp_path / "audit.jsonl.1", lines[:3])
    live = write(tmp_path / "audit.jsonl", lines[5:])
    report = verify(old, live)
    assert report.problem == (
        f"{live}:1: 2 lines missing between {old} and {live} (seq jumps from 3 to 6): a file in "
        "between was not given or was deleted, or lines were removed"
    )


def test_inserted_line_from_another_chain(tmp_path: Path) -> None:
    lines, _ = build(10)
    foreign, _ = build(8, tag="other-")
    for position, stray in ((4, foreign[6]), (4, foreign[4]), (4, foreign[1]), (0, foreign[3])):
        tampered = [*lines[:position], stray, *lines[position:]]
        report = verify(path := write(tmp_path / "audit.jsonl", tampered))
        if position == 0:
            # It reads as a chain that begins at seq 4, until seq 1 (genesis) follows it.
            assert report.problem == (
                f"{path}:1: line inserted (the chain goes on from {path}:2, seq 1, which does "
                "not follow it)"
            )
            assert report.notes == [] and report.lines == 0 and report.last_seq is None
            continue
        assert report.problem == (
            f"{path}:5: line inserted (seq {json.loads(stray)['seq']}; it does not link to the "
            "line before it, and the next line does)"
        ), stray
        assert report.lines == 4


def test_inserted_resealed_forged_line(tmp_path: Path) -> None:
    lines, _ = build(10)
    forged = json.loads(lines[3])
    forged.update(seq=5, prev_hash=json.loads(lines[3])["hash"], path="/cloud/forged")
    tampered = [*lines[:4], resealed(forged), *lines[4:]]
    report = verify(path := write(tmp_path / "audit.jsonl", tampered))
    assert report.problem == (
        f"{path}:5: line inserted (it claims seq 5, as does {path}:6, and the chain goes on "
        f"from {path}:6)"
    )
    assert (report.lines, report.last_seq) == (4, 4)
    # The forged line is the one flagged when reading events.
    flags = [(e["path"], ok) for e, ok in iter_verified([path], allow_broken=True)]
    assert flags[3] == ("/cloud/buckets/4", True)
    assert flags[4] == ("/cloud/forged", False)


def test_inserted_resealed_forged_line_with_a_made_up_seq(tmp_path: Path) -> None:
    lines, _ = build(10)
    forged = json.loads(lines[3])
    forged.update(seq=77, prev_hash=json.loads(lines[3])["hash"])
    tampered = [*lines[:4], resealed(forged), *lines[4:]]
    report = verify(path := write(tmp_path / "audit.jsonl", tampered))
    assert report.problem == (
        f"{path}:5: line inserted (seq 77; it does not link to the line before it, and the next "
        "line does)"
    )


def test_duplicated_line(tmp_path: Path) -> None:
    lines, _ = build(10)
    tampered = [*lines[:5], lines[4], *lines[5:]]
    report = verify(path := write(tmp_path / "audit.jsonl", tampered))
    assert report.problem == f"{path}:6: line duplicated (same as {path}:5)"


def test_two_lines_swapped(tmp_path: Path) -> None:
    lines, _ = build(10)
    lines[4], lines[5] = lines[5], lines[4]
    report = verify(path := write(tmp_path / "audit.jsonl", lines))
    assert report.problem == (
        f"{path}:5: lines out of order (seq 6 where seq 5 was expected; seq 5 is at {path}:6)"
    )
    assert report.lines == 4


def test_first_two_lines_swapped(tmp_path: Path) -> None:
    lines, _ = build(5)
    lines[0], lines[1] = lines[1], lines[0]
    report = verify(path := write(tmp_path / "audit.jsonl", lines))
    assert report.problem == f"{path}:1: lines out of order (seq 2 comes before seq 1 at {path}:2)"
    assert report.notes == [] and report.lines == 0


def test_line_inserted_on_top_of_a_file_that_begins_mid_chain(tmp_path: Path) -> None:
    lines, _ = build(10)
    foreign, _ = build(9, tag="other-")
    report = verify(path := write(tmp_path / "audit.jsonl", [foreign[8], *lines[4:]]))
    assert report.problem == (
        f"{path}:1: line inserted (the chain goes on from {path}:2, seq 5, which does not "
        "follow it)"
    )


def test_line_moved_earlier_and_later(tmp_path: Path) -> None:
    lines, _ = build(10)
    later = [*lines[:2], *lines[3:7], lines[2], *lines[7:]]  # seq 3 moved after seq 7
    report = verify(path := write(tmp_path / "a.jsonl", later))
    assert report.problem == (
        f"{path}:3: lines out of order (seq 4 where seq 3 was expected; seq 3 is at {path}:7)"
    )
    earlier = [*lines[:2], lines[6], *lines[2:6], *lines[7:]]  # seq 7 moved after seq 2
    report = verify(path := write(tmp_path / "b.jsonl", earlier))
    assert report.problem == (
        f"{path}:3: lines out of order (seq 7 where seq 3 was expected; seq 3 is at {path}:4)"
    )


def test_swapped_last_two_lines(tmp_path: Path) -> None:
    lines, _ = build(6)
    lines[4], lines[5] = lines[5], lines[4]
    report = verify(path := write(tmp_path / "audit.jsonl", lines))
    assert report.problem == (
        f"{path}:5: lines out of order (seq 6 where seq 5 was expected; seq 5 is at {path}:6)"
    )


def test_random_tampering_is_always_found_at_its_first_line(tmp_path: Path) -> None:
    lines, _ = build(40)
    foreign, _ = build(40, tag="other-")
    rng = random.Random(7)
    path = tmp_path / "audit.jsonl"
    for _ in range(400):
        tampered = lines[:]
        kind = rng.choice(["alter", "remove", "insert", "swap", "duplicate", "reseal", "forge"])
        i = rng.randrange(1, 39)  # lines cut from the very end cannot be told apart
        first = i
        if kind == "alter":
            tampered[i] = tampered[i].replace('"GET"', '"PUT"')
        elif kind == "remove":
            del tampered[i]
        elif kind == "insert":
            tampered.insert(i, rng.choice(foreign))
        elif kind == "swap":
            tampered[i], tampered[i + 1] = tampered[i + 1], tampered[i]
        elif kind == "duplicate":
            tampered.insert(i + 1, tampered[i])
            first = i + 1
        elif kind == "reseal":
            obj = json.loads(tampered[i])
            obj["status"] = 500
            tampered[i] = resealed(obj)
        else:  # a forged line sealed in after line i
            obj = json.loads(tampered[i])
            obj.update(seq=obj["seq"] + 1, prev_hash=obj["hash"], path="/forged")
            tampered.insert(i + 1, resealed(obj))
            first = i + 1
        write(path, tampered)
        report = verify(str(path))
        assert not report.ok, kind
        assert report.problem_line == first + 1, (kind, i, report.problem)
        assert report.lines == first


def test_first_lines_removed_is_a_note_not_a_failure(tmp_path: Path) -> None:
    lines, head = build(10)
    report = verify(path := write(tmp_path / "audit.jsonl", lines[3:]))
    assert report.ok
    assert (report.lines, report.first_seq, report.last_seq) == (7, 4, 10)
    assert report.last_hash == head.hash
    assert report.notes == [
        f"{path}:1: the chain begins at seq 4, not 1: the lines before it are in files not given "
        "(rotated away or deleted), so this first link cannot be checked"
    ]


def test_missing_middle_file_fails(tmp_path: Path) -> None:
    lines, _ = build(30)
    first = write(tmp_path / "audit.jsonl.1", lines[:10])
    write(tmp_path / "audit.jsonl.2", lines[10:20])
    live = write(tmp_path / "audit.jsonl", lines[20:])
    report = verify(first, live)
    assert not report.ok
    assert report.problem == (
        f"{live}:1: 10 lines missing between {first} and {live} (seq jumps from 10 to 21): a file "
        "in between was not given or was deleted, or lines were removed"
    )
    # Only the oldest files gone (deleted by retention): fine, with a note.
    assert verify(str(tmp_path / "audit.jsonl.2"), live).ok


def test_genesis_in_the_middle_is_a_new_chain(tmp_path: Path) -> None:
    lines, _ = build(5)
    restarted, _ = build(3, tag="again-")
    report = verify(path := write(tmp_path / "audit.jsonl", lines + restarted))
    assert report.problem == (
        f"{path}:6: a new chain starts here (seq 1, genesis prev_hash) after seq 5: lines "
        "inserted, or the writer lost the chain's head"
    )


def test_torn_last_line_is_a_warning(tmp_path: Path) -> None:
    lines, head = build(10)
    path = write(tmp_path / "audit.jsonl", lines)
    with open(path, "ab") as f:
        f.write(seal(event(11), head)[0].encode()[:57])  # a crash mid-write
    report = verify(path)
    assert report.ok and report.lines == 10 and report.last_hash == head.hash
    assert report.warnings == [
        f"{path}:11: torn last line (incomplete write, e.g. a crash): 57 bytes without a "
        "trailing newline, not part of the chain"
    ]


def test_unparseable_final_fragment_is_a_warning(tmp_path: Path) -> None:
    lines, _ = build(4)
    path = write(tmp_path / "audit.jsonl", lines)
    with open(path, "ab") as f:
        f.write(b"\x00" * 30 + b"\n")  # what a filesystem can leave after a power loss
    report = verify(path)
    assert report.ok and report.lines == 4
    assert report.warnings == [
        f"{path}:5: torn last line (incomplete write, e.g. a crash): 31 bytes, not part of the "
        "chain"
    ]


def test_torn_line_that_is_not_the_very_last_fails(tmp_path: Path) -> None:
    lines, _ = build(6)
    old = write(tmp_path / "audit.jsonl.1", [*lines[:3], lines[3][:40]])
    live = write(tmp_path / "audit.jsonl", lines[3:])
    report = verify(old, live)
    assert report.problem is not None
    assert report.problem.startswith(f"{old}:4: invalid line (not JSON")


def test_invalid_json_in_the_middle_fails(tmp_path: Path) -> None:
    lines, _ = build(10)
    lines[5] = lines[5][:30] + "\n"
    report = verify(path := write(tmp_path / "audit.jsonl", lines))
    assert report.problem is not None
    assert report.problem.startswith(f"{path}:6: invalid line (not JSON: ")
    assert report.lines == 5


def test_missing_fields_and_bad_bytes_fail(tmp_path: Path) -> None:
    lines, _ = build(4)
    obj = json.loads(lines[1])
    del obj["seq"], obj["hash"]
    cases = {
        canonical(obj) + "\n": "invalid line (missing field(s): seq, hash)",
        '"just a string"\n': "invalid line (JSON, but not an object)",
        "\n": "invalid line (not JSON: Expecting value at column 1)",
    }
    for bad, what in cases.items():
        report = verify(path := write(tmp_path / "a.jsonl", [lines[0], bad, *lines[1:]]))
        assert report.problem == f"{path}:2: {what}"
    (tmp_path / "b.jsonl").write_bytes(lines[0].encode() + b"\xff\xfe\n" + lines[1].encode())
    report = verify(str(tmp_path / "b.jsonl"))
    assert report.problem == f"{tmp_path / 'b.jsonl'}:2: invalid line (not UTF-8)"


# -- last_head_of ------------------------------------------------------------------------------


def test_last_head_of_a_clean_file(tmp_path: Path) -> None:
    lines, head = build(5)
    path = tmp_path / "audit.jsonl"
    write(path, lines)
    assert last_head_of(path) == (head, path.stat().st_size)
    assert last_head_of(str(path)) == (head, path.stat().st_size)


def test_last_head_of_a_torn_file(tmp_path: Path) -> None:
    lines, head = build(5)
    path = tmp_path / "audit.jsonl"
    write(path, lines)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b'{"event":"request.rec')
    assert last_head_of(path) == (head, size)


def test_last_head_of_treats_an_unparseable_last_line_as_torn(tmp_path: Path) -> None:
    lines, head = build(5)
    path = tmp_path / "audit.jsonl"
    write(path, lines)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\x00" * 30 + b"\n")  # as verify_files does: a warning, not part of the chain
    assert last_head_of(path) == (head, size)
    assert verify(str(path)).last_hash == head.hash
    path.write_bytes(b"\x00\x00\n")
    assert last_head_of(path) == (None, 0)


def test_last_head_of_empty_and_fragment_only_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert last_head_of(empty) == (None, 0)
    fragment = tmp_path / "fragment.jsonl"
    fragment.write_bytes(b'{"event":"x","se')
    assert last_head_of(fragment) == (None, 0)
    one = tmp_path / "one.jsonl"
    lines, head = build(1)
    write(one, lines)
    assert last_head_of(one) == (head, one.stat().st_size)


def test_last_head_of_a_long_last_line_and_a_long_torn_tail(tmp_path: Path) -> None:
    head = ChainHead(0, GENESIS)
    lines = []
    for size in (10, 200_000, 150_000):  # lines longer than the 64 KiB read-back block
        line, head = seal({"event": "x", "blob": "y" * size}, head)
        lines.append(line)
    path = tmp_path / "audit.jsonl"
    write(path, lines)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(b"\x00" * 300_000)
    assert last_head_of(path) == (head, size)


def test_last_head_of_a_bad_last_line_raises(tmp_path: Path) -> None:
    lines, _ = build(3)
    path = tmp_path / "audit.jsonl"
    write(path, [*lines[:2], lines[2].replace('"status":200', '"status":500')])
    with pytest.raises(ChainError, match=r"cannot continue the chain: line altered"):
        last_head_of(path)
    write(path, [*lines, '{"event":"no chain fields"}\n'])
    with pytest.raises(ChainError, match=r"missing field\(s\): seq, prev_hash, hash"):
        last_head_of(path)
    write(path, [*lines, "not json\n", "not json either\n"])  # only the last may be torn
    with pytest.raises(ChainError, match=r"not JSON"):
        last_head_of(path)


class _CountingFile:
    def __init__(self, f: Any, counter: list[int]) -> None:
        self._f, self._counter = f, counter

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def seek(self, *args: Any) -> int:
        return int(self._f.seek(*args))

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._f.read(size)
        self._counter[0] += len(data)
        return data


def test_last_head_of_a_large_file_reads_only_the_tail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.jsonl"
    head = ChainHead(0, GENESIS)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(50_000):
            line, head = seal(event(i), head)
            f.write(line)
    size = path.stat().st_size
    counter = [0]

    def counting_open(*args: Any, **kwargs: Any) -> _CountingFile:
        return _CountingFile(open(*args, **kwargs), counter)

    monkeypatch.setattr(chain, "open", counting_open, raising=False)
    started = time.perf_counter()
    assert last_head_of(path) == (head, size)
    elapsed = time.perf_counter() - started
    assert counter[0] <= 64 * 1024 < size // 100
    assert elapsed < 0.5
    with capsys.disabled():
        print(
            f"\nlast_head_of: {size / 1e6:.1f} MB, 50,000 lines: read {counter[0]:,} bytes "
            f"in {elapsed * 1e3:.2f} ms"
        )


# -- iter_verified -----------------------------------------------------------------------------


def test_iter_verified_intact(tmp_path: Path) -> None:
    lines, _ = build(8)
    old = write(tmp_path / "a.1", lines[:3])
    live = write(tmp_path / "a", lines[3:])
    report = VerifyReport()
    got = list(iter_verified([old, live], report=report))
    assert [(e["seq"], ok) for e, ok in got] == [(i, True) for i in range(1, 9)]
    assert got[0][0]["path"] == "/cloud/buckets/1" and "hash" in got[0][0]
    assert report.ok and report.lines == 8


def test_iter_verified_raises_at_the_first_problem(tmp_path: Path) -> None:
    lines, _ = build(10)
    lines[6] = lines[6].replace('"status":200', '"status":201')
    path = write(tmp_path / "audit.jsonl", lines)
    seen = []
    with pytest.raises(ChainBroken) as info:
        for ev, ok in iter_verified([path]):
            assert ok
            seen.append(ev["seq"])
    assert seen == [1, 2, 3, 4, 5, 6]
    assert info.value.problem == f"{path}:7: line altered (hash mismatch)"


def test_iter_verified_allow_broken_goes_on(tmp_path: Path) -> None:
    lines, head = build(10)
    del lines[4]
    lines[7] = "garbage\n"
    path = write(tmp_path / "audit.jsonl", lines)
    with open(path, "ab") as f:
        f.write(seal(event(11), head)[0].encode()[:20])
    report = VerifyReport()
    got = [(e["seq"], ok) for e, ok in iter_verified([path], allow_broken=True, report=report)]
    assert got == [(1, True), (2, True), (3, True), (4, True)] + [
        (seq, False) for seq in (6, 7, 8, 10)
    ]
    assert report.problem == f"{path}:5: 1 line removed before this line (seq jumps from 4 to 6)"
    assert not report.ok and report.lines == 4
    assert any("torn last line" in w for w in report.warnings)
    assert "1 line(s) that are not JSON objects were skipped" in report.warnings


# -- the command -------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", "audit", "verify", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )


def test_cli_verify(tmp_path: Path) -> None:
    lines, head = build(1234)
    old = write(tmp_path / "audit.jsonl.20261124T000000", lines[:1000])
    live = write(tmp_path / "audit.jsonl", lines[1000:])
    done = run_cli(old, live)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (
        f"OK: 1,234 lines in 2 files, seq 1\u20131234, chain intact (last hash {head.hash})\n"
        "unsigned: only the hash chain was checked (no --public-key): whoever can write the "
        "file could have changed it and re-chained it\n"
    )

    with open(live, "ab") as f:
        f.write(b'{"event":')
    done = run_cli(old, live)
    assert done.returncode == 0
    assert done.stdout.splitlines()[0] == (
        f"warning: {live}:235: torn last line (incomplete write, e.g. a crash): 9 bytes "
        "without a trailing newline, not part of the chain"
    )
    assert done.stdout.splitlines()[1].startswith("OK: 1,234 lines")

    done = run_cli(live)
    assert done.returncode == 0
    assert done.stdout.startswith(f"note: {live}:1: the chain begins at seq 1001, not 1")

    lines[1042] = lines[1042].replace('"status":200', '"status":204')
    write(tmp_path / "audit.jsonl", lines[1000:])
    done = run_cli(old, live)
    assert done.returncode == 1
    assert done.stdout == (
        f"FAILED: {live}:43: line altered (hash mismatch)\n"
        "  intact before it: 1,042 lines, seq 1\u20131042\n"
    )


def test_cli_unreadable_file_exits_2(tmp_path: Path) -> None:
    lines, _ = build(3)
    live = write(tmp_path / "audit.jsonl", lines)
    missing = str(tmp_path / "audit.jsonl.1")
    done = run_cli(missing, live)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        f"countersign audit verify: cannot read {missing}: No such file or directory\n"
    )
    done = run_cli(str(tmp_path))
    assert done.returncode == 2 and "cannot read" in done.stderr


def test_cli_console_script_and_usage() -> None:
    script = Path(sys.executable).parent / "countersign"
    if not script.exists():
        pytest.skip("console script not installed")
    done = subprocess.run([script, "audit", "verify", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "oldest first" in done.stdout
    done = subprocess.run([script, "audit"], capture_output=True, text=True)
    assert done.returncode == 2 and "ACTION" in done.stderr


# -- cost --------------------------------------------------------------------------------------


def test_seal_cost(capsys: pytest.CaptureFixture[str]) -> None:
    """Not an assertion: prints what sealing costs per event, next to encoding twice."""
    events = [event(i) for i in range(2000)]

    def once(fn: Any) -> float:
        head = ChainHead(0, GENESIS)
        started = time.perf_counter()
        for ev in events:
            _, head = fn(ev, head)
        return (time.perf_counter() - started) / len(events) * 1e6

    # Interleaved, best of several rounds: the machine may be busy with something else.
    rounds = [(once(seal), once(reference_seal)) for _ in range(9)]
    ours, twice = min(r[0] for r in rounds), min(r[1] for r in rounds)
    line_bytes = len(seal(events[0], ChainHead(0, GENESIS))[0].encode())
    with capsys.disabled():
        print(
            f"\nseal: {ours:.1f} µs/event (encoding twice: {twice:.1f} µs) for a "
            f"{line_bytes}-byte request.forwarded line"
        )
