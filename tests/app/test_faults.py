"""Misbehaving clients and shutdown under load: stalls, oversized heads, bad HTTP, slow bodies."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest

from tests.support import (
    ServerProcess,
    http_over_uds,
    read_head,
    read_response,
    response_status,
    running_server,
    wait_until,
)

DEADLINE = 20.0
"""Socket read timeout in these tests: far above the server's timeouts, only there to fail, not wait."""


def _connect(path: str) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(DEADLINE)
    conn.connect(path)
    return conn


def _read_head(conn: socket.socket, buffer: bytearray) -> tuple[int, dict[str, str]]:
    found = read_head(conn, buffer)
    if found is None:
        raise AssertionError(f"connection closed before a whole response head: {bytes(buffer)!r}")
    head, headers = found
    return response_status(head), headers


def _closed(conn: socket.socket) -> bool:
    """True once the server has closed the connection (reads EOF; a reset counts too)."""
    try:
        return conn.recv(65536) == b""
    except ConnectionResetError:
        return True


def _error(body: bytes, status: int, code: str) -> dict[str, object]:
    data = json.loads(body)
    assert data["status"] == status
    assert data["error"] == code
    assert isinstance(data["message"], str)
    assert "\n" not in data["message"]
    return data


def _lines(server: ServerProcess) -> list[str]:
    return server.log_path.read_text(encoding="utf-8", errors="replace").splitlines()


