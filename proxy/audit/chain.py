"""The audit hash chain: sealing events into chained JSON lines, and verifying files of them.

Format (a fixed contract, docs/audit-events.md): each line of an audit file is one JSON object,
UTF-8, terminated by a newline, holding the event's fields plus

- `seq`: 1 for the first line of a chain, then +1 per line, across files (rotation) and restarts;
- `prev_hash`: the previous line's `hash`, or `GENESIS` (64 zeros) for the first line of a chain;
- `hash`: `sha256(canonical(line_without_hash).encode("utf-8")).hexdigest()`;

and the line written is `canonical(line_with_hash) + "\\n"`, where `canonical` is JSON with keys
sorted, no spaces and non-ASCII characters kept as they are.

Pure functions, no aiohttp: `seal_line` (`seal` as the file sink needs it) runs on the event loop
once per event (one JSON encoding, by orjson for plain events, and one SHA-256); `last_head_of`
reads only the tail of a file; `verify_files` and `iter_verified` stream any number of (possibly
very large) files line by line.

A hash chain proves that the lines it is given link up unchanged. It cannot tell that lines were
cut from the very end of the last file: anchor the head elsewhere (the Redis stream, a copy).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
from collections import deque
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final, NoReturn

import orjson

GENESIS: Final = "0" * 64

StrPath = str | os.PathLike[str]

_HEX64: Final = re.compile(r"[0-9a-f]{64}")
_RESERVED: Final = frozenset({"seq", "prev_hash", "hash"})

# `canonical` is exactly json.dumps(obj, sort_keys=True, separators=(",", ":"),
# ensure_ascii=False): dumps builds this very encoder for those arguments.
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical(obj: Any) -> str:
    """The canonical JSON text of `obj`: keys sorted, no spaces, non-ASCII kept as is."""
    return _canonical(obj)


@dataclass(frozen=True, slots=True)
class ChainHead:
    """The chain's state after its last line: that line's `seq` and `hash`."""

    seq: int
    hash: str


class ChainError(ValueError):
    """A file cannot be used as (the continuation of) a chain."""


class ChainBroken(ChainError):
    """Raised by `iter_verified` at the first problem; `problem` is "file:line: what"."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


# -- sealing ---------------------------------------------------------------------------------


def _unsupported(value: Any) -> Any:
    raise TypeError(f"not JSON: {type(value).__name__}")


# Same output as `canonical` whenever it succeeds; it refuses (instead of writing something that
# would not read back identically) NaN/Infinity and values JSON has no type for.
_seal_encode = json.JSONEncoder(
    sort_keys=True,
    separators=(",", ":"),
    ensure_ascii=False,
    allow_nan=False,
    default=_unsupported,
).encode

# Sealing encodes the line once, with this stand-in for the hash, then hashes the text with the
# stand-in's member cut out. Why that is exactly canonical(line without hash): keys are sorted,
# and each member `"key":value` is encoded on its own, so removing one top-level member from the
# text equals encoding the object without it. "hash" sorts before "prev_hash" and "seq", so its
# member is never the last one and is always followed by a comma. The member is searched for
# whole and must occur exactly once, so the occurrence found is the top-level one; otherwise
# (some nested value holds the very same text) we fall back to encoding twice. The stand-in and
# the real hash are both 64 characters that JSON does not escape, so substituting one for the
# other gives canonical(line with hash). Random per process, so that no input can force the slow
# path on purpose.
_STAND_IN: Final = secrets.token_hex(32)
_STAND_IN_MEMBER: Final = f'"hash":"{_STAND_IN}",'
_STAND_IN_MEMBER_BYTES: Final = _STAND_IN_MEMBER.encode()

_SCALARS: Final = frozenset({str, int, float, bool, type(None)})

