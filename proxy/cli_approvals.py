"""`countersign approvals list|approve|deny`: the approvals API from a terminal.

It talks to a running proxy over HTTP with the approver's own bearer token (an OIDC access token
or an API key): the CLI has no powers of its own, the proxy authorizes every call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from typing import Any

import aiohttp

from .config import load_settings

API = "/_countersign/api/approvals"


class CliError(Exception):
    """Printed as is; exit status 1."""


def base_url(args: argparse.Namespace) -> str:
    if args.url:
        return str(args.url).rstrip("/")
    if os.environ.get("COUNTERSIGN_URL"):
        return os.environ["COUNTERSIGN_URL"].rstrip("/")
    config = args.config or os.environ.get("COUNTERSIGN_CONFIG")
    if config:
        server = load_settings(config).server  # a ConfigError exits 2 with file:line
        if server.public_url:
            return server.public_url.rstrip("/")
        host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
        return f"http://{host}:{server.port}"
    return "http://127.0.0.1:8080"


def token(args: argparse.Namespace) -> str:
    value = args.token or os.environ.get("COUNTERSIGN_TOKEN")
    if not value:
        raise CliError(
            "no token: pass --token or set COUNTERSIGN_TOKEN to your bearer token (OIDC access "
            "token or API key)"
        )
    return str(value)


async def _call(method: str, url: str, bearer: str, payload: dict[str, Any] | None = None) -> Any:
    headers = {"Authorization": f"Bearer {bearer}"}
    timeout = aiohttp.ClientTimeout(total=30)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(method, url, json=payload, headers=headers) as resp,
        ):
            try:
                body = await resp.json(content_type=None)
            except ValueError:
                body = {"error": "invalid_response", "message": await resp.text()}
            if resp.status >= 400:
                detail = body.get("message") or body.get("reason") or ""
                state = f" (approval is {body['state']})" if body.get("state") else ""
                raise CliError(
                    f"{resp.status} {body.get('error', 'error')}: {detail}{state}".rstrip(": ")
                )
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


def render_table(approvals: list[dict[str, Any]]) -> str:
    if not approvals:
        return "no approvals"
    rows = [("ID", "STATE", "RULE", "REQUEST", "REQUESTER", "REASON", "EXPIRES")]
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
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def render_one(a: dict[str, Any]) -> str:
    lines = [
        f"approval {a['approval_id']}: {a['state']}",
        f"  request:   {a['method']} {a['path']}" + (f"?{a['query']}" if a["query"] else ""),
        f"  route/rule: {a['route']} / {a['rule']} (quorum {a['approvals']}/{a['quorum']})",
        f"  requester: {a['requester']['subject']}"
        + (f" <{a['requester']['email']}>" if a["requester"].get("email") else "")
        + (f", acting for {a['requester']['owner']}" if a["requester"].get("owner") else ""),
    ]
    if a.get("reason"):
        lines.append(f"  reason:    {a['reason']}")
    if a.get("body_preview"):
        lines.append(f"  body:      {a['body_preview']}")
    for d in a.get("decisions", []):
        who = d["approver"].get("email") or d["approver"]["subject"]
        reason = f": {d['reason']}" if d.get("reason") else ""
        lines.append(f"  {d['verdict']}d by {who} via {d['channel']} at {d['at']}{reason}")
    if a.get("upstream_status") is not None:
        lines.append(f"  executed at {a['executed_at']}, upstream answered {a['upstream_status']}")
    return "\n".join(lines)


async def run(args: argparse.Namespace) -> int:
    url = base_url(args)
    bearer = token(args)
    if args.approvals_command == "list":
        query = "" if args.state == "all" else f"?state={args.state}"
        body = await _call("GET", f"{url}{API}{query}", bearer)
        print(json.dumps(body, indent=2) if args.json else render_table(body["approvals"]))
        return 0
    if args.approvals_command == "show":
        body = await _call("GET", f"{url}{API}/{args.id}", bearer)
        print(json.dumps(body, indent=2) if args.json else render_one(body))
        return 0
    verdict = "approve" if args.approvals_command == "approve" else "deny"
    payload: dict[str, Any] = {"verdict": verdict}
    if args.reason:
        payload["reason"] = args.reason
    body = await _call("POST", f"{url}{API}/{args.id}/decision", bearer, payload)
    print(json.dumps(body, indent=2) if args.json else render_one(body))
    return 0


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
        choices=["pending", "approved", "denied", "expired", "executed", "all"],
    )
    p = common(actions.add_parser("show", help="one approval in full"))
    p.add_argument("id")
    p = common(actions.add_parser("approve", help="approve (counts towards the quorum)"))
    p.add_argument("id")
    p.add_argument("--reason", help="why (optional for approvals)")
    p = common(actions.add_parser("deny", help="deny (final); a reason is required"))
    p.add_argument("id")
    p.add_argument("--reason", required=True, help="why (required)")


def main(args: argparse.Namespace) -> int:
    import asyncio

    try:
        return asyncio.run(run(args))
    except CliError as exc:
        print(f"countersign approvals: {exc}", file=sys.stderr)
        return 1
