"""Attacks on the HTTP layer over a real socket of a real server process, in raw bytes: where memory
(RSS, measured with psutil), open files, CPU or a peer that never reads is the point: endless
trailers, refused peers that stream on, readers that never read, deep pipelining, the connection cap.

Framing edge cases that need no process (Host, transfer codings, early answers, pipelined errors)
run in process in test_protocol_framing.py.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from app.api.routes.messages import LIST_STREAMS, PEER_SHARE
from app.connection.pipelining import MAX_PIPELINE
from tests.support import (
    ServerProcess,
    error_body,
    http_over_uds,
    open_files_of,
    python_with_open_files,
    read_head,
    read_response,
    response_status,
    running_server,
    wait_until,
)

DEADLINE = 20.0
"""Socket timeout: far above every server timeout used here, only there to fail, not to wait."""
MB = 1024 * 1024
POST_CHUNKED = (
    b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
BODY = b'{"text": "hi"}'
ONE_CHUNK = b"%x\r\n%s\r\n" % (len(BODY), BODY)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as proc:
        yield proc


def _path(server: ServerProcess) -> str:
    assert server.socket_path
    return server.socket_path


def _connect(path: str, timeout: float = DEADLINE) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    conn.connect(path)
    return conn


def _rss(server: ServerProcess) -> int:
    return int(psutil.Process(server.proc.pid).memory_info().rss)


def _closed(conn: socket.socket) -> bool:
    """True once the server has closed the connection (EOF; a reset counts too)."""
    try:
        while conn.recv(65536):
            pass
    except ConnectionResetError:
        return True
    return True


def _stream_until_answered(conn: socket.socket, head: bytes, frame: bytes, limit: int) -> tuple[bytes, int]:
    """Send ``head``, then ``frame`` again and again until the server answers, closes or ``limit``
    bytes went out; return what the server said and how many bytes were sent."""
    conn.sendall(head)
    conn.setblocking(False)
    answered = b""
    sent = 0
    try:
        while sent < limit:
            with contextlib.suppress(BlockingIOError):
                more = conn.recv(65536)
                if not more:
                    break
                answered += more
            if b"\r\n\r\n" in answered:
                break
            try:
                sent += conn.send(frame)
            except BlockingIOError:
                time.sleep(0.001)  # the server is not reading right now; poll its answer again
            except (BrokenPipeError, ConnectionResetError):
                break
    finally:
        conn.settimeout(DEADLINE)
    with contextlib.suppress(ConnectionResetError):
        while b"\r\n\r\n" not in answered:
            more = conn.recv(65536)
            if not more:
                break
            answered += more
    return answered, sent


def _answer(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 "), raw[:200]
    return response_status(head), json.loads(body) if body else {}


# --- trailers ---------------------------------------------------------------------------------------


def test_endless_trailer_value_gets_431_and_memory_stays_flat(server: ServerProcess) -> None:
    """One trailer field whose value never ends: 431 after 32 KiB, not GBs of memory or CPU."""
    before = _rss(server)
    with _connect(_path(server)) as conn:
        answered, sent = _stream_until_answered(
            conn, POST_CHUNKED + ONE_CHUNK + b"0\r\nX-Trailer: ", b"a" * 65536, 256 * MB
        )
        status, doc = _answer(answered)
        assert status == 431, answered[:300]
        assert doc["message"] == "the trailer fields are over 32768 bytes"
        assert _closed(conn)
    assert sent < 16 * MB, f"the server read {sent} bytes of trailers before answering"
    grown = _rss(server) - before
    assert grown < 20 * MB, f"server memory grew by {grown} bytes"
    assert http_over_uds(_path(server))[0] == 200


def test_endless_trailer_fields_get_431(server: ServerProcess) -> None:
    before = _rss(server)
    with _connect(_path(server)) as conn:
        answered, sent = _stream_until_answered(
            conn, POST_CHUNKED + ONE_CHUNK + b"0\r\n", b"X-T: 1\r\n" * 8192, 256 * MB
        )
        status, doc = _answer(answered)
        assert status == 431, answered[:300]
        assert doc["error"] == "headers_too_large"
        assert _closed(conn)
    assert sent < 16 * MB
    assert _rss(server) - before < 20 * MB


# --- early answers close the connection -------------------------------------------------------------


def test_refused_peer_streaming_a_chunked_body_is_closed(tmp: Path) -> None:
    """The allowlist answers 403 without reading; the protocol then stops reading and closes."""
    env = {"UDS_ALLOW_UID": str(os.getuid() + 12345)}
    with running_server("--request-timeout", "60", env=env, tmp=tmp) as server:
        before = _rss(server)
        frame = b"10000\r\n" + b"x" * 65536 + b"\r\n"
        with _connect(_path(server)) as conn:
            answered, sent = _stream_until_answered(conn, POST_CHUNKED, frame, 256 * MB)
            status, doc = _answer(answered)
            assert status == 403
            assert doc["error"] == "forbidden"
            # The server must close now, not after the 60 s request deadline.
            conn.settimeout(5.0)
            assert _closed(conn)
        assert sent < 64 * MB, f"the server read {sent} bytes after refusing the peer"
        assert _rss(server) - before < 20 * MB
        assert http_over_uds(_path(server), "GET", "/readyz")[0] == 200


def test_refused_peer_with_endless_trailers_is_closed(tmp: Path) -> None:
    env = {"UDS_ALLOW_UID": str(os.getuid() + 12345)}
    with running_server("--request-timeout", "60", env=env, tmp=tmp) as server:
        before = _rss(server)
        with _connect(_path(server)) as conn:
            answered, sent = _stream_until_answered(
                conn, POST_CHUNKED + ONE_CHUNK + b"0\r\nX-T: ", b"a" * 65536, 256 * MB
            )
            assert _answer(answered)[0] == 403
            conn.settimeout(5.0)
            assert _closed(conn)
        assert sent < 64 * MB
        assert _rss(server) - before < 20 * MB


# --- a client that never reads ----------------------------------------------------------------------


def _fill_history(path: str, count: int) -> None:
    """``count`` messages of 4,096 four-byte characters (16 KiB of JSON each), over one connection."""
    text = json.dumps({"text": "😀" * 4096}, ensure_ascii=False).encode()
    request = (
        b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(text)
    ) + text
    with _connect(path) as conn:
        buffer = bytearray()
        for start in range(0, count, MAX_PIPELINE):  # pipelined, as deep as the server parses ahead
            batch = min(MAX_PIPELINE, count - start)
            conn.sendall(request * batch)
            for _ in range(batch):
                assert read_response(conn, buffer)[0] == 201


READERS = LIST_STREAMS // PEER_SHARE
"""As many never-reading list readers as one uid may have answered at once."""


def test_client_that_never_reads_is_cut_after_send_timeout(tmp: Path) -> None:
    with running_server("--send-timeout", "1", "--history-size", "300", tmp=tmp) as server:
        path = _path(server)
        _fill_history(path, 300)
        baseline = _rss(server)
        readers = []
        try:
            for _ in range(READERS):
                conn = _connect(path)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                conn.sendall(b"GET /messages?limit=300 HTTP/1.1\r\nHost: localhost\r\n\r\n")
                readers.append(conn)
            # Each answer is ~5 MB; whatever the server holds of it is dropped at the send timeout.
            wait_until(
                lambda: server.output.count("read nothing for 1s") == READERS,
                timeout=15,
                what="a send timeout per reader in the log",
            )
            for conn in readers:
                conn.settimeout(5.0)
                received = 0
                with contextlib.suppress(ConnectionResetError):
                    while chunk := conn.recv(1 << 20):
                        received += len(chunk)
                assert received < 5 * MB, "the connection ends before the whole answer"
        finally:
            for conn in readers:
                conn.close()
        wait_until(lambda: _rss(server) - baseline < 20 * MB, timeout=10, what="memory to come back")
        line = next(x for x in server.output.splitlines() if "read nothing" in x)
        assert line.startswith("WARNING Closed a connection whose peer read nothing for 1s; dropped ")
        assert http_over_uds(path)[0] == 200


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=DEADLINE)
        self.path = path

    def connect(self) -> None:
        self.sock = _connect(self.path)


def test_slow_reader_that_keeps_reading_is_not_cut(tmp: Path) -> None:
    """Progress resets the send timeout: a client that reads slowly gets its whole answer."""
    with running_server("--send-timeout", "0.5", "--history-size", "30", tmp=tmp) as server:
        path = _path(server)
        _fill_history(path, 30)
        conn = _UnixHTTPConnection(path)
        try:
            conn.request("GET", "/messages?limit=30")
            response = conn.getresponse()
            assert response.status == 200
            body = bytearray()
            # ~500 KB at 160 KB/s: the server's buffer stays full for longer than the send timeout
            # at a time, but the peer keeps taking from it.
            while chunk := response.read(8192):
                body += chunk
                time.sleep(0.05)
            assert len(json.loads(bytes(body))["messages"]) == 30
        finally:
            conn.close()
        assert "read nothing" not in server.output


# --- pipelining -------------------------------------------------------------------------------------


def test_408_waits_for_the_answer_in_progress(tmp: Path) -> None:
    """A pipelined head that stalls while a long answer is being written: the answer comes whole,
    then the 408, then the close (the 408 is never spliced into the answer)."""
    with running_server("--request-timeout", "0.5", "--history-size", "30", tmp=tmp) as server:
        path = _path(server)
        _fill_history(path, 30)
        conn = _connect(path)
        try:
            conn.sendall(
                b"GET /messages?limit=30 HTTP/1.1\r\nHost: localhost\r\n\r\nGET /healthz HTTP/1.1\r\nHo"
            )
            wait_until(lambda: "Request not complete after 0.5s" in server.output, what="the deadline")
            raw = bytearray()
            while chunk := conn.recv(1 << 20):
                raw += chunk
        finally:
            conn.close()
        head, _, rest = bytes(raw).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        if b"content-length" in head.lower():
            length = int(
                next(
                    line.split(b":")[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
            )
            body, after = rest[:length], rest[length:]
        else:  # chunked: the answer ends with the last chunk
            end = rest.index(b"\r\n0\r\n\r\n") + len(b"\r\n0\r\n\r\n")
            body, after = rest[:end], rest[end:]
        assert len(body) > 30 * 16000
        assert after.startswith(b"HTTP/1.1 408"), after[:200]
        assert b'"request_timeout"' in after


# --- open files and the connection cap --------------------------------------------------------------


def test_open_file_limit_is_raised_to_the_hard_limit(tmp: Path) -> None:
    path = str(tmp / "s.sock")
    python = python_with_open_files(tmp, 256, 1024)
    with ServerProcess(["--socket", path], socket_path=path, python=python) as server:
        server.wait_ready()
        assert open_files_of(server.proc.pid) == (1024, 1024)
        server.stop()


def _start_busy(path: str) -> socket.socket:
    """A connection with a request in flight: the application is waiting for the rest of its body."""
    conn = _connect(path)
    conn.sendall(
        b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: 19\r\n\r\n"
    )
    found = read_head(conn, bytearray())
    assert found is not None
    assert response_status(found[0]) == 100
    return conn


def test_past_the_cap_busy_server_answers_503_json_and_logs_once(tmp: Path) -> None:
    path = str(tmp / "s.sock")
    python = python_with_open_files(tmp, 1024, 1024)
    args = ["--socket", path, "--max-connections", "3"]
    with ServerProcess(args, socket_path=path, python=python) as server:
        server.wait_ready()
        busy = [_start_busy(path) for _ in range(3)]
        try:
            for _ in range(3):
                with _connect(path) as extra:
                    extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
                    status, headers, body = read_response(extra)
                    assert status == 503
                    assert headers["content-type"] == "application/json"
                    assert headers["connection"] == "close"
                    error_body(body, 503, "unavailable")
                    assert _closed(extra)
            for conn in busy:  # the requests in flight are unharmed
                conn.sendall(b'{"text": "in time"}')
                assert read_response(conn)[0] == 201
        finally:
            for conn in busy:
                conn.close()
        wait_until(lambda: http_over_uds(path)[0] == 200, what="a free slot")
        lines = [x for x in server.output.splitlines() if "At the connection limit" in x]
        assert lines[0] == (
            "WARNING At the connection limit (3, --max-connections): refused 1 connection(s) "
            "with 503, closed 0 idle connection(s) and 0 slow to send a request (over 2s) "
            "to make room; next report in 10s at most"
        )
        # The other two refusals are summed up in the next line, 10 s later (if the test lasts that long).
        assert lines[1:] in ([], [lines[0].replace("refused 1", "refused 2")]), lines
        server.stop()


def test_at_the_cap_the_longest_idle_connection_makes_room(tmp: Path) -> None:
    """Idle connections never starve the probe: the oldest idle one is closed for the newcomer."""
    with running_server("--max-connections", "20", tmp=tmp) as server:
        path = _path(server)
        sockets = len(psutil.Process(server.proc.pid).net_connections("unix"))  # listener, event loop
        idle = []
        try:
            for _ in range(200):  # ten times the cap, never sending a byte
                idle.append(_connect(path))
            kept = _connect(path)  # a keep-alive connection that served a request, then idles
            idle.append(kept)
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert read_response(kept)[0] == 200
            for _ in range(5):
                assert http_over_uds(path, timeout=5.0)[0] == 200
            assert (
                http_over_uds(
                    path, "POST", "/messages", b'{"text": "hi"}', {"content-type": "application/json"}
                )[0]
                == 201
            )
            alive = psutil.Process(server.proc.pid).net_connections("unix")
            assert len(alive) - sockets <= 20 + 1, f"{len(alive) - sockets} connections open past a cap of 20"
            idle[0].settimeout(5.0)
            assert _closed(idle[0]), "the longest-idle connection was closed to make room"
        finally:
            for conn in idle:
                conn.close()
        assert "closed" in next(x for x in server.output.splitlines() if "At the connection limit" in x)
        assert "refused 0 connection(s)" in server.output


def test_at_the_cap_trickling_peers_give_way_to_a_probe(tmp: Path) -> None:
    """Slowloris: as many peers as the cap, each trickling a request head, never starve /healthz;
    once their requests are older than SLOW_REQUEST the oldest are closed for newcomers."""
    with running_server("--max-connections", "20", tmp=tmp) as server:
        path = _path(server)
        trickling = []
        try:
            for _ in range(40):
                conn = _connect(path)
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: a")
                trickling.append(conn)
            status = wait_until(
                lambda: http_over_uds(path, timeout=5.0)[0] == 200,
                timeout=20,
                what="/healthz past 40 trickling peers at a cap of 20",
            )
            assert status
            assert (
                http_over_uds(
                    path, "POST", "/messages", b'{"text": "hi"}', {"content-type": "application/json"}
                )[0]
                == 201
            )
            trickling[0].settimeout(5.0)
            assert _closed(trickling[0]), "the oldest trickling peer was closed to make room"
        finally:
            for conn in trickling:
                conn.close()
        # The first event at the cap is logged at once; the closings are summed up in the next line.
        assert "WARNING At the connection limit (20, --max-connections)" in server.output


def test_hanging_up_on_pipelined_answers_logs_no_error(tmp: Path) -> None:
    """A peer that pipelines requests, reads nothing and hangs up must not make the server log an
    internal error per request (uvicorn left the running answer unaware of the disconnect)."""
    with running_server(tmp=tmp) as server:
        path = _path(server)
        text = "\U0001f600" * 4096
        status, _ = http_over_uds(
            path,
            "POST",
            "/messages",
            json.dumps({"text": text}).encode(),
            {"content-type": "application/json"},
        )
        assert status == 201
        conns = []
        for _ in range(10):
            conn = _connect(path)
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                for _ in range(200):
                    conn.send(b"GET /messages/1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
            conns.append(conn)
        # Every connection has answers waiting on a full buffer: the server is writing to each.
        wait_until(
            lambda: all(_unread(conn) > 0 for conn in conns), what="answers queued on every connection"
        )
        for conn in conns:
            conn.close()
        assert wait_until(lambda: http_over_uds(path)[0] == 200, what="the server to answer again")
        assert server.stop() == 0
    assert "ERROR" not in server.output, server.output


def _unread(conn: socket.socket) -> int:
    """Bytes waiting in the client's receive queue (FIONREAD)."""
    import fcntl
    import struct
    import termios

    return struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n"


