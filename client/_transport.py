"""httpx transports over a Unix socket, and the one place httpx errors become the library's errors.

* No CA bundle: httpx builds a verifying TLS context (loading certifi, ~25 ms) for every transport
  unless it is handed one. TLS never runs over the socket, so one bare context is built once and
  shared.
* Idle pooled connections expire after ``KEEPALIVE_EXPIRY`` seconds, well under the server's
  keep-alive (15 s), so the client rarely reuses a connection the server is closing (httpx#2487).
  When it still happens, :class:`ReuseTracker` tells the caller the failed request went out on a
  reused connection, and the caller retries it once.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Iterator
from typing import Any

import httpx

from client._address import to_url
from client._errors import ClientError, ConnectError, reason_for

__all__ = [
    "BASE_URL",
    "KEEPALIVE_EXPIRY",
    "ReuseTracker",
    "async_transport",
    "is_stale_connection_error",
    "map_errors",
    "sync_transport",
]

BASE_URL = "http://localhost"
KEEPALIVE_EXPIRY = 5.0
_ssl_context: ssl.SSLContext | None = None


def _bare_ssl_context() -> ssl.SSLContext:
    """A TLS context without a CA bundle, built once; it is never used over a Unix socket."""
    global _ssl_context
    if _ssl_context is None:
        _ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return _ssl_context


def _limits(max_connections: int | None) -> httpx.Limits:
    return httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections,
        keepalive_expiry=KEEPALIVE_EXPIRY,
    )


def sync_transport(path: str, *, max_connections: int | None = 10) -> httpx.HTTPTransport:
    """A pooled HTTP/1.1 transport to the socket at ``path``."""
    return httpx.HTTPTransport(
        uds=path, verify=_bare_ssl_context(), trust_env=False, limits=_limits(max_connections)
    )


def async_transport(path: str, *, max_connections: int | None = 100) -> httpx.AsyncHTTPTransport:
    """The asyncio flavour of :func:`sync_transport`."""
    return httpx.AsyncHTTPTransport(
        uds=path, verify=_bare_ssl_context(), trust_env=False, limits=_limits(max_connections)
    )


class ReuseTracker:
    """A ``trace`` extension that records whether a request opened a new connection."""

    __slots__ = ("opened",)

    def __init__(self) -> None:
        self.opened = False

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event.startswith("connection.connect_"):
            self.opened = True

    @property
    def reused(self) -> bool:
        return not self.opened


_STALE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def is_stale_connection_error(exc: BaseException) -> bool:
    """True for the errors a keep-alive connection closed by the server produces."""
    return isinstance(exc, _STALE)


@contextlib.contextmanager
def map_errors(path: str) -> Iterator[None]:
    """Turn httpx transport errors into :class:`ConnectError` (or :class:`ClientError`), once."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise ConnectError(to_url(path), "timed out") from exc
    except httpx.TransportError as exc:
        raise ConnectError(to_url(path), reason_for(exc)) from exc
    except httpx.HTTPError as exc:
        raise ClientError(f"request to {to_url(path)} failed: {exc}") from exc
