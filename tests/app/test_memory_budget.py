"""The memory budget: with default settings, no mix of requests takes the server above 100 MiB RSS.

A fresh ``uds-server`` process with default settings is attacked over raw sockets while a thread
samples its RSS (psutil) every few milliseconds; the peak must stay under :data:`BUDGET`. Each
attack is bounded, waits until the server has taken in what it was sent (never sleep-and-hope) and
prints the peak it reached (``pytest -s``), so a failure names the attack that broke the budget.

The attacks: a flood of keyed POSTs of the largest texts (the history and the Idempotency-Key
memory); clients that ask for the whole history and never read, while new messages push the old
ones out; and, on as many connections as the server accepts (``--max-connections``), partial
bodies, trickled small bodies, whole bodies sent all at once, unfinished heads, unfinished
trailers, idle connections, and pipelined GETs whose answers are never read (a few, and
thousands). The last test runs several at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import resource
import shutil
import socket
import struct
import termios
import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import psutil
import pytest

from app.config import Settings
from tests.support import ServerProcess, http_over_uds, read_response, short_tmpdir, wait_until

MiB = 1024 * 1024
BUDGET = 100 * MiB
DEFAULTS = Settings()
TEXT = "\U0001f600" * DEFAULTS.max_text_length
"""The largest text the defaults accept: 4,096 four-byte characters (16 KiB of UTF-8)."""
BODY = orjson.dumps({"text": TEXT})
KEYED_POSTS = 20_000
"""Twice the remembered keys: most keys the server remembers name messages that left the history."""
LISTERS = 40
"""More than the server writes at once (the rest get 503)."""
CONNECTIONS = DEFAULTS.max_connections
"""Attacks that cost memory per connection use as many as the server accepts."""
_SIOCOUTQ = termios.TIOCOUTQ  # bytes still in our send queue: the server has not read them yet
_keys = itertools.count()


def keyed_post(key: str, body: bytes = BODY) -> bytes:
    return (
        b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Idempotency-Key: %s\r\nContent-Length: %d\r\n\r\n%s" % (key.encode(), len(body), body)
    )


LIST_ALL = b"GET /messages?limit=%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % DEFAULTS.history_size


class PeakRss:
    """Samples a process's RSS in a thread; ``peak`` is the largest value seen."""

    def __init__(self, pid: int, interval: float = 0.005) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.process.memory_info().rss)

    def now(self) -> int:
        rss = self.process.memory_info().rss
        self.peak = max(self.peak, rss)
        return rss

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.now()


def connect(path: str, timeout: float = 30.0) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)  # blocking: a full listen backlog makes it wait, not fail with EAGAIN
    conn.settimeout(timeout)
    return conn


def served_after(path: str) -> None:
    """One request on a fresh connection answered: every earlier connection has been accepted.

    At the connection cap, with every connection busy, the answer is 503; that is an answer too.
    """
    with connect(path) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status, _, _ = read_response(conn)
        assert status in (200, 503), status


def unread_by_server(conn: socket.socket) -> int:
    """Bytes we sent that the server has not read yet."""
    return struct.unpack("i", fcntl.ioctl(conn.fileno(), _SIOCOUTQ, b"\0\0\0\0"))[0]


