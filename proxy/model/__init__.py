"""The pure core: identities, requests, approvals, the state machine, binding and persons.

Nothing here imports aiohttp, redis or slack, and nothing here knows HTTP status codes: the
store and the approvals service both build on it, and the edge maps its errors to answers.
"""

from __future__ import annotations

from .approval import (
    Approval,
    ApprovalState,
    DecisionRecord,
    Outcome,
    Requester,
    Verdict,
    distinct_persons,
    state_label,
)
from .identity import Action, Decision, Identity
from .request import AmbiguousField, RequestBody, RequestInfo, UnreadableBody

__all__ = [
    "Action",
    "AmbiguousField",
    "Approval",
    "ApprovalState",
    "Decision",
    "DecisionRecord",
    "Identity",
    "Outcome",
    "RequestBody",
    "RequestInfo",
    "Requester",
    "UnreadableBody",
    "Verdict",
    "distinct_persons",
    "state_label",
]
