"""httpx2's ``HTTPTransport(uds=...)`` set up for the socket: no CA bundle, a deadline per whole
request (:data:`REQUEST`), no socket leaked by a failed connect, idle connections dropped before
the server's; and the mapping of their errors (docs/internals.md, "Transport")."""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections.abc import Iterable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import httpcore2
import httpx2

from client._errors import ClientError, ConnectError

KEEPALIVE_EXPIRY = 5.0

_BARE_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
_Transport = TypeVar("_Transport", httpx2.HTTPTransport, httpx2.AsyncHTTPTransport)


@dataclass(slots=True)
class Budget:
    """A request's deadline and whether it opened a connection (on a caller's transport, a trace)."""

    deadline: float
    opened: bool = False

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        self.opened = self.opened or event.startswith("connection.connect_")

    async def atrace(self, event: str, info: dict[str, Any]) -> None:  # async transports want a coroutine
        self(event, info)


REQUEST: ContextVar[Budget | None] = ContextVar("uds_client_request", default=None)
"""The :class:`Budget` of the request running in this thread or task, if any."""


def _remaining(timeout: float | None, late: type[Exception]) -> float | None:
    """``timeout`` cut to what is left of the request's deadline; ``late`` once it has passed.
    A connect (``late`` is ConnectTimeout) marks the request as having opened a connection."""
    budget = REQUEST.get()
    if budget is None:
        return timeout
    if late is httpcore2.ConnectTimeout:
        budget.opened = True
    left = budget.deadline - time.monotonic()
    if left <= 0:
        raise late("the request's deadline has passed")
    return left if timeout is None or timeout > left else timeout


class UnixStream(httpcore2.NetworkStream):
    """A connected AF_UNIX socket whose reads and writes respect the request's deadline."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            self._sock.settimeout(_remaining(timeout, httpcore2.ReadTimeout))
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore2.ReadTimeout(exc) from exc
        except OSError as exc:
            raise httpcore2.ReadError(exc) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        try:
            self._sock.settimeout(_remaining(timeout, httpcore2.WriteTimeout))
            self._sock.sendall(buffer)  # the timeout bounds the whole sendall
        except TimeoutError as exc:
            raise httpcore2.WriteTimeout(exc) from exc
        except OSError as exc:
            raise httpcore2.WriteError(exc) from exc

    def close(self) -> None:
        self._sock.close()

    def get_extra_info(self, info: str) -> Any:
        if info == "socket":
            return self._sock
        if info != "is_readable":
            return None
        # An idle connection is readable when the server closed it (or sent something unasked).
        try:
            poller = select.poll()
            poller.register(self._sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True


class UnixBackend(httpcore2.SyncBackend):
    """httpcore2's sync backend, with :class:`UnixStream` and a socket closed when connect() fails."""

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore2.NetworkStream:
        left = _remaining(timeout, httpcore2.ConnectTimeout)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:  # no socket_options: uds_transport's pool is built without them
            sock.settimeout(left)
            sock.connect(path)
        except OSError as exc:
            sock.close()
            failed = httpcore2.ConnectTimeout if isinstance(exc, TimeoutError) else httpcore2.ConnectError
            raise failed(exc) from exc
        return UnixStream(sock)


class AsyncDeadlineStream(httpcore2.AsyncNetworkStream):
    """httpcore2's async stream, each read and write given only what is left of the deadline."""

    def __init__(self, inner: httpcore2.AsyncNetworkStream) -> None:
        self._inner = inner

    # httpcore2's interface passes each step its timeout (hence the noqa).
    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        return await self._inner.read(max_bytes, _remaining(timeout, httpcore2.ReadTimeout))

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        await self._inner.write(buffer, _remaining(timeout, httpcore2.WriteTimeout))

    async def aclose(self) -> None:
        await self._inner.aclose()

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class AsyncUnixBackend(httpcore2.AnyIOBackend):
    """httpcore2's anyio backend (asyncio or trio), with streams bound by the request's deadline."""

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore2.AsyncNetworkStream:
        stream = await super().connect_unix_socket(
            path, _remaining(timeout, httpcore2.ConnectTimeout), socket_options
        )
        return AsyncDeadlineStream(stream)


def uds_transport(kind: type[_Transport], path: str, max_connections: int | None) -> _Transport:
    """``kind(uds=path)`` on our backend: the package's one private hook (docs/internals.md, "Transport")."""
    transport = kind(uds=path, verify=_BARE_TLS, trust_env=False)
    sync = isinstance(transport, httpx2.HTTPTransport)
    pool = httpcore2.ConnectionPool if sync else httpcore2.AsyncConnectionPool
    if type(getattr(transport, "_pool", None)) is not pool:
        raise RuntimeError(
            f"httpx2's {kind.__name__} no longer keeps a {pool.__name__} in _pool; "
            "update client._transport for this httpx2 version"
        )
    # No CA bundle; idle connections kept less long than the server keeps them.
    transport._pool = pool(
        network_backend=UnixBackend() if sync else AsyncUnixBackend(),
        ssl_context=_BARE_TLS,
        uds=path,
        keepalive_expiry=KEEPALIVE_EXPIRY,
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
    )
    return transport


def mapped_error(exc: BaseException, address: str) -> ClientError:
    """The library's error for an httpx2 error or a timeout; the caller raises it ``from exc``."""
    if isinstance(exc, httpx2.TimeoutException | TimeoutError):
        return ConnectError(address, "timed out")
    if isinstance(exc, httpx2.TransportError):
        return ConnectError.caused_by(address, exc)
    return ClientError(f"request to {address} failed: {exc}")
