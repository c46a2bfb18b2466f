"""httpx2's Unix-socket transports, set up for a socket, and the mapping of their errors.

* **No CA bundle.** httpx2 gives every transport a TLS context and loads the system CA file into it
  (measured: 38 ms per transport). TLS never runs over the socket, so :func:`sync_transport` and
  :func:`async_transport` pass one bare context, built once.
* **A deadline per request.** ``Client`` sets :data:`DEADLINE` for the whole of a request; the
  sync network backend below makes every connect, read and write wait at most until then, so
  ``timeout`` bounds the request, not each read (a server dripping a byte a second cannot stretch
  it). ``AsyncClient`` puts a cancel scope around the request instead.
* **No leaked socket.** httpcore2 2.16's ``SyncBackend.connect_unix_socket`` leaves a socket whose
  ``connect()`` failed to the garbage collector (a ``ResourceWarning``, and a descriptor per attempt
  while ``--wait`` polls); :class:`UnixBackend` closes it. httpx2 has no argument for a network
  backend, so :func:`sync_transport` swaps the transport's private ``_pool`` for a pool built
  through httpcore2's public constructor, and fails loudly if that attribute changes.
* **Stale connections.** Idle connections expire after :data:`KEEPALIVE_EXPIRY`, well under the
  server's keep-alive (15 s). When a reused connection still turns out closed, :class:`ReuseTracker`
  and :func:`is_stale_error` let the caller retry once.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import time
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from typing import Any

import httpcore2
import httpx2

from client._errors import ClientError, ConnectError, reason_for

__all__ = [
    "BASE_URL",
    "DEADLINE",
    "KEEPALIVE_EXPIRY",
    "ReuseTracker",
    "UnixBackend",
    "async_transport",
    "is_stale_error",
    "map_errors",
    "sync_transport",
]

BASE_URL = "http://localhost"
KEEPALIVE_EXPIRY = 5.0

DEADLINE: ContextVar[float | None] = ContextVar("uds_client_deadline", default=None)
"""``time.monotonic()`` by which the current request must be done, or None for no deadline."""

_BARE_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _remaining(timeout: float | None) -> float | None:
    """``timeout`` cut to what is left of the request's deadline; TimeoutError once it has passed."""
    deadline = DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request's deadline has passed")
    return left if timeout is None or timeout > left else timeout


class UnixStream(httpcore2.NetworkStream):
    """A connected AF_UNIX socket whose reads and writes respect :data:`DEADLINE`."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(_remaining(timeout))
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore2.ReadTimeout(exc) from exc
        except OSError as exc:
            raise httpcore2.ReadError(exc) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        try:
            while view:
                self._sock.settimeout(_remaining(timeout))
                view = view[self._sock.send(view) :]
        except TimeoutError as exc:
            raise httpcore2.WriteTimeout(exc) from exc
        except OSError as exc:
            raise httpcore2.WriteError(exc) from exc

    def close(self) -> None:
        self._sock.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._sock
        if info == "is_readable":
            # An idle connection is readable when the server closed it (or sent something unasked).
            try:
                return bool(select.select((self._sock,), (), (), 0)[0])
            except (OSError, ValueError):
                return True
        return None


class UnixBackend(httpcore2.SyncBackend):
    """httpcore2's sync backend, with :class:`UnixStream` and a socket closed when connect() fails."""

    def connect_unix_socket(self, path: str, timeout: float | None = None,
                            socket_options: Iterable[Any] | None = None) -> httpcore2.NetworkStream:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            sock.settimeout(_remaining(timeout))
            sock.connect(path)
        except TimeoutError as exc:
            sock.close()
            raise httpcore2.ConnectTimeout(exc) from exc
        except OSError as exc:
            sock.close()
            raise httpcore2.ConnectError(exc) from exc
        return UnixStream(sock)


def _limits(max_connections: int | None) -> httpx2.Limits:
    return httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                         keepalive_expiry=KEEPALIVE_EXPIRY)


def sync_transport(path: str, *, max_connections: int | None = 10) -> httpx2.HTTPTransport:
    """``httpx2.HTTPTransport(uds=path)`` with no CA bundle, :class:`UnixBackend` and short keep-alive."""
    limits = _limits(max_connections)
    transport = httpx2.HTTPTransport(uds=path, verify=_BARE_TLS, trust_env=False, limits=limits)
    if type(getattr(transport, "_pool", None)) is not httpcore2.ConnectionPool:
        raise RuntimeError("httpx2.HTTPTransport no longer keeps its httpcore2.ConnectionPool in _pool; "
                           "update client._transport.sync_transport for this httpx2 version")
    transport._pool = httpcore2.ConnectionPool(
        ssl_context=_BARE_TLS, uds=path, network_backend=UnixBackend(),
        max_connections=limits.max_connections, max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
    )
    return transport


def async_transport(path: str, *, max_connections: int | None = 8) -> httpx2.AsyncHTTPTransport:
    """``httpx2.AsyncHTTPTransport(uds=path)`` with no CA bundle and short keep-alive.

    httpcore2's async backend (anyio) closes a socket whose connect() fails; the request's deadline
    is a cancel scope in ``AsyncClient``.
    """
    return httpx2.AsyncHTTPTransport(uds=path, verify=_BARE_TLS, trust_env=False,
                                     limits=_limits(max_connections))


class ReuseTracker:
    """An httpx2 ``trace`` callback that records whether a request opened a new connection."""

    __slots__ = ("opened",)

    def __init__(self) -> None:
        self.opened = False

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event.startswith("connection.connect_"):
            self.opened = True

    async def atrace(self, event: str, info: dict[str, Any]) -> None:
        """The same, for async transports (httpcore2 wants a coroutine function there)."""
        self(event, info)

    @property
    def reused(self) -> bool:
        return not self.opened


def is_stale_error(exc: BaseException) -> bool:
    """True for the httpx2 errors that a keep-alive connection closed by the server produces."""
    return isinstance(exc, httpx2.RemoteProtocolError | httpx2.ReadError | httpx2.WriteError)


@contextlib.contextmanager
def map_errors(address: str) -> Iterator[None]:
    """Turn httpx2 errors and timeouts into :class:`ConnectError` or :class:`ClientError`, with the cause."""
    try:
        yield
    except (httpx2.TimeoutException, TimeoutError) as exc:
        raise ConnectError(address, "timed out") from exc
    except httpx2.TransportError as exc:
        raise ConnectError(address, reason_for(exc)) from exc
    except httpx2.HTTPError as exc:
        raise ClientError(f"request to {address} failed: {exc}") from exc
