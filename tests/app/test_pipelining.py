"""Pipelining bounded by backpressure, driven in process: the protocol on a fake transport.

The input arrives cut at random places (inside heads, inside ``CRLF CRLF``, inside bodies). Every
request is answered in order, no more than ``MAX_PIPELINE`` ever wait, reading pauses while input
is held, and the held-input budget is given back. (tests/app/test_protocol_attacks.py runs the same
against a real server, with RSS and CPU measured.)
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from app.connection import requests as hooks
from app.connection.capacity import Budget
from app.connection.pipelining import HELD_BUDGET, MAX_PIPELINE
from app.connection.protocol import PeerCredProtocol
from tests.app.protocol_harness import new_protocol


class FakeTransport(asyncio.Transport):
    """What the protocol writes, and whether it reads."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.reading = True
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def write_eof(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    unsent = 0
    """What :meth:`get_write_buffer_size` reports: bytes the peer has not taken yet."""
    limits: tuple[int | None, int | None] = (None, None)

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.limits = (high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """Answers ``<path> <body length>`` after reading the whole body and yielding to the loop."""
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await asyncio.sleep(0)
    if scope["path"] == "/slow":
        await SLOW["event"].wait()
    body = f"{scope['path']} {size}".encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


SLOW: dict[str, asyncio.Event] = {}
"""``/slow`` answers once ``SLOW["event"]`` is set (one event per test's loop)."""


def requests(count: int, rng: random.Random) -> tuple[bytes, list[bytes]]:
    """``count`` pipelined requests of every framing, and the answers' bodies they expect."""
    data = bytearray()
    expected = []
    for n in range(count):
        kind = rng.randrange(3)
        if kind == 0:
            data += b"GET /get/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % n
            expected.append(b"/get/%d 0" % n)
        elif kind == 1:  # a body that looks like head ends
            body = b"\r\n\r\n" * rng.randrange(1, 5) + b"x" * rng.randrange(100)
            data += b"POST /len/%d HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (
                n,
                len(body),
                body,
            )
            expected.append(b"/len/%d %d" % (n, len(body)))
        else:
            body = b"\r\n\r\n" + b"y" * rng.randrange(50)
            data += (
                b"POST /chunked/%d HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"%x\r\n%s\r\n0\r\n\r\n" % (n, len(body), body)
            )
            expected.append(b"/chunked/%d %d" % (n, len(body)))
    return bytes(data), expected


def answers(written: bytes) -> list[tuple[int, bytes]]:
    found = []
    for match in re.finditer(rb"HTTP/1\.1 (\d+) [^\r]*\r\n(.*?)\r\n\r\n", written, re.S):
        length = int(re.search(rb"content-length: (\d+)", match.group(2), re.I).group(1))  # type: ignore[union-attr]
        found.append((int(match.group(1)), written[match.end() : match.end() + length]))
    return found


async def serve(
    data: bytes, cuts: list[int], count: int, request_timeout: float = 30.0, held: Budget | None = None
) -> tuple[FakeTransport, int, PeerCredProtocol]:
    """Deliver ``data`` in pieces ending at ``cuts``, only while the protocol reads, until
    ``count`` answers are written; return the transport and the most requests that waited."""
    config = Config(app=echo, log_level="warning", access_log=False)
    config.load()
    loop = asyncio.get_running_loop()
    protocol = new_protocol(config, ServerState(), {}, loop, request_timeout=request_timeout, held=held)
    transport = FakeTransport()
    protocol.connection_made(transport)
    most = 0
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True) if b > a]
    deadline = loop.time() + 20  # only there to fail, not to wait
    while loop.time() < deadline:
        if pieces and transport.reading:
            protocol.data_received(pieces.pop(0))
        most = max(most, len(protocol.pipeline))
        if not pieces and len(answers(bytes(transport.written))) >= count:
            break
        await asyncio.sleep(0)
    return transport, most, protocol


