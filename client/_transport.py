"""httpx2's Unix-socket transports, ``HTTPTransport(uds=...)``, set up for the socket, and the
mapping of their errors.

* **No CA bundle**: TLS never runs over the socket, so the transports get one bare context.
* **A deadline per request**: ``Client`` sets :data:`REQUEST` (a :class:`Budget`) for a whole
  request; the network backends below give every connect, read and write only what is left of it,
  so a server dripping a byte at a time cannot stretch ``timeout``.
* **No leaked socket**: httpcore2's ``SyncBackend`` leaves the socket of a failed ``connect()`` to
  the garbage collector; :class:`UnixBackend` closes it.
* **Stale connections**: idle connections expire after :data:`KEEPALIVE_EXPIRY`, under the
  server's keep-alive; a reused one found closed (:func:`is_stale_error`) is retried once, and the
  backends mark the :class:`Budget` of a request that connected (:class:`ReuseTracker`, a
  ``trace`` callback, does it on other transports, at a cost per request).

httpx2 takes no network backend, so :func:`_use_pool` puts one in (see there). Costs measured:
docs/performance.md.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Iterable
from contextvars import ContextVar
from typing import Any

import httpcore2
import httpx2

from client._errors import ClientError, ConnectError, reason_for

__all__ = [
    "BASE_URL",
    "KEEPALIVE_EXPIRY",
    "REQUEST",
    "AsyncUnixBackend",
    "Budget",
    "ReuseTracker",
    "UnixBackend",
    "async_transport",
    "is_stale_error",
    "mapped_error",
    "sync_transport",
]

BASE_URL = "http://localhost"
KEEPALIVE_EXPIRY = 5.0

_BARE_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


class Budget:
    """One request's deadline (``time.monotonic()``), and whether it had to open a connection."""

    __slots__ = ("deadline", "opened")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.opened = False


REQUEST: ContextVar[Budget | None] = ContextVar("uds_client_request", default=None)
"""The :class:`Budget` of the request running in this thread or task, if any."""


def _remaining(timeout: float | None) -> float | None:
    """``timeout`` cut to what is left of the request's deadline; TimeoutError once it has passed."""
    budget = REQUEST.get()
    if budget is None:
        return timeout
    left = budget.deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the request's deadline has passed")
    return left if timeout is None or timeout > left else timeout


class UnixStream(httpcore2.NetworkStream):
    """A connected AF_UNIX socket whose reads and writes respect the request's deadline (:data:`REQUEST`)."""

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
                poller = select.poll()
                poller.register(self._sock, select.POLLIN)
                return bool(poller.poll(0))
            except (OSError, ValueError):
                return True
        return None


class UnixBackend(httpcore2.SyncBackend):
    """httpcore2's sync backend, with :class:`UnixStream` and a socket closed when connect() fails."""

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.NetworkStream:
        budget = REQUEST.get()
        if budget is not None:
            budget.opened = True
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


class AsyncDeadlineStream(httpcore2.AsyncNetworkStream):
    """httpcore2's async stream, each read and write given only what is left of the deadline."""

    def __init__(self, inner: httpcore2.AsyncNetworkStream) -> None:
        self._inner = inner

    # httpcore2's interface passes each step its timeout (hence the noqa).
    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        try:
            left = _remaining(timeout)
        except TimeoutError as exc:
            raise httpcore2.ReadTimeout(exc) from exc
        return await self._inner.read(max_bytes, left)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        try:
            left = _remaining(timeout)
        except TimeoutError as exc:
            raise httpcore2.WriteTimeout(exc) from exc
        await self._inner.write(buffer, left)

    async def aclose(self) -> None:
        await self._inner.aclose()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class AsyncUnixBackend(httpcore2.AnyIOBackend):
    """httpcore2's anyio backend (asyncio or trio), with streams bound by the request's deadline."""

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore2's interface
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        budget = REQUEST.get()
        if budget is not None:
            budget.opened = True
        try:
            left = _remaining(timeout)
        except TimeoutError as exc:
            raise httpcore2.ConnectTimeout(exc) from exc
        stream = await super().connect_unix_socket(path, timeout=left, socket_options=socket_options)
        return AsyncDeadlineStream(stream)


def _use_pool(
    transport: httpx2.HTTPTransport | httpx2.AsyncHTTPTransport,
    pool: httpcore2.ConnectionPool | httpcore2.AsyncConnectionPool,
) -> None:
    """Give ``transport`` the httpcore2 ``pool`` built with our backend, in place of its own.

    The one private hook of this package: ``HTTPTransport`` takes no ``network_backend``, while
    httpcore2's pool does (publicly). tests/client/test_transport.py fails when httpx2 moves the
    attribute, or grows a public way to do this.
    """
    if type(getattr(transport, "_pool", None)) is not type(pool):
        raise RuntimeError(
            f"httpx2's {type(transport).__name__} no longer keeps a {type(pool).__name__} in "
            "_pool; update client._transport for this httpx2 version"
        )
    transport._pool = pool


def _pool_options(path: str, max_connections: int | None) -> dict[str, Any]:
    """What both pools are built with: the socket, no CA bundle, idle connections kept < the server's."""
    return {
        "ssl_context": _BARE_TLS,
        "uds": path,
        "max_connections": max_connections,
        "max_keepalive_connections": max_connections,
        "keepalive_expiry": KEEPALIVE_EXPIRY,
    }


def sync_transport(path: str, *, max_connections: int | None = 10) -> httpx2.HTTPTransport:
    """``httpx2.HTTPTransport(uds=path)`` with no CA bundle, :class:`UnixBackend` and short keep-alive."""
    transport = httpx2.HTTPTransport(uds=path, verify=_BARE_TLS, trust_env=False)
    options = _pool_options(path, max_connections)
    _use_pool(transport, httpcore2.ConnectionPool(network_backend=UnixBackend(), **options))
    return transport


def async_transport(path: str, *, max_connections: int | None = 100) -> httpx2.AsyncHTTPTransport:
    """``httpx2.AsyncHTTPTransport(uds=path)``: no CA bundle, :class:`AsyncUnixBackend`, short keep-alive."""
    transport = httpx2.AsyncHTTPTransport(uds=path, verify=_BARE_TLS, trust_env=False)
    options = _pool_options(path, max_connections)
    _use_pool(transport, httpcore2.AsyncConnectionPool(network_backend=AsyncUnixBackend(), **options))
    return transport


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


def is_stale_error(exc: BaseException) -> bool:
    """True for the httpx2 errors that a keep-alive connection closed by the server produces."""
    return isinstance(exc, httpx2.RemoteProtocolError | httpx2.ReadError | httpx2.WriteError)


def mapped_error(exc: BaseException, address: str) -> ClientError:
    """The library's error for an httpx2 error or a timeout; the caller raises it ``from exc``
    (a function, not a context manager: a bare ``try`` costs nothing until something is raised)."""
    if isinstance(exc, httpx2.TimeoutException | TimeoutError):
        return ConnectError(address, "timed out")
    if isinstance(exc, httpx2.TransportError):
        return ConnectError(address, reason_for(exc))
    return ClientError(f"request to {address} failed: {exc}")
