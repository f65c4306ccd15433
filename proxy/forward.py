"""The upstream client: one small transport interface, errors mapped at the boundary.

`Forwarder.send()` opens the upstream request with a streamed body and returns the upstream
response with its body still unread, so the server can stream it back chunk by chunk. Connection
failures become `UpstreamUnavailable` (502), timeouts `UpstreamTimeout` (504); nothing else of
aiohttp leaks out.

The client keeps no cookies, does not decompress (bytes pass through as the upstream sent them)
and pools keep-alive connections across all routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# RFC 9110 section 7.6.1 plus the de facto ones; never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


class UpstreamError(Exception):
    status = 502
    code = "upstream_unavailable"


class UpstreamUnavailable(UpstreamError):
    status = 502
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


def connection_named(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> set[str]:
    """The (lower-case) header names a `Connection` header declares hop-by-hop."""
    named: set[str] = set()
    for value in headers.getall("Connection", ()):
        named.update(token.strip().lower() for token in value.split(","))
    return named


def strip_hop_by_hop(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """A copy without hop-by-hop headers, including those named in `Connection`."""
    named = connection_named(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in headers.items():
        lower = key.lower()
        if lower not in HOP_BY_HOP and lower not in named:
            out.add(key, value)
    return out


@dataclass(slots=True)
class UpstreamResponse:
    status: int
    reason: str | None
    headers: CIMultiDict[str]
    _response: aiohttp.ClientResponse

    async def iter_body(self) -> AsyncIterator[bytes]:
        """The body as it arrives; a failure mid-body raises `UpstreamError` like `send` does."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
            raise UpstreamTimeout(str(exc) or "upstream timed out mid-body") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(str(exc) or type(exc).__name__) from exc

    @property
    def content_length(self) -> int | None:
        return self._response.content_length

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        """Drop the connection (the body was not read to the end; it cannot be reused)."""
        self._response.close()


class Forwarder:
    def __init__(
        self,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        pool_size: int = 1000,
        pool_size_per_host: int = 0,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._read_timeout = read_timeout
        self._timeouts: dict[float | None, aiohttp.ClientTimeout] = {}
        self._connector = aiohttp.TCPConnector(
            limit=pool_size,
            limit_per_host=pool_size_per_host,
            keepalive_timeout=30,
            enable_cleanup_closed=True,
        )
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            raise_for_status=False,
        )

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared pooled session (authn reuses it for discovery and JWKS fetches)."""
        return self._session

    async def send(
        self,
        method: str,
        url: str,
        headers: CIMultiDict[str] | Iterable[tuple[str, str]],
        body: AsyncIterable[bytes] | bytes | None,
        *,
        read_timeout: float | None = None,
    ) -> UpstreamResponse:
        timeout = self._timeouts.get(read_timeout)
        if timeout is None:  # one object per distinct read timeout (a route's), made once
            timeout = self._timeouts[read_timeout] = aiohttp.ClientTimeout(
                total=None,
                sock_connect=self._connect_timeout,
                sock_read=read_timeout or self._read_timeout,
            )
        if not isinstance(headers, CIMultiDict):
            headers = CIMultiDict(headers)
        try:
            response = await self._session.request(
                method,
                # encoded=True: the path is already normalized and canonically encoded by the
                # server; yarl must send it as is, not re-quote it.
                URL(url, encoded=True),
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=timeout,
                compress=None,
            )
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout(str(exc) or "upstream timed out") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamUnavailable(str(exc) or type(exc).__name__) from exc
        return UpstreamResponse(
            status=response.status,
            reason=response.reason,
            headers=strip_hop_by_hop(response.headers),
            _response=response,
        )

    async def aclose(self) -> None:
        await self._session.close()
