"""Transports to the server's Unix socket, each mapping its lower-layer errors once.

* :func:`sync_transport` and :func:`async_transport` build the ``httpx.HTTPTransport(uds=...)`` /
  ``httpx.AsyncHTTPTransport(uds=...)`` behind ``Client`` and ``AsyncClient``, with a bare TLS
  context built once: httpx would otherwise load certifi's CA bundle (~25 ms) per transport, though
  TLS never runs over the socket. :func:`map_httpx_errors` maps httpx errors for them and for any
  caller-supplied httpx client. httpx is imported only when these are used.
* :class:`UnixConnectionPool` is the ``Client(backend="http.client")`` path: persistent
  ``http.client`` connections over AF_UNIX. httpx's sync stack (httpx, httpcore, h11) spends
  ~170 us of Python per request, more than the server does, and ~65 ms importing; the standard
  library keeps round trips within a few percent of bare ``http.client`` and ``uds-client`` quick
  to start. Socket and ``http.client`` errors become :class:`ConnectError` here.
* Idle connections expire after ``KEEPALIVE_EXPIRY`` seconds, well under the server's keep-alive
  (15 s), and an idle connection the server has closed is dropped before reuse, so the stale pooled
  connection race (httpx#2487) is rare. When it still happens the failure is flagged as stale
  (:class:`StaleConnection`, or :class:`ReuseTracker` for httpx) and the caller retries once.
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from email.message import Message as _Headers
from typing import TYPE_CHECKING, Any

from client._address import to_url
from client._errors import ClientError, ConnectError, reason_for

if TYPE_CHECKING:
    import ssl

    import httpx

__all__ = [
    "BASE_URL",
    "KEEPALIVE_EXPIRY",
    "Reply",
    "ReuseTracker",
    "StaleConnection",
    "UnixConnectionPool",
    "async_transport",
    "is_stale_httpx_error",
    "map_httpx_errors",
    "sync_transport",
]

BASE_URL = "http://localhost"
KEEPALIVE_EXPIRY = 5.0


class StaleConnection(ConnectError):
    """A reused keep-alive connection turned out closed by the server; retrying is safe."""


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
        except BaseException:
            sock.close()
            raise
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


_STALE_ERRORS = (
    ConnectionResetError, BrokenPipeError, ConnectionAbortedError, http.client.RemoteDisconnected,
)


class UnixConnectionPool:
    """Thread-safe pool of persistent HTTP/1.1 connections to the socket at ``path``."""

    def __init__(self, path: str, *, timeout: float, max_idle: int = 10,
                 keepalive_expiry: float = KEEPALIVE_EXPIRY) -> None:
        self.path = path
        self.address = to_url(path)
        self.timeout = timeout
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self._idle: list[_UnixHTTPConnection] = []
        self._lock = threading.Lock()

    def _reuse(self) -> _UnixHTTPConnection | None:
        now = time.monotonic()
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if now - conn.idle_since < self.keepalive_expiry and not conn.closed_by_peer():
                    return conn
                conn.close()
        return None

    def _checkin(self, conn: _UnixHTTPConnection) -> None:
        conn.idle_since = time.monotonic()
        with self._lock:
            if len(self._idle) < self.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def request(self, method: str, target: str, body: bytes | None, headers: Mapping[str, str], *,
                fresh: bool = False) -> Reply:
        """Send one request and read the whole response.

        Raises :class:`StaleConnection` when a reused connection was closed under it (the caller
        may retry with ``fresh=True``), :class:`ConnectError` for every other socket failure.
        """
        conn = None if fresh else self._reuse()
        reused = conn is not None
        if conn is None:
            conn = _UnixHTTPConnection(self.path, self.timeout)
        try:
            conn.request(method, target, body, headers)
            response = conn.getresponse()
            content = response.read()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            error = StaleConnection if reused and isinstance(exc, _STALE_ERRORS) else ConnectError
            raise error(self.address, reason_for(exc)) from exc
        except BaseException:
            conn.close()
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


# --- httpx (AsyncClient, caller-supplied clients); imported only when used -----------------------

_ssl_context: ssl.SSLContext | None = None


def _bare_ssl_context() -> ssl.SSLContext:
    """A TLS context without a CA bundle, built once; it is never used over a Unix socket."""
    global _ssl_context
    if _ssl_context is None:
        import ssl

        _ssl_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    return _ssl_context


def _closing_unix_backend() -> Any:
    """httpcore's sync network backend, except that a socket whose ``connect()`` fails is closed.

    httpcore 1.0's ``SyncBackend.connect_unix_socket`` leaks that socket (a ResourceWarning, and
    a file descriptor per failed attempt while ``--wait`` polls for a server).
    """
    import httpcore
    from httpcore._backends.sync import SyncStream

    class ClosingUnixBackend(httpcore.SyncBackend):
        def connect_unix_socket(self, path: str, timeout: float | None = None,
                                socket_options: Any = None) -> httpcore.NetworkStream:
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

    return ClosingUnixBackend()


def sync_transport(path: str, *, max_connections: int | None = 10) -> httpx.HTTPTransport:
    """``httpx.HTTPTransport(uds=path)`` with no CA bundle and idle connections kept < the server's."""
    import httpx

    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                          keepalive_expiry=KEEPALIVE_EXPIRY)
    transport = httpx.HTTPTransport(uds=path, verify=_bare_ssl_context(), trust_env=False, limits=limits)
    transport._pool._network_backend = _closing_unix_backend()
    return transport


def async_transport(path: str, *, max_connections: int | None = 8) -> httpx.AsyncHTTPTransport:
    """A pooled httpx transport to the socket at ``path``, without a CA bundle or proxy lookup."""
    import httpx

    limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections,
                          keepalive_expiry=KEEPALIVE_EXPIRY)
    return httpx.AsyncHTTPTransport(uds=path, verify=_bare_ssl_context(), trust_env=False, limits=limits)


class ReuseTracker:
    """An httpx ``trace`` callback that records whether a request opened a new connection."""

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


def is_stale_httpx_error(exc: BaseException) -> bool:
    """True for the httpx errors a keep-alive connection closed by the server produces."""
    import httpx

    return isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError)


@contextlib.contextmanager
def map_httpx_errors(path: str) -> Iterator[None]:
    """Turn httpx errors into :class:`ConnectError` (or :class:`ClientError`), keeping the cause."""
    import httpx

    try:
        yield
    except httpx.TimeoutException as exc:
        raise ConnectError(to_url(path), "timed out") from exc
    except httpx.TransportError as exc:
        raise ConnectError(to_url(path), reason_for(exc)) from exc
    except httpx.HTTPError as exc:
        raise ClientError(f"request to {to_url(path)} failed: {exc}") from exc


