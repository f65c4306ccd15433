"""`countersign approvals list|show [--body]|approve|deny [--all --rule R]`: the approvals API
from a terminal.

It talks to a running proxy over HTTP with the approver's own bearer token (an OIDC access token
or an API key): the CLI has no powers of its own, the proxy authorizes every call.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode, urlsplit

import aiohttp

from .config import load_settings

API = "/_countersign/api/approvals"
DECISIONS = "/_countersign/api/decisions"


class CliError(Exception):
    """Printed as is; exit status 1."""


class UsageError(CliError):
    """Bad usage (a malformed --url): printed as is; exit status 2, as argparse's errors."""


URL_EXAMPLE = "http://127.0.0.1:8080"


def _checked_url(url: str, source: str) -> str:
    """`url` without a trailing slash, if it is an http(s) URL with a host; else a UsageError."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port that is not a number from 0 to 65535)
    except ValueError as exc:
        raise UsageError(f"{source} is not a valid URL ({exc}), e.g. {URL_EXAMPLE}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise UsageError(f"{source} must start with http:// or https://, e.g. {URL_EXAMPLE}")
    return url.rstrip("/")


def base_url(args: argparse.Namespace) -> str:
    if args.url:
        return _checked_url(str(args.url), "--url")
    if os.environ.get("COUNTERSIGN_URL"):
        return _checked_url(os.environ["COUNTERSIGN_URL"], "$COUNTERSIGN_URL")
    config = args.config or os.environ.get("COUNTERSIGN_CONFIG")
    if config:
        server = load_settings(config).server  # a ConfigError exits 2 with file:line
        if server.public_url:
            return _checked_url(server.public_url, f"server.public_url in {config}")
        host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{server.port}"
    return URL_EXAMPLE


def token(args: argparse.Namespace) -> str:
    value = args.token or os.environ.get("COUNTERSIGN_TOKEN")
    if not value:
        raise CliError(
            "no token: pass --token or set COUNTERSIGN_TOKEN to your bearer token (OIDC access "
            "token or API key)"
        )
    return str(value)


def error_text(body: Any) -> str:
    """`code: message` of an error answer (`{"error": {"code", "message", …}}`)."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "error" if error is None else str(error)
    detail = error.get("message") or error.get("reason") or ""
    state = f" (approval is {error['state']})" if error.get("state") else ""
    return f"{error.get('code', 'error')}: {detail}{state}".rstrip(": ")


async def _call(
    method: str,
    url: str,
    bearer: str,
    payload: dict[str, Any] | None = None,
    *,
    seconds: float = 30,
) -> Any:
    headers = {"Authorization": f"Bearer {bearer}"}
    client_timeout = aiohttp.ClientTimeout(total=seconds)
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.request(method, url, json=payload, headers=headers) as resp,
        ):
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = {"error": {"code": "invalid_response", "message": await resp.text()}}
            if resp.status >= 400:
                raise CliError(f"{resp.status} {error_text(body)}")
            return body
    except aiohttp.ClientError as exc:
        raise CliError(f"cannot reach {url}: {exc}") from None


def _when(iso: str | None) -> str:
    if not iso:
        return "-"
    moment = datetime.fromisoformat(iso)
    seconds = int((moment - datetime.now(UTC)).total_seconds())
    if seconds >= 0:
        return f"in {seconds // 60}m{seconds % 60:02d}s"
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


# Terminal controls and bidirectional overrides: text from the agent must not move the cursor,
# erase lines or reorder what the approver reads.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _shown(value: Any) -> str:
    """`value` as inert text: every control character visible as an escape (`\\x1b`)."""
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), str(value))


def _one_line(value: Any) -> str:
    """`value` inert and on one line (a newline shown as `\\n`)."""
    return _shown(value).replace("\n", "\\n")


