"""The library's exceptions. Lower-layer (httpx, socket) errors are mapped into these once.

The CLI turns them into one line on stderr and an exit code (``exit_code`` on each class).
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "ClientError", "ConnectError", "UsageError"]


class ClientError(Exception):
    """Base class of everything the client library raises."""

    exit_code = 1


class UsageError(ClientError):
    """The caller asked for something that cannot work (bad address, bad argument)."""

    exit_code = 2


class ConnectError(ClientError):
    """The socket could not be reached: missing, refused, permission denied, or timed out.

    ``address`` is the socket URL (``unix:///csi/csi.sock``); ``reason`` a short phrase such as
    ``"no such file"``, ``"connection refused"``, ``"permission denied"`` or ``"timed out"``.
    """

    exit_code = 3

    def __init__(self, address: str, reason: str, hint: str | None = None) -> None:
        self.address = address
        self.reason = reason
        self.hint = hint if hint is not None else _HINTS.get(reason, "Is the server running?")
        super().__init__(f"cannot connect to {address} ({reason}). {self.hint}")


_HINTS = {
    "no such file": "Is the server running?",
    "connection refused": "The socket exists but nothing is serving it: is the server running?",
    "permission denied": "Check that your user is in the socket's group (ls -l on the socket).",
    "timed out": "The server did not answer in time: is it overloaded or stuck? Try --timeout.",
}


class APIError(ClientError):
    """The server answered with an error status; ``status`` and the server's ``message`` are kept."""

    exit_code = 1

    def __init__(self, status: int, message: str, *, error: str | None = None, body: Any = None) -> None:
        self.status = status
        self.message = message
        self.error = error
        self.body = body
        super().__init__(f"server answered {status}: {message}")
