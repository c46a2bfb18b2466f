"""Event streams against hostile peers on a real socket: one uid cannot take every stream slot."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from app.storage.events import EventHub, StreamsFull
from app.storage.store import MessageStore
from tests.app.test_events import RawStream, _path, stream_refused, streams
from tests.support import NOBODY, python_as_nobody, running_server, short_tmpdir

_OPEN_AS_NOBODY = textwrap.dedent(
    """
    import socket, sys
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(15)
    sock.connect(sys.argv[1])
    sock.sendall(b"GET /v1/events HTTP/1.1\\r\\nhost: localhost\\r\\n\\r\\n")
    head = b""
    while b"\\r\\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    print(head.split(b"\\r\\n", 1)[0].decode())
    """
)


def test_one_uid_cannot_take_every_stream_slot() -> None:
    directory = short_tmpdir()
    directory.chmod(0o755)  # uid 65534 may reach the socket (mode 666)
    with running_server(
        "--store", "memory", "--max-streams", "8", "--socket-mode", "666", tmp=directory
    ) as server:
        path = _path(server)
        # This uid opens streams until it is refused: it gets its share (a quarter), not all 8.
        with streams(path, 2) as mine:
            assert [s.status for s in mine] == [200, 200]
            stream_refused(path)
            # Another uid still gets a stream while this one holds its share.
            other = python_as_nobody("-c", _OPEN_AS_NOBODY, path)
            assert other.returncode == 0, other.stderr
            assert other.stdout.strip() == "HTTP/1.1 200 OK", (NOBODY, other.stdout, server.output)
        assert "event streams" in server.output


def test_the_hub_counts_streams_per_uid_and_in_total() -> None:
    async def main() -> None:
        hub = EventHub(MessageStore(10, 10), capacity=8)
        held = [hub.subscribe(uid) for uid in (1, 1, 2, 2, 3, 3, 4)]
        with pytest.raises(StreamsFull, match="uid 1 holds 2 event streams already"):
            hub.subscribe(1)
        hub.subscribe(None)  # connections without credentials share one slot count
        with pytest.raises(StreamsFull, match="8 event streams are open already"):
            hub.subscribe(5)  # the total cap still holds
        hub.unsubscribe(held[0])
        hub.unsubscribe(held[0])  # twice is harmless
        assert hub.slots.held[1] == 1
        hub.subscribe(1)
        for subscriber in held[1:]:
            hub.unsubscribe(subscriber)
        assert hub.slots.held == {1: 1, None: 1}

    asyncio.run(main())


def test_streams_asking_for_ids_out_of_the_history_cannot_flood_the_log() -> None:
    with running_server("--store", "memory") as server:
        path = _path(server)
        for _ in range(100):
            stream = RawStream(path, "/v1/events?since=999999")
            try:
                assert stream.status == 200
                assert stream.until("reset")[-1][0] == "reset"
            finally:
                stream.close()
        server.stop()
    # Before: one INFO line per stream, 100 lines for 100 requests.
    resets = [line for line in server.output.splitlines() if "Event stream asked for messages" in line]
    assert 1 <= len(resets) <= 2, resets
