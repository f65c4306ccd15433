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


class RequestBodyFailed(UpstreamUnavailable):
    """The client's request body broke off while it streamed to the upstream (a stalled or
    cut-short upload): the exchange is abandoned, but the failure is the client's, not the
    upstream's. `cause` is what reading the body raised, for the proxy to answer as that."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.cause = cause