def waiting_for_us(conn: socket.socket) -> int:
    """Bytes the server sent that we have not read."""
    return struct.unpack("i", fcntl.ioctl(conn.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def keyed_flood(path: str, count: int, connections: int = 4, batch: int = 6) -> None:
    """``count`` POSTs of the largest text, each with a new Idempotency-Key, pipelined in batches.

    A batch's answers (6 x 16 KiB) fit in the kernel's socket buffer, so the server never waits for
    us to read while we wait for it to read.
    """
    errors: list[str] = []

    def worker(share: int) -> None:
        try:
            with connect(path) as conn:
                buffer = bytearray()
                while share > 0 and not errors:
                    n = min(batch, share)
                    conn.sendall(b"".join(keyed_post(f"flood-{next(_keys)}") for _ in range(n)))
                    for _ in range(n):
                        status, _, body = read_response(conn, buffer)
                        if status != 201:
                            errors.append(f"{status} {body[:200]!r}")
                    share -= n
        except (OSError, AssertionError) as exc:
            errors.append(repr(exc))

    shares = [count // connections + (i < count % connections) for i in range(connections)]
    threads = [threading.Thread(target=worker, args=(share,)) for share in shares]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors[:3]


@contextlib.contextmanager
def never_reading_listers(path: str, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections that ask for the whole history and never read the answer."""
    conns = [connect(path) for _ in range(count)]
    try:
        for conn in conns:
            conn.sendall(LIST_ALL)
        # The server has started answering each of them (a status line is waiting to be read).
        wait_until(
            lambda: all(waiting_for_us(c) > 0 for c in conns),
            timeout=30,
            what="the server to start answering every list request",
        )
        yield conns
    finally:
        for conn in conns:
            conn.close()


@contextlib.contextmanager
def holding(path: str, count: int, partial: bytes, what: str) -> Iterator[list[socket.socket]]:
    """``count`` connections that each send ``partial`` (an unfinished request) and wait.

    Yields them once the server has read every byte sent, or has answered (refused) and closed.
    """
    conns: list[socket.socket] = []
    try:
        for _ in range(count):
            conn = connect(path)
            conns.append(conn)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused at once
                conn.sendall(partial)
        served_after(path)
        wait_until(
            lambda: all(unread_by_server(c) == 0 or waiting_for_us(c) for c in conns),
            timeout=30,
            what=f"the server to read every {what} or refuse it",
        )
        yield conns
    finally:
        for conn in conns:
            conn.close()


@contextlib.contextmanager
def partial_bodies(path: str, count: int, body_bytes: int = DEFAULTS.max_body_bytes) -> Iterator[int]:
    """``count`` connections each announcing a ``body_bytes`` body and sending all but its last byte.

    Yields how many were refused (answered and closed) rather than left waiting for the last byte.
    """
    head = (
        b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % body_bytes
    )
    with holding(path, count, head + b'{"text":"' + b"x" * (body_bytes - 10), "partial body") as conns:
        yield sum(1 for c in conns if waiting_for_us(c))


@contextlib.contextmanager
def whole_bodies(path: str, count: int, body_bytes: int = DEFAULTS.max_body_bytes) -> Iterator[None]:
    """``count`` connections, all open first, then each sending one whole POST of a ``body_bytes``
    body, as fast as we can. Yields once every one is answered."""
    head = (
        b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % body_bytes
    )
    text = b'{"text":"' + b"\\ud83d\\ude00" * DEFAULTS.max_text_length + b'"'
    request = head + text + b" " * (body_bytes - len(text) - 1) + b"}"
    conns: list[socket.socket] = []
    try:
        for _ in range(count - 1):
            conns.append(connect(path))
        served_after(path)  # every one accepted (and the last one too, now)
        conns.append(connect(path))
        sent = []
        for conn in conns:  # a first part of every request before the rest of any
            conn.setblocking(False)
            try:
                sent.append(conn.send(request))
            except BlockingIOError:
                sent.append(0)
            except (BrokenPipeError, ConnectionResetError):
                sent.append(len(request))
        for conn, done in zip(conns, sent, strict=True):
            conn.setblocking(True)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.sendall(request[done:])
        wait_until(
            lambda: all(waiting_for_us(c) for c in conns), timeout=30, what="the server to answer every POST"
        )
        yield
    finally:
        for conn in conns:
            conn.close()


@contextlib.contextmanager
def partial_heads(path: str, count: int, head_bytes: int = 30 * 1024) -> Iterator[None]:
    """``count`` connections each sending ``head_bytes`` of a request head (under the head limit)
    without the blank line that ends it."""
    partial = b"POST /messages HTTP/1.1\r\nHost: localhost\r\nX-Pad: " + b"p" * head_bytes
    with holding(path, count, partial, "partial head"):
        yield


@contextlib.contextmanager
def idle_connections(path: str, count: int) -> Iterator[None]:
    conns: list[socket.socket] = []
    try:
        conns.extend(connect(path) for _ in range(count))
        served_after(path)
        yield
    finally:
        for conn in conns:
            conn.close()


@contextlib.contextmanager
def readers_that_never_read(path: str, count: int, requests: int = 24) -> Iterator[None]:
    """``count`` connections each pipelining ``requests`` GETs of a 16 KiB message, never reading."""
    first = DEFAULTS.history_size  # filled by the caller; any id still in the history will do
    request = b"GET /messages/%d HTTP/1.1\r\nHost: localhost\r\n\r\n" % first
    conns: list[socket.socket] = []
    try:
        for _ in range(count):
            conn = connect(path)
            conns.append(conn)
            conn.sendall(request * requests)
        served_after(path)
        # Every answer the server could write is waiting for us; it holds the rest.
        wait_until(
            lambda: all(unread_by_server(c) == 0 and waiting_for_us(c) for c in conns),
            timeout=30,
            what="the server to answer into every full connection",
        )
        yield
    finally:
        for conn in conns:
            conn.close()


@contextlib.contextmanager
def deep_pipeliners(path: str, count: int, requests: int = 12_000) -> Iterator[None]:
    """``count`` connections each pipelining ``requests`` tiny GETs (500 KiB) and never reading:
    each holds back the read that filled its pipeline, within the held-input budget."""
    data = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n" * requests
    conns: list[socket.socket] = []
    try:
        for _ in range(count):
            conn = connect(path)
            conns.append(conn)
            conn.setblocking(False)
            with contextlib.suppress(BlockingIOError, BrokenPipeError, ConnectionResetError):
                conn.sendall(data)
        served_after(path)
        wait_until(
            lambda: all(waiting_for_us(c) for c in conns),
            timeout=30,
            what="the server to answer into every pipelining connection",
        )
        yield
    finally:
        for conn in conns:
            conn.close()


@contextlib.contextmanager
def partial_trailers(path: str, count: int, trailer_bytes: int = 30 * 1024) -> Iterator[None]:
    """``count`` chunked POSTs whose body is whole but whose trailer section never ends."""
    body = b'{"text": "hi"}'
    partial = (
        b"POST /messages HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nX-Pad: %s"
        % (len(body), body, b"t" * trailer_bytes)
    )
    with holding(path, count, partial, "partial trailer section"):
        yield


def raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed and (hard == resource.RLIM_INFINITY or needed <= hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert soft >= needed, f"the test needs {needed} file descriptors; the hard limit is {hard}"


@pytest.fixture(scope="module")
def fd_limit() -> None:
    """Room for every connection on both ends (the server inherits the raised limit)."""
    raise_fd_limit(2 * CONNECTIONS + 2 * LISTERS + 400)


@pytest.fixture
def server(fd_limit: None) -> Iterator[ServerProcess]:
    """A fresh server with default settings for each attack: RSS never shrinks back after a peak."""
    directory = short_tmpdir("mb")
    path = str(directory / "s.sock")
    with ServerProcess(["--socket", path, "--log-level", "warning"], socket_path=path) as proc:
        proc.wait_ready()
        yield proc
        proc.stop()
    shutil.rmtree(directory, ignore_errors=True)


def _run(server: ServerProcess, attack: Callable[[str], None], what: str) -> int:
    assert server.socket_path
    with PeakRss(server.proc.pid) as rss:
        attack(server.socket_path)
    assert server.proc.poll() is None, server.output
    print(f"{what}: peak RSS {rss.peak / MiB:.1f} MiB")  # shown with -s: the figures for the docs
    assert rss.peak < BUDGET, f"{what} took the server to {rss.peak / MiB:.1f} MiB (budget 100 MiB)"
    return rss.peak


def _full_history(path: str) -> None:
    keyed_flood(path, DEFAULTS.history_size)


@pytest.mark.slow
def test_keyed_flood_of_largest_texts(server: ServerProcess) -> None:
    _run(server, lambda path: keyed_flood(path, KEYED_POSTS), f"{KEYED_POSTS} keyed POSTs of 16 KiB texts")


def test_clients_that_never_read_a_full_history(server: ServerProcess) -> None:
    def attack(path: str) -> None:
        _full_history(path)
        with never_reading_listers(path, LISTERS):
            # Replace the whole history while the answers wait: what they would have pinned is freed.
            _full_history(path)
            served_after(path)

    _run(server, attack, f"{LISTERS} never-reading GET /messages?limit=1000")


@pytest.mark.parametrize(
    ("attack", "what"),
    [
        (partial_bodies, "each holding all but the last byte of a 64 KiB body"),
        (lambda path, count: partial_bodies(path, count, body_bytes=20), "each trickling a small body"),
        (whole_bodies, "each sending one whole 64 KiB body at once"),
        (partial_heads, "each holding 30 KiB of an unfinished head"),
        (partial_trailers, "each holding 30 KiB of unfinished trailers"),
        (idle_connections, "idle"),
        (deep_pipeliners, "each pipelining 12,000 GETs and reading nothing"),
    ],
    ids=[
        "partial-bodies",
        "trickled-bodies",
        "whole-bodies",
        "partial-heads",
        "partial-trailers",
        "idle",
        "deep-pipelining",
    ],
)
def test_connections_up_to_the_cap(
    server: ServerProcess, attack: Callable[[str, int], Any], what: str
) -> None:
    def run(path: str) -> None:
        with attack(path, CONNECTIONS):
            served_after(path)

    _run(server, run, f"{CONNECTIONS} connections {what}")


def test_readers_that_never_read(server: ServerProcess) -> None:
    def attack(path: str) -> None:
        _full_history(path)
        with readers_that_never_read(path, CONNECTIONS):
            served_after(path)

    _run(server, attack, f"{CONNECTIONS} connections pipelining GETs of 16 KiB and never reading")


def test_every_attack_at_once(server: ServerProcess) -> None:
    """A full history of the largest messages, then everything held open together (under the cap,
    so that no attack closes another's connections to make room)."""
    share = (CONNECTIONS - LISTERS - 64) // 4

    def attack(path: str) -> None:
        _full_history(path)
        with (
            idle_connections(path, share),
            never_reading_listers(path, LISTERS),
            partial_bodies(path, share),
            partial_heads(path, share),
            partial_trailers(path, share),
        ):
            served_after(path)

    _run(server, attack, "every attack at once")


def test_thousands_idle_and_hundreds_trickling_never_starve_the_probe(server: ServerProcess) -> None:
    """3,000 idle connections and 500 slowloris peers at the default cap: /healthz still answers,
    and memory stays in the budget."""
    path = server.socket_path
    assert path
    raise_fd_limit(3500 + 400)
    opened: list[socket.socket] = []
    try:
        with PeakRss(server.proc.pid) as rss:
            for _ in range(500):
                conn = connect(path)
                conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Slow: a")
                opened.append(conn)
            opened.extend(connect(path) for _ in range(3000))
            for _ in range(5):
                assert wait_until(
                    lambda: http_over_uds(path, timeout=5.0)[0] == 200,
                    timeout=20,
                    what="/healthz among idle and trickling connections",
                )
        assert rss.peak < BUDGET, f"peak RSS {rss.peak / MiB:.1f} MiB"
    finally:
        for conn in opened:
            conn.close()
    assert server.proc.poll() is None, server.output
