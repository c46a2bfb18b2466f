"""``uds-client proxy``: loopback TCP to the Unix socket, checked request by request, in a subprocess.

The proxy must never widen who can use the API: callers are admitted by uid (what the socket's
permissions allow them) or by the token it prints; Host and Origin must be its own; the server
learns who is behind it. Data-path tests run against a small HTTP server started here (it shows
what reached the socket); the end-to-end tests run the real ``uds-server``, and the uid tests run
callers as uid 65534 (the suite runs as root, as CI does).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from client._errors import UsageError
from client._models import Message
from client.cli.proxy import caller as _caller
from client.cli.proxy.caller import find_caller, tcp_owner
from client.cli.proxy.command import allowed_hosts, is_loopback, parse_listen
from client.cli.proxy.permissions import SocketAccess, traversal
from tests.support import (
    NOBODY,
    PYTHON,
    ROOT,
    http_over_uds,
    open_files_of,
    python_as_nobody,
    python_with_open_files,
    running_server,
    serving,
    short_tmpdir,
    wait_until,
)

SOCKET_GID = 4242  # a group uid 65534 is in only when a test adds it

# ---------------------------------------------------------------------------------------------
# --listen parsing and the Host names the proxy answers to


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
    "value",
    ["", "abc", "127.0.0.1:", "127.0.0.1:http", "1.2.3.4:65536", "::1:80", "[::1]80", "[::1", "-1", "a b:80"],
)
def test_parse_listen_rejects_bad_values_quoting_them(value: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_listen(value)
    assert f"invalid --listen {value!r}" in str(info.value)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_allowed_hosts() -> None:
    assert allowed_hosts("127.0.0.1", 8080) == {"127.0.0.1:8080", "localhost:8080", "[::1]:8080"}
    assert allowed_hosts("::1", 9) == {"[::1]:9", "127.0.0.1:9", "localhost:9"}
    assert allowed_hosts("0.0.0.0", 8080, ["Box.Example:9000"]) == {
        "0.0.0.0:8080",
        "127.0.0.1:8080",
        "localhost:8080",
        "[::1]:8080",
        "box.example:9000",
    }
    assert "localhost" in allowed_hosts("127.0.0.1", 80)  # port 80 may be left out of Host
    assert allowed_hosts("10.0.0.1", 8080) == {"10.0.0.1:8080"}


# ---------------------------------------------------------------------------------------------
# Who owns a TCP connection, and may that user connect to the socket


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_tcp_owner_names_the_uid_and_inode_of_the_connecting_socket(family: int, host: str) -> None:
    with socket.socket(family) as listener:
        listener.bind((host, 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()[:2]) as client:
            accepted, peer = listener.accept()
            with accepted:
                found = tcp_owner(peer[:2], accepted.getsockname()[:2])
                assert found == (os.geteuid(), os.fstat(client.fileno()).st_ino)
                # The accepted side is not the caller: swapped addresses find the proxy's own socket.
                swapped = tcp_owner(accepted.getsockname()[:2], peer[:2])
                assert swapped == (os.geteuid(), os.fstat(accepted.fileno()).st_ino)
                assert tcp_owner(("127.0.0.1", 1), accepted.getsockname()[:2]) is None


def test_tcp_owner_on_a_dual_stack_listener() -> None:
    with socket.socket(socket.AF_INET6) as listener:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", 0))
        listener.listen()
        with socket.create_connection(("127.0.0.1", listener.getsockname()[1])) as client:
            accepted, peer = listener.accept()
            with accepted:
                assert peer[0] == "::ffff:127.0.0.1"
                assert tcp_owner(peer[:2], accepted.getsockname()[:2]) == (
                    os.geteuid(),
                    os.fstat(client.fileno()).st_ino,
                )


_CONNECT_AND_WAIT = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print("connected", flush=True)
sys.stdin.read()
"""


def test_find_caller_reads_the_groups_of_the_process_holding_the_socket() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with subprocess.Popen(
            [PYTHON, "-c", _CONNECT_AND_WAIT, str(listener.getsockname()[1])],
            user=NOBODY,
            group=NOBODY,
            extra_groups=[SOCKET_GID],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd="/",
        ) as child:
            assert child.stdout is not None
            assert child.stdout.readline() == "connected\n"
            accepted, peer = listener.accept()
            with accepted:
                owner = tcp_owner(peer[:2], accepted.getsockname()[:2])
                assert owner is not None
                caller = find_caller(owner)
            assert caller is not None
            # uid 65534's account has no group 4242: the groups came from the process itself.
            assert (caller.uid, caller.gid, caller.pid) == (NOBODY, NOBODY, child.pid)
            assert caller.source == "process"
            assert caller.groups == {NOBODY, SOCKET_GID}
            child.kill()


@pytest.mark.parametrize("uid", [NOBODY, 4242])
def test_find_caller_leaves_the_groups_unknown_when_no_process_is_visible(
    monkeypatch: pytest.MonkeyPatch, uid: int
) -> None:
    # As when the holding process is not visible (another user's, another container's). The
    # account database is not asked: uid 65534 has an entry, and the process may not hold its groups.
    monkeypatch.setattr(_caller, "_process_holding", lambda inode: None)
    caller = find_caller((uid, 1))
    assert (caller.uid, caller.gid, caller.pid, caller.groups, caller.source) == (uid, -1, 0, None, "none")


@pytest.fixture
def socket_file() -> Iterator[Path]:
    directory = short_tmpdir("acc")
    path = directory / "s.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    try:
        yield path
    finally:
        sock.close()
        path.unlink()
        directory.rmdir()


@pytest.mark.parametrize(
    ("mode", "dir_mode", "uid", "groups", "allowed"),
    [
        (0o660, 0o755, 1000, {SOCKET_GID}, True),  # in the group
        (0o660, 0o755, 1000, {1000}, False),  # outside the group
        (0o660, 0o755, 0, set(), True),  # the owner (root owns it here)
        (0o606, 0o755, 1000, {SOCKET_GID}, False),  # the group class is excluded, even if others may
        (0o606, 0o755, 1000, {1000}, True),  # other
        (0o460, 0o755, 0, {SOCKET_GID}, False),  # the owner class decides for the owner
        (0o660, 0o750, 1000, {SOCKET_GID}, False),  # no search permission on the directory
        (0o660, 0o710, 1000, {0, SOCKET_GID}, True),  # search by the directory's group, write by the socket's
    ],
)
def test_socket_access_is_the_kernels_rule(
    socket_file: Path, mode: int, dir_mode: int, uid: int, groups: set[int], allowed: bool
) -> None:
    os.chown(socket_file, 0, SOCKET_GID)
    os.chmod(socket_file, mode)
    os.chmod(socket_file.parent, dir_mode)
    assert SocketAccess(str(socket_file)).allows(uid, frozenset(groups)) is allowed


