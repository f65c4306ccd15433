"""Agent-controlled text made safe to show: escaped, and invisible characters made visible.

Jinja2 autoescapes every value; on top of that, bidirectional overrides and zero-width characters
(which can make `/users/evil` read as something else, or hide text) are shown as a marked
`<U+202E>` token, and so are control characters other than newline and tab.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

from markupsafe import Markup, escape

_INVISIBLE = re.compile(
    "[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u00ad\u061c\u115f\u1160\u17b4\u17b5\u180e"
    "\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164\ufe00-\ufe0f\ufeff\ufff9-\ufffb]"
)


def visible(value: object) -> Markup:
    """`value` as escaped HTML, each invisible or direction-changing character shown as
    `<U+XXXX>` in a marked span."""
    text = "" if value is None else str(value)
    out: list[str] = []
    at = 0
    for match in _INVISIBLE.finditer(text):
        out.append(str(escape(text[at : match.start()])))
        code = f"U+{ord(match.group()):04X}"
        out.append(f'<span class="invisible" title="hidden character {code}">&lt;{code}&gt;</span>')
        at = match.end()
    out.append(str(escape(text[at:])))
    return Markup("".join(out))


def has_invisible(value: object) -> bool:
    return value is not None and _INVISIBLE.search(str(value)) is not None


def duration(seconds: float) -> str:
    """A short human duration: 45 s, 12 min, 3 h 5 min, 2 d."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    return f"{seconds // 86400} d"


def age(ts: float | None) -> str:
    return "-" if ts is None else duration(time.time() - ts) + " ago"


def left(ts: float | None) -> str:
    if ts is None:
        return "-"
    remaining = ts - time.time()
    return "expired" if remaining <= 0 else duration(remaining) + " left"


def when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