# The fast path encodes with orjson (about ten times faster than the json module's encoder), but
# only events whose every value orjson writes byte for byte as `canonical` does: dicts, lists,
# tuples, `str`, `int`, `bool`, None, and floats in the range where both print the same shortest
# digits the same way (outside it orjson writes 1e-05 as 0.00001, NaN and Infinity as null).
# Types are checked exactly: orjson writes enums (and could write subclasses, dataclasses,
# datetimes) its own way. orjson sorts keys by their UTF-8 bytes, which is code point order, as
# `sorted` does. What orjson refuses (keys that are not exactly `str`, ints beyond 64 bits,
# unpaired surrogates, deep nesting) takes the json path, as does everything else: either way
# the text is the same (tests/test_audit_chain.py, tests/test_audit_log.py).
_PLAIN: Final = frozenset({str, int, bool, type(None)})
_FLOAT_MIN: Final = 1e-4
_FLOAT_MAX: Final = 1e16
_ORJSON_SORTED: Final = orjson.OPT_SORT_KEYS


def _orjson_safe(values: Iterable[Any]) -> bool:
    """Whether orjson, if it encodes these values at all, writes each exactly as `canonical`."""
    for value in values:
        cls = value.__class__
        if cls in _PLAIN:
            continue
        if cls is dict:
            if not _orjson_safe(value.values()):
                return False
        elif cls is list or cls is tuple:
            if not _orjson_safe(value):
                return False
        elif cls is float:
            if not (_FLOAT_MIN <= abs(value) < _FLOAT_MAX or value == 0.0):
                return False
        else:
            return False
    return True


def _check_keys(obj: Mapping[Any, Any]) -> None:
    """TypeError unless every key of `obj` and of the mappings nested in it is a `str`.

    JSON turns other keys (ints, ...) into strings but sorts them by their original value, so
    {2: x, 10: y} would not read back to the same canonical text. `"".join` checks in C.
    """
    "".join(obj)
    for value in obj.values():
        if value.__class__ not in _SCALARS:
            _check_nested(value)


def _check_nested(value: Any) -> None:
    cls = value.__class__
    if cls is dict:
        _check_keys(value)
    elif cls is list or cls is tuple:
        for item in value:
            if item.__class__ not in _SCALARS:
                _check_nested(item)
    elif isinstance(value, Mapping):
        raise TypeError("a mapping that is not a dict")  # normalized on the slow path


def _seal_text(text: str) -> tuple[str, str] | None:
    """From the canonical text of a line holding the stand-in hash: (line, hash), or None."""
    start = text.find(_STAND_IN_MEMBER)
    if start < 0 or text.find(_STAND_IN_MEMBER, start + 1) >= 0:
        return None
    end = start + len(_STAND_IN_MEMBER)
    digest = hashlib.sha256((text[:start] + text[end:]).encode("utf-8")).hexdigest()
    return f'{text[:start]}"hash":"{digest}",{text[end:]}\n', digest


def _seal_bytes(data: bytes) -> tuple[bytes, str] | None:
    """`_seal_text` for the UTF-8 bytes of that text."""
    start = data.find(_STAND_IN_MEMBER_BYTES)
    if start < 0 or data.find(_STAND_IN_MEMBER_BYTES, start + 1) >= 0:
        return None
    head, tail = data[:start], data[start + len(_STAND_IN_MEMBER_BYTES) :]
    digest = hashlib.sha256(head + tail).hexdigest()
    return b"".join((head, b'"hash":"', digest.encode(), b'",', tail, b"\n")), digest


def _seal_plain(obj: dict[str, Any], seq: int, prev_hash: str) -> tuple[str, str]:
    obj["seq"] = seq
    obj["prev_hash"] = prev_hash
    obj["hash"] = _STAND_IN
    sealed = _seal_text(_seal_encode(obj))
    if sealed is not None:
        return sealed
    del obj["hash"]  # the stand-in's text occurs in the event itself: encode twice
    digest = hashlib.sha256(_canonical(obj).encode("utf-8")).hexdigest()
    obj["hash"] = digest
    return _canonical(obj) + "\n", digest