def test_socket_access_refuses_what_is_not_a_socket(tmp_path: Path) -> None:
    plain = tmp_path / "file"
    plain.write_text("")
    plain.chmod(0o666)
    assert SocketAccess(str(plain)).allows(0, frozenset()) is False
    assert SocketAccess(str(tmp_path / "missing")).allows(0, frozenset()) is False


@pytest.mark.parametrize(
    ("link_dir_mode", "target_dir_mode", "relative", "allowed"),
    [
        (0o755, 0o755, False, True),
        (0o700, 0o755, False, False),  # the link's own directory is private: realpath alone misses it
        (0o755, 0o700, False, False),  # the target's directory is private
        (0o755, 0o755, True, True),
        (0o700, 0o755, True, False),
        (0o711, 0o711, True, True),  # search permission is all a directory needs
    ],
)
def test_socket_access_checks_the_directories_of_a_symlink_and_of_its_target(
    socket_file: Path, link_dir_mode: int, target_dir_mode: int, relative: bool, allowed: bool
) -> None:
    os.chmod(socket_file, 0o666)
    links = short_tmpdir("lnk")
    try:
        # link -> hop -> socket: a chain, the second link pointing back through ".." when relative.
        (links / "sub").mkdir()
        hop = links / "sub" / "hop"
        hop.symlink_to(os.path.relpath(socket_file, hop.parent) if relative else socket_file)
        link = links / "link"
        link.symlink_to("sub/../sub/hop" if relative else hop)
        os.chmod(links, link_dir_mode)
        os.chmod(links / "sub", 0o755)
        os.chmod(socket_file.parent, target_dir_mode)
        assert traversal(str(link))[1] == str(socket_file)
        assert SocketAccess(str(link)).allows(1000, frozenset({1000})) is allowed
        os.chmod(links / "sub", 0o700)  # a directory only the first link's target passes through
        assert SocketAccess(str(link)).allows(1000, frozenset({1000})) is False
        assert SocketAccess(str(socket_file)).allows(1000, frozenset({1000})) is (target_dir_mode != 0o700)
    finally:
        os.chmod(socket_file.parent, 0o755)
        shutil.rmtree(links)


def test_socket_access_refuses_a_link_loop_and_a_file_used_as_a_directory(socket_file: Path) -> None:
    links = short_tmpdir("lnk")
    try:
        (links / "a").symlink_to("b")
        (links / "b").symlink_to("a")
        assert SocketAccess(str(links / "a")).allows(0, frozenset()) is False
        assert SocketAccess(f"{socket_file}/x").allows(0, frozenset()) is False
    finally:
        shutil.rmtree(links)


# ---------------------------------------------------------------------------------------------
# Helpers: an HTTP server on a socket, the proxy in a subprocess, callers as another uid


class _HTTPHandler(socketserver.StreamRequestHandler):
    """Minimal HTTP/1.1, keep-alive unless ``Connection: close``; every request line goes to ``seen``.

    ``GET /healthz``; ``/headers`` answers with the head, body and trailers it received (Content-Length
    or chunked); ``POST /echo`` answers with the body; ``POST /stream`` echoes the body as it arrives.
    The server keeps socketserver's listen backlog of 5, so 50 connections at once also show that the
    proxy retries while the socket's backlog is full.
    """

    def handle(self) -> None:
        seen: list[str] = self.server.seen  # type: ignore[attr-defined]
        while True:
            line = self.rfile.readline()
            if not line:
                return
            method, target, _ = line.decode().split(" ", 2)
            head = [line.decode().rstrip("\r\n")]
            headers: dict[str, list[str]] = {}
            while (h := self.rfile.readline()) not in (b"\r\n", b""):
                head.append(h.decode().rstrip("\r\n"))
                name, _, value = h.decode().partition(":")
                headers.setdefault(name.strip().lower(), []).append(value.strip())
            seen.append(f"{method} {target}")
            close = "close" in ",".join(headers.get("connection", [])).lower()
            length = int(headers.get("content-length", ["0"])[0])
            if target == "/stream":
                self._head(length, close)
                while length:
                    data = self.rfile.read1(min(65536, length))
                    if not data:
                        return
                    self.wfile.write(data)
                    length -= len(data)
            else:
                trailers = []
                if headers.get("transfer-encoding") == ["chunked"]:
                    body = b""
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        body += self.rfile.read(size)
                        self.rfile.readline()
                    while (t := self.rfile.readline()) not in (b"\r\n", b""):
                        trailers.append(t.decode().strip())
                else:
                    body = self.rfile.read(length)
                if target.startswith("/headers"):
                    answer = json.dumps({"head": head, "body": body.decode(), "trailers": trailers}).encode()
                elif method == "POST":
                    answer = body
                else:
                    answer = json.dumps({"status": "ok", "target": target}).encode()
                self._head(len(answer), close)
                self.wfile.write(answer)
            if close:
                return

    def _head(self, length: int, close: bool) -> None:
        self.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {length}\r\n".encode()
            + (b"Connection: close\r\n" if close else b"")
            + b"\r\n"
        )


@contextlib.contextmanager
def unix_server(handler: type[socketserver.BaseRequestHandler] = _HTTPHandler) -> Iterator[Any]:
    """A threaded server on a fresh socket (owned by the test's uid); ``.path`` and ``.seen``."""
    directory = short_tmpdir("px")
    path = str(directory / "s.sock")
    server = socketserver.ThreadingUnixStreamServer(path, handler)
    server.daemon_threads = True
    server.path = path  # type: ignore[attr-defined]
    server.seen = []  # type: ignore[attr-defined]
    try:
        with serving(server):
            yield server
    finally:
        os.rmdir(directory)


