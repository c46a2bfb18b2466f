"""The send deadline: the peer of a paused answer must read some of it every ``seconds``."""

from __future__ import annotations

import asyncio
import logging
import termios

from app.connection.peer import queued

DRAIN_STALL = 2.0  # once draining: seconds for an answer left unread, or a request begun, before closing
logger = logging.getLogger("app.connections")


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

    def stop(self) -> None:
        """Writing resumed, or the connection is gone."""
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
