"""Crash under load: ``kill -9`` while 20 connections send 2,000 keyed POSTs, then restart.

Every acknowledged id is there with its text, and retrying every key stores nothing twice.
:func:`crash_under_load` takes the server's extra arguments and the way to kill it, so variants
(more worker processes, one worker killed) reuse it.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.support import ServerProcess, wait_until

MESSAGES = 2_000
CONNECTIONS = 20
KILL_AFTER = 600
"""Acknowledged POSTs before the kill: well before the end, so some are in flight when it lands."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.path)


def _item(i: int) -> tuple[str, str]:
    return f"crash-{i}", f"message {i} of the crash test ✓"


def send_keyed(
    path: str,
    indices: Sequence[int],
    answered: dict[str, tuple[int, int]] | None = None,
    connections: int = CONNECTIONS,
) -> dict[str, tuple[int, int]]:
    """POST ``indices``' messages with their keys over ``connections`` keep-alive connections.

    Fills ``answered`` (and returns it) with key -> (status, id) as each answer arrives. A
    connection that fails (the server was killed) stops its share; the others go on until they
    fail too.
    """
    answered = {} if answered is None else answered
    lock = threading.Lock()

    def worker(share: Sequence[int]) -> None:
        conn = _UnixConnection(path)
        try:
            for i in share:
                key, text = _item(i)
                body = json.dumps({"text": text})
                conn.request(
                    "POST",
                    "/messages",
                    body=body,
                    headers={"Content-Type": "application/json", "Idempotency-Key": key},
                )
                response = conn.getresponse()
                data = response.read()
                if response.status not in (200, 201):
                    raise AssertionError(f"POST {key}: {response.status} {data!r}")
                document = json.loads(data)
                assert document["text"] == text, document
                with lock:
                    answered[key] = (response.status, document["id"])
        except (OSError, http.client.HTTPException):
            return  # the server went away
        finally:
            conn.close()

    threads = [
        threading.Thread(target=worker, args=(indices[n::connections],), daemon=True)
        for n in range(connections)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
        assert not thread.is_alive(), "a sender hung"
    return answered


def _get(path: str, target: str) -> tuple[int, bytes]:
    conn = _UnixConnection(path)
    try:
        conn.request("GET", target)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def kill_server(server: ServerProcess) -> None:
    """``kill -9`` the server process (its whole process group: the workers too, if any)."""
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(30)


def crash_under_load(
    tmp: Path,
    extra: Sequence[str] = (),
    kill: Callable[[ServerProcess], None] = kill_server,
) -> None:
    """The whole scenario; ``kill`` stops the server (or part of it) mid-way through the load."""
    sock = str(tmp / "s.sock")
    data = tmp / "data"
    args = ["--socket", sock, "--data-dir", str(data), "--history-size", "5000", "--idempotency-keys", "5000"]
    args += [*extra, "--log-level", "warning"]
    indices = list(range(MESSAGES))
    with ServerProcess(args, socket_path=sock) as server:
        server.wait_ready()
        acked: dict[str, tuple[int, int]] = {}
        sender = threading.Thread(target=send_keyed, args=(sock, indices, acked), daemon=True)
        sender.start()
        wait_until(lambda: len(acked) >= KILL_AFTER, timeout=60, what=f"{KILL_AFTER} acknowledged POSTs")
        kill(server)
        sender.join(120)
        assert not sender.is_alive()
    assert KILL_AFTER <= len(acked) < MESSAGES, f"the kill landed mid-way: {len(acked)} acknowledged"
    assert all(status == 201 for status, _ in acked.values())

    with ServerProcess(args, socket_path=sock) as server:
        server.wait_ready()
        for key, (_, message_id) in acked.items():
            status, body = _get(sock, f"/messages/{message_id}")
            assert status == 200, (key, message_id, body)
            assert json.loads(body)["text"] == _item(int(key.split("-")[1]))[1]

        retried = send_keyed(sock, indices)
        assert len(retried) == MESSAGES, "every retry is answered"
        for key, (_, message_id) in acked.items():
            assert retried[key] == (200, message_id), f"{key} was stored again: {retried[key]}"
        status, body = _get(sock, "/messages?limit=5000")
        assert status == 200
        messages = json.loads(body)["messages"]
        texts = [m["text"] for m in messages]
        assert len(texts) == len(set(texts)) == MESSAGES, "every message once, none twice"
        ids = [m["id"] for m in messages]
        assert ids == sorted(set(ids))
        assert {message_id for _, message_id in retried.values()} == set(ids)
        assert server.stop() == 0


@pytest.mark.parametrize("durability", ["normal", "full"])
def test_acknowledged_messages_survive_kill_9_under_load_and_retries_store_nothing_twice(
    tmp: Path, durability: str
) -> None:
    """``normal`` commits on the event loop, ``full`` on the writer thread: both acknowledge only
    what is committed."""
    crash_under_load(tmp, ["--durability", durability])
