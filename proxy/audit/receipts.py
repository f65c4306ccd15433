"""Receipts: a signed statement that an approved request ran, and what came back.

A receipt is a compact JWS (RFC 7515), EdDSA over Ed25519, with the protected header
`{"alg": "EdDSA", "kid": KEY_ID, "typ": "countersign-receipt+jws"}` (the key id as in
`signing.key_id_of`) and as payload the canonical JSON (`chain.canonical`, UTF-8) of:

- `type` (`countersign.receipt`), `v` (1), `iss` (the proxy: `server.public_url`, or
  `countersign`), `iat` (Unix time of issue);
- `approval_id`, `rule`, `route`, `requester` `{subject, issuer, client_id, email, person,
  owner}`;
- `binding` `{fingerprint, method, target, upstream_url, body_sha256, actions}`: what the
  approval covered (the fingerprint is the binding itself, see docs/security.md);
- `decisions` `[{verdict, person, subject, issuer, channel, reason, at}]` (`at` ISO 8601 UTC);
- `executed_at` (ISO 8601 UTC, or null when not yet recorded);
- `status` (the upstream's HTTP status), `response_sha256` and `response_bytes` (of the
  response body exactly as relayed to the client; for an MCP call held as an SSE stream, of the
  upstream's body the stream carried), `response_complete` (false when the relay was cut: the
  upstream failed mid-body, or the client left);
- `audit` `{chain, seq, hash}`: the `request.forwarded` line of the hash-chained audit file
  that recorded the execution (`chain` null while the chain is unsigned), or null without
  `audit.file`.

Free text (target, upstream URL, reasons, the requester's names) passes the proxy's redactor as
on every other channel; the fingerprint and `body_sha256` still bind the exact request.

Verification accepts only this: three base64url segments in their canonical encoding (no
padding, no stray bits), a header of exactly `alg`, `kid` and `typ` with `alg` EdDSA (never
`none`, never an HMAC), a known `kid`, a signature that verifies, and a payload that is a JSON
object of this `type` and `v`.

Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..model import Approval
from .chain import canonical
from .redact import Redactor
from .signing import SigningKey, b64url, b64url_decode
from .sinks import ChainPosition

RECEIPT_TYPE: Final = "countersign.receipt"
RECEIPT_VERSION: Final = 1
JWS_TYPE: Final = "countersign-receipt+jws"
ALGORITHM: Final = "EdDSA"
CONTENT_TYPE: Final = "application/jose"

_HEADER_KEYS: Final = frozenset({"alg", "kid", "typ"})
_jws = jwt.PyJWS(algorithms=[ALGORITHM])


class ReceiptInvalid(ValueError):
    """A token that is not a valid receipt; `reason` says why, for people."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def iso(ts: float | None) -> str | None:
    """Unix time as ISO 8601 UTC (`2026-11-25T16:07:44.050783Z`), or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def receipt_payload(
    approval: Approval,
    *,
    status: int,
    response_sha256: str,
    response_bytes: int,
    response_complete: bool,
    audit: ChainPosition | None,
    issued_at: float,
    issuer: str,
    redactor: Redactor | None = None,
) -> dict[str, Any]:
    """What a receipt states about an executed approval (see the module's docstring)."""
    requester = approval.requester

    def clean(value: Any) -> Any:
        return value if redactor is None else redactor.value(value)

    return {
        "type": RECEIPT_TYPE,
        "v": RECEIPT_VERSION,
        "iss": issuer,
        "iat": int(issued_at),
        "approval_id": approval.id,
        "rule": approval.rule,
        "route": approval.route,
        "requester": clean(
            {
                "subject": requester.subject,
                "issuer": requester.issuer,
                "client_id": requester.client_id,
                "email": requester.email,
                "person": requester.person,
                "owner": requester.owner,
            }
        ),
        "binding": {
            "fingerprint": approval.fingerprint,
            "method": approval.method,
            "target": clean(approval.target),
            "upstream_url": clean(approval.upstream_url),
            "body_sha256": approval.body_sha256,
            "actions": list(approval.actions),
        },
        "decisions": [
            {
                "verdict": d.verdict.value,
                "person": d.who,
                "subject": d.approver_subject,
                "issuer": d.approver_issuer or None,
                "channel": d.channel,
                "reason": clean(d.reason),
                "at": iso(d.at),
            }
            for d in approval.decisions
        ],
        "executed_at": iso(approval.executed_at),
        "status": status,
        "response_sha256": response_sha256,
        "response_bytes": response_bytes,
        "response_complete": response_complete,
        "audit": (
            None if audit is None else {"chain": audit.chain, "seq": audit.seq, "hash": audit.hash}
        ),
    }


def sign_receipt(key: SigningKey, payload: Mapping[str, Any]) -> str:
    """The compact JWS of `payload` (its canonical JSON), signed by `key`. About 50 µs."""
    token: str = _jws.encode(
        canonical(payload).encode("utf-8"),
        key.private,
        algorithm=ALGORITHM,
        headers={"kid": key.key_id, "typ": JWS_TYPE},
    )
    return token


def receipt_sha256(token: str) -> str:
    """The SHA-256 of a receipt as served (its ASCII text), as the audit trail records it."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def _segment(text: str, name: str) -> bytes:
    """A base64url segment's bytes; only the one canonical spelling of them is accepted."""
    try:
        data = b64url_decode(text)
    except ValueError:
        raise ReceiptInvalid(f"malformed token: the {name} is not base64url") from None
    if b64url(data) != text:
        # Unused trailing bits set: another spelling of the same bytes. Refused, so that a
        # receipt has exactly one text (and one SHA-256).
        raise ReceiptInvalid(f"malformed token: the {name} is not canonical base64url")
    return data


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ReceiptInvalid(f"malformed token: the {name} is not JSON") from None
    if not isinstance(value, dict):
        raise ReceiptInvalid(f"malformed token: the {name} is not a JSON object")
    return value


def receipt_header(token: str) -> dict[str, Any]:
    """The token's protected header, unverified (to name the key it claims)."""
    parts = token.split(".")
    if len(parts) != 3:
        raise ReceiptInvalid(
            f"malformed token: a compact JWS has 3 dot-separated parts, this has {len(parts)}"
        )
    return _json_object(_segment(parts[0], "header"), "header")


def verify_receipt(token: str, keys: Mapping[str, Ed25519PublicKey]) -> dict[str, Any]:
    """The payload of `token` if it is a receipt signed by one of `keys` (by key id);
    `ReceiptInvalid` saying why not."""
    if not isinstance(token, str) or not token.isascii():
        raise ReceiptInvalid("malformed token: not ASCII text")
    header = receipt_header(token)
    _, payload_text, signature_text = token.split(".")
    _segment(payload_text, "payload")
    _segment(signature_text, "signature")
    alg = header.get("alg")
    if alg != ALGORITHM:
        raise ReceiptInvalid(f"the token's algorithm is {alg!r}; receipts are signed with EdDSA")
    if set(header) != _HEADER_KEYS:
        extra = sorted(set(header) - _HEADER_KEYS) or sorted(_HEADER_KEYS - set(header))
        raise ReceiptInvalid(
            f"the token's header must hold exactly alg, kid and typ (not: {', '.join(extra)})"
        )
    if header.get("typ") != JWS_TYPE:
        raise ReceiptInvalid(f"the token's typ is {header.get('typ')!r}, not {JWS_TYPE!r}")
    kid = header.get("kid")
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        known = ", ".join(sorted(keys)) or "none"
        raise ReceiptInvalid(
            f"signed by key {kid}, which is not among the public keys given ({known})"
        )
    try:
        data = _jws.decode(token, key, algorithms=[ALGORITHM])
    except jwt.InvalidSignatureError:
        raise ReceiptInvalid(f"the signature does not verify with key {kid}") from None
    except jwt.PyJWTError as exc:
        raise ReceiptInvalid(f"malformed token: {exc}") from None
    payload = _json_object(data, "payload")
    if payload.get("type") != RECEIPT_TYPE:
        raise ReceiptInvalid(
            f"signed, but not a receipt: its type is {payload.get('type')!r}, not {RECEIPT_TYPE!r}"
        )
    if payload.get("v") != RECEIPT_VERSION:
        raise ReceiptInvalid(f"receipt version {payload.get('v')!r} is not one this reads (1)")
    return payload
