"""Fixtures for the client tests: the app in-process (pure logic), a real server (transport)."""

from __future__ import annotations

import shutil
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.exceptions import StarletteDeprecationWarning

from app.config import Settings
from app.main import create_app
from client import Client
from tests.support import ServerProcess, running_server, short_tmpdir

# Starlette 1.x prefers httpx2 for its TestClient and warns when it falls back to httpx. The library
# is built on httpx, and the fallback is exactly what lets a TestClient stand in for its httpx.Client.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", StarletteDeprecationWarning)
    from fastapi.testclient import TestClient


@pytest.fixture
def app_client() -> Iterator[Client]:
    """A ``Client`` over FastAPI's ``TestClient``: the real app, no socket (peer is None)."""
    with TestClient(create_app(Settings()), raise_server_exceptions=False) as http:
        assert isinstance(http, httpx.Client), "TestClient must be an httpx.Client (is httpx2 installed?)"
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
def tmp_short() -> Iterator[Path]:
    """A short temp directory for sockets of this test, removed afterwards."""
    directory = short_tmpdir("udsc")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


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
