"""Readiness notification: a datagram socket standing in for systemd's NOTIFY_SOCKET hears the server."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.serving.notify import Notifier
from tests.support import ServerProcess, http_over_uds, wait_until

_UCRED = struct.Struct("3i")


class Manager:
    """The service manager's end: a datagram socket that collects what the server sends, and which
    process sent it (``SO_PASSCRED``, as systemd checks ``NotifyAccess=``)."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(0)
        self.messages: list[tuple[float, list[str]]] = []
        self.senders: set[int] = set()

    def collect(self) -> list[list[str]]:
        """Every message received so far, each as its lines."""
        with contextlib.suppress(BlockingIOError):
            while True:
                data, ancillary, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
                for level, kind, value in ancillary:
                    if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                        self.senders.add(_UCRED.unpack(value[: _UCRED.size])[0])
                self.messages.append((time.monotonic(), data.decode().split("\n")))
        return [lines for _, lines in self.messages]

    def wait_for(self, line: str) -> list[str]:
        """The first message holding ``line`` (polled with a deadline)."""

        def found() -> list[str] | None:
            return next((lines for lines in self.collect() if line in lines), None)

        return wait_until(found, what=f"{line} from the server; got {self.collect()}")


@pytest.fixture
def manager(tmp: Path) -> Iterator[Manager]:
    mgr = Manager(str(tmp / "notify"))
    yield mgr
    mgr.sock.close()


def _server(tmp: Path, *args: str, env: dict[str, str]) -> ServerProcess:
    path = str(tmp / "s.sock")
    return ServerProcess(["--socket", path, *args], socket_path=path, env=env)


def test_ready_status_and_stopping(tmp: Path, manager: Manager) -> None:
    """READY=1 (with MAINPID and STATUS) once the socket answers; STOPPING=1 when the drain starts."""
    with _server(tmp, env={"NOTIFY_SOCKET": str(tmp / "notify")}) as server:
        ready = manager.wait_for("READY=1")
        # Ready means serving: the first request after READY=1 is answered with no retry.
        assert http_over_uds(str(tmp / "s.sock"))[0] == 200
        assert f"MAINPID={server.proc.pid}" in ready
        assert f"STATUS=Serving on {tmp / 's.sock'}" in ready
        assert server.stop() == 0
    stopping = manager.wait_for("STOPPING=1")
    assert manager.senders == {server.proc.pid}
    assert "STATUS=Draining 0 connection(s) after SIGTERM" in stopping
    assert [m for m in manager.collect() if "READY=1" in m] == [ready]  # once
    assert ["WATCHDOG=1"] not in manager.collect()  # not asked for


def test_workers_ready_once_every_worker_serves(tmp: Path, manager: Manager) -> None:
    """--workers 2: the parent alone notifies (READY=1 with its own pid once both workers serve,
    watchdog pings from its loop); the workers never do."""
    env = {"NOTIFY_SOCKET": str(tmp / "notify"), "WATCHDOG_USEC": "200000"}
    with _server(tmp, "--workers", "2", env=env) as server:
        ready = manager.wait_for("READY=1")
        assert "2 workers serving" in server.output  # logged just before READY=1 is sent
        assert f"MAINPID={server.proc.pid}" in ready
        assert f"STATUS=Serving on {tmp / 's.sock'} with 2 workers" in ready
        wait_until(lambda: manager.collect().count(["WATCHDOG=1"]) >= 3, what="watchdog pings")
        assert server.stop() == 0
    assert "STATUS=Stopping 2 worker(s)" in manager.wait_for("STOPPING=1")
    assert sum(1 for m in manager.collect() if "READY=1" in m) == 1
    assert manager.senders == {server.proc.pid}


def test_worker_death_is_a_status_line(tmp: Path, manager: Manager) -> None:
    env = {"NOTIFY_SOCKET": str(tmp / "notify")}
    with _server(tmp, "--workers", "2", env=env) as server:
        manager.wait_for("READY=1")
        worker = int(Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()[0])
        os.kill(worker, 9)
        status = wait_until(
            lambda: next((m for m in manager.collect() if any(f"pid {worker}" in line for line in m)), None),
            what="a STATUS line about the killed worker",
        )
        assert status[0].startswith(f"STATUS=Worker pid {worker} killed by signal SIGKILL; replaced by pid ")
        assert server.stop() == 0


def test_abstract_notify_socket_and_watchdog(tmp: Path) -> None:
    """NOTIFY_SOCKET=@name reaches the abstract namespace; WATCHDOG_USEC asks a ping every half period."""
    name = f"uds-test-{os.getpid()}-{tmp.name}"
    manager = Manager(b"\0" + name.encode())
    env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "400000"}
    with manager.sock, _server(tmp, env=env) as server:
        manager.wait_for("READY=1")
        ready_at = time.monotonic()

        def pings() -> int:
            return len(
                [lines for at, lines in manager.messages if lines == ["WATCHDOG=1"] and at >= ready_at]
            )

        wait_until(lambda: manager.collect() and pings() >= 6, what="six watchdog pings")
        # Six pings span five periods of 0.2 s: 1 s, or 0.5 s if it pinged on every tick of the loop.
        assert time.monotonic() - ready_at > 0.7
        assert server.stop() == 0


def test_watchdog_for_another_pid_is_not_pinged(tmp: Path, manager: Manager) -> None:
    env = {"NOTIFY_SOCKET": str(tmp / "notify"), "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
    with _server(tmp, env=env) as server:
        manager.wait_for("READY=1")
        http_over_uds(str(tmp / "s.sock"))  # a few ticks of the loop later
        assert server.stop() == 0
    manager.wait_for("STOPPING=1")
    assert ["WATCHDOG=1"] not in manager.collect()


def test_a_missing_notify_socket_costs_one_warning(tmp: Path) -> None:
    """The manager's socket is gone: the server serves and stops as usual, with one warning line."""
    gone = str(tmp / "gone")
    env = {"NOTIFY_SOCKET": gone, "WATCHDOG_USEC": "100000"}
    with _server(tmp, env=env) as server:
        server.wait_ready()
        for _ in range(5):
            assert http_over_uds(str(tmp / "s.sock"))[0] == 200
        wait_until(lambda: "Could not notify" in server.output, what="the warning")
        assert server.stop() == 0
    warnings = [line for line in server.output.splitlines() if "notify" in line]
    assert warnings == [
        f"WARNING Could not notify the service manager at {gone} (No such file or directory): it may "
        "not learn the server's state; serving on"
    ]


def test_notifier_reads_and_removes_its_variables() -> None:
    environ = {
        "NOTIFY_SOCKET": "@x",
        "WATCHDOG_USEC": "2000000",
        "WATCHDOG_PID": str(os.getpid()),
        "OTHER": "y",
    }
    notifier = Notifier.from_environ(environ)
    assert (notifier.address, notifier.watchdog_every) == (b"\0x", 1.0)
    assert environ == {"OTHER": "y"}
    assert Notifier.from_environ({"NOTIFY_SOCKET": "/n", "WATCHDOG_USEC": "5"}).watchdog_every == 2.5e-6
    assert Notifier.from_environ({}).address is None
    assert Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:9"}).address is None


def test_a_full_manager_queue_never_blocks(tmp: Path) -> None:
    """Nobody reads the manager's socket: sends are dropped at once, never waited on."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unread:
        unread.bind(str(tmp / "n"))
        notifier = Notifier(str(tmp / "n"))
        started = time.process_time()
        for _ in range(2000):
            notifier.send("x" * 1000)
        notifier.close()
        assert time.process_time() - started < 5  # it returned: a blocking send would hang here
        assert notifier._warned
