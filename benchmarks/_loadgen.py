"""A lean keep-alive HTTP/1.1 load generator over a Unix socket or TCP.

Each connection keeps one request in flight (no pipelining): it writes a real ``POST /messages``
with a JSON body, parses the status line, the headers up to ``Content-Length`` and the whole body,
then sends the next one. It runs on ``asyncio.Protocol`` with uvloop when available, which costs a
fraction of what a general-purpose client does per request, so the server stays the bottleneck.
``workers > 1`` spreads the connections over that many processes.

Only the stdlib is imported at the top; uvloop is imported when a run starts.
"""

from __future__ import annotations

import asyncio
import math
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

__all__ = ["LoadResult", "LoadSpec", "Target", "build_request", "run_load"]

DEFAULT_BODY = b'{"text":"Hello from client"}'
_MAX_HEAD = 64 * 1024
_RECONNECT_DELAY = 0.05

Progress = Callable[[float, int], None]
"""Called about twice a second with (seconds measured so far, requests completed so far)."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where to send load: a Unix socket path, or a TCP host and port."""

    socket: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None

    def __post_init__(self) -> None:
        if (self.socket is None) == (self.port is None):
            raise ValueError("a target is either a socket path or a TCP port")

    @property
    def transport(self) -> str:
        return "uds" if self.socket is not None else "tcp"

    @property
    def label(self) -> str:
        return f"unix://{self.socket}" if self.socket is not None else f"http://{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One measurement: how many connections, for how long (or how many requests), what to send."""

    concurrency: int = 10
    duration: float | None = 5.0
    """Seconds measured after the warm-up; ignored when ``requests`` is set."""
    requests: int | None = None
    warmup: float = 1.0
    workers: int = 1
    method: str = "POST"
    path: str = "/messages"
    body: bytes = DEFAULT_BODY
    timeout: float = 10.0
    """A request unanswered for this long is an error and its connection is replaced."""

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.requests is None and (self.duration is None or self.duration <= 0):
            raise ValueError("give a duration greater than 0 or a number of requests")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be at least 1")
        if self.warmup < 0:
            raise ValueError("warmup must not be negative")


