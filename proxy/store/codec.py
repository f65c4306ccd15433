"""Approvals to and from JSON, for stores that keep them outside the process.

orjson writes the dataclasses directly (fields in declaration order, enums as their values,
tuples as arrays): several times cheaper than `dataclasses.asdict` + `json.dumps`, and the same
JSON document. What orjson refuses (unpaired surrogates, from undecodable header bytes kept
with `surrogateescape`) goes through the json module, with every non-ASCII character escaped.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import orjson

from ..model import Approval, ApprovalState, DecisionRecord, Outcome, Requester, Verdict
from ..model.grant import Grant


def dumps(approval: Approval) -> bytes:
    try:
        return orjson.dumps(approval)
    except orjson.JSONEncodeError:
        return json.dumps(asdict(approval), separators=(",", ":")).encode("ascii")


def loads(text: str | bytes) -> Approval:
    try:
        data: dict[str, Any] = orjson.loads(text)
    except orjson.JSONDecodeError:
        data = json.loads(text)  # escaped unpaired surrogates, which orjson refuses
    data["state"] = ApprovalState(data["state"])
    requester = data["requester"]
    requester["groups"] = tuple(requester.get("groups", ()))
    data["requester"] = Requester(**requester)
    data["approver_groups"] = tuple(data["approver_groups"])
    data["approver_users"] = tuple(data["approver_users"])
    data["headers"] = tuple(tuple(h) for h in data.get("headers", ()))
    data["actions"] = tuple(data.get("actions", ()))
    data["approver_members"] = tuple(data.get("approver_members", ()))
    if data.get("outcome") is not None:
        data["outcome"] = Outcome(data["outcome"])
    data["decisions"] = tuple(
        DecisionRecord(**{**d, "verdict": Verdict(d["verdict"])}) for d in data["decisions"]
    )
    return Approval(**data)


def _requester(data: dict[str, Any]) -> Requester:
    return Requester(**{**data, "groups": tuple(data.get("groups", ()))})


def dumps_grant(grant: Grant) -> bytes:
    try:
        return orjson.dumps(grant)
    except orjson.JSONEncodeError:
        return json.dumps(asdict(grant), separators=(",", ":")).encode("ascii")


def loads_grant(text: str | bytes) -> Grant:
    try:
        data: dict[str, Any] = orjson.loads(text)
    except orjson.JSONDecodeError:
        data = json.loads(text)
    data["requester"] = _requester(data["requester"])
    for name in ("actions", "approver_groups", "approver_users", "granted_by"):
        data[name] = tuple(data.get(name, ()))
    return Grant(**data)
