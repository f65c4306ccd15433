"""Operational logs (not the audit trail): JSON lines on stderr through structlog.

stdout carries the audit trail only, so that piping it to a collector gets nothing else.
"""

from __future__ import annotations

import logging
import sys

import structlog

from .audit.redact import redact_event


def configure_logging(level: int = logging.INFO) -> None:
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
            redact_event,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
