"""``uds-client proxy``: TCP to the Unix socket, as a byte pipe, in a real subprocess.

Data-path tests run against small servers started here (a raw echo server shows streaming,
backpressure and half-close byte for byte); the end-to-end tests run the real ``uds-server``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import socketserver
import struct
import subprocess
import threading
from collections.abc import Iterator

import psutil
import pytest

from client._errors import UsageError
from client.cli.proxy import is_loopback, parse_listen
from tests.support import PYTHON, ROOT, running_server, short_tmpdir, wait_until

# ---------------------------------------------------------------------------------------------
# --listen parsing


@pytest.mark.parametrize(
    ("value", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        (":8080", "127.0.0.1", 8080),
        ("8080", "127.0.0.1", 8080),
        ("0", "127.0.0.1", 0),
        ("localhost:1", "localhost", 1),
        ("0.0.0.0:80", "0.0.0.0", 80),
        ("[::1]:8080", "::1", 8080),
        ("[::]:65535", "::", 65535),
        (" 127.0.0.1:9 ", "127.0.0.1", 9),
    ],
)
def test_parse_listen(value: str, host: str, port: int) -> None:
    assert parse_listen(value) == (host, port)


@pytest.mark.parametrize(
    "value", ["", "abc", "127.0.0.1:", "127.0.0.1:http", "1.2.3.4:65536", "::1:80", "[::1]80", "[::1", "-1",
              "a b:80"],
)
def test_parse_listen_rejects_bad_values_quoting_them(value: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_listen(value)
    assert f"invalid --listen {value!r}" in str(info.value)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True),
     ("0.0.0.0", False), ("::", False), ("10.0.0.1", False)],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


# ---------------------------------------------------------------------------------------------
# Helpers: servers on a socket, and the proxy in a subprocess


class _EchoHandler(socketserver.BaseRequestHandler):
    """Echoes every byte as it arrives; after the client's EOF says so, then closes."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        # The proxy's startup check connects and leaves at once: the pipe may be gone already.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while data := sock.recv(65536):
                sock.sendall(data)
            sock.sendall(b"<eof seen>")


class _HTTPHandler(socketserver.StreamRequestHandler):
    """Minimal HTTP/1.1 with keep-alive: GET /healthz, and POST /echo answering with the body.

    Its server keeps socketserver's listen backlog of 5, so 50 connections at once also show that
    the proxy retries while the socket's backlog is full.
    """

    def handle(self) -> None:
        while True:
            line = self.rfile.readline()
            if not line:
                return
            method, target, _ = line.decode().split(" ", 2)
            headers = {}
            while (h := self.rfile.readline()) not in (b"\r\n", b""):
                name, _, value = h.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = self.rfile.read(int(headers.get("content-length", "0")))
            answer = body if method == "POST" else json.dumps({"status": "ok", "target": target}).encode()
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             + f"Content-Length: {len(answer)}\r\n\r\n".encode() + answer)
            self.wfile.flush()


