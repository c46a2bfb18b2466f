"""The proxy's connections: read one request head (h11), judge it, forward it to the socket.

One request per TCP connection (``Connection: close`` upstream), so each is judged; bodies are
streamed with backpressure and re-framed by h11, answers copied byte for byte. Connections are
capped; at the cap, one without a whole head after ``MAKE_ROOM_AFTER`` makes room. Why:
docs/internals.md, "The proxy".
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable
from http import HTTPStatus

import h11

from client._errors import ConnectError, reason_for
from client.address import to_url
from client.cli.proxy.access import (
    FORWARDED_HEADER,
    MAX_HEAD_BYTES,
    TOKEN_HEADER,
    Admit,
    Refuse,
    Rules,
    decide,
    head_of,
    shown,
    split_token,
)
from client.cli.proxy.caller import Caller, SocketAccess, find_caller, tcp_owner
from client.net.answers import error_response
from client.net.linger import linger
from client.net.throttle import Throttle

__all__ = ["MAKE_ROOM_AFTER", "REFUSING", "Proxy", "error_answer", "hostport"]

FIRST_BYTE_TIMEOUT = 10.0
"""Seconds a new connection may stay silent (at most ``--head-timeout``): browsers open spare ones."""
MAKE_ROOM_AFTER = 1.0
"""At the cap, a connection without a whole request head this long after it opened is closed to
make room (oldest first): clients send theirs in milliseconds."""
LOG_PERIOD = 10.0
"""Seconds between two log lines about one kind of refusal."""
REFUSING = 32
"""Refusals that may linger at once (files kept free for them); beyond, answered and closed at once."""
_CHUNK = 256 * 1024
_LINGER_BYTES = 1 << 20
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"upgrade", b"te", FORWARDED_HEADER}
)
_ERRORS = {431: "headers_too_large", 503: "unavailable"}
"""The JSON ``error`` where it is not the status's name in lower case."""