def seal_line(event: Mapping[str, Any], seq: int, prev_hash: str) -> tuple[bytes, str]:
    """`seal` for the sink: the line's UTF-8 bytes and its hash, for `seq` after `prev_hash`."""
    if event.__class__ is dict:
        obj = {**event, "seq": seq, "prev_hash": prev_hash, "hash": _STAND_IN}
        if len(obj) != len(event) + len(_RESERVED):
            _refuse_reserved(event)
        try:
            if _orjson_safe(event.values()):
                sealed = _seal_bytes(orjson.dumps(obj, option=_ORJSON_SORTED))
                if sealed is not None:
                    return sealed
        except (TypeError, RecursionError):  # orjson.JSONEncodeError is a TypeError
            pass
    elif not _RESERVED.isdisjoint(event):
        _refuse_reserved(event)
    line, digest = _seal_json(event, seq, prev_hash)
    return line.encode("utf-8"), digest


def _refuse_reserved(event: Mapping[str, Any]) -> NoReturn:
    raise ValueError(f"audit event uses reserved field(s): {sorted(_RESERVED & set(event))}")


def _seal_json(event: Mapping[str, Any], seq: int, prev_hash: str) -> tuple[str, str]:
    try:
        obj = dict(event)
        _check_keys(obj)
        return _seal_plain(obj, seq, prev_hash)
    except (TypeError, ValueError, UnicodeError, RecursionError):  # RecursionError: a cycle
        normalized = _normalize(event, ())
        if not isinstance(normalized, dict) or not _RESERVED.isdisjoint(normalized):
            raise ValueError("audit event uses reserved field(s) seq, prev_hash or hash") from None
        return _seal_plain(normalized, seq, prev_hash)


def seal(event: Mapping[str, Any], head: ChainHead) -> tuple[str, ChainHead]:
    """The line to write for `event` after `head` (with its trailing newline), and the new head.

    The event must not have `seq`, `prev_hash` or `hash` fields (ValueError). Values JSON has no
    type for, non-`str` keys, NaN/Infinity and unpaired surrogates (undecodable bytes that were
    kept with `surrogateescape`) do not fail: they are written as text (`str(value)`, `"NaN"`,
    `\\udcff`), as the stdout sink does, so that every line reads back to the very text that was
    hashed.
    """
    line, digest = seal_line(event, head.seq + 1, head.hash)
    return line.decode("utf-8"), ChainHead(head.seq + 1, digest)


def _scrub(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return str.__str__(text)


def _float(value: float) -> float | str:
    if math.isfinite(value):
        return float(value)
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _key(key: Any) -> str:
    if isinstance(key, str):
        return _scrub(key)
    if key is None or isinstance(key, bool):
        return json.dumps(key)
    if isinstance(key, int):
        return str(int(key))
    if isinstance(key, float):
        return repr(float(key)) if math.isfinite(key) else str(_float(key))
    return _scrub(str(key))


def _normalize(value: Any, path: tuple[int, ...]) -> Any:
    """`value` as plain JSON data that encodes and reads back to the same canonical text."""
    if isinstance(value, str):
        return _scrub(value)
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, (Mapping, list, tuple)):
        if id(value) in path:
            return "[circular]"
        inner = (*path, id(value))
        if isinstance(value, Mapping):
            return {_key(k): _normalize(v, inner) for k, v in value.items()}
        return [_normalize(v, inner) for v in value]
    return _scrub(str(value))


# -- reading lines ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Line:
    path: str
    lineno: int
    offset: int
    size: int
    newline: bool
    last: bool  # the last line of the last file
    obj: dict[str, Any] | None = None
    seq: int = 0
    prev: str = ""
    hash: str = ""
    error: str | None = None  # why this is not a sound chain line (None: it is)
    unparseable: bool = False  # not UTF-8 or not JSON at all

    @property
    def where(self) -> str:
        return f"{self.path}:{self.lineno}"