@contextlib.contextmanager
def unix_server(handler: type[socketserver.BaseRequestHandler]) -> Iterator[str]:
    directory = short_tmpdir("px")
    path = str(directory / "s.sock")
    server = socketserver.ThreadingUnixStreamServer(path, handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.rmdir(directory)


class Proxy:
    """``uds-client proxy`` in a subprocess; ``port`` is read from its startup line."""

    def __init__(self, socket_path: str, *args: str, listen: str = "127.0.0.1:0") -> None:
        self.log_path = short_tmpdir("pxlog") / "proxy.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "client", "--socket", socket_path, "proxy", "--listen", listen, *args],
            stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.port = 0
        self._final: str | None = None

    @property
    def output(self) -> str:
        if self._final is not None:
            return self._final
        return self.log_path.read_text(errors="replace")

    def wait_listening(self) -> Proxy:
        def listening() -> int | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited with {self.proc.returncode}:\n{self.output}")
            found = re.search(r"Proxy listening on http://\S+:(\d+) ", self.output)
            return int(found.group(1)) if found else None

        self.port = wait_until(listening, timeout=15, what="the proxy's startup line")
        return self

    def wait_output(self, pattern: str) -> re.Match[str]:
        return wait_until(lambda: re.search(pattern, self.output), timeout=15, what=f"{pattern!r} in the log")

    def wait_exit(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.wait_exit()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        self._final = self.output
        with contextlib.suppress(OSError):
            self.log_path.unlink()
            self.log_path.parent.rmdir()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def recv_until_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def http_get(port: int, target: str) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


# ---------------------------------------------------------------------------------------------
# Data path


def test_half_close_and_streaming_both_ways() -> None:
    with unix_server(_EchoHandler) as path, Proxy(path) as proxy:
        proxy.wait_listening()
        sock = connect(proxy.port)
        sock.sendall(b"hello")
        assert sock.recv(5) == b"hello"
        sock.shutdown(socket.SHUT_WR)  # half-close: the server still answers after our EOF
        assert recv_until_eof(sock) == b"<eof seen>"
        sock.close()
        proxy.wait_output(r"proxy #1 close 127\.0\.0\.1:\d+: 5 B to socket, 15 B to client, [\d.]+ s\n")
        assert proxy.stop() == 0
    assert re.search(r"proxy #1 open 127\.0\.0\.1:\d+ -> unix://" + re.escape(path), proxy.output)


def test_a_client_reset_closes_both_sides_and_is_logged() -> None:
    with unix_server(_EchoHandler) as path, Proxy(path) as proxy:
        proxy.wait_listening()
        sock = connect(proxy.port)
        sock.sendall(b"ping")
        assert sock.recv(4) == b"ping"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # with linger 0: an RST, not a FIN
        proxy.wait_output(r"proxy #1 close 127\.0\.0\.1:\d+: 4 B to socket, 4 B to client, [\d.]+ s "
                          r"\(client to socket stopped: connection reset by peer\)\n")
        assert proxy.stop() == 0
    assert "closed 0 open connection(s)" in proxy.output


def test_backpressure_holds_a_large_transfer_and_delivers_it_exactly() -> None:
    payload = os.urandom(64 * 1024 * 1024)
    with unix_server(_EchoHandler) as path, Proxy(path) as proxy:
        proxy.wait_listening()
        rss_before = psutil.Process(proxy.proc.pid).memory_info().rss
        sock = connect(proxy.port)
        sent = [0]

        def send() -> None:
            view = memoryview(payload)
            for start in range(0, len(payload), 1 << 20):
                sock.sendall(view[start : start + (1 << 20)])
                sent[0] = start + (1 << 20)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        # Nobody reads yet: the echo server blocks, so the proxy must stop reading, so the sender
        # blocks long before 64 MiB, instead of the proxy buffering it all.
        seen: list[int] = []

        def sender_blocked() -> bool:
            seen.append(sent[0])
            return len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]

        wait_until(sender_blocked, timeout=30, interval=0.05, what="the sender to block")
        assert sent[0] < len(payload) // 2, f"the proxy absorbed {sent[0]} bytes without backpressure"
        grown = psutil.Process(proxy.proc.pid).memory_info().rss - rss_before
        assert grown < 16 * 1024 * 1024, f"proxy memory grew by {grown} bytes while the transfer stalled"
        received = recv_until_eof(sock)
        sender.join(30)
        sock.close()
        assert received == payload + b"<eof seen>"
        proxy.wait_output(f"{len(payload)} B to socket, {len(payload) + 10} B to client")
        assert proxy.stop() == 0


def test_keep_alive_and_many_concurrent_connections() -> None:
    with unix_server(_HTTPHandler) as path, Proxy(path, "--quiet") as proxy:
        proxy.wait_listening()
        conns = [http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10) for _ in range(50)]
        try:
            for round_ in range(3):  # the same TCP connections carry several requests each
                for i, conn in enumerate(conns):
                    conn.request("POST", "/echo", body=f"{round_}-{i}".encode())
                for i, conn in enumerate(conns):
                    response = conn.getresponse()
                    assert (response.status, response.read()) == (200, f"{round_}-{i}".encode())
        finally:
            for conn in conns:
                conn.close()
        assert proxy.stop() == 0
    assert "proxy #" not in proxy.output  # --quiet: no per-connection lines
    assert "Proxy stopped (SIGTERM)" in proxy.output


# ---------------------------------------------------------------------------------------------
# Startup, errors and shutdown


def test_startup_lines_say_loopback_and_print_the_docs_url() -> None:
    with unix_server(_HTTPHandler) as path, Proxy(path) as proxy:
        proxy.wait_listening()
        out = proxy.output
        assert f"Proxy listening on http://127.0.0.1:{proxy.port} (loopback only) -> unix://{path}" in out
        assert f"Docs: http://127.0.0.1:{proxy.port}/docs" in out
        assert "WARNING" not in out
        assert proxy.stop(signal.SIGINT) == 0
    assert "Proxy stopped (SIGINT)" in proxy.output