def render_table(approvals: list[dict[str, Any]]) -> str:
    if not approvals:
        return "no approvals"
    rows: list[tuple[str, ...]] = [
        ("ID", "STATE", "RULE", "REQUEST", "REQUESTER", "REASON", "EXPIRES")
    ]
    for a in approvals:
        requester = a["requester"]
        who = requester.get("email") or requester["subject"]
        if requester.get("owner"):
            who += f" (for {requester['owner']})"
        quorum = f" {a['approvals']}/{a['quorum']}" if a["quorum"] > 1 else ""
        rows.append(
            (
                a["approval_id"],
                a["state"] + quorum,
                a["rule"],
                f"{a['method']} {a['path']}" + (f"?{a['query']}" if a["query"] else ""),
                who,
                (a.get("reason") or "-")[:40],
                _when(a["expires_at"]) if a["state"] == "pending" else "-",
            )
        )
    rows = [tuple(_one_line(cell) for cell in row) for row in rows]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# A decision's verdict as a past participle: "approved by …", "denied by …".
DECIDED = {"approve": "approved", "deny": "denied"}


def render_one(a: dict[str, Any]) -> str:
    """An approval as an approver needs to judge it: what will run, where, for whom, and why.

    Every value is shown inert (`_one_line`): agent-controlled text can neither add lines of its
    own nor steer the terminal. Only the body preview keeps its line breaks, each line indented.
    """
    v = _one_line
    requester = a["requester"]
    quorum = f"quorum {a['approvals']}/{a['quorum']}"
    lines = [
        f"approval {v(a['approval_id'])}: {v(a['state'])}",
        f"  request:    {v(a['method'])} {v(a.get('target') or a['path'])}",
        f"  upstream:   {v(a.get('upstream_url') or '-')}",
        f"  route/rule: {v(a['route'])} / {v(a['rule'])} ({quorum})",
        f"  requester:  {v(requester['subject'])}"
        + (f" <{v(requester['person'])}>" if requester.get("person") else "")
        + (
            f" <{v(requester['email'])}, unverified>"
            if requester.get("email") and not requester.get("person")
            else ""
        )
        + (f", acting for {v(requester['owner'])}" if requester.get("owner") else ""),
    ]
    if a.get("actions"):
        lines.append(f"  actions:    {v(', '.join(a['actions']))}")
    if a.get("risk"):
        lines.append(f"  risk:       {v(a['risk'])}")
    if a.get("note"):
        lines.append(f"  note:       {v(a['note'])}")
    if a.get("earlier_attempt"):
        lines.append(
            f"  WARNING:    approved before as {v(a['earlier_attempt'])} and sent, but the "
            "upstream failed: it may already have run"
        )
    if a.get("tool_arguments"):
        for number, line in enumerate(str(a["tool_arguments"]).splitlines()):
            lines.append(("  arguments:  " if number == 0 else " " * 14) + v(line))
    if a.get("reason"):
        lines.append(f"  reason:     {v(a['reason'])}")
    for header in a.get("headers", []):
        mark = "  (secret, redacted)" if header.get("redacted") else ""
        lines.append(f"  header:     {v(header['name'])}: {v(header['value'])}{mark}")
    if a.get("body_bytes"):
        lines.append(
            f"  body:       {a['body_bytes']} bytes, {v(a.get('content_type') or 'no type')}, "
            f"sha256 {v(a.get('body_sha256'))}"
            + ("; the preview is cut: `--body` prints it all" if a.get("body_truncated") else "")
        )
        lines.extend("    | " + _shown(line) for line in (a.get("body_preview") or "").split("\n"))
    if a.get("abandoned_at"):
        lines.append(f"  the client went away at {v(a['abandoned_at'])} (an identical retry joins)")
    for d in a.get("decisions", []):
        who = d["approver"].get("person") or d["approver"].get("email") or d["approver"]["subject"]
        reason = f": {v(d['reason'])}" if d.get("reason") else ""
        verdict = DECIDED.get(d["verdict"], d["verdict"])
        lines.append(f"  {v(verdict)} by {v(who)} via {v(d['channel'])} at {d['at']}{reason}")
    if a.get("outcome") == "ambiguous":
        lines.append(
            f"  executed at {a['executed_at']}: the upstream failed after receiving it, so it "
            "may or may not have run"
        )
    elif a.get("upstream_status") is not None:
        lines.append(f"  executed at {a['executed_at']}, upstream answered {a['upstream_status']}")
    grant = a.get("grant") or {}
    if grant.get("grant_id"):
        left = "" if grant.get("uses_left") is None else f", {grant['uses_left']} left"
        lines.append(
            f"  grant:      {v(grant['grant_id'])}: {grant.get('uses')} more like "
            f"{v(grant.get('pattern'))} until {v(grant.get('expires_at'))}{left}"
        )
    elif grant.get("offered") and a.get("state") == "pending":
        lines.append(
            f"  grantable:  up to {grant.get('max_uses')} more like {v(grant.get('pattern'))} "
            f"for up to {(grant.get('max_seconds') or 0) // 60} min (--grant-uses, "
            "--grant-minutes)"
        )
    return "\n".join(lines)


