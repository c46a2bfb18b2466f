"""``--workers N``: real worker processes on one real socket, started, killed and stopped.

Which worker holds a connection is read from /proc (psutil): every connection a worker accepted
is a socket bound to the listening path, beside the listening socket itself.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pytest

from app.config import Settings
from app.serving.server import run
from tests.support import (
    NOBODY,
    PYTHON,
    ROOT,
    ServerProcess,
    http_over_uds,
    read_response,
    wait_until,
)

JSON = {"content-type": "application/json"}
SERVED = re.compile(r"Worker pid (\d+) stopped after (\d+) request\(s\)")


def _start(tmp: Path, *extra: str, workers: int = 2) -> ServerProcess:
    path = str(tmp / "s.sock")
    server = ServerProcess(
        ["--socket", path, "--workers", str(workers), "--data-dir", str(tmp / "data"), *extra],
        socket_path=path,
    )
    try:
        server.wait_ready()
        wait_until(lambda: "🔌 Server listening on" in server.output, what="the demo line")
    except BaseException:
        server.kill()
        raise
    return server


def _workers(server: ServerProcess) -> list[int]:
    return sorted(child.pid for child in psutil.Process(server.proc.pid).children())


def _running(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for whoever adopted it does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _held(server: ServerProcess) -> dict[int, int]:
    """Connections each worker holds (sockets bound to the listening path, the listener aside)."""
    held = {}
    for child in psutil.Process(server.proc.pid).children():
        held[child.pid] = sum(1 for conn in child.net_connections("unix") if conn.laddr) - 1
    return held


def _accepted(server: ServerProcess, total: int) -> dict[int, int] | None:
    """``_held`` once the workers hold ``total`` connections in all, else None."""
    held = _held(server)
    return held if sum(held.values()) == total else None


def _served(output: str) -> dict[int, int]:
    """Requests each worker served, from the line each logs when it stops."""
    return {int(pid): int(count) for pid, count in SERVED.findall(output)}


def _request(method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    return head.encode() + b"\r\n" + body


def _post(path: str, text: str, key: str | None = None) -> tuple[int, dict[str, object]]:
    headers = dict(JSON)
    if key is not None:
        headers["Idempotency-Key"] = key
    status, body = http_over_uds(path, "POST", "/messages", json.dumps({"text": text}).encode(), headers)
    return status, json.loads(body)


def _history(path: str, limit: int) -> list[dict[str, object]]:
    status, body = http_over_uds(path, "GET", f"/messages?limit={limit}", timeout=30)
    assert status == 200, body
    messages: list[dict[str, object]] = json.loads(body)["messages"]
    return messages


@pytest.fixture
def server(tmp: Path) -> Iterator[ServerProcess]:
    started = _start(tmp)
    with started:
        yield started


# -- one socket, one history ---------------------------------------------------------------------


def test_ids_are_unique_and_increase_across_workers(server: ServerProcess) -> None:
    """16 clients post 25 messages each, a new connection per message: every worker serves some,
    every id is new, each client's ids increase, and the history holds them all."""
    path = str(server.socket_path)
    assert len(_workers(server)) == 2
    assert server.output.count("🔌 Server listening on") == 1

    def client(number: int) -> list[int]:
        ids = []
        for i in range(25):
            status, message = _post(path, f"c{number}-{i}")
            assert status == 201, message
            ids.append(int(str(message["id"])))
        return ids

    with ThreadPoolExecutor(16) as pool:
        per_client = list(pool.map(client, range(16)))
    for ids in per_client:
        assert ids == sorted(ids)
        assert len(set(ids)) == len(ids)
    every = [i for ids in per_client for i in ids]
    assert len(set(every)) == 400
    history = _history(path, 400)
    assert [m["id"] for m in history] == sorted(every)
    assert server.stop() == 0
    served = _served(server.output)
    assert len(served) == 2, server.output
    # One health probe (wait_ready) and one GET besides the 400 POSTs: both workers took POSTs.
    assert sum(served.values()) == 402, served
    assert min(served.values()) > 2, served
    # The demo's line for each message, with its peer and id on the next line, as with one process.
    lines = server.output.splitlines()
    received = {line: lines[i + 1] for i, line in enumerate(lines) if line.startswith("📩 Server received: ")}
    assert len(received) == 400
    peer = f"  from peer pid={os.getpid()} uid={os.getuid()} gid={os.getgid()} (message "
    assert all(after.startswith(peer) for after in received.values())
    assert {int(after[len(peer) : -1]) for after in received.values()} == set(every)