def _parse(raw: bytes) -> tuple[dict[str, Any] | None, str | None, bool]:
    """(object, error, unparseable) for one line without its newline."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "invalid line (not UTF-8)", True
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else ""
        return None, f"invalid line (not JSON{': ' + reason if reason else ''})", True
    if not isinstance(obj, dict):
        return None, "invalid line (JSON, but not an object)", False
    missing = [name for name in ("seq", "prev_hash", "hash") if name not in obj]
    if missing:
        return obj, f"invalid line (missing field(s): {', '.join(missing)})", False
    seq, prev, digest = obj["seq"], obj["prev_hash"], obj["hash"]
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return obj, "invalid line (seq is not a positive integer)", False
    for name, value in (("prev_hash", prev), ("hash", digest)):
        if not isinstance(value, str) or not _HEX64.fullmatch(value):
            return obj, f"invalid line ({name} is not 64 lowercase hex digits)", False
    try:
        written = _canonical(obj)
        hashed = _hashed_text(obj, written, digest)
    except (ValueError, RecursionError):
        return obj, "invalid line (cannot be encoded back to JSON)", False
    if hashlib.sha256(hashed.encode("utf-8", "surrogatepass")).hexdigest() != digest:
        return obj, "line altered (hash mismatch)", False
    if written != text:
        # The content hashes right, but the bytes are not what was written: spacing, key order,
        # escapes, or a duplicate key (which other JSON readers may resolve differently).
        return obj, "line altered (not in canonical form, though its content hashes right)", False
    return obj, None, False


def _hashed_text(obj: dict[str, Any], written: str, digest: str) -> str:
    """canonical(obj without "hash"), given written == canonical(obj): see `_seal_text`."""
    member = f'"hash":"{digest}",'
    start = written.find(member)
    if start >= 0 and written.find(member, start + 1) < 0:
        return written[:start] + written[start + len(member) :]
    return _canonical({k: v for k, v in obj.items() if k != "hash"})


def _make_line(path: str, lineno: int, offset: int, raw: bytes, last: bool) -> _Line:
    newline = raw.endswith(b"\n")
    line = _Line(path, lineno, offset, len(raw), newline, last)
    obj, error, unparseable = _parse(raw[:-1] if newline else raw)
    line.obj, line.error, line.unparseable = obj, error, unparseable
    if error is None and obj is not None:
        line.seq, line.prev, line.hash = obj["seq"], obj["prev_hash"], obj["hash"]
    if not newline and line.error is None and not last:
        line.error = "incomplete line (no trailing newline), yet more files follow"
    return line


def _read_lines(paths: Sequence[StrPath]) -> Generator[_Line, None, None]:
    names = [os.fspath(p) for p in paths]
    for index, path in enumerate(names):
        last_file = index == len(names) - 1
        with open(path, "rb") as f:
            offset = 0
            lineno = 0
            lines = iter(f)
            current = next(lines, None)
            while current is not None:
                following = next(lines, None)
                lineno += 1
                yield _make_line(path, lineno, offset, current, last_file and following is None)
                offset += len(current)
                current = following


# -- verifying -------------------------------------------------------------------------------


@dataclass
class VerifyReport:
    """The outcome of reading files as one chain.

    `lines`, `first_seq`, `last_seq` and `last_hash` describe the intact part (all of it when
    `ok`, else what precedes the problem). `problem` names the first problem as "file:line:
    what"; `problem_path`/`problem_line` locate it. `warnings` (a torn last line) and `notes`
    (the chain begins in a file not given) do not fail verification.
    """

    ok: bool = True
    lines: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    last_hash: str | None = None
    problem: str | None = None
    problem_path: str | None = None
    problem_line: int | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# How many lines past a broken link we read to tell reordered, inserted and removed lines apart.
_LOOKAHEAD: Final = 1000


class _Verifier:
    def __init__(self, paths: Sequence[StrPath], report: VerifyReport) -> None:
        self.report = report
        self._source = _read_lines(paths)
        self._ahead: deque[_Line] = deque()
        self._unchecked_start: _Line | None = None  # a first line not at genesis
        self._start_note = ""

    def close(self) -> None:
        """Close the file being read (when stopping early)."""
        self._source.close()

    def _next(self) -> _Line | None:
        if self._ahead:
            return self._ahead.popleft()
        return next(self._source, None)

    def _peek(self, count: int) -> list[_Line]:
        while len(self._ahead) < count:
            line = next(self._source, None)
            if line is None:
                break
            self._ahead.append(line)
        return list(self._ahead)[:count]

    def run(self) -> Iterator[tuple[_Line, bool]]:
        """Every line that is not a torn tail, with whether it belongs to the intact chain.

        A line is yielded once the next one has been checked: a broken link can show that the
        line before it was the inserted or re-sealed one.
        """
        report = self.report
        prev: _Line | None = None  # the last sound line: held back, not yet yielded
        before_prev: tuple[int | None, str | None] | None = None
        while (line := self._next()) is not None:
            if line.last and (not line.newline or line.unparseable):
                what = "bytes without a trailing newline" if not line.newline else "bytes"
                report.warnings.append(
                    f"{line.where}: torn last line (incomplete write, e.g. a crash): "
                    f"{line.size} {what}, not part of the chain"
                )
                continue
            found = self._check(prev, line)
            if found is None:
                if prev is not None:
                    yield prev, True
                else:
                    report.first_seq = line.seq
                before_prev = (report.last_seq, report.last_hash) if prev is not None else None
                prev = line
                report.lines += 1
                report.last_seq, report.last_hash = line.seq, line.hash
                continue
            problem, at_prev = found
            report.ok = False
            report.problem = problem
            where = prev if at_prev and prev is not None else line
            report.problem_path, report.problem_line = where.path, where.lineno
            if prev is not None:
                if at_prev:
                    report.lines -= 1
                    if before_prev is None:
                        report.first_seq = report.last_seq = report.last_hash = None
                    else:
                        report.last_seq, report.last_hash = before_prev
                yield prev, not at_prev
            yield line, False
            break
        else:
            if prev is not None:
                yield prev, True
            return
        while (line := self._next()) is not None:
            if line.last and (not line.newline or line.unparseable):
                report.warnings.append(
                    f"{line.where}: torn last line (incomplete write, e.g. a crash), "
                    "after the problem"
                )
                continue
            yield line, False

    def _check(self, prev: _Line | None, line: _Line) -> tuple[str, bool] | None:
        """None if `line` soundly follows `prev`, else (problem, whether it starts at `prev`)."""
        if line.error is not None:
            return f"{line.where}: {line.error}", False
        if prev is None:
            return self._check_first(line)
        expected = prev.seq + 1
        if line.seq == expected and line.prev == prev.hash:
            return None
        return self._classify(prev, line, expected)

    def _check_first(self, line: _Line) -> tuple[str, bool] | None:
        if line.seq == 1 and line.prev == GENESIS:
            return None
        if line.seq == 1:
            return f"{line.where}: seq 1 but prev_hash is not the genesis value (64 zeros)", False
        if line.prev == GENESIS:
            return (
                f"{line.where}: prev_hash is the genesis value (64 zeros) but seq is "
                f"{line.seq}, not 1"
            ), False
        self._start_note = (
            f"{line.where}: the chain begins at seq {line.seq}, not 1: the lines before it are "
            "in files not given (rotated away or deleted), so this first link cannot be checked"
        )
        self.report.notes.append(self._start_note)
        self._unchecked_start = line
        return None

    def _blame_unchecked_start(self, prev: _Line, line: _Line) -> tuple[str, bool] | None:
        """When the chain's first line was taken on trust and the next does not follow it."""
        if prev is not self._unchecked_start or line.seq > prev.seq:
            return None
        if prev.prev == line.hash and prev.seq == line.seq + 1:
            self.report.notes.remove(self._start_note)  # the chain does not begin at `prev`
            return (
                f"{prev.where}: lines out of order (seq {prev.seq} comes before seq {line.seq} "
                f"at {line.where})"
            ), True
        ahead = self._peek(1)
        after = ahead[0] if ahead and ahead[0].error is None else None
        if after is not None and after.seq == prev.seq + 1 and after.prev == prev.hash:
            return None  # the chain goes on from `prev`: `line` is the odd one
        goes_on = (line.seq == 1 and line.prev == GENESIS) or (
            after is not None and after.seq == line.seq + 1 and after.prev == line.hash
        )
        if not goes_on:
            return None
        self.report.notes.remove(self._start_note)
        return (
            f"{prev.where}: line inserted (the chain goes on from {line.where}, seq {line.seq}, "
            "which does not follow it)"
        ), True

    def _classify(self, prev: _Line, line: _Line, expected: int) -> tuple[str, bool]:
        ahead = [x for x in self._peek(_LOOKAHEAD) if x.error is None]
        following = self._peek(1)
        after = following[0] if following and following[0].error is None else None
        seq = line.seq

        if line.hash == prev.hash:
            return f"{line.where}: line duplicated (same as {prev.where})", False

        if seq == prev.seq and line.prev == prev.prev:
            # Two lines claim the same place: the one the chain does not go on from was inserted.
            if after is not None and after.prev == line.hash:
                return (
                    f"{prev.where}: line inserted (it claims seq {seq}, as does {line.where}, "
                    f"and the chain goes on from {line.where})"
                ), True
            if after is not None and after.prev == prev.hash:
                return (
                    f"{line.where}: line inserted (it claims seq {seq}, as does {prev.where}, "
                    f"and the chain goes on from {prev.where})"
                ), False
            return (
                f"{prev.where}: {prev.where} and {line.where} both claim seq {seq}: one of them "
                "was inserted"
            ), True

        blamed = self._blame_unchecked_start(prev, line)
        if blamed is not None:
            return blamed

        if after is not None and after.seq == expected and after.prev == prev.hash:
            # The chain goes on right after this line, as if it were not there.
            start = self._unchecked_start
            if start is not None and line.hash == start.prev:
                self.report.notes.remove(self._start_note)  # the chain begins with `line`
                return (
                    f"{line.where}: lines out of order (seq {seq} belongs before "
                    f"{start.where}, seq {start.seq})"
                ), False
            if any(line.prev == x.hash for x in ahead):
                return (
                    f"{line.where}: lines out of order (seq {seq} where seq {expected} was "
                    f"expected; seq {expected} is at {after.where})"
                ), False
            return (
                f"{line.where}: line inserted (seq {seq}; it does not link to the line before "
                "it, and the next line does)"
            ), False

        if seq == 1 and line.prev == GENESIS:
            return (
                f"{line.where}: a new chain starts here (seq 1, genesis prev_hash) after seq "
                f"{prev.seq}: lines inserted, or the writer lost the chain's head"
            ), False

        if seq > expected:
            for x in ahead:
                if x.seq == expected:
                    return (
                        f"{line.where}: lines out of order (seq {seq} where seq {expected} was "
                        f"expected; seq {expected} is at {x.where})"
                    ), False
            if line.prev == prev.hash:
                return (
                    f"{line.where}: seq jumps from {prev.seq} to {seq} although prev_hash "
                    "links: a forged (re-sealed) line"
                ), False
            count = seq - expected
            lines = f"{count} line{'s' if count > 1 else ''}"
            if line.lineno == 1 and line.path != prev.path:
                return (
                    f"{line.where}: {lines} missing between {prev.path} and {line.path} (seq "
                    f"jumps from {prev.seq} to {seq}): a file in between was not given or was "
                    "deleted, or lines were removed"
                ), False
            return (
                f"{line.where}: {lines} removed before this line (seq jumps from {prev.seq} "
                f"to {seq})"
            ), False

        if seq < expected:
            return (
                f"{line.where}: lines out of order (seq goes backwards: {seq} after {prev.seq})"
            ), False

        # The right seq, but prev_hash is not the previous line's hash: the previous line was
        # re-sealed after a change (a forger changing this line would leave its prev_hash alone),
        # unless the chain does not go on from this line either.
        if after is None or (after.seq == seq + 1 and after.prev == line.hash):
            return (
                f"{prev.where}: line altered and re-sealed (its hash is not the prev_hash that "
                f"{line.where} records)"
            ), True
        return (
            f"{line.where}: line does not link to the previous line (prev_hash mismatch): "
            "altered and re-sealed"
        ), False


