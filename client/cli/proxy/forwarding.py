"""The proxy's connections: read one request head (h11), judge it, forward it to the socket, one
request per connection (docs/internals.md, "One request per connection")."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Callable, Hashable, Iterable
from http import HTTPStatus

import h11

from client._errors import ConnectError
from client.address import to_url
from client.cli.proxy import access
from client.cli.proxy.access import Admit, Refuse, shown
from client.cli.proxy.caller import Caller, find_caller, tcp_owner
from client.cli.proxy.capacity import Places, Task
from client.cli.proxy.permissions import SocketAccess
from client.net.answers import error_response
from client.net.linger import linger
from client.net.throttle import Throttle

FIRST_BYTE_TIMEOUT = 10.0  # a new connection's silence (browsers open spare ones); at most --head-timeout
LOG_PERIOD = 10.0  # between two log lines of one kind
REFUSING = 32  # refusals lingering at once; beyond, answered and closed at once
_CHUNK = 256 * 1024
_LINGER_BYTES = 1 << 20
# Hop-by-hop fields, a claimed caller and the token: never forwarded.
_DROPPED = {b"connection", b"keep-alive", b"proxy-connection", b"upgrade", b"te"}
_DROPPED |= {access.FORWARDED_HEADER, access.TOKEN_HEADER}
_ERRORS = {431: "headers_too_large", 503: "unavailable"}  # elsewhere the status's name in lower case

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
Streams = tuple[Reader, Writer]


def error_answer(status: int, message: str, headers: Iterable[tuple[str, str]] = ()) -> bytes:
    """A whole ``Connection: close`` HTTP/1.1 response carrying the shared JSON error shape."""
    error = _ERRORS.get(status) or HTTPStatus(status).name.lower()
    return error_response(status, error, message, headers=(("connection", "close"), *headers))


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Proxy:
    """Accepts TCP connections, judges each request, forwards admitted ones to the Unix socket;
    ``args``: the command's socket, timeout, head_timeout, token_only and quiet."""

    def __init__(self, args: argparse.Namespace, max_connections: int, log: Callable[[str], None]) -> None:
        self.path, self.url, self.log = args.socket, to_url(args.socket), log
        self.connect_timeout, self.head_timeout = args.timeout, args.head_timeout
        self.log_connections = not args.quiet
        self.rules = access.Rules(frozenset(), secrets.token_urlsafe(24), args.token_only, self.url)
        self.socket = SocketAccess(self.path)
        self.places = Places(max_connections, self._note)
        self.tasks: set[Task] = set()
        self.refusing = 0
        self.refusals = Throttle(log, LOG_PERIOD)
        self._flush: asyncio.TimerHandle | None = None
        self.count = 0

    def listening(self, hosts: frozenset[str]) -> None:
        """Set the ``Host`` values the proxy answers to, once its port is known."""
        self.rules = dataclasses.replace(self.rules, hosts=hosts)

    async def handle(self, reader: Reader, writer: Writer) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer, local = writer.get_extra_info("peername"), writer.get_extra_info("sockname")
        known = isinstance(peer, tuple) and isinstance(local, tuple)
        # The owner (uid, inode) is fixed for the socket's life: looked up once, for the cap and the verdict.
        owner = tcp_owner(peer[:2], local[:2]) if known else None
        try:
            if not self.places.take(task, owner[0] if owner else None):
                message = f"the proxy is at its connection limit ({self.places.cap}); try again shortly"
                await self._answer((reader, writer), error_answer(503, message, (("Retry-After", "1"),)))
                return
            self.count += 1
            who = f"proxy #{self.count} {hostport(*peer[:2]) if known else '?'}"
            await self._serve(task, (reader, writer), owner, who)
        finally:
            writer.close()
            self.tasks.discard(task)
            self.places.release(task)

    async def _serve(self, task: Task, io: Streams, owner: tuple[int, int] | None, who: str) -> None:
        started = time.monotonic()
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=access.MAX_HEAD_BYTES)
        first = min(FIRST_BYTE_TIMEOUT, self.head_timeout)
        try:
            request = await asyncio.wait_for(_next_request(io[0], conn, first), self.head_timeout)
        except TimeoutError:
            if conn.trailing_data[0]:  # some of a head came
                line = f"{who}: no complete request head within {self.head_timeout:g}s (answered 408)"
                message = f"the request head was not complete within {self.head_timeout:g}s; send it faster"
                await self._refuse(task, io, Refuse(408, message), None, line)
            return
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if exc.error_status_hint in (431, 501) else 400
            detail = shown(str(exc).replace(self.rules.token, "<token>"))  # h11 may quote the URL
            message = f"the request is not valid HTTP/1.1 ({detail})"
            if status == 431:
                message = f"the request head is over {access.MAX_HEAD_BYTES} bytes"
            await self._refuse(task, io, Refuse(status, message), None, f"{who}: refused {status}: {message}")
            return
        except (OSError, asyncio.IncompleteReadError):  # after TimeoutError, which is an OSError
            return
        if request is None:  # closed before a request
            return
        self.places.waiting.pop(task, None)
        # Searched once the head is in: silent connections must not queue searches of /proc.
        identity = await asyncio.to_thread(self._identify, owner) if owner else (None, False, "")
        verdict = access.decide(request.method, request.target, request.headers, self.rules, *identity)
        self.places.unjudged.pop(task, None)
        caller = identity[0]
        uid = None if caller is None else caller.uid
        who += " (unknown user)" if caller is None else f" (uid={uid} gid={caller.gid} pid={caller.pid})"
        line = f"{shown(request.method)} {shown(access.split_token(request.target)[1])}"
        if isinstance(verdict, Refuse):
            await self._refuse(
                task, io, verdict, uid, f"{who}: refused {verdict.status} {line}: {verdict.reason}"
            )
        else:
            await self._forward(io, conn, request, verdict, caller, f"{who} {line}", started)

    def _identify(self, owner: tuple[int, int]) -> tuple[Caller, bool, str]:
        """The caller, whether the socket's permissions admit it, and those permissions (if not)."""
        token_only = self.rules.token_only
        caller = find_caller(owner, (lambda uid: False) if token_only else self.socket.may_ever)
        allowed = not token_only and self.socket.allows(caller.uid, caller.groups)
        return caller, allowed, "" if allowed or token_only else self.socket.describe()

    async def _refuse(self, task: Task, io: Streams, refusal: Refuse, uid: int | None, line: str) -> None:
        """Log and answer a request refused before the socket (by uid); its place is given up."""
        self._note(line, (refusal.status, uid))
        self.places.give_up(task)
        await self._answer(io, error_answer(refusal.status, refusal.reason))

    def _note(self, line: str, key: Hashable) -> None:
        """Log ``line`` now, or hold it and say how many there were in a line per period."""
        if not self.refusals.log(0, line, key=key) and self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(LOG_PERIOD, self._flush_refusals)

    def _flush_refusals(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self.refusals.flush()

    async def _answer(self, io: Streams, answer: bytes, *, bounded: bool = True) -> None:
        """Send the proxy's answer and linger, unless ``REFUSING`` ``bounded`` answers already do."""
        with contextlib.suppress(OSError):
            io[1].write(answer)
        if bounded and self.refusing >= REFUSING:
            return
        self.refusing += bounded
        try:
            with contextlib.suppress(OSError):
                await io[1].drain()
            await linger(*io, limit=_LINGER_BYTES)
        finally:
            self.refusing -= bounded

    async def _forward(
        self,
        io: Streams,
        conn: h11.Connection,
        request: h11.Request,
        verdict: Admit,
        caller: Caller | None,
        label: str,
        started: float,
    ) -> None:
        try:
            upstream = await asyncio.wait_for(_open_unix(self.path), self.connect_timeout)
        except (OSError, TimeoutError) as exc:
            message = str(ConnectError.caused_by(self.url, exc))
            self.log(f"{label}: {message} (answered 502)")
            await self._answer(io, error_answer(502, message), bounded=False)
            return
        if self.log_connections:
            self.log(f"{label} -> {self.url} (admitted by {verdict.by})")
        moved = [0, 0]  # bytes to the socket, bytes to the client
        note = " (cut: the proxy is stopping)"
        # No token (nor a Referer holding it), the client's HTTP version (the server frames for it);
        # only a caller identified by uid is named: a token's holder acts as the proxy's user.
        token = self.rules.token.encode()
        fields = [
            (name, value)
            for name, value in request.headers.raw_items()
            if name.lower() not in _DROPPED and not (name.lower() == b"referer" and token in value)
        ]
        fields.append((b"Connection", b"close"))
        if caller is not None and verdict.by == "uid":
            peer = f"uid={caller.uid} gid={caller.gid} pid={caller.pid}"
            fields.append((b"Uds-Forwarded-Peer", peer.encode()))
        lines = b"".join(b"%s: %s\r\n" % field for field in fields)
        head = b"%s %s HTTP/%s\r\n%s\r\n" % (request.method, verdict.target, request.http_version, lines)
        chunked = any(name.lower() == b"transfer-encoding" for name, _ in fields)
        try:
            body = asyncio.ensure_future(_copy(_request(head, io[0], conn, chunked), upstream[1], moved, 0))
            down = asyncio.ensure_future(_copy(_reads(upstream[0]), io[1], moved, 1))
            note, error = await _finish(body, down)
            if isinstance(error, h11.RemoteProtocolError) and moved[1] == 0:
                # The socket got a cut-off body and is answering nothing: the client hears why.
                message = f"the request body is not valid HTTP/1.1 ({shown(str(error))})"
                await self._answer(io, error_answer(400, message), bounded=False)
            elif not io[1].is_closing():
                await linger(*io, limit=_LINGER_BYTES)
        finally:
            upstream[1].close()
            if self.log_connections:
                elapsed = time.monotonic() - started
                self.log(f"{label}: {moved[0]} B to socket, {moved[1]} B to client, {elapsed:.3f} s{note}")

    async def close_all(self) -> int:
        """Cut every open connection; return how many there were."""
        self._flush_refusals()
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)