@dataclass(slots=True)
class LoadResult:
    """What one measurement saw. Latencies are in nanoseconds, one per completed request."""

    transport: str
    concurrency: int
    requests: int = 0
    """Responses received (any status) inside the measured window."""
    errors: int = 0
    """Responses outside 2xx plus failed connections, protocol errors and timeouts."""
    elapsed: float = 0.0
    latencies_ns: array[int] = field(default_factory=lambda: array("q"))
    statuses: dict[int, int] = field(default_factory=dict)
    error_kinds: dict[str, int] = field(default_factory=dict)
    cpu_seconds: float = 0.0
    """CPU time the generator itself used in the window (all workers)."""
    workers: int = 1

    @property
    def rps(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def generator_cpu(self) -> float:
        """Share of the generator's cores it kept busy (1.0: the generator may be the bottleneck)."""
        if self.elapsed <= 0:
            return 0.0
        return self.cpu_seconds / (self.elapsed * self.workers)

    def percentile_ms(self, q: float) -> float:
        """Latency at percentile ``q`` (0..100), nearest rank, in milliseconds; NaN with no samples."""
        if not self.latencies_ns:
            return math.nan
        ordered = sorted(self.latencies_ns)
        rank = max(1, math.ceil(q / 100 * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1] / 1e6

    def merge(self, other: LoadResult) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.elapsed = max(self.elapsed, other.elapsed)
        self.latencies_ns.extend(other.latencies_ns)
        self.cpu_seconds += other.cpu_seconds
        for status, count in other.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + count
        for kind, count in other.error_kinds.items():
            self.error_kinds[kind] = self.error_kinds.get(kind, 0) + count


def build_request(method: str, path: str, body: bytes, host: str = "localhost") -> bytes:
    """The exact bytes sent for every request (HTTP/1.1, keep-alive, JSON body)."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: uds-client-bench\r\n"
        "Accept: application/json\r\n"
    )
    if body or method in ("POST", "PUT", "PATCH"):
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode("ascii") + b"\r\n" + body


class _Run:
    """State shared by the connections of one worker: phase, tickets, counters."""

    def __init__(self, spec: LoadSpec, request: bytes, concurrency: int, requests: int | None) -> None:
        self.spec = spec
        self.request = request
        self.concurrency = concurrency
        self.tickets = requests
        self.measuring = False
        self.stopping = False
        self.started_ns = 0
        self.last_ns = 0
        self.result = LoadResult(transport="", concurrency=concurrency)
        self.in_flight = 0
        self.all_done: asyncio.Event = asyncio.Event()

    def take_ticket(self) -> bool:
        if self.stopping:
            return False
        if self.measuring and self.tickets is not None:
            if self.tickets <= 0:
                return False
            self.tickets -= 1
        return True

    def record(self, status: int, started_ns: int, now_ns: int) -> None:
        if not self.measuring or started_ns < self.started_ns:
            return
        result = self.result
        result.requests += 1
        result.latencies_ns.append(now_ns - started_ns)
        result.statuses[status] = result.statuses.get(status, 0) + 1
        if not 200 <= status < 300:
            result.errors += 1
        self.last_ns = now_ns

    def fail(self, kind: str) -> None:
        if not self.measuring:
            return
        result = self.result
        result.errors += 1
        result.error_kinds[kind] = result.error_kinds.get(kind, 0) + 1


class _Conn(asyncio.Protocol):
    """One keep-alive connection: send, read one whole response, send again."""

    def __init__(self, run: _Run, reconnect: Callable[[], None]) -> None:
        self.run = run
        self.reconnect = reconnect
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.need = -1
        self.status = 0
        self.close_after = False
        self.started_ns = 0
        self.busy = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        if not self.run.take_ticket():
            self._retire()
            return
        self.busy = True
        self.run.in_flight += 1
        self.started_ns = time.perf_counter_ns()
        self.transport.write(self.run.request)

    def _retire(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # e.g. a 408 for an idle connection: nothing of ours to answer
            self._broken("unsolicited")
            return
        buf = self.buf
        buf += data
        if self.need < 0:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._broken("protocol")
                return
            if not self._parse_head(bytes(buf[:end]), end + 4):
                return
        if len(buf) < self.need:
            return
        if len(buf) > self.need:
            self._broken("protocol")  # bytes nobody asked for: pipelining is off
            return
        now = time.perf_counter_ns()
        self.busy = False
        self.run.in_flight -= 1
        self.run.record(self.status, self.started_ns, now)
        buf.clear()
        self.need = -1
        if self.close_after:
            self._retire()
            self.reconnect()
        elif self.run.stopping:
            self._retire()
        else:
            self._send()
        self._check_done()

    def _parse_head(self, head: bytes, body_at: int) -> bool:
        if not head.startswith(b"HTTP/1.") or len(head) < 12 or head[12:13] not in (b" ", b"\r", b""):
            self._broken("protocol")
            return False
        try:
            self.status = int(head[9:12])
        except ValueError:
            self._broken("protocol")
            return False
        lower = head.lower()
        at = lower.find(b"\r\ncontent-length:")
        if at < 0:
            self._broken("no-content-length")
            return False
        line_end = lower.find(b"\r\n", at + 2)
        raw = lower[at + 17 : line_end if line_end >= 0 else len(lower)]
        try:
            length = int(raw.strip())
        except ValueError:
            self._broken("protocol")
            return False
        self.close_after = b"\r\nconnection: close" in lower
        self.need = body_at + length
        return True

    def _broken(self, kind: str) -> None:
        if self.busy:
            self.busy = False
            self.run.in_flight -= 1
        self.run.fail(kind)
        self.buf.clear()
        self.need = -1
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()
            self.reconnect()
        self._check_done()

    def timed_out(self) -> None:
        self._broken("timeout")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.busy:
            self.busy = False
            self.run.in_flight -= 1
            self.run.fail("disconnected")
        self.reconnect()
        self._check_done()

    def _check_done(self) -> None:
        if self.run.in_flight == 0 and (self.run.stopping or self.run.tickets == 0):
            self.run.all_done.set()


async def _drive(
    target: Target, spec: LoadSpec, concurrency: int, requests: int | None, progress: Progress | None
) -> LoadResult:
    loop = asyncio.get_running_loop()
    run = _Run(spec, build_request(spec.method, spec.path, spec.body), concurrency, requests)
    conns: list[_Conn] = []

    def reopen() -> None:
        if not run.stopping:
            openers.append(loop.create_task(open_one()))

    async def open_one() -> None:
        port = target.port or 0
        while not run.stopping and not (run.measuring and run.tickets == 0):
            conn = _Conn(run, reopen)
            try:
                if target.socket is not None:
                    await loop.create_unix_connection(lambda c=conn: c, target.socket)  # type: ignore[misc]
                else:
                    await loop.create_connection(lambda c=conn: c, target.host, port)  # type: ignore[misc]
            except OSError as exc:
                run.fail(_connect_kind(exc))
                if run.measuring and run.tickets:
                    run.tickets -= 1  # a failed attempt uses up its request, so the run still ends
                    if run.tickets == 0 and run.in_flight == 0:
                        run.all_done.set()
                await asyncio.sleep(_RECONNECT_DELAY)
                continue
            conns.append(conn)
            return

    async def watchdog() -> None:
        limit = int(spec.timeout * 1e9)
        while True:
            await asyncio.sleep(0.1)
            now = time.perf_counter_ns()
            for conn in list(conns):
                if conn.closed:
                    conns.remove(conn)
                elif conn.busy and now - conn.started_ns > limit:
                    conn.timed_out()

    dog = loop.create_task(watchdog())
    openers: list[asyncio.Task[None]] = []
    openers.extend(loop.create_task(open_one()) for _ in range(concurrency))
    try:
        if spec.warmup > 0:
            await asyncio.sleep(spec.warmup)
        cpu0 = time.process_time()
        run.started_ns = time.perf_counter_ns()
        run.measuring = True
        if requests is None:
            assert spec.duration is not None
            end = run.started_ns + int(spec.duration * 1e9)
            while (now := time.perf_counter_ns()) < end:
                await asyncio.sleep(min(0.5, (end - now) / 1e9))
                if progress is not None:
                    measured = (min(time.perf_counter_ns(), end) - run.started_ns) / 1e9
                    progress(measured, run.result.requests)
            run.measuring = False
            run.stopping = True
            run.result.elapsed = (end - run.started_ns) / 1e9
        else:
            while not run.all_done.is_set():
                try:
                    await asyncio.wait_for(run.all_done.wait(), 0.5)
                except TimeoutError:
                    if progress is not None:
                        progress((time.perf_counter_ns() - run.started_ns) / 1e9, run.result.requests)
                if run.tickets == 0 and run.in_flight == 0:
                    break
            run.stopping = True
            run.measuring = False
            run.result.elapsed = (max(run.last_ns, run.started_ns) - run.started_ns) / 1e9
        run.result.cpu_seconds = time.process_time() - cpu0
    finally:
        run.stopping = True
        dog.cancel()
        for task in openers:
            task.cancel()
        for conn in conns:
            if conn.transport is not None:
                conn.closed = True
                conn.transport.close()
        await asyncio.gather(dog, *openers, return_exceptions=True)
    return run.result


def _connect_kind(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "no-such-socket"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, PermissionError):
        return "permission-denied"
    return "connect-failed"


def _run_worker(
    target: Target, spec: LoadSpec, concurrency: int, requests: int | None, progress: Progress | None = None
) -> LoadResult:
    coro = _drive(target, spec, concurrency, requests, progress)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio still works
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run_load(target: Target, spec: LoadSpec, progress: Progress | None = None) -> LoadResult:
    """Drive ``target`` as ``spec`` says and return what was measured (blocking)."""
    workers = min(spec.workers, spec.concurrency)
    if workers == 1:
        result = _run_worker(target, spec, spec.concurrency, spec.requests, progress)
    else:
        import concurrent.futures
        import multiprocessing

        conc = _split(spec.concurrency, workers)
        reqs: list[int | None] = (
            [None] * workers if spec.requests is None else list(_split(spec.requests, workers))
        )
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = [pool.submit(_run_worker, target, spec, c, r) for c, r in zip(conc, reqs, strict=True)]
            parts = [f.result() for f in futures]
        result = LoadResult(transport="", concurrency=0)
        for part in parts:
            part.concurrency = 0
            result.merge(part)
    result.transport = target.transport
    result.concurrency = spec.concurrency
    result.workers = workers
    return result
