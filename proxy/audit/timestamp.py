"""The `ts` of audit events: structlog's `TimeStamper(fmt="iso", utc=True)`, for less.

TimeStamper builds a timezone-aware datetime and formats all of it for every event. This formats
the date and time of day once per second and appends the microseconds: the same text
(`2026-11-25T16:07:44.050783Z`, or `2026-11-25T16:07:44Z` when the microseconds are 0, as
`datetime.isoformat` writes it), from the same clock (the system clock, truncated to the
microsecond, as `datetime.now` reads it).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import MutableMapping
from typing import Any

_NO_MICROSECONDS = "000000"


def _second_text(second: int) -> str:
    """'2026-11-25T16:07:44.' for a Unix time in whole seconds (UTC)."""
    return datetime.datetime.fromtimestamp(second, tz=datetime.UTC).isoformat()[:-6] + "."


class IsoUtcStamper:
    """A structlog processor that sets `event[key]` to the current UTC time, ISO 8601."""

    __slots__ = ("_key", "_last")

    def __init__(self, key: str = "ts") -> None:
        self._key = key
        # (second, its text): one tuple, replaced whole, so threads never see a mixed pair.
        self._last: tuple[int, str] = (-1, "")

    def __call__(
        self, _: Any, __: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        micros = time.time_ns() // 1000
        second = micros // 1_000_000
        last = self._last
        if last[0] != second:
            last = self._last = (second, _second_text(second))
        digits = str(micros)[-6:] if micros >= 1_000_000 else f"{micros:06d}"
        if digits == _NO_MICROSECONDS:
            event[self._key] = last[1][:-1] + "Z"
        else:
            event[self._key] = last[1] + digits + "Z"
        return event