async def _next_request(reader: Reader, conn: h11.Connection, first: float) -> h11.Request | None:
    """A whole request head, or None on EOF; TimeoutError if no byte came within ``first`` s."""
    timeout: float | None = first
    while (event := conn.next_event()) is h11.NEED_DATA:
        async with asyncio.timeout(timeout):
            conn.receive_data(await reader.read(_CHUNK))
        timeout = None
    return event if isinstance(event, h11.Request) else None  # else ConnectionClosed


async def _request(head: bytes, reader: Reader, conn: h11.Connection, chunked: bool) -> AsyncIterator[bytes]:
    """``head``, then the body h11 decodes, framed again: chunked stays chunked (trailers dropped)."""
    yield head
    while (event := conn.next_event()) is h11.NEED_DATA or isinstance(event, h11.Data):
        if isinstance(event, h11.Data):
            if event.data:
                yield b"%x\r\n%s\r\n" % (len(event.data), event.data) if chunked else event.data
        else:
            conn.receive_data(await reader.read(_CHUNK))
    if isinstance(event, h11.EndOfMessage) and chunked:
        yield b"0\r\n\r\n"


async def _reads(reader: Reader) -> AsyncIterator[bytes]:
    while data := await reader.read(_CHUNK):
        yield data


async def _copy(chunks: AsyncIterator[bytes], writer: Writer, moved: list[int], side: int) -> None:
    """Write each chunk, waiting for ``writer`` to drain (backpressure); ``moved[side]`` counts them."""
    async for data in chunks:
        writer.write(data)
        moved[side] += len(data)
        await writer.drain()


async def _finish(body: asyncio.Future[None], down: asyncio.Future[None]) -> tuple[str, BaseException | None]:
    """Wait for the answer to be copied; return a note for the log line ("" if all went well)."""
    try:
        done, _ = await asyncio.wait({body, down}, return_when=asyncio.FIRST_COMPLETED)
        if body in done and body.exception() is None:
            await asyncio.wait({down})  # the whole request is sent: wait for the whole answer
            done = {body, down}
        for t, direction in ((body, "client to socket"), (down, "socket to client")):
            if t in done and (error := t.exception()) is not None:  # cancelled only below
                what = error.strerror if isinstance(error, OSError) and error.strerror else error
                if isinstance(error, h11.RemoteProtocolError):
                    what = f"invalid body: {error}"
                return f" ({direction} stopped: {str(what).lower() or type(error).__name__})", error
        return "", None
    finally:
        body.cancel()
        down.cancel()
        await asyncio.gather(body, down, return_exceptions=True)


async def _open_unix(path: str) -> Streams:
    """Connect to the socket, retrying while its listen backlog is full (EAGAIN on AF_UNIX)."""
    delay = 0.001
    while True:
        try:
            return await asyncio.open_unix_connection(path)
        except BlockingIOError:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
