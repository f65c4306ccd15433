"""Errors authn raises; the server maps them to HTTP answers at its boundary."""

from __future__ import annotations


class AuthError(Exception):
    """The credential is missing or invalid: 401 with `WWW-Authenticate: Bearer error=...`.

    `description` is safe to show the caller (it never echoes the token itself).
    """

    def __init__(self, description: str, error: str = "invalid_token") -> None:
        super().__init__(description)
        self.description = description
        self.error = error


class IdentityUnavailable(Exception):
    """The token may be fine but its issuer's keys cannot be fetched right now: 503, not 401."""