async def _bytes(url: str, bearer: str) -> bytes:
    """A raw answer (the held body), or the API's error as a `CliError`."""
    headers = {"Authorization": f"Bearer {bearer}"}
    timeout = aiohttp.ClientTimeout(total=60)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, headers=headers) as resp,
        ):
            data = await resp.read()
            if resp.status >= 400:
                try:
                    body = json.loads(data)
                except ValueError:
                    body = {"error": {"code": "invalid_response", "message": data.decode()}}
                raise CliError(f"{resp.status} {error_text(body)}")
            return data
    except aiohttp.ClientError as exc:
        raise CliError(f"cannot reach {url}: {exc}") from None


async def list_approvals(url: str, bearer: str, state: str, limit: int) -> dict[str, Any]:
    """Up to `limit` approvals, newest first, following the API's `next_cursor` page by page;
    the answer has the shape of one page (`approvals`, and `next_cursor` to read on)."""
    approvals: list[dict[str, Any]] = []
    cursor: str | None = None
    while len(approvals) < limit:
        query: dict[str, str] = {"limit": str(min(limit - len(approvals), 1000))}
        if state != "all":
            query["state"] = state
        if cursor is not None:
            query["cursor"] = cursor
        body = await _call("GET", f"{url}{API}?{urlencode(query)}", bearer)
        approvals.extend(body["approvals"])
        cursor = body.get("next_cursor")
        if cursor is None:
            break
    return {"approvals": approvals[:limit], "next_cursor": cursor}


async def run(args: argparse.Namespace) -> int:
    url = base_url(args)
    bearer = token(args)
    if args.approvals_command == "list":
        body = await list_approvals(url, bearer, args.state, args.limit)
        print(json.dumps(body, indent=2) if args.json else render_table(body["approvals"]))
        return 0
    if args.approvals_command == "show" and args.body:
        # The exact bytes the agent sent, for reading or diffing; nothing added.
        sys.stdout.buffer.write(await _bytes(f"{url}{API}/{args.id}/body", bearer))
        sys.stdout.buffer.flush()
        return 0
    if args.approvals_command == "show":
        body = await _call("GET", f"{url}{API}/{args.id}", bearer)
        print(json.dumps(body, indent=2) if args.json else render_one(body))
        return 0
    verdict = "approve" if args.approvals_command == "approve" else "deny"
    payload: dict[str, Any] = {"verdict": verdict}
    if args.reason:
        payload["reason"] = args.reason
    uses, minutes = getattr(args, "grant_uses", None), getattr(args, "grant_minutes", None)
    if (uses is None) != (minutes is None):
        raise UsageError("a grant needs both --grant-uses and --grant-minutes")
    if args.all:
        return await _decide_all(url, bearer, args, payload, granted=uses is not None)
    if args.rule or args.requester:
        raise UsageError("--rule and --requester select approvals for --all; add --all")
    if not args.id:
        raise UsageError(
            f"name the approval to {verdict} (an id from `countersign approvals list`), or "
            "use --all with --rule or --requester"
        )
    if uses is not None:
        payload["grant"] = {"uses": uses, "minutes": minutes}
    body = await _call("POST", f"{url}{API}/{args.id}/decision", bearer, payload)
    print(json.dumps(body, indent=2) if args.json else render_one(body))
    return 0


