"""Shutdown under load, on a real server process: a slow request in flight at SIGTERM finishes; one
that never does is cut at the shutdown timeout. (Stalls, deadlines, oversized heads and bad HTTP run
in process in test_protocol_limits.py.)"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

from tests.support import (
    ServerProcess,
    read_head,
    read_response,
    response_status,
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


def _lines(server: ServerProcess) -> list[str]:
    return server.log_path.read_text(encoding="utf-8", errors="replace").splitlines()


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
