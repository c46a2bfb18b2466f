"""One transparent retry when a reused keep-alive connection turns out closed, never a double store.

A relay between client and server stands in for the stale keep-alive race (HTTPX issue 2487): on a
chosen request of a connection it forwards the request to the real server (which stores the
message), then closes the client's connection without the response. Only a retry with the same
Idempotency-Key can then return the message without storing it twice.

The client's one ``GET /_ping`` (API version negotiation) is answered on a connection of its own
that the relay then closes, and is not counted: requests and connections count API calls only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import select
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client import AsyncClient, Client, ConnectError
from tests.support import read_message, running_server, serving, wait_until


def _read_http_message(sock: socket.socket) -> bytes | None:
    """One HTTP/1.1 message with a Content-Length body (or none), as raw bytes; None at EOF."""
    message = read_message(sock)
    if message is None:
        return None
    head, _, body = message
    return head + b"\r\n\r\n" + body


class _Relay(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, path: str, upstream: str, drop_request_number: int) -> None:
        self.upstream = upstream
        self.drop_request_number = drop_request_number
        self.connections = 0
        self.dropped = 0
        self.lock = threading.Lock()
        super().__init__(path, _RelayHandler)


class _RelayHandler(socketserver.BaseRequestHandler):
    server: _Relay

    def handle(self) -> None:
        client = self.request
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as upstream:
            upstream.connect(self.server.upstream)
            number = 0
            while True:
                request = _read_http_message(client)
                if request is None:
                    return
                upstream.sendall(request)
                response = _read_http_message(upstream)
                if response is None:
                    return
                if request.split(b" ", 2)[1] == b"/_ping":
                    status_line, rest = response.split(b"\r\n", 1)
                    client.sendall(status_line + b"\r\nconnection: close\r\n" + rest)
                    return
                number += 1
                if number == 1:
                    with self.server.lock:
                        self.server.connections += 1
                if number == self.server.drop_request_number:
                    with self.server.lock:
                        self.server.dropped += 1
                    return  # the server did the work; the client never hears back
                client.sendall(response)


@contextlib.contextmanager
def _relay(tmp: Path, upstream: str, drop_request_number: int) -> Iterator[_Relay]:
    relay = _Relay(str(tmp / "relay.sock"), upstream, drop_request_number)
    with serving(relay):
        yield relay


def _stored(server_path: str, text: str) -> int:
    with Client(server_path) as direct:
        return sum(1 for m in direct.messages(limit=1000) if m.text == text)


def test_dropped_reused_connection_is_retried_once_and_stored_once(server_path: str, tmp_short: Path) -> None:
    with _relay(tmp_short, server_path, drop_request_number=2) as relay, Client(relay.server_address) as c:
        first = c.send("before the drop")
        second = c.send("dropped then retried")
        assert second.text == "dropped then retried"
        assert second.id > first.id
        assert relay.dropped == 1
        assert relay.connections == 2  # the retry went out on a fresh connection
    assert _stored(server_path, "dropped then retried") == 1


def test_async_client_retries_a_dropped_reused_connection_once(server_path: str, tmp_short: Path) -> None:
    async def scenario(path: str) -> None:
        async with AsyncClient(path) as c:
            await c.send("async before")
            again = await c.send("async dropped then retried")
            assert again.text == "async dropped then retried"

    with _relay(tmp_short, server_path, drop_request_number=2) as relay:
        asyncio.run(scenario(str(relay.server_address)))
        assert relay.dropped == 1
    assert _stored(server_path, "async dropped then retried") == 1


def test_a_fresh_connection_that_fails_is_not_retried(server_path: str, tmp_short: Path) -> None:
    with _relay(tmp_short, server_path, drop_request_number=1) as relay, Client(relay.server_address) as c:
        with pytest.raises(ConnectError) as info:
            c.send("lost on a fresh connection")
        assert info.value.reason == "connection closed by the server"
        assert relay.connections == 1
    assert _stored(server_path, "lost on a fresh connection") == 1


def test_idle_connection_closed_by_the_server_is_not_reused(
    tmp_short: Path, caplog: pytest.LogCaptureFixture
) -> None:
    opened: list[socket.socket] = []

    def trace(event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_unix_socket.complete":
            opened.append(info["return_value"].get_extra_info("socket"))

    with running_server("--keepalive-timeout", "0.2", tmp=tmp_short) as server:
        assert server.socket_path is not None
        with Client(server.socket_path) as c, caplog.at_level(logging.DEBUG, logger="client"):
            assert c._http.get("/healthz", extensions={"trace": trace}).status_code == 200
            assert len(opened) == 1
            idle = opened[0]
            wait_until(
                lambda: bool(select.select([idle], [], [], 0)[0]),
                timeout=10,
                what="the server to close the idle connection",
            )
            assert c._http.get("/healthz", extensions={"trace": trace}).status_code == 200
            assert len(opened) == 2  # a fresh connection; the closed one was dropped, not tried
            c.send("two")
        assert "retrying once" not in caplog.text
