"""uvicorn's httptools protocol, plus peer credentials, deadlines, limits and strict HTTP/1.1.

The protocol is the only code that sees raw connections, so it is where we:

* read ``SO_PEERCRED`` once per accepted Unix-socket connection and hand it to every HTTP scope of
  that connection as ``scope["extensions"]["uds.peer"] = {"pid", "uid", "gid"}`` (absent over TCP),
  with ``scope["extensions"]["uds.connection"]``, a :class:`PeerConnection` that holds the
  supplementary groups (``SO_PEERGROUPS``) and what the access check caches for the connection;
* cut off clients that do not send a whole request within ``request_timeout`` (408, or a plain
  close for a connection that never sent a byte), and clients that read none of their response
  for ``send_timeout`` (the connection is aborted and its unsent data dropped);
* reject oversized request heads and chunked trailers (431) before they can use memory;
* refuse what RFC 9112 says to refuse: transfer codings other than ``chunked`` (501) and a
  missing, repeated or malformed ``Host`` (400);
* stop parsing a request the application answered early (403, 413, 415...): after the answer the
  connection lingers, discarding input, then closes (``client.net.linger``);
* answer every error with the project's JSON error shape, after the answers to requests pipelined
  before it;
* bound HTTP/1.1 pipelining by backpressure: while ``MAX_PIPELINE`` requests wait, the rest of the
  input is held unparsed and reading pauses; each answer that has left our buffer lets the next
  request in;
* cap concurrent connections (``limit_concurrency``): at the cap the longest-idle connection (no
  request in flight) is closed to make room, as nginx does; when every connection is busy a new
  one gets 503, and both are logged at most once per ``LOG_PERIOD`` seconds.

The hot path pays a few attribute checks, one scan of the header list for ``Host`` and one count
of head ends per read (docs/performance.md has the figures). The rest runs only for chunked
bodies, split heads, paused writes, deep pipelining or a full server.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import heapq
import logging
import re
import socket
import struct
import termios
import urllib.parse
from asyncio import TimerHandle
from operator import itemgetter
from time import perf_counter
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from app.connection.budget import Budget
from app.metrics.core import PeerTally, Recorder
from client.net.answers import error_response
from client.net.linger import Linger
from client.net.throttle import Throttle

__all__ = [
    "CONNECTION_KEY",
    "DRAIN",
    "LOG_PERIOD",
    "MAX_HEADERS",
    "MAX_HEADER_BYTES",
    "PEER_KEY",
    "PeerConnection",
    "PeerCredProtocol",
    "read_groups",
    "read_peer",
]

PEER_KEY = "uds.peer"
CONNECTION_KEY = "uds.connection"
MAX_HEADERS = 100
"""Most header fields in one request, and most trailer fields after a chunked body (gunicorn's default)."""
MAX_HEADER_BYTES = 32 * 1024
"""Largest request line plus headers, and largest trailer section, in bytes (nginx's
large_client_header_buffers)."""
DRAIN = 32
"""Idle connections closed at once when a new one arrives at the cap."""
SLOW_REQUEST = 2.0
"""At the cap with no idle connection, a connection still sending a request begun this many seconds
ago, or not reading the answer it was sent for that long, is closed to make room (oldest first): a
real client sends a whole request over a Unix socket in well under a millisecond and reads what it
asked for, so only a trickling (slowloris) or never-reading peer is that slow. Without it, as many
such peers as the cap would lock everyone out, probes included, for ``request_timeout`` or
``send_timeout``. A connection lingering after an error answer goes first of all."""
MAX_PIPELINE = 8
"""Requests parsed ahead of the one being answered on a connection (HTTP/1.1 pipelining). Each
waits as a parsed request (~3 KiB) and httptools parses a whole read at once, so without a bound one
read of 200 KiB of ``GET /healthz`` queued ~16 MiB. At the bound the rest of the read is held as
bytes, unparsed, and reading pauses until an answer makes room (:meth:`PeerCredProtocol._feed`)."""
HELD_BUDGET = 8 * 1024 * 1024
HELD_PER_PEER = HELD_BUDGET // 4
"""Bytes of pipelined input held unparsed at once, and of request bodies received but not yet read
by the application (all of a pipelined request's body until it starts), by the whole process and by
one peer uid (like the request-body budget). A connection holds at most the read that filled its
pipeline (up to 256 KiB); one that cannot hold its read, or a body that does not fit, gets 503
(``Retry-After: 1``) after the answers owed before it, then close."""
BODY_UNCOUNTED = 4 * 1024
"""Bytes of unread body of the request being answered that a connection holds without drawing on
the held-input budget (at most ``--max-connections`` times this, 2 MiB by default): most bodies are
far smaller, and they then cost no budget bookkeeping on the hot path."""
LOG_PERIOD = 10.0
"""Seconds between two log lines about connections refused or closed at the connection cap."""
DRAIN_STALL = 2.0
"""Once the server drains, seconds a peer whose answer waits unread (its buffers full: an event
stream nobody reads) may go on reading nothing before its connection is dropped. Its final event
cannot reach it anyway; without this it held the drain until ``--shutdown-timeout``, and was then
cancelled with one ERROR line per stream."""

_UCRED = struct.Struct("3i")
_OUTQ = struct.Struct("i")
_HEAD_TOO_LARGE = (431, "headers_too_large", f"the request head is over {MAX_HEADER_BYTES} bytes")
_TOO_MANY_HEADERS = (431, "headers_too_large", f"the request has more than {MAX_HEADERS} header fields")
_TRAILERS_TOO_LARGE = (431, "headers_too_large", f"the trailer fields are over {MAX_HEADER_BYTES} bytes")
_TOO_MANY_TRAILERS = (431, "headers_too_large", f"the request has more than {MAX_HEADERS} trailer fields")
_CODING = (
    501,
    "not_implemented",
    "the only transfer coding accepted is chunked; send Transfer-Encoding: chunked or Content-Length",
)
_NO_HOST = (400, "bad_request", "the request has no Host header; HTTP/1.1 requires one (Host: localhost)")
_HOSTS = (400, "bad_request", "the request has more than one Host header; send exactly one")
_BAD_HOST = (400, "bad_request", "the Host header is not a valid host[:port]; send Host: localhost")
_FULL = (503, "unavailable", "the server is at its connection limit; try again shortly")
_HELD_FULL = (
    503,
    "unavailable",
    "too much pipelined input is waiting on the server; wait for the answers before sending more",
)
_BODIES_FULL = (
    503,
    "unavailable",
    "the server is receiving too many request bodies at once (from your uid or in all); try again shortly",
)
_HOST_RE = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")
"""RFC 3986 ``host [ ":" port ]``: an IP literal, an IPv4 address or a reg-name (possibly empty)."""
_CLOSE = (("connection", "close"),)
_RETRY = (("retry-after", "1"), *_CLOSE)
_first = itemgetter(0)
_HEAD_END = b"\r\n\r\n"
logger = logging.getLogger("app.connections")


def read_peer(sock: socket.socket | None) -> dict[str, int] | None:
    """The connecting process's ``{"pid", "uid", "gid"}`` for a Unix socket, else None."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    pid, uid, gid = _UCRED.unpack(raw)
    return {"pid": pid, "uid": uid, "gid": gid}


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
"""Linux 4.13+: the connecting process's supplementary groups, as the kernel saw them at connect()."""


def read_groups(sock: socket.socket | None) -> tuple[int, ...]:
    """The connecting process's supplementary group ids (``SO_PEERGROUPS``); empty if unknown."""
    if sock is None:
        return ()
    for room in (64, 65536):  # NGROUPS_MAX is 65536; most processes have a handful
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, room * 4)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return ()
        return tuple(array.array("I", raw[: len(raw) - len(raw) % 4]))
    return ()


