"""Untrusted text in Slack's mrkdwn: redacted, shown literally, and within budget after escaping.

Every value that is not ours (the agent's reason, path, query, headers and body, the requester's
names, approvers' notes) is rendered by `literal`:
- redacted first (a `Redactor`: secret-named query, form and JSON values, keys and tokens), on
  the whole text, so a secret cut in two is still found;
- each character rendered: `&`, `<`, `>` as the entities Slack documents (no mention, broadcast
  or link of its own: `<!channel>`, `<@U1>`, `<https://evil|click>`), a backtick as U+02CB (it could
  end the code span), and every invisible or direction-changing character (bidi overrides and
  isolates, zero-width characters, other format and control characters) as a visible marker such
  as `⟨U+202E⟩`, so `…cod.exe` cannot read as `…exe.doc`;
- wrapped in a code span (one line) or code block (several): mrkdwn does not format code, so the
  agent's `*bold*`, `_italic_`, `~strike~`, `> quote` and `:white_check_mark:` show as typed;
- cut to the budget measured *after* escaping (`&` is five characters once escaped), never inside
  an entity or a marker, with `…` where it was cut.
"""

from __future__ import annotations

import unicodedata

from ..audit.redact import DEFAULT as DEFAULT_REDACTOR
from ..audit.redact import Redactor
from .limits import units

CUT = "…"
EMPTY = "-"
BACKTICK_STANDIN = "\u02cb"  # MODIFIER LETTER GRAVE ACCENT: looks like one, ends nothing
WORD_JOINER = "\u2060"
_BROADCASTS = ("channel", "here", "everyone")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "`": BACKTICK_STANDIN}
_KEPT_CONTROLS = {"\n", "\t"}


def _is_invisible(ch: str) -> bool:
    """Characters that change how the text around them reads without showing themselves."""
    if ch in _KEPT_CONTROLS:
        return False
    # Cc: controls; Cf: format (bidi embeddings, overrides and isolates, zero-width space,
    # joiners, word joiner, BOM, tag characters, soft hyphen); Zl, Zp: line/paragraph separators.
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Co", "Cn", "Cs")


def marker(ch: str) -> str:
    return f"⟨U+{ord(ch):04X}⟩"


def _render_char(ch: str) -> str:
    shown = _ENTITIES.get(ch)
    if shown is not None:
        return shown
    if _is_invisible(ch):
        return marker(ch)
    return ch


def render(text: str, budget: int) -> tuple[str, bool]:
    """`text` rendered character by character (see the module doc) until `budget` UTF-16 units
    are used; returns the rendering and whether it was cut (then it ends with `…`)."""
    text = text.replace("\r\n", "\n")
    out: list[str] = []
    used = 0
    keep = 0  # how many pieces still leave room for the cut mark
    mark = units(CUT)
    for i, ch in enumerate(text):
        piece = _render_char(ch)
        # A broadcast word after `@` gets a word joiner: no ping where mrkdwn is not code.
        if ch == "@" and text[i + 1 : i + 9].lower().startswith(_BROADCASTS):
            piece = "@" + WORD_JOINER
        size = units(piece)
        if used + size > budget:
            return "".join(out[:keep]) + CUT, True
        out.append(piece)
        used += size
        if used + mark <= budget:
            keep = len(out)
    return "".join(out), False


def redacted(text: str, redactor: Redactor = DEFAULT_REDACTOR) -> str:
    return str(redactor.value(text))


def literal(
    text: str | None,
    budget: int,
    redactor: Redactor = DEFAULT_REDACTOR,
    *,
    block: bool | None = None,
) -> str:
    """`text` shown exactly as typed, in a code span (or a code block when `block`, or when it
    has several lines and `block` is None), at most `budget` UTF-16 units in all."""
    if text is None or text == "":
        return EMPTY
    text = redacted(text, redactor)
    multiline = "\n" in text or "\r" in text
    fence = "```" if (block if block is not None else multiline) else "`"
    if fence == "`" and multiline:
        text = text.replace("\r\n", "\n").replace("\n", " ⏎ ")
    inner, _ = render(text, budget - 2 * len(fence))
    if not inner.strip():
        inner = inner + EMPTY  # a code span of blanks would not render as code
    return f"{fence}{inner}{fence}"


def plain(text: str | None, budget: int, redactor: Redactor = DEFAULT_REDACTOR) -> str:
    """`text` redacted, escaped and with invisible characters shown, without code formatting:
    for the notification text, which clients show as plain text."""
    if not text:
        return EMPTY
    shown, _ = render(redacted(text, redactor), budget)
    return shown


def fit(text: str, budget: int) -> str:
    """Our own mrkdwn (already escaped parts) cut to `budget`, only ever at a line break: a
    cut never splits a code span, an entity or a link."""
    if units(text) <= budget:
        return text
    lines = text.split("\n")
    # Drop whole lines until it fits and no code block is left open (an open fence would let
    # what follows format).
    while lines and (
        units("\n".join(lines) + "\n" + CUT) > budget or "\n".join(lines).count("```") % 2
    ):
        lines.pop()
    return "\n".join([*lines, CUT]) if lines else CUT
