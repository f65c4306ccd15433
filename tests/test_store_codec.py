"""The JSON form of an approval that RedisStore keeps: the same document as before orjson."""

from __future__ import annotations

import json
import time
from dataclasses import asdict

from proxy.model import Approval, ApprovalState, DecisionRecord, Verdict
from proxy.store import codec
from tests.store_conformance import make_approval


def full_approval() -> Approval:
    return make_approval(
        state=ApprovalState.EXECUTED,
        reason="nightly export",
        body_preview='{"export": 1, "name": "Zoë ✓"}',
        body_bytes=31,
        content_type="application/json",
        request_id="r-1",
        decisions=(
            DecisionRecord(Verdict.APPROVE, "alice", "alice@example.com", "api", None, time.time()),
            DecisionRecord(Verdict.APPROVE, "bob", None, "slack", "ok", time.time() + 0.25),
        ),
        executed_at=time.time() + 1,
        upstream_status=201,
    )


def test_round_trips_every_field() -> None:
    approval = full_approval()
    assert codec.loads(codec.dumps(approval)) == approval
    assert codec.loads(codec.dumps(approval).decode()) == approval


def test_same_document_as_the_json_module_wrote() -> None:
    """Replicas of either version read each other's approvals (the compare-and-set itself
    compares the bytes read, never a re-encoding)."""
    approval = full_approval()
    before = json.dumps(asdict(approval), separators=(",", ":"), ensure_ascii=False)
    assert codec.dumps(approval).decode() == before
    assert codec.loads(before) == approval


def test_unpaired_surrogates_are_escaped_not_refused() -> None:
    # Undecodable header bytes kept with surrogateescape, e.g. in Content-Type.
    approval = make_approval(content_type="text/x-\udcff", reason="why \udc80")
    encoded = codec.dumps(approval)
    encoded.decode("ascii")  # escaped: storable as it is
    assert codec.loads(encoded) == approval
