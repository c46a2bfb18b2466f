"""API version negotiation against servers that claim other versions, on real sockets.

Two kinds of server: a small HTTP server in this process (``http.server`` on a real Unix socket)
that claims any range, or none, and records every request line; and the real app, built with
``create_app(..., api_versions=...)``, served by uvicorn in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from benchmarks._spawn import ServerProcess as Spawned
from client import AsyncClient, Client, ClientError
from tests.support import ROOT, run_cli, serving

MESSAGE = {
    "text": "hi",
    "reply": "Hello from server via UDS",
    "received_at": "2026-11-29T12:00:00Z",
    "peer": None,
}


class _Stub(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    # Above the tests' concurrent connects: socketserver's default backlog of 5 overflowed on a busy
    # machine when 8 threads connected at once (EAGAIN, "listen backlog is full").
    request_queue_size = 64

    def __init__(self, path: str, versions: tuple[int, int] | None, ping_delay: float) -> None:
        self.versions = versions  # None: no /_ping at all (a server from before API versions)
        self.ping_delay = ping_delay
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.path = path
        super().__init__(path, _StubHandler)

    def served(self, path: str) -> bool:
        """Whether ``path`` is an API path this stub serves (unversioned, or under a claimed version)."""
        if self.versions is None:
            return not path.startswith("/v")
        low, high = self.versions
        return any(path.startswith(f"/v{v}/") for v in range(low, high + 1)) or not path.startswith("/v")


class _StubHandler(BaseHTTPRequestHandler):
    server: _Stub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        """Quiet (and AF_UNIX has no client address for the default line)."""

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-type", "text/plain" if self.path == "/_ping" else "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _record(self) -> None:
        with self.server.lock:
            self.server.requests.append(f"{self.command} {self.path}")

    def do_GET(self) -> None:
        self._record()
        path = self.path.split("?", 1)[0]
        if path == "/_ping" and self.server.versions is not None:
            time.sleep(self.server.ping_delay)  # widens the window in which concurrent callers race
            low, high = self.server.versions
            self._answer(200, b"OK", {"api-version": str(high), "min-api-version": str(low)})
        elif path.endswith("/messages") and self.server.served(path):
            self._answer(200, json.dumps({"messages": [{**MESSAGE, "id": 1}]}).encode())
        else:
            self._answer(404, b'{"error":"not_found","message":"no route","status":404}')

    def do_POST(self) -> None:
        self._record()
        self.rfile.read(int(self.headers.get("content-length", "0")))
        if self.path.endswith("/messages") and self.server.served(self.path):
            self._answer(201, json.dumps({**MESSAGE, "id": len(self.server.requests)}).encode())
        else:
            self._answer(404, b'{"error":"not_found","message":"no route","status":404}')


@contextlib.contextmanager
def stub(tmp: Path, versions: tuple[int, int] | None, ping_delay: float = 0.0) -> Iterator[_Stub]:
    server = _Stub(str(tmp / "stub.sock"), versions, ping_delay)
    with serving(server):
        yield server


class _Speaks1To2(Client):
    API_VERSIONS = (1, 2)


class _Speaks2To4(AsyncClient):
    API_VERSIONS = (2, 4)


# --- against the stub ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_class", "claimed", "expected"),
    [
        (Client, (1, 1), 1),
        (Client, (1, 3), 1),
        (_Speaks1To2, (1, 3), 2),
        (_Speaks1To2, (2, 5), 2),
        (_Speaks1To2, (1, 1), 1),
    ],
)
def test_the_highest_common_version_is_used(
    tmp_short: Path, client_class: type[Client], claimed: tuple[int, int], expected: int
) -> None:
    with stub(tmp_short, claimed) as server, client_class(server.path) as c:
        c.send("hi")
        c.messages(limit=3)
        assert c.api_version() == expected
        assert server.requests == [
            "GET /_ping",
            f"POST /v{expected}/messages",
            f"GET /v{expected}/messages?limit=3",
        ]


def test_the_async_client_picks_the_highest_common_version(tmp_short: Path) -> None:
    async def scenario(path: str) -> int | None:
        async with _Speaks2To4(path) as c:
            await c.send("hi")
            return await c.api_version()

    with stub(tmp_short, (1, 3)) as server:
        assert asyncio.run(scenario(str(server.path))) == 3
        assert server.requests == ["GET /_ping", "POST /v3/messages"]


@pytest.mark.parametrize(
    ("client_class", "claimed", "message"),
    [
        (
            Client,
            (2, 3),
            "serves API versions 2 to 3; this client speaks API version 1: "
            "no version in common, upgrade the client",
        ),
        (
            _Speaks1To2,
            (3, 3),
            "serves API version 3; this client speaks API versions 1 to 2: "
            "no version in common, upgrade the client",
        ),
    ],
)
def test_no_common_version_is_one_client_error(
    tmp_short: Path, client_class: type[Client], claimed: tuple[int, int], message: str
) -> None:
    with stub(tmp_short, claimed) as server, client_class(server.path) as c:
        with pytest.raises(ClientError) as info:
            c.send("never sent")
        assert str(info.value) == f"unix://{server.path} {message}"
        assert server.requests == ["GET /_ping"], "nothing is sent under a version the server lacks"


def test_a_newer_client_against_an_older_server_says_upgrade_the_server(tmp_short: Path) -> None:
    class Speaks4To5(Client):
        API_VERSIONS = (4, 5)

    with stub(tmp_short, (1, 2)) as server, Speaks4To5(server.path) as c:
        with pytest.raises(ClientError, match=r"serves API versions 1 to 2; .* speaks API versions 4 to 5: "):
            c.messages()
        with pytest.raises(ClientError, match=r"upgrade the server$"):
            c.messages()
        assert server.requests == ["GET /_ping", "GET /_ping"], "a failed negotiation is not cached"


def test_the_cli_prints_one_line_and_exits_1(tmp_short: Path) -> None:
    with stub(tmp_short, (2, 3)) as server:
        result = run_cli("--socket", str(server.path), "send", "hi")
        assert result.returncode == 1, result
        assert result.stdout == ""
        assert result.stderr.splitlines() == [
            f"Error: unix://{server.path} serves API versions 2 to 3; this client speaks "
            "API version 1: no version in common, upgrade the client"
        ]


def test_a_server_without_ping_gets_the_unversioned_paths(tmp_short: Path) -> None:
    with stub(tmp_short, None) as server, Client(server.path) as c:
        assert c.send("hi").text == "hi"
        assert [m.id for m in c.messages()] == [1]
        assert c.api_version() is None
        assert server.requests == ["GET /_ping", "POST /messages", "GET /messages"]
    with stub(tmp_short, None) as server:
        result = run_cli("--socket", str(server.path), "send", "hi")
        assert (result.returncode, result.stdout) == (0, "📥 Client received: Hello from server via UDS\n")


def test_threads_sharing_a_client_ping_once(tmp_short: Path) -> None:
    with stub(tmp_short, (1, 1), ping_delay=0.2) as server, Client(server.path) as c:
        barrier = threading.Barrier(8)
        errors: list[BaseException] = []

        def send(n: int) -> None:
            barrier.wait()
            try:
                c.send(f"thread {n}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert errors == []
        assert server.requests.count("GET /_ping") == 1
        assert server.requests.count("POST /v1/messages") == 8
        assert server.requests[0] == "GET /_ping"


def test_concurrent_async_tasks_ping_once(tmp_short: Path) -> None:
    async def scenario(path: str) -> None:
        async with AsyncClient(path) as c:
            await asyncio.gather(*(c.send(f"task {n}") for n in range(20)))
            await c.messages()

    with stub(tmp_short, (1, 1), ping_delay=0.2) as server:
        asyncio.run(scenario(str(server.path)))
        assert server.requests.count("GET /_ping") == 1
        assert server.requests.count("POST /v1/messages") == 20
        assert server.requests[0] == "GET /_ping"
        assert server.requests[-1] == "GET /v1/messages"


def test_probes_and_raw_gets_do_not_ping(tmp_short: Path) -> None:
    with stub(tmp_short, (1, 1)) as server, Client(server.path) as c:
        c.get("/healthz")
        c.get("/openapi.json")
        assert server.requests == ["GET /healthz", "GET /openapi.json"]


# --- against the real app claiming other versions, served by uvicorn ----------------------------

_SERVE = """
import sys, uvicorn
from app.config import Settings
from app.main import create_app
versions = tuple(int(v) for v in sys.argv[2].split(","))
app = create_app(Settings(store="memory"), api_versions=versions)
uvicorn.run(app, uds=sys.argv[1], log_level="warning", lifespan="on")
"""


@contextlib.contextmanager
def real_server(tmp: Path, versions: tuple[int, ...]) -> Iterator[str]:
    path = str(tmp / "real.sock")
    command = [sys.executable, "-c", _SERVE, path, ",".join(map(str, versions))]
    with Spawned(command, socket=path, cwd=ROOT, name="uvicorn") as server:
        server.wait_ready(20)
        yield path
        server.stop()


def test_real_servers_claiming_other_versions(tmp_short: Path) -> None:
    with real_server(tmp_short, (1, 2, 3)) as path:
        with _Speaks1To2(path) as c:
            sent = c.send("to v2")
            assert c.api_version() == 2
            assert c.message(sent.id).text == "to v2"
            assert c.version().extra["api_version"] == "3"
        with Client(path) as c:
            assert c.send("to v1").id == sent.id + 1
            assert c.api_version() == 1
    with real_server(tmp_short, (2, 3)) as path:
        with (
            Client(path) as c,
            pytest.raises(ClientError, match=r"no version in common, upgrade the client$"),
        ):
            c.send("never stored")
        result = run_cli("--socket", path, "messages")
        assert (result.returncode, result.stdout) == (1, "")
        assert len(result.stderr.splitlines()) == 1
        assert "serves API versions 2 to 3; this client speaks API version 1" in result.stderr
        assert run_cli("--socket", path, "health").returncode == 0, "the probes need no common version"
