"""Early answers over a real Unix socket: a client still sending its body reads the whole answer.

The application answers 413, 415 or 403 before reading the body; the connection must then close
lingering (half-close, discard what still comes), never with a reset the client meets on its read.
"""

from __future__ import annotations

import os
import select
import socket
from collections.abc import Iterator

import pytest

from tests.support import ServerProcess, error_body, response_status, running_server

DEADLINE = 20.0
"""Socket timeout: far above the 2 s linger, only there to fail."""
JSON_HEAD = (
    b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n"
)
TEXT_HEAD = JSON_HEAD.replace(b"application/json", b"text/plain")


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with running_server() as proc:
        yield proc


@pytest.fixture(scope="module")
def refusing() -> Iterator[ServerProcess]:
    """A server whose allowlist admits another uid only: every API request gets 403."""
    with running_server(env={"UDS_ALLOW_UID": str(os.getuid() + 12345)}) as proc:
        yield proc


def _answer_then_send_on(path: str, head: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``head``, wait for the answer, send 64 KiB more of the body, then read to EOF."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(DEADLINE)
        conn.connect(path)
        conn.sendall(head)
        readable, _, _ = select.select([conn], [], [], DEADLINE)
        assert readable, "no answer to the head"
        received = bytearray()
        try:
            conn.sendall(b"x" * 65536)  # the body goes on after the answer: discarded, not a broken pipe
            while chunk := conn.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError) as exc:
            pytest.fail(f"reset after the early answer ({exc!r}), having read {bytes(received)!r}")
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = (line.partition(":") for line in lines[1:])
    headers = {name.strip().lower(): value.strip() for name, _, value in fields}
    assert len(body) == int(headers["content-length"]), f"the answer was cut: {bytes(received)!r}"
    return response_status(head), headers, body


@pytest.mark.parametrize(
    ("head", "status", "code"),
    [
        (JSON_HEAD % 100_000_000, 413, "payload_too_large"),
        (TEXT_HEAD % 1_000_000, 415, "unsupported_media_type"),
    ],
)
def test_an_early_answer_lingers(server: ServerProcess, head: bytes, status: int, code: str) -> None:
    assert server.socket_path
    got, headers, body = _answer_then_send_on(server.socket_path, head)
    assert got == status
    assert headers["connection"] == "close"
    error_body(body, status, code)


def test_a_refused_peer_still_sending_its_body_reads_the_403(refusing: ServerProcess) -> None:
    assert refusing.socket_path
    got, headers, body = _answer_then_send_on(refusing.socket_path, JSON_HEAD % 1_000_000)
    assert got == 403
    assert headers["connection"] == "close"
    error_body(body, 403, "forbidden")