def test_one_idempotency_key_stores_one_message_across_workers(server: ServerProcess) -> None:
    """50 clients connect, then post the same key at once; rounds repeat (a fresh key each) until
    one round's connections were spread over both workers. Every round stores one message."""
    path = str(server.socket_path)
    spread: dict[int, int] = {}
    for attempt in range(10):
        body = json.dumps({"text": f"once {attempt}"}).encode()
        request = _request("POST", "/messages", body, {**JSON, "Idempotency-Key": f"same-{attempt}"})
        conns = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(50)]
        barrier = threading.Barrier(50)

        def send(
            conn: socket.socket, barrier: threading.Barrier = barrier, request: bytes = request
        ) -> tuple[int, dict[str, object]]:
            conn.settimeout(30)
            conn.connect(path)
            barrier.wait()
            conn.sendall(request)
            status, _, answer = read_response(conn)
            return status, json.loads(answer)

        try:
            with ThreadPoolExecutor(50) as pool:
                answers = list(pool.map(send, conns))
            held = _held(server)  # the connections stay open: count them per worker
        finally:
            for conn in conns:
                conn.close()
        statuses = sorted(status for status, _ in answers)
        assert statuses == [200] * 49 + [201], statuses
        assert len({message["id"] for _, message in answers}) == 1
        assert sum(held.values()) == 50, held
        if min(held.values()) > 0:
            spread = held
            break
    assert spread, "10 rounds of 50 connections all went to one worker"
    texts = [m["text"] for m in _history(path, 100)]
    assert texts == [f"once {i}" for i in range(attempt + 1)]
    assert server.stop() == 0


_AS_NOBODY = """\
import socket, sys
from tests.support import read_response
conns = []
for _ in range(40):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(30)
    conn.connect(sys.argv[1])
    conns.append(conn)
for conn in conns:
    conn.sendall(b"POST /messages HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\n"
                 b"Content-Length: 12\\r\\n\\r\\n{\\"text\\":\\"x\\"}")
print(" ".join(str(read_response(conn)[0]) for conn in conns), flush=True)
sys.stdin.read()
"""


def test_peer_allowlist_holds_in_every_worker(tmp: Path) -> None:
    """With --allow-uid ours, uid 65534 gets 403 from every worker (rounds of 40 connections
    until both workers held some of them), and we get 201."""
    tmp.chmod(0o755)
    server = _start(tmp, "--allow-uid", str(os.getuid()), "--socket-mode", "0666")
    path = str(server.socket_path)
    with server:
        for _ in range(8):
            with subprocess.Popen(
                [PYTHON, "-c", _AS_NOBODY, path],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            ) as nobody:
                assert nobody.stdout is not None
                statuses = nobody.stdout.readline().split()
                held = _held(server)  # uid 65534 keeps its connections open until its stdin closes
            assert statuses == ["403"] * 40
            assert sum(held.values()) == 40, held
            if min(held.values()) > 0:
                break
        else:
            pytest.fail(f"8 rounds of 40 connections all went to one worker (last: {held})")
        assert _post(path, "from the allowed uid")[0] == 201
        assert [m["text"] for m in _history(path, 10)] == ["from the allowed uid"]
        assert server.stop() == 0


# -- stopping, dying, failing ----------------------------------------------------------------------


