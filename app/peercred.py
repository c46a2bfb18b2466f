"""uvicorn's httptools protocol, plus peer credentials, request deadlines and header limits.

The protocol is the only code that sees raw connections, so it is where we:

* read ``SO_PEERCRED`` once per accepted Unix-socket connection and hand it to every HTTP scope of
  that connection as ``scope["extensions"]["uds.peer"] = {"pid", "uid", "gid"}`` (absent over TCP);
* cut off clients that do not send a whole request within ``request_timeout`` (408, or a plain
  close for a connection that never sent a byte);
* reject oversized request heads (431) before they can use memory;
* answer parse errors with the project's JSON error shape instead of uvicorn's plain text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
from asyncio import TimerHandle
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

__all__ = ["MAX_HEADERS", "MAX_HEADER_BYTES", "PEER_KEY", "PeerCredProtocol", "error_response", "read_peer"]

PEER_KEY = "uds.peer"
MAX_HEADERS = 100
"""Most header fields in one request (gunicorn's default too)."""
MAX_HEADER_BYTES = 32 * 1024
"""Largest request line plus headers, in bytes (nginx's default large_client_header_buffers)."""

_UCRED = struct.Struct("3i")
_HEAD_TOO_LARGE = (431, "headers_too_large", f"the request head is over {MAX_HEADER_BYTES} bytes")
_TOO_MANY_HEADERS = (431, "headers_too_large", f"the request has more than {MAX_HEADERS} header fields")
logger = logging.getLogger("app.connections")


def read_peer(sock: socket.socket | None) -> dict[str, int] | None:
    """The connecting process's ``{"pid", "uid", "gid"}`` for a Unix socket, else None."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return {"pid": pid, "uid": uid, "gid": gid}


def error_response(status: int, error: str, message: str) -> bytes:
    """A whole ``Connection: close`` HTTP response carrying the shared JSON error body."""
    body = json.dumps({"error": error, "message": message, "status": status}).encode()
    return b"".join(
        (
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: ",
            str(len(body)).encode(),
            b"\r\nconnection: close\r\n\r\n",
            body,
        )
    )


class PeerCredProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with peer credentials, a per-request deadline and header limits.

    Per-request cost is kept near zero: the deadline is one timer per connection that is re-armed
    lazily when it fires (not a timer per request), and the head size is summed only when the head
    arrived in a chunk larger than the limit or across chunks.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.peer: dict[str, int] | None = None
        self.request_timeout: float = getattr(config, "request_timeout", 30.0)
        self._deadline: TimerHandle | None = None
        self._waiting_since: float | None = None
        """Loop time since which the client owes us a complete request (None: it owes nothing)."""
        self._in_head = False
        self._begins = 0
        self._chunk_bytes = 0
        self._head_bytes = 0
        """Bytes of chunks that continued an unfinished head (a lower bound on its size)."""
        self._reject: tuple[int, str, str] | None = None

    # Connection events
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.peer = read_peer(transport.get_extra_info("socket"))
        # A connection that never sends a request is closed after request_timeout too.
        self._waiting_since = self.loop.time()
        self._deadline = self.loop.call_later(self.request_timeout, self._on_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting_since = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._chunk_bytes = len(data)
        begins = self._begins
        super().data_received(data)
        # httptools buffers a header until it ends, so bound the head by the chunks that carry it on.
        # The chunk in which the head began is not counted here: it may hold the previous body too.
        if self._in_head and self._begins == begins:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._reject = _HEAD_TOO_LARGE
                self.send_400_response("")

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.peer is not None:
            self.scope["extensions"] = {PEER_KEY: dict(self.peer)}  # type: ignore[dict-item]
        self._in_head = True
        self._begins += 1
        self._head_bytes = 0
        if self._waiting_since is None:
            self._waiting_since = self.loop.time()
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._on_deadline)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if len(self.headers) > MAX_HEADERS:
            self._reject = _TOO_MANY_HEADERS
            raise ValueError("too many header fields")  # httptools turns it into a parser error
        # A head that fit in one small chunk is small; only a big or split one is measured.
        split_or_big = self._head_bytes or self._chunk_bytes > MAX_HEADER_BYTES
        if split_or_big and self._head_size() > MAX_HEADER_BYTES:
            self._reject = _HEAD_TOO_LARGE
            raise ValueError("request head too large")
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._waiting_since = None
        super().on_message_complete()

    # Errors
    def send_400_response(self, msg: str) -> None:
        """Parse errors (and limits raised from parser callbacks) as the JSON error shape."""
        self._waiting_since = None
        if self._reject is not None:
            status, error, message = self._reject
        else:
            status, error, message = 400, "bad_request", "the request is not valid HTTP/1.1"
        logger.warning("Rejected a request with %d: %s", status, message)
        if not self.transport.is_closing():
            self.transport.write(error_response(status, error, message))
            self.transport.close()

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    def _on_deadline(self) -> None:
        self._deadline = None
        since = self._waiting_since
        if since is None or self.transport.is_closing():
            return  # idle between requests: uvicorn's keep-alive timeout takes over
        remaining = since + self.request_timeout - self.loop.time()
        if remaining > 0:
            self._deadline = self.loop.call_later(remaining, self._on_deadline)
            return
        self._waiting_since = None
        cycle = self.cycle
        if not self._in_head and (cycle is None or cycle.response_complete):
            logger.info("Closed a connection that sent no request for %gs", self.request_timeout)
            self.transport.close()
            return
        if not self._in_head and cycle is not None:
            if cycle.response_started:
                # The application already answered (say, 413 before reading); only the body is late.
                self.transport.close()
                return
            # The application is waiting for the body: tell it the client is gone, answer for it.
            cycle.disconnected = True
            cycle.message_event.set()
        logger.warning("Request not complete after %gs: answered 408 and closed the connection",
                       self.request_timeout)
        self.transport.write(
            error_response(408, "request_timeout",
                           f"the request was not complete within {self.request_timeout:g}s; send it faster")
        )
        self.transport.close()
