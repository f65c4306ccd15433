"""Receipts: the signed statement of an executed approval (DESIGN §8), its verification, its
issuing and `countersign receipt verify`."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from proxy.approvals.receipts import RECEIPT_NOTE, ReceiptIssuer, Relayed
from proxy.approvals.service import ApprovalService
from proxy.audit import AuditLog, ChainPosition, Sink
from proxy.audit.chain import canonical
from proxy.audit.receipts import (
    JWS_TYPE,
    RECEIPT_TYPE,
    ReceiptInvalid,
    receipt_payload,
    receipt_sha256,
    sign_receipt,
    verify_receipt,
)
from proxy.audit.redact import Redactor
from proxy.audit.signing import (
    SigningKey,
    b64url,
    b64url_decode,
    checkpoint_statement,
    new_signing_key,
    raw_public,
)
from proxy.cli import main as cli_main
from proxy.config import ApprovalsSettings
from proxy.model import ApprovalState, DecisionRecord, Outcome, Verdict
from proxy.store.memory import MemoryStore
from tests.store_conformance import make_approval

KEY = new_signing_key()
KEYS = {KEY.key_id: KEY.public}
POSITION = ChainPosition("c0ffee", 42, "ab" * 32)
RESPONSE = b'{"exported": 3}'


def executed(**overrides: Any) -> Any:
    decisions = (
        DecisionRecord(
            verdict=Verdict.APPROVE,
            approver_subject="bob-sub",
            approver_email="bob@example.com",
            channel="api",
            reason="fine for the board",
            at=1795628282.118204,
            approver_issuer="https://idp",
            person="bob@example.com",
        ),
    )
    fields: dict[str, Any] = {
        "state": ApprovalState.EXECUTED,
        "decisions": decisions,
        "executed_at": 1795628283.5,
        "target": "/exports/customers?format=csv",
        "upstream_url": "http://upstream.internal/exports/customers?format=csv",
        "body_sha256": hashlib.sha256(b'{"n": 1}').hexdigest(),
        "actions": ("tool:export",),
        "outcome": Outcome.COMPLETED,
        "upstream_status": 201,
        "id": "apr_receipt_test_0000000001",
        "fingerprint": "f1" * 32,
    }
    fields.update(overrides)
    return make_approval(**fields)


def payload_for(approval: Any = None, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "status": 201,
        "response_sha256": hashlib.sha256(RESPONSE).hexdigest(),
        "response_bytes": len(RESPONSE),
        "response_complete": True,
        "audit": POSITION,
        "issued_at": 1795628284.9,
        "issuer": "https://proxy.example.com",
    }
    fields.update(overrides)
    return receipt_payload(approval or executed(), **fields)


def token_for(key: SigningKey = KEY, **overrides: Any) -> str:
    return sign_receipt(key, payload_for(**overrides))


def forged(header: Mapping[str, Any], payload: Mapping[str, Any], signature: bytes) -> str:
    return ".".join(
        (
            b64url(json.dumps(header).encode()),
            b64url(canonical(payload).encode()),
            b64url(signature),
        )
    )


# -- the payload ------------------------------------------------------------------------------


def test_the_payload_states_the_approval_its_decisions_binding_answer_and_audit_line() -> None:
    approval = executed()
    payload = payload_for(approval)
    assert payload["type"] == RECEIPT_TYPE and payload["v"] == 1
    assert payload["iss"] == "https://proxy.example.com" and payload["iat"] == 1795628284
    assert payload["approval_id"] == approval.id
    assert (payload["rule"], payload["route"]) == ("exports", "cloud")
    assert payload["requester"] == {
        "subject": "agent-7",
        "issuer": "https://idp",
        "client_id": None,
        "email": None,
        "person": None,
        "owner": "alice@example.com",
    }
    assert payload["binding"] == {
        "fingerprint": approval.fingerprint,
        "method": "POST",
        "target": "/exports/customers?format=csv",
        "upstream_url": "http://upstream.internal/exports/customers?format=csv",
        "body_sha256": approval.body_sha256,
        "actions": ["tool:export"],
    }
    assert payload["decisions"] == [
        {
            "verdict": "approve",
            "person": "bob@example.com",
            "subject": "bob-sub",
            "issuer": "https://idp",
            "channel": "api",
            "reason": "fine for the board",
            "at": "2026-11-25T17:38:02.118204Z",
        }
    ]
    assert payload["executed_at"] == "2026-11-25T17:38:03.500000Z"
    assert payload["status"] == 201
    assert payload["response_sha256"] == hashlib.sha256(RESPONSE).hexdigest()
    assert (payload["response_bytes"], payload["response_complete"]) == (len(RESPONSE), True)
    assert payload["audit"] == {"chain": "c0ffee", "seq": 42, "hash": "ab" * 32}
    assert payload_for(approval, audit=None)["audit"] is None
    # Plain JSON: what is signed reads back identically.
    assert json.loads(canonical(payload)) == payload


def test_free_text_is_redacted_but_the_hashes_still_bind_the_exact_request() -> None:
    approval = executed(
        target="/exports?api_key=sk-live-1234567890abcdef&x=1",
        decisions=(
            DecisionRecord(
                verdict=Verdict.APPROVE,
                approver_subject="bob",
                approver_email="bob@example.com",
                channel="api",
                reason="use password: hunter2",
                at=time.time(),
            ),
        ),
    )
    payload = payload_for(approval, redactor=Redactor())
    text = canonical(payload)
    assert "sk-live-1234567890abcdef" not in text and "hunter2" not in text
    assert payload["binding"]["fingerprint"] == approval.fingerprint
    assert payload["binding"]["body_sha256"] == approval.body_sha256


# -- signing and verifying --------------------------------------------------------------------


def test_a_signed_receipt_verifies_to_its_payload() -> None:
    token = token_for()
    assert token.count(".") == 2
    header = json.loads(b64url_decode(token.split(".")[0]))
    assert header == {"alg": "EdDSA", "kid": KEY.key_id, "typ": JWS_TYPE}
    # The payload is the canonical JSON itself: one text per receipt.
    assert b64url_decode(token.split(".")[1]).decode() == canonical(payload_for())
    assert verify_receipt(token, KEYS) == payload_for()
    # Any Ed25519 JWS library reads it too.
    assert json.loads(jwt.PyJWS().decode(token, KEY.public, algorithms=["EdDSA"])) == payload_for()


def test_one_character_changed_anywhere_makes_it_invalid() -> None:
    token = token_for()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
    for at, char in enumerate(token):
        other = alphabet[(alphabet.index(char) + 1) % len(alphabet)]
        changed = token[:at] + other + token[at + 1 :]
        with pytest.raises(ReceiptInvalid):
            verify_receipt(changed, KEYS)
    for changed in (token[:-1], token + "A", token[1:], "x" + token, token + "\n"):
        with pytest.raises(ReceiptInvalid):
            verify_receipt(changed, KEYS)


def test_a_signature_spelled_with_stray_bits_is_refused() -> None:
    # 64 bytes in base64url leave 2 unused bits in the last character: setting them spells the
    # same signature differently. One receipt has one text.
    token = token_for()
    head, _, signature = token.rpartition(".")
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(signature[-1])
    respelled = (
        signature[:-1]
        + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last | 1]
    )
    assert respelled != signature and b64url_decode(respelled) == b64url_decode(signature)
    with pytest.raises(ReceiptInvalid, match="canonical"):
        verify_receipt(f"{head}.{respelled}", KEYS)


def test_another_key_does_not_verify() -> None:
    other = new_signing_key()
    with pytest.raises(ReceiptInvalid, match="not among the public keys"):
        verify_receipt(token_for(other), KEYS)
    # Claiming our key id does not help the other key.
    payload = payload_for()
    header = {"alg": "EdDSA", "kid": KEY.key_id, "typ": JWS_TYPE}
    signing_input = forged(header, payload, b"").rstrip(".").encode()
    token = forged(header, payload, other.private.sign(signing_input))
    with pytest.raises(ReceiptInvalid, match="does not verify"):
        verify_receipt(token, KEYS)
    # And our key verifies only with its own public half.
    with pytest.raises(ReceiptInvalid, match="does not verify"):
        verify_receipt(token_for(), {KEY.key_id: Ed25519PrivateKey.generate().public_key()})


def test_alg_none_and_hmac_forgeries_are_refused() -> None:
    payload = payload_for()
    none = forged({"alg": "none", "kid": KEY.key_id, "typ": JWS_TYPE}, payload, b"")
    with pytest.raises(ReceiptInvalid, match="algorithm"):
        verify_receipt(none, KEYS)
    # The classic confusion: HS256 keyed with the public key's bytes.
    for secret in (KEY.public_pem(), raw_public(KEY.public)):
        header = {"alg": "HS256", "kid": KEY.key_id, "typ": JWS_TYPE}
        signing_input = forged(header, payload, b"").rstrip(".").encode()
        mac = hmac.new(secret, signing_input, hashlib.sha256).digest()
        with pytest.raises(ReceiptInvalid, match="algorithm"):
            verify_receipt(forged(header, payload, mac), KEYS)


def test_headers_and_payloads_other_than_a_receipts_are_refused() -> None:
    payload = payload_for()
    signer = jwt.PyJWS()
    cases = {
        "typ": {"kid": KEY.key_id, "typ": "JWT"},
        "exactly alg, kid and typ": {"kid": KEY.key_id, "typ": JWS_TYPE, "b64": False},
    }
    for reason, headers in cases.items():
        token = signer.encode(
            canonical(payload).encode(), KEY.private, algorithm="EdDSA", headers=headers
        )
        with pytest.raises(ReceiptInvalid, match=reason):
            verify_receipt(token, KEYS)
    # A checkpoint signed as a JWS is not a receipt.
    checkpoint = checkpoint_statement(
        chain="c", seq=1, head_hash="0" * 64, ts="t", prev_checkpoint=0
    )
    with pytest.raises(ReceiptInvalid, match="not a receipt"):
        verify_receipt(sign_receipt(KEY, checkpoint), KEYS)
    with pytest.raises(ReceiptInvalid, match="version"):
        verify_receipt(sign_receipt(KEY, {**payload, "v": 2}), KEYS)
    for junk in ("", "a.b", "a.b.c.d", "é.é.é", "e30.e30.", "W10.e30.AA"):
        with pytest.raises(ReceiptInvalid, match=r"malformed|algorithm"):
            verify_receipt(junk, KEYS)


# -- issuing ----------------------------------------------------------------------------------


class ChainSink(Sink):
    """Keeps events and answers where each landed, as the chained file does."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.synced = 0

    def write(self, event: Mapping[str, Any]) -> ChainPosition:
        self.events.append(dict(event))
        return ChainPosition(None, len(self.events), hashlib.sha256(b"%d" % len(self)).hexdigest())

    def __len__(self) -> int:
        return len(self.events)

    async def sync(self) -> None:
        self.synced += 1


