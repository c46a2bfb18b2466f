"""httpx transports over a Unix socket, and the one place httpx errors become the library's errors.

* No TLS context at all: ``httpx.HTTPTransport`` builds a verifying one (loading certifi's CA
  bundle, ~25 ms) for every transport, though TLS never runs over the socket. These transports
  build their httpcore pool directly, without one.
* A failed ``connect()`` closes its socket (httpcore 1.0's sync backend leaks it).
* Idle pooled connections expire after ``KEEPALIVE_EXPIRY`` seconds, well under the server's
  keep-alive (15 s), so the client rarely reuses a connection the server is closing (httpx#2487).
  When it still happens, :class:`ReuseTracker` tells the caller the failed request went out on a
  reused connection, and the caller retries it once.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Iterator
from typing import Any

import httpcore
import httpx
from httpcore._backends.sync import SyncStream

from client._address import to_url
from client._errors import ClientError, ConnectError, reason_for

__all__ = [
    "BASE_URL",
    "KEEPALIVE_EXPIRY",
    "ReuseTracker",
    "UnixAsyncTransport",
    "UnixTransport",
    "is_stale_connection_error",
    "map_errors",
]

BASE_URL = "http://localhost"
KEEPALIVE_EXPIRY = 5.0


class _UnixBackend(httpcore.SyncBackend):
    """httpcore's sync backend, but a socket whose ``connect()`` fails is closed, not leaked."""

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(timeout)
            sock.connect(path)
        except TimeoutError as exc:
            sock.close()
            raise httpcore.ConnectTimeout(exc) from exc
        except OSError as exc:
            sock.close()
            raise httpcore.ConnectError(exc) from exc
        return SyncStream(sock)


class UnixTransport(httpx.HTTPTransport):
    """A pooled HTTP/1.1 transport to the socket at ``path``, without TLS or proxy setup.

    ``httpx.HTTPTransport.__init__`` is skipped on purpose: all it would add is the TLS context
    and proxy handling; requests go through the inherited ``handle_request`` and ``self._pool``.
    """

    def __init__(self, path: str, *, max_connections: int | None = 10) -> None:
        self._pool = httpcore.ConnectionPool(
            ssl_context=None, max_connections=max_connections,
            max_keepalive_connections=max_connections, keepalive_expiry=KEEPALIVE_EXPIRY,
            uds=path, network_backend=_UnixBackend(),
        )


class UnixAsyncTransport(httpx.AsyncHTTPTransport):
    """The asyncio flavour of :class:`UnixTransport` (anyio's connect closes failed sockets)."""

    def __init__(self, path: str, *, max_connections: int | None = 100) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=None, max_connections=max_connections,
            max_keepalive_connections=max_connections, keepalive_expiry=KEEPALIVE_EXPIRY, uds=path,
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