def error_answer(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A whole ``Connection: close`` HTTP/1.1 response carrying the shared JSON error shape."""
    error = _ERRORS.get(status) or HTTPStatus(status).name.lower()
    return error_response(status, error, message, headers=(("connection", "close"), *headers))


class _Closed(Exception):
    """The client closed the connection before sending a request."""


class _CapReport:
    """Connections refused or closed at the cap: the first logged at once, the rest summed up
    once per period."""

    def __init__(self, log: Callable[[str], None], cap: int) -> None:
        self.log = log
        self.cap = cap
        self.refused = self.closed = 0
        self._timer: asyncio.TimerHandle | None = None

    def note(self, *, refused: bool) -> None:
        if refused:
            self.refused += 1
        else:
            self.closed += 1
        if self._timer is None:
            self._flush()

    def _flush(self) -> None:
        self._timer = None
        if not (self.refused or self.closed):
            return
        self.log(
            f"Proxy at its connection limit ({self.cap}, --max-connections): refused {self.refused} "
            f"connection(s) with 503, closed {self.closed} without a request head after "
            f"{MAKE_ROOM_AFTER:g}s to make room; next report in {LOG_PERIOD:g}s at most"
        )
        self.refused = self.closed = 0
        self._timer = asyncio.get_running_loop().call_later(LOG_PERIOD, self._flush)

    def close(self) -> None:
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class _RefusalLog:
    """Refused requests, per status and caller uid: the first line at once, the others held and
    written with their count once per period (a refused peer must not flood the log)."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.throttle = Throttle(log, LOG_PERIOD)
        self._timer: asyncio.TimerHandle | None = None

    def note(self, status: int, caller: Caller | None, line: str) -> None:
        key = (status, caller.uid if caller is not None else None)
        if not self.throttle.log(0, line, key=key) and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(LOG_PERIOD, self.close)

    def close(self) -> None:
        """Write what is held now."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.throttle.flush()


class Proxy:
    """Accepts TCP connections, judges each request, forwards admitted ones to the Unix socket."""

    def __init__(
        self,
        path: str,
        *,
        connect_timeout: float,
        log: Callable[[str], None],
        log_connections: bool = True,
        token: str | None = None,
        token_only: bool = False,
        head_timeout: float = 30.0,
        max_connections: int = 256,
    ) -> None:
        self.path = path
        self.url = to_url(path)
        self.connect_timeout = connect_timeout
        self.log = log
        self.log_connections = log_connections
        self.rules = Rules(frozenset(), token or secrets.token_urlsafe(24), token_only, self.url)
        self.head_timeout = head_timeout
        self.access = SocketAccess(path)
        self.max_connections = max_connections
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots: set[asyncio.Task[None]] = set()
        """Connections counted against ``max_connections`` (not those being refused)."""
        self.checking: dict[asyncio.Task[None], int | None] = {}
        """Connections whose request is not judged yet, oldest first, with the uid that opened them."""
        self.waiting: dict[asyncio.Task[None], float] = {}
        """Connections without a whole request head yet, oldest first, with the time they opened."""
        self.refusing = 0
        self.report = _CapReport(log, max_connections)
        self.refusals = _RefusalLog(log)
        self.count = 0

    def listening(self, hosts: frozenset[str]) -> None:
        """Set the ``Host`` values the proxy answers to, once its port is known."""
        self.rules = dataclasses.replace(self.rules, hosts=hosts)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one TCP connection: one request, judged, then forwarded or refused."""
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer = writer.get_extra_info("peername")
        local = writer.get_extra_info("sockname")
        addresses = (peer[:2], local[:2]) if isinstance(peer, tuple) and isinstance(local, tuple) else None
        try:
            if not self._take_slot(task, _owner(addresses)):
                message = f"the proxy is at its connection limit ({self.max_connections}); try again shortly"
                await self._answer(reader, writer, error_answer(503, message, (("Retry-After", "1"),)))
                return
            self.count += 1
            who = f"proxy #{self.count} {hostport(*peer[:2]) if addresses else '?'}"
            await self._serve(task, reader, writer, addresses, who)
        finally:
            writer.close()
            self.tasks.discard(task)
            self.slots.discard(task)
            self.waiting.pop(task, None)
            self.checking.pop(task, None)

    async def _serve(
        self,
        task: asyncio.Task[None],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        addresses: tuple[tuple[str, int], tuple[str, int]] | None,
        who: str,
    ) -> None:
        started = time.monotonic()
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        received = [0]
        first_byte = min(FIRST_BYTE_TIMEOUT, self.head_timeout)
        try:
            request = await asyncio.wait_for(
                _next_request(reader, conn, received, first_byte), self.head_timeout
            )
        except _Closed:
            return
        except TimeoutError:
            if received[0]:
                line = f"{who}: no complete request head within {self.head_timeout:g}s (answered 408)"
                message = f"the request head was not complete within {self.head_timeout:g}s; send it faster"
                await self._refused(task, reader, writer, Refuse(408, message), None, line)
            return
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in (431, 501) else 400
            # h11 may quote the request line, and with it a token in the URL.
            message = (
                f"the request is not valid HTTP/1.1 ({shown(str(exc).replace(self.rules.token, '<token>'))})"
            )
            if status == 431:
                message = f"the request head is over {MAX_HEAD_BYTES} bytes"
            await self._refused(
                task, reader, writer, Refuse(status, message), None, f"{who}: refused {status}: {message}"
            )
            return
        except (OSError, asyncio.IncompleteReadError):  # TimeoutError is an OSError: after it
            return
        self.waiting.pop(task, None)
        # The caller is looked up once its head is in: a flood of silent connections must not
        # queue lookups (threads, /proc) ahead of the requests that wait for theirs.
        caller, may_connect, permissions = (
            await asyncio.to_thread(self._identify, *addresses) if addresses else (None, False, "")
        )
        verdict = decide(
            head_of(request.method, request.target, request.headers),
            caller,
            self.rules,
            may_connect=may_connect,
            permissions=permissions,
        )
        self.checking.pop(task, None)
        who = f"{who} {_describe(caller)}"
        line = f"{shown(request.method)} {shown(split_token(request.target)[1])}"
        if isinstance(verdict, Refuse):
            note = f"{who}: refused {verdict.status} {line}: {verdict.reason}"
            await self._refused(task, reader, writer, verdict, caller, note)
            return
        await self._forward(reader, writer, conn, request, verdict, caller, f"{who} {line}", started)

    def _identify(self, peer: tuple[str, int], local: tuple[str, int]) -> tuple[Caller | None, bool, str]:
        """The caller, whether the socket's permissions admit it, and those permissions (if not)."""
        matter = _never if self.rules.token_only else self.access.may_ever
        caller = find_caller(peer, local, matter)
        if caller is None or self.rules.token_only:
            return caller, False, ""
        if self.access.allows(caller.uid, caller.groups):
            return caller, True, ""
        return caller, False, self.access.describe()

    def _take_slot(self, task: asyncio.Task[None], owner: int | None) -> bool:
        """Count a new connection against the cap, closing one without a request head to make room.

        False (the newcomer is refused) when every place is held by a connection that sent its
        head or opened under ``MAKE_ROOM_AFTER`` ago, those without a head hold at most half the
        places, and no uid but the newcomer's (``owner``) holds over half with requests not judged.
        """
        now = time.monotonic()
        if len(self.slots) >= self.max_connections:
            oldest = next(iter(self.waiting.items()), None)
            # Silent connections filling half the places are a flood: the oldest goes whatever its
            # age, or a stranger opening them faster than one a second per place locks all out.
            crowded = len(self.waiting) > self.max_connections // 2
            if oldest is None or (now - oldest[1] < MAKE_ROOM_AFTER and not crowded):
                victim = self._flooder(owner)
                if victim is None:
                    self.report.note(refused=True)
                    return False
            else:
                victim = oldest[0]
            self.waiting.pop(victim, None)
            self.checking.pop(victim, None)
            self.slots.discard(victim)
            victim.cancel()  # it closes its connection; nothing of it has reached the socket
            self.report.note(refused=False)
        self.slots.add(task)
        self.waiting[task] = now
        self.checking[task] = owner
        return True

    def _flooder(self, owner: int | None) -> asyncio.Task[None] | None:
        """The oldest connection not yet judged of a uid other than ``owner`` that holds over half
        the places with such connections (its caller lookups queue up and would lock all out)."""
        counts = Counter(self.checking.values())
        if not counts:
            return None
        uid, held = counts.most_common(1)[0]
        if uid == owner or held <= self.max_connections // 2:
            return None
        return next(task for task, of in self.checking.items() if of == uid)

    async def _refused(
        self,
        task: asyncio.Task[None],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        refusal: Refuse,
        caller: Caller | None,
        line: str,
    ) -> None:
        """Log and answer a request refused before the socket; its connection gives up its place
        at once (a refused peer's unread answers must not fill the cap)."""
        self.refusals.note(refusal.status, caller, line)
        self.slots.discard(task)
        self.waiting.pop(task, None)
        await self._answer(reader, writer, error_answer(refusal.status, refusal.reason))

    async def _answer(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer: bytes
    ) -> None:
        """Answer and linger while fewer than ``REFUSING`` do; beyond that, answer and close at once."""
        if self.refusing >= REFUSING:
            with contextlib.suppress(OSError):
                writer.write(answer)
            return
        self.refusing += 1
        try:
            await _answer(reader, writer, answer)
        finally:
            self.refusing -= 1

    def _upstream_headers(self, request: h11.Request, caller: Caller | None) -> list[tuple[bytes, bytes]]:
        token = self.rules.token.encode()
        headers: list[tuple[bytes, bytes]] = []
        for raw_name, value in request.headers.raw_items():
            lower = raw_name.lower()
            if lower in _HOP_BY_HOP or lower == TOKEN_HEADER:
                continue
            if lower == b"referer" and token in value:  # the token is a secret for the proxy alone
                continue
            headers.append((raw_name, value))
        headers.append((b"Connection", b"close"))
        if caller is not None:
            headers.append(
                (b"Uds-Forwarded-Peer", f"uid={caller.uid} gid={caller.gid} pid={caller.pid}".encode())
            )
        return headers

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: h11.Connection,
        request: h11.Request,
        verdict: Admit,
        caller: Caller | None,
        label: str,
        started: float,
    ) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.wait_for(
                _open_unix(self.path), self.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            message = str(ConnectError(self.url, reason_for(exc)))
            self.log(f"{label}: {message} (answered 502)")
            await _answer(reader, writer, error_answer(502, message))
            return
        if self.log_connections:
            self.log(f"{label} -> {self.url} (admitted by {verdict.by})")
        moved = [0, 0]  # bytes to the socket, bytes to the client
        note = " (cut: the proxy is stopping)"
        # Only a caller identified by uid is named to the server: whoever holds the token acts as
        # the proxy's user, which is what the server sees on the socket.
        headers = self._upstream_headers(request, caller if verdict.by == "uid" else None)
        chunked = any(name.lower() == b"transfer-encoding" for name, _ in headers)
        try:
            # The request line keeps the client's HTTP version, so the server frames its answer
            # for that client (no chunked answer to HTTP/1.0).
            head = b"%s %s HTTP/%s\r\n%s\r\n" % (
                request.method,
                verdict.target,
                request.http_version,
                b"".join(b"%s: %s\r\n" % field for field in headers),
            )
            upstream_writer.write(head)
            moved[0] += len(head)
            body = asyncio.ensure_future(_copy_body(reader, conn, chunked, upstream_writer, moved))
            down = asyncio.ensure_future(_copy(upstream_reader, writer, moved))
            note, error = await _finish(body, down)
            if isinstance(error, h11.RemoteProtocolError) and moved[1] == 0:
                # The socket got a cut-off body and is answering nothing: the client hears why.
                message = f"the request body is not valid HTTP/1.1 ({shown(str(error))})"
                await _answer(reader, writer, error_answer(400, message))
            elif not writer.is_closing():
                await linger(reader, writer, limit=_LINGER_BYTES)
        finally:
            upstream_writer.close()
            if self.log_connections:
                self.log(
                    f"{label}: {moved[0]} B to socket, {moved[1]} B to client, "
                    f"{time.monotonic() - started:.3f} s{note}"
                )

    async def close_all(self) -> int:
        """Cut every open connection; return how many there were."""
        self.report.close()
        self.refusals.close()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _owner(addresses: tuple[tuple[str, int], tuple[str, int]] | None) -> int | None:
    """The uid that opened the connection (one sock_diag lookup), None if unknown."""
    found = tcp_owner(*addresses) if addresses else None
    return found[0] if found is not None else None


def _describe(caller: Caller | None) -> str:
    return "(unknown user)" if caller is None else f"(uid={caller.uid} gid={caller.gid} pid={caller.pid})"


def _never(uid: int) -> bool:
    return False


async def _next_request(
    reader: asyncio.StreamReader, conn: h11.Connection, received: list[int], first_byte: float
) -> h11.Request:
    """Read until h11 has a whole request head; :class:`_Closed` on EOF before one, and
    :class:`TimeoutError` if the first bytes do not come within ``first_byte`` seconds."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            if received[0]:
                data = await reader.read(_CHUNK)
            else:
                async with asyncio.timeout(first_byte):
                    data = await reader.read(_CHUNK)
            received[0] += len(data)
            if not data and not received[0]:
                raise _Closed
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            return event
        raise _Closed  # ConnectionClosed


async def _copy_body(
    reader: asyncio.StreamReader,
    conn: h11.Connection,
    chunked: bool,
    writer: asyncio.StreamWriter,
    moved: list[int],
) -> None:
    """Stream the body h11 decodes to the socket, waiting for it to drain: a chunked body as one
    chunk per piece read, trailers dropped; a body of known length as it is (h11 checks it)."""
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(_CHUNK))
            continue
        if isinstance(event, h11.Data):
            if not event.data:
                continue
            out = b"%x\r\n%s\r\n" % (len(event.data), event.data) if chunked else bytes(event.data)
        elif isinstance(event, h11.EndOfMessage):
            out = b"0\r\n\r\n" if chunked else b""
        else:
            return
        if out:
            writer.write(out)
            moved[0] += len(out)
            await writer.drain()
        if isinstance(event, h11.EndOfMessage):
            return


async def _finish(body: asyncio.Future[None], down: asyncio.Future[None]) -> tuple[str, BaseException | None]:
    """Wait for the answer to be copied; return a note for the log line ("" if all went well)."""
    try:
        done, _ = await asyncio.wait({body, down}, return_when=asyncio.FIRST_COMPLETED)
        if body in done and body.exception() is None:
            await asyncio.wait({down})  # the whole request is sent: wait for the whole answer
            done = {body, down}
        for t, direction in ((body, "client to socket"), (down, "socket to client")):
            error = t.exception() if t in done and not t.cancelled() else None
            if error is not None:
                if isinstance(error, h11.RemoteProtocolError):
                    what: object = f"invalid body: {error}"
                else:
                    what = error.strerror if isinstance(error, OSError) and error.strerror else error
                return f" ({direction} stopped: {str(what).lower() or type(error).__name__})", error
        return "", None
    finally:
        for t in (body, down):
            if not t.done():
                t.cancel()
        await asyncio.gather(body, down, return_exceptions=True)


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bytes) -> None:
    """Send the proxy's own answer, end the connection, and linger so that it is not reset."""
    with contextlib.suppress(OSError):
        writer.write(response)
        await writer.drain()
    await linger(reader, writer, limit=_LINGER_BYTES)


async def _open_unix(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to the socket, retrying while its listen backlog is full (EAGAIN on AF_UNIX)."""
    delay = 0.001
    while True:
        try:
            return await asyncio.open_unix_connection(path)
        except BlockingIOError:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, moved: list[int]) -> None:
    """Copy the answer until EOF, waiting for the client to drain (backpressure)."""
    while True:
        data = await reader.read(_CHUNK)
        if not data:
            break
        writer.write(data)
        moved[1] += len(data)
        await writer.drain()
