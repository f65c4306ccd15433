"""Persons: the one human behind a credential, for deciding, counting and self-approval.

Every decision is made by a person, named by one canonical email (lower-cased, trimmed). Two
credentials are the same person when they share an issuer and subject, or when their emails are
the same mailbox: `alice+ops@example.com` and `Alice@example.com` are one person for counting a
quorum and for refusing self-approval (those comparisons err towards "the same person"), while
authorization (a rule's `users`, the `approvals.groups` directory) needs the canonical email
itself. Pure code, no I/O.
"""

from __future__ import annotations

import re

# An address as IdPs verify them: an ASCII local part of RFC 5322 atom characters and dots, and a
# DNS domain of at least two labels (IDNs in their punycode form). Anything else (a quoted local
# part, a trailing dot, a JSON list) names no person: it can neither decide nor be told apart.
_EMAIL = re.compile(
    r"[a-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)+"
)


def canonical_email(value: object) -> str | None:
    """`value` as a canonical email (trimmed, lower-cased), or None when it is not one."""
    if not isinstance(value, str):
        return None
    email = value.strip().lower()
    return email if _EMAIL.fullmatch(email) else None


def mailbox(email: str) -> str:
    """The mailbox an email address delivers to, for sameness: the `+tag` of its local part
    dropped (`alice+ops@example.com` → `alice@example.com`)."""
    local, _, domain = email.rpartition("@")
    return f"{local.split('+', 1)[0]}@{domain}"


def same_person(a: str | None, b: str | None) -> bool:
    """Whether two canonical emails name the same person (False when either is unknown)."""
    return a is not None and b is not None and mailbox(a) == mailbox(b)
