"""`countersign receipt verify FILE --public-key PEM`: check an approval's receipt.

A receipt (`GET /_countersign/api/approvals/{id}/receipt`, a compact JWS) is verified against the
given public keys and what it proves is printed for people: the approval, who asked, who decided,
the exact request, the upstream's status, the response body's SHA-256 and the audit line that
recorded the execution. `--response FILE` also checks that FILE is the response body the
receipt speaks of.

Exit codes: 0 valid, 1 invalid (why is printed), 2 a file or key cannot be read, or bad usage.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from typing import Any

EXIT_INVALID = 1
EXIT_UNREADABLE = 2


def _read(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _fail(message: str) -> int:
    print(f"countersign receipt verify: {message}", file=sys.stderr)
    return EXIT_UNREADABLE


def cmd_verify(args: argparse.Namespace) -> int:
    from .audit.receipts import ReceiptInvalid, receipt_header, verify_receipt
    from .audit.signing import SigningKeyError, load_public_keys

    try:
        keys = load_public_keys(args.public_key)
    except SigningKeyError as exc:
        return _fail(str(exc))
    try:
        raw = _read(args.file)
    except OSError as exc:
        return _fail(f"cannot read {args.file}: {exc.strerror or exc}")
    token = raw.strip().decode("ascii", "replace")
    try:
        payload = verify_receipt(token, keys)
    except ReceiptInvalid as exc:
        print(f"INVALID: {exc.reason}")
        return EXIT_INVALID
    kid = str(receipt_header(token)["kid"])
    response_note = None
    if args.response is not None:
        try:
            actual = _sha256_of(args.response)
        except OSError as exc:
            return _fail(f"cannot read {args.response}: {exc.strerror or exc}")
        if actual != payload.get("response_sha256"):
            print(
                f"INVALID: {args.response} is not the response this receipt speaks of: its "
                f"SHA-256 is {actual}, the receipt's response_sha256 is "
                f"{payload.get('response_sha256')}"
            )
            return EXIT_INVALID
        response_note = f"{args.response} matches response_sha256"
    for line in describe(payload, kid):
        print(line)
    if response_note:
        print(f"  response file: {response_note}")
    return 0


def _who(person: Any, subject: Any) -> str:
    if person and subject and person != subject:
        return f"{person} (subject {subject})"
    return str(person or subject or "unknown")


def describe(payload: dict[str, Any], kid: str) -> list[str]:
    """What a verified receipt proves, line by line, for people."""
    requester = payload.get("requester") or {}
    binding = payload.get("binding") or {}
    audit = payload.get("audit")
    from .audit.receipts import iso

    iat = payload.get("iat")
    issued = iso(float(iat)) if isinstance(iat, int | float) else "unknown"
    lines = [
        f"VALID: receipt for approval {payload.get('approval_id')}, signed by key {kid} "
        f"(issued {issued} by {payload.get('iss')})",
        f"  rule:          {payload.get('rule')} (route {payload.get('route')})",
    ]
    asked = _who(requester.get("person") or requester.get("email"), requester.get("subject"))
    extra = [f"issuer {requester.get('issuer')}"]
    if requester.get("client_id") and requester.get("client_id") != requester.get("subject"):
        extra.append(f"client {requester.get('client_id')}")
    if requester.get("owner"):
        extra.append(f"acting for {requester.get('owner')}")
    lines.append(f"  requested by:  {asked} ({', '.join(extra)})")
    decisions = payload.get("decisions") or []
    if not decisions:
        lines.append("  decisions:     none")
    for decision in decisions:
        verdict = "approved" if decision.get("verdict") == "approve" else "denied"
        reason = decision.get("reason")
        said = f': "{reason}"' if reason else ""
        lines.append(
            f"  {verdict + ' by:':<15}{_who(decision.get('person'), decision.get('subject'))} via "
            f"{decision.get('channel')} at {decision.get('at')}{said}"
        )
    actions = binding.get("actions") or []
    lines += [
        f"  request:       {binding.get('method')} {binding.get('target')}",
        f"  upstream:      {binding.get('upstream_url')}",
        *([f"  actions:       {', '.join(map(str, actions))}"] if actions else []),
        f"  body sha256:   {binding.get('body_sha256')}",
        f"  fingerprint:   {binding.get('fingerprint')}",
        f"  executed at:   {payload.get('executed_at') or 'unknown'}",
        f"  status:        {payload.get('status')} (the upstream's)",
        f"  response:      sha256 {payload.get('response_sha256')}, "
        f"{payload.get('response_bytes')} bytes"
        + ("" if payload.get("response_complete") else " (INCOMPLETE: the relay was cut)"),
    ]
    if isinstance(audit, dict):
        chain = audit.get("chain")
        lines.append(
            f"  audit line:    seq {audit.get('seq')}, hash {audit.get('hash')}"
            + (f", chain {chain}" if chain else " (unsigned chain)")
        )
    else:
        lines.append("  audit line:    none (the proxy had no audit.file)")
    return lines


def add_parser(sub: Any) -> None:
    """Register `receipt` and its action."""
    parser = sub.add_parser("receipt", help="verify an approval's signed receipt")
    actions = parser.add_subparsers(dest="receipt_command", required=True, metavar="ACTION")
    p = actions.add_parser(
        "verify",
        help="check a receipt's signature and print what it proves",
        description="Verify a receipt (GET /_countersign/api/approvals/ID/receipt, a compact "
        "JWS) with the audit signing key's public half, and print what it proves: the "
        "approval, who asked, who decided, the exact request, the upstream's status, the "
        "response's SHA-256 and the audit line that recorded it. Exit status: 0 valid, "
        "1 invalid, 2 unreadable file or key.",
    )
    p.add_argument("file", metavar="FILE", help="the receipt ('-': standard input)")
    p.add_argument(
        "--public-key",
        action="append",
        required=True,
        metavar="PEM",
        help="the public key (PEM) of audit.signing_key; repeat for rotated keys",
    )
    p.add_argument(
        "--response",
        metavar="FILE",
        help="the response body as received: check its SHA-256 against the receipt's",
    )
    p.set_defaults(func=cmd_verify)
