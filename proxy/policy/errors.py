"""The policy's one error: a rule that cannot be compiled.

A module of its own so the glob trie and the condition modules can raise it without importing
the engine. Pure code: no I/O.
"""

from __future__ import annotations

__all__ = ["PolicyError"]


class PolicyError(ValueError):
    """A rule that cannot be compiled (for example a malformed path glob)."""
