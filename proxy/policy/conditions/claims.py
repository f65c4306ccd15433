"""`when.claims`: for each dotted claim path, the identity's claim is the value or one of them.

A list claim passes when any element does; a missing claim never passes; integer and boolean
claims compare by their JSON text (`1` → "1", `true` → "true"); a top-level claim spelled
exactly like the dotted path (an URL-like claim name) wins over the nested lookup. Pure code: no
I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .base import listing
from .fields import FieldCondition, FieldEntry

if TYPE_CHECKING:
    from ...config import Accepted, RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["ClaimsCondition", "claim_values"]

_MISSING = object()


def _claim_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return None


def claim_values(claims: Mapping[str, Any], path: str, parts: tuple[str, ...]) -> list[str] | None:
    """The claim's value(s) as text; None when the claim is missing.

    `parts` is `path` split on dots.
    """
    value = claims.get(path, _MISSING)
    if value is _MISSING:
        if len(parts) == 1:
            return None
        value = claims
        for part in parts:
            if not isinstance(value, Mapping):
                return None
            value = value.get(part, _MISSING)
            if value is _MISSING:
                return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple | set | frozenset):
        return [text for item in value if (text := _claim_text(item)) is not None]
    text = _claim_text(value)
    return [] if text is None else [text]


class ClaimsCondition(FieldCondition):
    __slots__ = ()

    name = "claims"
    kind = "claim"

    @classmethod
    def fields_of(cls, rule: RuleSettings) -> Mapping[str, Accepted]:
        return {} if rule.when is None else rule.when.claims

    @classmethod
    def prepare(cls, key: str) -> Any:
        return tuple(key.split("."))

    def read(self, request: RequestInfo, identity: Identity, entry: FieldEntry) -> list[str] | None:
        parts: tuple[str, ...] = entry.parsed
        return claim_values(identity.claims, entry.key, parts)

    def shown(self, values: Sequence[str]) -> str:
        return listing(values)
