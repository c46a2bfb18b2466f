"""A lean health probe: one HTTP/1.1 request over AF_UNIX with nothing but ``socket``.

``uds-client health`` runs as an exec probe every few seconds: it imports neither httpx2 nor
``http.client`` (docs/performance.md (e)). ``Connection: close`` lets EOF frame the response;
``timeout`` bounds the whole probe, each step waiting only for what is left of it.
"""

from __future__ import annotations

import socket
import time

from client._errors import ConnectError
from client.address import to_url

_MAX_RESPONSE = 1 << 20


class _BadResponse(Exception):
    """The peer answered something that is not HTTP/1.x."""


def probe(path: str, target: str = "/healthz", *, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``target`` on the socket at ``path``; return (status, body) or raise :class:`ConnectError`."""
    request = f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode("ascii")
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            _wait_until(sock, deadline)
            sock.connect(path)
            _wait_until(sock, deadline)
            sock.sendall(request)
            data = _read_all(sock, deadline)
        return _parse(data)
    except (OSError, _BadResponse) as exc:
        raise ConnectError.caused_by(to_url(path), exc) from exc


def _wait_until(sock: socket.socket, deadline: float) -> None:
    """Let the next socket call wait only for what is left before ``deadline``."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the probe's deadline has passed")
    sock.settimeout(left)


def _read_all(sock: socket.socket, deadline: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while size <= _MAX_RESPONSE:
        _wait_until(sock, deadline)
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _parse(data: bytes) -> tuple[int, bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    status_line, _, header_block = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if not sep or len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise _BadResponse("the server did not answer with HTTP/1.x")
    headers = header_block.lower()
    if b"transfer-encoding: chunked" in headers:
        body = _unchunk(body)
    return int(parts[1]), body


def _unchunk(body: bytes) -> bytes:
    out: list[bytes] = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0], 16)
        except ValueError:
            raise _BadResponse("bad chunked encoding from the server") from None
        if size == 0:
            break
        out.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(out)