class Proxy:
    """``uds-client proxy`` in a subprocess; ``port`` and ``token`` are read from its startup lines."""

    def __init__(
        self,
        socket_path: str,
        *args: str,
        listen: str = "127.0.0.1:0",
        python: str = PYTHON,
        wrapper: tuple[str, ...] = (),
    ) -> None:
        self.log_path = short_tmpdir("pxlog") / "proxy.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*wrapper, python, "-m", "client", "--socket", socket_path, "proxy", "--listen", listen, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.port = 0
        self.token = ""
        self._final: str | None = None

    @property
    def output(self) -> str:
        if self._final is not None:
            return self._final
        return self.log_path.read_text(errors="replace")

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_listening(self) -> Proxy:
        def listening() -> tuple[int, str] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"proxy exited with {self.proc.returncode}:\n{self.output}")
            found = re.search(
                r"Proxy listening on http://\S+:(\d+) .*\n(?:.*\n)*?Docs: \S+\?token=(\S+)\n", self.output
            )
            return (int(found.group(1)), found.group(2)) if found else None

        self.port, self.token = wait_until(listening, timeout=15, what="the proxy's startup lines")
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


def raw_exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the proxy closes: ``(status, headers, body)`` of the answer."""
    with connect(port) as sock:
        sock.sendall(data)
        answer = recv_until_eof(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, body


def http_request(
    port: int, method: str, target: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, target, body=body, headers=headers or {})
        response = conn.getresponse()
        data = response.read()
        return (
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            (json.loads(data) if data else None),
        )
    finally:
        conn.close()


def http_get(port: int, target: str) -> tuple[int, Any]:
    status, _, body = http_request(port, "GET", target)
    return status, body


_AS_CALLER = """
import http.client, json, os, sys
port, method, target, body, headers = sys.argv[1:]
conn = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
conn.request(method, target, body=body.encode() or None, headers=json.loads(headers))
response = conn.getresponse()
print(json.dumps({"pid": os.getpid(), "status": response.status, "body": json.loads(response.read())}))
"""


def as_nobody(
    port: int,
    method: str,
    target: str,
    body: str = "",
    headers: dict[str, str] | None = None,
    extra_groups: list[int] | None = None,
) -> dict[str, Any]:
    """One request through the proxy made by uid 65534: ``{"pid", "status", "body"}``."""
    result = python_as_nobody(
        "-c",
        _AS_CALLER,
        str(port),
        method,
        target,
        body,
        json.dumps(headers or {}),
        extra_groups=extra_groups,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    answer: dict[str, Any] = json.loads(result.stdout)
    return answer


@pytest.fixture
def group_server() -> Iterator[Any]:
    """A real server whose socket is 0660, root:4242, in a directory everyone may search."""
    if os.geteuid() != 0:
        pytest.fail("these tests run callers as uid 65534 and need root (CI runs them as root)")
    directory = short_tmpdir("pxg")
    directory.chmod(0o755)
    with running_server("--socket-mode", "660", "--socket-group", str(SOCKET_GID), tmp=directory) as server:
        yield server
    shutil.rmtree(directory, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Who may use the proxy: the socket's permissions, by uid


def test_a_uid_refused_on_the_socket_is_refused_by_the_proxy(group_server: Any) -> None:
    path = group_server.socket_path
    direct = _connect_as_nobody(path)
    assert direct.returncode == 3, direct.stderr
    assert "(permission denied)" in direct.stderr
    with Proxy(path) as proxy:
        proxy.wait_listening()
        for method, target, body in (
            ("POST", "/messages", '{"text": "Hello from nobody"}'),
            ("GET", "/messages", ""),
            ("GET", "/docs", ""),
        ):
            answer = as_nobody(proxy.port, method, target, body, {"Content-Type": "application/json"})
            assert answer["status"] == 403, answer
            assert answer["body"]["error"] == "forbidden"
            assert answer["body"]["message"].startswith(
                f"uid {NOBODY} may not connect to unix://{path} (mode 0660, owner 0, group {SOCKET_GID}; "
                f"groups {NOBODY} of its process); open the URL with the token"
            )
        assert proxy.stop() == 0
    assert re.search(
        rf"proxy #1 127\.0\.0\.1:\d+ \(uid={NOBODY} gid={NOBODY} pid=\d+\): refused 403 POST "
        r"/messages: uid 65534 may not connect",
        proxy.output,
    )
    status, stored = http_over_uds(path, "GET", "/messages")
    assert (status, json.loads(stored)) == (200, {"messages": []})  # nothing got through


def _connect_as_nobody(path: str) -> subprocess.CompletedProcess[str]:
    return python_as_nobody("-m", "client", "--socket", path, "send", "Hello from nobody")


def test_a_symlink_in_a_private_directory_does_not_open_the_proxy_to_a_uid_the_kernel_refuses() -> None:
    """The kernel searches the directories holding the link, not only those of the socket it names."""
    if os.geteuid() != 0:
        pytest.fail("this test runs callers as uid 65534 and needs root (CI runs it as root)")
    public = short_tmpdir("pxs")
    private = short_tmpdir("pxp")
    try:
        public.chmod(0o755)
        private.chmod(0o700)
        with running_server("--socket-mode", "666", tmp=public) as server:
            path = str(server.socket_path)
            hidden = private / "s.sock"
            hidden.symlink_to(path)
            direct = _connect_as_nobody(str(hidden))
            assert direct.returncode == 3, direct.stderr
            assert "(permission denied)" in direct.stderr
            with Proxy(str(hidden)) as proxy:
                proxy.wait_listening()
                json_type = {"Content-Type": "application/json"}
                answer = as_nobody(proxy.port, "POST", "/messages", '{"text": "via the link"}', json_type)
                assert answer["status"] == 403, answer
                refusal = f"uid {NOBODY} may not connect to unix://{hidden} "
                assert answer["body"]["message"].startswith(refusal)
                assert as_nobody(proxy.port, "GET", "/healthz")["status"] == 403
                assert proxy.stop() == 0
            # The same link in a directory everyone may search: the kernel and the proxy both admit.
            private.chmod(0o755)
            assert _connect_as_nobody(str(hidden)).returncode == 0
            with Proxy(str(hidden)) as proxy:
                proxy.wait_listening()
                assert as_nobody(proxy.port, "GET", "/healthz")["status"] == 200
                assert proxy.stop() == 0
            status, stored = http_over_uds(path, "GET", "/messages")
            assert status == 200
            texts = [m["text"] for m in json.loads(stored)["messages"]]
            assert texts == ["Hello from nobody"]  # only the direct send once it was allowed
    finally:
        shutil.rmtree(private, ignore_errors=True)
        shutil.rmtree(public, ignore_errors=True)


def test_a_uid_in_the_socket_group_gets_through_and_the_server_names_it(group_server: Any) -> None:
    path = group_server.socket_path
    with Proxy(path) as proxy:
        proxy.wait_listening()
        answer = as_nobody(
            proxy.port,
            "POST",
            "/messages",
            '{"text": "Hello from the group"}',
            {"Content-Type": "application/json"},
            extra_groups=[SOCKET_GID],
        )
        assert answer["status"] == 201, answer
        peer = answer["body"]["peer"]
        # The peer is the proxy (its real SO_PEERCRED); forwarded_for is the caller behind it.
        assert (peer["pid"], peer["uid"]) == (proxy.proc.pid, 0)
        assert peer["forwarded_for"] == {"uid": NOBODY, "gid": NOBODY, "pid": answer["pid"]}
        message_id = answer["body"]["id"]
        listed = as_nobody(proxy.port, "GET", f"/messages/{message_id}", extra_groups=[SOCKET_GID])
        assert listed["status"] == 200
        assert proxy.stop() == 0
    status, body = http_over_uds(path, "GET", f"/messages/{message_id}")
    assert status == 200
    stored = Message.from_json(json.loads(body))
    assert stored.peer is not None
    assert stored.peer.forwarded_for is not None
    assert (stored.peer.uid, stored.peer.forwarded_for.uid, stored.peer.forwarded_for.pid) == (
        0,
        NOBODY,
        answer["pid"],
    )
    assert stored.to_json()["peer"]["forwarded_for"] == {"pid": answer["pid"], "uid": NOBODY, "gid": NOBODY}
    group_server.stop()
    assert (
        f"📩 Server received: Hello from the group\n  from peer pid={proxy.proc.pid} uid=0 gid=0 "
        f"via proxy for uid={NOBODY} gid={NOBODY} pid={answer['pid']} (message {message_id})\n"
    ) in group_server.output


def test_the_proxy_replaces_a_forwarded_peer_header_the_caller_sent(group_server: Any) -> None:
    with Proxy(group_server.socket_path) as proxy:
        proxy.wait_listening()
        forged = {"Content-Type": "application/json", "Uds-Forwarded-Peer": "uid=0 gid=0 pid=1"}
        answer = as_nobody(
            proxy.port, "POST", "/messages", '{"text": "who am I"}', forged, extra_groups=[SOCKET_GID]
        )
        assert answer["status"] == 201, answer
        assert answer["body"]["peer"]["forwarded_for"] == {"uid": NOBODY, "gid": NOBODY, "pid": answer["pid"]}
        assert proxy.stop() == 0
    # Raw bytes, the header twice and in other spellings: what reaches the socket has exactly one.
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        status, _, body = raw_exchange(
            proxy.port,
            (
                f"GET /headers HTTP/1.1\r\nHost: {proxy.host}\r\nUds-Forwarded-Peer: uid=1 gid=1 pid=1\r\n"
                "uds-forwarded-peer: uid=2 gid=2 pid=2\r\nUDS-FORWARDED-PEER:uid=3 gid=3 pid=3\r\n"
                "Connection: keep-alive, Uds-Forwarded-Peer\r\nKeep-Alive: timeout=5\r\n\r\n"
            ).encode(),
        )
        assert status == 200
        head = json.loads(body)["head"]
        forwarded = [h for h in head if h.lower().startswith("uds-forwarded-peer:")]
        assert forwarded == [f"Uds-Forwarded-Peer: uid=0 gid=0 pid={os.getpid()}"]
        hop_by_hop = [h for h in head if h.lower().startswith(("connection:", "keep-alive:"))]
        assert hop_by_hop == ["Connection: close"]
        assert proxy.stop() == 0


# ---------------------------------------------------------------------------------------------
# Who may use the proxy: the token


def test_the_token_admits_a_caller_the_uid_check_refuses(group_server: Any) -> None:
    with Proxy(group_server.socket_path) as proxy:
        proxy.wait_listening()
        token = {"Uds-Proxy-Token": proxy.token, "Content-Type": "application/json"}
        answer = as_nobody(proxy.port, "POST", "/messages", '{"text": "with the token"}', token)
        assert answer["status"] == 201, answer
        # Admitted by token, not named: the token holder acts as the proxy's user, the peer on the socket.
        assert "forwarded_for" not in answer["body"]["peer"], answer
        assert answer["body"]["peer"]["pid"] == proxy.proc.pid
        assert as_nobody(proxy.port, "GET", f"/messages?token={proxy.token}")["status"] == 200
        wrong = {"Uds-Proxy-Token": f"x{proxy.token}"}
        assert as_nobody(proxy.port, "GET", "/messages", headers=wrong)["status"] == 403
        assert as_nobody(proxy.port, "GET", f"/messages?token=x{proxy.token}")["status"] == 403
        # A caller the uid check admits is admitted, and named, by uid, with the token or without.
        status, _, body = http_request(
            proxy.port, "POST", "/messages", b'{"text": "uid first"}', {**token, "Uds-Proxy-Token": "x"}
        )
        assert status == 201, body
        assert body["peer"]["forwarded_for"]["uid"] == os.geteuid()
        status, _, body = http_request(proxy.port, "POST", "/messages", b'{"text": "uid first"}', token)
        assert (status, body["peer"]["forwarded_for"]["uid"]) == (201, os.geteuid())
        assert proxy.stop() == 0


def test_token_only_the_token_opens_by_header_or_url_and_stays_in_the_proxy() -> None:
    with unix_server() as upstream, Proxy(upstream.path, "--token-only") as proxy:
        proxy.wait_listening()
        assert "Access: only requests with this proxy's token" in proxy.output
        # Root may use the socket, but with --token-only that is not enough.
        status, _, body = http_request(proxy.port, "GET", "/healthz")
        assert (status, body["error"]) == (403, "forbidden")
        assert body["message"] == (
            "this proxy admits only requests with its token; open the URL with the "
            "token that the proxy printed at start"
        )
        status, _, body = http_request(proxy.port, "GET", "/docs?token=wrong")
        assert (status, body["message"]) == (403, "wrong token; open the URL the proxy printed at start")
        status, _, body = http_request(proxy.port, "GET", "/docs", headers={"Uds-Proxy-Token": "wrong"})
        assert (status, body["message"]) == (403, "wrong token; open the URL the proxy printed at start")
        # In the URL (a page's address, curl): forwarded without it, and no cookie is set.
        status, headers, body = http_request(proxy.port, "GET", f"/headers?a=1&token={proxy.token}&b=2")
        assert status == 200
        assert "set-cookie" not in headers
        assert body["head"][0] == "GET /headers?a=1&b=2 HTTP/1.1"
        # In a header (what the docs pages send): removed, with a Referer that holds the token.
        sent = {
            "Uds-Proxy-Token": proxy.token,
            "Cookie": "theme=dark",
            "Referer": f"http://{proxy.host}/docs?token={proxy.token}",
        }
        status, _, body = http_request(proxy.port, "GET", "/headers", headers=sent)
        assert status == 200
        assert "Cookie: theme=dark" in body["head"]  # cookies are not the proxy's business
        assert not [h for h in body["head"] if h.lower().startswith(("uds-proxy-token:", "referer:"))]
        # A POST may carry the token in the URL (scripts); it is removed before the socket sees it.
        status, _, body = http_request(proxy.port, "POST", f"/headers?token={proxy.token}", body=b"x")
        assert (status, body["head"][0], body["body"]) == (200, "POST /headers HTTP/1.1", "x")
        assert proxy.stop() == 0
    # The token appears once in the log: in the URL printed at start.
    assert proxy.output.count(proxy.token) == 1
    assert upstream.seen == ["GET /headers?a=1&b=2", "GET /headers", "POST /headers"]


# ---------------------------------------------------------------------------------------------
# Host, Origin and the request head


def test_a_foreign_host_is_refused_421_dns_rebinding() -> None:
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        for host in (
            "evil.example",
            f"evil.example:{proxy.port}",
            f"127.0.0.1:{proxy.port + 1}",
            "127.0.0.1",
            f"127.0.0.2:{proxy.port}",
        ):
            status, _, body = http_request(proxy.port, "GET", "/healthz", headers={"Host": host})
            assert (status, body["error"], body["status"]) == (421, "misdirected_request", 421), host
            assert body["message"].startswith(f"this proxy does not answer for host {host!r}; use ")
        for host in (f"127.0.0.1:{proxy.port}", f"LOCALHOST:{proxy.port}", f"[::1]:{proxy.port}"):
            status, _, body = http_request(proxy.port, "GET", "/healthz", headers={"Host": host})
            assert status == 200, host
        status, _, body = raw_exchange(proxy.port, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert (status, json.loads(body)) == (
            400,
            {
                "error": "bad_request",
                "message": "the request has no Host header; send Host: 127.0.0.1:PORT",
                "status": 400,
            },
        )
        status, _, _ = raw_exchange(
            proxy.port, f"GET / HTTP/1.1\r\nHost: {proxy.host}\r\nHost: {proxy.host}\r\n\r\n".encode()
        )
        assert status == 400
        assert proxy.stop() == 0
    assert upstream.seen == ["GET /healthz"] * 3
    assert "refused 421 GET /healthz: this proxy does not answer for host 'evil.example'" in proxy.output


def test_allow_host_adds_a_name() -> None:
    with unix_server() as upstream, Proxy(upstream.path, "--allow-host", "localhost:9000") as proxy:
        proxy.wait_listening()
        assert http_request(proxy.port, "GET", "/healthz", headers={"Host": "localhost:9000"})[0] == 200
        assert http_request(proxy.port, "GET", "/healthz", headers={"Host": "localhost:9001"})[0] == 421
        assert proxy.stop() == 0


def test_a_cross_origin_request_is_refused() -> None:
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        for origin in ("http://evil.example", "null", f"http://127.0.0.1:{proxy.port + 1}"):
            status, _, body = http_request(proxy.port, "POST", "/echo", b"{}", {"Origin": origin})
            assert (status, body["error"]) == (403, "forbidden"), origin
            assert body["message"].startswith(f"cross-origin requests are refused (Origin {origin!r})")
        status, _, body = http_request(
            proxy.port, "POST", "/echo", b"{}", {"Origin": f"http://localhost:{proxy.port}"}
        )
        assert (status, body) == (200, {})
        assert proxy.stop() == 0
    assert upstream.seen == ["POST /echo"]


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (
            b"GET / HTTP/1.1\r\nHost: HOST\r\nX-Big: " + b"a" * 40_000 + b"\r\n\r\n",
            431,
            "the request head is over 32768 bytes",
        ),
        (
            b"GET / HTTP/1.1\r\nHost: HOST\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n",
            431,
            "the request has more than 100 header fields",
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            "the request is not valid HTTP/1.1 (Only Transfer-Encoding: chunked is supported)",
        ),
        (
            b"POST /echo HTTP/1.1\r\nHost: HOST\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
            b"0\r\n\r\n",
            400,
            "the request has both Content-Length and Transfer-Encoding; send one",
        ),
        (b"HELLO\r\n\r\n", 400, None),
        (b"GET / HTTP/1.1\r\nHost: HOST\r\nNo-Colon\r\n\r\n", 400, None),
    ],
    ids=["head-too-large", "too-many-fields", "gzip-chunked", "length-and-chunked", "not-http", "no-colon"],
)
def test_bad_request_heads_get_json_errors_and_never_reach_the_socket(
    request_bytes: bytes, status: int, message: str | None
) -> None:
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        got, headers, body = raw_exchange(proxy.port, request_bytes.replace(b"HOST", proxy.host.encode()))
        assert (got, headers["content-type"], headers["connection"]) == (status, "application/json", "close")
        answer = json.loads(body)
        assert answer["status"] == status
        if message is not None:
            assert answer["message"] == message
        assert proxy.stop() == 0
    assert upstream.seen == []


def test_a_slow_head_gets_408_and_an_idle_connection_is_closed() -> None:
    with unix_server() as upstream, Proxy(upstream.path, "--head-timeout", "1") as proxy:
        proxy.wait_listening()
        idle = connect(proxy.port)
        slow = connect(proxy.port)
        slow.sendall(f"GET /healthz HTTP/1.1\r\nHost: {proxy.host}\r\n".encode())  # never finished
        answer = recv_until_eof(slow)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
        assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "request_timeout"
        assert recv_until_eof(idle) == b""  # no request, no answer: just closed
        idle.close()
        slow.close()
        assert proxy.stop() == 0
    assert upstream.seen == []
    assert "no complete request head within 1s (answered 408)" in proxy.output


def test_one_request_per_connection_a_pipelined_second_is_not_forwarded() -> None:
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        one = f"GET /healthz HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n".encode()
        evil = b"GET /healthz HTTP/1.1\r\nHost: evil.example\r\n\r\n"
        status, headers, body = raw_exchange(proxy.port, one + evil)
        assert (status, headers["connection"], json.loads(body)["status"]) == (200, "close", "ok")
        assert proxy.stop() == 0
    assert upstream.seen == ["GET /healthz"]


# ---------------------------------------------------------------------------------------------
# The connection cap and the open-file limit


def _in_flight(proxy: Proxy) -> socket.socket:
    """A connection whose whole request head reached the socket; its body is still to come."""
    sock = connect(proxy.port)
    sock.sendall(f"POST /stream HTTP/1.1\r\nHost: {proxy.host}\r\nContent-Length: 9\r\n\r\nx".encode())
    received = b""
    while not received.endswith(b"\r\n\r\nx"):
        received += sock.recv(1024)
    return sock


def _cap_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Proxy at its connection limit")]


def _cap_counts(output: str) -> dict[str, int]:
    """How many connections the cap's lines say were refused and closed to make room."""
    counts = {"refused": 0, "closed": 0}
    for line in _cap_lines(output):
        found = re.fullmatch(
            r"Proxy at its connection limit \(\d+, --max-connections\): (refused|closed) a connection .*?"
            r"(?: \(and (\d+) more like it in the last \d+s\))?",
            line,
        )
        assert found, line
        counts[found.group(1)] += 1 + int(found.group(2) or 0)
    return counts


