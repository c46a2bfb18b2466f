"""Restarts that refuse nothing: while a holder keeps the listening socket, as systemd keeps a .socket
unit's, a server stopped by SIGTERM and its successor lose no request of a steady load of POSTs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.connection.protocol import DRAIN_STALL
from client import Client
from tests.support import (
    ServerProcess,
    http_over_uds,
    python_with_listen_fds,
    read_response,
    wait_until,
)

HELLO = json.dumps({"text": "Hello from client"}).encode()
JSON = {"content-type": "application/json"}
RAW_THREADS = 4
"""Threads each sending POSTs on a fresh connection per request (they wait in the backlog)."""
CLIENT_THREADS = 2
RESTARTS = 3
"""Threads sharing one ``client.Client`` (kept-alive connections, closed by the old server's drain)."""


@dataclass
class Load:
    """A steady load of POSTs on ``path``: every request's start, end and failure, if any."""

    path: str
    stop: threading.Event = field(default_factory=threading.Event)
    done: list[tuple[float, float]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    in_flight: dict[int, float] = field(default_factory=dict)
    """Thread id -> when its unanswered request started."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, send: Callable[[], None]) -> None:
        me = threading.get_ident()
        while not self.stop.is_set():
            started = time.monotonic()
            self.in_flight[me] = started
            try:
                send()
            except Exception as exc:
                with self.lock:
                    self.failures.append(
                        f"{getattr(send, '__name__', 'client')}: {type(exc).__name__}: {exc}"
                    )
            else:
                with self.lock:
                    self.done.append((started, time.monotonic()))
            finally:
                del self.in_flight[me]

    def raw(self) -> None:
        status, body = http_over_uds(self.path, "POST", "/messages", HELLO, JSON, timeout=60)
        if status != 201:
            raise AssertionError(f"status {status}: {body[:200]!r}")

    def answered(self) -> int:
        with self.lock:
            return len(self.done)

    def reach(self, count: int, what: str) -> None:
        wait_until(lambda: self.answered() >= count, timeout=30, what=f"{count} answers ({what})")


@pytest.fixture
def held(tmp: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp / "held.sock"))
    sock.listen(4096)
    yield sock
    sock.close()


def _server(tmp: Path, held: socket.socket, name: str, workers: str = "1") -> ServerProcess:
    return ServerProcess(
        ["--socket", str(tmp / "own.sock"), "--workers", workers],
        socket_path=held.getsockname(),
        python=python_with_listen_fds(tmp, held.fileno()),
        pass_fds=(held.fileno(),),
        env={"UDS_DATA_DIR": str(tmp / "data")},  # both servers share the store, as a restart does
        log_path=tmp / f"{name}.log",
    )


@pytest.mark.parametrize("workers", ["1", "2"])
def test_restart_under_load_loses_no_request(tmp: Path, held: socket.socket, workers: str) -> None:
    """Three restarts under load: every POST is answered (201); some waited in the backlog."""
    path = held.getsockname()
    load = Load(path)
    client = Client(path, timeout=60)
    threads = [threading.Thread(target=load.run, args=(load.raw,)) for _ in range(RAW_THREADS)]
    threads += [
        threading.Thread(target=load.run, args=(lambda: client.send("Hello from client"),))
        for _ in range(CLIENT_THREADS)
    ]
    waited = 0
    outputs = []
    server = _server(tmp, held, "server-0", workers)
    try:
        server.wait_ready()
        for thread in threads:
            thread.start()
        for restart in range(1, RESTARTS + 1):
            load.reach(200 * restart, f"before restart {restart}")
            assert server.stop() == 0
            outputs.append(server.output)
            server.__exit__(None, None, None)
            stopped = load.answered()
            # Nothing serves now: every thread's request waits in the held socket's backlog.
            wait_until(lambda: len(load.in_flight) == len(threads), what="every thread waiting")
            assert load.answered() == stopped
            server = _server(tmp, held, f"server-{restart}", workers)
            exec_at = time.monotonic()
            waiting = set(load.in_flight.values())
            server.wait_ready()
            load.reach(stopped + 1, "from the new server")
            # Count once every request that waited has its answer (the first answer can come first).
            wait_until(
                lambda waiting=waiting: waiting <= {a for a, _ in list(load.done)},
                what="an answer to every request that waited in the backlog",
            )
            waited += sum(1 for a, b in list(load.done) if a in waiting and exec_at < b)
        load.reach(200 * (RESTARTS + 1), "after the last restart")
        load.stop.set()
        for thread in threads:
            thread.join(60)
        assert server.stop() == 0
    finally:
        load.stop.set()
        for thread in threads:
            thread.join(60)
        client.close()
        server.__exit__(None, None, None)
    assert load.failures == [], f"{len(load.failures)} failed of {len(load.done) + len(load.failures)}"
    assert waited >= RESTARTS * RAW_THREADS, "requests should have waited for the next server in the backlog"
    drained = "All workers stopped" if workers != "1" else "Drain done"
    assert all(drained in output for output in outputs), outputs


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def _accepted(server: ServerProcess, path: str, before: int) -> socket.socket:
    """A connection to ``path`` once ``server`` has accepted it (it holds one more descriptor)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(path)
    wait_until(lambda: _open_fds(server.proc.pid) > before, what="the server accepting the connection")
    return conn


def _draining(server: ServerProcess) -> None:
    server.signal(signal.SIGTERM)
    wait_until(lambda: "Received SIGTERM: draining" in server.output, what="the drain to start")


POST = (
    b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(HELLO), HELLO)
)


def test_a_connection_accepted_just_before_the_drain_is_answered(tmp: Path) -> None:
    """Accepted, nothing sent yet when SIGTERM comes: its request is still answered, then it closes."""
    path = str(tmp / "s.sock")
    with ServerProcess(["--socket", path], socket_path=path) as server:
        server.wait_ready()
        with _accepted(server, path, _open_fds(server.proc.pid)) as conn:
            _draining(server)
            conn.sendall(POST)
            status, headers, body = read_response(conn)
            assert (status, headers.get("connection")) == (201, "close"), body
            assert conn.recv(1) == b""
        assert server.stop() == 0
    assert "Drain done" in server.output


def test_a_request_half_sent_when_the_drain_starts_is_answered(tmp: Path) -> None:
    """A kept-alive connection sending its next request's head as SIGTERM comes gets its answer."""
    path = str(tmp / "s.sock")
    with ServerProcess(["--socket", path], socket_path=path) as server:
        server.wait_ready()
        with _accepted(server, path, _open_fds(server.proc.pid)) as conn:
            conn.sendall(POST)
            assert read_response(conn)[0] == 201
            conn.sendall(POST[:20])
            _draining(server)
            conn.sendall(POST[20:])
            status, headers, body = read_response(conn)
            assert (status, headers.get("connection")) == (201, "close"), body
        assert server.stop() == 0


def test_a_connection_that_sends_nothing_holds_the_drain_briefly(tmp: Path) -> None:
    """Kept for its request, a connection that sends none is closed after DRAIN_STALL, not at the
    shutdown timeout."""
    path = str(tmp / "s.sock")
    with ServerProcess(["--socket", path, "--shutdown-timeout", "60"], socket_path=path) as server:
        server.wait_ready()
        with _accepted(server, path, _open_fds(server.proc.pid)) as conn:
            _draining(server)
            assert server.proc.wait(30) == 0
            assert conn.recv(1) == b""
    took = float(re.search(r"Drain done in ([0-9.]+)s", server.output).group(1))  # type: ignore[union-attr]
    assert took < DRAIN_STALL + 5, server.output