def _sent_in_a_thread(conn: socket.socket, data: bytes) -> threading.Thread:
    """``conn.sendall(data)`` in a thread: the server reads no faster than the answers are read."""
    thread = threading.Thread(target=conn.sendall, args=(data,), daemon=True)
    thread.start()
    return thread


def test_deep_pipelining_is_answered_whole_and_memory_stays_flat(tmp: Path) -> None:
    """5,000 pipelined requests are all answered, and the server grows by under 8 MiB: past
    MAX_PIPELINE waiting requests it holds the input unparsed and stops reading."""
    with running_server(tmp=tmp) as server:
        path = _path(server)
        with _connect(path) as conn:  # warm up: the allocator's pools and the code paths
            sender = _sent_in_a_thread(conn, HEALTHZ * 500)
            buffer = bytearray()
            for _ in range(500):
                assert read_response(conn, buffer)[0] == 200
            sender.join()
        before = peak = _rss(server)
        with _connect(path) as conn:
            sender = _sent_in_a_thread(conn, HEALTHZ * 5000)
            buffer = bytearray()
            for n in range(5000):
                assert read_response(conn, buffer)[0] == 200, f"answer {n}"
                if n % 250 == 0:
                    peak = max(peak, _rss(server))
            sender.join()
            conn.sendall(HEALTHZ)
            assert read_response(conn, buffer)[0] == 200
        print(f"5,000 pipelined: grew by {(peak - before) / MB:.2f} MiB")  # shown with -s
        assert peak - before < 8 * MB, f"grew by {(peak - before) / MB:.1f} MiB"
        assert server.stop() == 0
    assert "ERROR" not in server.output, server.output


