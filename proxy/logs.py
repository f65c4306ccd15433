"""Operational logs (not the audit trail): JSON lines on stderr through structlog.

stdout carries the audit trail only, so that piping it to a collector gets nothing else. Logs of
libraries that use the standard `logging` module (aiohttp's refusal of a malformed request, for
one) are rendered as the same JSON lines.

Every line passes through the redactor last, after exceptions are rendered as text: a secret in
an exception's message or traceback (a URL with its query, a header value) is redacted too.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from .audit.redact import DEFAULT, Redactor


def configure_logging(level: int = logging.INFO, redactor: Redactor = DEFAULT) -> None:
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.format_exc_info,
            redactor,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # One write per line (message and newline together): worker processes share stderr,
        # and separate writes would let their lines interleave.
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                redactor,
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