@pytest.mark.parametrize("seed", range(12))
def test_every_request_is_answered_in_order_and_at_most_max_pipeline_wait(seed: int) -> None:
    rng = random.Random(seed)
    data, expected = requests(300, rng)
    if seed == 0:
        cuts = []  # one read holding all of them
    elif seed == 1:
        cuts = list(range(1, len(data)))  # a byte at a time
    else:
        cuts = sorted(rng.sample(range(1, len(data)), rng.randrange(1, 200)))
    transport, most, protocol = asyncio.run(serve(data, cuts, len(expected)))
    got = answers(bytes(transport.written))
    assert [status for status, _ in got] == [200] * len(expected)
    assert [body for _, body in got] == expected
    assert most <= MAX_PIPELINE
    assert transport.reading
    assert not transport.closing
    assert not protocol.flow.held
    assert protocol.held.free == HELD_BUDGET


def test_input_past_the_held_budget_gets_503_after_the_answers_owed(monkeypatch: pytest.MonkeyPatch) -> None:
    held = Budget(1000, 1000)
    data = b"GET /get HTTP/1.1\r\nHost: localhost\r\n\r\n" * 100  # 3,900 bytes: more than the budget
    transport, most, _ = asyncio.run(serve(data, [], MAX_PIPELINE + 2, held=held))
    assert most <= MAX_PIPELINE
    got = answers(bytes(transport.written))
    assert [status for status, _ in got] == [200] * (MAX_PIPELINE + 1) + [503]
    assert b"too much pipelined input" in got[-1][1]
    assert transport.closing or b"connection: close" in bytes(transport.written).lower()
    assert held.free == 1000


def test_held_requests_are_not_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """Input held behind a full pipeline is the server's delay, not the client's: a slow first
    answer that outlasts ``--request-timeout`` brings no 408 to the requests held behind it."""
    data = (
        b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n"
        + b"GET /get HTTP/1.1\r\nHost: localhost\r\n\r\n" * 30
    )

    async def scenario() -> tuple[FakeTransport, int, PeerCredProtocol]:
        SLOW["event"] = slow = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, slow.set)  # the first answer takes six request timeouts
        return await serve(data, [], 31, request_timeout=0.05)

    transport, most, protocol = asyncio.run(scenario())
    got = answers(bytes(transport.written))
    assert [status for status, _ in got] == [200] * 31, got[-1]
    assert most <= MAX_PIPELINE
    assert not protocol.flow.held


def test_a_request_left_unfinished_behind_held_input_is_late_from_its_release() -> None:
    """Once the held input is parsed, the rest of an unfinished request is due within
    ``--request-timeout`` again: 408, after every answer owed."""
    get = b"GET /get HTTP/1.1\r\nHost: localhost\r\n\r\n"
    data = b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n" + get * 30 + b"GET /get HTTP/1.1\r\nHost: loc"

    async def scenario() -> tuple[FakeTransport, int, PeerCredProtocol]:
        SLOW["event"] = slow = asyncio.Event()
        asyncio.get_running_loop().call_later(0.3, slow.set)
        return await serve(data, [], 32, request_timeout=0.05)

    transport, _, _ = asyncio.run(scenario())
    got = answers(bytes(transport.written))
    assert [status for status, _ in got] == [200] * 31 + [408]


def test_the_next_request_waits_while_answers_sit_in_the_buffer() -> None:
    """A peer that reads nothing pins one answer: the next pipelined request starts only once the
    transport says its buffer emptied (``resume_writing``)."""
    data = b"GET /get HTTP/1.1\r\nHost: localhost\r\n\r\n" * 20

    async def scenario() -> None:
        config = Config(app=echo, log_level="warning", access_log=False)
        config.load()
        protocol = new_protocol(config, ServerState(), {}, asyncio.get_running_loop())
        transport = FakeTransport()
        transport.unsent = 1  # the peer has not read
        protocol.connection_made(transport)
        protocol.data_received(data)
        for _ in range(50):
            await asyncio.sleep(0)
        assert len(answers(bytes(transport.written))) == 1
        assert transport.limits == (0, None)  # resume_writing once the buffer is empty
        assert len(protocol.pipeline) == MAX_PIPELINE
        transport.unsent = 0  # the peer read everything
        protocol.resume_writing()
        assert transport.limits == (None, None)
        for _ in range(10_000):  # every answer needs a few turns of the loop
            if len(answers(bytes(transport.written))) >= 20:
                break
            await asyncio.sleep(0)
        assert [status for status, _ in answers(bytes(transport.written))] == [200] * 20
        assert not protocol.flow.held
        protocol.connection_lost(None)

    asyncio.run(scenario())