def _cpu(server: ServerProcess) -> float:
    times = psutil.Process(server.proc.pid).cpu_times()
    return float(times.user + times.system)


def _served_by(path: str, count: int) -> None:
    for _ in range(count):
        assert http_over_uds(path, timeout=5.0)[0] == 200


def test_a_peer_pipelining_thousands_and_reading_nothing_costs_little(tmp: Path) -> None:
    """5,000 pipelined requests, none of whose answers are read: the server's memory grows by under
    8 MiB, it spends no more CPU serving others than without that peer, and others are served.
    When the peer reads at last, every answer comes."""
    with running_server(tmp=tmp) as server:
        path = _path(server)
        _served_by(path, 50)  # warm up
        before = _rss(server)
        cpu = _cpu(server)
        _served_by(path, 1000)
        alone = _cpu(server) - cpu
        with _connect(path) as hog:
            hog.setblocking(False)
            data = memoryview(HEALTHZ * 5000)
            sent = 0
            with contextlib.suppress(BlockingIOError):
                while sent < len(data):
                    sent += hog.send(data[sent:])
            wait_until(lambda: _unread(hog) > 0, what="answers waiting unread for the hog")
            held = _rss(server)
            cpu = _cpu(server)
            _served_by(path, 1000)
            beside = _cpu(server) - cpu
            # Once it reads, the hog gets all its answers: held, not refused.
            hog.settimeout(DEADLINE)
            if sent < len(data):
                _sent_in_a_thread(hog, bytes(data[sent:]))
            buffer = bytearray()
            for n in range(5000):
                assert read_response(hog, buffer)[0] == 200, f"answer {n} to the hog"
        print(f"hog: grew by {(held - before) / MB:.2f} MiB; CPU {beside:.3f}s vs {alone:.3f}s alone")
        assert held - before < 8 * MB, f"grew by {(held - before) / MB:.1f} MiB"
        # Generous (a shared machine): the hog must not make serving others cost several times more.
        assert beside < 2 * alone + 0.1, (
            f"1,000 requests cost {beside:.2f}s of CPU beside the hog, {alone:.2f}s alone"
        )
        assert server.stop() == 0


def test_at_the_cap_peers_that_do_not_read_their_answers_give_way(tmp: Path) -> None:
    """Connections whose answers sit unread never lock a probe out at the cap (for the whole send
    timeout): after SLOW_REQUEST they are closed for newcomers."""
    with running_server("--max-connections", "20", tmp=tmp) as server:
        path = _path(server)
        _fill_history(path, 100)
        hogs = []
        try:
            for _ in range(24):
                conn = _connect(path)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                # A 1.6 MB answer, never read: the server's writes to it stay paused.
                conn.sendall(b"GET /messages?limit=100 HTTP/1.1\r\nHost: localhost\r\n\r\n")
                hogs.append(conn)
            assert wait_until(
                lambda: http_over_uds(path, timeout=5.0)[0] == 200,
                timeout=20,
                what="/healthz past 24 connections that read nothing, at a cap of 20",
            )
        finally:
            for conn in hogs:
                conn.close()
        assert server.stop() == 0
