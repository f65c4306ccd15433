"""`when.query`: for each query parameter the rule names, its decoded value is one of those
listed.

Names and values compare exactly, after percent-decoding. A missing parameter never passes; a
parameter given more than once (`?a=1&a=2`) raises `AmbiguousField` (the server answers 400):
the upstream might read another of its values than the one judged. Pure code: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .fields import FieldCondition, FieldEntry

if TYPE_CHECKING:
    from ...config import Accepted, RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["QueryCondition"]


class QueryCondition(FieldCondition):
    __slots__ = ()

    name = "query"
    kind = "query parameter"

    @classmethod
    def fields_of(cls, rule: RuleSettings) -> Mapping[str, Accepted]:
        return {} if rule.when is None else rule.when.query

    def read(self, request: RequestInfo, identity: Identity, entry: FieldEntry) -> list[str] | None:
        value = request.query_value(entry.key)
        return None if value is None else [value]
