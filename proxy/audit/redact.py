"""Secret redaction for everything the proxy writes out: audit events, logs, approval previews,
API answers, Slack messages and webhook payloads.

A `Redactor` is a plain callable processor (structlog style) over an event dict. It replaces:
- values under sensitive field names (`authorization`, `cookie`, `password`, `secret`, `token`,
  `api_key`, `session`, `signature`, ... names ending in `token`, `secret`, `password`, `api_key`,
  ... plus configured names), at any depth;
- in any string, substrings that look like secrets: JWTs, provider keys (OpenAI, Anthropic,
  GitHub, GitLab, Slack, Stripe, Google, AWS access key ids, npm, SendGrid, Hugging Face),
  `Bearer`/`Basic` credentials, PEM private keys, Countersign API keys, plus configured patterns;
- in any string, the values of sensitive names written as text: query and form pairs
  (`?token=…&api%5Fkey=…`), JSON members (`"password": "…"`, raw text, never re-serialized),
  `password: …` / `secret = …` / `my password is: …` in free text, and URL user-info passwords;
- the exact values the proxy itself knows to be secret (injected upstream credentials,
  configured tokens), wherever they appear.

Names stay visible, their values become `[REDACTED]`; a key recognized by its format is replaced
whole (`Bearer …` included). Redacted text redacted again stays as it is, so every channel can
apply it to what another already redacted. `headers` shows request headers to approvers with
secret values replaced and marked.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import unquote

REDACTED = "[REDACTED]"

# Field names whose values are blanked wherever they show: mapping keys at any depth, query and
# form pairs, JSON members written as text. Compared lower-cased; `-` and `_` are the same.
SENSITIVE_KEYS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "password",
        "passwd",
        "pass",
        "pwd",
        "passphrase",
        "secret",
        "client_secret",
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "session_token",
        "auth_token",
        "api_key",
        "apikey",
        "x-api-key",
        "private_key",
        "access_key",
        "secret_key",
        "secret_access_key",
        "aws_secret_access_key",
        "credentials",
        "session",
        "sessionid",
        "session_id",
        "jsessionid",
        "phpsessid",
        "auth",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-auth-token",
    }
)

# A name ending in one of these (`db_password`, `GITHUB_TOKEN`, `accessToken`, `x-goog-api-key`)
# is sensitive too; `max_tokens`, `token_count` or `bypass` are not.
_SENSITIVE_ENDINGS = (
    "token",
    "secret",
    "password",
    "passwd",
    "passphrase",
    "api_key",
    "apikey",
    "private_key",
    "secret_key",
    "access_key",
)

_BEARER_BASIC = (
    r"(?:earer[ \t]+(?=[A-Za-z._~+/-]*[0-9])[A-Za-z0-9._~+/-]{8,}=*"
    r"|asic[ \t]+(?=[A-Za-z0-9+/]*(?:[0-9+/]|[a-z][A-Z]))[A-Za-z0-9+/]{8,}={0,2})"
)

# Secret-looking substrings, replaced whole. Every one starts with a literal character, so the
# regular expression engine skips ahead fast over ordinary text (this runs on every audit
# event); a left boundary is a look-behind placed after the literal start.
SECRET_PATTERNS = (
    r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]*",  # JWT
    r"xox(?:[abposre]|e\.xox[a-z])-[A-Za-z0-9-]{6,}",  # Slack tokens (incl. refresh `xoxe`)
    r"xapp-[A-Za-z0-9-]{6,}",  # Slack app-level tokens
    r"hooks\.slack\.com/services/[A-Za-z0-9_/-]{10,}",  # Slack incoming webhook URLs
    r"A(?:KIA|SIA)[0-9A-Z]{16}",  # AWS access key ids
    r"cs_[A-Za-z0-9_-]{20,}",  # Countersign API keys
    r"-----BEGIN [A-Z ]*PRIVATE KEY-----[\s\S]*?-----END [A-Z ]*PRIVATE KEY-----",
    # OpenAI (`sk-…`, `sk-proj-…`, `sk-svcacct-…`) and Anthropic (`sk-ant-…`) keys: a word of
    # its own, with a digit somewhere (`sk-` followed by 20 letters and dashes is a slug).
    r"sk-(?<![\w-]sk-)(?=[\w-]*[0-9])[A-Za-z0-9_-]{20,}",
    r"sk_(?<![\w-]sk_)(?:live|test)_[A-Za-z0-9]{10,}",  # Stripe secret keys
    r"rk_(?<![\w-]rk_)(?:live|test)_[A-Za-z0-9]{10,}",  # Stripe restricted keys
    r"whsec_(?<![\w-]whsec_)[A-Za-z0-9+/=]{20,}",  # Stripe (and Svix) webhook secrets
    r"gh[pousr]_(?<![\w-]gh[pousr]_)[A-Za-z0-9]{30,}",  # GitHub tokens
    r"github_pat_(?<![\w-]github_pat_)[A-Za-z0-9_]{22,}",  # GitHub fine-grained tokens
    r"gl(?<![\w-]gl)(?:pat|ptt|dt|rt|soat)-[A-Za-z0-9_-]{20,}",  # GitLab tokens
    r"AIza(?<![\w-]AIza)[0-9A-Za-z_-]{35}",  # Google API keys
    r"npm_(?<![\w-]npm_)[A-Za-z0-9]{36}",  # npm tokens
    r"SG\.(?<![\w-]SG\.)[A-Za-z0-9_-]{16,}\.[A-Za-z0-9_-]{16,}",  # SendGrid (Twilio) keys
    r"hf_(?<![\w-]hf_)[A-Za-z0-9]{30,}",  # Hugging Face tokens
    # `Bearer <token>` / `Basic <base64>`: the credential, which a word of letters alone
    # (`Bearer authentication`, `Basic Auth`) is not.
    r"B" + _BEARER_BASIC,
    r"b" + _BEARER_BASIC,
)

# The names that mark a secret in free text too: `password: hunter2`, `API_KEY=…`,
# `my password is: hunter2`, `"client_secret" = '…'`, `private key: …`, `db_password: …`. A space
# stands for `_`, `-`, a space or nothing.
STRONG_NAMES = (
    "password",
    "passwd",
    "passphrase",
    "secret access key",
    "secret key",
    "secret",
    "client secret",
    "app secret",
    "token",
    "api key",
    "private key",
    "access key",
)


def _strong_names_pattern(names: Iterable[str]) -> str:
    """`names` (any case), each at the start of a word (`_` and `-` end one: `db_password`).

    Written so that the engine stops only at their first letters: a character class, then a
    look-behind for the start of a word, then the rest of the names beginning with that letter
    (picked by a look-behind on it). Free text can be long (body previews), and a plain
    alternation after a look-behind is tried at every character."""
    rests: dict[str, list[str]] = {}
    for name in names:
        rests.setdefault(name[0].lower(), []).append(re.escape(name[1:]).replace(r"\ ", "[_ -]?"))
    first = "".join(sorted(rests)) + "".join(sorted(rests)).upper()
    picks = "|".join(f"(?<={c})(?:{'|'.join(r)})" for c, r in rests.items())
    return f"[{first}](?<![A-Za-z0-9][{first}])(?i:{picks})"


# Names with values written as text. Each form has its own expression, run only on text that
# can hold it (`Redactor._scrub`), in this order:
# a JSON member, `"name": value`, also escaped inside a JSON string (`\"name\": \"value\"`) or
# cut short at the end of the text (a preview);
_JSON_MEMBER = re.compile(
    r'(?P<head>(?:"|\\")(?P<name>[^"\\\n]{1,64})\\?"[ \t]*:[ \t]*)'
    r'(?P<value>"[^"\\\n]*(?:\\.[^"\\\n]*)*(?:"|\Z)|\\"[^"\\\n]*(?:\\[^"\n][^"\\\n]*)*\\"'
    r"|-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null)"
)
# a query or form pair, `name=value` (the value up to `&`, `;`, `#`, a space or a quote), or
# `name='value'`, `name="value"`;
_PAIR = re.compile(
    r"(?<![\w%.\[\]-])(?P<name>[\w%.\[\]-]{1,64})="
    r"(?P<value>'[^'\n]*'|\"[^\"\n]*\"|[^&;#\s\"]+)"
)
_PAIR_NAMES = re.compile(r"(?<![\w%.\[\]-])([\w%.\[\]-]{1,64})=[^&;#\s]")
# free text, `password: value`, `secret = value`, `token is: value`, `API_KEY="value"` (the value
# goes up to a space, a comma or a quote);
_FREE_TEXT = re.compile(
    r"(?P<head>" + _strong_names_pattern(STRONG_NAMES) + r"[\\\"']*[ \t]*"
    r"(?:(?i:is|was)[ \t]*)?[:=][ \t]*[\\\"']*)"
    r"(?![\[{(&;]|null\b)[^\s,\"'\\]+"
)
# a URL's user-info password, `scheme://user:password@host`.
_USERINFO = re.compile(r"(?P<head>://[^/\s:@]*:)[^/\s@]+(?=@)")
_QUOTED_REDACTED = '"' + REDACTED + '"'
_ESCAPED_REDACTED = '\\"' + REDACTED + '\\"'
_NAME_PARTS = re.compile(r"[\[\].]")


def _keep_head(match: re.Match[str]) -> str:
    # A function, not the template `\g<head>[REDACTED]`: `sub` parses a template on every call.
    return match.group("head") + REDACTED


# Header names whose values approvers never see (`Redactor.headers`): the sensitive field names,
# and any name containing one of these.
_SECRET_HEADER_WORDS = (
    "token",
    "secret",
    "password",
    "passwd",
    "api-key",
    "api_key",
    "apikey",
    "private-key",
    "cookie",
    "session",
    "signature",
    "credential",
)

_MIN_KNOWN_SECRET = 6  # shorter "secrets" would redact ordinary words
_MAX_PASSES = 3  # passes of the secret patterns over a text where they found something

# Values that redaction leaves as they are, checked by exact type before anything slower.
_INERT = frozenset({int, float, bool, type(None)})

_CACHED_MAX_LEN = 256  # strings up to this length have their redacted form remembered ...
# Top-level event fields whose values the proxy makes itself (a request's id: a random prefix and
# a counter), new at every event: not scanned, which would only churn the cache. Only at the top
# level of an event, where no caller's data is put under these names (a body's own `request_id`
# member, nested, is scrubbed like any value).
_OWN_IDS = frozenset({"request_id"})
_CACHE_SIZE = 8192  # ... this many of them at most
_KEYS_SIZE = 1024  # field names whose sensitivity is remembered


class Redactor:
    def __init__(
        self,
        extra_patterns: Iterable[str] = (),
        extra_fields: Iterable[str] = (),
        known_secrets: Iterable[str] = (),
    ) -> None:
        self._extra_patterns = list(extra_patterns)
        # The same short strings (subjects, emails, routes, paths) recur in every event of a
        # busy proxy: remember their redacted form instead of scanning them again. A plain dict
        # (emptied when full) costs less per hit than functools.lru_cache.
        self._cache: dict[str, str] = {}
        self.set_known_secrets(known_secrets)
        self._fields = SENSITIVE_KEYS | {f.lower() for f in extra_fields}
        self._fields_norm = frozenset(f.replace("-", "_") for f in self._fields)
        # Field names known not to be sensitive (`str` only: 1 and True are equal keys with
        # different names): a mapping whose keys all are takes the fast path.
        self._plain_keys: set[str] = set()
        # Names seen in text (query pairs, JSON members) and whether they are sensitive.
        self._names: dict[str, bool] = {}

    def set_known_secrets(self, known_secrets: Iterable[str]) -> None:
        """Replace, in place, the configuration's secret values this redactor removes (a
        reload): every channel holding this redactor redacts the new set from now on."""
        secrets = sorted(
            {s for s in known_secrets if len(s) >= _MIN_KNOWN_SECRET}, key=len, reverse=True
        )
        # `[REDACTED]` itself first, replaced by itself: no pattern matches inside it when a text
        # is redacted again.
        alternatives = [re.escape(REDACTED)] + [re.escape(s) for s in secrets]
        alternatives += list(SECRET_PATTERNS) + self._extra_patterns
        self._pattern = re.compile("|".join(f"(?:{a})" for a in alternatives))
        self._sub = self._pattern.sub
        self._cache.clear()  # redacted forms computed without the new secrets

    def _scrub(self, text: str) -> str:
        """`text` with secret-looking substrings and the values of sensitive names replaced."""
        scrubbed = self._sub(REDACTED, text)
        if scrubbed != text:
            # A key glued to the end of another (`…npm_…glpat-…`) has no word boundary before
            # it until the first is replaced: look again while that changes something.
            for _ in range(_MAX_PASSES):
                text, scrubbed = scrubbed, self._sub(REDACTED, scrubbed)
                if scrubbed == text:
                    break
        text = scrubbed
        # Every name-and-value form has a `=` or a `:`; most strings have neither.
        if "=" in text or ":" in text:
            if '"' in text:
                text = _JSON_MEMBER.sub(self._json_member, text)
            # Pairs are common (`page=2`): look their names up before replacing anything.
            if "=" in text and any(map(self._text_name, _PAIR_NAMES.findall(text))):
                text = _PAIR.sub(self._pair, text)
            lowered = text.lower()  # every strong name holds one of these:
            if "pass" in lowered or "secret" in lowered or "token" in lowered or "key" in lowered:
                text = _FREE_TEXT.sub(_keep_head, text)
            if "@" in text and "://" in text:
                text = _USERINFO.sub(_keep_head, text)
        return text

    def _text(self, text: str) -> str:
        """`text` with secrets replaced (the cache missed)."""
        if not text:
            return text
        if len(text) > _CACHED_MAX_LEN:
            return self._scrub(text)
        cache = self._cache
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        scrubbed = cache[text] = self._scrub(text)
        return scrubbed

    def _json_member(self, match: re.Match[str]) -> str:
        """`"name": value`: the value redacted when the name is sensitive."""
        head, value = match.group("head", "value")
        if not self._text_name(match.group("name")):
            if '\\"' in value:  # a JSON document inside this string: its members too
                return head + _JSON_MEMBER.sub(self._json_member, value)
            return match.group()
        if value == "null":
            return match.group()
        return head + (_ESCAPED_REDACTED if value[0] == "\\" else _QUOTED_REDACTED)

    def _pair(self, match: re.Match[str]) -> str:
        """`name=value`: the value redacted when the name is sensitive; otherwise pairs inside
        the value are looked at in turn (`?next=/x?token=…`)."""
        name, value = match.group("name", "value")
        if self._text_name(name):
            quote = value[0] if value[0] in "'\"" else ""
            return f"{name}={quote}{REDACTED}{quote}"
        if "=" in value:
            return f"{name}={_PAIR.sub(self._pair, value)}"
        return match.group()

    def _text_name(self, name: str) -> bool:
        """Whether `name`, written in text (`api%5Fkey`, `user[password]`), is sensitive."""
        known = self._names.get(name)
        if known is not None:
            return known
        decoded = unquote(name) if "%" in name else name
        sensitive = self.is_sensitive_field(decoded)
        if not sensitive and _NAME_PARTS.search(decoded):
            last = [part for part in _NAME_PARTS.split(decoded) if part]
            sensitive = bool(last) and self.is_sensitive_field(last[-1])
        if len(self._names) >= _KEYS_SIZE:
            self._names.clear()
        self._names[name] = sensitive
        return sensitive

    def _sensitive(self, key: Any, name: str) -> bool:
        """Whether the field `key`, called `name`, is sensitive; remember it if it is not."""
        if self.is_sensitive_field(name):
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
        """Whether values under the field `name` are blanked: a sensitive name (`-` and `_`
        alike), or one ending in `token`, `secret`, `password`, `api_key`, ..."""
        lowered = name.lower()
        if lowered in self._fields:
            return True
        norm = lowered.replace("-", "_")
        return norm in self._fields_norm or norm.endswith(_SENSITIVE_ENDINGS)

    def is_sensitive_header(self, name: str) -> bool:
        """Whether an HTTP header's value is a secret by its name alone."""
        if self.is_sensitive_field(name):
            return True
        lowered = name.lower()
        return any(word in lowered for word in _SECRET_HEADER_WORDS)

    def headers(self, pairs: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
        """Headers as approvers see them: `{"name", "value", "redacted"}` each, in order. The
        value is `[REDACTED]` when the name is a secret's (`Authorization`, `Cookie`,
        `X-Api-Key`, any `*token*`, `*secret*`, ...), else scrubbed like any text; `redacted`
        says whether anything was hidden."""
        shown: list[dict[str, Any]] = []
        for name, value in pairs:
            if self.is_sensitive_header(name):
                shown.append({"name": name, "value": REDACTED, "redacted": True})
            else:
                scrubbed = self.value(value)
                shown.append({"name": name, "value": scrubbed, "redacted": scrubbed != value})
        return shown

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
                if key in _OWN_IDS:
                    continue
                scrubbed = cache.get(value)
                event[key] = scrubbed if scrubbed is not None else self._text(value)
            elif cls is dict:
                event[key] = self._mapping(value)
            elif cls not in _INERT and isinstance(value, (str, Mapping, list, tuple)):
                event[key] = self.value(value)
        return event


DEFAULT = Redactor()
