"""Secret redaction for everything the proxy writes out: audit events, logs, approval previews,
API answers (and, later, Slack and webhook payloads).

A `Redactor` is a plain callable processor (structlog style) over an event dict. It replaces:
- values under sensitive field names (`authorization`, `cookie`, `password`, `secret`, `token`,
  ... plus configured names), at any depth;
- substrings that look like secrets: JWTs, Slack tokens (`xox?-`, `xapp-`), AWS access key ids,
  PEM private keys, Countersign API keys, plus configured patterns;
- the exact values the proxy itself knows to be secret (injected upstream credentials,
  configured tokens), wherever they appear.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

REDACTED = "[REDACTED]"

SENSITIVE_KEYS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "password",
        "passwd",
        "secret",
        "client_secret",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "api_key",
        "apikey",
        "x-api-key",
        "private_key",
    }
)

SECRET_PATTERNS = (
    r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*",  # JWT
    r"xox[abposr]-[A-Za-z0-9-]{6,}",  # Slack tokens
    r"xapp-[A-Za-z0-9-]{6,}",  # Slack app-level tokens
    r"(?:AKIA|ASIA)[0-9A-Z]{16}",  # AWS access key ids
    r"cs_[A-Za-z0-9_-]{20,}",  # Countersign API keys
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
)

_MIN_KNOWN_SECRET = 6  # shorter "secrets" would redact ordinary words


class Redactor:
    def __init__(
        self,
        extra_patterns: Iterable[str] = (),
        extra_fields: Iterable[str] = (),
        known_secrets: Iterable[str] = (),
    ) -> None:
        secrets = sorted(
            {s for s in known_secrets if len(s) >= _MIN_KNOWN_SECRET}, key=len, reverse=True
        )
        alternatives = [re.escape(s) for s in secrets] + list(SECRET_PATTERNS)
        alternatives += list(extra_patterns)
        self._pattern = re.compile("|".join(f"(?:{a})" for a in alternatives))
        self._fields = SENSITIVE_KEYS | {f.lower() for f in extra_fields}
        # The same short strings (subjects, emails, routes, paths) recur in every event of a
        # busy proxy: remember their redacted form instead of scanning them again.
        self._short = functools.lru_cache(maxsize=8192)(self._scrub)

    def _scrub(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text)

    def value(self, value: Any) -> Any:
        """`value` with secrets replaced (strings, and mappings / sequences recursively)."""
        if isinstance(value, str):
            if not value:
                return value
            return self._short(value) if len(value) <= 256 else self._scrub(value)
        if isinstance(value, Mapping):
            return {
                k: REDACTED if str(k).lower() in self._fields else self.value(v)
                for k, v in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value

    def is_sensitive_field(self, name: str) -> bool:
        return name.lower() in self._fields

    def __call__(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in event.items():
            if key.lower() in self._fields:
                event[key] = REDACTED
            elif isinstance(value, (str, Mapping, list, tuple)):
                event[key] = self.value(value)
        return event


DEFAULT = Redactor()