def verify_files(paths: Sequence[StrPath]) -> VerifyReport:
    """Read `paths` in order (rotated files oldest first) as one chain; the first problem wins.

    Raises OSError if a file cannot be read.
    """
    report = VerifyReport()
    verifier = _Verifier(paths, report)
    try:
        for _ in verifier.run():
            if not report.ok:
                break
    finally:
        verifier.close()
    return report


ChainLine = _Line  # a line as read, for readers that need where it is (`evidence`)


def verified_lines(
    paths: Sequence[StrPath], report: VerifyReport
) -> Generator[tuple[ChainLine, bool], None, None]:
    """Every line that is not a torn tail, in order, with whether it belongs to the intact
    chain (False from the first problem on, which `report` names). Close it when stopping
    early."""
    verifier = _Verifier(paths, report)
    try:
        yield from verifier.run()
    finally:
        verifier.close()


def iter_verified(
    paths: Sequence[StrPath], allow_broken: bool = False, report: VerifyReport | None = None
) -> Iterator[tuple[dict[str, Any], bool]]:
    """Each line's event (all its fields, `seq`/`prev_hash`/`hash` included), verified as read.

    Without `allow_broken`, raises ChainBroken at the first problem (after yielding the lines
    before it, all ok). With it, goes on: the flag is False from the line where the problem
    begins; lines that are not JSON objects are skipped (counted in the report's warnings). A
    torn last line is never yielded. Pass a `report` to get warnings, notes and the problem.
    """
    report = report if report is not None else VerifyReport()
    skipped = 0
    verifier = _Verifier(paths, report)
    try:
        for line, ok in verifier.run():
            if not ok and not allow_broken:
                raise ChainBroken(report.problem or f"{line.where}: chain broken")
            if line.obj is None:
                skipped += 1
                continue
            yield line.obj, ok
    finally:
        verifier.close()
    if skipped:
        report.warnings.append(f"{skipped} line(s) that are not JSON objects were skipped")