def test_bodies_of_pipelined_requests_draw_on_the_held_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn keeps a waiting request's body in memory until it runs: bodies of requests pipelined
    behind a slow one count as held input, and past the budget the next gets 503. Before: 8 bodies
    of 5,000 bytes waited, uncounted, with a budget of 18,000 (512 connections pipelining POSTs of
    64 KiB took a real server to 389 MiB)."""
    held = Budget(18_000, 18_000)
    body = b"x" * 5000
    data = b"GET /slow HTTP/1.1\r\nHost: localhost\r\n\r\n" + b"".join(
        b"POST /len/%d HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n%s" % (n, len(body), body)
        for n in range(8)
    )
    drawn: list[int] = []

    async def scenario() -> tuple[FakeTransport, int, PeerCredProtocol]:
        SLOW["event"] = slow = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lambda: (drawn.append(18_000 - held.free), slow.set()))
        return await serve(data, [], 5, held=held)

    transport, _, _ = asyncio.run(scenario())
    got = answers(bytes(transport.written))
    assert drawn == [15_000]  # three bodies waited, counted; the fourth did not fit
    assert [status for status, _ in got] == [200, 200, 200, 200, 503], got
    assert [body for _, body in got[:4]] == [b"/slow 0", b"/len/0 5000", b"/len/1 5000", b"/len/2 5000"]
    assert held.free == 18_000


async def gated(scope: Any, receive: Any, send: Any) -> None:
    """``/413`` answers 413 without reading the body; any other path reads a chunk of the body
    each time ``GATE["event"]`` is set, then answers ``<body length>``."""
    if scope["path"] == "/413":
        await send({"type": "http.response.start", "status": 413, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})
        return
    size = 0
    while True:
        gate = GATE["event"]
        await gate.wait()
        gate.clear()
        message = await receive()
        if message["type"] != "http.request":
            return
        size += len(message["body"])
        if not message.get("more_body"):
            break
    body = b"%d" % size
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]}
    )
    await send({"type": "http.response.body", "body": body})


GATE: dict[str, asyncio.Event] = {}


async def gated_protocol(held: Budget) -> tuple[PeerCredProtocol, FakeTransport]:
    GATE["event"] = asyncio.Event()
    config = Config(app=gated, log_level="warning", access_log=False)
    config.load()
    protocol = new_protocol(config, ServerState(), {}, asyncio.get_running_loop(), held=held)
    transport = FakeTransport()
    protocol.connection_made(transport)
    return protocol, transport


async def turns(count: int = 50) -> None:
    for _ in range(count):
        await asyncio.sleep(0)


def post(path: bytes, length: int) -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: localhost\r\nContent-Length: %d\r\n\r\n" % (path, length)


def test_a_body_draws_on_the_held_budget_until_the_application_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """uvicorn keeps body bytes in the cycle until the application reads them: they draw on the
    held-input budget from their arrival, and are given back once read (and the rest when the
    answer is complete). Before, nothing was drawn: 512 connections each sending a whole POST of
    64 KiB at once took a server to 126 MiB (tests/app/test_memory_budget.py)."""
    held = Budget(10_000, 10_000)
    monkeypatch.setattr(hooks, "BODY_UNCOUNTED", 500)

    async def scenario() -> None:
        protocol, transport = await gated_protocol(held)
        protocol.data_received(post(b"/small", 500) + b"s" * 500)
        await turns()
        assert held.free == 10_000  # small enough not to count
        GATE["event"].set()
        await turns()
        assert answers(bytes(transport.written)) == [(200, b"500")]
        transport.written.clear()
        protocol.data_received(post(b"/read", 3000) + b"a" * 1000)
        await turns()
        assert held.free == 9000  # received, not read
        GATE["event"].set()
        await turns()  # the application read the first 1,000 bytes
        protocol.data_received(b"b" * 1500)
        assert held.free == 8500  # only the unread 1,500 count now
        GATE["event"].set()
        await turns()
        protocol.data_received(b"c" * 500)
        assert held.free == 9500
        GATE["event"].set()
        await turns()
        assert answers(bytes(transport.written)) == [(200, b"3000")]
        assert held.free == 10_000  # the answer is complete
        protocol.connection_lost(None)
        assert held.free == 10_000

    asyncio.run(scenario())


def test_a_body_is_given_back_when_the_connection_drops_and_on_an_early_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    held = Budget(10_000, 10_000)
    monkeypatch.setattr(hooks, "BODY_UNCOUNTED", 500)

    async def scenario() -> None:
        protocol, _ = await gated_protocol(held)
        protocol.data_received(post(b"/read", 3000) + b"a" * 2000)
        await turns()
        assert held.free == 8000
        protocol.connection_lost(None)  # the peer hung up before the application read it
        assert held.free == 10_000

        protocol, transport = await gated_protocol(held)
        protocol.data_received(post(b"/413", 3000) + b"a" * 2000)
        await turns()
        assert [status for status, _ in answers(bytes(transport.written))] == [413]
        assert held.free == 10_000  # answered without reading: given back
        protocol.data_received(b"a" * 1000)  # the rest lingers in, unparsed and not drawn
        assert held.free == 10_000
        protocol.connection_lost(None)
        assert held.free == 10_000

    asyncio.run(scenario())


def test_a_body_past_the_held_budget_gets_503_with_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    held = Budget(10_000, 4000)  # a peer's share: 4,000 bytes
    monkeypatch.setattr(hooks, "BODY_UNCOUNTED", 500)

    async def scenario() -> None:
        first, _ = await gated_protocol(held)
        first.data_received(post(b"/read", 3000) + b"a" * 3000)
        second, transport = await gated_protocol(held)
        second.data_received(post(b"/read", 3000) + b"a" * 3000)
        await turns()
        assert held.free == 7000  # the second did not fit in the peer's share
        written = bytes(transport.written)
        assert [status for status, _ in answers(written)] == [503]
        assert b"\r\nretry-after: 1\r\n" in written
        assert b"too many request bodies" in written
        second.connection_lost(None)
        first.connection_lost(None)
        assert held.free == 10_000
        assert not held.held

    asyncio.run(scenario())


def test_a_cycle_whose_peer_hung_up_before_its_answer_drops_its_counting_send() -> None:
    """The counting ``send`` refers back to its cycle; a hang-up before the answer breaks that loop,
    so the cycle (scope, unread body) is freed at once rather than by the garbage collector."""
    from app.metrics.core import Recorder

    async def scenario() -> None:
        GATE["event"] = asyncio.Event()
        config = Config(app=gated, log_level="warning", access_log=False)
        config.load()
        loop = asyncio.get_running_loop()
        protocol = new_protocol(config, ServerState(), {}, loop, recorder=Recorder())
        transport = FakeTransport()
        protocol.connection_made(transport)
        protocol.data_received(post(b"/read", 10))
        await turns()
        cycle = protocol.cycle
        assert "send" in vars(cycle), "the request is counted through its own send"
        protocol.connection_lost(None)
        assert "send" not in vars(cycle)
        GATE["event"].set()  # the application ends: nothing is sent to the peer gone, nothing counted
        await turns()
        assert transport.written == b""

    asyncio.run(scenario())
