"""The drain, in process: ``PeerCredProtocol.shutdown`` on a real socket pair, no server process.

The case the process tests cannot time: a request that reached the socket after an answer but was
not read yet when the drain starts is still answered (``Connection: close``), not reset.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import socket
import struct
import termios
from typing import Any

from uvicorn.config import Config
from uvicorn.server import ServerState

from app.connection.protocol import PeerCredProtocol
from tests.app.protocol_harness import new_protocol
from tests.support import read_response

HELLO = json.dumps({"text": "Hello from client"}).encode()
POST = b"POST /m HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (len(HELLO), HELLO)


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


async def _until(check: Any, what: str) -> None:
    for _ in range(2000):
        if check():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


def _unread(sock: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0)))[0])


async def _answered_once() -> tuple[PeerCredProtocol, asyncio.Transport, socket.socket, socket.socket]:
    """A protocol on one end of a socket pair that has answered one request from the other end."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    config = Config(_app, http=PeerCredProtocol, lifespan="off")
    config.load()
    protocol = new_protocol(config, ServerState(), {}, loop)
    transport, _ = await loop.connect_accepted_socket(lambda: protocol, ours)
    theirs.setblocking(False)
    await loop.sock_sendall(theirs, POST)
    buffer = bytearray()
    while b"ok" not in buffer:
        buffer += await loop.sock_recv(theirs, 4096)
    await _until(lambda: protocol.cycle is not None and protocol.cycle.response_complete, "the first answer")
    return protocol, transport, ours, theirs


async def _drain_with_unread_request() -> tuple[int, dict[str, str], bytes, bool]:
    protocol, transport, ours, theirs = await _answered_once()
    transport.pause_reading()  # the loop has not read the next request yet when the drain begins
    await asyncio.get_running_loop().sock_sendall(theirs, POST)
    await _until(lambda: _unread(ours) > 0, "the request waiting in the socket")
    protocol.shutdown()
    kept = not transport.is_closing()
    transport.resume_reading()
    theirs.setblocking(True)
    theirs.settimeout(5)
    status, headers, body = await asyncio.to_thread(read_response, theirs)
    closed = await asyncio.to_thread(theirs.recv, 1) == b""
    theirs.close()
    return status, headers, body, kept and closed


def test_a_request_waiting_unread_when_the_drain_starts_is_answered() -> None:
    status, headers, body, kept_then_closed = asyncio.run(_drain_with_unread_request())
    assert (status, headers.get("connection"), body) == (201, "close", b"ok")
    assert kept_then_closed


async def _drain_idle() -> bool:
    protocol, transport, _, theirs = await _answered_once()
    protocol.shutdown()
    closing = transport.is_closing()
    theirs.close()
    return closing


def test_an_idle_kept_alive_connection_is_closed_at_once() -> None:
    """Nothing owed (answered, nothing waiting): closed when the drain starts, as uvicorn does."""
    assert asyncio.run(_drain_idle())