def test_at_the_cap_a_newcomer_gets_503_json_and_the_refusals_are_logged_once() -> None:
    with unix_server() as upstream, Proxy(upstream.path, "--max-connections", "2") as proxy:
        proxy.wait_listening()
        busy = [_in_flight(proxy) for _ in range(2)]
        try:
            for _ in range(3):  # connections with a request under way are never closed to make room
                status, headers, body = raw_exchange(
                    proxy.port, f"GET /healthz HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n".encode()
                )
                assert (status, headers["content-type"], headers["connection"]) == (
                    503,
                    "application/json",
                    "close",
                )
                assert headers["retry-after"] == "1"
                assert json.loads(body) == {
                    "error": "unavailable",
                    "message": "the proxy is at its connection limit (2); try again shortly",
                    "status": 503,
                }
            for sock in busy:  # the requests under way are unharmed
                sock.sendall(b"12345678")
                assert recv_until_eof(sock) == b"12345678"  # the rest of the echoed body
        finally:
            for sock in busy:
                sock.close()
        wait_until(lambda: http_get(proxy.port, "/healthz")[0] == 200, timeout=15, what="a free slot")
        assert proxy.stop() == 0
    assert upstream.seen.count("GET /healthz") == 1  # the refused requests never reached the socket
    # One line at once, the other refusals counted in the next (10 s later, or when the proxy stops).
    lines = _cap_lines(proxy.output)
    assert lines[0] == "Proxy at its connection limit (2, --max-connections): refused a connection with 503"
    assert 2 <= len(lines) <= 3, lines  # a third if the refusals straddle a period
    assert _cap_counts(proxy.output) == {"refused": 3, "closed": 0}