def test_non_loopback_listen_warns_loudly() -> None:
    with unix_server(_HTTPHandler) as path, Proxy(path, listen="0.0.0.0:0") as proxy:
        proxy.wait_listening()
        out = proxy.output
        assert "(REACHABLE FROM OTHER MACHINES)" in out
        assert "WARNING: 0.0.0.0:" in out
        assert "is not a loopback address" in out
        assert f"Docs: http://127.0.0.1:{proxy.port}/docs" in out
        assert http_get(proxy.port, "/healthz")[0] == 200
        assert proxy.stop() == 0


def test_unreachable_socket_at_start_exits_3_with_one_line() -> None:
    directory = short_tmpdir("px")
    path = str(directory / "missing.sock")
    with Proxy(path) as proxy:
        assert proxy.wait_exit() == 3
        assert proxy.output == (
            f"Error: cannot connect to unix://{path} (no such file). Is the server running?\n"
        )
    os.rmdir(directory)


def test_port_in_use_exits_2_with_one_line() -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with unix_server(_HTTPHandler) as path, Proxy(path, listen=f"127.0.0.1:{port}") as proxy:
            assert proxy.wait_exit() == 2
            assert proxy.output == (
                f"Error: cannot listen on 127.0.0.1:{port} (address already in use). "
                "Stop what uses it or choose another address with --listen.\n"
            )
    finally:
        taken.close()


def test_bad_listen_value_exits_2() -> None:
    with unix_server(_HTTPHandler) as path, Proxy(path, listen="127.0.0.1:http") as proxy:
        assert proxy.wait_exit() == 2
        assert proxy.output.startswith("Error: invalid --listen '127.0.0.1:http'")
        assert proxy.output.count("\n") == 1


def test_socket_gone_later_answers_502_in_the_shared_error_shape() -> None:
    with unix_server(_HTTPHandler) as path, Proxy(path) as proxy:
        proxy.wait_listening()
        assert http_get(proxy.port, "/healthz") == (200, {"status": "ok", "target": "/healthz"})
        os.unlink(path)  # the server's socket disappears while the proxy runs
        status, body = http_get(proxy.port, "/healthz")
        assert status == 502
        assert body == {
            "error": "bad_gateway",
            "message": f"cannot connect to unix://{path} (no such file). Is the server running?",
            "status": 502,
        }
        assert proxy.stop() == 0
    assert f"cannot connect to unix://{path} (no such file). Is the server running? (answered 502)" in (
        proxy.output
    )


def test_sigterm_closes_open_connections_and_exits_0() -> None:
    with unix_server(_EchoHandler) as path, Proxy(path) as proxy:
        proxy.wait_listening()
        socks = [connect(proxy.port) for _ in range(3)]
        for sock in socks:
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        assert proxy.stop(signal.SIGTERM) == 0
        for sock in socks:
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""  # closed by the proxy
            sock.close()
        assert "Proxy stopped (SIGTERM): closed 3 open connection(s)" in proxy.output
        with pytest.raises(ConnectionRefusedError):
            connect(proxy.port)


# ---------------------------------------------------------------------------------------------
# End to end with the real server


def test_real_server_through_the_proxy() -> None:
    with running_server() as server, Proxy(str(server.socket_path)) as proxy:
        proxy.wait_listening()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            conn.request("POST", "/messages", body=json.dumps({"text": "Hello from client"}),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            message = json.loads(response.read())
            assert response.status == 201
            assert message["reply"] == "Hello from server via UDS"
            # The server sees the proxy process as its peer.
            assert message["peer"]["pid"] == proxy.proc.pid
            conn.request("GET", f"/messages/{message['id']}")  # same TCP connection (keep-alive)
            response = conn.getresponse()
            assert (response.status, json.loads(response.read())["text"]) == (200, "Hello from client")
            conn.request("GET", "/nope")
            response = conn.getresponse()
            body = json.loads(response.read())
            assert (response.status, body["status"], body["error"]) == (404, 404, body["error"])
        finally:
            conn.close()
        # A client that half-closes after its request still gets the whole answer.
        sock = connect(proxy.port)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        answer = recv_until_eof(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b'{"status":"ok"}')
        for target in ("/docs", "/redoc", "/openapi.json"):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("GET", target)
            response = conn.getresponse()
            assert response.status == 200, target
            response.read()
            conn.close()
        assert proxy.stop() == 0