async def test_the_issuer_signs_keeps_and_audits_the_receipt() -> None:
    store = MemoryStore()
    sink = ChainSink()
    audit_log = AuditLog([sink])
    service = ApprovalService(store, ApprovalsSettings(), audit_log)
    approval = executed()
    await store.create_or_join(approval, max_pending=10)
    issuer = ReceiptIssuer(
        KEY, service, audit_log, issuer="https://proxy.example.com", public_url="https://p.example/"
    )
    assert issuer.url(approval.id) == (
        f"https://p.example/_countersign/api/approvals/{approval.id}/receipt"
    )
    relayed = Relayed(201, hashlib.sha256(RESPONSE).hexdigest(), len(RESPONSE), True, POSITION)
    token = await issuer.issue(approval, "req-1", relayed)
    assert token is not None and sink.synced >= 1
    assert await store.get_note(approval.id, RECEIPT_NOTE) == token == await issuer.get(approval.id)
    payload = verify_receipt(token, KEYS)
    assert payload["approval_id"] == approval.id
    assert payload["audit"] == {"chain": "c0ffee", "seq": 42, "hash": "ab" * 32}
    assert payload["decisions"][0]["person"] == "bob@example.com"
    [event] = [e for e in sink.events if e["event"] == "approval.receipt"]
    assert event["approval_id"] == approval.id and event["request_id"] == "req-1"
    assert event["key_id"] == KEY.key_id
    assert event["receipt_sha256"] == receipt_sha256(token)
    assert ReceiptIssuer(KEY, service, audit_log).url("apr_x") == (
        "/_countersign/api/approvals/apr_x/receipt"
    )