def test_sigterm_drains_every_worker_then_exits_0_and_removes_the_socket(tmp: Path) -> None:
    """A request in flight on each worker: SIGTERM lets both finish, then the parent exits 0."""
    server = _start(tmp, "--shutdown-timeout", "20")
    path = str(server.socket_path)
    body = json.dumps({"text": "in flight"}).encode()
    request = _request("POST", "/messages", body, JSON)
    with server:
        conns: list[socket.socket] = []
        held: dict[int, int] = {}
        try:
            # Open connections until each worker holds one mid-request (head and half the body).
            while not held or min(held.values()) == 0:
                assert len(conns) < 64, f"64 connections all went to one worker: {held}"
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.settimeout(30)
                conn.connect(path)
                conn.sendall(request[:-5])
                conns.append(conn)
                wanted = len(conns)
                held = wait_until(
                    lambda wanted=wanted: _accepted(server, wanted),
                    what="the connection to be accepted",
                )
            server.signal(signal.SIGTERM)
            wait_until(
                lambda: server.output.count("request(s) in flight") == 2,
                what="both workers to start draining",
            )
            for conn in conns:
                conn.sendall(request[-5:])
            statuses = [read_response(conn)[0] for conn in conns]
        finally:
            for conn in conns:
                conn.close()
        assert statuses == [201] * len(conns)
        assert server.stop(timeout=30) == 0
    output = server.output
    assert output.count("Drain done in") == 2, output
    assert "Drain timed out" not in output
    assert output.count("🔌 Server listening on") == 1
    assert not os.path.exists(path)


def test_ctrl_c_reaches_the_whole_group_and_stops_cleanly(server: ServerProcess) -> None:
    """SIGINT to the process group, as a terminal's Ctrl-C sends it: one drain each, exit 0."""
    path = str(server.socket_path)
    os.killpg(server.proc.pid, signal.SIGINT)
    wait_until(lambda: server.proc.poll() is not None, timeout=30, what="the server to stop")
    assert server.stop() == 0
    assert server.output.count("Drain done in") == 2, server.output
    assert "Drain cut short" not in server.output
    assert not os.path.exists(path)


def test_drain_is_cut_at_the_shutdown_timeout(tmp: Path) -> None:
    """A request that never finishes: its worker gives up after --shutdown-timeout; exit 0 all the same."""
    server = _start(tmp, "--shutdown-timeout", "1")
    path = str(server.socket_path)
    with server:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            conn.sendall(_request("POST", "/messages", b'{"text":"never"}', JSON)[:-3])
            wait_until(lambda: sum(_held(server).values()) == 1, what="the connection to be accepted")
            server.signal(signal.SIGTERM)
            assert server.stop(timeout=30) == 0
        finally:
            conn.close()
    assert "Drain timed out" in server.output
    assert not os.path.exists(path)


