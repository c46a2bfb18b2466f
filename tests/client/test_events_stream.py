"""``Client.events()`` and ``AsyncClient.events()`` against raw servers that frame the stream as a
real one never would: line ends of every kind trickled a byte at a time, an event over the cap, a
stream cut in the middle of an event, answers that are not a stream, streams that end at once."""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from client import APIError, AsyncClient, Client, ClientError, ConnectError, Event
from tests.client.conftest import Handler, json_answer, raw_server
from tests.support import read_message

TIMEOUT = 20.0
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\nretry: 1000\n\n"
NO_PING = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def stream_server(streams: Callable[[int, str | None, socket.socket, threading.Event], None]) -> Handler:
    """A handler answering ``/_ping`` with 404 (unversioned paths) and the n-th ``GET /events``
    (from 0) with ``streams(n, last_event_id, conn, stop)``."""
    count = [0]
    lock = threading.Lock()

    def handle(conn: socket.socket, stop: threading.Event) -> None:
        request = read_message(conn)
        if request is None:
            return
        head, headers, _ = request
        if b" /_ping " in head:
            conn.sendall(NO_PING)
            return
        with lock:
            index = count[0]
            count[0] += 1
        streams(index, headers.get("last-event-id"), conn, stop)

    return handle


def first_events(path: str, count: int, use_async: bool, **options: Any) -> list[Event]:
    """The first ``count`` events of ``Client(path).events()`` (or ``AsyncClient``'s)."""
    if not use_async:
        with Client(path, **options) as client:
            events = client.events()
            try:
                return [next(events) for _ in range(count)]
            finally:
                events.close()  # type: ignore[attr-defined]

    async def main() -> list[Event]:
        async with AsyncClient(path, **options) as client:
            events = client.events()
            try:
                return [await asyncio.wait_for(anext(events), TIMEOUT) for _ in range(count)]
            finally:
                await events.aclose()  # type: ignore[attr-defined]

    return asyncio.run(main())


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_line_ends_of_every_kind_trickled_a_byte_at_a_time_make_whole_events(
    tmp_short: object, use_async: bool
) -> None:
    stream = b': heartbeat\r\n\r\nevent: message\rdata: {"a":\r\ndata: 1}\nid: 7\r\n\r\ndata: "x"\n\n'

    def streams(index: int, last: str | None, conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(HEAD)
        for byte in stream:
            conn.sendall(bytes([byte]))
            time.sleep(0.002)  # a server that trickles: the client reads many tiny chunks
        stop.wait(TIMEOUT)

    with raw_server(f"{tmp_short}/t.sock", stream_server(streams)) as path:
        got = first_events(path, 2, use_async)
    assert [(e.event, e.id, e.json()) for e in got] == [("message", 7, {"a": 1}), ("message", 7, "x")]


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_an_endless_event_is_refused_at_the_cap_with_one_client_error(
    tmp_short: object, use_async: bool
) -> None:
    sent = [0]

    def streams(index: int, last: str | None, conn: socket.socket, stop: threading.Event) -> None:
        conn.sendall(HEAD + b'event: message\nid: 1\ndata: {"a": 1}\n\ndata: ')
        while not stop.is_set() and sent[0] < 64 * 1024 * 1024:
            conn.sendall(b"x" * 4096)  # one data line that never ends
            sent[0] += 4096

    with (
        raw_server(f"{tmp_short}/c.sock", stream_server(streams)) as path,
        pytest.raises(ClientError, match=r"sent an event larger than 100000 bytes on GET /events") as info,
    ):
        first_events(path, 2, use_async, max_response_bytes=100_000)
    assert "Traceback" not in str(info.value)
    assert sent[0] < 4 * 1024 * 1024, "the client kept reading far past its cap"


CUT_TAILS = {
    "after a line that ends in CR": b'event: message\ndata: {"n": 6}\nid: 6\r',
    "before the blank line": b'event: message\ndata: {"n": 6}\nid: 6\n',
    "in the middle of a line": b'event: message\nid: 6\ndata: {"n"',
}


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("tail", CUT_TAILS.values(), ids=CUT_TAILS.keys())
def test_a_stream_cut_mid_event_yields_none_of_it_and_resumes_after_the_last_whole_one(
    tmp_short: object, tail: bytes, use_async: bool
) -> None:
    asked: list[str | None] = []

    def streams(index: int, last: str | None, conn: socket.socket, stop: threading.Event) -> None:
        asked.append(last)
        if index == 0:
            conn.sendall(HEAD + b'event: message\ndata: {"n": 5}\nid: 5\n\n' + tail)
            return  # and hang up
        conn.sendall(HEAD + b'event: message\ndata: {"n": 6}\nid: 6\n\n')
        stop.wait(TIMEOUT)

    with raw_server(f"{tmp_short}/m.sock", stream_server(streams)) as path:
        got = first_events(path, 2, use_async)
    assert [(e.event, e.id, e.json()) for e in got] == [("message", 5, {"n": 5}), ("message", 6, {"n": 6})]
    assert asked == [None, "5"]


ANSWERS = {
    "not a stream": (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n"
        b"connection: close\r\n\r\n{}",
        ClientError,
        "answered GET /events with application/json, not an event stream",
    ),
    "an error": (
        json_answer(404, b'{"error":"not_found","message":"no events here","status":404}'),
        APIError,
        "server answered 404: no events here",
    ),
}


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(("answer", "error", "text"), ANSWERS.values(), ids=ANSWERS.keys())
def test_an_answer_that_is_not_a_stream_is_raised_at_once(
    tmp_short: object, answer: bytes, error: type[Exception], text: str, use_async: bool
) -> None:
    asked: list[str | None] = []

    def streams(index: int, last: str | None, conn: socket.socket, stop: threading.Event) -> None:
        asked.append(last)
        conn.sendall(answer)

    with (
        raw_server(f"{tmp_short}/n.sock", stream_server(streams)) as path,
        pytest.raises(error, match=text),
    ):
        first_events(path, 1, use_async)
    assert asked == [None]


def test_a_server_that_ends_every_stream_at_once_is_asked_again_with_back_off(tmp_short: object) -> None:
    """Each stream brings only the opening ``retry:`` (httpx2 hands it over as an event without
    data): that is no event, so the client backs off instead of reconnecting in a tight loop."""
    opened: list[float] = []
    outcome: list[BaseException] = []

    def streams(index: int, last: str | None, conn: socket.socket, stop: threading.Event) -> None:
        opened.append(time.monotonic())
        conn.sendall(HEAD)

    def follow(path: str) -> None:
        with Client(path) as client:
            try:
                next(client.events(reconnect_for=0.5))
            except BaseException as exc:
                outcome.append(exc)

    with raw_server(f"{tmp_short}/b.sock", stream_server(streams)) as path:
        thread = threading.Thread(target=follow, args=(path,), daemon=True)
        thread.start()
        deadline = time.monotonic() + TIMEOUT
        while len(opened) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
    # The server is gone: connecting fails until reconnect_for runs out, then that error is raised.
    thread.join(TIMEOUT)
    assert not thread.is_alive(), "the follower never gave up on a server that is gone"
    assert len(outcome) == 1
    assert isinstance(outcome[0], ConnectError), outcome
    assert len(opened) >= 4, opened
    gaps = [b - a for a, b in itertools.pairwise(opened)]
    assert sum(gaps[:3]) >= 0.69, gaps  # waits of 0.1, 0.2 and 0.4 s, not a tight loop
