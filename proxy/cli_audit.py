"""`countersign audit verify FILE...`: check the hash-chained audit files.

Files are read in the order given as one chain: rotated files oldest first, the live file last,
e.g. `countersign audit verify audit.jsonl.20261124T000000 audit.jsonl` (the rotated names sort
by time, so `audit.jsonl.2* audit.jsonl` in a shell gives that order).

Exit codes: 0 the chain is intact (warnings, e.g. a torn last line, and notes do not change it),
1 the first problem is printed as "file:line: what", 2 a file cannot be read or bad usage.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

EXIT_BROKEN = 1
EXIT_UNREADABLE = 2

Action = Callable[[argparse.Namespace], int]

# `audit` actions by name: each registers its arguments in `add_parser` and runs from here.
ACTIONS: dict[str, Action] = {}


def _summary_range(first: int | None, last: int | None) -> str:
    return f"seq {first}\u2013{last}" if first is not None else "no lines"


def cmd_verify(args: argparse.Namespace) -> int:
    from .audit.chain import verify_files

    paths: list[str] = args.files
    for path in paths:  # fail before reading gigabytes of the files that come before
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            print(f"countersign audit verify: cannot read {path}: {_reason(exc)}", file=sys.stderr)
            return EXIT_UNREADABLE
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
    return 0


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


ACTIONS["verify"] = cmd_verify


def cmd_export(args: argparse.Namespace) -> int:
    """One row per approval, read through the chain verifier (each chain of files in turn)."""
    from .audit.chain import ChainBroken, VerifyReport, iter_verified
    from .audit.export import chains_of, collect, parse_when, write_csv, write_jsonl

    try:
        since = parse_when(args.since) if args.since else None
        until = parse_when(args.until, end_of_day=True) if args.until else None
    except ValueError as exc:
        print(f"countersign audit export: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    rows = []
    broken: list[str] = []
    for chain in chains_of(args.files):
        report = VerifyReport()
        try:
            # Streamed: only one row per approval is kept, never the whole trail.
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
    print(f"exported {len(rows)} approvals", file=sys.stderr)
    return 0


ACTIONS["export"] = cmd_export


def add_parser(sub: Any) -> None:
    """Register `audit` and its actions (add an action here and in ACTIONS)."""
    parser = sub.add_parser("audit", help="verify and export the hash-chained audit files")
    actions = parser.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "verify",
        help="check that no line was altered, removed, inserted or reordered",
        description="Read the files as one hash chain and name the first line that was "
        "altered, removed, inserted or reordered. Give rotated files oldest first and the live "
        "file last, e.g.: countersign audit verify audit.jsonl.20261124T000000 audit.jsonl. "
        "Exit status: 0 intact, 1 broken, 2 unreadable file.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="audit files, in chain order")
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
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    return ACTIONS[args.audit_command](args)
