"""Transports to the server's Unix socket, and the one place lower-layer errors become ours.

* :class:`UnixConnectionPool` is what ``Client`` sends through: persistent ``http.client``
  connections over AF_UNIX. httpx's own sync stack (httpx, httpcore, h11) spends ~170 us of Python
  per request, more than the server does; the standard library's parser keeps round trips within a
  few percent of bare ``http.client``. It raises httpx's exception types, so the mapping below
  serves every transport.
* :class:`UnixAsyncTransport` (httpx/httpcore) backs ``AsyncClient``. It builds its pool without
  a TLS context: ``httpx.AsyncHTTPTransport`` would load certifi's CA bundle (~25 ms) though TLS
  never runs over the socket.
* Idle connections expire after ``KEEPALIVE_EXPIRY`` seconds, well under the server's keep-alive
  (15 s), and an idle connection the server has closed is dropped before reuse, so the stale
  pooled connection race (httpx#2487) is rare. When it still happens, the pool (or
  :class:`ReuseTracker` for any httpx client) tells the caller the failed request went out on a
  reused connection, and the caller retries it once.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from email.message import Message as _Headers
from typing import Any

import httpcore
import httpx

from client._address import to_url
from client._errors import ClientError, ConnectError, reason_for

__all__ = [
    "BASE_URL",
    "KEEPALIVE_EXPIRY",
    "Reply",
    "ReuseTracker",
    "UnixAsyncTransport",
    "UnixConnectionPool",
    "is_stale_connection_error",
    "map_errors",
]

BASE_URL = "http://localhost"
KEEPALIVE_EXPIRY = 5.0
_CONNECT_EVENT = "connection.connect_unix_socket.started"


class Reply:
    """A whole response read from the pool: what ``_client`` needs of an ``httpx.Response``."""

    __slots__ = ("_headers", "content", "reason_phrase", "status_code")

    def __init__(self, status_code: int, reason_phrase: str, headers: _Headers, content: bytes) -> None:
        self.status_code = status_code
        self.reason_phrase = reason_phrase
        self._headers = headers
        self.content = content

    @property
    def headers(self) -> dict[str, str]:
        return {name.lower(): value for name, value in self._headers.items()}

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


class _UnixHTTPConnection(http.client.HTTPConnection):
    """``http.client`` over AF_UNIX; a socket whose ``connect()`` fails is closed at once."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path
        self.idle_since = 0.0

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self._path)
        except TimeoutError as exc:
            sock.close()
            raise httpx.ConnectTimeout(f"timed out connecting to {self._path}") from exc
        except OSError as exc:
            sock.close()
            raise httpx.ConnectError(str(exc)) from exc
        self.sock = sock

    def closed_by_peer(self) -> bool:
        """True when the idle socket is readable: the server closed it (or sent junk)."""
        sock = self.sock
        if sock is None:
            return True
        try:
            readable, _, _ = select.select((sock,), (), (), 0)
        except (OSError, ValueError):
            return True
        return bool(readable)


class UnixConnectionPool:
    """Thread-safe pool of persistent HTTP/1.1 connections to the socket at ``path``."""

    def __init__(self, path: str, *, timeout: float, max_idle: int = 10,
                 keepalive_expiry: float = KEEPALIVE_EXPIRY) -> None:
        self.path = path
        self.timeout = timeout
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self._idle: list[_UnixHTTPConnection] = []
        self._lock = threading.Lock()

    def _checkout(self, trace: Callable[[str, dict[str, Any]], None] | None) -> _UnixHTTPConnection:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if now - conn.idle_since < self.keepalive_expiry and not conn.closed_by_peer():
                    return conn
                conn.close()
        if trace is not None:
            trace(_CONNECT_EVENT, {"path": self.path})
        conn = _UnixHTTPConnection(self.path, self.timeout)
        conn.connect()
        return conn

    def _checkin(self, conn: _UnixHTTPConnection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def request(self, method: str, target: str, body: bytes | None, headers: Mapping[str, str],
                trace: Callable[[str, dict[str, Any]], None] | None = None) -> Reply:
        """Send one request and read the whole response; errors are raised as httpx exceptions."""
        conn = self._checkout(trace)
        try:
            conn.request(method, target, body, headers)
            response = conn.getresponse()
            content = response.read()
        except BaseException as exc:
            conn.close()
            _raise_as_httpx(exc)
            raise
        if response.will_close:
            conn.close()
        else:
            self._checkin(conn)
        return Reply(response.status, response.reason, response.headers, content)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _raise_as_httpx(exc: BaseException) -> None:
    """Re-raise a socket or ``http.client`` error as the httpx exception for it."""
    if isinstance(exc, httpx.TransportError):
        return
    if isinstance(exc, TimeoutError):
        raise httpx.ReadTimeout(f"timed out: {exc}") from exc
    if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError):
        raise httpx.RemoteProtocolError(f"server closed the connection: {exc}") from exc
    if isinstance(exc, http.client.HTTPException):
        raise httpx.RemoteProtocolError(f"bad response: {exc!r}") from exc
    if isinstance(exc, OSError):
        raise httpx.ReadError(str(exc)) from exc


class UnixAsyncTransport(httpx.AsyncHTTPTransport):
    """The asyncio flavour of :class:`UnixTransport` (anyio's connect closes failed sockets)."""

    def __init__(self, path: str, *, max_connections: int | None = 100) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=None, max_connections=max_connections,
            max_keepalive_connections=max_connections, keepalive_expiry=KEEPALIVE_EXPIRY, uds=path,
        )


class ReuseTracker:
    """A ``trace`` callback that records whether a request opened a new connection."""

    __slots__ = ("opened",)

    def __init__(self) -> None:
        self.opened = False

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        if event.startswith("connection.connect_"):
            self.opened = True

    async def atrace(self, event: str, info: dict[str, Any]) -> None:
        """The same, for async transports (httpcore wants a coroutine function there)."""
        self(event, info)

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
