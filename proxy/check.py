"""`countersign check`'s warnings: a valid configuration that does not do what it seems to.

Each finding names a key (`policy.rules[3]`) and, when the file is at hand, its line. Warnings
are things that are wrong whatever the identity provider says (a rule that can never match, an
approve rule no one can ever approve); `countersign check --strict` fails on them. Notes are
worth knowing but may be fine (approvers that only tokens' groups claims can name).

Everything here is proven, not guessed: a rule is reported as shadowed only when an earlier rule
provably matches every request it would (`proxy.policy.rule_covers`), a path only when no route
prefix can lead to it (`proxy.policy.globs_intersect`). Pure code: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from .config import RouteSettings, RuleSettings, Settings, format_loc
from .model import Action
from .model.persons import canonical_email, mailbox
from .policy import glob_covers, globs_intersect, prefix_glob, rule_covers

__all__ = ["Finding", "config_lines", "find_issues"]

Loc = tuple[str | int, ...]
Severity = Literal["warning", "note"]


@dataclass(frozen=True)
class Finding:
    """One warning (or note) about a valid configuration."""

    loc: Loc
    message: str
    severity: Severity = "warning"
    line: int | None = None

    @property
    def key(self) -> str:
        return format_loc(self.loc)

    def render(self, file: str) -> str:
        """`warning: FILE:LINE: KEY: MESSAGE` (the line left out when unknown)."""
        where = f"{file}:{self.line}" if self.line else file
        return f"{self.severity}: {where}: {self.key}: {self.message}"


def config_lines(text: str) -> dict[Loc, int]:
    """The line of every key and list item of a YAML configuration, by its location
    (`("policy", "rules", 3)` → 57), as the loader counts them. Empty if it does not parse."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    lines: dict[Loc, int] = {}

    def walk(node: yaml.Node, loc: Loc) -> None:
        lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    key = (*loc, str(key_node.value))
                    lines.setdefault(key, key_node.start_mark.line + 1)
                    walk(value_node, key)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                walk(item, (*loc, index))

    if root is not None:
        walk(root, ())
    return lines


def find_issues(settings: Settings, lines: Mapping[Loc, int] | None = None) -> list[Finding]:
    """Every warning and note about `settings`, in file order (see the module doc)."""
    return _Checker(settings, lines or {}).run()


