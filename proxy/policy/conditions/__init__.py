"""The rule conditions, one module each, and `CONDITIONS`: the one place they are registered.

`CONDITIONS` lists the condition kinds in evaluation order, cheapest first: the engine ANDs
their masks in this order and stops as soon as the answer is known, so a cheap condition that
rules a request out saves the dearer ones (a path walk, the identity's claims, parsing the
body). `explain` names, for a rule that did not match, the first condition in this order that
ruled it out.

To add a condition: write a module with a `Condition` subclass (see base.py: `compile`, `mask`,
`reason`; fields.py for conditions on named fields), add its settings key to
`config.RuleSettings` or `WhenSettings`, and insert the class here where its cost belongs. Set
`reads_body = True` when it reads the body, so `Policy.needs_body` knows. Pure code: no I/O.
"""

from __future__ import annotations

from .actions import ActionsCondition
from .base import Condition
from .claims import ClaimsCondition
from .form import FormCondition
from .groups import GroupsCondition
from .headers import HeadersCondition
from .json_fields import JsonFieldsCondition
from .methods import MethodsCondition
from .paths import PathsCondition
from .query import QueryCondition
from .route import RouteCondition
from .subjects import SubjectsCondition

__all__ = ["CONDITIONS", "Condition", "PathsCondition"]

CONDITIONS: tuple[type[Condition], ...] = (
    MethodsCondition,  # one dict lookup
    RouteCondition,  # one dict lookup
    ActionsCondition,  # one dict lookup per action (remembered)
    PathsCondition,  # about one dict lookup per path segment
    GroupsCondition,  # one lookup per group of the identity
    SubjectsCondition,  # one dict lookup
    ClaimsCondition,  # a claim lookup per claim the rules name
    HeadersCondition,  # a header lookup per header the rules name
    QueryCondition,  # parses the query once
    FormCondition,  # parses a form body once
    JsonFieldsCondition,  # parses a JSON body once
)
