"""``GET /v1/events`` over a real socket: curl sees a POST, replay from an id, reset, the stream cap,
SIGTERM with open streams, and readers that never read (memory bound and the final event)."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import orjson
import psutil

from tests.app.conftest import ASGIClient, assert_error
from tests.support import (
    ServerProcess,
    read_head,
    read_response,
    require_tool,
    response_status,
    running_server,
    wait_until,
)

SSE = tuple[str, str, str | None]
"""A decoded event: (event type, data, last event id)."""
EVENTS = httpx2.Request("GET", "http://localhost/v1/events")


class RawStream:
    """``GET /v1/events`` on a raw socket: the head is read at once, events as they are asked for."""

    def __init__(self, path: str, target: str = "/v1/events", headers: dict[str, str] | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(path)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nhost: localhost\r\n{extra}\r\n".encode())
        self.buffer = bytearray()
        found = read_head(self.sock, self.buffer)
        assert found is not None, "the server closed the stream before its head"
        self.head, self.headers = found
        self.status = response_status(self.head)
        # The chunks, read from the socket as the events are asked for, parsed by httpx2.
        body = httpx2.Response(
            200, headers={"content-type": "text/event-stream"}, content=self._chunks(), request=EVENTS
        )
        self.events = iter(httpx2.EventSource(body, max_event_size=1 << 24))

    def _chunk(self) -> bytes | None:
        """The next chunk of the chunked body; b"" at its end, None if the connection closes first."""
        while b"\r\n" not in self.buffer:
            if not self._fill():
                return None
        line, _, _ = bytes(self.buffer).partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        need = len(line) + 2 + size + 2
        while len(self.buffer) < need:
            if not self._fill():
                return None
        data = bytes(self.buffer[len(line) + 2 : len(line) + 2 + size])
        del self.buffer[:need]
        return data

    def _chunks(self) -> Iterator[bytes]:
        while chunk := self._chunk():
            yield chunk

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def next(self) -> SSE | None:
        """The next event, or None once the stream has ended (or the connection closed)."""
        for sse in self.events:
            if sse.data:  # not the opening ``retry:``
                return sse.event, sse.data, sse.id or None
        return None

    def until(self, event: str) -> list[SSE]:
        """Every event up to and including the first of type ``event``."""
        seen: list[SSE] = []
        while True:
            got = self.next()
            assert got is not None, f"the stream ended before event {event!r}; it sent {seen}"
            seen.append(got)
            if got[0] == event:
                return seen

    def messages(self, count: int) -> list[int]:
        """The ids of the next ``count`` message events (any other event fails the test)."""
        ids: list[int] = []
        while len(ids) < count:
            got = self.next()
            assert got is not None, f"the stream ended after {ids}"
            assert got[0] == "message", f"expected a message, got {got} after {ids}"
            ids.append(orjson.loads(got[1])["id"])
        return ids

    def close(self) -> None:
        self.sock.close()


@contextlib.contextmanager
def streams(path: str, count: int, **kwargs: object) -> Iterator[list[RawStream]]:
    opened: list[RawStream] = []
    try:
        for _ in range(count):
            opened.append(RawStream(path, **kwargs))  # type: ignore[arg-type]
        yield opened
    finally:
        for stream in opened:
            stream.close()


class Poster:
    """POSTs over one keep-alive connection (raw HTTP/1.1), returning each stored message's id."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(path)
        self.buffer = bytearray()

    def post(self, text: str) -> int:
        body = orjson.dumps({"text": text})
        self.sock.sendall(
            b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        status, _, answer = read_response(self.sock, self.buffer)
        assert status == 201, answer
        message_id: int = orjson.loads(answer)["id"]
        return message_id

    def close(self) -> None:
        self.sock.close()


def _path(server: ServerProcess) -> str:
    assert server.socket_path is not None
    return server.socket_path


def test_curl_sees_a_post() -> None:
    curl = require_tool("curl")
    with running_server("--store", "memory") as server:
        path = _path(server)
        with subprocess.Popen(
            [curl, "-sN", "--unix-socket", path, "http://localhost/v1/events"],
            stdout=subprocess.PIPE,
        ) as proc:
            assert proc.stdout is not None
            try:
                assert proc.stdout.readline() == b"retry: 1000\n"  # the stream is open
                poster = Poster(path)
                message_id = poster.post("seen by curl")
                poster.close()
                lines = [proc.stdout.readline() for _ in range(4)]
            finally:
                proc.kill()
        assert lines[1] == b"event: message\n", lines
        assert lines[2].startswith(b"data: ")
        assert orjson.loads(lines[2][6:])["text"] == "seen by curl"
        assert lines[3] == f"id: {message_id}\n".encode()


def test_replay_from_an_id_then_live_without_gap_or_repeat() -> None:
    with running_server("--store", "memory") as server:
        path = _path(server)
        poster = Poster(path)
        first = [poster.post(f"m{i}") for i in range(5)]
        with (
            streams(path, 1, headers={"last-event-id": str(first[1])}) as (by_header,),
            streams(path, 1, target=f"/v1/events?since={first[3]}") as (by_query,),
        ):
            later = [poster.post(f"n{i}") for i in range(3)]
            assert by_header.messages(6) == first[2:] + later
            assert by_query.messages(4) == first[4:] + later
        # The header wins over ?since= (a browser reconnects with the same URL and a newer id).
        with streams(path, 1, target="/v1/events?since=0", headers={"last-event-id": str(later[-1])}) as (s,):
            newest = poster.post("after")
            assert s.messages(1) == [newest]
        poster.close()


def test_an_id_older_than_the_history_gets_reset_then_the_oldest() -> None:
    with running_server("--store", "memory", "--history-size", "5") as server:
        path = _path(server)
        poster = Poster(path)
        ids = [poster.post(f"m{i}") for i in range(9)]
        with streams(path, 1, target="/v1/events?since=1") as (stream,):
            reset = stream.next()
            assert reset is not None
            assert reset[0] == "reset", reset
            assert orjson.loads(reset[1])["oldest"] == ids[-5]
            assert reset[2] == str(ids[-5] - 1)  # the id to resume after: no second reset
            assert stream.messages(5) == ids[-5:]
        # An id the server never gave (a memory store restarted under the client) is a reset too.
        with streams(path, 1, headers={"last-event-id": "1000"}) as (stream,):
            reset = stream.next()
            assert reset is not None
            assert reset[0] == "reset", reset
            assert stream.messages(5) == ids[-5:]
        poster.close()


def stream_refused(path: str) -> dict[str, str]:
    """Open one more stream, which must be refused with 503 and ``Retry-After: 1``; its headers."""
    refused = RawStream(path)
    try:
        assert refused.status == 503
        assert refused.headers["retry-after"] == "1"
        return refused.headers
    finally:
        refused.close()


def test_past_max_streams_the_answer_is_503_until_one_closes() -> None:
    # One uid may hold a quarter of --max-streams: 2 of 8 (other uids: test_events_attacks.py).
    with running_server("--store", "memory", "--max-streams", "8") as server:
        path = _path(server)
        with streams(path, 2) as open_streams:
            assert [s.status for s in open_streams] == [200, 200]
            assert stream_refused(path)["content-type"] == "application/json"
            open_streams[0].close()

            def reopened() -> RawStream | None:
                stream = RawStream(path)
                if stream.status == 200:
                    return stream
                stream.close()
                return None

            wait_until(reopened, what="a stream slot freed by a closed stream").close()
        assert "Refused an event stream with 503" in server.output


def test_sigterm_ends_20_open_streams_with_shutdown_and_exits_0() -> None:
    with running_server("--store", "memory", "--shutdown-timeout", "20") as server:
        path = _path(server)
        with streams(path, 20) as open_streams:
            poster = Poster(path)
            message_id = poster.post("before the end")
            poster.close()
            for stream in open_streams:
                assert stream.messages(1) == [message_id]
            server.signal(signal.SIGTERM)
            for stream in open_streams:
                final = stream.until("shutdown")[-1]
                assert orjson.loads(final[1])["last_id"] == message_id
                assert stream.next() is None  # and the stream ends there
            assert server.proc.wait(30) == 0
    assert "Drain done" in server.output, server.output  # not "Drain timed out"


def _rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def test_readers_that_never_read_are_cut_off_and_memory_stays_bounded() -> None:
    """20 streams never read while 4,000 messages of 16 KiB are stored (64 MiB of events each):
    POSTs go on at full speed, the server grows by a few MiB, and each stream ends with ``overflow``.
    """
    text = "x" * 16_000
    with running_server(
        "--store", "memory", "--history-size", "100", "--max-text-length", "16000", "--send-timeout", "300"
    ) as server:
        path = _path(server)
        pid = server.proc.pid
        poster = Poster(path)
        for _ in range(200):  # warm up the allocator with the history full
            poster.post(text)
        with streams(path, 20) as stalled:
            before = _rss(pid)
            peak = before
            for i in range(4_000):
                poster.post(text)
                if i % 200 == 0:
                    peak = max(peak, _rss(pid))
            peak = max(peak, _rss(pid))
            grown = (peak - before) / 2**20
            # Measured: 5 MiB; 64 MiB with buffers that never cut a reader off.
            assert grown < 24, f"RSS grew by {grown:.0f} MiB with 20 readers that never read"
            for stream in stalled:
                final = stream.until("overflow")[-1]
                data = orjson.loads(final[1])
                assert "Last-Event-ID" in data["message"]
                assert stream.next() is None
        poster.close()
    assert "Cut off an event stream" in server.output


def test_a_slow_reader_resumes_from_its_last_id_without_gap() -> None:
    """A reader that was cut off reconnects with the last id it read and gets every message once."""
    with running_server("--store", "memory", "--history-size", "5000", "--send-timeout", "300") as server:
        path = _path(server)
        poster = Poster(path)
        with streams(path, 1) as (stalled,):
            posted = [poster.post("y" * 2000) for _ in range(2000)]
            events = stalled.until("overflow")
            got = [int(e[2]) for e in events if e[0] == "message" and e[2] is not None]
            last = orjson.loads(events[-1][1])["last_id"]
            assert got == posted[: len(got)]
            assert not got or last == got[-1]
        with streams(path, 1, headers={"last-event-id": str(last)}) as (resumed,):
            rest = resumed.messages(len(posted) - len(got))
        assert got + rest == posted
        poster.close()


def _connections(workers: set[int]) -> dict[int, int]:
    """How many sockets with a name each worker holds: the listening socket and those it accepted
    on it (their name is the one the socket was bound by, which need not be its path)."""
    return {
        pid: sum(1 for c in psutil.Process(pid).net_connections(kind="unix") if c.laddr) for pid in workers
    }


def test_a_stream_sees_messages_stored_by_both_workers(tmp: Path) -> None:
    with running_server("--workers", "2", "--store", "sqlite", "--data-dir", str(tmp / "data")) as server:
        path = _path(server)

        def two_workers() -> set[int] | None:
            pids = {child.pid for child in psutil.Process(server.proc.pid).children()}
            return pids if len(pids) == 2 else None

        workers = wait_until(two_workers, what="two worker processes")
        stored_by: dict[int, int] = {}
        with streams(path, 1) as (stream,):
            baseline = _connections(workers)
            deadline = time.monotonic() + 60
            while set(stored_by.values()) != workers:
                assert time.monotonic() < deadline, f"every POST went to one worker: {stored_by}"
                wait_until(lambda: _connections(workers) == baseline, what="the earlier connection closed")
                before = baseline
                poster = Poster(path)  # a new connection: either worker may accept it
                try:
                    message_id = poster.post("from whichever worker")
                    after = _connections(workers)
                finally:
                    poster.close()
                grew = [pid for pid in workers if after[pid] > before[pid]]
                assert len(grew) == 1, (before, after)
                stored_by[message_id] = grew[0]
                assert stream.messages(1) == [message_id]


def test_an_idle_stream_gets_heartbeats() -> None:
    with running_server("--store", "memory") as server, streams(_path(server), 1) as (stream,):
        assert stream._chunk() == b"retry: 1000\n\n"
        assert stream._chunk() == b": heartbeat\n\n"  # within HEARTBEAT_INTERVAL (the socket waits 15 s)


def test_a_bad_since_or_last_event_id_is_422_in_the_error_shape(client: ASGIClient) -> None:
    for response in (
        client.get("/v1/events?since=-1"),
        client.get("/v1/events?since=abc"),
        client.get("/v1/events", headers={"last-event-id": "x"}),
    ):
        body = assert_error(response, 422, "validation_error")
        assert body["details"][0]["loc"][0] in ("query", "header"), body


def test_streams_that_never_read_do_not_hold_the_drain() -> None:
    """Readers whose socket buffers are full when SIGTERM comes cannot be told ``shutdown``: the
    drain drops them after a short grace instead of waiting out ``--shutdown-timeout`` (or the send
    timeout) and cancelling them with an error line each."""
    text = "x" * 16_000
    with running_server(
        "--store", "memory", "--max-text-length", "16000", "--shutdown-timeout", "60", "--send-timeout", "300"
    ) as server:
        path = _path(server)
        with streams(path, 5) as stalled:
            poster = Poster(path)
            for _ in range(100):  # 1.6 MB of events: far past what the sockets' buffers hold
                poster.post(text)
            poster.close()
            wait_until(
                lambda: all(_unread(s.sock) > 64 * 1024 for s in stalled), what="the readers' buffers full"
            )
            began = time.monotonic()
            server.signal(signal.SIGTERM)
            assert server.proc.wait(60) == 0
            took = time.monotonic() - began
    assert "Drain done" in server.output, server.output  # not "Drain timed out" after 60 s
    assert "ERROR" not in server.output, server.output
    assert took < 30, f"the drain took {took:.1f}s"  # the timeouts given are 60 s and 300 s


def _unread(sock: socket.socket) -> int:
    """Bytes waiting to be read on our side of ``sock`` (FIONREAD)."""
    import fcntl
    import struct
    import termios

    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0)))[0])
