"""Approvals to and from JSON, for stores that keep them outside the process."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from ..types import Approval, ApprovalState, DecisionRecord, Requester, Verdict


def dumps(approval: Approval) -> str:
    return json.dumps(asdict(approval), separators=(",", ":"), ensure_ascii=False)


def loads(text: str | bytes) -> Approval:
    data: dict[str, Any] = json.loads(text)
    data["state"] = ApprovalState(data["state"])
    requester = data["requester"]
    requester["groups"] = tuple(requester.get("groups", ()))
    data["requester"] = Requester(**requester)
    data["approver_groups"] = tuple(data["approver_groups"])
    data["approver_users"] = tuple(data["approver_users"])
    data["decisions"] = tuple(
        DecisionRecord(**{**d, "verdict": Verdict(d["verdict"])}) for d in data["decisions"]
    )
    return Approval(**data)