# -- the head of an existing file ------------------------------------------------------------

_TAIL_BLOCK: Final = 64 * 1024


def last_head_of(path: StrPath) -> tuple[ChainHead | None, int]:
    """The head after the last complete line of `path`, and the byte offset where that line ends.

    Reads from the end backwards, so it costs the same for any file size. Bytes past the offset
    are a torn tail, as `verify_files` sees it: whatever follows the last newline, and a last
    line that is not JSON at all (a crash can leave zeros). The head is None and the offset 0
    when no line is complete. Raises ChainError if the last complete line is JSON but not a
    sound chain line (fields missing, hash mismatch): continuing a chain from it would hide that.
    """
    name = os.fspath(path)
    with open(name, "rb") as f:
        lines = _lines_backwards(f)
        found = next(lines, None)
        if found is None:
            return None, 0
        start, raw = found
        end = start + len(raw) + 1
        obj, error, unparseable = _parse(raw)
        if unparseable:  # torn: the chain ends with the line before it
            end = start
            found = next(lines, None)
            if found is None:
                return None, 0
            start, raw = found
            obj, error, _ = _parse(raw)
    if error is not None or obj is None:
        raise ChainError(
            f"{name}: the last complete line (line ending at byte {end}) cannot continue the "
            f"chain: {error}"
        )
    return ChainHead(obj["seq"], obj["hash"]), end


def _lines_backwards(f: BinaryIO) -> Iterator[tuple[int, bytes]]:
    """(offset, line without its newline) of the complete lines of `f`, the last one first."""
    pos = f.seek(0, os.SEEK_END)
    buf = b""  # from `pos` to the end of the line being assembled, its newline included
    while pos > 0:
        step = min(_TAIL_BLOCK, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step)
        if not buf:
            cut = block.rfind(b"\n")
            if cut < 0:
                continue  # still in the torn tail: nothing to keep
            buf = block[: cut + 1]
        else:
            buf = block + buf
        while (cut := buf.rfind(b"\n", 0, len(buf) - 1)) >= 0:
            yield pos + cut + 1, buf[cut + 1 : -1]
            buf = buf[: cut + 1]
    if buf:
        yield 0, buf[:-1]


# For readers of signed lines (`evidence`): the complete lines of a file from the end, and one
# line parsed and checked as `verify_files` checks it.
lines_backwards = _lines_backwards
parse_line = _parse