def test_stalled_head_gets_408_and_others_are_served(tmp: Path) -> None:
    with running_server("--request-timeout", "0.5", tmp=tmp) as server:
        path = str(server.socket_path)
        stalled = _connect(path)
        try:
            stalled.sendall(b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Ty")
            assert http_over_uds(path)[0] == 200, "a stalled client must not block others"
            status, headers, body = read_response(stalled)
            assert status == 408
            assert headers["content-type"] == "application/json"
            assert headers["connection"] == "close"
            _error(body, 408, "request_timeout")
            assert _closed(stalled)
        finally:
            stalled.close()
        assert http_over_uds(path)[0] == 200
        cut = "WARNING Request not complete after 0.5s: answered 408 and closed the connection"
        assert cut in _lines(server)


def test_silent_connection_is_closed(tmp: Path) -> None:
    with running_server("--request-timeout", "0.5", tmp=tmp) as server:
        silent = _connect(str(server.socket_path))
        try:
            assert _closed(silent)
        finally:
            silent.close()
        closed = "Closed a connection that sent no request for 0.5s"
        wait_until(lambda: closed in _lines(server), what="log line")


def test_slow_body_gets_408(tmp: Path) -> None:
    with running_server("--request-timeout", "0.5", tmp=tmp) as server:
        conn = _connect(str(server.socket_path))
        try:
            conn.sendall(
                b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"text": "'
            )
            status, _, body = read_response(conn)
            assert status == 408
            _error(body, 408, "request_timeout")
            assert _closed(conn)
        finally:
            conn.close()
        status, body = http_over_uds(str(server.socket_path), "GET", "/messages")
        assert status == 200
        assert json.loads(body)["messages"] == [], "the cut-off request was not stored"


def test_late_body_after_an_early_answer_is_closed_without_408(tmp: Path) -> None:
    """The application answered without reading the body; a body that never ends is just cut off."""
    with running_server("--request-timeout", "0.5", tmp=tmp) as server:
        conn = _connect(str(server.socket_path))
        try:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            status, _, _ = read_response(conn)
            assert status == 200
            assert _closed(conn), "no second response may follow the first"
        finally:
            conn.close()


def test_busy_connection_outlives_request_timeout(tmp: Path) -> None:
    """The deadline is per request: a keep-alive connection may live and idle far longer."""
    import time

    with running_server("--request-timeout", "0.3", "--keepalive-timeout", "30", tmp=tmp) as server:
        conn = _connect(str(server.socket_path))
        try:
            buffer = bytearray()
            began = time.monotonic()
            count = 0
            while time.monotonic() - began < 1.5 or count < 10:  # several deadlines' worth of requests
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(conn, buffer)[0] == 200
                count += 1
            conn.settimeout(1.0)  # idle for over three request timeouts: nothing may arrive
            with pytest.raises(TimeoutError):
                conn.recv(1)
            conn.settimeout(DEADLINE)
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(conn, buffer)[0] == 200
        finally:
            conn.close()
        assert "Request not complete" not in "\n".join(_lines(server))


def test_head_in_pieces_within_the_limit_is_served(tmp: Path) -> None:
    with running_server(tmp=tmp) as server:
        conn = _connect(str(server.socket_path))
        try:
            conn.sendall(b"GET /healthz HTTP/1.1\r\n")
            conn.sendall(b"Host: x\r\nX-Pad: " + b"p" * 20000)
            conn.sendall(b"\r\n\r\n")
            assert read_response(conn)[0] == 200
        finally:
            conn.close()


def test_keepalive_timeout_closes_idle_connection_between_requests(tmp: Path) -> None:
    with running_server("--keepalive-timeout", "0.3", tmp=tmp) as server:
        conn = _connect(str(server.socket_path))
        try:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(conn)[0] == 200
            assert _closed(conn)
        finally:
            conn.close()


def test_too_many_headers_get_431(tmp: Path) -> None:
    with running_server(tmp=tmp) as server:
        conn = _connect(str(server.socket_path))
        try:
            fields = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
            status, headers, body = read_response(conn)
            assert status == 431
            assert headers["connection"] == "close"
            message = str(_error(body, 431, "headers_too_large")["message"])
            assert message == "the request has more than 100 header fields"
            assert _closed(conn)
        finally:
            conn.close()
        assert http_over_uds(str(server.socket_path))[0] == 200


def _send_until_refused(conn: socket.socket, data: bytes, limit: int) -> None:
    """Send ``data`` again and again until the server stops reading or ``limit`` bytes went out."""
    sent = 0
    while sent < limit:
        try:
            conn.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return
        sent += len(data)


def test_endless_header_gets_431(tmp: Path) -> None:
    """A header that never ends is cut off by size, not buffered until memory runs out."""
    with running_server(tmp=tmp) as server:
        conn = _connect(str(server.socket_path))
        try:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
            _send_until_refused(conn, b"a" * 8192, 2 * 1024 * 1024)
            status, _, body = read_response(conn)
            assert status == 431
            message = str(_error(body, 431, "headers_too_large")["message"])
            assert message == "the request head is over 32768 bytes"
            assert _closed(conn)
        finally:
            conn.close()
        assert http_over_uds(str(server.socket_path))[0] == 200


def test_large_head_in_one_piece_gets_431(tmp: Path) -> None:
    with running_server(tmp=tmp) as server:
        conn = _connect(str(server.socket_path))
        try:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
            status, _, body = read_response(conn)
            assert status == 431
            _error(body, 431, "headers_too_large")
        finally:
            conn.close()


def test_large_body_is_not_mistaken_for_a_large_head(tmp: Path) -> None:
    """Bodies beyond the head limit, pipelined on one connection, are not header overflow."""
    with running_server("--max-body-bytes", "200000", "--max-text-length", "100000", tmp=tmp) as server:
        conn = _connect(str(server.socket_path))
        try:
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
        finally:
            conn.close()


def test_garbage_gets_400_json(tmp: Path) -> None:
    with running_server(tmp=tmp) as server:
        conn = _connect(str(server.socket_path))
        try:
            conn.sendall(b"\x16\x03\x01 this is not http\r\n\r\n")
            status, headers, body = read_response(conn)
            assert status == 400
            assert headers["content-type"] == "application/json"
            _error(body, 400, "bad_request")
        finally:
            conn.close()
        assert http_over_uds(str(server.socket_path))[0] == 200


def _start_slow_post(path: str, body: bytes) -> socket.socket:
    """Send a POST's head and half its body; return once the application is reading the body.

    ``Expect: 100-continue`` makes uvicorn answer ``100 Continue`` when the application first asks
    for the body, so the test knows the request is in flight without sleeping.
    """
    conn = _connect(path)
    conn.sendall(
        b"POST /messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    buffer = bytearray()
    status, _ = _read_head(conn, buffer)
    assert status == 100
    conn.sendall(body[: len(body) // 2])
    return conn


def test_sigterm_during_slow_request_lets_it_finish(tmp: Path) -> None:
    path = str(tmp / "s.sock")
    body = json.dumps({"text": "Hello from client"}).encode()
    with ServerProcess(["--socket", path], socket_path=path) as server:
        server.wait_ready()
        conn = _start_slow_post(path, body)
        try:
            server.signal(15)
            wait_until(
                lambda: (
                    "Received SIGTERM: draining 1 connection(s), 1 request(s) in flight (up to 20s)"
                    in _lines(server)
                ),
                what="drain start",
            )
            wait_until(lambda: not os.path.exists(path) or _refused(path), what="listener closed")
            for i in range(len(body) // 2, len(body), 3):  # trickle the rest
                conn.sendall(body[i : i + 3])
            status, headers, reply = read_response(conn)
            assert status == 201
            assert json.loads(reply)["text"] == "Hello from client"
            assert headers["connection"] == "close"
        finally:
            conn.close()
        assert server.proc.wait(DEADLINE) == 0
        lines = _lines(server)
        assert any(re.fullmatch(r"Drain done in \d+\.\d\ds: all requests finished", line) for line in lines)
    assert not os.path.exists(path)


def _refused(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return True
    finally:
        probe.close()
    return False


def test_shutdown_timeout_when_client_never_finishes(tmp: Path) -> None:
    path = str(tmp / "s.sock")
    body = json.dumps({"text": "never finished"}).encode()
    with ServerProcess(
        ["--socket", path, "--shutdown-timeout", "0.5", "--request-timeout", "600"], socket_path=path
    ) as server:
        server.wait_ready()
        conn = _start_slow_post(path, body)
        try:
            server.signal(15)
            assert server.proc.wait(DEADLINE) == 0
        finally:
            conn.close()
        lines = _lines(server)
        timed_out = r"WARNING Drain timed out after \d+\.\d\ds: unfinished requests were cancelled"
        assert any(re.fullmatch(timed_out, line) for line in lines), lines
    assert not os.path.exists(path)
