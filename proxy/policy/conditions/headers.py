"""`when.headers`: for each header the rule names, the request's value is one of those listed.

Names compare case-insensitively, values exactly (case-sensitive). A missing header never
passes; a header sent more than once raises `AmbiguousField` (the server answers 400): the
upstream might read another of its values than the one judged. Pure code: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from .fields import FieldCondition, FieldEntry

if TYPE_CHECKING:
    from ...config import Accepted, RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["HeadersCondition"]


class HeadersCondition(FieldCondition):
    __slots__ = ()

    name = "headers"
    kind = "header"

    @classmethod
    def fields_of(cls, rule: RuleSettings) -> Mapping[str, Accepted]:
        return {} if rule.when is None else rule.when.headers

    @classmethod
    def normalize(cls, name: str) -> str:
        return name.lower()

    def read(self, request: RequestInfo, identity: Identity, entry: FieldEntry) -> list[str] | None:
        value = request.header_value(entry.name)
        return None if value is None else [value]