async def test_an_issuer_that_cannot_keep_the_receipt_logs_and_returns_none() -> None:
    store = MemoryStore()
    audit_log = AuditLog([ChainSink()])
    service = ApprovalService(store, ApprovalsSettings(), audit_log)
    issuer = ReceiptIssuer(KEY, service, audit_log)
    relayed = Relayed(200, "0" * 64, 0, True, None)
    # The approval is not in the store: set_note raises KeyError; nothing is raised to the relay.
    assert await issuer.issue(executed(), "req-1", relayed) is None


# -- countersign receipt verify ---------------------------------------------------------------


def test_cli_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    public = tmp_path / "public.pem"
    public.write_bytes(KEY.public_pem())
    receipt = tmp_path / "receipt.jws"
    token = token_for()
    receipt.write_text(token + "\n")
    response = tmp_path / "response.json"
    response.write_bytes(RESPONSE)

    assert cli_main(["receipt", "verify", str(receipt), "--public-key", str(public)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"VALID: receipt for approval {payload_for()['approval_id']}")
    for shown in (
        KEY.key_id,
        "exports (route cloud)",
        "agent-7",
        "acting for alice@example.com",
        "approved by:",
        "bob@example.com (subject bob-sub) via api at 2026-11-25T17:38:02.118204Z",
        "POST /exports/customers?format=csv",
        "http://upstream.internal/exports/customers?format=csv",
        "201",
        hashlib.sha256(RESPONSE).hexdigest(),
        "seq 42",
        "ab" * 32,
    ):
        assert shown in out, shown

    args = ["receipt", "verify", str(receipt), "--public-key", str(public)]
    assert cli_main([*args, "--response", str(response)]) == 0
    assert "matches response_sha256" in capsys.readouterr().out
    response.write_bytes(RESPONSE + b" ")
    assert cli_main([*args, "--response", str(response)]) == 1
    assert "INVALID" in capsys.readouterr().out

    receipt.write_text(token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1])
    assert cli_main(args) == 1
    assert capsys.readouterr().out.startswith("INVALID: ")

    other = tmp_path / "other.pem"
    other.write_bytes(new_signing_key().public_pem())
    receipt.write_text(token)
    assert cli_main(["receipt", "verify", str(receipt), "--public-key", str(other)]) == 1
    assert "not among the public keys" in capsys.readouterr().out

    assert cli_main(["receipt", "verify", str(tmp_path / "nope"), "--public-key", str(public)]) == 2
    assert cli_main(["receipt", "verify", str(receipt), "--public-key", str(receipt)]) == 2
    with pytest.raises(SystemExit) as exc:
        cli_main(["receipt", "verify", str(receipt)])  # no --public-key
    assert exc.value.code == 2
