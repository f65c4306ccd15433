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

# Values that redaction leaves as they are, checked by exact type before anything slower.
_INERT = frozenset({int, float, bool, type(None)})

_CACHED_MAX_LEN = 256  # strings up to this length have their redacted form remembered ...
_CACHE_SIZE = 8192  # ... this many of them at most
_KEYS_SIZE = 1024  # field names whose sensitivity is remembered


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
        self._sub = self._pattern.sub
        self._fields = SENSITIVE_KEYS | {f.lower() for f in extra_fields}
        # The same short strings (subjects, emails, routes, paths) recur in every event of a
        # busy proxy: remember their redacted form instead of scanning them again. A plain dict
        # (emptied when full) costs less per hit than functools.lru_cache.
        self._cache: dict[str, str] = {}
        # Field names known not to be sensitive (`str` only: 1 and True are equal keys with
        # different names): a mapping whose keys all are takes the fast path.
        self._plain_keys: set[str] = set()

    def _text(self, text: str) -> str:
        """`text` with secrets replaced (the cache missed)."""
        if not text:
            return text
        if len(text) > _CACHED_MAX_LEN:
            return self._sub(REDACTED, text)
        cache = self._cache
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        scrubbed = cache[text] = self._sub(REDACTED, text)
        return scrubbed

    def _sensitive(self, key: Any, name: str) -> bool:
        """Whether the field `key`, called `name`, is sensitive; remember it if it is not."""
        if name.lower() in self._fields:
            return True
        if key.__class__ is str:
            if len(self._plain_keys) >= _KEYS_SIZE:
                self._plain_keys.clear()
            self._plain_keys.add(key)
        return False

    def value(self, value: Any) -> Any:
        """`value` with secrets replaced (strings, and mappings / sequences recursively)."""
        cls = value.__class__
        if cls is str:
            scrubbed = self._cache.get(value)
            return scrubbed if scrubbed is not None else self._text(value)
        if cls in _INERT:
            return value
        if cls is dict:
            return self._mapping(value)
        if cls is list or cls is tuple:
            return self._sequence(value)
        # Subclasses and other mappings: the same, checked the slower way.
        if isinstance(value, str):
            return self._text(value)
        if isinstance(value, Mapping):
            return self._mapping(value)
        if isinstance(value, (list, tuple)):
            return self._sequence(value)
        return value

    def _mapping(self, mapping: Mapping[Any, Any]) -> dict[Any, Any]:
        if not self._plain_keys.issuperset(mapping):
            return {
                k: REDACTED if self._sensitive(k, str(k)) else self.value(v)
                for k, v in mapping.items()
            }
        # No field to blank (the usual case): only values to scrub. The common types inline.
        cache = self._cache
        out: dict[Any, Any] = {}
        for k, v in mapping.items():
            cls = v.__class__
            if cls is str:
                scrubbed = cache.get(v)
                out[k] = scrubbed if scrubbed is not None else self._text(v)
            elif cls in _INERT:
                out[k] = v
            elif cls is list:
                out[k] = self._sequence(v)
            else:
                out[k] = self.value(v)
        return out

    def _sequence(self, items: list[Any] | tuple[Any, ...]) -> list[Any]:
        cache = self._cache
        out: list[Any] = []
        for v in items:
            if v.__class__ is str:
                scrubbed = cache.get(v)
                out.append(scrubbed if scrubbed is not None else self._text(v))
            else:
                out.append(self.value(v))
        return out

    def is_sensitive_field(self, name: str) -> bool:
        return name.lower() in self._fields

    def __call__(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        if not self._plain_keys.issuperset(event):
            for key, value in event.items():
                if self._sensitive(key, key):
                    event[key] = REDACTED
                elif isinstance(value, (str, Mapping, list, tuple)):
                    event[key] = self.value(value)
            return event
        # Every field name is known not to be sensitive (the usual case): only values to scrub.
        cache = self._cache
        for key, value in event.items():
            cls = value.__class__
            if cls is str:
                scrubbed = cache.get(value)
                event[key] = scrubbed if scrubbed is not None else self._text(value)
            elif cls is dict:
                event[key] = self._mapping(value)
            elif cls not in _INERT and isinstance(value, (str, Mapping, list, tuple)):
                event[key] = self.value(value)
        return event


DEFAULT = Redactor()
