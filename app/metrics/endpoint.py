"""``GET /metrics`` over TCP (``--metrics-listen``) and nothing else, on the server's event loop or,
with ``--workers``, on one in a thread of the parent. Limits, and why not uvicorn: docs/internals.md."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import shutil
import socket
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import h11

from app.config import Settings
from app.logs import escaped
from app.metrics.core import METRICS_PATH, MetricsError
from app.metrics.exposition import DIR_ENV, Rendered, exposition_registry
from app.metrics.files import absorb, multiprocess_dir
from client.net.answers import error_response
from client.net.throttle import Throttle

log = logging.getLogger("app.metrics")

ENDPOINT_CONNECTIONS = 16  # served at once; the next waits in the listen queue or evicts an unfinished one
ENDPOINT_PER_SOURCE = 4  # of those, the most one address holds (all of loopback counts as one)
ENDPOINT_ACCEPTS_PER_SECOND = 400  # so that refusing a flood costs the server's loop little
ENDPOINT_HEAD_DEADLINE = 3.0  # seconds to send the whole request head (a scrape sends it in one packet)
ENDPOINT_DEADLINE = 10.0  # seconds a connection may last: its request, its turn and taking the answer
ENDPOINT_REQUEST_BYTES = 16 * 1024  # of request head; past them, 431
SCRAPES_PER_SECOND = 20  # answers sent, one at a time
_ACCEPT_BATCH = 64  # accepted one after another before the loop runs other work
_ACCEPT_BURST = 0.05  # seconds of ENDPOINT_ACCEPTS_PER_SECOND an idle endpoint may accept at once
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: reset, leaving nothing in TIME_WAIT
_FAILED = Throttle(log)
_REFUSALS = {
    400: ("bad_request", f"the request is not valid HTTP/1.1; send GET {METRICS_PATH}"),
    404: ("not_found", f"this port serves {METRICS_PATH} only; the API is on the Unix socket"),
    405: ("method_not_allowed", f"{METRICS_PATH} answers GET and HEAD only"),
    431: ("headers_too_large", f"the request head is over {ENDPOINT_REQUEST_BYTES} bytes"),
}


def _refused(status: int, *, head_only: bool = False) -> bytes:
    """A JSON refusal: 404 (another path), 405 (another method), 431, else 400 (not HTTP)."""
    error, message = _REFUSALS.get(status, _REFUSALS[400])
    headers = [*([("Allow", "GET, HEAD")] if status == 405 else []), ("Connection", "close")]
    return error_response(status, error, message, headers=headers, head_only=head_only)


def listening_socket(listen: str) -> socket.socket:
    """A TCP socket listening on ``listen`` (``HOST:PORT``); :class:`MetricsError` if it cannot."""
    host, _, port = listen.rpartition(":")
    sock = None
    try:
        found = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, kind, proto, _, address = found[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)  # a flood refused at once must not fill it before a scraper arrives
        return sock
    except (OSError, ValueError) as exc:
        if sock is not None:
            sock.close()
        reason = str(getattr(exc, "strerror", None) or exc).lower()
        hint = "use HOST:PORT with a local address, e.g. 0.0.0.0:9102"
        if getattr(exc, "errno", None) == errno.EADDRINUSE:
            hint = "stop the program using it or choose another port"
        raise MetricsError(f"cannot serve metrics on {listen} (--metrics-listen): {reason}; {hint}") from None


def _source(address: Any) -> str:
    """The share a peer counts in: its IP, or ``loopback`` for any loopback address."""
    host = str(address[0]).partition("%")[0] if isinstance(address, tuple) and address else ""
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if (getattr(ip, "ipv4_mapped", None) or ip).is_loopback:
            return "loopback"
    return host


class _Slot:
    """A connection being served: evictable once ``reading`` its request head, until it is ``whole``."""

    __slots__ = ("conn", "reading", "source", "task", "whole")
    task: asyncio.Task[bool]

    def __init__(self, conn: socket.socket, source: str) -> None:
        self.conn = conn
        self.source = source
        self.reading = self.whole = False


class LoopEndpoint:
    """``GET``/``HEAD /metrics`` on ``listen`` from ``rendered``, one request a connection, within
    the limits above."""

    def __init__(self, listen: str, rendered: Rendered) -> None:
        self.listen = listen
        self.rendered = rendered
        self.sock = listening_socket(listen)
        self._slots: dict[_Slot, None] = {}  # oldest first
        self._room = asyncio.Event()
        self._turn = asyncio.Lock()
        self._accepting: asyncio.Task[None] | None = None
        self._next_answer = self._next_accept = 0.0

    async def start(self) -> None:
        """Serve on the running loop until :meth:`close`."""
        self.sock.setblocking(False)
        self._room.set()
        self._accepting = asyncio.get_running_loop().create_task(self._accept())
        port = self.sock.getsockname()[1]
        log.info("Metrics on http://%s:%d%s", self.listen.rpartition(":")[0], port, METRICS_PATH)

    def close(self) -> None:
        """Stop listening and drop the connections being served (a scrape is cheap to repeat)."""
        if self._accepting is not None:
            self._accepting.cancel()
        for slot in list(self._slots):
            slot.task.cancel()
        self.sock.close()

    def _update_room(self) -> None:
        if len(self._slots) < ENDPOINT_CONNECTIONS or any(not slot.whole for slot in self._slots):
            self._room.set()
        else:
            self._room.clear()  # the next connection waits in the kernel's listen queue

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._room.wait()
            try:
                conn, address = await loop.sock_accept(self.sock)
            except OSError:  # out of descriptors, or the peer already gone
                await asyncio.sleep(0.05)
                continue
            for _ in range(_ACCEPT_BATCH):  # those already waiting, without a round of the loop each
                self._take(conn, address)
                earliest = loop.time() - _ACCEPT_BURST
                self._next_accept = max(self._next_accept, earliest) + 1 / ENDPOINT_ACCEPTS_PER_SECOND
                if not self._room.is_set() or self._next_accept > loop.time():
                    break
                try:
                    conn, address = self.sock.accept()
                except OSError:  # none waiting, or out of descriptors
                    break
            if self._next_accept > loop.time():  # the rest wait in the listen queue, their peers blocked
                await asyncio.sleep(self._next_accept - loop.time())

    def _take(self, conn: socket.socket, address: Any) -> None:
        """Serve ``conn``; past its address's share (or every slot), evict the oldest unfinished one
        there, or else reset ``conn``."""
        source = _source(address)
        crowd = [slot for slot in self._slots if slot.source == source]
        if len(crowd) < ENDPOINT_PER_SOURCE:
            crowd = list(self._slots) if len(self._slots) >= ENDPOINT_CONNECTIONS else []
        if crowd:
            evicted = next((slot for slot in crowd if slot.reading and not slot.whole), None)
            if evicted is None:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                conn.close()
                return
            del self._slots[evicted]
            evicted.task.cancel()
        conn.setblocking(False)
        slot = _Slot(conn, source)
        self._slots[slot] = None
        slot.task = asyncio.get_running_loop().create_task(self._serve(slot))
        slot.task.add_done_callback(lambda task: self._done(slot, task))
        self._update_room()

    def _done(self, slot: _Slot, task: asyncio.Task[bool]) -> None:
        """Close a connection served, evicted or cut: reset unless it ended cleanly."""
        self._slots.pop(slot, None)
        if task.cancelled() or not task.result():
            with contextlib.suppress(OSError):
                slot.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        slot.conn.close()
        self._update_room()

    async def _serve(self, slot: _Slot) -> bool:
        """Answer the connection's one request; whether it ended cleanly (nothing left unsent)."""
        loop = asyncio.get_running_loop()
        slot.reading = True
        try:
            async with asyncio.timeout(ENDPOINT_DEADLINE):
                async with asyncio.timeout(ENDPOINT_HEAD_DEADLINE):
                    request = await _read_request(loop, slot.conn)
                slot.whole = True
                self._update_room()
                if request is None:  # it closed first
                    return True
                async with self._turn:
                    if self._next_answer > loop.time():
                        await asyncio.sleep(self._next_answer - loop.time())
                    self._next_answer = loop.time() + 1 / SCRAPES_PER_SECOND
                    answer = self._answer(request) if isinstance(request, h11.Request) else request
                await loop.sock_sendall(slot.conn, answer)
                return True
        except (TimeoutError, OSError):
            return False
        except Exception as exc:  # never a line per connection, whatever a client sends
            reason = escaped(f"{type(exc).__name__}: {exc}")
            _FAILED.log(logging.ERROR, "Metrics endpoint: could not answer a request (%s)", reason)
            return False

    def _answer(self, request: h11.Request) -> bytes:
        head_only = request.method == b"HEAD"
        if request.target.partition(b"?")[0] != METRICS_PATH.encode():
            return _refused(404, head_only=head_only)
        if request.method not in (b"GET", b"HEAD"):
            return _refused(405, head_only=head_only)
        fields = {name.decode("latin-1"): value.decode("latin-1") for name, value in request.headers}
        headers, output = self.rendered.render(fields.get("accept"), fields.get("accept-encoding"))
        headers += [("Content-Length", str(len(output))), ("Connection", "close")]
        head = "HTTP/1.1 200 OK\r\n" + "".join(f"{name}: {value}\r\n" for name, value in headers)
        return (head + "\r\n").encode("latin-1") + (b"" if head_only else output)


