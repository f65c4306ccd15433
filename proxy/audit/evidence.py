"""Signed evidence in audit files: finding the last signed line (for the writer) and checking
every checkpoint of a chain against public keys and anchors (for the auditor).

What the checks prove, with the public keys of the writer:
- a checkpoint whose signature verifies and whose signed head (`seq`, `hash`) is the line before
  it proves that every line up to that head is exactly what the writer wrote: the chain links
  each of those lines to the signed hash. A line changed before it and the chain re-sealed
  (re-chained) leaves the signed head pointing at a hash that is no longer there;
- each checkpoint names the previous one (`prev_checkpoint`), so a checkpoint removed from the
  middle of a file is named even when the lines around it were re-chained;
- a checkpoint signed by a key that was not given, or whose signature does not verify, is forged;
- a key rotation (`audit.key_rotated`) is itself signed by the new key, and later checkpoints must
  use the key it names.

What they cannot prove without anchors: the lines after the last checkpoint, and whether lines
were cut from the end together with the checkpoints that covered them (the file ends earlier, and
nothing in it says so). An anchor keeps each checkpoint outside the administrator's reach: the
files must contain the line and the checkpoint of every anchored checkpoint of their chain, so
truncation and a history rewritten after it was anchored are named. An administrator who holds
the signing key can still sign a new history after the last anchored checkpoint: anchors bound
how far back that can reach.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .chain import ChainLine, StrPath, VerifyReport, lines_backwards, parse_line, verified_lines
from .signing import (
    CHECKPOINT_EVENT,
    CHECKPOINT_TYPE,
    KEY_ROTATED_EVENT,
    ROTATION_TYPE,
    b64url_decode,
    key_id_of,
    verify_statement,
)

_CHECKPOINT_MARK: Final = f'"event":"{CHECKPOINT_EVENT}"'.encode()
_ROTATION_MARK: Final = f'"event":"{KEY_ROTATED_EVENT}"'.encode()


# -- the writer: where the signed chain stands ----------------------------------------------


@dataclass(frozen=True, slots=True)
class LastSigned:
    """The signed state a writer continues from."""

    chain: str
    key_id: str  # the key of the latest signed line (a checkpoint, or a rotation to it)
    checkpoint_seq: int  # the seq of the latest checkpoint line (0: none found)


def last_signed_in(files: Sequence[StrPath]) -> LastSigned | None:
    """The latest signed line in `files` (newest first: the live file, then rotated ones).

    Reads backwards, so a file costs only as much as the lines after its last checkpoint. Two
    files without any signed line end the search: the chain was not being signed then.
    """
    found: tuple[str, str] | None = None  # (chain, key id) of the latest signed line
    unsigned_files = 0
    for path in files:
        seen_any = False
        with open(path, "rb") as f:
            for _, raw in lines_backwards(f):
                is_checkpoint = _CHECKPOINT_MARK in raw
                if not is_checkpoint and _ROTATION_MARK not in raw:
                    continue
                obj, error, _ = parse_line(raw)
                if error is not None or obj is None:
                    continue
                statement = obj.get("checkpoint" if is_checkpoint else "rotation")
                if not isinstance(statement, dict) or not isinstance(statement.get("chain"), str):
                    continue
                seen_any = True
                if found is None:
                    found = (statement["chain"], str(statement.get("key_id")))
                if is_checkpoint and statement["chain"] == found[0]:
                    return LastSigned(found[0], found[1], int(obj["seq"]))
        unsigned_files = 0 if seen_any else unsigned_files + 1
        if unsigned_files >= 2:
            break
    return None if found is None else LastSigned(found[0], found[1], 0)


# -- the auditor: checking a chain's signatures --------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedCheckpoint:
    where: str  # file:line of the checkpoint line
    line_seq: int  # the checkpoint line's own seq
    seq: int  # the head it signs: every line up to it is covered
    ts: str
    key_id: str


@dataclass
class EvidenceReport:
    """The outcome of `check_evidence`: the hash chain's report, and what the signatures and
    anchors add. `problem` is the first problem found (the chain's own, if it is broken)."""

    chain: VerifyReport = field(default_factory=VerifyReport)
    chains: list[str] = field(default_factory=list)  # ids of the signed chains seen
    checkpoints: int = 0
    keys_used: list[str] = field(default_factory=list)
    last: VerifiedCheckpoint | None = None
    first_ts: str | None = None
    last_ts: str | None = None
    unsigned_lines: int = 0  # lines after the last verified checkpoint
    unsigned_from: tuple[int, str | None] | None = None  # (seq, ts) of the first of them
    rotations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    anchored: int = 0  # anchored checkpoints of these chains that were found in the files
    anchored_latest: Mapping[str, Any] | None = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.chain.ok and self.problem is None


class _Checker:
    def __init__(
        self,
        keys: Mapping[str, Ed25519PublicKey],
        anchored: Sequence[Mapping[str, Any]],
        report: EvidenceReport,
    ) -> None:
        self._keys = keys
        self._report = report
        self._chain: str | None = None
        self._key_id: str | None = None
        self._last_line: ChainLine | None = None
        self._last_checkpoint: VerifiedCheckpoint | None = None
        self._first_seq: int | None = None
        # Anchored checkpoints by the seq of the head they sign; the files' hash at each.
        self._anchored: dict[int, list[Mapping[str, Any]]] = {}
        for record in anchored:
            seq = record.get("seq")
            if record.get("type") == CHECKPOINT_TYPE and isinstance(seq, int):
                self._anchored.setdefault(seq, []).append(record)
        self._hash_at: dict[int, tuple[str, str]] = {}  # seq -> (hash, where)
        self._signatures: set[str] = set()  # sigs of the checkpoints found in the files

    def feed(self, line: ChainLine) -> str | None:
        """Check one intact line; the problem it shows, if any."""
        report = self._report
        obj = line.obj or {}
        if self._first_seq is None:
            self._first_seq = line.seq
        ts = obj.get("ts")
        if isinstance(ts, str):
            report.first_ts = report.first_ts or ts
            report.last_ts = ts
        if line.seq in self._anchored:
            self._hash_at[line.seq] = (line.hash, line.where)
        event = obj.get("event")
        problem = None
        if event == CHECKPOINT_EVENT:
            problem = self._checkpoint(line, obj.get("checkpoint"))
        elif event == KEY_ROTATED_EVENT:
            problem = self._rotation(line, obj.get("rotation"))
        else:
            if report.unsigned_from is None:
                report.unsigned_from = (line.seq, ts if isinstance(ts, str) else None)
            report.unsigned_lines += 1
        self._last_line = line
        return problem

    def _span_since_checkpoint(self) -> str:
        last = self._last_checkpoint
        if last is None:
            return "before it"
        return f"after the checkpoint at {last.where} (seq {last.line_seq})"

    def _checkpoint(self, line: ChainLine, statement: Any) -> str | None:
        report = self._report
        if not isinstance(statement, dict) or statement.get("type") != CHECKPOINT_TYPE:
            return f"{line.where}: a checkpoint line without a checkpoint statement: altered"
        why = verify_statement(statement, self._keys)
        if why is not None:
            return f"{line.where}: checkpoint {why}: a forged or altered checkpoint"
        seq, head = statement.get("seq"), statement.get("hash")
        if seq != line.seq - 1 or head != line.prev:
            return (
                f"{line.where}: the checkpoint signed seq {seq} with hash {str(head)[:16]}..., "
                f"which is not the line before it: lines {self._span_since_checkpoint()} were "
                "altered, inserted or removed and the chain re-sealed (re-chained) after it was "
                "signed"
            )
        chain = statement.get("chain")
        previous = statement.get("prev_checkpoint")
        if not isinstance(chain, str) or not isinstance(previous, int):
            return f"{line.where}: a checkpoint without chain or prev_checkpoint: altered"
        if self._chain is not None and chain != self._chain:
            if previous != 0:
                return (
                    f"{line.where}: a checkpoint of another chain ({chain}, this file's is "
                    f"{self._chain}): lines from another log were spliced in"
                )
            report.notes.append(
                f"{line.where}: signing started anew (chain {chain}); lines "
                f"{self._span_since_checkpoint()} were not signed when written"
            )
            self._key_id = None
        elif self._last_checkpoint is not None and previous != self._last_checkpoint.line_seq:
            return (
                f"{line.where}: checkpoint(s) removed: this checkpoint follows the one at seq "
                f"{previous}, but the previous checkpoint in the file is at "
                f"{self._last_checkpoint.where} (seq {self._last_checkpoint.line_seq})"
            )
        elif self._last_checkpoint is None and previous != 0:
            if self._first_seq is not None and previous < self._first_seq:
                report.notes.append(
                    f"{line.where}: the checkpoint before this one (seq {previous}) is in a file "
                    "not given"
                )
            else:
                return (
                    f"{line.where}: checkpoint(s) removed: this checkpoint follows one at seq "
                    f"{previous}, which is not a checkpoint in the files"
                )
        key_id = str(statement["key_id"])
        if self._key_id is not None and key_id != self._key_id:
            return (
                f"{line.where}: checkpoint signed by key {key_id}, but the chain's key is "
                f"{self._key_id} and no key rotation line comes before it"
            )
        if chain not in report.chains:
            report.chains.append(chain)
        if key_id not in report.keys_used:
            report.keys_used.append(key_id)
        self._chain, self._key_id = chain, key_id
        checkpoint = VerifiedCheckpoint(line.where, line.seq, seq, str(statement.get("ts")), key_id)
        self._last_checkpoint = report.last = checkpoint
        report.checkpoints += 1
        report.unsigned_lines = 0
        report.unsigned_from = None
        self._signatures.add(str(statement["sig"]))
        return None

    def _rotation(self, line: ChainLine, statement: Any) -> str | None:
        report = self._report
        if not isinstance(statement, dict) or statement.get("type") != ROTATION_TYPE:
            return f"{line.where}: a key rotation line without a rotation statement: altered"
        why = verify_statement(statement, self._keys)
        if why is not None:
            return f"{line.where}: key rotation {why}: a forged or altered rotation"
        try:
            public = Ed25519PublicKey.from_public_bytes(
                b64url_decode(str(statement.get("public_key")))
            )
        except ValueError:
            return f"{line.where}: key rotation with an unreadable public key: altered"
        new_key = statement.get("key_id")
        if key_id_of(public) != new_key:
            return f"{line.where}: key rotation whose public key is not key {new_key}: altered"
        if statement.get("seq") != line.seq - 1 or statement.get("hash") != line.prev:
            return (
                f"{line.where}: the key rotation signed a head that is not the line before it: "
                f"lines {self._span_since_checkpoint()} were altered and re-chained"
            )
        previous = statement.get("previous_key_id")
        if self._key_id is not None and previous != self._key_id:
            return (
                f"{line.where}: key rotation from {previous}, but the chain's key is {self._key_id}"
            )
        report.rotations.append(
            f"{line.where}: key {previous} replaced by {new_key} at {statement.get('ts')}"
        )
        self._key_id = str(new_key)
        report.unsigned_lines += 1
        return None

    def finish(self) -> str | None:
        """What can only be said at the end: no checkpoint at all, the anchors."""
        report = self._report
        if report.checkpoints == 0:
            chains = sorted(
                {str(r.get("chain")) for records in self._anchored.values() for r in records}
            )
            held = (
                f" (the anchors hold checkpoints of chain(s) {', '.join(chains)})" if chains else ""
            )
            return (
                "no signed checkpoint in the files: the log was written without "
                f"audit.signing_key, or every checkpoint was removed{held}"
            )
        mine = [
            record
            for records in self._anchored.values()
            for record in records
            if record.get("chain") in report.chains
        ]
        if not mine:
            return None
        last_line = self._last_line
        last_seq = last_line.seq if last_line is not None else 0
        first_seq = self._first_seq or 0
        problems: list[tuple[int, str]] = []
        for record in sorted(mine, key=lambda r: int(r["seq"])):
            seq = int(record["seq"])
            when = record.get("ts")
            if seq < first_seq:
                continue  # in files not given
            if verify_statement(record, self._keys) is not None:
                report.notes.append(
                    f"an anchored checkpoint of seq {seq} ({when}) does not verify: ignored"
                )
                continue
            if seq > last_seq:
                where = last_line.where if last_line is not None else "the files"
                problems.append(
                    (
                        last_seq + 1,
                        f"{where}: the files end at seq {last_seq}, but a checkpoint of seq "
                        f"{seq} signed at {when} was anchored: the lines after seq {last_seq} "
                        "were removed (truncated)",
                    )
                )
                break
            found = self._hash_at.get(seq)
            if found is None or found[0] != record.get("hash"):
                where = found[1] if found is not None else f"seq {seq}"
                problems.append(
                    (
                        seq,
                        f"{where}: not the line anchored at {when} (its hash differs): the log "
                        "was rewritten at or before this line",
                    )
                )
                break
            if record.get("sig") not in self._signatures:
                problems.append(
                    (
                        seq + 1,
                        f"{found[1]}: the checkpoint anchored at {when} after this line (seq "
                        f"{seq}) is not in the file: removed",
                    )
                )
                break
            report.anchored += 1
            report.anchored_latest = record
        return min(problems)[1] if problems else None


def check_evidence(
    paths: Sequence[StrPath],
    keys: Mapping[str, Ed25519PublicKey],
    anchored: Sequence[Mapping[str, Any]] = (),
    report: EvidenceReport | None = None,
) -> EvidenceReport:
    """Verify `paths` as one chain (as `verify_files`), every signed line in it against `keys`,
    and the files against the anchored checkpoints. Raises OSError if a file cannot be read."""
    report = report if report is not None else EvidenceReport()
    for _ in iter_evidence(paths, keys, anchored, report, allow_broken=False):
        pass
    return report


def iter_evidence(
    paths: Sequence[StrPath],
    keys: Mapping[str, Ed25519PublicKey],
    anchored: Sequence[Mapping[str, Any]],
    report: EvidenceReport,
    *,
    allow_broken: bool,
) -> Iterator[tuple[dict[str, Any], bool]]:
    """Each line's event with whether it is intact, as `chain.iter_verified`, while checking
    signatures and anchors into `report`. Without `allow_broken` it stops at the first problem
    (the caller reads it from `report`); with it, every line after the problem is yielded as not
    intact."""
    checker = _Checker(keys, anchored, report)
    lines = verified_lines(paths, report.chain)
    broken = False
    try:
        for line, ok in lines:
            if ok and not broken:
                problem = checker.feed(line)
                if problem is not None:
                    report.problem = problem
                    broken = True
            elif not ok and report.problem is None:
                report.problem = report.chain.problem
                broken = True
            if broken and not allow_broken:
                return
            if line.obj is not None:
                yield line.obj, not broken
    finally:
        lines.close()
    if report.problem is None:
        report.problem = checker.finish()


def anchored_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The checkpoint statements among what an anchor holds, each once (anchors deliver at
    least once: a lost acknowledgement means the same statement twice)."""
    seen: set[str] = set()
    kept = []
    for record in records:
        if not isinstance(record, Mapping) or record.get("type") != CHECKPOINT_TYPE:
            continue
        sig = str(record.get("sig"))
        if sig not in seen:
            seen.add(sig)
            kept.append(record)
    return kept


__all__ = [
    "EvidenceReport",
    "LastSigned",
    "VerifiedCheckpoint",
    "anchored_records",
    "check_evidence",
    "iter_evidence",
    "last_signed_in",
]
