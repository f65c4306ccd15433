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


def add_parser(sub: Any) -> None:
    """Register `audit` and its actions (add an action here and in ACTIONS)."""
    parser = sub.add_parser("audit", help="verify the hash-chained audit files")
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
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    return ACTIONS[args.audit_command](args)
