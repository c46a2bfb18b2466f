"""uvicorn's httptools protocol with peer credentials, deadlines, limits and strict HTTP/1.1.

The only code that sees raw connections: it puts the peer's credentials in each scope
(``app.connection.peer``), cuts off requests slower than ``request_timeout`` (408) and peers that
read nothing for ``send_timeout``, refuses what RFC 9112 says to refuse (``app.connection.framing``),
bounds pipelining (``app.connection.pipelining``) and connections (``app.connection.capacity``),
answers every error in the JSON error shape after the answers owed before it, and closes lingering
(``client.net.linger``). Why each defence is there: docs/internals.md, "Connection layer".
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import termios
from asyncio import TimerHandle
from collections.abc import Callable
from typing import Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from app.connection import framing
from app.connection.budget import Budget
from app.connection.capacity import SLOW_REQUEST, CapLog, make_room
from app.connection.deadlines import DRAIN_STALL, SendDeadline
from app.connection.framing import MAX_HEADER_BYTES, MAX_HEADERS, Refusal
from app.connection.peer import CONNECTION_KEY, PEER_KEY, PeerConnection, queued, read_groups, read_peer
from app.connection.pipelining import (
    BODY_UNCOUNTED,
    HEAD_END,
    HELD_BUDGET,
    HELD_PER_PEER,
    MAX_PIPELINE,
    HoldingFlow,
    next_cut,
)
from app.metrics.core import PeerTally, Recorder
from client.net.answers import error_response
from client.net.linger import Linger
from client.net.throttle import Throttle

__all__ = ["DRAIN_STALL", "PeerCredProtocol", "protocol_factory"]

_CLOSE = (("connection", "close"),)
_RETRY = (("retry-after", "1"), *_CLOSE)
logger = logging.getLogger("app.connections")
_CAP_LOG = CapLog()
_REJECTED = Throttle(logger)
_UPGRADES = Throttle(logger)


def protocol_factory(
    *, request_timeout: float, send_timeout: float, max_connections: int | None, recorder: Recorder | None
) -> Callable[..., PeerCredProtocol]:
    """What uvicorn's ``Config(http=...)`` takes to make each connection's protocol with these
    settings; all the connections share one held-input budget."""
    return functools.partial(
        PeerCredProtocol,
        request_timeout=request_timeout,
        send_timeout=send_timeout,
        max_connections=max_connections,
        recorder=recorder,
        held=Budget(HELD_BUDGET, HELD_PER_PEER),
    )


class PeerCredProtocol(HttpToolsProtocol):
    """HttpToolsProtocol with peer credentials, deadlines, limits and strict request framing.

    uvicorn makes one per connection through :func:`protocol_factory`; a test makes one with
    ``PeerCredProtocol(config, ServerState(), {}, loop, request_timeout=...)``, then calls
    ``connection_made(transport)``. The keywords: seconds to send a whole request and to read some
    of a paused answer, the connection cap (None: none), the metrics recorder (None: nothing
    counted) and the held-input budget (None: one of its own). No WebSockets (``ws="none"``).
    The hot path pays a few attribute checks: timers are per connection and re-armed lazily.
    """

    flow: HoldingFlow

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        request_timeout: float = 30.0,
        send_timeout: float = 30.0,
        max_connections: int | None = None,
        recorder: Recorder | None = None,
        held: Budget | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.request_timeout = request_timeout
        self.send_timeout = send_timeout
        self.max_connections = max_connections
        self.limit_concurrency = None  # uvicorn's check answers plain text and never makes room
        self.held = held if held is not None else Budget(HELD_BUDGET, HELD_PER_PEER)
        self.recorder = recorder
        self._timed_send = recorder.timed_send if recorder is not None else None
        self.tally: PeerTally | None = None
        self.peer: dict[str, int] | None = None
        self.uid: int | None = None
        self.connection: PeerConnection | None = None
        self._deadline: TimerHandle | None = None
        self._waiting_since: float | None = None
        """Since when the peer owes a complete request (None: it owes nothing)."""
        self._connected_at = 0.0
        self._in_head = False
        self._message_done = True
        self._begins = 0
        self._chunk_bytes = 0
        self._head_bytes = 0
        """Bytes of reads that continued an unfinished head (a lower bound on its size)."""
        self._reject: Refusal | None = None
        self._refused = False
        """An error was answered or waits to be: the rest of the input is ignored."""
        self._pending: bytes | None = None
        """An error answer waiting for the answers to requests pipelined before it."""
        self._good_host = b"localhost"
        self._in_chunk_head = False
        self._chunked_cycle: RequestResponseCycle | None = None
        self._watched: RequestResponseCycle | None = None
        self._trailer_bytes = 0
        self._over_cap = False
        self._linger: Linger | None = None
        self._draining = False
        self._live: list[RequestResponseCycle] = []
        """Cycles not answered yet: the running one and those pipelined behind it."""
        self._next_waits = False
        """A pipelined request waits for the answers before it to leave our buffer."""
        self._bodies: dict[RequestResponseCycle, int] = {}
        """Body bytes each unanswered request draws on the held-input budget."""

    # Connection events
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = HoldingFlow(transport)
        self._send = SendDeadline(self.loop, transport, self.flow, self.send_timeout)
        sock = transport.get_extra_info("socket")
        self.peer = peer = read_peer(sock)
        if peer is not None:  # read now, while the descriptor is surely this connection's
            self.uid = peer["uid"]
            self.connection = PeerConnection(read_groups(sock))
        if self.recorder is not None and self._timed_send is not None:
            self.tally = self.recorder.peer(self.uid)
        # A connection that never sends a request is closed after request_timeout too.
        self._connected_at = self._waiting_since = self.loop.time()
        self._deadline = self.loop.call_later(self.request_timeout, self._on_deadline)
        cap = self.max_connections
        if cap is not None and len(self.connections) > cap:
            self._over_cap = not make_room(self, self.connections, cap, self.loop, _CAP_LOG)

    def connection_lost(self, exc: Exception | None) -> None:
        self._waiting_since = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._send.cancel()
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
            # A counting send not yet used refers back to its cycle: drop it (nothing more is counted).
            vars(cycle).pop("send", None)
        self._live.clear()
        self._unhold()
        self._settle_bodies(lost=True)
        super().connection_lost(exc)

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
        if data.count(HEAD_END) < MAX_PIPELINE - len(self.pipeline):
            self._parse(data)
        else:
            self._feed(data, 0)

    def _feed(self, data: bytes, start: int) -> None:
        """Parse ``data[start:]`` in pieces of at most as many heads as the pipeline has room for,
        holding the rest unparsed once it is full (a body still due is parsed: no head end in it)."""
        view = memoryview(data)
        while start < len(data):
            room = MAX_PIPELINE - len(self.pipeline)
            if room <= 0 and (self._message_done or self._in_head):
                self._hold(data, start)
                return
            cut, halfway = next_cut(data, start, room)
            self._parse(view[start:cut])
            start = cut
            if self._refused or self.transport.is_closing():
                return
            if halfway and self._in_head and not self._head_bytes:
                self._head_bytes = 1  # split here: on_headers_complete measures the whole head

    def _hold(self, data: bytes, start: int) -> None:
        """Keep ``data[start:]`` for when the pipeline has room and stop reading, or past the
        held-input budget refuse it with 503."""
        if not self.held.take(len(data), self.uid):
            self._refuse(*framing.HELD_FULL)
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
            self.held.give(len(flow.held), self.uid)
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
            # One throttled line, not uvicorn's two per request: a peer may send Upgrade at will.
            _UPGRADES.log(logging.WARNING, "Ignored an Upgrade request: served as plain HTTP (no WebSockets)")
            return
        except httptools.HttpParserError as exc:  # our limits raise from callbacks, which ends up here
            self._refuse(*(self._reject or framing.parse_refusal(exc)))
            return
        # httptools buffers a header until it ends, so bound the head by the chunks that carry it on.
        # The chunk in which the head began is not counted here: it may hold the previous body too.
        if self._in_head and self._begins == begins:
            self._head_bytes += size
            if self._head_bytes > MAX_HEADER_BYTES:
                self._refuse(*framing.HEAD_TOO_LARGE)
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
                self._refuse(*framing.TRAILERS_TOO_LARGE)
            elif len(self.headers) > MAX_HEADERS:
                self._refuse(*framing.TOO_MANY_TRAILERS)
        if not self._message_done and not self._in_head and self.cycle is not self._watched:
            self._watch(self.cycle)  # its body is still coming: its task may answer before it has

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
            self._reject = framing.TOO_MANY_HEADERS
            raise ValueError("too many header fields")  # httptools turns it into a parser error
        # A head that fit in one small chunk is small; only a big or split one is measured.
        split_or_big = self._head_bytes or self._chunk_bytes > MAX_HEADER_BYTES
        if split_or_big and self._head_size() > MAX_HEADER_BYTES:
            self._reject = framing.HEAD_TOO_LARGE
            raise ValueError("request head too large")
        host = None
        hosts = 0
        for name, value in headers:
            if name == b"host":
                host = value
                hosts += 1
        if host != self._good_host or hosts != 1:
            self._reject = framing.check_host(host, hosts, self.parser.get_http_version())
            if self._reject is not None:
                raise ValueError("bad Host header")
            if host is not None:
                self._good_host = host
        if self._over_cap:
            if len(self.connections) > (self.max_connections or 0):
                self._reject = framing.FULL
                raise ValueError("over the connection limit")
            self._over_cap = False
        self._in_head = False
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not previous:  # else an upgrade, which uvicorn handled
            if self._draining:
                cycle.keep_alive = False  # its task has not run yet: the answer says Connection: close
            timed = self._timed_send
            if timed is not None and self.tally is not None:  # counting (its task reads cycle.send later)
                cycle.send = timed(cycle, self.tally)  # type: ignore[method-assign, assignment]
            self._live.append(cycle)
        # Trailer fields (after a chunked body) land in a list of their own, counted, never used.
        self.headers = []

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        # The hot path: a small body of the request being answered, nothing drawn on this connection.
        if self.pipeline or self._bodies or len(cycle.body) + len(body) > BODY_UNCOUNTED:
            self._draw(cycle, len(body))
        super().on_body(body)

    def _watch(self, cycle: RequestResponseCycle) -> None:
        """Make an answer that ``cycle`` starts before its body has all come say ``Connection: close``,
        and leave the close to :meth:`on_response_complete` (lingering), not to uvicorn (at once)."""
        self._watched = cycle
        send = cycle.send

        def early_send(message: Any) -> Any:
            if cycle is self.cycle and not self._message_done and not self._in_head:
                if message["type"] == "http.response.start":
                    cycle.keep_alive = False  # uvicorn writes Connection: close
                elif not message.get("more_body", False):
                    cycle.keep_alive = True  # uvicorn does not close: on_response_complete lingers
            reply = send(message)
            vars(cycle).pop("send", None)  # the task holds this send: the cycle need not (no loop)
            return reply

        cycle.send = early_send  # type: ignore[method-assign]

    def _draw(self, cycle: RequestResponseCycle, arriving: int) -> None:
        """Make what ``cycle`` draws on the held-input budget its unread body plus ``arriving``
        bytes: what the application read since the last draw (uvicorn empties the cycle's buffer as
        it reads) is given back. Past the budget the request gets 503 (a parser error)."""
        if cycle.response_complete:
            return  # uvicorn drops the rest of the body
        bodies = self._bodies
        drawn = bodies.get(cycle, 0)
        change = len(cycle.body) + arriving - drawn
        if change < 0:
            self.held.give(-change, self.uid)
        elif change and not self.held.take(change, self.uid):
            self._reject = framing.BODIES_FULL
            raise ValueError("request bodies over the held-input budget")
        bodies[cycle] = drawn + change

    def _settle_bodies(self, lost: bool = False) -> None:
        """Give back what the bodies of answered requests drew (all once the connection is ``lost``)."""
        bodies = self._bodies
        if not bodies:
            return
        for cycle in [cycle for cycle in bodies if lost or cycle.response_complete]:
            drawn = bodies.pop(cycle)
            if drawn:
                self.held.give(drawn, self.uid)

    def on_chunk_header(self) -> None:
        self._in_chunk_head = True
        cycle = self.cycle
        if self._chunked_cycle is not cycle:  # the first chunk of this message
            self._chunked_cycle = cycle
            self._trailer_bytes = 0
            codings = [value for name, value in self.scope["headers"] if name == b"transfer-encoding"]
            if len(codings) != 1 or codings[0].strip().lower() != b"chunked":
                self._reject = framing.CODING
                raise ValueError("unsupported transfer coding")

    def on_chunk_complete(self) -> None:
        self._in_chunk_head = False

    def on_message_complete(self) -> None:
        trailers = self.headers  # the last chunk's on_chunk_complete came just before, after them
        if trailers:
            if len(trailers) > MAX_HEADERS:
                self._reject = framing.TOO_MANY_TRAILERS
                raise ValueError("too many trailer fields")
            if sum(len(name) + len(value) + 4 for name, value in trailers) > MAX_HEADER_BYTES:
                self._reject = framing.TRAILERS_TOO_LARGE
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
        """uvicorn's graceful close, except that a request begun or about to come within
        :data:`DRAIN_STALL` is still answered (``Connection: close``), and an answer stalled on a
        peer that reads nothing gets :data:`DRAIN_STALL` more, not the whole send timeout."""
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
        self._send.shorten(DRAIN_STALL)

    def _owes_request(self) -> bool:
        """The peer has begun a request, or has sent nothing yet, or has input we have not read."""
        if self._refused or self.transport.is_closing():
            return False
        if not self._begins or self._in_head:
            return True
        return queued(self.transport.get_extra_info("socket"), termios.FIONREAD) > 0

    # Flow control
    def pause_writing(self) -> None:
        self.flow.pause_writing()
        self._send.paused()

    def resume_writing(self) -> None:
        self.flow.resume_writing()
        self._send.resumed()
        if self._next_waits:  # the answers left our buffer: start the next pipelined request
            self._next_waits = False
            self.transport.set_write_buffer_limits()  # the transport's defaults again
            super().on_response_complete()
            self._settle_bodies()
            if self.flow.held and not self.transport.is_closing():
                self._release()

    # Errors

    def _refuse(self, status: int, error: str, message: str, *, log: bool = True) -> None:
        """Answer ``status`` and close, after any answers owed to requests pipelined before this one."""
        self._refused = True
        self._reject = None
        self._waiting_since = None
        if (status, error, message) == framing.FULL:
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
            waiting = next((item for item in self.pipeline if item[0] is cycle), None)
            if waiting is not None:
                self.pipeline.remove(waiting)  # never run; earlier requests are still being answered
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

    def _head_size(self) -> int:
        return len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)

    # Connection cap
    def idle_since(self) -> float | None:
        """Since when this connection has had no request in flight (0: closing), or None."""
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

    def slow_since(self, now: float) -> float | None:
        """Since when it has been sending one request or leaving its answer unread, if that long."""
        paused = self._send.paused_at
        if paused is not None and now - paused >= SLOW_REQUEST and not self.transport.is_closing():
            return paused  # not reading what it asked for
        since = self._waiting_since
        if since is None or now - since < SLOW_REQUEST or self._refused or self.transport.is_closing():
            return None
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            return None  # being answered: closing it would cut an answer
        return since

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
