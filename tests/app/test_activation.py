"""Socket activation: a socket passed as systemd passes it (LISTEN_FDS) is checked, served, left in place."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.serving.activation import inherited_socket
from app.serving.private_dir import SocketError
from benchmarks._spawn import ServerProcess as Spawned
from tests.support import (
    PYTHON,
    ServerProcess,
    http_over_uds,
    python_with_listen_fds,
    require_tool,
    wait_until,
)

HELLO = json.dumps({"text": "Hello from client"}).encode()
JSON = {"content-type": "application/json"}
URL = "http://localhost/messages"


@pytest.fixture
def held(tmp: Path) -> Iterator[socket.socket]:
    """A listening socket at ``tmp/held.sock`` that this test holds, as systemd holds a .socket unit's."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp / "held.sock"))
    os.chmod(tmp / "held.sock", 0o640)
    sock.listen(128)
    yield sock
    sock.close()


def _activated(
    tmp: Path, sock: socket.socket, *args: str, listen_pid: str | None = None, ready_at: str | None = None
) -> ServerProcess:
    """``uds-server --socket tmp/own.sock ARGS`` given ``sock`` as fd 3; ready when ``ready_at``
    (default: ``sock``'s path) answers."""
    python = python_with_listen_fds(tmp, sock.fileno(), listen_pid=listen_pid)
    return ServerProcess(
        ["--socket", str(tmp / "own.sock"), *args],
        socket_path=ready_at or sock.getsockname(),
        python=python,
        pass_fds=(sock.fileno(),),
    )


