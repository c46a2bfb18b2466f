"""(l) Event streams: delivery latency to 100 subscribers, and what 100 open streams cost POSTs.

One ``uds-server`` with its defaults (the SQLite store in a temporary directory).

- Latency: 100 subscribers hold ``GET /v1/events`` open in one process (asyncio protocols that
  only look for ``id:`` lines); one message at a time is posted, and each subscriber's arrival time
  of its ``id`` is taken from the time the poster wrote the POST (both in this process, one clock;
  not from reading the ``201``: a busy loop may read the events first). p50 and p99 over every
  (message, subscriber) pair; they include the POST's own round trip.
- Throughput: autocannon ``POST /v1/messages`` (20 connections) with 100 streams open, each read
  as fast as it comes by a reader process, against the same run with no stream; the order swaps
  every round. Every POST then becomes 100 events written: the figure is what fanning out costs
  the server. As in (a), the server is pinned to the first CPU, autocannon and the reader process
  to the others, so the readers' work is not counted against the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import PYTHON, BenchError, Row, Server, autocannon, compare, main_for, paired
from _spawn import pinned, split_cpus

SUBSCRIBERS = 100
CONNECTIONS = 20
_ID = re.compile(rb"\nid: (\d+)\n")
_REQUEST = b"GET /v1/events HTTP/1.1\r\nhost: localhost\r\naccept: text/event-stream\r\n\r\n"


class _Subscriber(asyncio.Protocol):
    """One stream: records when each id arrives (``arrivals``) and how many bytes came."""

    def __init__(self, opened: asyncio.Future[None], record: bool, stall: bool = False) -> None:
        self.opened = opened
        self.record = record
        self.stall = stall
        self.arrivals: dict[int, float] = {}
        self.received = 0
        self.tail = b""
        self.waiting: tuple[int, asyncio.Future[None]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport
        transport.write(_REQUEST)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.received += len(data)
        if not self.opened.done():
            self.tail += data
            if not self.tail.startswith(b"HTTP/1.1 200"):
                self.opened.set_exception(BenchError(f"GET /v1/events answered {self.tail[:60]!r}"))
                return
            if b"retry:" in self.tail:
                self.opened.set_result(None)
                self.tail = b""
                if self.stall:
                    self.transport.pause_reading()  # never reads again: the server cuts it off
            return
        if not self.record:
            return
        text = self.tail + data
        for match in _ID.finditer(text):
            self.arrivals.setdefault(int(match.group(1)), now)
        self.tail = text[-32:]
        if self.waiting is not None and self.waiting[0] in self.arrivals and not self.waiting[1].done():
            self.waiting[1].set_result(None)

    async def wait_for(self, message_id: int) -> None:
        if message_id in self.arrivals:
            return
        future = asyncio.get_running_loop().create_future()
        self.waiting = (message_id, future)
        await asyncio.wait_for(future, 10)


async def _subscribe(path: str, count: int, record: bool, stall: bool = False) -> list[_Subscriber]:
    """Open ``count`` streams; a 503 (slots of streams just closed not yet given back) is retried."""
    loop = asyncio.get_running_loop()
    made: list[_Subscriber] = []
    deadline = loop.time() + 10
    while len(made) < count:
        opened: asyncio.Future[None] = loop.create_future()
        _, protocol = await loop.create_unix_connection(
            lambda opened=opened: _Subscriber(opened, record, stall),  # type: ignore[misc]
            path,
        )
        try:
            await opened
        except BenchError:
            protocol.transport.close()
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.1)
            continue
        made.append(protocol)
    return made


async def _post(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, text: str) -> tuple[int, float]:
    body = json.dumps({"text": text}).encode()
    sent = time.monotonic()
    writer.write(
        b"POST /v1/messages HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body)
    )
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))  # type: ignore[union-attr]
    answer = await reader.readexactly(length)
    if not head.startswith(b"HTTP/1.1 201"):
        raise BenchError(f"POST /v1/messages answered {head[:40]!r}")
    return int(json.loads(answer)["id"]), sent


def latency(path: str, messages: int) -> dict[str, float]:
    """Post ``messages`` one at a time; seconds from each POST to its arrival at every subscriber."""

    async def main() -> list[float]:
        subscribers = await _subscribe(path, SUBSCRIBERS, record=True)
        reader, writer = await asyncio.open_unix_connection(path)
        delays: list[float] = []
        try:
            for index in range(messages):
                message_id, sent = await _post(reader, writer, f"event {index}")
                for subscriber in subscribers:
                    await subscriber.wait_for(message_id)
                delays.extend(s.arrivals[message_id] - sent for s in subscribers)
                await asyncio.sleep(0.01)  # one message at a time: latency, not a burst
        finally:
            writer.close()
            for subscriber in subscribers:
                subscriber.transport.close()
        return delays

    delays = sorted(asyncio.run(main()))
    return {
        "p50": delays[len(delays) // 2],
        "p99": delays[min(len(delays) - 1, int(len(delays) * 0.99))],
        "samples": float(len(delays)),
    }


@contextlib.contextmanager
def open_streams(path: str, cpus: set[int] | None, stall: bool) -> Iterator[subprocess.Popen[str]]:
    """A process holding :data:`SUBSCRIBERS` streams open, reading all that comes (or, with
    ``stall``, nothing after the stream's first bytes)."""
    proc = subprocess.Popen(
        [PYTHON, __file__, "--stall" if stall else "--hold", path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=pinned(cpus),
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise BenchError(f"the stream holder did not start: {line!r}")
        yield proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()  # tells it to stop
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()


def _hold(path: str, stall: bool) -> None:
    """The stream holder's main: open the streams, say ``ready``, read until stdin closes."""

    async def main() -> None:
        await _subscribe(path, SUBSCRIBERS, record=False, stall=stall)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.read)

    asyncio.run(main())


def _on_cpu_ns(pid: int) -> int:
    """Nanoseconds ``pid`` has run on a CPU, from /proc/PID/schedstat."""
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


def throughput(server: Server, streams: str, duration: float, cpus: set[int] | None) -> dict[str, Any]:
    """One autocannon run (after its warm-up) with ``streams`` ``reading``, ``stalled`` or ``none``;
    the server's CPU per POST."""
    assert server.socket is not None
    opened = open_streams(server.socket, cpus, streams == "stalled")
    with opened if streams != "none" else contextlib.nullcontext():
        autocannon(server, CONNECTIONS, 0.5, warmup=0, cpus=cpus, path="/v1/messages")
        before = _on_cpu_ns(server.proc.pid)
        result = autocannon(server, CONNECTIONS, duration, warmup=0, cpus=cpus, path="/v1/messages")
        spent = _on_cpu_ns(server.proc.pid) - before
    result["cpu_us_per_request"] = spent / 1000 / max(1.0, result["requests"])
    return result


def run(quick: bool) -> list[Row]:
    rounds, duration, messages = (1, 0.5, 30) if quick else (5, 3.0, 300)
    split = split_cpus()
    server_cpus, load_cpus = split if split else (None, None)
    # One uid holds every subscriber: it may hold a quarter of --max-streams.
    server = Server("ours", cpus=server_cpus, extra=("--max-streams", str(4 * SUBSCRIBERS)))
    try:
        server.ready()
        assert server.socket is not None
        path = server.socket
        delays = latency(path, messages)
        runs = paired(
            rounds,
            lambda: throughput(server, "reading", duration, load_cpus),
            lambda: throughput(server, "none", duration, load_cpus),
        )
        stalled = paired(
            rounds,
            lambda: throughput(server, "stalled", duration, load_cpus),
            lambda: throughput(server, "none", duration, load_cpus),
        )
    finally:
        server.close()
    what = f"event delivery, POST to arrival, {SUBSCRIBERS} subscribers, {messages} messages one at a time"
    target = 0.05
    delivery = [
        Row(
            "l",
            f"{what}: p99 against the target",
            "p99",
            delays["p99"],
            "target",
            target,
            unit="s",
            ratio=delays["p99"] / target,
            target="p99 <= 50 ms",
            met=delays["p99"] <= target,
            rounds=[delays],
        ),
        Row(
            "l",
            f"{what}: p50 and p99",
            "p50",
            delays["p50"],
            "p99",
            delays["p99"],
            unit="s",
            ratio=delays["p50"] / delays["p99"],
            target="reported",
            met=True,
            rounds=[delays],
        ),
    ]
    return [
        *delivery,
        compare(
            "l",
            f"POST /v1/messages req/s, {CONNECTIONS} conns: {SUBSCRIBERS} streams open (each gets "
            "every message) vs none",
            (f"{SUBSCRIBERS} streams", "no stream"),
            runs,
            "rps",
            "req/s",
            ">= 0.9x",
            lambda r: r >= 0.9,
        ),
        compare(
            "l",
            f"server CPU per POST (on-CPU time / requests): {SUBSCRIBERS} streams open vs none",
            (f"{SUBSCRIBERS} streams", "no stream"),
            runs,
            "cpu_us_per_request",
            "µs",
            "reported",
            lambda r: True,
        ),
        compare(
            "l",
            f"POST /v1/messages req/s, {CONNECTIONS} conns: {SUBSCRIBERS} streams whose readers never read "
            "(cut off after their buffer) vs none",
            (f"{SUBSCRIBERS} stalled", "no stream"),
            stalled,
            "rps",
            "req/s",
            ">= 0.9x",
            lambda r: r >= 0.9,
        ),
    ]


if __name__ == "__main__":
    if sys.argv[1:2] in (["--hold"], ["--stall"]):
        _hold(sys.argv[2], sys.argv[1] == "--stall")
    else:
        main_for(run)
