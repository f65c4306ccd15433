"""The only errors the upstream client raises: what the proxy answers for each is fixed here."""

from __future__ import annotations


class UpstreamError(Exception):
    status = 502
    code = "upstream_unavailable"


class UpstreamUnavailable(UpstreamError):
    """Cannot connect, the connection broke, or the answer was not valid HTTP: 502."""

    status = 502
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    """No connection or no data within the configured time: 504."""

    status = 504
    code = "upstream_timeout"