class PeerConnection:
    """One Unix-socket connection's identity, shared by its requests: its credentials never change
    while it is open, so the access check computes its scopes once (per policy ``generation``)."""

    __slots__ = ("generation", "groups", "scopes")

    def __init__(self, groups: tuple[int, ...]) -> None:
        self.groups = groups
        self.generation = -1
        self.scopes: frozenset[str] = frozenset()


class HoldingFlow(FlowControl):
    """uvicorn's flow control, except that reading stays paused while input is :attr:`held`.

    uvicorn resumes reading after every answer and whenever the application waits for a body; input
    held back behind a full pipeline must not grow meanwhile.
    """

    held: bytes = b""
    """Input read but not parsed yet, from :attr:`held_from` on, because ``MAX_PIPELINE`` requests wait."""
    held_from = 0

    def resume_reading(self) -> None:
        if self.read_paused and not self.held:  # uvicorn calls it after every answer: most find it reading
            super().resume_reading()


class _CapLog:
    """Connections refused (503) or closed to make room at the cap: one log line per period at most.

    The first event is logged at once; later ones are counted and summed up when the period ends.
    """

    def __init__(self) -> None:
        self.refused = 0
        self.closed = 0
        self.slow = 0
        self._timer: TimerHandle | None = None

    def note(self, loop: asyncio.AbstractEventLoop, cap: int, *, refused: bool, slow: bool = False) -> None:
        if refused:
            self.refused += 1
        elif slow:
            self.slow += 1
        else:
            self.closed += 1
        if self._timer is None:
            self._flush(loop, cap)

    def _flush(self, loop: asyncio.AbstractEventLoop, cap: int) -> None:
        self._timer = None
        if not (self.refused or self.closed or self.slow):
            return
        level = logging.WARNING if self.refused or self.slow else logging.INFO
        logger.log(
            level,
            "At the connection limit (%d, --max-connections): refused %d connection(s) "
            "with 503, closed %d idle connection(s) and %d slow to send a request (over %gs) "
            "to make room; next report in %gs at most",
            cap,
            self.refused,
            self.closed,
            self.slow,
            SLOW_REQUEST,
            LOG_PERIOD,
        )
        self.refused = self.closed = self.slow = 0
        self._timer = loop.call_later(LOG_PERIOD, self._flush, loop, cap)


