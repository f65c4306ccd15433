"""Errors authn raises; the server maps them to HTTP answers at its boundary."""

from __future__ import annotations


class AuthError(Exception):
    """The credential is missing or invalid: 401 with `WWW-Authenticate: Bearer error=...`.

    `description` is safe to show the caller (it never echoes the token itself). `status` is
    401 unless the caller did authenticate and what it sent contradicts its own signature (a
    SigV4 body that does not match its signed hash: 403, as AWS answers).
    """

    def __init__(self, description: str, error: str = "invalid_token", status: int = 401) -> None:
        super().__init__(description)
        self.description = description
        self.error = error
        self.status = status


class IdentityUnavailable(Exception):
    """The token may be fine but its issuer's keys cannot be fetched right now: 503, not 401."""