def test_idle_connections_do_not_lock_out_a_request_and_the_open_file_limit_is_raised() -> None:
    """1,100 idle connections against a proxy started with 256 open files (the hard limit 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1500:  # this process holds the idle connections
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    limits = short_tmpdir("pxn")
    python = python_with_open_files(limits, 256, 1024)
    idle: list[socket.socket] = []
    try:
        with (
            unix_server() as upstream,
            Proxy(upstream.path, "--max-connections", "16", "--quiet", python=python) as proxy,
        ):
            proxy.wait_listening()
            assert open_files_of(proxy.proc.pid) == (1024, 1024)
            for _ in range(1100):
                idle.append(socket.create_connection(("127.0.0.1", proxy.port), timeout=10))
            statuses: list[int] = []

            def answered() -> bool:
                statuses.append(http_get(proxy.port, "/healthz")[0])
                return statuses[-1] == 200

            # Until the idle connections are a second old, newcomers are refused; then they make room.
            wait_until(answered, timeout=30, interval=0.2, what="a request answered among idle connections")
            assert set(statuses) <= {200, 503}, statuses
            for _ in range(5):
                assert http_get(proxy.port, "/healthz") == (200, {"status": "ok", "target": "/healthz"})
            assert proxy.stop() == 0
        assert upstream.seen.count("GET /healthz") == 6
        assert _cap_counts(proxy.output)["closed"] >= 1, proxy.output  # idle connections made room
        assert "Traceback" not in proxy.output
        assert "socket.accept() out of system resource" not in proxy.output  # asyncio's EMFILE line
    finally:
        for sock in idle:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        shutil.rmtree(limits, ignore_errors=True)


def test_the_cap_is_lowered_to_fit_an_open_file_limit_that_cannot_be_raised() -> None:
    limits = short_tmpdir("pxn")
    try:
        python = python_with_open_files(limits, 200, 200)
        with unix_server() as upstream, Proxy(upstream.path, python=python) as proxy:
            proxy.wait_listening()
            assert open_files_of(proxy.proc.pid) == (200, 200)
            assert proxy.output.startswith(
                "Connections: at most 52 at once, not 256 (--max-connections): the open-file limit "
                "is 200; raise it (ulimit -n) to serve more\nProxy listening on "
            )
            assert http_get(proxy.port, "/healthz")[0] == 200
            assert proxy.stop() == 0
    finally:
        shutil.rmtree(limits, ignore_errors=True)


def test_a_connection_silent_from_the_start_is_closed_before_the_head_timeout() -> None:
    with unix_server() as upstream, Proxy(upstream.path, "--head-timeout", "60") as proxy:
        proxy.wait_listening()
        silent = connect(proxy.port)
        slow = connect(proxy.port)
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")  # begun, never finished
        silent.settimeout(30)  # well inside --head-timeout: a socket.timeout here fails the test
        assert recv_until_eof(silent) == b""  # closed with no answer: it sent nothing
        slow.setblocking(False)
        with pytest.raises(BlockingIOError):  # the one that began its head is still waiting
            slow.recv(1)
        silent.close()
        slow.close()
        assert proxy.stop() == 0
    assert upstream.seen == []


# ---------------------------------------------------------------------------------------------
# Data path


def test_half_close_after_the_request_still_gets_the_whole_answer() -> None:
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        sock = connect(proxy.port)
        sock.sendall(f"POST /echo HTTP/1.1\r\nHost: {proxy.host}\r\nContent-Length: 5\r\n\r\nhello".encode())
        sock.shutdown(socket.SHUT_WR)  # half-close: the answer still comes after our EOF
        answer = recv_until_eof(sock)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
        assert answer.endswith(b"\r\n\r\nhello")
        proxy.wait_output(
            r"proxy #1 127\.0\.0\.1:\d+ \(uid=0 gid=0 pid=\d+\) POST /echo: \d+ B to socket, "
            r"\d+ B to client, [\d.]+ s\n"
        )
        assert proxy.stop() == 0
    assert re.search(
        r"proxy #1 127\.0\.0\.1:\d+ \(uid=0 gid=0 pid=\d+\) POST /echo -> unix://"
        + re.escape(upstream.path)
        + r" \(admitted by uid\)",
        proxy.output,
    )


def test_bodies_are_reframed_chunked_without_trailers_and_the_http_version_is_kept() -> None:
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        status, _, body = raw_exchange(
            proxy.port,
            (
                f"POST /headers HTTP/1.1\r\nHost: {proxy.host}\r\nTransfer-Encoding: chunked\r\n\r\n"
                "5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
            ).encode(),
        )
        assert status == 200
        answer = json.loads(body)
        assert (answer["body"], answer["trailers"]) == ("hello world", [])
        assert "Transfer-Encoding: chunked" in answer["head"]
        # The client's HTTP version is kept, so the server frames its answer for that client.
        status, _, body = raw_exchange(
            proxy.port,
            f"POST /headers HTTP/1.0\r\nHost: {proxy.host}\r\nContent-Length: 2\r\n\r\nhi".encode(),
        )
        assert (status, json.loads(body)["head"][0], json.loads(body)["body"]) == (
            200,
            "POST /headers HTTP/1.0",
            "hi",
        )
        assert proxy.stop() == 0


def test_a_client_reset_closes_both_sides_and_is_logged() -> None:
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        sock = connect(proxy.port)
        sock.sendall(
            f"POST /stream HTTP/1.1\r\nHost: {proxy.host}\r\nContent-Length: 100\r\n\r\nping".encode()
        )
        received = b""
        while not received.endswith(b"ping"):
            received += sock.recv(1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # with linger 0: an RST, not a FIN
        proxy.wait_output(
            r"proxy #1 .* POST /stream: \d+ B to socket, \d+ B to client, [\d.]+ s "
            r"\(client to socket stopped: connection reset by peer\)\n"
        )
        assert proxy.stop() == 0
    assert "closed 0 open connection(s)" in proxy.output


def test_backpressure_holds_a_large_transfer_and_delivers_it_exactly() -> None:
    payload = os.urandom(64 * 1024 * 1024)
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        rss_before = psutil.Process(proxy.proc.pid).memory_info().rss
        sock = connect(proxy.port)
        sock.sendall(
            f"POST /stream HTTP/1.1\r\nHost: {proxy.host}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
        )
        sent = [0]

        def send() -> None:
            view = memoryview(payload)
            for start in range(0, len(payload), 1 << 20):
                sock.sendall(view[start : start + (1 << 20)])
                sent[0] = start + (1 << 20)

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
        assert received.partition(b"\r\n\r\n")[2] == payload
        proxy.wait_output(f"{len(received)} B to client")
        assert proxy.stop() == 0


def test_keep_alive_clients_and_many_concurrent_connections() -> None:
    with unix_server() as upstream, Proxy(upstream.path, "--quiet") as proxy:
        proxy.wait_listening()
        conns = [http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10) for _ in range(50)]
        try:
            for round_ in range(3):  # each client reconnects after the proxy's Connection: close
                for i, conn in enumerate(conns):
                    conn.request("POST", "/echo", body=f"{round_}-{i}".encode())
                for i, conn in enumerate(conns):
                    response = conn.getresponse()
                    assert (response.status, response.read()) == (200, f"{round_}-{i}".encode())
                    assert response.getheader("Connection") == "close"
        finally:
            for conn in conns:
                conn.close()
        assert proxy.stop() == 0
    assert len(upstream.seen) == 150
    assert "proxy #" not in proxy.output  # --quiet: no per-request lines
    assert "Proxy stopped (SIGTERM)" in proxy.output


# ---------------------------------------------------------------------------------------------
# Startup, errors and shutdown


def test_startup_lines_say_loopback_who_may_call_and_print_the_tokened_url() -> None:
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        out = proxy.output
        path = upstream.path
        assert out.startswith(
            f"Proxy listening on http://127.0.0.1:{proxy.port} (loopback only) -> unix://{path}\n"
            f"Access: callers on this machine who may connect to unix://{path} themselves (checked by uid), "
            "or anyone with this proxy's token (open the URL below; its page sends it)\n"
            f"Docs: http://127.0.0.1:{proxy.port}/docs?token={proxy.token}\n"
        )
        assert len(proxy.token) >= 32
        assert "WARNING" not in out
        assert proxy.stop(signal.SIGINT) == 0
    assert "Proxy stopped (SIGINT)" in proxy.output
    with unix_server() as upstream, Proxy(upstream.path) as other:
        assert other.wait_listening().token != proxy.token  # a new token every run


def test_non_loopback_listen_warns_loudly() -> None:
    with unix_server() as upstream, Proxy(upstream.path, listen="0.0.0.0:0") as proxy:
        proxy.wait_listening()
        out = proxy.output
        assert "(REACHABLE FROM OTHER MACHINES)" in out
        assert "WARNING: 0.0.0.0:" in out
        assert "is not a loopback address: callers on other machines cannot be identified" in out
        assert f"Docs: http://127.0.0.1:{proxy.port}/docs?token=" in out
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
        with unix_server() as upstream, Proxy(upstream.path, listen=f"127.0.0.1:{port}") as proxy:
            assert proxy.wait_exit() == 2
            assert proxy.output == (
                f"Error: cannot listen on 127.0.0.1:{port} (address already in use). "
                "Stop what uses it or choose another address with --listen.\n"
            )
    finally:
        taken.close()


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (("--listen", "127.0.0.1:http"), "Error: invalid --listen '127.0.0.1:http'"),
        (("--head-timeout", "0"), "Error: invalid --head-timeout 0.0"),
        (("--max-connections", "0"), "Error: invalid --max-connections 0"),
        (("--allow-host", "a b:1"), "Error: invalid --listen 'a b:1'"),
    ],
)
def test_bad_option_values_exit_2(args: tuple[str, ...], start: str) -> None:
    with unix_server() as upstream:
        result = subprocess.run(
            [PYTHON, "-m", "client", "--socket", upstream.path, "proxy", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(start)
    assert result.stderr.count("\n") == 1


def test_socket_gone_later_answers_502_in_the_shared_error_shape() -> None:
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        path = upstream.path
        proxy.wait_listening()
        assert http_get(proxy.port, "/healthz") == (200, {"status": "ok", "target": "/healthz"})
        os.unlink(path)  # the server's socket disappears while the proxy runs
        status, body = http_get(proxy.port, "/healthz")
        # The caller is checked against the socket's permissions: with no socket, nobody passes.
        assert (status, body["error"]) == (403, "forbidden")
        status, _, body = http_request(
            proxy.port, "GET", "/healthz", headers={"Uds-Proxy-Token": proxy.token}
        )
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


def test_a_second_sigterm_during_shutdown_still_exits_0() -> None:
    """coreutils ``timeout`` and some supervisors send the signal twice."""
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        socks = [connect(proxy.port) for _ in range(20)]
        # Signals keep coming until the proxy has exited: some land while it is shutting down.
        with contextlib.suppress(ProcessLookupError):
            while proxy.proc.poll() is None:
                proxy.proc.send_signal(signal.SIGTERM)
                time.sleep(0.0005)  # pacing between signals, not a wait for a state
        assert proxy.wait_exit() == 0, proxy.output
        for sock in socks:
            sock.close()


def test_sigterm_closes_open_connections_and_exits_0() -> None:
    with unix_server() as upstream, Proxy(upstream.path) as proxy:
        proxy.wait_listening()
        socks = [connect(proxy.port) for _ in range(3)]
        for sock in socks:
            sock.sendall(
                f"POST /stream HTTP/1.1\r\nHost: {proxy.host}\r\nContent-Length: 9\r\n\r\nx".encode()
            )
            received = b""
            while not received.endswith(b"\r\n\r\nx"):
                received += sock.recv(1024)
        assert proxy.stop(signal.SIGTERM) == 0
        for sock in socks:
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""  # closed by the proxy
            sock.close()
        assert "Proxy stopped (SIGTERM): closed 3 open connection(s)" in proxy.output
        assert proxy.output.count("(cut: the proxy is stopping)") == 3
        with pytest.raises(ConnectionRefusedError):
            connect(proxy.port)


# ---------------------------------------------------------------------------------------------
# End to end with the real server


def test_real_server_through_the_proxy() -> None:
    with running_server() as server, Proxy(str(server.socket_path)) as proxy:
        proxy.wait_listening()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        try:
            conn.request(
                "POST",
                "/messages",
                body=json.dumps({"text": "Hello from client"}),
                headers={"Content-Type": "application/json"},
            )
            response = conn.getresponse()
            message = json.loads(response.read())
            assert response.status == 201
            assert message["reply"] == "Hello from server via UDS"
            # The server sees the proxy process as its peer, and this process behind it.
            assert message["peer"]["pid"] == proxy.proc.pid
            assert message["peer"]["forwarded_for"] == {
                "uid": os.geteuid(),
                "gid": os.getegid(),
                "pid": os.getpid(),
            }
            conn.request("GET", f"/messages/{message['id']}")  # http.client reconnects after close
            response = conn.getresponse()
            assert (response.status, json.loads(response.read())["text"]) == (200, "Hello from client")
            conn.request("GET", "/nope")
            response = conn.getresponse()
            body = json.loads(response.read())
            assert (response.status, body["status"], body["error"]) == (404, 404, body["error"])
        finally:
            conn.close()
        # A chunked body reaches the real server intact.
        status, _, body = raw_exchange(
            proxy.port,
            (
                f"POST /messages HTTP/1.1\r\nHost: {proxy.host}\r\nContent-Type: application/json\r\n"
                'Transfer-Encoding: chunked\r\n\r\n9\r\n{"text": \r\n5\r\n"hi"}\r\n0\r\n\r\n'
            ).encode(),
        )
        assert (status, json.loads(body)["text"]) == (201, "hi")
        # A broken one is answered by the proxy, in the shared error shape.
        status, _, body = raw_exchange(
            proxy.port,
            (
                f"POST /messages HTTP/1.1\r\nHost: {proxy.host}\r\nContent-Type: application/json\r\n"
                'Transfer-Encoding: chunked\r\n\r\n9\r\n{"text": \r\n6\r\n"hi"}\r\n0\r\n\r\n'
            ).encode(),
        )
        assert (status, json.loads(body)["error"]) == (400, "bad_request")
        assert json.loads(body)["message"].startswith(
            "the request body is not valid HTTP/1.1 (malformed chunk"
        )
        for target in ("/docs", "/redoc", "/openapi.json"):
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("GET", target)
            response = conn.getresponse()
            assert response.status == 200, target
            response.read()
            conn.close()
        assert proxy.stop() == 0
