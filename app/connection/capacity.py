"""The connection cap: at the cap, the longest-idle connections make room for a new one, as in nginx."""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import MutableSet
from operator import itemgetter
from typing import Any, Protocol

__all__ = ["DRAIN", "LOG_PERIOD", "SLOW_REQUEST", "CapLog", "Capped", "make_room"]

DRAIN = 32
"""Connections closed at once to make room (nginx's ``ngx_drain_connections``): a burst of
newcomers costs one scan per ``DRAIN`` of them."""
SLOW_REQUEST = 2.0
"""With no idle connection, one still sending a request begun this many seconds ago, or not reading
the answer it asked for, goes (oldest first): only a trickling or never-reading peer is that slow."""
LOG_PERIOD = 10.0
"""Seconds between two log lines about connections refused or closed at the cap."""
_first = itemgetter(0)
logger = logging.getLogger("app.connections")


class Capped(Protocol):
    """A connection as the cap sees it."""

    transport: asyncio.Transport

    def idle_since(self) -> float | None:
        """Since when it has had no request in flight (0: answered and closing), or None."""

    def slow_since(self, now: float) -> float | None:
        """Since when it has been sending one request or not reading, if over ``SLOW_REQUEST``."""


class CapLog:
    """Connections refused (503) or closed at the cap: the first logged at once, the rest summed up
    in one line per :data:`LOG_PERIOD`."""

    def __init__(self) -> None:
        self.refused = self.closed = self.slow = 0
        self._timer: asyncio.TimerHandle | None = None

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
        logger.log(
            logging.WARNING if self.refused or self.slow else logging.INFO,
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


def make_room(
    newcomer: Capped, connections: MutableSet[Any], cap: int, loop: asyncio.AbstractEventLoop, log: CapLog
) -> bool:
    """Over ``cap``: close up to :data:`DRAIN` of the longest-idle connections, else of the slowest;
    return False when none can go (the newcomer's request then gets 503)."""
    idle: list[tuple[float, Capped]] = []
    slow: list[tuple[float, Capped]] = []
    now = loop.time()
    kind = type(newcomer)
    open_ = 0
    for conn in connections:
        if conn.transport.is_closing():
            continue  # on its way out: it makes room by itself
        open_ += 1
        if conn is not newcomer and isinstance(conn, kind):
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
    for _, conn in heapq.nsmallest(DRAIN, victims, key=_first):
        conn.transport.close()
        connections.discard(conn)  # counted out now; connection_lost follows
        log.note(loop, cap, refused=False, slow=not idle)
    return bool(victims)