async def _read_request(loop: asyncio.AbstractEventLoop, conn: socket.socket) -> h11.Request | bytes | None:
    """The request, the whole answer refusing it, or None when the peer closed first."""
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=ENDPOINT_REQUEST_BYTES)
    budget = ENDPOINT_REQUEST_BYTES
    try:
        while (event := connection.next_event()) is h11.NEED_DATA:
            if budget <= 0:  # h11's limit is on an incomplete head: a whole one may be larger
                return _refused(431)
            data = await loop.sock_recv(conn, 65536)  # all there is: unread bytes would make close a reset
            connection.receive_data(data[:budget])
            budget -= len(data)
    except h11.RemoteProtocolError as exc:  # not HTTP, or a head over the limit (431)
        return _refused(exc.error_status_hint)
    return event if isinstance(event, h11.Request) else None


@contextlib.contextmanager
def for_workers(settings: Settings) -> Iterator[Callable[[int], None]]:
    """The ``--workers`` parent's side, undone on exit: the workers' directory (named to them in
    ``DIR_ENV``) and the endpoint over it on a loop in a thread. Yields what folds a reaped worker's
    counts in (a full disk leaves its file, counted as before). Raises :class:`MetricsError`."""
    try:
        base = tempfile.gettempdir()
    except FileNotFoundError:  # no writable temporary directory (a read-only root filesystem)
        base = settings.data_dir
    try:
        directory = multiprocess_dir(base)
    except OSError as exc:
        raise MetricsError(
            f"cannot create the workers' metrics directory in {base}: {exc.strerror or exc}; "
            "set TMPDIR to a writable directory"
        ) from None
    thread: threading.Thread | None = None
    done = threading.Event()

    def fold(pid: int) -> None:
        try:
            absorb(directory, pid)
        except OSError as exc:
            message = "Metrics: cannot fold worker pid %d's counts in %s (%s); its file stays"
            log.warning(message, pid, directory, exc.strerror or exc)

    try:
        os.environ[DIR_ENV] = directory
        if settings.metrics_listen is not None:
            endpoint = LoopEndpoint(settings.metrics_listen, Rendered(exposition_registry(directory)))
            started = threading.Event()

            async def serve() -> None:
                try:
                    await endpoint.start()
                    started.set()
                    await asyncio.to_thread(done.wait)
                finally:
                    endpoint.close()  # asyncio.run then cancels what it was serving

            thread = threading.Thread(target=asyncio.run, args=(serve(),), name="metrics", daemon=True)
            thread.start()
            started.wait(10)
        yield fold
    finally:
        if thread is not None:
            done.set()
            thread.join(10)
        os.environ.pop(DIR_ENV, None)
        shutil.rmtree(directory, ignore_errors=True)
