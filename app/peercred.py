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
    """HttpToolsProtocol with peer credentials, a per-request deadline and header limits."""

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
        self._in_head = False
        self._begins = 0
        self._head_bytes = 0
        """Bytes of chunks that continued an unfinished head (a lower bound on its size)."""
        self._field_bytes = 0
        """Bytes of the request target and completed header fields (exact)."""
        self._head_count = 0
        self._seen_bytes = False
        self._reject: tuple[int, str, str] | None = None

    # Connection events
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.peer = read_peer(transport.get_extra_info("socket"))
        # A connection that never sends a request is closed after request_timeout.
        self._deadline = self.loop.call_later(self.request_timeout, self._on_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._seen_bytes = True
        begins = self._begins
        super().data_received(data)
        # httptools buffers a header until it ends, so bound the head by the bytes that carried it on.
        # A chunk in which the head began is not counted: it may hold the previous body too.
        if self._in_head and self._begins == begins:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._refuse_head(f"the request head is over {MAX_HEADER_BYTES} bytes")

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.peer is not None:
            self.scope["extensions"] = {PEER_KEY: dict(self.peer)}  # type: ignore[dict-item]
        self._in_head = True
        self._begins += 1
        self._head_bytes = 0
        self._field_bytes = 0
        self._head_count = 0
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._on_deadline)

    def on_url(self, url: bytes) -> None:
        self._field_bytes += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_count += 1
        self._field_bytes += len(name) + len(value) + 4
        if self._head_count > MAX_HEADERS:
            message = f"the request has more than {MAX_HEADERS} header fields"
            self._reject = (431, "headers_too_large", message)
            raise ValueError("too many header fields")
        if self._field_bytes > MAX_HEADER_BYTES:
            self._reject = (431, "headers_too_large", f"the request head is over {MAX_HEADER_BYTES} bytes")
            raise ValueError("request head too large")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._cancel_deadline()
        super().on_message_complete()

    # Errors
    def send_400_response(self, msg: str) -> None:
        """Parse errors (and limits raised from parser callbacks) as the JSON error shape."""
        self._cancel_deadline()
        if self._reject is not None:
            status, error, message = self._reject
        else:
            status, error, message = 400, "bad_request", "the request is not valid HTTP/1.1"
        logger.warning("Rejected a request with %d: %s", status, message)
        if not self.transport.is_closing():
            self.transport.write(error_response(status, error, message))
            self.transport.close()

    def _refuse_head(self, message: str) -> None:
        self._reject = (431, "headers_too_large", message)
        self.send_400_response(message)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if not self._seen_bytes:
            logger.info("Closed a connection that sent nothing for %gs", self.request_timeout)
            self.transport.close()
            return
        cycle = self.cycle
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
