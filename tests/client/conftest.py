"""Fixtures for the client tests: the app in-process (pure logic), a real server (transport), and
raw servers that answer what a real one never would (dripping, huge, malformed)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from client import Client
from tests.support import ServerProcess, read_message, running_server, serving, short_tmpdir

Handler = Callable[[socket.socket, threading.Event], None]
"""Serves one accepted connection; returns when done or when the event is set (the test ended)."""


@pytest.fixture
def app_client() -> Iterator[Client]:
    """A ``Client`` over FastAPI's ``TestClient``: the real app, no socket (peer is None)."""
    with TestClient(create_app(Settings(store="memory")), raise_server_exceptions=False) as http:
        assert isinstance(http, httpx2.Client), "Starlette's TestClient must be an httpx2.Client"
        with Client(http_client=http) as client:
            yield client


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """A real ``uds-server`` on a short temp socket, shared by a module's tests."""
    with running_server() as process:
        yield process


@pytest.fixture
def server_path(server: ServerProcess) -> str:
    assert server.socket_path is not None
    return server.socket_path


@pytest.fixture
def refused_socket(tmp_short: Path) -> Iterator[str]:
    """A socket file that exists but nobody listens on: connect() is refused."""
    path = str(tmp_short / "dead.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    try:
        yield path
    finally:
        sock.close()


@pytest.fixture
def silent_socket(tmp_short: Path) -> Iterator[str]:
    """A socket that accepts connections (backlog) but never answers: requests time out."""
    path = str(tmp_short / "mute.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(16)
    try:
        yield path
    finally:
        sock.close()


class _RawServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: str, handle: Handler) -> None:
        self.handle_connection = handle
        self.stop = threading.Event()
        super().__init__(path, _RawHandler)


class _RawHandler(socketserver.BaseRequestHandler):
    server: _RawServer

    def handle(self) -> None:
        with contextlib.suppress(OSError):  # the client gave up and closed: that is the point
            self.server.handle_connection(self.request, self.server.stop)


@contextlib.contextmanager
def raw_server(path: str, handle: Handler) -> Iterator[str]:
    """A Unix socket at ``path`` whose every connection is served by ``handle`` in its own thread."""
    server = _RawServer(path, handle)
    with serving(server):
        try:
            yield path
        finally:
            server.stop.set()


def answering(answer: bytes) -> Handler:
    """A handler that reads one request, sends ``answer`` (raw bytes) and closes."""

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        if read_message(conn) is not None:
            conn.sendall(answer)

    return handle


def json_answer(status: int, body: bytes, reason: str = "Whatever") -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, reason.encode(), len(body), body)
    )


DRIP_INTERVAL = 0.2


class Drip:
    """A server that answers one byte every :data:`DRIP_INTERVAL` seconds; ``sent`` counts them."""

    def __init__(self) -> None:
        self.sent = 0
        body = b'{"status": "ok"}' + b" " * 1000
        self.answer = (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )

    def __call__(self, conn: socket.socket, stop: threading.Event) -> None:
        if read_message(conn) is None:
            return
        for byte in self.answer:
            if stop.wait(DRIP_INTERVAL):
                return
            conn.sendall(bytes((byte,)))
            self.sent += 1


@pytest.fixture
def dripping() -> Iterator[tuple[str, Drip]]:
    """A socket whose server sends its (valid) answer one byte every 0.2 s: 1,000+ bytes, ~4 minutes."""
    directory = short_tmpdir("drip")
    drip = Drip()
    try:
        with raw_server(str(directory / "d.sock"), drip) as path:
            yield path, drip
    finally:
        shutil.rmtree(directory, ignore_errors=True)