def test_a_killed_worker_is_replaced_and_logged(server: ServerProcess) -> None:
    path = str(server.socket_path)
    first, second = _workers(server)
    os.kill(first, signal.SIGKILL)
    line = wait_until(
        lambda: next((x for x in server.output.splitlines() if f"Worker pid {first} " in x), None),
        what="the line about the dead worker",
    )
    assert "killed by signal SIGKILL" in line, line
    replacement = int(re.findall(r"replaced by pid (\d+)", line)[0])
    wait_until(lambda: _workers(server) == sorted([second, replacement]), what="the replacement")
    # The replacement serves: with the other worker stopped, only it can answer.
    os.kill(second, signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(30)
            conn.connect(path)
            conn.sendall(_request("GET", "/healthz"))
            assert read_response(conn)[0] == 200
            assert _held(server) == {second: 0, replacement: 1}
    finally:
        os.kill(second, signal.SIGCONT)
    assert server.stop() == 0
    assert server.output.count("🔌 Server listening on") == 1
    assert not os.path.exists(path)


def test_socket_removed_while_serving_stops_every_worker_with_exit_3(server: ServerProcess) -> None:
    workers = _workers(server)
    assert server.socket_path is not None
    os.unlink(server.socket_path)
    wait_until(lambda: server.proc.poll() is not None, timeout=30, what="the server to stop itself")
    assert server.stop() == 3
    assert len([x for x in server.output.splitlines() if "was removed or replaced" in x]) == 1
    assert not any(_running(pid) for pid in workers)


def test_workers_stop_when_the_server_process_is_killed(tmp: Path) -> None:
    """``kill -9`` of the supervising process alone: its workers drain and exit by themselves,
    and the socket they leave behind is stale, so a new server replaces it."""
    server = _start(tmp)
    with server:
        workers = _workers(server)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(30)
        wait_until(lambda: not any(_running(pid) for pid in workers), timeout=30, what="the workers to exit")
    for pid in workers:
        assert f"Worker pid {pid}: the parent process is gone; stopping" in server.output
        assert f"Worker pid {pid} stopped after" in server.output
    assert server.socket_path is not None
    assert os.path.exists(server.socket_path)
    again = _start(tmp)
    with again:
        assert "Removed stale socket" in again.output
        assert again.stop() == 0


def _unbuildable(settings: Settings, **_: object) -> object:
    raise RuntimeError("no application today")


def test_workers_that_cannot_start_stop_the_server_with_exit_3(
    tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every worker fails while building its app: a few retries, not a hot loop, then exit 3."""
    path = str(tmp / "s.sock")
    settings = Settings(socket=path, workers=2, data_dir=str(tmp / "data"))
    with caplog.at_level(logging.INFO):
        assert run(settings, app_factory=_unbuildable) == 3
    died = [
        r.getMessage()
        for r in caplog.records
        if r.name == "app.serving.workers" and "before serving" in r.getMessage()
    ]
    assert 2 <= len(died) <= 4, died
    assert "Every worker failed to start" in caplog.text
    assert not os.path.exists(path)


def test_workers_with_the_memory_store_is_a_usage_error(tmp: Path) -> None:
    for args, env in (
        (["--workers", "2", "--store", "memory"], {}),
        ([], {"UDS_WORKERS": "3", "UDS_STORE": "memory"}),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "app", "--socket", str(tmp / "s.sock"), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, **env},
            timeout=60,
            check=False,
        )
        assert done.returncode == 2, done
        lines = done.stderr.splitlines()
        assert len(lines) == 1, done.stderr
        assert "--store sqlite" in lines[0]
        assert not (tmp / "s.sock").exists()


# -- crash under load ------------------------------------------------------------------------------


def _latest_id(path: str) -> int:
    messages = _history(path, 1)
    return int(str(messages[-1]["id"])) if messages else 0


def _kill_one_worker_then_everything(server: ServerProcess) -> None:
    """``kill -9`` a worker mid-load, then the parent and the other worker.

    The worker killed first holds fewer of the senders' connections, but some; the others go on,
    and the rest is killed once 100 more messages were stored. (When one worker holds them all,
    as the kernel's wake-up order often makes it, that one is killed and every sender stops.)
    """
    from tests.app.test_durable_crash import kill_server

    path = str(server.socket_path)
    held = _held(server)
    busy = [pid for pid, count in held.items() if count]
    victim = min(busy, key=held.__getitem__)
    before = _latest_id(path)
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: f"Worker pid {victim} killed by signal SIGKILL" in server.output, what="the replacement line"
    )
    if len(busy) > 1:
        wait_until(lambda: _latest_id(path) >= before + 100, timeout=60, what="100 more messages stored")
    kill_server(server)  # the parent and every worker: they share its process group


def test_crash_under_load_with_two_workers_and_one_killed_first(tmp: Path) -> None:
    """The durable store's crash test, with --workers 2: one worker is killed mid-load (its
    connections fail, the others go on), then the whole server; after a restart every answered
    id is there with its text and retrying every key stores nothing twice."""
    from tests.app.test_durable_crash import crash_under_load

    crash_under_load(tmp, ["--workers", "2"], kill=_kill_one_worker_then_everything)
