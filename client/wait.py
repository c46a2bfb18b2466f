"""Reaching the socket with nothing but the stdlib: :func:`probe`, one HTTP/1.1 request, so an exec
probe imports neither httpx2 nor ``http.client``, and :func:`wait_for_socket`, which repeats it
until the server answers (docs/internals.md, "Client")."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

from client._errors import ConnectError, WaitTimeout
from client.address import to_url

_MAX_RESPONSE = 1 << 20


def probe(path: str, target: str = "/healthz", *, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``target`` on the socket at ``path`` within ``timeout`` seconds in all; return (status,
    body) or raise :class:`ConnectError`. ``Connection: close`` lets EOF frame the answer."""
    request = f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode("ascii")
    deadline = time.monotonic() + timeout

    def within(sock: socket.socket) -> socket.socket:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the probe's deadline has passed")
        sock.settimeout(left)
        return sock

    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            within(sock).connect(path)
            within(sock).sendall(request)
            data = bytearray()
            while len(data) <= _MAX_RESPONSE and (chunk := within(sock).recv(65536)):
                data += chunk
        return _parse(bytes(data))
    except (OSError, ValueError) as exc:  # ValueError: the peer's answer is not HTTP/1.x
        raise ConnectError.caused_by(to_url(path), exc) from exc


def _parse(data: bytes) -> tuple[int, bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    status_line, _, header_block = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError("the server did not answer with HTTP/1.x")
    if b"transfer-encoding: chunked" not in header_block.lower():
        return int(parts[1]), body
    out: list[bytes] = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0], 16)
        except ValueError:
            raise ValueError("bad chunked encoding from the server") from None
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return int(parts[1]), b"".join(out)


def wait_for_socket(
    path: str,
    timeout: float,
    *,
    first_delay: float = 0.02,
    max_delay: float = 1.0,
    on_retry: Callable[[str, float], None] | None = None,
) -> float:
    """Poll ``GET /healthz`` until the server answers (any status); return the seconds waited.
    Pauses double from ``first_delay`` to ``max_delay``, each after ``on_retry(reason, pause)``;
    on the deadline :class:`WaitTimeout`."""
    started = time.monotonic()
    deadline = started + timeout
    delay = first_delay
    while True:
        try:
            probe(path, timeout=max(min(deadline - time.monotonic(), 5.0), 0.05))
            return time.monotonic() - started
        except ConnectError as exc:
            last = exc
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise WaitTimeout(to_url(path), time.monotonic() - started, last.reason) from last
        pause = min(delay, remaining)
        if on_retry is not None:
            on_retry(last.reason, pause)
        time.sleep(pause)
        delay = min(delay * 2, max_delay)
