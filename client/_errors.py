"""The library's exceptions, each with the CLI's ``exit_code``; lower-layer (httpx2, socket)
errors are mapped into these once (docs/internals.md, "Client")."""

from __future__ import annotations

import errno

# Not typing.TYPE_CHECKING: the lean health probe imports this module, and not typing.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class ClientError(Exception):
    """Base class of everything the client library raises."""

    exit_code = 1


class UsageError(ClientError):
    """The caller asked for something that cannot work (bad address, bad argument)."""

    exit_code = 2


class ConnectError(ClientError):
    """The socket could not be reached: ``address`` its URL, ``reason`` a short phrase such as
    ``"no such file"``, ``"connection refused"``, ``"permission denied"`` or ``"timed out"``."""

    exit_code = 3

    def __init__(self, address: str, reason: str, hint: str | None = None) -> None:
        self.address = address
        self.reason = reason
        self.hint = hint if hint is not None else _HINTS.get(reason, "Is the server running?")
        super().__init__(f"cannot connect to {address} ({reason}). {self.hint}")

    @classmethod
    def caused_by(cls, address: str, exc: BaseException) -> ConnectError:
        return cls(address, reason_for(exc))


_HINTS = {
    "connection refused": "The socket exists but nothing is serving it: is the server running?",
    "permission denied": "Check that your user is in the socket's group (ls -l on the socket).",
    "timed out": "The server did not answer in time: is it overloaded or stuck? Try --timeout.",
}


class WaitTimeout(ConnectError):
    """``--wait`` gave up: the socket did not appear or accept before the deadline."""

    def __init__(self, address: str, waited: float, last_reason: str) -> None:
        super().__init__(address, last_reason)
        self.waited = waited
        message = f"gave up waiting for {address} after {waited:.1f}s (last error: {last_reason})."
        Exception.__init__(self, f"{message} {self.hint}")


_ERRNO_REASONS = {
    errno.ENOENT: "no such file",
    errno.ENOTDIR: "no such file",
    errno.ECONNREFUSED: "connection refused",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ETIMEDOUT: "timed out",
    errno.ENOTSOCK: "not a socket",
    errno.ECONNRESET: "connection reset by the server",
    errno.EPIPE: "connection closed by the server",
    errno.EAGAIN: "the server's listen backlog is full",
}
_TEXT_REASONS = ("no such file", "connection refused", "permission denied", "timed out")


def reason_for(exc: BaseException) -> str:
    """A short phrase for a connection failure, read from the first ``OSError`` in the cause chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TimeoutError):
            return "timed out"
        if isinstance(current, OSError) and current.errno in _ERRNO_REASONS:
            return _ERRNO_REASONS[current.errno]
        if isinstance(current, ConnectionError) and current.errno is None:
            return "connection closed by the server"
        current = current.__cause__ or current.__context__
    text = str(exc).lower()
    for reason in _TEXT_REASONS:
        if reason in text:
            return reason
    if "disconnected" in text:
        return "connection closed by the server"
    return str(exc) or type(exc).__name__


class APIError(ClientError):
    """The server answered with an error status; ``status`` and the server's ``message`` are kept."""

    def __init__(self, status: int, message: str, *, error: str | None = None, body: Any = None) -> None:
        self.status = status
        self.message = message
        self.error = error
        self.body = body
        super().__init__(f"server answered {status}: {message}")
