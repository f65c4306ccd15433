"""Evidence export: one row per approval, assembled from the audit events.

`collect(events)` folds `approval.requested`, `approval.decided`, `approval.expired` and the
`request.forwarded` of an approved request (its execution: `outcome` completed with the
upstream's status, or ambiguous without one) into `ApprovalRow`s; the held request's own
`request.completed` only counts towards the row's chain check. `write_csv` / `write_jsonl`
render them. The command (`countersign audit export`) reads the events through the chain
verifier, so an export never silently includes a tampered trail.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

COLUMNS = (
    "approval_id",
    "requested_at",
    "requester",
    "requester_email",
    "owner",
    "method",
    "route",
    "path",
    "rule",
    "reason",
    "approvers",
    "outcome",
    "decided_at",
    "executed_at",
    "upstream_status",
    "chain_intact",
    "signed",
)


@dataclass
class ApprovalRow:
    approval_id: str
    requested_at: str = ""
    requester: str = ""
    requester_email: str = ""
    owner: str = ""
    method: str = ""
    route: str = ""
    path: str = ""
    rule: str = ""
    reason: str = ""
    approvers: list[str] = field(default_factory=list)
    outcome: str = "pending"
    decided_at: str = ""
    executed_at: str = ""
    upstream_status: int | None = None
    chain_intact: bool = True
    # Covered by a verified signed checkpoint (`audit export --public-key`); None: not checked.
    signed: bool | None = None
    last_seq: int = 0  # the seq of its latest event (not a column)


def parse_when(text: str, *, end_of_day: bool = False) -> datetime:
    """`2026-11-25` or any ISO 8601 time (UTC when no zone is given)."""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a date or ISO 8601 time: {text!r}") from None
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text) and end_of_day:
        moment = moment.replace(hour=23, minute=59, second=59, microsecond=999999)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _ts(event: Mapping[str, Any]) -> datetime | None:
    value = event.get("ts")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def collect(
    events: Iterable[tuple[Mapping[str, Any], bool]],
    since: datetime | None = None,
    until: datetime | None = None,
) -> list[ApprovalRow]:
    """Rows for the approvals requested within [since, until], in the order requested."""
    rows: dict[str, ApprovalRow] = {}
    for event, intact in events:
        approval_id = event.get("approval_id")
        if not isinstance(approval_id, str):
            continue
        name = event.get("event")
        row = rows.get(approval_id)
        if name == "approval.requested":
            requester = event.get("requester") or {}
            row = rows.setdefault(approval_id, ApprovalRow(approval_id))
            row.requested_at = str(event.get("ts", ""))
            row.requester = str(requester.get("subject") or "")
            row.requester_email = str(requester.get("email") or "")
            row.owner = str(requester.get("owner") or "")
            for key in ("method", "route", "path", "rule"):
                setattr(row, key, str(event.get(key) or ""))
            row.reason = str(event.get("reason") or "")
        if row is None:
            # Events of an approval requested before the files given: start a partial row.
            row = rows.setdefault(approval_id, ApprovalRow(approval_id))
            row.rule = str(event.get("rule") or "")
        row.chain_intact = row.chain_intact and intact
        seq = event.get("seq")
        if isinstance(seq, int):
            row.last_seq = max(row.last_seq, seq)
        if name == "approval.decided":
            approver = event.get("approver") or {}
            who = approver.get("email") or approver.get("subject") or "?"
            reason = f": {event['reason']}" if event.get("reason") else ""
            row.approvers.append(f"{who} ({event.get('channel')}) {event.get('verdict')}{reason}")
            outcome = str(event.get("outcome") or "")
            if outcome in ("approved", "denied"):
                row.outcome = outcome
                row.decided_at = str(event.get("ts", ""))
        elif name == "approval.expired":
            row.outcome = "expired"
        elif name == "request.forwarded":
            row.outcome = "executed"
            row.executed_at = str(event.get("ts", ""))
            status = event.get("status")
            row.upstream_status = status if isinstance(status, int) else None
    selected = []
    for row in rows.values():
        moment = _ts({"ts": row.requested_at})
        if moment is not None:
            if since is not None and moment < since:
                continue
            if until is not None and moment > until:
                continue
        elif since is not None or until is not None:
            continue  # requested outside the files given: its date is unknown
        selected.append(row)
    return selected


def write_csv(rows: Sequence[ApprovalRow], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    for row in rows:
        data = asdict(row)
        data["approvers"] = "; ".join(row.approvers)
        data["upstream_status"] = "" if row.upstream_status is None else row.upstream_status
        data["chain_intact"] = "yes" if row.chain_intact else "NO"
        data["signed"] = {None: "not checked", True: "yes", False: "NO"}[row.signed]
        writer.writerow([_cell(data[c]) for c in COLUMNS])


def _cell(value: Any) -> Any:
    # Spreadsheets execute cells starting with these: neutralize (OWASP CSV injection).
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def write_jsonl(rows: Sequence[ApprovalRow], out: TextIO) -> None:
    for row in rows:
        data = asdict(row)
        del data["last_seq"]
        out.write(json.dumps(data, ensure_ascii=False) + "\n")


_ROTATED = re.compile(r"^(?P<base>.+?)\.(?P<stamp>\d{8}T\d{6}(?:-\d{3})?)$")


def chains_of(paths: Sequence[str]) -> list[list[str]]:
    """Group files into chains: a live file with its rotated siblings (`<file>.<time>`), oldest
    first; each worker's file is its own chain."""
    groups: dict[str, list[tuple[str, str]]] = {}
    for path in paths:
        name = Path(path).name
        match = _ROTATED.match(name)
        base, order = (match["base"], match["stamp"]) if match else (name, "~live")
        key = str(Path(path).with_name(base))
        groups.setdefault(key, []).append((order, path))
    return [[p for _, p in sorted(members)] for members in groups.values()]
