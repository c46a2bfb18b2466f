"""A peer that resets its connection right after an answer costs nothing once it has gone.

uvicorn cancels the keep-alive timer only when a connection ends cleanly; after a reset
(``ECONNRESET``: the client closed with the answer unread) the timer held the protocol, its
parser, scope and answer for ``--keepalive-timeout`` seconds. A flood of such hang-ups then piled
up hundreds of MiB.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import weakref

import psutil

from app.connection.protocol import PeerCredProtocol
from tests.app.test_peercred_drain import POST, _answered_once, _unread, _until
from tests.support import running_server


async def _reset(protocol: PeerCredProtocol, transport: asyncio.Transport, theirs: socket.socket) -> bool:
    """Have ``protocol`` answer a second request, reset with that answer unread; whether the
    keep-alive timer is gone once the server saw the reset."""
    first = protocol.cycle
    await asyncio.get_running_loop().sock_sendall(theirs, POST)
    await _until(lambda: protocol.cycle is not first and protocol.cycle.response_complete, "a second answer")
    await _until(lambda: _unread(theirs) > 0, "the second answer to arrive")
    assert protocol.timeout_keep_alive_task is not None, "kept alive after the answer"
    theirs.close()  # with the answer unread: the server's side sees a reset, not an end of file
    await _until(lambda: protocol.parser is None, "connection_lost")
    return protocol.timeout_keep_alive_task is None


async def _reset_after_answer() -> tuple[bool, bool]:
    protocol, transport, _, theirs = await _answered_once()
    cancelled = await _reset(protocol, transport, theirs)
    ref = weakref.ref(protocol)
    del protocol, transport
    await asyncio.sleep(0)
    gc.collect()
    return cancelled, ref() is None


def test_a_reset_connection_leaves_no_keep_alive_timer() -> None:
    cancelled, freed = asyncio.run(_reset_after_answer())
    assert cancelled, "the keep-alive timer outlives a reset connection"
    assert freed, "a reset connection's protocol is still referenced"


RESET_CONNECTIONS = 10000


def _hang_up_after_answer(path: str, count: int) -> None:
    request = b"GET /v1/nothere HTTP/1.1\r\nHost: localhost\r\n\r\n"
    for _ in range(count):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            conn.sendall(request)
            conn.recv(16)  # the answer's first bytes; the rest is left unread, so close() resets


def test_a_flood_of_reset_connections_does_not_grow_the_server() -> None:
    """Real server: connections that reset after their answer; RSS measured before and after."""
    with running_server("--store", "memory") as server:
        assert server.socket_path is not None
        process = psutil.Process(server.proc.pid)
        _hang_up_after_answer(server.socket_path, 500)  # warm up allocators and caches
        before = process.memory_info().rss
        _hang_up_after_answer(server.socket_path, RESET_CONNECTIONS)
        grown = process.memory_info().rss - before
    # Held by the keep-alive timer they cost tens of MiB; freed at once, allocator noise only.
    grew = f"RSS grew {grown / 2**20:.1f} MiB over {RESET_CONNECTIONS} reset connections"
    assert grown < 4 * 1024 * 1024, grew
