"""Misbehaving clients, in process on the server's protocol (tests/app/protocol_harness.py): stalls
and deadlines, oversized heads, bad HTTP. The drain under load, which needs signals, runs against a
real server in test_faults.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest

from app.config import Settings
from tests.app.protocol_harness import Harness, Peer, harness
from tests.support import error_body, read_response

CONNECTIONS = "app.connections"
"""The protocol's logger."""
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
MEMORY = Settings(store="memory")


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """The protocol with the settings a test names in ``@pytest.mark.parametrize("server", ...)``."""
    settings: Settings = getattr(request, "param", MEMORY)
    with harness(settings) as made:
        yield made


def _with(**fields: object) -> list[Settings]:
    return [replace(MEMORY, **fields)]  # type: ignore[arg-type]


def _closed(conn: Peer) -> bool:
    """True once the server has closed the connection (the peer reads EOF)."""
    return conn.recv(65536) == b""


def _get(server: Harness, target: str = "/healthz") -> tuple[int, bytes]:
    with server.connect() as conn:
        conn.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target.encode())
        status, _, body = read_response(conn)
    return status, body


def _logged(caplog: pytest.LogCaptureFixture, level: int, message: str) -> bool:
    return any(
        r.name == CONNECTIONS and r.levelno == level and r.getMessage() == message for r in caplog.records
    )


@pytest.mark.parametrize("server", _with(request_timeout=0.5), indirect=True)
def test_stalled_head_gets_408_and_others_are_served(
    server: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    with server.connect() as stalled:
        stalled.sendall(b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Ty")
        assert _get(server)[0] == 200, "a stalled client must not block others"
        status, headers, body = read_response(stalled)
        assert status == 408
        assert headers["content-type"] == "application/json"
        assert headers["connection"] == "close"
        error_body(body, 408, "request_timeout")
        assert _closed(stalled)
    assert _get(server)[0] == 200
    cut = "Request not complete after 0.5s: answered 408 and closed the connection"
    assert _logged(caplog, logging.WARNING, cut)


@pytest.mark.parametrize("server", _with(request_timeout=0.5), indirect=True)
def test_silent_connection_is_closed(server: Harness, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, CONNECTIONS)
    with server.connect() as silent:
        assert _closed(silent)
        assert silent.transport.closed
    assert _logged(caplog, logging.INFO, "Closed a connection that sent no request for 0.5s")


@pytest.mark.parametrize("server", _with(request_timeout=0.5), indirect=True)
def test_slow_body_gets_408(server: Harness) -> None:
    with server.connect() as conn:
        conn.sendall(
            b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"text": "'
        )
        status, _, body = read_response(conn)
        assert status == 408
        error_body(body, 408, "request_timeout")
        assert _closed(conn)
    status, body = _get(server, "/messages")
    assert status == 200
    assert json.loads(body)["messages"] == [], "the cut-off request was not stored"


@pytest.mark.parametrize("server", _with(request_timeout=0.5), indirect=True)
def test_late_body_after_an_early_answer_is_closed_without_408(server: Harness) -> None:
    """The application answered without reading the body; a body that never ends is just cut off."""
    with server.connect() as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        status, _, _ = read_response(conn)
        assert status == 200
        assert _closed(conn), "no second response may follow the first"


@pytest.mark.parametrize("server", _with(request_timeout=0.3, keepalive_timeout=30.0), indirect=True)
def test_busy_connection_outlives_request_timeout(server: Harness, caplog: pytest.LogCaptureFixture) -> None:
    """The deadline is per request: a keep-alive connection may live and idle far longer."""
    with server.connect() as conn:
        buffer = bytearray()
        began = time.monotonic()
        count = 0
        while time.monotonic() - began < 1.5 or count < 10:  # several deadlines' worth of requests
            conn.sendall(HEALTHZ)
            assert read_response(conn, buffer)[0] == 200
            count += 1
            server.loop.run_until_complete(asyncio.sleep(0.01))  # requests spread over the deadlines
        conn.settimeout(1.0)  # idle for over three request timeouts: nothing may arrive
        with pytest.raises(TimeoutError):
            conn.recv(1)
        conn.settimeout(None)
        conn.sendall(HEALTHZ)
        assert read_response(conn, buffer)[0] == 200
    assert not any("Request not complete" in r.getMessage() for r in caplog.records)


def test_head_in_pieces_within_the_limit_is_served(server: Harness) -> None:
    with server.connect() as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\n")
        conn.sendall(b"Host: x\r\nX-Pad: " + b"p" * 20000)
        conn.sendall(b"\r\n\r\n")
        assert read_response(conn)[0] == 200


@pytest.mark.parametrize("server", _with(keepalive_timeout=0.3), indirect=True)
def test_keepalive_timeout_closes_idle_connection_between_requests(server: Harness) -> None:
    with server.connect() as conn:
        conn.sendall(HEALTHZ)
        assert read_response(conn)[0] == 200
        assert _closed(conn)
        assert conn.transport.closed


def test_too_many_headers_get_431(server: Harness) -> None:
    with server.connect() as conn:
        fields = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        status, headers, body = read_response(conn)
        assert status == 431
        assert headers["connection"] == "close"
        message = str(error_body(body, 431, "headers_too_large")["message"])
        assert message == "the request has more than 100 header fields"
        assert _closed(conn)
    assert _get(server)[0] == 200


def _send_until_refused(conn: Peer, data: bytes, limit: int) -> None:
    """Send ``data`` again and again until the server stops reading or ``limit`` bytes went out."""
    sent = 0
    while sent < limit:
        try:
            conn.sendall(data)
        except BrokenPipeError:
            return
        sent += len(data)


def test_endless_header_gets_431(server: Harness) -> None:
    """A header that never ends is cut off by size, not buffered until memory runs out."""
    with server.connect() as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        _send_until_refused(conn, b"a" * 8192, 2 * 1024 * 1024)
        assert conn.transport.closed, "the server stopped reading before 2 MiB"
        status, _, body = read_response(conn)
        assert status == 431
        message = str(error_body(body, 431, "headers_too_large")["message"])
        assert message == "the request head is over 32768 bytes"
        assert _closed(conn)
    assert _get(server)[0] == 200


def test_large_head_in_one_piece_gets_431(server: Harness) -> None:
    with server.connect() as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
        status, _, body = read_response(conn)
        assert status == 431
        error_body(body, 431, "headers_too_large")


@pytest.mark.parametrize("server", _with(max_body_bytes=200000, max_text_length=100000), indirect=True)
def test_large_body_is_not_mistaken_for_a_large_head(server: Harness) -> None:
    """Bodies beyond the head limit, pipelined on one connection, are not header overflow."""
    with server.connect() as conn:
        body = json.dumps({"text": "a" * 60000}).encode()
        one = (
            b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        ) + body
        conn.sendall(one * 3)
        buffer = bytearray()
        for _ in range(3):
            status, _, reply = read_response(conn, buffer)
            assert status == 201, reply


def test_garbage_gets_400_json(server: Harness) -> None:
    with server.connect() as conn:
        conn.sendall(b"\x16\x03\x01 this is not http\r\n\r\n")
        status, headers, body = read_response(conn)
        assert status == 400
        assert headers["content-type"] == "application/json"
        error_body(body, 400, "bad_request")
    assert _get(server)[0] == 200