class _Checker:
    def __init__(self, settings: Settings, lines: Mapping[Loc, int]) -> None:
        self.settings = settings
        self.lines = lines
        self.rules = settings.policy.rules
        self.routes = {route.name: route for route in settings.routes}
        self.found: list[Finding] = []

    def run(self) -> list[Finding]:
        self.unreachable_paths()
        self.shadowed_rules()
        self.approvers()
        self.default_approve()
        # File order; stable, so findings about one key keep the order of the checks.
        return sorted(self.found, key=lambda f: f.line or 0)

    # -- helpers ---------------------------------------------------------------------------

    def line(self, loc: Loc) -> int | None:
        for end in range(len(loc), -1, -1):
            line = self.lines.get(loc[:end])
            if line is not None:
                return line
        return None

    def add(self, loc: Loc, message: str, severity: Severity = "warning") -> None:
        self.found.append(Finding(loc, message, severity, self.line(loc)))

    def rule_ref(self, index: int) -> str:
        """How a message names another rule: rule 'x' (policy.rules[0], line 12)."""
        loc: Loc = ("policy", "rules", index)
        line = self.lines.get(loc)
        where = format_loc(loc) + (f", line {line}" if line else "")
        return f"rule {self.rules[index].name!r} ({where})"

    # -- 1. paths no request can reach -------------------------------------------------------

    def unreachable_paths(self) -> None:
        routes = self.settings.routes
        if not routes:
            if self.rules:
                self.add(
                    ("routes",),
                    "no routes are configured: every request is answered 404 no_route and "
                    "no rule can ever match",
                )
            return
        for index, rule in enumerate(self.rules):
            own = self.routes.get(rule.route) if rule.route is not None else None
            for k, glob in enumerate(rule.paths):
                loc: Loc = ("policy", "rules", index, "paths", k)
                if own is not None:
                    if not globs_intersect(glob, prefix_glob(own.prefix)):
                        self.add(
                            loc,
                            f"rule {rule.name!r}: path {glob!r} is outside the prefix "
                            f"{own.prefix} of its route {own.name!r}; no request can reach it",
                        )
                elif not any(globs_intersect(glob, prefix_glob(r.prefix)) for r in routes):
                    self.add(
                        loc,
                        f"rule {rule.name!r}: path {glob!r} is under no route prefix; "
                        "no request can reach it",
                    )

    # -- 2. rules an earlier rule shadows --------------------------------------------------

    def confined_route(self, rule: RuleSettings) -> RouteSettings | None:
        """The route every request `rule` matches is routed to, when that is provable."""
        if rule.route is not None:
            return self.routes.get(rule.route)
        globs = rule.paths or ("/**",)
        routes = self.settings.routes
        for route in routes:
            region = prefix_glob(route.prefix)
            if not all(glob_covers(region, glob) for glob in globs):
                continue
            depth = _depth(route.prefix)
            # A longer prefix the paths can also reach takes those requests (longest wins).
            if any(
                other is not route
                and _depth(other.prefix) > depth
                and any(globs_intersect(glob, prefix_glob(other.prefix)) for glob in globs)
                for other in routes
            ):
                continue
            return route
        return None

    def shadowed_rules(self) -> None:
        for later_index, later in enumerate(self.rules):
            route = self.confined_route(later)
            for earlier_index in range(later_index):
                if rule_covers(
                    self.rules[earlier_index],
                    later,
                    later_route=None if route is None else route.name,
                    later_region=None if route is None else prefix_glob(route.prefix),
                ):
                    self.add(
                        ("policy", "rules", later_index),
                        f"rule {later.name!r} can never match: {self.rule_ref(earlier_index)} "
                        "matches every request it would",
                    )
                    break

    # -- 3. approvers ------------------------------------------------------------------------

    def known_approvers(self, groups: Sequence[str], users: Sequence[str]) -> set[str]:
        """The persons (mailboxes) the config itself names as approvers: the users, the
        `approvals.groups` members of the groups, and API keys with an email in the groups."""
        settings = self.settings
        emails: list[Any] = list(users)
        for group in groups:
            emails.extend(settings.approvals.groups.get(group, ()))
        emails.extend(
            key.email
            for key in settings.identity.api_keys
            if key.email is not None and set(key.groups).intersection(groups)
        )
        return {mailbox(email) for e in emails if (email := canonical_email(e)) is not None}

    def approvers(self) -> None:
        issuers = bool(self.settings.identity.issuers)
        for index, rule in enumerate(self.rules):
            if rule.action is not Action.APPROVE or rule.approvers is None:
                continue
            loc: Loc = ("policy", "rules", index)
            groups, users = rule.approvers.groups, rule.approvers.users
            for k, user in enumerate(users):
                if canonical_email(user) is None:
                    self.add(
                        (*loc, "approvers", "users", k),
                        f"rule {rule.name!r}: approver {user!r} is not an email address; "
                        "approvers are recognized by email, so no one can act as them",
                    )
            known = self.known_approvers(groups, users)
            # Tokens' groups claims can add approvers only when there are tokens and groups.
            fully_known = not groups or not issuers
            listed = ", ".join(groups)
            if not known and fully_known:
                if groups:
                    who = (
                        f"no member of groups [{listed}] is known from approvals.groups, "
                        "identity.api_keys or users, and no issuer is configured whose tokens "
                        "could name one"
                    )
                else:
                    who = "none of its users is an email address"
                self.add(
                    (*loc, "approvers"),
                    f"no one can approve rule {rule.name!r}: {who}; "
                    "every request it holds will expire",
                )
            elif not known:
                self.add(
                    (*loc, "approvers"),
                    f"no approver is known from config for rule {rule.name!r} "
                    f"(groups: {listed}): they must come from tokens' groups claims",
                    "note",
                )
            elif fully_known and rule.quorum > len(known):
                count = len(known)
                self.add(
                    (*loc, "quorum"),
                    f"rule {rule.name!r} needs quorum {rule.quorum} but only {count} "
                    + ("approver is" if count == 1 else "approvers are")
                    + " known",
                )

    # -- 4. default approve ------------------------------------------------------------------

    def default_approve(self) -> None:
        if self.settings.policy.default is Action.APPROVE:
            self.add(
                ("policy", "default"),
                "every request no rule matches will wait for approval and has no approvers: "
                "answered 503",
            )


def _depth(prefix: str) -> int:
    return len([segment for segment in prefix.split("/") if segment])