async def _decide_all(
    url: str, bearer: str, args: argparse.Namespace, payload: dict[str, Any], *, granted: bool
) -> int:
    """`approve|deny --all --rule R [--requester S]`: one bulk decision (`POST …/decisions`)."""
    if args.id:
        raise UsageError("give an approval id or --all, not both")
    if granted:
        raise UsageError("--all decides many approvals at once: it takes no grant")
    if not args.rule and not args.requester:
        raise UsageError(
            "--all needs --rule or --requester (it decides every pending approval they select "
            "that you may decide)"
        )
    selection: dict[str, str] = {}
    if args.rule:
        selection["rule"] = args.rule
    if args.requester:
        selection["requester"] = args.requester
    payload["filter"] = selection
    body = await _call("POST", f"{url}{DECISIONS}", bearer, payload, seconds=300)
    print(json.dumps(body, indent=2) if args.json else render_bulk(payload["verdict"], body))
    return 0


def render_bulk(verdict: str, body: dict[str, Any]) -> str:
    """A bulk decision's answer: how many were decided (and where each stands), and every one
    skipped with why."""
    decided = body.get("decided") or []
    skipped = body.get("skipped") or []
    counts: dict[str, int] = {}
    for entry in decided:
        counts[str(entry.get("state"))] = counts.get(str(entry.get("state")), 0) + 1
    states = ", ".join(f"{n} now {_one_line(s)}" for s, n in sorted(counts.items()))
    word = DECIDED.get(verdict, verdict)
    noun = "approval" if body.get("count") == 1 else "approvals"
    lines = [
        f"{word} {body.get('count', len(decided))} {noun}" + (f" ({states})" if states else "")
    ]
    if skipped:
        lines.append(f"skipped {len(skipped)}:")
        lines.extend(
            f"  {_one_line(s.get('approval_id'))}  {_one_line(s.get('code'))}: "
            f"{_one_line(s.get('message'))}"
            for s in skipped
        )
    return "\n".join(lines)


def add_parser(sub: Any, with_config: Any) -> None:
    parser = sub.add_parser("approvals", help="list, show, approve or deny approvals")
    actions = parser.add_subparsers(dest="approvals_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_config(p)
        p.add_argument(
            "--url",
            help="proxy base URL (default: $COUNTERSIGN_URL, the config's "
            "server.public_url or listen address, else http://127.0.0.1:8080)",
        )
        p.add_argument("--token", help="your bearer token (default: $COUNTERSIGN_TOKEN)")
        p.add_argument("--json", action="store_true", help="print the API's JSON")
        return p

    p = common(actions.add_parser("list", help="approvals you requested or may decide"))
    p.add_argument(
        "--state",
        default="pending",
        choices=["pending", "approved", "denied", "expired", "executed", "lapsed", "all"],
    )
    p.add_argument(
        "--limit",
        type=_positive,
        default=100,
        help="show at most this many, newest first (default 100; pages are followed)",
    )
    p = common(actions.add_parser("show", help="one approval in full"))
    p.add_argument("id")
    p.add_argument(
        "--body", action="store_true", help="print the held request's exact body bytes instead"
    )

    def bulk(p: argparse.ArgumentParser, verdict: str) -> None:
        p.add_argument(
            "id", nargs="?", help=f"the approval to {verdict} (or --all with --rule/--requester)"
        )
        p.add_argument(
            "--all",
            action="store_true",
            help=f"{verdict} every pending approval --rule and --requester select that you may "
            "decide, each as its own decision (those you may not are listed as skipped)",
        )
        p.add_argument("--rule", help="with --all: the approvals of this rule")
        p.add_argument(
            "--requester", help="with --all: the approvals this subject or person's email asked for"
        )

    p = common(actions.add_parser("approve", help="approve (counts towards the quorum)"))
    bulk(p, "approve")
    p.add_argument("--reason", help="why (optional for approvals)")
    p.add_argument(
        "--grant-uses",
        type=_positive,
        metavar="N",
        help="also approve the next N requests of the same shape by the same agent (where the "
        "rule allows grants; with --grant-minutes)",
    )
    p.add_argument(
        "--grant-minutes",
        type=_positive,
        metavar="M",
        help="for this many minutes after the approval (with --grant-uses)",
    )
    p = common(actions.add_parser("deny", help="deny (final); a reason is required"))
    bulk(p, "deny")
    p.add_argument("--reason", required=True, help="why (required)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return value


def main(args: argparse.Namespace) -> int:
    import asyncio

    try:
        return asyncio.run(run(args))
    except CliError as exc:
        print(f"countersign approvals: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
