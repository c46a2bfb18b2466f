"""The connection protocol: a connection's life and send deadline (docs/internals.md, "Connection layer")."""

from __future__ import annotations

import asyncio
import functools
import heapq
import termios
from collections.abc import Callable
from operator import itemgetter

from app.connection.capacity import DRAIN, SLOW_REQUEST, Budget, logger
from app.connection.peer import PeerConnection, queued, read_groups, read_peer
from app.connection.pipelining import HELD_BUDGET, HELD_PER_PEER, HoldingFlow
from app.connection.requests import RequestHooks
from app.connection.state import CAP_LOG
from app.metrics.core import Recorder

DRAIN_STALL = 2.0  # once draining: seconds for an answer left unread, or a request begun, before closing


def protocol_factory(
    *, request_timeout: float, send_timeout: float, max_connections: int | None, recorder: Recorder | None
) -> Callable[..., PeerCredProtocol]:
    """uvicorn's ``Config(http=...)``: each connection's protocol, all sharing one held-input budget."""
    return functools.partial(
        PeerCredProtocol,
        request_timeout=request_timeout,
        send_timeout=send_timeout,
        max_connections=max_connections,
        recorder=recorder,
        held=Budget(HELD_BUDGET, HELD_PER_PEER),
    )


class SendDeadline:
    """Aborts the connection when the peer of a paused answer reads nothing of it for ``seconds``."""

    __slots__ = ("_timer", "_unsent", "loop", "paused_at", "seconds", "transport")

    def __init__(self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport, seconds: float) -> None:
        self.loop = loop
        self.transport = transport
        self.seconds = seconds
        self.paused_at: float | None = None  # since when the peer leaves our answers unread
        self._timer: asyncio.TimerHandle | None = None
        self._unsent = 0

    def paused(self) -> None:
        if self.paused_at is None:
            self.paused_at = self.loop.time()
        if self._timer is None:
            self._unsent = self._unsent_bytes()
            self._timer = self.loop.call_later(self.seconds, self._expired)

    def shorten(self, seconds: float) -> None:
        """At most ``seconds`` from now on (the server drains)."""
        if self.seconds > seconds:
            self.seconds = seconds
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self.loop.call_later(seconds, self._expired)

    def stop(self) -> None:  # writing resumed, or the connection is gone
        self.paused_at = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _unsent_bytes(self) -> int:
        # The kernel's part shows a slow reader's progress: a Unix socket turns writable only late.
        sock = self.transport.get_extra_info("socket")
        return self.transport.get_write_buffer_size() + queued(sock, termios.TIOCOUTQ)

    def _expired(self) -> None:  # runs only while paused: stop() cancels it
        unsent = self._unsent_bytes()
        if unsent < self._unsent:  # the peer read something: it gets another period
            self._unsent = unsent
            self._timer = self.loop.call_later(self.seconds, self._expired)
            return
        self._timer = None
        logger.warning(
            "Closed a connection whose peer read nothing for %gs; dropped %d unsent bytes",
            self.seconds,
            unsent,
        )
        self.transport.abort()


class PeerCredProtocol(RequestHooks):
    """One per connection, made by :func:`protocol_factory` (keywords: ``ConnectionState``)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = HoldingFlow(transport)
        self._send = SendDeadline(self.loop, transport, self.send_timeout)
        sock = transport.get_extra_info("socket")
        self.peer = peer = read_peer(sock)
        if peer is not None:  # read now, while the descriptor is surely this connection's
            self.uid = peer["uid"]
            self.connection = PeerConnection(read_groups(sock))
        if self.recorder is not None and self._timed_send is not None:
            self.tally = self.recorder.peer(self.uid)
        self._await_request()  # a connection that never sends a request is closed too
        cap = self.max_connections
        if cap is not None and len(self.connections) > cap:
            self._over_cap = not self._make_room(cap)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._send.stop()
        if self._linger is not None:
            self._linger.cancel()
        self._unset_keepalive_if_required()  # uvicorn cancels it only on a clean end, not on a reset
        # uvicorn marks only the last parsed cycle as disconnected, not the one still answering.
        for cycle in self._live:
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
            vars(cycle).pop("send", None)  # a send not used yet refers back to its cycle
        self._live.clear()
        self._unhold()
        self._settle_bodies(lost=True)
        super().connection_lost(exc)

    def shutdown(self) -> None:
        """uvicorn's graceful close, but a request begun or coming within ``DRAIN_STALL`` is answered."""
        self._draining = True
        cycle = self.cycle
        if (cycle is None or cycle.response_complete) and self._owes_request():
            self.request_timeout = min(self.request_timeout, DRAIN_STALL)
            if self._waiting_since is None:  # input after an answer, its head not parsed yet
                self._waiting_since = self.loop.time()
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_soon(self._on_deadline)  # which waits for what is left
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

    def pause_writing(self) -> None:
        super().pause_writing()
        self._send.paused()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._send.stop()
        if self._next_waits:  # the answers left our buffer: start the next pipelined request
            self._next_waits = False
            self.transport.set_write_buffer_limits()  # the transport's defaults again
            self._start_next()

    def idle_since(self) -> float | None:
        """For the connection cap: since when no request is in flight (0: closing), or None."""
        if self._linger is not None:
            return 0.0  # answered and closing: the first to go
        if self._in_head or self._refused or self.pipeline or self.transport.is_closing():
            return None
        keep_alive = self.timeout_keep_alive_task
        if keep_alive is not None:
            return keep_alive.when() - self.timeout_keep_alive
        return None if self._begins else self._waiting_since  # connected, sent nothing yet

    def slow_since(self, now: float) -> float | None:
        """Since when it has been sending a request or leaving its answer unread, if that long."""
        paused = self._send.paused_at
        if paused is not None and now - paused >= SLOW_REQUEST and not self.transport.is_closing():
            return paused  # not reading what it asked for
        since = self._waiting_since
        if since is None or now - since < SLOW_REQUEST or self._refused or self.transport.is_closing():
            return None
        cycle = self.cycle
        return None if cycle is not None and cycle.response_started else since  # not cut mid-answer

    def _make_room(self, cap: int) -> bool:
        """Over ``cap``: close up to :data:`DRAIN` longest-idle, else slowest; False if none can go."""
        idle: list[tuple[float, PeerCredProtocol]] = []
        slow: list[tuple[float, PeerCredProtocol]] = []
        now = self.loop.time()
        open_ = 0
        for conn in self.connections:
            if conn.transport.is_closing():
                continue  # on its way out: it makes room by itself
            open_ += 1
            if conn is not self and isinstance(conn, type(self)):
                since = conn.idle_since()
                if since is not None:
                    idle.append((since, conn))
                elif not idle:
                    since = conn.slow_since(now)
                    if since is not None:
                        slow.append((since, conn))
        if open_ <= cap:
            return True
        victims = idle or slow
        for _, conn in heapq.nsmallest(DRAIN, victims, key=itemgetter(0)):
            conn.transport.close()
            self.connections.discard(conn)  # counted out now; connection_lost follows
            CAP_LOG.note(self.loop, cap, "closed" if idle else "slow")
        return bool(victims)
