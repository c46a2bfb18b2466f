"""The ``--metrics-listen`` TCP port against hostile clients: connections that never finish their
request cannot take the server's threads and file descriptors, and so cannot starve the API."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import psutil

from app.metrics.endpoint import ENDPOINT_CONNECTIONS, ENDPOINT_PER_SOURCE
from benchmarks._spawn import free_port
from tests.support import (
    ServerProcess,
    http_over_uds,
    python_with_open_files,
    running_server,
    short_tmpdir,
    wait_until,
)


def _scrape(port: int) -> int | None:
    """The status of one ``GET /metrics`` over TCP, None when the connection was closed unanswered."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := conn.recv(65536):
                answer += chunk
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/") else None


@contextlib.contextmanager
def _idle_connections(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that send half a request line and then nothing (slowloris)."""
    opened: list[socket.socket] = []
    try:
        for _ in range(count):
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            opened.append(conn)
            with contextlib.suppress(OSError):  # the server may close it at once
                conn.sendall(b"GET /metr")
            time.sleep(0.005)  # the port's accept queue is short; a flood only waits on SYN retries
        yield opened
    finally:
        for conn in opened:
            conn.close()


def test_idle_metrics_connections_cannot_starve_the_api() -> None:
    directory = short_tmpdir()
    path = str(directory / "s.sock")
    port = free_port()
    # 256 open files: before the fix, ~240 idle TCP connections to the metrics port took every one
    # of them (a thread and a descriptor each, forever) and the Unix socket refused every request.
    python = python_with_open_files(directory, 256, 256)
    args = ["--socket", path, "--store", "memory", "--metrics-listen", f"127.0.0.1:{port}"]
    with ServerProcess(args, socket_path=path, python=python) as server:
        server.wait_ready()
        process = psutil.Process(server.proc.pid)
        threads_before = process.num_threads()
        with _idle_connections(port, 300):
            assert process.num_threads() <= threads_before + ENDPOINT_CONNECTIONS + 1
            assert http_over_uds(path, "GET", "/healthz")[0] == 200
            status, body = http_over_uds(
                path, "POST", "/v1/messages", b'{"text":"hi"}', {"content-type": "application/json"}
            )
            assert status == 201, body
            # The idle connections are dropped after the deadline, so a scrape gets through again
            # while the attacker still holds its sockets open.
            assert wait_until(lambda: _scrape(port) == 200, timeout=60, what="a scrape past idle clients")
        assert server.stop() == 0


def test_huge_request_heads_on_the_metrics_port_stay_small_in_memory() -> None:
    port = free_port()
    with running_server("--store", "memory", "--metrics-listen", f"127.0.0.1:{port}") as server:
        process = psutil.Process(server.proc.pid)
        before = process.memory_info().rss
        line = b"x-filler: " + b"a" * 65000 + b"\r\n"  # the standard library's parser allows 100 of them

        def send_head(conn: socket.socket) -> None:
            with contextlib.suppress(OSError):  # the server stops reading and closes
                conn.sendall(b"GET /metrics HTTP/1.0\r\n")
                for _ in range(99):
                    conn.sendall(line)

        address = ("127.0.0.1", port)
        conns = [socket.create_connection(address, timeout=10) for _ in range(ENDPOINT_CONNECTIONS)]
        try:
            senders = [threading.Thread(target=send_head, args=(conn,)) for conn in conns]
            for sender in senders:
                sender.start()
            for sender in senders:
                sender.join(30)
            grown = (process.memory_info().rss - before) / 2**20
            # Before: 16 such heads held 100 MiB (6.4 MB each) until their connections ended.
            assert grown < 10, f"the server grew by {grown:.1f} MiB"
        finally:
            for conn in conns:
                conn.close()
        assert wait_until(lambda: _scrape(port) == 200, what="a scrape after the huge heads")


METHODS = [
    *("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK"),
    *("SEARCH", "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE", "M-SEARCH", "NOTIFY", "SUBSCRIBE"),
    *("UNSUBSCRIBE", "PURGE", "MKCALENDAR", "LINK", "UNLINK", "SOURCE", "QUERY"),
]
"""Methods llhttp parses: each is a new series of the request metrics."""


def _ask(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_an_accept_header_prometheus_client_cannot_read_still_gets_the_metrics() -> None:
    """prometheus-client raises on ``Accept: text/plain; version=x``: unguarded, each such scrape
    ended unanswered with an ERROR line, a log flood for anyone who can reach the port."""
    port = free_port()
    with running_server("--store", "memory", "--metrics-listen", f"127.0.0.1:{port}") as server:
        assert server.socket_path is not None
        for accept in ("text/plain; version=x", "application/openmetrics-text; version=abc"):
            request = f"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n".encode()
            for _ in range(20):
                answer = _ask(port, request)
                assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
                assert b"uds_open_connections" in answer
            status, body = http_over_uds(server.socket_path, "GET", "/metrics", headers={"Accept": accept})
            assert status == 200, body
        assert server.stop() == 0
        assert "ERROR" not in server.output, server.output


def test_a_head_over_the_limit_is_431_and_a_stop_with_half_sent_heads_is_clean() -> None:
    port = free_port()
    with running_server("--store", "memory", "--metrics-listen", f"127.0.0.1:{port}") as server:
        big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Filler: " + b"a" * 20000 + b"\r\n\r\n"
        assert _ask(port, big).startswith(b"HTTP/1.1 431 ")
        # As many as one address keeps: a further one would take the place of the oldest.
        held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(ENDPOINT_PER_SOURCE)]
        try:
            for conn in held:
                conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the end of the head
            wait_until(lambda: "Metrics on" in server.output, what="the endpoint serving")
            assert server.stop() == 0
        finally:
            for conn in held:
                conn.close()
        assert "ERROR" not in server.output, server.output
        assert "Task exception" not in server.output, server.output
