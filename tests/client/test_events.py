"""Following ``GET /events`` from the client: ``uds-client events`` (output, Ctrl-C,
resuming across a server restart), a client killed and restarted with its last id, and
``AsyncClient.events()``; all against real server processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from client import AsyncClient, Client, Event
from tests.support import PYTHON, ROOT, ServerProcess, run_cli

TIMEOUT = 20.0


@contextlib.contextmanager
def server_at(path: str, *args: str) -> Iterator[ServerProcess]:
    with ServerProcess(["--socket", path, *args], socket_path=path) as server:
        server.wait_ready()
        yield server
        assert server.stop() == 0


class Follower:
    """``uds-client events ARGS`` in a child process; its output lines arrive in a queue."""

    def __init__(self, path: str, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "client", "--socket", path, "events", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._pump_thread = threading.Thread(target=self._pump, daemon=True)
        self._pump_thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line(self) -> str:
        try:
            got = self.lines.get(timeout=TIMEOUT)
        except queue.Empty:
            raise AssertionError(f"uds-client events printed nothing for {TIMEOUT:g}s") from None
        assert got is not None, f"uds-client events exited: {self.stop()}"
        return got

    def events(self, count: int) -> list[dict[str, object]]:
        return [json.loads(self.line()) for _ in range(count)]

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Send ``sig``; the exit code and what it wrote on stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(TIMEOUT)
        finally:
            self.proc.kill()
            self.proc.wait()
            self._pump_thread.join(TIMEOUT)
        assert self.proc.stderr is not None
        assert self.proc.stdout is not None
        with self.proc.stderr, self.proc.stdout:
            return code, self.proc.stderr.read()


def ids_of(events: list[dict[str, object]]) -> list[object]:
    return [e["id"] for e in events if e["event"] == "message"]


# -- uds-client events --------------------------------------------------------------------------


def test_events_prints_one_line_per_message_with_controls_escaped_and_ctrl_c_exits_0(tmp_short: Path) -> None:
    path = str(tmp_short / "s.sock")
    with server_at(path, "--store", "memory"), Client(path) as client:
        sent = client.send("hi\x1b[2J\r\nthere")
        follower = Follower(path, "--since", "0")
        line = follower.line()
        assert line.endswith(
            f" message #{sent.id} pid={os.getpid()} uid={os.getuid()} gid={os.getgid()}: "
            "hi\\x1b[2J\\r\\nthere"
        ), line
        assert "\x1b" not in line
        later = client.send("next")
        assert follower.line().endswith(
            f"message #{later.id} pid={os.getpid()} uid={os.getuid()} gid={os.getgid()}: next"
        )
        assert follower.stop(signal.SIGINT) == (0, "")


def test_events_json_is_one_object_per_line(tmp_short: Path) -> None:
    path = str(tmp_short / "s.sock")
    with server_at(path, "--store", "memory"), Client(path) as client:
        sent = client.send("as json\u2028")
        follower = Follower(path, "--since", "0", "--json")
        line = follower.line()
        assert "\u2028" not in line
        event = json.loads(line)
        assert event["event"] == "message"
        assert event["id"] == sent.id
        assert event["data"] == sent.to_json()
        assert follower.stop() == (0, "")


def test_events_without_a_server_fails_with_one_line_and_exit_3(tmp_short: Path) -> None:
    result = run_cli("--socket", str(tmp_short / "none.sock"), "events")
    assert result.returncode == 3
    assert result.stderr.startswith("Error: cannot connect to unix://")
    assert result.stderr.count("\n") == 1


def test_events_resumes_across_a_server_restart_missing_nothing(tmp_short: Path) -> None:
    path = str(tmp_short / "s.sock")
    store = ("--store", "sqlite", "--data-dir", str(tmp_short / "data"))
    with server_at(path, *store), Client(path) as client:
        before = client.send("before").id
        follower = Follower(path, "--json", "--since", str(before))
        first = client.send("while following").id
        assert ids_of(follower.events(1)) == [first]
    # The server is gone: the follower tries again until it is back, then replays what it missed.
    with server_at(path, *store), Client(path) as client:
        after = [client.send(f"after {i}").id for i in range(3)]
        assert ids_of(follower.events(3)) == after
        assert after[0] == first + 1
        last = client.send("and once").id
        assert ids_of(follower.events(1)) == [last]  # nothing came twice in between
        assert follower.stop() == (0, "")


def test_a_memory_server_restarted_under_the_follower_gets_a_reset_line(tmp_short: Path) -> None:
    path = str(tmp_short / "s.sock")
    with server_at(path, "--store", "memory"), Client(path) as client:
        for i in range(3):
            client.send(f"lost {i}")
        follower = Follower(path, "--since", "0")
        assert [" message #" in follower.line() for _ in range(3)] == [True] * 3
    with server_at(path, "--store", "memory"), Client(path) as client:
        reset = follower.line()
        assert " reset: " in reset
        assert "list them again" in reset
        fresh = client.send("new life")
        assert follower.line().endswith(
            f"message #{fresh.id} pid={os.getpid()} uid={os.getuid()} gid={os.getgid()}: new life"
        )
        assert follower.stop() == (0, "")


def test_a_follower_killed_and_restarted_with_its_last_id_misses_nothing_and_repeats_nothing(
    tmp_short: Path,
) -> None:
    path = str(tmp_short / "s.sock")
    with server_at(path, "--store", "memory"), Client(path) as client:
        posted = [client.send("first").id]
        follower = Follower(path, "--since", "0", "--json")
        posted += [client.send(f"seen {i}").id for i in range(4)]
        seen = ids_of(follower.events(5))
        assert seen == posted
        assert follower.stop(signal.SIGKILL)[0] == -signal.SIGKILL  # no goodbye
        posted += [client.send(f"while away {i}").id for i in range(5)]
        again = Follower(path, "--since", str(seen[-1]), "--json")
        posted += [client.send(f"after {i}").id for i in range(5)]
        seen += ids_of(again.events(10))
        assert seen == posted
        assert again.stop() == (0, "")


# -- the library --------------------------------------------------------------------------------


def test_async_client_follows_from_an_id_and_through_a_restart(tmp_short: Path) -> None:
    path = str(tmp_short / "s.sock")
    store = ("--store", "sqlite", "--data-dir", str(tmp_short / "data"))
    servers = [_start(path, store)]

    def restart() -> None:
        assert servers[-1].stop() == 0
        servers.append(_start(path, store))

    async def main() -> tuple[list[int], list[int]]:
        async with AsyncClient(path) as client:
            posted = [(await client.send(f"m{i}")).id for i in range(3)]
            events = client.events(posted[0]).__aiter__()
            got = [await _message_id(events) for _ in range(2)]
            await asyncio.to_thread(restart)
            posted += [(await client.send(f"n{i}")).id for i in range(2)]
            got += [await _message_id(events) for _ in range(2)]
            await events.aclose()  # type: ignore[attr-defined]
            return posted[1:], got

    try:
        posted, got = asyncio.run(main())
    finally:
        for server in servers:
            server.__exit__(None, None, None)
    assert got == posted


async def _message_id(events: AsyncIterator[Event]) -> int:
    event = await asyncio.wait_for(anext(events), TIMEOUT)
    message = event.message
    assert message is not None, event
    return message.id


def _start(path: str, store: tuple[str, ...]) -> ServerProcess:
    server = ServerProcess(["--socket", path, *store], socket_path=path)
    server.wait_ready()
    return server


def test_a_dropped_stream_is_resumed_with_last_event_id(tmp_short: Path) -> None:
    """A raw server: the first stream sends event 5 and hangs up; the client must come back with
    ``Last-Event-ID: 5`` (and the 503 in between is retried, not raised)."""
    from tests.client.conftest import raw_server
    from tests.support import read_message

    asked: list[str | None] = []
    stream_head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\nretry: 1000\n\n"
    )

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        request = read_message(conn)
        if request is None:
            return
        head, headers, _ = request
        if b" /_ping " in head:  # no API versions: the client uses the unversioned paths
            conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            return
        asked.append(headers.get("last-event-id"))
        if len(asked) == 1:
            conn.sendall(stream_head + b'event: message\ndata: {"n": 5}\nid: 5\n\n')
        elif len(asked) == 2:
            body = b'{"error":"unavailable","message":"busy","status":503}'
            conn.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
        else:
            conn.sendall(stream_head + b': heartbeat\n\nevent: message\ndata: {"n": 6}\nid: 6\n\n')
            stop.wait(TIMEOUT)

    with raw_server(str(tmp_short / "e.sock"), handle) as path, Client(path) as client:
        events = client.events()
        got = [next(events) for _ in range(2)]
        events.close()  # type: ignore[attr-defined]
    assert [(e.event, e.id, e.json()) for e in got] == [("message", 5, {"n": 5}), ("message", 6, {"n": 6})]
    assert asked == [None, "5", "5"]
