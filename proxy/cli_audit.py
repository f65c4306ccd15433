"""`countersign audit verify [--public-key PEM] [--anchor URL] FILE...`: check the audit files.

Files are read in the order given as one chain: rotated files oldest first, the live file last,
e.g. `countersign audit verify audit.jsonl.20261124T000000 audit.jsonl` (the rotated names sort
by time, so `audit.jsonl.2* audit.jsonl` in a shell gives that order).

Without `--public-key` only the hash chain is checked, and the output says the log is unsigned.
With it, every checkpoint and key rotation must verify (`proxy.audit.evidence`); with `--anchor`,
the files must also hold every checkpoint the anchor kept for their chain (truncation, rewrites).

Exit codes: 0 intact (warnings, e.g. a torn last line, and notes do not change it), 1 the first
problem is printed as "file:line: what", 2 a file, key or anchor cannot be read, or bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

EXIT_BROKEN = 1
EXIT_UNREADABLE = 2

Action = Callable[[argparse.Namespace], int]

# `audit` actions by name: each registers its arguments in `add_parser` and runs from here.
ACTIONS: dict[str, Action] = {}


def _count(number: int, thing: str) -> str:
    return f"{number:,} {thing}{'s' if number != 1 else ''}"


def _summary_range(first: int | None, last: int | None) -> str:
    return f"seq {first}\u2013{last}" if first is not None else "no lines"


def _evidence_inputs(args: argparse.Namespace, command: str) -> tuple[Any, list[Any]] | None:
    """The public keys and anchored records the options name; None after printing why not."""
    from .audit.signing import SigningKeyError, load_public_keys

    if args.anchor and not args.public_key:
        print(
            f"countersign audit {command}: --anchor needs --public-key (the anchored "
            "checkpoints are checked by their signatures)",
            file=sys.stderr,
        )
        return None
    try:
        keys = load_public_keys(args.public_key)
    except SigningKeyError as exc:
        print(f"countersign audit {command}: {exc}", file=sys.stderr)
        return None
    anchored: list[Any] = []
    if args.anchor:
        from .audit.anchors import AnchorUnreadable, read_anchor
        from .audit.evidence import anchored_records

        # An https:// witness may want its reads signed like its writes: the secret comes from
        # the environment, never the command line (which every user of the machine can see).
        secret = os.environ.get("COUNTERSIGN_ANCHOR_SECRET") or None
        for url in args.anchor:
            try:
                records = read_anchor(url, secret=secret)
            except AnchorUnreadable as exc:
                print(f"countersign audit {command}: {exc}", file=sys.stderr)
                return None
            for warning in records.warnings:
                print(f"warning: {warning}", file=sys.stderr)
            anchored += anchored_records(records)
    return keys, anchored


def _readable(paths: list[str], command: str) -> bool:
    for path in paths:  # fail before reading gigabytes of the files that come before
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            print(
                f"countersign audit {command}: cannot read {path}: {_reason(exc)}", file=sys.stderr
            )
            return False
    return True


def cmd_verify(args: argparse.Namespace) -> int:
    from .audit.chain import verify_files

    paths: list[str] = args.files
    if not _readable(paths, "verify"):
        return EXIT_UNREADABLE
    if args.public_key or args.anchor:
        return _verify_signed(args, paths)
    try:
        report = verify_files(paths)
    except OSError as exc:
        where = exc.filename or "a file"
        print(f"countersign audit verify: cannot read {where}: {_reason(exc)}", file=sys.stderr)
        return EXIT_UNREADABLE
    for note in report.notes:
        print(f"note: {note}")
    for warning in report.warnings:
        print(f"warning: {warning}")
    if not report.ok:
        print(f"FAILED: {report.problem}")
        if report.lines:
            print(
                f"  intact before it: {report.lines:,} line{'s' if report.lines != 1 else ''}, "
                f"{_summary_range(report.first_seq, report.last_seq)}"
            )
        return EXIT_BROKEN
    if not report.lines:
        print("OK: no lines to verify (empty)")
        return 0
    files = f" in {len(paths)} files" if len(paths) > 1 else ""
    print(
        f"OK: {report.lines:,} line{'s' if report.lines != 1 else ''}{files}, "
        f"{_summary_range(report.first_seq, report.last_seq)}, chain intact "
        f"(last hash {report.last_hash})"
    )
    print(
        "unsigned: only the hash chain was checked (no --public-key): whoever can write the "
        "file could have changed it and re-chained it"
    )
    return 0


def _verify_signed(args: argparse.Namespace, paths: list[str]) -> int:
    """`verify --public-key`: the chain, every signed line, and the anchors; for auditors."""
    from .audit.evidence import EvidenceReport, check_evidence

    inputs = _evidence_inputs(args, "verify")
    if inputs is None:
        return EXIT_UNREADABLE
    keys, anchored = inputs
    evidence = EvidenceReport()
    try:
        check_evidence(paths, keys, anchored, evidence)
    except OSError as exc:
        where = exc.filename or "a file"
        print(f"countersign audit verify: cannot read {where}: {_reason(exc)}", file=sys.stderr)
        return EXIT_UNREADABLE
    chain = evidence.chain
    for note in [*chain.notes, *evidence.notes]:
        print(f"note: {note}")
    for warning in chain.warnings:
        print(f"warning: {warning}")
    files = f" in {len(paths)} files" if len(paths) > 1 else ""
    span = f", {evidence.first_ts} to {evidence.last_ts}" if evidence.first_ts else ""
    print(
        f"checked: {chain.lines:,} line{'s' if chain.lines != 1 else ''}{files}, "
        f"{_summary_range(chain.first_seq, chain.last_seq)}{span}"
    )
    last = evidence.last
    if last is not None:
        keys_used = ", ".join(evidence.keys_used)
        print(
            f"signed: {evidence.checkpoints:,} checkpoint{'s' if evidence.checkpoints != 1 else ''}"
            f" verified (key{'s' if len(evidence.keys_used) > 1 else ''} {keys_used}); the last, "
            f"at {last.where}, covers every line up to seq {last.seq}, written by {last.ts}"
        )
    for rotation in evidence.rotations:
        print(f"key rotation: {rotation}")
    if args.anchor:
        latest = evidence.anchored_latest
        if latest is not None:
            print(
                f"anchored: {evidence.anchored:,} anchored checkpoint"
                f"{'s' if evidence.anchored != 1 else ''} found in the files; the latest signs seq "
                f"{latest.get('seq')} at {latest.get('ts')}"
            )
        elif evidence.ok:
            print("anchored: the anchors hold no checkpoint of this chain in the files' range")
    if not evidence.ok:
        print(f"FAILED: {evidence.problem}")
        return EXIT_BROKEN
    if evidence.unsigned_lines and evidence.unsigned_from is not None:
        seq, ts = evidence.unsigned_from
        since = f", from {ts}" if ts else ""
        print(
            f"unsigned: {_count(evidence.unsigned_lines, 'line')} after the last checkpoint "
            f"(seq {seq}\u2013{chain.last_seq}{since}) are not covered by a signature yet: "
            "the next checkpoint covers them (or they were written after the last one, before "
            "a crash)"
        )
    assert last is not None  # a signed report without checkpoints is not ok
    print(f"OK: signed and intact up to {last.ts} (last hash {chain.last_hash})")
    return 0


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


ACTIONS["verify"] = cmd_verify


def cmd_export(args: argparse.Namespace) -> int:
    """One row per approval, read through the chain verifier (each chain of files in turn)."""
    from .audit.chain import ChainBroken, VerifyReport, iter_verified
    from .audit.evidence import EvidenceReport, iter_evidence
    from .audit.export import chains_of, collect, parse_when, write_csv, write_jsonl

    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until, end_of_day=True) if args.until else None
    except ValueError as exc:
        print(f"countersign audit export: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    signed = bool(args.public_key or args.anchor)
    inputs = _evidence_inputs(args, "export") if signed else None
    if signed and inputs is None:
        return EXIT_UNREADABLE
    rows = []
    broken: list[str] = []
    unsigned = 0
    for chain in chains_of(args.files):
        report = VerifyReport()
        try:
            # Streamed: only one row per approval is kept, never the whole trail.
            if inputs is not None:
                evidence = EvidenceReport(chain=report)
                events = iter_evidence(chain, *inputs, evidence, allow_broken=args.allow_broken)
                chain_rows = collect(events, since, until)
                if evidence.problem and not args.allow_broken:
                    raise ChainBroken(evidence.problem)
                covered = evidence.last.seq if evidence.ok and evidence.last else 0
                for row in chain_rows:
                    row.signed = row.chain_intact and row.last_seq <= covered
                    unsigned += not row.signed
                if evidence.problem and report.problem is None:
                    report.problem = evidence.problem
            else:
                events = iter_verified(chain, allow_broken=args.allow_broken, report=report)
                chain_rows = collect(events, since, until)
        except ChainBroken as exc:
            print(
                f"countersign audit export: {exc}\n  refusing to export from a broken chain "
                "(use --allow-broken to export anyway, with the affected rows marked)",
                file=sys.stderr,
            )
            return EXIT_BROKEN
        except OSError as exc:
            where = exc.filename or "a file"
            print(f"countersign audit export: cannot read {where}: {_reason(exc)}", file=sys.stderr)
            return EXIT_UNREADABLE
        if report.problem:
            broken.append(report.problem)
        rows += chain_rows
    rows.sort(key=lambda row: row.requested_at)
    write = write_csv if args.format == "csv" else write_jsonl
    if args.output:
        with open(args.output, "w", newline="", encoding="utf-8") as out:
            write(rows, out)
    else:
        write(rows, sys.stdout)
    for problem in broken:
        print(f"WARNING: chain broken at {problem}; rows after it are marked", file=sys.stderr)
    if inputs is None:
        print(
            "note: no --public-key: rows are checked against the hash chain only (signed: "
            "not checked)",
            file=sys.stderr,
        )
    elif unsigned:
        print(
            f"note: {_count(unsigned, 'row')} not covered by a verified checkpoint (signed: NO): "
            "written after the last checkpoint, or after a problem",
            file=sys.stderr,
        )
    print(f"exported {len(rows)} approvals", file=sys.stderr)
    return 0


ACTIONS["export"] = cmd_export


def add_parser(sub: Any) -> None:
    """Register `audit` and its actions (add an action here and in ACTIONS)."""
    parser = sub.add_parser("audit", help="verify and export the hash-chained, signed audit files")
    actions = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "verify",
        help="check that no line was altered, removed, inserted or reordered",
        description="Read the files as one hash chain and name the first line that was "
        "altered, removed, inserted or reordered. Give rotated files oldest first and the live "
        "file last, e.g.: countersign audit verify audit.jsonl.20261124T000000 audit.jsonl. "
        "With --public-key every signed checkpoint is verified too (re-chained edits, removed "
        "or forged checkpoints); with --anchor the files must hold every checkpoint the anchor "
        "kept (truncation, rewrites). Without a key the log is reported as unsigned. "
        "Exit status: 0 intact, 1 broken, 2 unreadable file, key or anchor.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="audit files, in chain order")
    _evidence_options(p)
    p = actions.add_parser(
        "export",
        help="one row per approval (evidence for auditors), from a verified chain",
        description="Write one row per approval requested in the window: requested at, "
        "requester, owner, method, route, path, rule, approvers with channel and reason, "
        "outcome, executed at, upstream status. The files are verified while read (rotated "
        "and per-worker files are grouped into their chains); a broken chain is refused unless "
        "--allow-broken is given, which marks the affected rows.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="audit files (any order)")
    p.add_argument("--since", help="first day or time (ISO 8601, UTC unless a zone is given)")
    p.add_argument("--until", help="last day or time (a bare date includes the whole day)")
    p.add_argument("--format", choices=["csv", "jsonl"], default="csv")
    p.add_argument("-o", "--output", help="write here instead of standard output")
    p.add_argument("--allow-broken", action="store_true", help="export a broken chain, marked")
    _evidence_options(p)
    parser.set_defaults(func=main)


def _evidence_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--public-key",
        action="append",
        default=[],
        metavar="PEM",
        help="the writer's Ed25519 public key(s) (repeat, or several in one file, across a key "
        "rotation): every checkpoint must verify",
    )
    p.add_argument(
        "--anchor",
        action="append",
        default=[],
        metavar="URL",
        help="file://, redis://... or https:// anchor whose checkpoints the files must hold "
        "(repeatable; needs --public-key; an https:// witness's read secret comes from "
        "COUNTERSIGN_ANCHOR_SECRET)",
    )


def main(args: argparse.Namespace) -> int:
    return ACTIONS[args.audit_command](args)
