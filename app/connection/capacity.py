"""What a process's connections share: budgets of amounts capped per peer uid; the connection cap."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

DRAIN = 32  # connections closed at once to make room (nginx's ngx_drain_connections)
SLOW_REQUEST = 2.0  # with none idle, one sending a request or not reading for this long goes
LOG_PERIOD = 10.0  # seconds between two log lines about the cap
logger = logging.getLogger("app.connections")


class Budget:
    """Drawn on and given back on the event loop thread; what does not fit is refused, not queued."""

    def __init__(self, total: int, per_peer: int) -> None:
        self.free = total
        self.per_peer = per_peer
        self.held: dict[int | None, int] = {}

    def take(self, amount: int, uid: int | None) -> bool:
        held = self.held.get(uid, 0)
        if amount > self.free or held + amount > self.per_peer:
            return False
        self.free -= amount
        self.held[uid] = held + amount
        return True

    def give(self, amount: int, uid: int | None) -> None:
        self.free += amount
        left = self.held[uid] - amount
        if left:
            self.held[uid] = left
        else:
            del self.held[uid]


class CapLog:
    """Connections refused or closed at the cap: the first logged at once, the rest once a period."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()  # "refused", "closed" (idle), "slow"
        self._timer: asyncio.TimerHandle | None = None

    def note(self, loop: asyncio.AbstractEventLoop, cap: int, what: str) -> None:
        self.counts[what] += 1
        if self._timer is None:
            self._flush(loop, cap)

    def _flush(self, loop: asyncio.AbstractEventLoop, cap: int) -> None:
        self._timer = None
        counts = self.counts
        if not counts:
            return
        logger.log(
            logging.WARNING if counts["refused"] or counts["slow"] else logging.INFO,
            "At the connection limit (%d, --max-connections): refused %d connection(s) "
            f"with 503, closed %d idle connection(s) and %d slow to send a request (over {SLOW_REQUEST:g}s) "
            f"to make room; next report in {LOG_PERIOD:g}s at most",
            cap,
            counts["refused"],
            counts["closed"],
            counts["slow"],
        )
        counts.clear()
        self._timer = loop.call_later(LOG_PERIOD, self._flush, loop, cap)
