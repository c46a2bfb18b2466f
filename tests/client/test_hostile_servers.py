"""The client against servers that misbehave on purpose, over real sockets with raw bytes:
one that drips its answer a byte at a time, one that sends far too much, one whose JSON has the
wrong shape. ``timeout`` bounds the whole request and the client reads at most what it allows."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx2
import pytest

from client import AsyncClient, Client, ClientError, ConnectError
from client._client import DEFAULT_MAX_RESPONSE_BYTES
from tests.client.conftest import DRIP_INTERVAL, Drip, answering, json_answer, raw_server
from tests.support import PYTHON, ROOT, read_message, running_server

TIMEOUT = 1.0


def _bounded(elapsed: float, drip: Drip) -> None:
    """The request ended within twice the timeout (plus 1 s), though the server kept making progress."""
    assert elapsed < TIMEOUT * 2 + 1, f"took {elapsed:.2f}s with timeout={TIMEOUT}"
    # Bytes kept coming faster than any single read would time out: only a whole-request deadline stops it.
    assert drip.sent >= int(TIMEOUT / DRIP_INTERVAL) - 2
    assert len(drip.answer) * DRIP_INTERVAL > 100 * TIMEOUT


def test_client_timeout_bounds_the_whole_request(dripping: tuple[str, Drip]) -> None:
    path, drip = dripping
    started = time.monotonic()
    with Client(path, timeout=TIMEOUT) as c, pytest.raises(ConnectError) as info:
        c.health()
    _bounded(time.monotonic() - started, drip)
    assert info.value.reason == "timed out"


def test_async_client_timeout_bounds_the_whole_request(dripping: tuple[str, Drip]) -> None:
    path, drip = dripping

    async def scenario() -> None:
        async with AsyncClient(path, timeout=TIMEOUT) as c:
            await c.health()

    started = time.monotonic()
    with pytest.raises(ConnectError) as info:
        asyncio.run(scenario())
    _bounded(time.monotonic() - started, drip)
    assert info.value.reason == "timed out"


def test_async_client_bounds_a_callers_httpx2_client_too(dripping: tuple[str, Drip]) -> None:
    path, drip = dripping

    async def scenario() -> None:
        transport = httpx2.AsyncHTTPTransport(uds=path, verify=False)
        async with httpx2.AsyncClient(transport=transport, base_url="http://localhost") as http:
            await AsyncClient(path, timeout=TIMEOUT, http_client=http).health()

    started = time.monotonic()
    with pytest.raises(ConnectError) as info:
        asyncio.run(scenario())
    _bounded(time.monotonic() - started, drip)
    assert info.value.reason == "timed out"


def test_probe_timeout_bounds_the_whole_probe(dripping: tuple[str, Drip]) -> None:
    from client import probe

    path, drip = dripping
    started = time.monotonic()
    with pytest.raises(ConnectError) as info:
        probe(path, timeout=TIMEOUT)
    _bounded(time.monotonic() - started, drip)
    assert info.value.reason == "timed out"


# --- how much the client reads -------------------------------------------------------------------


def _sized(size: int, *, declared: bool) -> bytes:
    body = b'"' + b"x" * (size - 2) + b'"'
    length = b"content-length: %d\r\n" % size if declared else b""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n" + length + b"connection: close\r\n\r\n"
    return head + body


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "read-to-close"])
def test_an_answer_over_max_response_bytes_is_refused(tmp_short: Path, declared: bool) -> None:
    with (
        raw_server(str(tmp_short / "big.sock"), answering(_sized(2000, declared=declared))) as path,
        Client(path, max_response_bytes=1999) as c,
        pytest.raises(ClientError) as info,
    ):
        c.get("/big")
    assert str(info.value) == (
        f"unix://{path} answered GET /big with more than 1999 bytes; refusing to read it (max_response_bytes)"
    )
    with (
        raw_server(str(tmp_short / "fits.sock"), answering(_sized(2000, declared=declared))) as path,
        Client(path, max_response_bytes=2000) as c,
    ):
        assert len(c.get("/big").content) == 2000


def test_a_compressed_answer_is_capped_by_what_it_decodes_to(tmp_short: Path) -> None:
    """A server may compress though asked not to (``accept-encoding: identity``): HTTPX decodes it,
    so the cap counts decoded bytes; 20 MB of zeros arrive as about 20 KB."""
    import gzip

    body = gzip.compress(b" " * 20_000_000)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-encoding: gzip\r\n"
    answer = head + b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body
    with (
        raw_server(str(tmp_short / "gz.sock"), answering(answer)) as path,
        Client(path, max_response_bytes=1_000_000) as c,
        pytest.raises(ClientError) as info,
    ):
        c.get("/big")
    assert "with more than 1000000 bytes; refusing to read it (max_response_bytes)" in str(info.value)


def test_the_default_cap_holds_a_full_history_of_maximum_size_messages(tmp_short: Path) -> None:
    text = "\U0001d11e" * 4096  # the longest text the server accepts: 4,096 four-byte characters
    with running_server(tmp=tmp_short) as server, Client(server.socket_path) as c:
        for _ in range(1000):
            c.send(text)
        raw = c.get("/messages?limit=1000")
        assert raw.status == 200
        assert len(raw.json()["messages"]) == 1000
        assert len(raw.content) * 1.25 < DEFAULT_MAX_RESPONSE_BYTES  # room to spare
        assert len(c.messages(limit=1000)) == 1000


def _flood(total: int) -> tuple[threading.Event, object]:
    sent = threading.Event()

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        if read_message(conn) is None:
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n")
        chunk = b"x" * (1 << 20)
        for _ in range(total // len(chunk)):
            if stop.is_set():
                return
            conn.sendall(chunk)
        sent.set()

    return sent, handle


def test_a_300_mb_answer_stays_far_from_the_clients_memory(tmp_short: Path) -> None:
    """``uds-client get`` against 300 MB without a length: one error line, RSS bounded by the cap."""
    total = 300 << 20
    sent, handle = _flood(total)
    # VmHWM: this process's peak RSS (ru_maxrss would carry the forking test process's peak over exec).
    code = (
        "import sys\n"
        "from client.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "status = open('/proc/self/status').read()\n"
        "print(rc, int(status.split('VmHWM:')[1].split()[0]) * 1024)\n"
    )
    with raw_server(str(tmp_short / "flood.sock"), handle) as path:  # type: ignore[arg-type]
        result = subprocess.run(
            [PYTHON, "-c", code, "--socket", path, "get", "/messages"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            check=False,
        )
    rc, peak = result.stdout.split()
    assert rc == "1", result.stderr
    assert result.stderr == (
        f"Error: unix://{path} answered GET /messages with more than {DEFAULT_MAX_RESPONSE_BYTES} bytes; "
        "refusing to read it (max_response_bytes)\n"
    )
    assert not sent.is_set()  # the client stopped reading long before the end
    assert int(peak) < DEFAULT_MAX_RESPONSE_BYTES + (80 << 20), f"peak RSS {int(peak) >> 20} MiB"
    assert int(peak) < total / 3


# --- JSON of the wrong shape --------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{}", b"[]", b'"text"', b"null", b'{"id": "x", "text": 1}'])
def test_a_201_that_is_not_a_message_is_one_client_error(tmp_short: Path, body: bytes) -> None:
    with (
        raw_server(str(tmp_short / "odd.sock"), answering(json_answer(201, body, "Created"))) as path,
        Client(path) as c,
        pytest.raises(ClientError) as info,
    ):
        c.send("x")
    assert type(info.value) is ClientError
    assert str(info.value).startswith("the server's answer is not a message: ")


@pytest.mark.parametrize("body", [b"{}", b'{"messages": 5}', b'{"messages": [{}]}', b"[1]"])
def test_a_message_list_of_the_wrong_shape_is_one_client_error(tmp_short: Path, body: bytes) -> None:
    with (
        raw_server(str(tmp_short / "odd.sock"), answering(json_answer(200, body, "OK"))) as path,
        Client(path) as c,
        pytest.raises(ClientError, match="not a list of messages"),
    ):
        c.messages()


@pytest.mark.parametrize(
    "body", [b"{}", b'{"app": "1.0.0"}', b'{"app": 1, "python": "3", "uvicorn": "0", "fastapi": "0"}']
)
def test_versions_of_the_wrong_shape_are_one_client_error(tmp_short: Path, body: bytes) -> None:
    """Not blanks and exit 0: every version the command prints must be there."""
    with (
        raw_server(str(tmp_short / "odd.sock"), answering(json_answer(200, body, "OK"))) as path,
        Client(path) as c,
        pytest.raises(ClientError, match="not a list of versions"),
    ):
        c.version()
