"""`when.form`: for each field of an `application/x-www-form-urlencoded` body the rule names,
its decoded value is one of those listed.

Only such bodies have fields: any other body, or one not read (`request.body` is None), fails
the condition, as does a form that is not UTF-8. A field given more than once raises
`AmbiguousField` (the server answers 400). Pure code: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...model import UnreadableBody
from .fields import FieldCondition, FieldEntry

if TYPE_CHECKING:
    from ...config import Accepted, RuleSettings
    from ...model import Identity, RequestInfo

__all__ = ["FormCondition"]


class FormCondition(FieldCondition):
    __slots__ = ()

    name = "form"
    kind = "form field"
    reads_body = True

    @classmethod
    def fields_of(cls, rule: RuleSettings) -> Mapping[str, Accepted]:
        return {} if rule.when is None else rule.when.form

    def read(self, request: RequestInfo, identity: Identity, entry: FieldEntry) -> list[str] | None:
        body = request.body
        if body is None:
            return None
        try:
            value = body.form_value(entry.key)
        except UnreadableBody:
            return None
        return None if value is None else [value]

    def absent(self, request: RequestInfo, identity: Identity, entry: FieldEntry) -> str:
        body = request.body
        if body is None:
            return "is not known: the body was not read"
        if not body.is_form:
            return "is missing: the body is not application/x-www-form-urlencoded"
        try:
            body.form()
        except UnreadableBody as exc:
            return f"is missing: {exc.message}"
        return "is missing"