def test_systemd_socket_activate_starts_the_server_and_curl_gets_its_answer(tmp: Path) -> None:
    """Debian's systemd-socket-activate binds, execs uds-server on the first connection, passes fd 3."""
    activate = require_tool("systemd-socket-activate")
    curl = require_tool("curl")
    path = str(tmp / "s.sock")
    log = (tmp / "out.log").open("wb")
    command = [
        activate,
        "--listen",
        path,
        "--fdname=api",
        "-E",
        f"UDS_DATA_DIR={tmp / 'data'}",
        "-E",
        "PYTHONUNBUFFERED=1",
        PYTHON,
        "-m",
        "app",
    ]
    with Spawned(command, socket=path, stdout=log) as server:
        # It logs this once the socket listens (a connection before it would be refused).
        wait_until(lambda: "Listening on" in (tmp / "out.log").read_text(), what="systemd-socket-activate")
        made = os.stat(path)
        answer = subprocess.run(
            [curl, "-sS", "--unix-socket", path, "-H", "content-type: application/json", "-d", HELLO, URL],
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert answer.returncode == 0, answer.stderr
        assert json.loads(answer.stdout)["reply"] == "Hello from server via UDS"
        assert server.stop() == 0
    log.close()
    output = (tmp / "out.log").read_text()
    assert f"Socket {path} passed by the service manager" in output
    assert f"🔌 Server listening on {path}\n" in output
    after = os.stat(path)  # left in place: systemd owns it
    assert (after.st_ino, stat.S_IMODE(after.st_mode)) == (made.st_ino, stat.S_IMODE(made.st_mode))


def test_inherited_socket_is_served_and_left_listening(tmp: Path, held: socket.socket) -> None:
    """No bind, no chmod, no unlink; after the server stops the holder's socket still queues connections."""
    path = held.getsockname()
    before = os.stat(path)
    with _activated(tmp, held) as server:
        server.wait_ready()
        status, body = http_over_uds(path, "POST", "/messages", HELLO, JSON)
        assert status == 201, body
        assert server.stop() == 0
    assert not (tmp / "own.sock").exists()
    after = os.stat(path)
    assert (after.st_ino, after.st_mode, after.st_ctime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_ctime_ns,
    )
    assert f"🔌 Server listening on {path}" in server.output
    assert f"--socket {tmp / 'own.sock'} is not used" in server.output
    # The backlog outlives the server: a client connects and waits for the next one.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(path)
        conn, _ = held.accept()
        conn.close()


def test_workers_share_the_inherited_socket(tmp: Path, held: socket.socket) -> None:
    """--workers 2: each worker serves the holder's socket; no worker sees the LISTEN_* variables."""
    path = held.getsockname()
    inode = os.fstat(held.fileno()).st_ino  # the socket's own inode (sockfs), not its file's
    file_inode = os.stat(path).st_ino
    with _activated(tmp, held, "--workers", "2") as server:
        server.wait_ready()
        wait_until(lambda: "2 workers serving" in server.output, what="both workers serving")
        workers = [
            int(pid)
            for pid in Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
        ]
        assert len(workers) == 2
        for pid in workers:
            fds = [os.stat(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert any(stat.S_ISSOCK(st.st_mode) and st.st_ino == inode for st in fds)
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert not [item for item in environ if item.startswith(b"LISTEN_")], environ
        for _ in range(20):
            assert http_over_uds(path, "POST", "/messages", HELLO, JSON)[0] == 201
        assert server.stop() == 0
    assert os.stat(path).st_ino == file_inode
    assert not (tmp / "own.sock").exists()


def _wrong_sockets() -> Iterator[tuple[str, socket.socket, str]]:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    yield "tcp", tcp, "it is an IPv4 (AF_INET) socket, not a Unix (AF_UNIX) one"
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    yield (
        "not listening",
        idle,
        "it is not listening (a .socket unit with Accept=yes passes connections instead)",
    )
    datagram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    yield "datagram", datagram, "it is a datagram socket, not a stream (SOCK_STREAM) one"


@pytest.mark.parametrize("case", ["tcp", "not listening", "datagram"])
def test_a_wrong_inherited_socket_is_one_line_and_exit_3(tmp: Path, case: str) -> None:
    for name, sock, reason in _wrong_sockets():
        if name != case:
            sock.close()
            continue
        with sock, _activated(tmp, sock) as server:
            assert server.proc.wait(30) == 3
        expected = (
            f"ERROR cannot serve the socket passed by the service manager (fd 3 named 'api'): {reason}; "
            "pass one listening Unix stream socket (ListenStream=/path in the .socket unit)"
        )
        assert server.output.splitlines() == [expected]
        assert not (tmp / "own.sock").exists()


def test_listen_pid_of_another_process_is_ignored(tmp: Path, held: socket.socket) -> None:
    """LISTEN_PID names another process (a wrapper that did not exec): bind --socket as usual."""
    own = str(tmp / "own.sock")
    with _activated(tmp, held, listen_pid="1", ready_at=own) as server:
        server.wait_ready()
        assert http_over_uds(own, "POST", "/messages", HELLO, JSON)[0] == 201
        assert server.stop() == 0
    assert "LISTEN_FDS is set for pid 1, not this process" in server.output
    assert f"🔌 Server listening on {own}" in server.output
    assert not os.path.exists(own)  # its own socket, removed as usual
    assert os.path.exists(held.getsockname())


def test_variables_are_read_once_and_removed() -> None:
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "api", "OTHER": "x"}
    assert inherited_socket(environ) is None  # for another process
    assert environ == {"OTHER": "x"}
    environ = {"LISTEN_FDS": "1"}
    assert inherited_socket(environ) is None  # no LISTEN_PID: not for us (sd_listen_fds)
    assert environ == {}
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}
    assert inherited_socket(environ) is None
    assert environ == {}


@pytest.mark.parametrize(("fds", "shown"), [("2", "LISTEN_FDS=2, names a:b"), ("x\x1b", "LISTEN_FDS=x\\x1b")])
def test_anything_but_one_socket_is_refused(fds: str, shown: str) -> None:
    environ = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": fds}
    if fds == "2":
        environ["LISTEN_FDNAMES"] = "a:b"
    with pytest.raises(SocketError) as caught:
        inherited_socket(environ)
    assert str(caught.value) == (
        f"cannot serve the sockets passed by the service manager ({shown}): "
        "pass one listening Unix stream socket (ListenStream=/path in the .socket unit)"
    )
    assert environ == {}


def test_sigterm_exit_code_with_an_inherited_socket(tmp: Path, held: socket.socket) -> None:
    """uvicorn re-raises a captured SIGTERM after its drain; the server still exits 0."""
    with _activated(tmp, held) as server:
        server.wait_ready()
        assert server.stop(signal.SIGTERM) == 0
        assert server.proc.returncode == 0


def test_a_world_writable_passed_socket_is_served_with_a_warning(tmp: Path, held: socket.socket) -> None:
    """The server never changes a passed socket's mode; it says when anyone may connect."""
    path = held.getsockname()
    os.chmod(path, 0o666)
    with _activated(tmp, held) as server:
        server.wait_ready()
        assert server.stop() == 0
    assert (
        f"WARNING Socket {path} is writable by every user (mode 0666): any local user can call the API; "
        "set SocketMode=0660 and SocketGroup= in its .socket unit"
    ) in server.output.splitlines()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666


def test_an_abstract_passed_socket_is_served_and_named_with_at(tmp: Path) -> None:
    """ListenStream=@name: an abstract-namespace socket has no file; the logs show ``@name``."""
    name = f"uds-test-{os.getpid()}-{tmp.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as held:
        held.bind("\0" + name)
        held.listen(16)
        with _activated(tmp, held, ready_at=str(tmp / "unused")) as server:
            status, _ = wait_until(
                lambda: http_over_uds("\0" + name), what="an answer on the abstract socket"
            )
            assert status == 200
            assert server.stop() == 0
    assert (
        f"Socket @{name} passed by the service manager; --socket {tmp / 'own.sock'} is not used"
        in server.output
    )
    assert f"🔌 Server listening on @{name}" in server.output