_CAP_LOG = _CapLog()
_HELD = Budget(HELD_BUDGET, HELD_PER_PEER)
_REJECTED = Throttle(logger)
_UPGRADES = Throttle(logger)


class PeerCredProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with peer credentials, deadlines, limits and strict request framing.

    Per-request cost is kept near zero: the request deadline is one timer per connection that is
    re-armed lazily when it fires (not a timer per request); the head size is summed only when the
    head arrived in a chunk larger than the limit or across chunks; trailers, transfer codings and
    the send deadline are looked at only when a chunked body or a paused write happens.
    """

    flow: HoldingFlow

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.peer: dict[str, int] | None = None
        self.connection: PeerConnection | None = None
        self.request_timeout: float = float(getattr(config, "request_timeout", 30.0))
        self.send_timeout: float = float(getattr(config, "send_timeout", 30.0))
        """Seconds the peer may read nothing of a paused answer; :data:`DRAIN_STALL` once draining."""
        self.max_connections: int | None = config.limit_concurrency
        # uvicorn's own check answers plain text and never makes room; ours replaces it.
        self.limit_concurrency = None
        self._deadline: TimerHandle | None = None
        self._waiting_since: float | None = None
        """Loop time since which the client owes us a complete request (None: it owes nothing)."""
        self._connected_at = 0.0
        self._in_head = False
        self._message_done = True
        """The message being parsed is complete (or none has begun)."""
        self._begins = 0
        self._chunk_bytes = 0
        self._head_bytes = 0
        """Bytes of chunks that continued an unfinished head (a lower bound on its size)."""
        self._reject: tuple[int, str, str] | None = None
        self._refused = False
        """An error was answered or is waiting to be: the rest of the input is ignored."""
        self._pending: bytes | None = None
        """An error answer waiting for the answers to requests pipelined before it."""
        self._good_host = b"localhost"
        """The last Host value found valid on this connection (clients repeat theirs)."""
        self._in_chunk_head = False
        """The last body event was a chunk header: chunk data follows or, after the last chunk, trailers."""
        self._chunked_cycle: RequestResponseCycle | None = None
        self._trailer_bytes = 0
        self._send_timer: TimerHandle | None = None
        self._unsent = 0
        self._over_cap = False
        self._linger: Linger | None = None
        self._draining = False
        """The server drains: each request from now on is answered with ``Connection: close``."""
        self._live: list[RequestResponseCycle] = []
        self._paused_at: float | None = None
        """Loop time since which the peer has left our answers unread (writing paused), or None."""
        """Cycles not yet answered, the running one and those pipelined behind it."""
        self._next_waits = False
        """A pipelined request waits for the answers before it to leave our buffer."""
        self._bodies: dict[RequestResponseCycle, int] = {}
        """Body bytes drawn on the held-input budget for each request not answered yet: what uvicorn
        keeps in the cycle until the application reads it (all of it while the request is queued)."""
        self.recorder: Recorder | None = getattr(config, "recorder", None)
        """Counts each request for ``/metrics`` (``app.metrics.core``), when on."""
        self.cycle_class = self.recorder.cycle_class if self.recorder is not None else RequestResponseCycle
        """The request cycles' class: the recorder's counts each request when its response starts."""
        self.tally: PeerTally | None = None
        """Where the recorder counts this connection's requests by uid (``Recorder.peer``)."""

    # Connection events
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = HoldingFlow(transport)
        sock = transport.get_extra_info("socket")
        self.peer = read_peer(sock)
        # Read now, while the descriptor is surely this connection's (one getsockopt per connection).
        self.connection = PeerConnection(read_groups(sock)) if self.peer is not None else None
        if self.recorder is not None and self.recorder.on:
            self.tally = self.recorder.peer(self.peer["uid"] if self.peer is not None else None)
        # A connection that never sends a request is closed after request_timeout too.
        self._connected_at = self._waiting_since = self.loop.time()
        self._deadline = self.loop.call_later(self.request_timeout, self._on_deadline)
        cap = self.max_connections
        if cap is not None and len(self.connections) > cap:
            self._make_room(cap)

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting_since = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        # uvicorn cancels it only on a clean end; after a reset it held this connection for the
        # whole keep-alive timeout, so a flood of hang-ups piled up memory.
        keep_alive = self.timeout_keep_alive_task
        if keep_alive is not None:
            keep_alive.cancel()
            self.timeout_keep_alive_task = None
        # uvicorn marks only the last parsed cycle as disconnected; the one still answering (with
        # requests pipelined behind it) would then write to the closed transport and log an
        # "internal error" that any peer could trigger at will by hanging up.
        for cycle in self._live:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._live.clear()
        self._unhold()
        self._settle_bodies(lost=True)
        super().connection_lost(exc)

    def _unsupported_upgrade_warning(self) -> None:
        """One throttled line, not uvicorn's two per request: a peer may send Upgrade at will."""
        _UPGRADES.log(logging.WARNING, "Ignored an Upgrade request: served as plain HTTP (no WebSockets)")

    def data_received(self, data: bytes) -> None:
        if self._refused:
            # An error was answered (or will be, after earlier answers): nothing more is parsed.
            if self._linger is not None:
                self._linger.discard(len(data))
            return
        flow = self.flow
        if flow.held:  # read before the pause took effect: it waits behind what is held
            held = flow.held[flow.held_from :] + data
            self._unhold()
            self._hold(held, 0)
            return
        # Each request parsed from ``data`` but the one under way ends its head there, so with
        # fewer head ends than free places the pipeline cannot overflow (the usual case: one request).
        if data.count(_HEAD_END) < MAX_PIPELINE - len(self.pipeline):
            self._parse(data)
        else:
            self._feed(data, 0)

    def _feed(self, data: bytes, start: int) -> None:
        """Parse ``data[start:]`` in pieces, holding the rest unparsed while ``MAX_PIPELINE`` wait.

        A piece ends halfway through its k-th head end (``CRLF CRLF``), k the places free, so it
        completes at most k heads: the one under way and one per whole head end. Over a request
        whose body is still due the pipeline may be full: pieces then hold no whole head end, so
        that body arrives (its request may run before the next answer) and no further head ends.
        """
        view = memoryview(data)
        end = len(data)
        while start < end:
            room = MAX_PIPELINE - len(self.pipeline)
            if room <= 0 and (self._message_done or self._in_head):
                self._hold(data, start)
                return
            cut = start
            halfway = False
            for _ in range(max(room, 1)):
                found = data.find(_HEAD_END, cut)
                if found < 0:
                    cut = end
                    break
                cut = found + 4
            else:
                cut -= 2
                halfway = True
            self._parse(view[start:cut])
            start = cut
            if self._refused or self.transport.is_closing():
                return
            if halfway and self._in_head and not self._head_bytes:
                self._head_bytes = 1  # split here: on_headers_complete measures the whole head

    def _hold(self, data: bytes, start: int) -> None:
        """Keep ``data[start:]`` for when the pipeline has room, and stop reading; past
        :data:`HELD_BUDGET` (or the peer's share), refuse it with 503 instead."""
        uid = self.peer["uid"] if self.peer is not None else None
        if not _HELD.take(len(data), uid):
            self._refuse(*_HELD_FULL)
            return
        flow = self.flow
        flow.held = data
        flow.held_from = start
        flow.pause_reading()
        self._waiting_since = None  # the peer owes nothing: we hold its next request

    def _unhold(self) -> None:
        """Give back what is held (the caller parses it or drops it)."""
        flow = self.flow
        if flow.held:
            _HELD.give(len(flow.held), self.peer["uid"] if self.peer is not None else None)
            flow.held = b""

    def _release(self) -> None:
        """An answer went out: parse what was held, as far as the pipeline has room."""
        flow = self.flow
        data, start = flow.held, flow.held_from
        self._unhold()
        self._feed(data, start)
        if not flow.held and not self._refused:
            flow.resume_reading()
            if not self._message_done and self._waiting_since is None:
                self._waiting_since = self.loop.time()  # the rest of a request is due from now
                if self._deadline is None:
                    self._deadline = self.loop.call_later(self.request_timeout, self._on_deadline)

    def _parse(self, data: bytes | memoryview) -> None:
        """Feed ``data`` to the parser, with the bounds that need the chunks' sizes."""
        self._unset_keepalive_if_required()
        self._chunk_bytes = size = len(data)
        begins = self._begins
        chunk_cycle = self._chunked_cycle if self._in_chunk_head else None
        body_before = len(chunk_cycle.body) if chunk_cycle is not None else 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        except httptools.HttpParserError as exc:
            self._parse_error(exc)
            return
        # httptools buffers a header until it ends, so bound the head by the chunks that carry it on.
        # The chunk in which the head began is not counted here: it may hold the previous body too.
        if self._in_head and self._begins == begins:
            self._head_bytes += size
            if self._head_bytes > MAX_HEADER_BYTES:
                self._refuse(*_HEAD_TOO_LARGE)
        elif (
            chunk_cycle is not None
            and self._in_chunk_head
            and self.cycle is chunk_cycle
            and len(chunk_cycle.body) == body_before
            and not chunk_cycle.response_complete
        ):
            # A whole chunk of input after the last chunk's header and no body: trailer fields.
            # Counted per chunk, like the head: httptools re-copies a growing field on every chunk.
            self._trailer_bytes += size
            if self._trailer_bytes > MAX_HEADER_BYTES:
                self._refuse(*_TRAILERS_TOO_LARGE)
            elif len(self.headers) > MAX_HEADERS:
                self._refuse(*_TOO_MANY_TRAILERS)

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.peer is not None:
            # ASGI types extensions as dict[str, dict]; ours carry a dict and an object.
            extensions: dict[Any, Any] = {PEER_KEY: dict(self.peer), CONNECTION_KEY: self.connection}
            self.scope["extensions"] = extensions
        self._in_head = True
        self._message_done = False
        self._begins += 1
        self._head_bytes = 0
        if self._waiting_since is None:
            self._waiting_since = self.loop.time()
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._on_deadline)

    def on_headers_complete(self) -> None:
        headers = self.headers
        if len(headers) > MAX_HEADERS:
            self._reject = _TOO_MANY_HEADERS
            raise ValueError("too many header fields")  # httptools turns it into a parser error
        # A head that fit in one small chunk is small; only a big or split one is measured.
        split_or_big = self._head_bytes or self._chunk_bytes > MAX_HEADER_BYTES
        if split_or_big and self._head_size() > MAX_HEADER_BYTES:
            self._reject = _HEAD_TOO_LARGE
            raise ValueError("request head too large")
        host = None
        hosts = 0
        for name, value in headers:
            if name == b"host":
                host = value
                hosts += 1
        if host != self._good_host or hosts != 1:
            self._check_host(host, hosts)
        if self._over_cap:
            if len(self.connections) > (self.max_connections or 0):
                self._reject = _FULL
                raise ValueError("over the connection limit")
            self._over_cap = False
        self._in_head = False
        self._start_cycle()
        self._live.append(self.cycle)
        # Trailer fields (after a chunked body) land in a list of their own, counted, never used.
        self.headers = []

    def _start_cycle(self) -> None:
        """uvicorn 0.54's ``on_headers_complete``, building the cycle from :attr:`cycle_class`.

        A copy, because uvicorn names its class inside the method: changing each cycle's class
        afterwards cost 1.9 µs of a 44 µs POST (``app.metrics.core.timed_cycle``). Our protocol never
        sets uvicorn's ``limit_concurrency`` (it has its own cap), so that branch is left out; a
        request read while the server drains is not kept alive (see :meth:`shutdown`).
        tests/app/test_metrics.py fails when uvicorn changes the original.
        """
        scope = self.scope
        parser = self.parser
        http_version = parser.get_http_version()
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        scope["query_string"] = parsed_url.query or b""
        existing_cycle = self.cycle
        cycle = self.cycle = self.cycle_class(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive() and not self._draining,
            on_response=self.on_response_complete,
        )
        if self.tally is not None:  # counting
            cycle.started = perf_counter()  # type: ignore[union-attr]
            cycle.tally = self.tally  # type: ignore[union-attr]
        if existing_cycle is None or existing_cycle.response_complete:
            self._start_asgi_task(cycle, self.app)  # the usual case: answer it now
        else:
            self.flow.pause_reading()  # pipelined: queued until the answers before it are out
            self.pipeline.appendleft((cycle, self.app))

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        # The hot path: a small body of the request being answered, nothing drawn on this connection.
        if self.pipeline or self._bodies or len(cycle.body) + len(body) > BODY_UNCOUNTED:
            self._draw(cycle, len(body))
        super().on_body(body)

    def _draw(self, cycle: RequestResponseCycle, arriving: int) -> None:
        """Make what ``cycle`` draws on the held-input budget its unread body plus ``arriving``
        bytes: what the application read since the last draw (uvicorn empties the cycle's buffer as
        it reads) is given back. Past the budget the request gets 503 (a parser error)."""
        if cycle.response_complete:
            return  # uvicorn drops the rest of the body
        bodies = self._bodies
        drawn = bodies.get(cycle, 0)
        change = len(cycle.body) + arriving - drawn
        uid = self.peer["uid"] if self.peer is not None else None
        if change < 0:
            _HELD.give(-change, uid)
        elif change and not _HELD.take(change, uid):
            self._reject = _BODIES_FULL
            raise ValueError("request bodies over the held-input budget")
        bodies[cycle] = drawn + change

    def _settle_bodies(self, lost: bool = False) -> None:
        """Give back what the bodies of answered requests drew (all once the connection is ``lost``)."""
        bodies = self._bodies
        if not bodies:
            return
        uid = self.peer["uid"] if self.peer is not None else None
        for cycle in [cycle for cycle in bodies if lost or cycle.response_complete]:
            drawn = bodies.pop(cycle)
            if drawn:
                _HELD.give(drawn, uid)

    def on_chunk_header(self) -> None:
        self._in_chunk_head = True
        cycle = self.cycle
        if self._chunked_cycle is not cycle:  # the first chunk of this message
            self._chunked_cycle = cycle
            self._trailer_bytes = 0
            codings = [value for name, value in self.scope["headers"] if name == b"transfer-encoding"]
            if len(codings) != 1 or codings[0].strip().lower() != b"chunked":
                self._reject = _CODING
                raise ValueError("unsupported transfer coding")

    def on_chunk_complete(self) -> None:
        self._in_chunk_head = False

    def on_message_complete(self) -> None:
        trailers = self.headers  # the last chunk's on_chunk_complete came just before, after them
        if trailers:
            if len(trailers) > MAX_HEADERS:
                self._reject = _TOO_MANY_TRAILERS
                raise ValueError("too many trailer fields")
            if sum(len(name) + len(value) + 4 for name, value in trailers) > MAX_HEADER_BYTES:
                self._reject = _TRAILERS_TOO_LARGE
                raise ValueError("trailer section too large")
        self._waiting_since = None
        self._message_done = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        live = self._live
        if len(live) == 1:
            live.clear()
        else:
            live[:] = [cycle for cycle in live if not cycle.response_complete]
        pending = self._pending
        if pending is not None:
            last = not self.pipeline  # the response that completed was the last one owed before the error
            super().on_response_complete()
            self._settle_bodies()
            if last and not self.transport.is_closing():
                self._close_after(pending)
            return
        if self.pipeline and self.transport.get_write_buffer_size() and not self.transport.is_closing():
            # The answers are not going out (the peer reads slower than we answer): the next
            # pipelined request waits until they have, so a peer that reads nothing pins one answer.
            self._next_waits = True
            self.transport.set_write_buffer_limits(high=0)  # resume_writing once the buffer is empty
            return
        super().on_response_complete()
        self._settle_bodies()
        if not self._message_done and not self._in_head and self.cycle.response_complete:
            # Answered before the whole request arrived (403, 413, 415...): parse no more of it.
            self._refused = True
            self._waiting_since = None
            self._close_after(b"")
        elif self.flow.held and not self.transport.is_closing():
            self._release()

    def shutdown(self) -> None:
        """uvicorn's graceful close, except that a request the peer has begun or is about to send is
        still answered (with ``Connection: close``) if it comes within :data:`DRAIN_STALL` seconds.

        Those are connections accepted just before the drain with nothing read yet, a head half
        read, or input waiting unread after an answer: closing them, as uvicorn does, fails a
        request the client had every reason to send, which a restart behind a held socket must
        not do. An answer stalled on a peer that reads nothing gets :data:`DRAIN_STALL` seconds
        more, not the whole send timeout.
        """
        self._draining = True
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and self._owes_request():
            now = self.loop.time()
            self.request_timeout = min(self.request_timeout, DRAIN_STALL)
            if self._waiting_since is None:  # input after an answer, its head not parsed yet
                self._waiting_since = now
            if self._deadline is not None:
                self._deadline.cancel()
            left = self._waiting_since + self.request_timeout - now
            self._deadline = self.loop.call_later(max(0.0, left), self._on_deadline)
        else:
            super().shutdown()
        if self.send_timeout > DRAIN_STALL:
            self.send_timeout = DRAIN_STALL
            if self._send_timer is not None:
                self._send_timer.cancel()
                self._send_timer = self.loop.call_later(DRAIN_STALL, self._on_send_timeout)

    def _owes_request(self) -> bool:
        """The peer has begun a request, or has sent nothing yet, or has input we have not read."""
        if self._refused or self.transport.is_closing():
            return False
        if not self._begins or self._in_head:
            return True
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        with contextlib.suppress(OSError, ValueError):
            return bool(_OUTQ.unpack(fcntl.ioctl(sock.fileno(), termios.FIONREAD, _OUTQ.pack(0)))[0])
        return False

    # Flow control
    def pause_writing(self) -> None:
        """The transport's buffer is full: the peer must read within ``send_timeout``."""
        self.flow.pause_writing()
        if self._paused_at is None:
            self._paused_at = self.loop.time()
        if self._send_timer is None:
            self._unsent = self._unsent_bytes()
            self._send_timer = self.loop.call_later(self.send_timeout, self._on_send_timeout)

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        self._paused_at = None
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._next_waits:  # the answers left our buffer: start the next pipelined request
            self._next_waits = False
            self.transport.set_write_buffer_limits()  # the transport's defaults again
            super().on_response_complete()
            self._settle_bodies()
            if self.flow.held and not self.transport.is_closing():
                self._release()

    def _unsent_bytes(self) -> int:
        """Bytes written but not yet read by the peer: our buffer plus the kernel's (``SIOCOUTQ``).

        The kernel's part matters: a Unix socket turns writable only once three quarters of its
        send buffer were read, so a slow reader can make progress our buffer does not show for long.
        """
        unsent = self.transport.get_write_buffer_size()
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, ValueError):
                unsent += _OUTQ.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, _OUTQ.pack(0)))[0]
        return unsent

    def _on_send_timeout(self) -> None:
        self._send_timer = None
        if not self.flow.write_paused:
            return
        unsent = self._unsent_bytes()
        if unsent < self._unsent:  # the peer read something: it gets another period
            self._unsent = unsent
            self._send_timer = self.loop.call_later(self.send_timeout, self._on_send_timeout)
            return
        logger.warning(
            "Closed a connection whose peer read nothing for %gs; dropped %d unsent bytes",
            self.send_timeout,
            unsent,
        )
        self.transport.abort()

    # Errors
    def send_400_response(self, msg: str) -> None:
        """Parse errors (and limits raised from parser callbacks) as the JSON error shape."""
        self._refuse(*(self._reject or (400, "bad_request", "the request is not valid HTTP/1.1")))

    def _parse_error(self, exc: httptools.HttpParserError) -> None:
        reject = self._reject
        if reject is None:
            reason = str(exc).replace("`", "")
            if "Transfer-Encoding" in reason and "Content-Length" not in reason:
                reject = _CODING
            else:
                reason = reason or type(exc).__name__
                reject = (400, "bad_request", f"the request is not valid HTTP/1.1 ({reason})")
        self._refuse(*reject)

    def _refuse(self, status: int, error: str, message: str, *, log: bool = True) -> None:
        """Answer ``status`` and close, after any answers owed to requests pipelined before this one."""
        self._refused = True
        self._reject = None
        self._waiting_since = None
        if status == 503 and error == _FULL[1] and message == _FULL[2]:
            _CAP_LOG.note(self.loop, self.max_connections or 0, refused=True)
        elif log:
            _REJECTED.log(logging.WARNING, "Rejected a request with %d: %s", status, message)
        if self.transport.is_closing():
            return
        if self.recorder is not None and self.tally is not None:
            self.recorder.refused(self._method(), status, self.tally)
        answer = error_response(status, error, message, headers=_RETRY if status == 503 else _CLOSE)
        cycle = self.cycle
        if cycle is not None and not self._in_head and not self._message_done:
            # The error is in the body of the request being parsed, whose answer may be under way.
            queued = next((item for item in self.pipeline if item[0] is cycle), None)
            if queued is not None:
                self.pipeline.remove(queued)  # never run; earlier requests are still being answered
                self._pending = answer
                return
            if cycle.response_started:
                self.transport.close()  # its answer is (being) sent; the rest of it is not read
                return
            cycle.disconnected = True  # the application waits for a body that will not come
            cycle.message_event.set()
        elif cycle is not None and not cycle.response_complete:
            self._pending = answer  # answer the requests before this one first
            self.flow.pause_reading()
            return
        self._close_after(answer)

    def _method(self) -> str:
        """The method of the request being refused, as far as it was parsed (else ``unknown``)."""
        method = self.scope.get("method") if self._begins else None
        if method is None and self._begins and self.url:  # the method comes before the target
            with contextlib.suppress(httptools.HttpParserError, UnicodeDecodeError):
                method = self.parser.get_method().decode("ascii")
        return method or "unknown"

    def _close_after(self, answer: bytes) -> None:
        """Write ``answer``, then close lingering (``client.net.linger``)."""
        transport = self.transport
        if transport.is_closing():
            return
        if answer:
            transport.write(answer)
        if self._linger is None:
            self._linger = Linger(transport, self.loop)

    def _check_host(self, host: bytes | None, hosts: int) -> None:
        """RFC 9112 section 3.2: exactly one valid Host (HTTP/1.0 may omit it)."""
        if hosts > 1:
            self._reject = _HOSTS
        elif host is None:
            if self.parser.get_http_version() == "1.0":
                return
            self._reject = _NO_HOST
        elif _HOST_RE.fullmatch(host) is None:
            self._reject = _BAD_HOST
        else:
            self._good_host = host
            return
        raise ValueError("bad Host header")

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    # Connection cap
    def _idle_since(self) -> float | None:
        """Since when this connection has had no request in flight, or None if it has one."""
        if self._linger is not None:
            return 0.0  # answered and closing: the first to go
        if self._in_head or self._refused or self.pipeline or self.transport.is_closing():
            return None
        keep_alive = self.timeout_keep_alive_task
        if keep_alive is not None:
            return keep_alive.when() - self.timeout_keep_alive
        if not self._begins:  # connected, sent nothing yet
            return self._connected_at
        return None

    def _slow_since(self, now: float) -> float | None:
        """Since when this connection has been sending one request, if longer than ``SLOW_REQUEST``."""
        paused = self._paused_at
        if paused is not None and now - paused >= SLOW_REQUEST and not self.transport.is_closing():
            return paused  # not reading what it asked for
        since = self._waiting_since
        if since is None or now - since < SLOW_REQUEST or self._refused or self.transport.is_closing():
            return None
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            return None  # being answered: closing it would cut an answer
        return since

    def _make_room(self, cap: int) -> None:
        """Over the cap: close the longest-idle connections, else the slowest senders, else mark this
        one for a 503.

        Up to ``DRAIN`` connections are closed at once (nginx's ``ngx_drain_connections`` closes 32),
        so a burst of new connections costs one scan per ``DRAIN`` of them, not one each.
        """
        idle: list[tuple[float, PeerCredProtocol]] = []
        slow: list[tuple[float, PeerCredProtocol]] = []
        now = self.loop.time()
        open_ = 0
        for conn in self.connections:
            if conn.transport.is_closing():
                continue  # on its way out: it makes room by itself
            open_ += 1
            if conn is not self and isinstance(conn, PeerCredProtocol):
                since = conn._idle_since()
                if since is not None:
                    idle.append((since, conn))
                elif not idle:
                    since = conn._slow_since(now)
                    if since is not None:
                        slow.append((since, conn))
        if open_ <= cap:
            return
        victims = idle or slow
        if not victims:
            self._over_cap = True  # its request gets 503 unless a connection frees up first
            return
        for _, conn in heapq.nsmallest(DRAIN, victims, key=_first):
            conn.transport.close()
            self.connections.discard(conn)  # counted out now; connection_lost follows
            _CAP_LOG.note(self.loop, cap, refused=False, slow=not idle)

    def _on_deadline(self) -> None:
        self._deadline = None
        since = self._waiting_since
        if since is None or self.transport.is_closing():
            return  # idle between requests: uvicorn's keep-alive timeout takes over
        remaining = since + self.request_timeout - self.loop.time()
        if remaining > 0:
            self._deadline = self.loop.call_later(remaining, self._on_deadline)
            return
        self._waiting_since = None
        cycle = self.cycle
        if not self._in_head and (cycle is None or cycle.response_complete):
            logger.info("Closed a connection that sent no request for %gs", self.request_timeout)
            self.transport.close()
            return
        if not self._in_head and cycle is not None and cycle.response_started:
            # The application is answering without the body; only the body is late.
            self.transport.close()
            return
        logger.warning(
            "Request not complete after %gs: answered 408 and closed the connection", self.request_timeout
        )
        # The application, if it waits for the body, learns that the client is gone; the 408 follows
        # any answers owed to requests pipelined before this one.
        late = f"the request was not complete within {self.request_timeout:g}s; send it faster"
        self._refuse(408, "request_timeout", late, log=False)
